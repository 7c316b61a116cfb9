// Unit pools filled straight from PEFT LoRA adapters: every module of an
// adapter goes into the caller's pool for that module, all or nothing.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "rankwise/core/error.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/io/adapter_dir.hpp"
#include "rankwise/io/peft_adapter.hpp"
#include "rankwise/io/safetensors.hpp"
#include "rankwise/layers/unit_pool.hpp"

namespace rankwise {
namespace io {

/// PEFT module name (as PeftAdapter::modules names them, without
/// "base_model.model.", e.g. "transformer.h.0.attn.c_attn") -> the pool that
/// serves that module. Several modules may share a pool of their shape; each
/// then gets its own AdapterId there.
template <class T, class Backend>
using PoolMap = std::map<std::string, UnitPool<T, Backend>*>;

struct PoolLoadOptions {
  /// Adapter modules the map does not name are refused by default: serving
  /// the adapter without them would silently change what it computes.
  bool allow_unmapped_modules = false;
  /// modules_to_save tensors (whole modules that replace the base's, e.g. a
  /// classifier head) cannot live in a unit pool; refused by default for the
  /// same reason, skipped when set (the caller serves them some other way).
  bool allow_saved_modules = false;
};

/// One module of an adapter as resident in its pool.
template <class T, class Backend>
struct PooledModule {
  std::string module;
  UnitPool<T, Backend>* pool = nullptr;
  AdapterId id = kNoAdapter;
  std::int64_t rank = 0;
  double scale = 0.0;
};

/// What load_adapter_into_pools put where: one entry per module, in the
/// adapter's module order (sorted by name). A plain record: it does not
/// remove anything when destroyed (the pools may be gone by then); call
/// unload_adapter.
template <class T, class Backend>
struct PooledAdapter {
  std::string source;  ///< the directory (or the label given with an in-memory adapter)
  std::vector<PooledModule<T, Backend>> modules;

  bool empty() const { return modules.empty(); }

  /// The entry of `name`; throws rankwise::error naming the module when the
  /// adapter has none.
  const PooledModule<T, Backend>& module(const std::string& name) const {
    for (const auto& m : modules) {
      if (m.module == name) return m;
    }
    RANKWISE_CHECK(false, "PooledAdapter: adapter \"", source, "\" has no module \"",
                   detail::name_brief(name), "\" in any pool (", modules.size(),
                   " modules loaded)");
    return modules.front();
  }
  /// The id of `name` in its pool: what a token using this adapter passes to
  /// that pool's plan().
  AdapterId id(const std::string& name) const { return module(name).id; }
};

namespace detail {

inline std::string pool_shape(std::int64_t d_in, std::int64_t d_out) {
  return ::rankwise::detail::concat("d_in x d_out = ", d_in, " x ", d_out);
}

// The first few names of `adapter`'s modules, for a message about a name it lacks.
inline std::string some_module_names(const PeftAdapter& adapter) {
  std::string out;
  const std::size_t shown = adapter.modules.size() < 3 ? adapter.modules.size() : 3;
  for (std::size_t i = 0; i < shown; ++i) {
    out += (i ? ", \"" : "\"") + name_brief(adapter.modules[i].name) + "\"";
  }
  if (adapter.modules.size() > shown) out += ", ...";
  return out;
}

// The values of one tensor, refused when any is NaN or infinite: a diverged
// run's adapter would turn every token routed to it into NaN.
inline void check_finite_tensor(const HostTensor& t, const std::string& at,
                                const std::string& key) {
  const std::int64_t bad = count_non_finite(t);
  RANKWISE_CHECK_CODE(bad == 0, ErrorCode::kIo, at, ": tensor \"", key, "\" holds ", bad,
                      " non-finite values (NaN or infinity) of ", t.values.size(),
                      "; refusing to serve it");
}

// Everything that can be known to fail before a pool changes: the map, the
// adapter's modules and their shapes against their pools, and the pages and
// adapter slots each pool has free for all of the adapter's modules at once.
template <class T, class Backend>
std::vector<std::pair<const LoraModule*, UnitPool<T, Backend>*>> check_pool_load(
    const PeftAdapter& adapter, const std::string& label, const PoolMap<T, Backend>& pools,
    const PoolLoadOptions& options) {
  const std::string where =
      ::rankwise::detail::concat("load_adapter_into_pools: adapter \"", label, "\"");
  RANKWISE_CHECK(!adapter.modules.empty(), where, ": holds no LoRA modules");
  RANKWISE_CHECK(!pools.empty(), where, ": the module map is empty (no pool to load into)");
  for (const auto& entry : pools) {
    RANKWISE_CHECK(entry.second != nullptr, where, ": the module map gives module \"",
                   name_brief(entry.first), "\" a null pool");
    RANKWISE_CHECK(adapter.find_module(entry.first) != nullptr, where,
                   ": the module map names module \"", name_brief(entry.first),
                   "\", which the adapter does not have (its ", adapter.modules.size(),
                   " modules: ", some_module_names(adapter), ")");
  }
  if (!options.allow_saved_modules && !adapter.saved_tensors.empty()) {
    RANKWISE_CHECK(false, where, ": holds ", adapter.saved_tensors.size(),
                   " modules_to_save tensors (first \"",
                   name_brief(adapter.saved_tensors.begin()->first),
                   "\"), whole modules that replace the base model's; a unit pool serves LoRA "
                   "deltas only (PoolLoadOptions.allow_saved_modules skips them)");
  }

  struct Room {
    std::int64_t pages = 0;     // pages the adapter's modules take in this pool so far
    std::int64_t adapters = 0;  // slots likewise
  };
  std::map<const UnitPool<T, Backend>*, Room> need;
  std::vector<std::pair<const LoraModule*, UnitPool<T, Backend>*>> plan;
  for (const LoraModule& m : adapter.modules) {
    const auto it = pools.find(m.name);
    if (it == pools.end()) {
      RANKWISE_CHECK(options.allow_unmapped_modules, where, ": module \"", name_brief(m.name),
                     "\" is not in the module map (", pools.size(), " of the adapter's ",
                     adapter.modules.size(),
                     " modules are); map it, or set PoolLoadOptions.allow_unmapped_modules to "
                     "serve the adapter without it");
      continue;
    }
    UnitPool<T, Backend>& pool = *it->second;
    const std::string at =
        ::rankwise::detail::concat(where, ", module \"", name_brief(m.name), "\"");
    const std::string key_a = std::string(kPeftKeyPrefix) + name_brief(m.name) + kPeftASuffix;
    const std::string key_b = std::string(kPeftKeyPrefix) + name_brief(m.name) + kPeftBSuffix;
    // The reader guarantees these for a directory; an adapter built in memory may not.
    RANKWISE_CHECK(
        m.rank > 0 && m.a.shape.size() == 2 && m.b.shape.size() == 2 && m.a.shape[0] == m.rank &&
            m.b.shape[1] == m.rank && m.d_in() > 0 && m.d_out() > 0,
        at, ": lora_A ", shape_string(m.a.shape), " and lora_B ", shape_string(m.b.shape),
        " are not (rank x d_in) and (d_out x rank) for rank ", m.rank);
    RANKWISE_CHECK(static_cast<std::int64_t>(m.a.values.size()) == m.a.numel() &&
                       static_cast<std::int64_t>(m.b.values.size()) == m.b.numel(),
                   at, ": lora_A holds ", m.a.values.size(), " values and lora_B ",
                   m.b.values.size(), " for shapes ", shape_string(m.a.shape), " and ",
                   shape_string(m.b.shape));
    RANKWISE_CHECK(std::isfinite(m.scale), at, ": scale ", m.scale, " is not finite");
    check_finite_tensor(m.a, at, key_a);
    check_finite_tensor(m.b, at, key_b);
    if (m.d_in() != pool.d_in() || m.d_out() != pool.d_out()) {
      // lora_A / lora_B hold (r x d_in) / (d_out x r) whatever the base
      // layout; with fan_in_fan_out (GPT-2's Conv1D) the base weight itself is
      // (d_in x d_out), so a pool sized from its shape as (d_out, d_in) is transposed.
      const bool transposed = m.d_in() == pool.d_out() && m.d_out() == pool.d_in();
      RANKWISE_CHECK(
          false, at, ": lora_A ", shape_string(m.a.shape), " (rank x d_in) and lora_B ",
          shape_string(m.b.shape), " (d_out x rank) give ", pool_shape(m.d_in(), m.d_out()),
          ", but its pool is ", pool_shape(pool.d_in(), pool.d_out()),
          transposed
              ? (adapter.fan_in_fan_out ? " (transposed; fan_in_fan_out = true: the base model "
                                          "stores this weight as d_in x d_out, PEFT's factors are "
                                          "not transposed)"
                                        : " (transposed)")
              : "");
    }
    Room& room = need[&pool];
    const std::int64_t page = pool.config().page_units;
    const std::int64_t free_pages = pool.free_units() / page;
    const std::int64_t free_slots = pool.free_slots();
    room.pages += (m.rank + page - 1) / page;
    room.adapters += 1;
    RANKWISE_CHECK(room.pages <= free_pages, at, " (rank ", m.rank, ") does not fit its pool (",
                   pool_shape(pool.d_in(), pool.d_out()),
                   "): the adapter's modules mapped to that pool need ", room.pages, " pages of ",
                   page, " units up to and including this one, but ", free_pages, " of ",
                   pool.capacity_units() / page, " pages are free (", pool.free_units(), " of ",
                   pool.capacity_units(), " units)");
    RANKWISE_CHECK(room.adapters <= free_slots, at, " does not fit its pool (",
                   pool_shape(pool.d_in(), pool.d_out()),
                   "): the adapter's modules mapped to "
                   "that pool need ",
                   room.adapters,
                   " adapter slots up to and including this "
                   "one, but ",
                   free_slots, " of ", pool.config().max_adapters,
                   " are free (UnitPoolConfig.max_adapters)");
    plan.emplace_back(&m, &pool);
  }
  return plan;
}

}  // namespace detail

/// Checks, without changing any pool, that `adapter` would load into `pools`
/// (see add_adapter_to_pools); throws what loading would throw.
template <class T, class Backend>
void check_adapter_for_pools(const PeftAdapter& adapter, const std::string& label,
                             const PoolMap<T, Backend>& pools,
                             const PoolLoadOptions& options = {}) {
  detail::check_pool_load(adapter, label, pools, options);
}

/// Adds every module of `adapter` (already read, e.g. by read_peft_adapter,
/// or built in memory; `label` names it in messages and in the result) to its
/// pool as a plain LoRA adapter with the module's own scale (alpha / r, or
/// alpha / sqrt(r) with rsLoRA, after rank_pattern / alpha_pattern). Every
/// check comes first: each mapped module present in the adapter, each
/// adapter module mapped (unless allowed otherwise), no modules_to_save
/// (likewise), shapes (r x d_in, d_out x r) matching the pool's d_in / d_out,
/// finite values, and free pages and adapter slots in every pool for all of
/// the adapter's modules together. Throws rankwise::error naming the adapter,
/// the module or tensor and the shapes; on any failure, also one during the
/// copies (an allocation), no pool keeps any of the adapter's units. `ctx`
/// must be the context the pools were made with: the factors are staged
/// through it (on the GPU, queued on its stream before the pools' copies).
template <class T, class Backend>
PooledAdapter<T, Backend> add_adapter_to_pools(Context<Backend>& ctx, const PeftAdapter& adapter,
                                               const std::string& label,
                                               const PoolMap<T, Backend>& pools,
                                               const PoolLoadOptions& options = {}) {
  const auto plan = detail::check_pool_load(adapter, label, pools, options);
  for (const auto& entry : pools) {
    RANKWISE_CHECK(&entry.second->context() == &ctx, "load_adapter_into_pools: adapter \"", label,
                   "\": the pool of module \"", detail::name_brief(entry.first),
                   "\" runs on another context than the one given to the loader");
  }
  PooledAdapter<T, Backend> out;
  out.source = label;
  out.modules.reserve(plan.size());
  try {
    for (const auto& step : plan) {
      const LoraModule& m = *step.first;
      UnitPool<T, Backend>& pool = *step.second;
      const std::int64_t r = m.rank, d_in = m.d_in(), d_out = m.d_out();
      // PEFT's B (d_out x r) is the pool's Bᵀ (r x d_out) transposed.
      std::vector<double> bt(static_cast<std::size_t>(r * d_out));
      for (std::int64_t o = 0; o < d_out; ++o) {
        for (std::int64_t i = 0; i < r; ++i) bt[i * d_out + o] = m.b.values[o * r + i];
      }
      Buffer<Backend, T> a_buf(r * d_in), bt_buf(r * d_out);
      Kernels<Backend, T>::upload_doubles(ctx, m.a.values.data(), a_buf.view(r, d_in));
      Kernels<Backend, T>::upload_doubles(ctx, bt.data(), bt_buf.view(r, d_out));
      const AdapterId id =
          pool.add_lora(MatrixView<const T>(a_buf.view(r, d_in)),
                        MatrixView<const T>(bt_buf.view(r, d_out)), m.scale, AdapterKind::kLora);
      out.modules.push_back({m.name, &pool, id, r, m.scale});
    }
  } catch (...) {
    for (const auto& done : out.modules) done.pool->remove(done.id);
    throw;
  }
  return out;
}

/// Reads the PEFT LoRA adapter in `dir` (read_peft_adapter: its errors name
/// the file, tensor and rule) and adds it as add_adapter_to_pools does,
/// labelled with `dir`.
template <class T, class Backend>
PooledAdapter<T, Backend> load_adapter_into_pools(Context<Backend>& ctx, const std::string& dir,
                                                  const PoolMap<T, Backend>& pools,
                                                  const PoolLoadOptions& options = {}) {
  return add_adapter_to_pools(ctx, read_peft_adapter(dir), dir, pools, options);
}

/// Removes every module of `loaded` from its pool, returning their units, and
/// empties it. All or nothing: when any id is no longer in its pool (removed
/// by hand, or unloaded twice) it throws naming the module and removes none.
template <class T, class Backend>
void unload_adapter(PooledAdapter<T, Backend>& loaded) {
  for (const auto& m : loaded.modules) {
    RANKWISE_CHECK(m.pool != nullptr && m.pool->contains(m.id), "unload_adapter: adapter \"",
                   loaded.source, "\", module \"", detail::name_brief(m.module), "\": id ", m.id,
                   " is no longer in its pool (removed already); nothing was removed");
  }
  for (const auto& m : loaded.modules) m.pool->remove(m.id);
  loaded.modules.clear();
}

}  // namespace io
}  // namespace rankwise
