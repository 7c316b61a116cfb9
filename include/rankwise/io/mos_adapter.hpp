// MoS adapter directories: shard pools, every layer's index lists and the MoS configuration, so
// training resumes and serving reads shards in place; and the export to a plain PEFT LoRA.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/error.hpp"
#include "rankwise/core/shard_config.hpp"
#include "rankwise/core/shard_indices.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/io/adapter_dir.hpp"
#include "rankwise/io/peft_adapter.hpp"
#include "rankwise/io/safetensors.hpp"
#include "rankwise/layers/mos.hpp"
#include "rankwise/layers/shard_pool.hpp"

namespace rankwise {
namespace io {

/// peft_type of a rankwise MoS directory (PEFT has no MoS type; the reference
/// code saves plain LoRA for deployment, which mos_to_peft_lora produces).
inline constexpr const char* kMosPeftType = "RANKWISE_MOS";
inline constexpr int kMosFormatVersion = 1;

/// One projection type's pools and how its layers use them.
struct MosPoolEntry {
  ShardPoolConfig pool;  ///< d_in, d_out, L, v, p, l
  MosConfig config;      ///< r, alpha, strategies, seed
  HostTensor a;          ///< shards_A: (M x d_in / l)
  HostTensor b;          ///< shards_B: (M x d_out / l)
  DType dtype = DType::kF32;
};

/// One MoS layer: the module it adapts, its pool, its index in the pool and its lists.
struct MosLayerEntry {
  std::string module;
  std::string pool;
  std::int64_t layer = 0;
  ShardIndices indices;  ///< I_a, I_b: r · l shard indices each
};

struct MosAdapter {
  std::string base_model_name_or_path;
  std::string task_type;
  bool fan_in_fan_out = false;
  std::map<std::string, MosPoolEntry> pools;  ///< by projection type, e.g. "q_proj"
  std::vector<MosLayerEntry> layers;          ///< sorted by module
};

namespace detail {

inline constexpr const char* kMosPoolPrefix = "mos.pools.";
inline constexpr const char* kMosShardsASuffix = ".shards_A";
inline constexpr const char* kMosShardsBSuffix = ".shards_B";
inline constexpr const char* kMosIndexASuffix = ".mos_indices_A";
inline constexpr const char* kMosIndexBSuffix = ".mos_indices_B";

// Validates a pool and its use as the layers do, with M = v · L · l checked
// against int32 (the shard indices' type); throws kIo prefixed by `where`.
inline void check_mos_pool(const ShardPoolConfig& pool, const MosConfig& config,
                           const std::string& where) {
  try {
    config.validate(pool);
    const std::int64_t m = checked_mul(checked_mul(pool.equivalent_rank, pool.num_layers, "M"),
                                       pool.shards_per_vector, "M");
    RANKWISE_CHECK(m <= std::numeric_limits<std::int32_t>::max(), "M = v · L · l = ", m,
                   " exceeds the int32 shard indices");
    checked_mul(config.rank, pool.shards_per_vector, "r · l");
    checked_elements(m, std::max(pool.shard_in(), pool.shard_out()), "a shard pool");
  } catch (const error& e) {
    RANKWISE_CHECK_CODE(false, ErrorCode::kIo, where, ": ", e.what());
  }
}

inline SafetensorsTensor index_tensor(const std::vector<std::int32_t>& list) {
  SafetensorsTensor t;
  t.dtype = DType::kI32;
  t.shape = {static_cast<std::int64_t>(list.size())};
  t.data.resize(list.size() * 4);
  for (std::size_t i = 0; i < list.size(); ++i) {
    store_le(t.data.data() + 4 * i, static_cast<std::uint32_t>(list[i]), 4);
  }
  return t;
}

inline std::vector<std::int32_t> index_values(const SafetensorsTensor& t, std::int64_t length,
                                              const std::string& where, const std::string& key) {
  RANKWISE_CHECK_CODE(t.dtype == DType::kI32, ErrorCode::kIo, where, ", tensor \"", name_brief(key),
                      "\": dtype ", dtype_name(t.dtype), ", expected I32");
  require_shape(t.shape, {length}, where, key, "(r · l shard indices)");
  std::vector<std::int32_t> out(static_cast<std::size_t>(length));
  for (std::size_t i = 0; i < out.size(); ++i) {
    out[i] =
        static_cast<std::int32_t>(static_cast<std::uint32_t>(load_le(t.data.data() + 4 * i, 4)));
  }
  return out;
}

inline std::int64_t json_int_field(const nlohmann::json& obj, const char* key,
                                   const std::string& where, std::int64_t min) {
  const auto it = obj.find(key);
  RANKWISE_CHECK_CODE(it != obj.end(), ErrorCode::kIo, where, ": missing \"", key, "\"");
  RANKWISE_CHECK_CODE(it->is_number_integer() && it->get<std::int64_t>() >= min, ErrorCode::kIo,
                      where, ": \"", key, "\" must be an integer >= ", min, ", got ",
                      json_brief(*it));
  return it->get<std::int64_t>();
}

inline bool json_bool_field(const nlohmann::json& obj, const char* key, const std::string& where) {
  const auto it = obj.find(key);
  RANKWISE_CHECK_CODE(it != obj.end() && it->is_boolean(), ErrorCode::kIo, where, ": \"", key,
                      "\" must be true or false, got ",
                      it == obj.end() ? std::string("nothing") : json_brief(*it));
  return it->get<bool>();
}

inline MosAdapter mos_adapter_from(const nlohmann::json& config, const SafetensorsFile& file,
                                   const std::string& config_where,
                                   const std::string& weights_where) {
  MosAdapter out;
  const std::string type = config_peft_type(config);
  RANKWISE_CHECK_CODE(type == kMosPeftType, ErrorCode::kIo, config_where, ": peft_type is ",
                      json_brief(config.value("peft_type", nlohmann::json(nullptr))),
                      ", expected \"", kMosPeftType, "\" (a rankwise MoS adapter)");
  const std::int64_t version = json_int_field(config, "format_version", config_where, 1);
  RANKWISE_CHECK_CODE(version == kMosFormatVersion, ErrorCode::kIo, config_where,
                      ": format_version ", version, " is not supported (this reader knows ",
                      kMosFormatVersion, ")");
  out.base_model_name_or_path = config_string(config, "base_model_name_or_path", config_where);
  out.task_type = config_string(config, "task_type", config_where);
  out.fan_in_fan_out = config_bool(config, "fan_in_fan_out", false, config_where);

  const auto pools_it = config.find("pools");
  RANKWISE_CHECK_CODE(pools_it != config.end() && pools_it->is_object() && !pools_it->empty(),
                      ErrorCode::kIo, config_where, ": \"pools\" must be a non-empty object");
  std::set<std::string> used;  // tensors accounted for
  for (auto it = pools_it->begin(); it != pools_it->end(); ++it) {
    const std::string where =
        ::rankwise::detail::concat(config_where, ", pool ", quote_brief(it.key()));
    RANKWISE_CHECK_CODE(!it.key().empty() && it->is_object(), ErrorCode::kIo, where,
                        ": must be a named object");
    const nlohmann::json& p = *it;
    MosPoolEntry e;
    e.pool.d_in = json_int_field(p, "d_in", where, 1);
    e.pool.d_out = json_int_field(p, "d_out", where, 1);
    e.pool.num_layers = json_int_field(p, "num_layers", where, 1);
    e.pool.equivalent_rank = json_int_field(p, "equivalent_rank", where, 1);
    e.pool.private_rank = json_int_field(p, "private_rank", where, 0);
    e.pool.shards_per_vector = json_int_field(p, "shards_per_vector", where, 1);
    e.config.rank = json_int_field(p, "rank", where, 1);
    e.config.alpha = config_number(p, "lora_alpha", 16.0, where);
    e.config.subset_selection = json_bool_field(p, "subset_selection", where);
    e.config.pair_dissociation = json_bool_field(p, "pair_dissociation", where);
    e.config.seed = config_uint(p, "seed", 0, where);
    check_mos_pool(e.pool, e.config, where);
    const std::string key = std::string(kMosPoolPrefix) + it.key();
    const std::int64_t m = e.pool.num_shards();
    const std::pair<const char*, HostTensor*> parts[2] = {{kMosShardsASuffix, &e.a},
                                                          {kMosShardsBSuffix, &e.b}};
    for (int i = 0; i < 2; ++i) {
      const std::string name = key + parts[i].first;
      const auto t = file.tensors.find(name);
      RANKWISE_CHECK_CODE(t != file.tensors.end(), ErrorCode::kIo, weights_where,
                          ": missing tensor \"", name_brief(name), "\"");
      *parts[i].second = finite_values(t->second, weights_where, name);
      require_shape(parts[i].second->shape, {m, i == 0 ? e.pool.shard_in() : e.pool.shard_out()},
                    weights_where, name, i == 0 ? "(M x d_in / l)" : "(M x d_out / l)");
      if (i == 0) e.dtype = t->second.dtype;
      used.insert(name);
    }
    out.pools.emplace(it.key(), std::move(e));
  }

  const auto layers_it = config.find("layers");
  RANKWISE_CHECK_CODE(layers_it != config.end() && layers_it->is_object() && !layers_it->empty(),
                      ErrorCode::kIo, config_where, ": \"layers\" must be a non-empty object");
  std::map<std::string, std::set<std::int64_t>> seen;
  for (auto it = layers_it->begin(); it != layers_it->end(); ++it) {
    const std::string where =
        ::rankwise::detail::concat(config_where, ", layer ", quote_brief(it.key()));
    RANKWISE_CHECK_CODE(!it.key().empty() && it->is_object(), ErrorCode::kIo, where,
                        ": must be a named object");
    MosLayerEntry l;
    l.module = it.key();
    const auto pool_it = it->find("pool");
    RANKWISE_CHECK_CODE(pool_it != it->end() && pool_it->is_string(), ErrorCode::kIo, where,
                        ": \"pool\" must name a pool");
    l.pool = pool_it->get<std::string>();
    const auto pool = out.pools.find(l.pool);
    RANKWISE_CHECK_CODE(pool != out.pools.end(), ErrorCode::kIo, where, ": pool ",
                        quote_brief(l.pool), " is not in \"pools\"");
    l.layer = json_int_field(*it, "layer", where, 0);
    RANKWISE_CHECK_CODE(l.layer < pool->second.pool.num_layers, ErrorCode::kIo, where, ": layer ",
                        l.layer, " is outside [0, L = ", pool->second.pool.num_layers, ") of pool ",
                        quote_brief(l.pool));
    RANKWISE_CHECK_CODE(seen[l.pool].insert(l.layer).second, ErrorCode::kIo, where, ": layer ",
                        l.layer, " of pool ", quote_brief(l.pool), " is used by two modules");
    const std::int64_t length = pool->second.config.rank * pool->second.pool.shards_per_vector;
    const std::string key = std::string(kPeftKeyPrefix) + l.module;
    for (int i = 0; i < 2; ++i) {
      const std::string name = key + (i == 0 ? kMosIndexASuffix : kMosIndexBSuffix);
      const auto t = file.tensors.find(name);
      RANKWISE_CHECK_CODE(t != file.tensors.end(), ErrorCode::kIo, weights_where,
                          ": missing tensor \"", name_brief(name), "\"");
      (i == 0 ? l.indices.a : l.indices.b) = index_values(t->second, length, weights_where, name);
      used.insert(name);
    }
    try {
      check_shard_indices(pool->second.pool, pool->second.config, l.indices);
    } catch (const error& e) {
      RANKWISE_CHECK_CODE(false, ErrorCode::kIo, weights_where, ", module \"", name_brief(l.module),
                          "\": ", e.what());
    }
    out.layers.push_back(std::move(l));
  }
  for (const auto& kv : out.pools) {
    RANKWISE_CHECK_CODE(
        static_cast<std::int64_t>(seen[kv.first].size()) == kv.second.pool.num_layers,
        ErrorCode::kIo, config_where, ": pool ", quote_brief(kv.first),
        " has L = ", kv.second.pool.num_layers, " layers but ", seen[kv.first].size(),
        " modules use it");
  }
  for (const auto& kv : file.tensors) {
    RANKWISE_CHECK_CODE(used.count(kv.first) != 0, ErrorCode::kIo, weights_where, ": tensor \"",
                        name_brief(kv.first),
                        "\" is neither a pool in the config nor a layer's index list");
  }
  std::sort(out.layers.begin(), out.layers.end(),
            [](const MosLayerEntry& x, const MosLayerEntry& y) { return x.module < y.module; });
  return out;
}

inline void check_mos_adapter(const MosAdapter& a) {
  RANKWISE_CHECK(!a.pools.empty() && !a.layers.empty(), "MoS writer: the adapter has ",
                 a.pools.size(), " pools and ", a.layers.size(), " layers; needs both");
  for (const auto& kv : a.pools) {
    const std::string at = ::rankwise::detail::concat("MoS writer: pool ", quote_brief(kv.first));
    RANKWISE_CHECK(!kv.first.empty(), "MoS writer: a pool has an empty name");
    try {
      check_mos_pool(kv.second.pool, kv.second.config, at);
    } catch (const error& e) {
      RANKWISE_CHECK(false, e.what());
    }
    const auto& p = kv.second.pool;
    RANKWISE_CHECK(
        kv.second.a.shape == std::vector<std::int64_t>({p.num_shards(), p.shard_in()}) &&
            kv.second.b.shape == std::vector<std::int64_t>({p.num_shards(), p.shard_out()}) &&
            static_cast<std::int64_t>(kv.second.a.values.size()) == kv.second.a.numel() &&
            static_cast<std::int64_t>(kv.second.b.values.size()) == kv.second.b.numel(),
        at, ": shards_A ", shape_string(kv.second.a.shape), " and shards_B ",
        shape_string(kv.second.b.shape), " must be (M x d_in / l) and (M x d_out / l)");
    RANKWISE_CHECK(count_non_finite(kv.second.a) == 0 && count_non_finite(kv.second.b) == 0, at,
                   ": holds non-finite values");
  }
  std::map<std::string, std::set<std::int64_t>> seen;
  std::set<std::string> modules;
  for (const auto& l : a.layers) {
    const std::string at =
        ::rankwise::detail::concat("MoS writer: module \"", name_brief(l.module), "\"");
    RANKWISE_CHECK(!l.module.empty(), "MoS writer: a layer has an empty module name");
    RANKWISE_CHECK(modules.insert(l.module).second, at, ": appears twice");
    const auto pool = a.pools.find(l.pool);
    RANKWISE_CHECK(pool != a.pools.end(), at, ": pool ", quote_brief(l.pool),
                   " is not in the adapter");
    RANKWISE_CHECK(l.layer >= 0 && l.layer < pool->second.pool.num_layers, at, ": layer ", l.layer,
                   " is outside [0, L = ", pool->second.pool.num_layers, ")");
    RANKWISE_CHECK(seen[l.pool].insert(l.layer).second, at, ": layer ", l.layer, " of pool ",
                   quote_brief(l.pool), " is used twice");
    check_shard_indices(pool->second.pool, pool->second.config, l.indices);
  }
  for (const auto& kv : a.pools) {
    RANKWISE_CHECK(static_cast<std::int64_t>(seen[kv.first].size()) == kv.second.pool.num_layers,
                   "MoS writer: pool ", quote_brief(kv.first),
                   " has L = ", kv.second.pool.num_layers, " layers but ", seen[kv.first].size(),
                   " modules use it");
  }
}

inline nlohmann::json mos_config_json(const MosAdapter& a) {
  using nlohmann::json;
  json c = json::object();
  c["peft_type"] = kMosPeftType;
  c["format_version"] = kMosFormatVersion;
  c["base_model_name_or_path"] =
      a.base_model_name_or_path.empty() ? json(nullptr) : json(a.base_model_name_or_path);
  c["task_type"] = a.task_type.empty() ? json(nullptr) : json(a.task_type);
  c["fan_in_fan_out"] = a.fan_in_fan_out;
  json pools = json::object();
  for (const auto& kv : a.pools) {
    const auto& p = kv.second.pool;
    const auto& m = kv.second.config;
    pools[kv.first] = {{"d_in", p.d_in},
                       {"d_out", p.d_out},
                       {"num_layers", p.num_layers},
                       {"equivalent_rank", p.equivalent_rank},
                       {"private_rank", p.private_rank},
                       {"shards_per_vector", p.shards_per_vector},
                       {"rank", m.rank},
                       {"lora_alpha", alpha_json(m.alpha)},
                       {"subset_selection", m.subset_selection},
                       {"pair_dissociation", m.pair_dissociation},
                       {"seed", m.seed}};
  }
  c["pools"] = pools;
  json layers = json::object();
  for (const auto& l : a.layers) layers[l.module] = {{"pool", l.pool}, {"layer", l.layer}};
  c["layers"] = layers;
  return c;
}

}  // namespace detail

/// Reads the MoS directory `dir`: adapter_config.json (peft_type
/// "RANKWISE_MOS", format_version 1, "pools": {type: {d_in, d_out,
/// num_layers, equivalent_rank, private_rank, shards_per_vector, rank,
/// lora_alpha, subset_selection, pair_dissociation, seed}}, "layers":
/// {module: {pool, layer}}) and adapter_model.safetensors (per pool
/// mos.pools.<type>.shards_A (M x d_in/l) and .shards_B (M x d_out/l), per
/// module base_model.model.<module>.mos_indices_A / _B (I32, r · l)).
/// Throws rankwise::error(kIo) naming the file, pool, module or tensor and
/// the rule broken (a pool inconsistent as MosConfig::validate checks, a
/// missing or misshapen tensor, an index out of [0, M), a pool layer used
/// twice or not at all, a tensor the config does not account for).
inline MosAdapter read_mos_adapter(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path config_path = fs::path(dir) / kPeftConfigFile;
  const fs::path weights_path = fs::path(dir) / kPeftWeightsFile;
  const std::string config_where =
      ::rankwise::detail::concat("MoS config \"", config_path.string(), "\"");
  const std::string weights_where =
      ::rankwise::detail::concat("MoS weights \"", weights_path.string(), "\"");
  const nlohmann::json config = detail::read_adapter_config(config_path, config_where);
  return detail::mos_adapter_from(config, read_safetensors(weights_path.string()), config_where,
                                  weights_where);
}

/// Writes `adapter` as a MoS directory (see read_mos_adapter), shards stored
/// as `dtype` (F32, F16, BF16, F64; indices always I32), through a temporary
/// directory moved into place. Throws rankwise::error(kInvalidArgument) for
/// an inconsistent adapter, kIo for file-system failures and refusals.
inline void write_mos_adapter(const MosAdapter& adapter, const std::string& dir, DType dtype,
                              bool overwrite = false) {
  RANKWISE_CHECK(dtype_has_values(dtype), "MoS writer: cannot store shards as ", dtype_name(dtype),
                 " (supported: F32, F16, BF16, F64)");
  detail::check_mos_adapter(adapter);
  const std::string config_text =
      detail::dump_config(detail::mos_config_json(adapter), "MoS writer");
  SafetensorsFile weights;
  weights.metadata = std::map<std::string, std::string>{{"format", "pt"}};
  for (const auto& kv : adapter.pools) {
    const std::string key = std::string(detail::kMosPoolPrefix) + kv.first;
    weights.tensors.emplace(key + detail::kMosShardsASuffix,
                            from_host_tensor(kv.second.a, dtype, key + detail::kMosShardsASuffix));
    weights.tensors.emplace(key + detail::kMosShardsBSuffix,
                            from_host_tensor(kv.second.b, dtype, key + detail::kMosShardsBSuffix));
  }
  for (const auto& l : adapter.layers) {
    const std::string key = std::string(detail::kPeftKeyPrefix) + l.module;
    weights.tensors.emplace(key + detail::kMosIndexASuffix, detail::index_tensor(l.indices.a));
    weights.tensors.emplace(key + detail::kMosIndexBSuffix, detail::index_tensor(l.indices.b));
  }
  detail::write_staged_directory(
      dir,
      {{kPeftWeightsFile, [&](const std::string& path) { write_safetensors(weights, path); }},
       {kPeftConfigFile,
        [&](const std::string& path) {
          detail::write_text_atomically(path, config_text, "MoS config");
        }}},
      overwrite, "MoS writer");
}

/// The pool entry of a ShardPool used with `config` (values downloaded).
template <class T, class Backend>
MosPoolEntry mos_pool_entry(ShardPool<T, Backend>& pool, const MosConfig& config,
                            DType dtype = DType::kF32) {
  const ShardPoolConfig& pc = pool.config();
  MosPoolEntry e;
  e.pool = pc;
  e.config = config;
  e.dtype = dtype;
  e.a = HostTensor{{pc.num_shards(), pc.shard_in()},
                   std::vector<double>(static_cast<std::size_t>(pc.num_shards() * pc.shard_in()))};
  e.b = HostTensor{{pc.num_shards(), pc.shard_out()},
                   std::vector<double>(static_cast<std::size_t>(pc.num_shards() * pc.shard_out()))};
  Kernels<Backend, T>::download_doubles(pool.context(), pool.a(), e.a.values.data());
  Kernels<Backend, T>::download_doubles(pool.context(), pool.b(), e.b.values.data());
  return e;
}

/// Uploads `entry`'s shards into `pool`, whose configuration must equal entry.pool.
template <class T, class Backend>
void load_mos_pool(ShardPool<T, Backend>& pool, const MosPoolEntry& entry) {
  const ShardPoolConfig& pc = pool.config();
  const ShardPoolConfig& ec = entry.pool;
  RANKWISE_CHECK(pc.d_in == ec.d_in && pc.d_out == ec.d_out && pc.num_layers == ec.num_layers &&
                     pc.equivalent_rank == ec.equivalent_rank &&
                     pc.private_rank == ec.private_rank &&
                     pc.shards_per_vector == ec.shards_per_vector,
                 "load_mos_pool: the pool's configuration differs from the saved one");
  require_tensor({{"a", entry.a}}, "a", {pc.num_shards(), pc.shard_in()});
  require_tensor({{"b", entry.b}}, "b", {pc.num_shards(), pc.shard_out()});
  Kernels<Backend, T>::upload_doubles(pool.context(), entry.a.values.data(), pool.a());
  Kernels<Backend, T>::upload_doubles(pool.context(), entry.b.values.data(), pool.b());
}

/// The saved form of a Mos layer adapting `module` through pool `pool_name`.
template <class T, class Backend>
MosLayerEntry mos_layer_entry(const std::string& module, const std::string& pool_name,
                              const Mos<T, Backend>& layer) {
  return MosLayerEntry{module, pool_name, layer.layer(), layer.indices()};
}

/// A plain PEFT LoRA with each layer's assembled A (r x d_in) and B (d_out x r),
/// scale alpha / r, as the reference code exports MoS for deployment. The
/// values are the pool's, gathered on the host, so the export is exact.
inline PeftAdapter mos_to_peft_lora(const MosAdapter& adapter) {
  PeftAdapter out;
  out.base_model_name_or_path = adapter.base_model_name_or_path;
  out.task_type = adapter.task_type;
  out.fan_in_fan_out = adapter.fan_in_fan_out;
  for (const auto& l : adapter.layers) {
    const auto pool_it = adapter.pools.find(l.pool);
    RANKWISE_CHECK(pool_it != adapter.pools.end(), "mos_to_peft_lora: module \"", l.module,
                   "\" names pool ", l.pool, ", which the adapter lacks");
    const MosPoolEntry& e = pool_it->second;
    check_shard_indices(e.pool, e.config, l.indices);
    const std::int64_t r = e.config.rank, s_n = e.pool.shards_per_vector;
    const std::int64_t w_in = e.pool.shard_in(), w_out = e.pool.shard_out();
    LoraModule m;
    m.name = l.module;
    m.rank = r;
    m.alpha = e.config.alpha;
    m.scale = e.config.scale();
    m.a_dtype = m.b_dtype = e.dtype;
    m.a = HostTensor{{r, e.pool.d_in},
                     std::vector<double>(static_cast<std::size_t>(r * e.pool.d_in))};
    m.b = HostTensor{{e.pool.d_out, r},
                     std::vector<double>(static_cast<std::size_t>(r * e.pool.d_out))};
    for (std::int64_t j = 0; j < r; ++j) {
      for (std::int64_t s = 0; s < s_n; ++s) {
        const std::int64_t sa = l.indices.a[j * s_n + s], sb = l.indices.b[j * s_n + s];
        for (std::int64_t t = 0; t < w_in; ++t) {
          m.a.values[j * e.pool.d_in + s * w_in + t] = e.a.values[sa * w_in + t];
        }
        for (std::int64_t t = 0; t < w_out; ++t) {
          m.b.values[(s * w_out + t) * r + j] = e.b.values[sb * w_out + t];
        }
      }
    }
    out.modules.push_back(std::move(m));
  }
  if (!out.modules.empty()) {
    out.r = out.modules.front().rank;
    out.lora_alpha = out.modules.front().alpha;
  }
  std::sort(out.modules.begin(), out.modules.end(),
            [](const LoraModule& x, const LoraModule& y) { return x.name < y.name; });
  return out;
}

}  // namespace io
}  // namespace rankwise
