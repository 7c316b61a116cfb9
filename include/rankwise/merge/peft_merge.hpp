// Merging PEFT adapter files: the modules of several adapters paired up and
// checked, merged with merge_modules, and written back as a plain PEFT LoRA.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "rankwise/io/peft_adapter.hpp"
#include "rankwise/merge/merge_modules.hpp"

namespace rankwise {
namespace merge {

namespace detail {

inline LoraFactors factors_of(const io::LoraModule& m) {
  LoraFactors f;
  f.a.resize(m.rank, m.d_in());
  f.b.resize(m.d_out(), m.rank);
  for (std::int64_t i = 0; i < m.rank; ++i) {
    for (std::int64_t c = 0; c < m.d_in(); ++c) f.a(i, c) = m.a.values[i * m.d_in() + c];
  }
  for (std::int64_t o = 0; o < m.d_out(); ++o) {
    for (std::int64_t i = 0; i < m.rank; ++i) f.b(o, i) = m.b.values[o * m.rank + i];
  }
  f.scale = m.scale;
  return f;
}

inline std::size_t count_non_finite(const std::vector<double>& values) {
  std::size_t n = 0;
  for (const double v : values) n += std::isfinite(v) ? 0 : 1;
  return n;
}

// "adapter 1 (\"path\")", or "adapter 1" without labels.
inline std::string adapter_label(const std::vector<std::string>& labels, std::size_t t) {
  if (t < labels.size()) return ::rankwise::detail::concat("adapter ", t, " (\"", labels[t], "\")");
  return ::rankwise::detail::concat("adapter ", t);
}

// Refuses an adapter holding NaN or infinity, naming the first tensor (in
// module order) with the count, and how many of the adapter's tensors are
// affected: published adapters exist whose every value is NaN.
inline void check_finite(const io::PeftAdapter& adapter, const std::vector<std::string>& labels,
                         std::size_t t) {
  std::string first;
  std::size_t first_count = 0, first_total = 0, bad_tensors = 0;
  for (const auto& m : adapter.modules) {
    for (int is_b = 0; is_b < 2; ++is_b) {
      const HostTensor& values = is_b ? m.b : m.a;
      const std::size_t bad = count_non_finite(values.values);
      if (bad == 0) continue;
      if (bad_tensors++ == 0) {
        first =
            ::rankwise::detail::concat(io::detail::kPeftKeyPrefix, io::detail::name_brief(m.name),
                                       is_b ? io::detail::kPeftBSuffix : io::detail::kPeftASuffix);
        first_count = bad;
        first_total = values.values.size();
      }
    }
  }
  RANKWISE_CHECK(bad_tensors == 0, "merge: ", adapter_label(labels, t), ": tensor \"", first,
                 "\" holds ", first_count, " non-finite values (NaN or infinity) of ", first_total,
                 "; ", bad_tensors, " of the adapter's ", 2 * adapter.modules.size(),
                 " tensors hold some. The adapter is unusable; refusing to merge it");
}

}  // namespace detail

/// The modules of `adapters`, paired by name: names[i] with inputs[i] (one
/// source per adapter, in order, weighted by `weights` or 1). `labels` (the
/// adapters' paths, optional) name them in errors. Throws rankwise::error
/// naming the module when the adapters differ in their module sets, a
/// module's d_in or d_out, or fan_in_fan_out, and naming the adapter, the
/// tensor and the count when an adapter holds non-finite values.
inline void collect_modules(const std::vector<io::PeftAdapter>& adapters,
                            const std::vector<double>& weights, std::vector<std::string>& names,
                            std::vector<MergeInput>& inputs,
                            const std::vector<std::string>& labels = {}) {
  RANKWISE_CHECK(!adapters.empty(), "merge: no adapters given");
  for (std::size_t t = 0; t < adapters.size(); ++t) detail::check_finite(adapters[t], labels, t);
  RANKWISE_CHECK(weights.empty() || weights.size() == adapters.size(), "merge: ", weights.size(),
                 " weights for ", adapters.size(), " adapters");
  const io::PeftAdapter& first = adapters.front();
  for (std::size_t t = 1; t < adapters.size(); ++t) {
    const io::PeftAdapter& other = adapters[t];
    RANKWISE_CHECK(other.fan_in_fan_out == first.fan_in_fan_out,
                   "merge: ", detail::adapter_label(labels, t),
                   " has fan_in_fan_out = ", other.fan_in_fan_out, " but ",
                   detail::adapter_label(labels, 0), " has ", first.fan_in_fan_out);
    for (const auto& m : first.modules) {
      RANKWISE_CHECK(other.find_module(m.name) != nullptr, "merge: module '", m.name, "' is in ",
                     detail::adapter_label(labels, 0), " but not in ",
                     detail::adapter_label(labels, t));
    }
    for (const auto& m : other.modules) {
      RANKWISE_CHECK(first.find_module(m.name) != nullptr, "merge: module '", m.name, "' is in ",
                     detail::adapter_label(labels, t), " but not in ",
                     detail::adapter_label(labels, 0));
    }
  }
  names.clear();
  inputs.clear();
  for (const auto& m : first.modules) {
    MergeInput in;
    in.weights = weights;
    for (std::size_t t = 0; t < adapters.size(); ++t) {
      const io::LoraModule& mine = *adapters[t].find_module(m.name);
      RANKWISE_CHECK(mine.d_in() == m.d_in() && mine.d_out() == m.d_out(), "merge: module '",
                     m.name, "' is (d_out x d_in) = (", mine.d_out(), " x ", mine.d_in(), ") in ",
                     detail::adapter_label(labels, t), " but (", m.d_out(), " x ", m.d_in(),
                     ") in ", detail::adapter_label(labels, 0));
      in.sources.push_back(detail::factors_of(mine));
    }
    names.push_back(m.name);
    inputs.push_back(std::move(in));
  }
}

/// The merged modules as a PEFT LoRA adapter shaped like `like` (base model,
/// task type, fan_in_fan_out, target modules): each module's scale is folded
/// so that alpha = scale · rank, and rsLoRA is off.
inline io::PeftAdapter to_peft_adapter(const std::vector<ModuleMerge>& merged,
                                       const io::PeftAdapter& like) {
  io::PeftAdapter out;
  out.base_model_name_or_path = like.base_model_name_or_path;
  out.task_type = like.task_type;
  out.fan_in_fan_out = like.fan_in_fan_out;
  out.target_modules = like.target_modules;
  out.target_modules_regex = like.target_modules_regex;
  out.use_rslora = false;
  for (const auto& m : merged) {
    io::LoraModule mod;
    mod.name = m.name;
    mod.rank = m.merged.rank();
    const auto d_in = m.merged.d_in(), d_out = m.merged.d_out();
    mod.a = HostTensor{{mod.rank, d_in},
                       std::vector<double>(static_cast<std::size_t>(mod.rank * d_in))};
    mod.b = HostTensor{{d_out, mod.rank},
                       std::vector<double>(static_cast<std::size_t>(d_out * mod.rank))};
    for (std::int64_t i = 0; i < mod.rank; ++i) {
      for (std::int64_t c = 0; c < d_in; ++c) mod.a.values[i * d_in + c] = m.merged.a(i, c);
    }
    for (std::int64_t o = 0; o < d_out; ++o) {
      for (std::int64_t i = 0; i < mod.rank; ++i) mod.b.values[o * mod.rank + i] = m.merged.b(o, i);
    }
    mod.scale = m.merged.scale;
    mod.alpha = m.merged.scale * static_cast<double>(mod.rank);
    out.modules.push_back(std::move(mod));
  }
  if (!out.modules.empty()) {
    out.r = out.modules.front().rank;
    out.lora_alpha = out.modules.front().alpha;
  }
  return out;
}

/// The quality report: per module the relative error against Σ_t w_t ΔW_t and
/// the share of each source kept, and their means.
inline nlohmann::json quality_report(const std::vector<ModuleMerge>& merged,
                                     const MergeOptions& options,
                                     const std::vector<std::string>& sources) {
  nlohmann::json report;
  report["method"] = to_string(options.method);
  report["rank"] = options.rank;
  report["seed"] = options.seed;
  report["sources"] = sources;
  nlohmann::json modules = nlohmann::json::array();
  double error_sum = 0.0;
  std::vector<double> kept_sum(sources.size(), 0.0);
  for (const auto& m : merged) {
    modules.push_back({{"module", m.name},
                       {"rank", m.merged.rank()},
                       {"relative_error", m.quality.relative_error},
                       {"kept", m.quality.kept}});
    error_sum += m.quality.relative_error;
    for (std::size_t t = 0; t < kept_sum.size() && t < m.quality.kept.size(); ++t) {
      kept_sum[t] += m.quality.kept[t];
    }
  }
  const double count = merged.empty() ? 1.0 : static_cast<double>(merged.size());
  for (double& k : kept_sum) k /= count;
  report["mean_relative_error"] = error_sum / count;
  report["mean_kept"] = kept_sum;
  report["modules"] = std::move(modules);
  return report;
}

}  // namespace merge
}  // namespace rankwise
