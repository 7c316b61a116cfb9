// SMoRA adapter directories in the layout of the reference code (PEFT fork, peft_type "SRMOLE"):
// read, validate, write, and move between a directory and Smora layers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "rankwise/core/error.hpp"
#include "rankwise/core/router_config.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/io/adapter_dir.hpp"
#include "rankwise/io/peft_adapter.hpp"
#include "rankwise/io/safetensors.hpp"
#include "rankwise/layers/smora.hpp"

namespace rankwise {
namespace io {

/// The reference code's name for SMoRA.
inline constexpr const char* kSmoraPeftType = "SRMOLE";

/// One SMoRA-adapted layer as the reference code saves it.
struct SmoraModule {
  std::string name;           ///< module path in the base model
  HostTensor a;               ///< lora_A.weight:      (r x d_in)
  HostTensor b;               ///< lora_B.weight:      (d_out x r)
  HostTensor router;          ///< lora_router.weight: (r/g x d_in)
  HostTensor bias;            ///< lora_biases:        (r), one balance bias per rank
  DType dtype = DType::kF32;  ///< dtype lora_A was stored in (the writer's default)

  std::int64_t d_in() const { return a.shape.size() == 2 ? a.shape[1] : 0; }
  std::int64_t d_out() const { return b.shape.size() == 2 ? b.shape[0] : 0; }
};

/// A SMoRA adapter: r ranks, k = activate_r of them active per token, routed in
/// blocks of g = rank_partition ranks, scale lora_alpha / k.
struct SmoraAdapter {
  std::string base_model_name_or_path;  ///< empty: null
  std::string task_type;                ///< empty: null
  std::int64_t r = 8;
  std::int64_t activate_r = 8;      ///< k
  std::int64_t rank_partition = 1;  ///< g
  double lora_alpha = 8;
  bool fan_in_fan_out = false;
  std::vector<std::string> target_modules;  ///< as PeftAdapter
  std::string target_modules_regex;
  std::vector<SmoraModule> modules;  ///< sorted by name

  /// lora_alpha / activate_r: the reference layer's scaling.
  double scale() const { return lora_alpha / static_cast<double>(activate_r); }

  /// The Smora layer configuration of `module`: the reference routing
  /// (sigmoid scores, bias added before top-k and kept in the gates, gates
  /// normalised to sum to k) with one balance bias per rank.
  SmoraConfig layer_config(const SmoraModule& module) const {
    SmoraConfig c;
    c.d_in = module.d_in();
    c.d_out = module.d_out();
    c.alpha = lora_alpha;
    c.router.num_units = r;
    c.router.top_k = activate_r;
    c.router.group_size = rank_partition;
    c.router.bias_per_rank = true;
    c.router.score = ScoreFunction::kSigmoid;
    c.router.normalization = GateNormalization::kSumToK;
    c.router.gate_uses_bias = true;
    return c;
  }

  const SmoraModule* find_module(const std::string& name) const {
    for (const auto& m : modules) {
      if (m.name == name) return &m;
    }
    return nullptr;
  }
};

namespace detail {

inline constexpr const char* kSmoraASuffix = ".lora_A.weight";
inline constexpr const char* kSmoraBSuffix = ".lora_B.weight";
inline constexpr const char* kSmoraRouterSuffix = ".lora_router.weight";
inline constexpr const char* kSmoraBiasSuffix = ".lora_biases";

// The config fields of SRMoLEConfig (a LoraConfig) that rankwise uses; the
// LoRA options SRMoLE's layer ignores must be at their defaults, since a
// value there would be lost silently.
inline void parse_smora_config(const nlohmann::json& config, const std::string& where,
                               SmoraAdapter& out) {
  const std::string type = config_peft_type(config);
  RANKWISE_CHECK_CODE(type == kSmoraPeftType, ErrorCode::kIo, where, ": peft_type is ",
                      json_brief(config.value("peft_type", nlohmann::json(nullptr))),
                      ", expected \"", kSmoraPeftType, "\" (a SMoRA adapter)");
  out.r = config_positive_int(config, "r", where);
  out.activate_r = config_positive_int(config, "activate_r", where);
  out.rank_partition =
      config.contains("rank_partition") ? config_positive_int(config, "rank_partition", where) : 1;
  out.lora_alpha = config_number(config, "lora_alpha", 8.0, where);
  RANKWISE_CHECK_CODE(out.activate_r <= out.r, ErrorCode::kIo, where,
                      ": activate_r (k) = ", out.activate_r, " exceeds r = ", out.r);
  RANKWISE_CHECK_CODE(out.r % out.rank_partition == 0, ErrorCode::kIo, where,
                      ": rank_partition (g) = ", out.rank_partition,
                      " does not divide r = ", out.r);
  RANKWISE_CHECK_CODE(out.activate_r % out.rank_partition == 0, ErrorCode::kIo, where,
                      ": activate_r (k) = ", out.activate_r,
                      " is not a multiple of rank_partition (g) = ", out.rank_partition,
                      "; rankwise's router needs whole blocks");
  RANKWISE_CHECK_CODE(!config_bool(config, "use_dora", false, where), ErrorCode::kIo, where,
                      ": use_dora is true; SRMoLE has no DoRA");
  RANKWISE_CHECK_CODE(!config_bool(config, "use_rslora", false, where), ErrorCode::kIo, where,
                      ": use_rslora is true, but SRMoLE scales by lora_alpha / activate_r and "
                      "ignores it; refusing rather than guessing the intended scale");
  for (const char* key : {"rank_pattern", "alpha_pattern", "modules_to_save"}) {
    RANKWISE_CHECK_CODE(config_empty(config, key), ErrorCode::kIo, where, ": \"", key,
                        "\" is set, but SRMoLE gives every layer the same r and lora_alpha "
                        "and saves no other modules; refusing rather than dropping it");
  }
  out.fan_in_fan_out = config_bool(config, "fan_in_fan_out", false, where);
  out.base_model_name_or_path = config_string(config, "base_model_name_or_path", where);
  out.task_type = config_string(config, "task_type", where);
  config_targets(config, where, out.target_modules, out.target_modules_regex);
}

inline SmoraAdapter smora_adapter_from(const nlohmann::json& config, const SafetensorsFile& file,
                                       const std::string& config_where,
                                       const std::string& weights_where) {
  SmoraAdapter adapter;
  parse_smora_config(config, config_where, adapter);
  RANKWISE_CHECK_CODE(!file.tensors.empty(), ErrorCode::kIo, weights_where, ": holds no tensors");
  struct Parts {
    const SafetensorsTensor* t[4] = {nullptr, nullptr, nullptr, nullptr};
  };
  const char* suffixes[4] = {kSmoraASuffix, kSmoraBSuffix, kSmoraRouterSuffix, kSmoraBiasSuffix};
  const std::string prefix = kPeftKeyPrefix;
  std::map<std::string, Parts> parts;
  for (const auto& kv : file.tensors) {
    const std::string& key = kv.first;
    int which = -1;
    for (int i = 0; i < 4 && which < 0; ++i) {
      const std::string s = suffixes[i];
      if (ends_with(key, s) && key.size() > prefix.size() + s.size()) which = i;
    }
    RANKWISE_CHECK_CODE(key.compare(0, prefix.size(), prefix) == 0 && which >= 0, ErrorCode::kIo,
                        weights_where, ": tensor \"", name_brief(key),
                        "\" is not a SMoRA weight (expected ", prefix, "<module> + ", kSmoraASuffix,
                        ", ", kSmoraBSuffix, ", ", kSmoraRouterSuffix, " or ", kSmoraBiasSuffix,
                        ")");
    const std::size_t cut = std::char_traits<char>::length(suffixes[which]);
    parts[key.substr(prefix.size(), key.size() - prefix.size() - cut)].t[which] = &kv.second;
  }
  const std::int64_t r = adapter.r, experts = adapter.r / adapter.rank_partition;
  for (const auto& kv : parts) {
    const std::string& name = kv.first;
    const std::string at =
        ::rankwise::detail::concat(weights_where, ", module \"", name_brief(name), "\"");
    for (int i = 0; i < 4; ++i) {
      RANKWISE_CHECK_CODE(kv.second.t[i] != nullptr, ErrorCode::kIo, at, ": missing tensor ",
                          prefix, name_brief(name), suffixes[i]);
    }
    const std::string key = prefix + name;
    SmoraModule m;
    m.name = name;
    m.dtype = kv.second.t[0]->dtype;
    m.a = finite_values(*kv.second.t[0], weights_where, key + kSmoraASuffix);
    m.b = finite_values(*kv.second.t[1], weights_where, key + kSmoraBSuffix);
    m.router = finite_values(*kv.second.t[2], weights_where, key + kSmoraRouterSuffix);
    m.bias = finite_values(*kv.second.t[3], weights_where, key + kSmoraBiasSuffix);
    RANKWISE_CHECK_CODE(m.a.shape.size() == 2 && m.a.shape[1] > 0, ErrorCode::kIo, weights_where,
                        ", tensor \"", name_brief(key + kSmoraASuffix), "\": shape ",
                        shape_string(m.a.shape), ", expected (r = ", r, " x d_in)");
    RANKWISE_CHECK_CODE(m.b.shape.size() == 2 && m.b.shape[0] > 0, ErrorCode::kIo, weights_where,
                        ", tensor \"", name_brief(key + kSmoraBSuffix), "\": shape ",
                        shape_string(m.b.shape), ", expected (d_out x r = ", r, ")");
    const std::int64_t d_in = m.a.shape[1], d_out = m.b.shape[0];
    require_shape(m.a.shape, {r, d_in}, weights_where, key + kSmoraASuffix, "(r x d_in)");
    require_shape(m.b.shape, {d_out, r}, weights_where, key + kSmoraBSuffix, "(d_out x r)");
    require_shape(m.router.shape, {experts, d_in}, weights_where, key + kSmoraRouterSuffix,
                  "(r / rank_partition x d_in)");
    require_shape(m.bias.shape, {r}, weights_where, key + kSmoraBiasSuffix,
                  "(r: one balance bias per rank)");
    adapter.modules.push_back(std::move(m));
  }
  return adapter;
}

inline nlohmann::json smora_config_json(const SmoraAdapter& adapter) {
  using nlohmann::json;
  json c = json::object();
  c["activate_r"] = adapter.activate_r;
  c["alpha_pattern"] = json::object();
  c["auto_mapping"] = nullptr;
  c["base_model_name_or_path"] = adapter.base_model_name_or_path.empty()
                                     ? json(nullptr)
                                     : json(adapter.base_model_name_or_path);
  c["bias"] = "none";
  c["dense_compute"] = false;
  c["epsilon_greedy"] = false;
  c["fan_in_fan_out"] = adapter.fan_in_fan_out;
  c["inference_mode"] = true;
  c["init_lora_weights"] = true;
  c["layer_replication"] = nullptr;
  c["layers_pattern"] = nullptr;
  c["layers_to_transform"] = nullptr;
  c["loftq_config"] = json::object();
  c["lora_alpha"] = alpha_json(adapter.lora_alpha);
  c["lora_dropout"] = 0.0;
  c["megatron_config"] = nullptr;
  c["megatron_core"] = "megatron.core";
  c["modules_to_save"] = nullptr;
  c["peft_type"] = kSmoraPeftType;
  c["r"] = adapter.r;
  c["rank_partition"] = adapter.rank_partition;
  c["rank_pattern"] = json::object();
  c["revision"] = nullptr;
  std::vector<std::string> targets = adapter.target_modules;
  if (adapter.target_modules_regex.empty() && targets.empty()) {
    for (const auto& m : adapter.modules) {
      const auto dot = m.name.rfind('.');
      targets.push_back(dot == std::string::npos ? m.name : m.name.substr(dot + 1));
    }
    std::sort(targets.begin(), targets.end());
    targets.erase(std::unique(targets.begin(), targets.end()), targets.end());
  }
  c["target_modules"] =
      adapter.target_modules_regex.empty() ? json(targets) : json(adapter.target_modules_regex);
  c["task_type"] = adapter.task_type.empty() ? json(nullptr) : json(adapter.task_type);
  c["use_dora"] = false;
  c["use_rslora"] = false;
  return c;
}

// Everything the writer checks before touching the disk.
inline void check_smora_adapter(const SmoraAdapter& a) {
  RANKWISE_CHECK(!a.modules.empty(), "SMoRA writer: the adapter has no modules");
  RANKWISE_CHECK(a.r > 0 && a.activate_r > 0 && a.activate_r <= a.r && a.rank_partition > 0 &&
                     a.r % a.rank_partition == 0 && a.activate_r % a.rank_partition == 0,
                 "SMoRA writer: r = ", a.r, ", activate_r (k) = ", a.activate_r,
                 ", rank_partition (g) = ", a.rank_partition,
                 ": need 0 < k <= r and g dividing both r and k");
  RANKWISE_CHECK(std::isfinite(a.lora_alpha), "SMoRA writer: lora_alpha must be finite, got ",
                 a.lora_alpha);
  std::set<std::string> seen;
  const std::int64_t experts = a.r / a.rank_partition;
  for (const auto& m : a.modules) {
    const std::string at =
        ::rankwise::detail::concat("SMoRA writer: module \"", name_brief(m.name), "\"");
    RANKWISE_CHECK(!m.name.empty(), "SMoRA writer: a module has an empty name");
    RANKWISE_CHECK(seen.insert(m.name).second, at, ": appears twice");
    const std::int64_t d_in = m.d_in(), d_out = m.d_out();
    const auto check = [&](const HostTensor& t, const std::vector<std::int64_t>& shape,
                           const char* what) {
      RANKWISE_CHECK(d_in > 0 && d_out > 0 && t.shape == shape &&
                         static_cast<std::int64_t>(t.values.size()) == t.numel(),
                     at, ": ", what, " has shape ", shape_string(t.shape), " and ", t.values.size(),
                     " values, expected ", shape_string(shape));
      RANKWISE_CHECK(count_non_finite(t) == 0, at, ": ", what, " holds ", count_non_finite(t),
                     " non-finite values");
    };
    check(m.a, {a.r, d_in}, "lora_A (r x d_in)");
    check(m.b, {d_out, a.r}, "lora_B (d_out x r)");
    check(m.router, {experts, d_in}, "lora_router (r/g x d_in)");
    check(m.bias, {a.r}, "lora_biases (r)");
  }
}

}  // namespace detail

/// Reads the SMoRA adapter directory `dir` (adapter_config.json with
/// peft_type "SRMOLE", r, activate_r, rank_partition, lora_alpha;
/// adapter_model.safetensors with base_model.model.<module>.lora_A.weight
/// (r x d_in), .lora_B.weight (d_out x r), .lora_router.weight (r/g x d_in)
/// and .lora_biases (r)). Throws rankwise::error(kIo) naming the file, module
/// or tensor and the rule broken: another peft_type, a missing or misshapen
/// tensor, a tensor of another kind, non-float or non-finite values, k not a
/// multiple of g, or a LoRA option SRMoLE ignores (rank/alpha patterns,
/// rsLoRA, DoRA, modules_to_save) set.
inline SmoraAdapter read_smora_adapter(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path config_path = fs::path(dir) / kPeftConfigFile;
  const fs::path weights_path = fs::path(dir) / kPeftWeightsFile;
  const std::string config_where =
      ::rankwise::detail::concat("SMoRA config \"", config_path.string(), "\"");
  const std::string weights_where =
      ::rankwise::detail::concat("SMoRA weights \"", weights_path.string(), "\"");
  const nlohmann::json config = detail::read_adapter_config(config_path, config_where);
  return detail::smora_adapter_from(config, read_safetensors(weights_path.string()), config_where,
                                    weights_where);
}

/// Writes `adapter` as a SMoRA directory in the reference layout, every tensor
/// stored as `dtype` (F32, F16, BF16 or F64). Files go into a temporary
/// directory moved into place when complete; an existing non-empty `dir` is
/// refused unless `overwrite`. Throws rankwise::error: kInvalidArgument for an
/// inconsistent adapter (shapes, k and g, non-finite values, a value
/// overflowing `dtype`), kIo for file-system failures.
inline void write_smora_adapter(const SmoraAdapter& adapter, const std::string& dir, DType dtype,
                                bool overwrite = false) {
  RANKWISE_CHECK(dtype_has_values(dtype), "SMoRA writer: cannot store weights as ",
                 dtype_name(dtype), " (supported: F32, F16, BF16, F64)");
  detail::check_smora_adapter(adapter);
  const std::string config_text =
      detail::dump_config(detail::smora_config_json(adapter), "SMoRA writer");
  SafetensorsFile weights;
  weights.metadata = std::map<std::string, std::string>{{"format", "pt"}};
  for (const auto& m : adapter.modules) {
    const std::string key = std::string(detail::kPeftKeyPrefix) + m.name;
    const std::pair<const char*, const HostTensor*> parts[4] = {
        {detail::kSmoraASuffix, &m.a},
        {detail::kSmoraBSuffix, &m.b},
        {detail::kSmoraRouterSuffix, &m.router},
        {detail::kSmoraBiasSuffix, &m.bias}};
    for (const auto& p : parts) {
      weights.tensors.emplace(key + p.first, from_host_tensor(*p.second, dtype, key + p.first));
    }
  }
  detail::write_staged_directory(
      dir,
      {{kPeftWeightsFile, [&](const std::string& path) { write_safetensors(weights, path); }},
       {kPeftConfigFile,
        [&](const std::string& path) {
          detail::write_text_atomically(path, config_text, "SMoRA config");
        }}},
      overwrite, "SMoRA writer");
}

/// As above, storing every tensor in the dtype each module's lora_A was read in.
inline void write_smora_adapter(const SmoraAdapter& adapter, const std::string& dir,
                                bool overwrite = false) {
  DType dtype = adapter.modules.empty() ? DType::kF32 : adapter.modules.front().dtype;
  for (const auto& m : adapter.modules) {
    RANKWISE_CHECK(m.dtype == dtype, "SMoRA writer: modules were read in different dtypes (",
                   dtype_name(dtype), " and ", dtype_name(m.dtype), "); pass one dtype");
  }
  write_smora_adapter(adapter, dir, dtype, overwrite);
}

/// The module `name` of a Smora layer, for an adapter the reference code
/// loads. The layer must use one balance bias per rank (router.bias_per_rank,
/// or g = 1 where both layouts coincide).
template <class T, class Backend>
SmoraModule smora_module_from(const std::string& name, Smora<T, Backend>& layer,
                              DType dtype = DType::kF32) {
  RANKWISE_CHECK(layer.choices() == layer.rank(), "smora_module_from: module \"", name,
                 "\" has one balance bias per expert (", layer.choices(),
                 " of them for r = ", layer.rank(),
                 "); the reference layout holds one per rank: set router.bias_per_rank");
  TensorMap state = layer.state();
  SmoraModule m;
  m.name = name;
  m.dtype = dtype;
  m.a = std::move(state["lora_A"]);
  m.b = std::move(state["lora_B"]);
  m.router = std::move(state["router"]);
  m.bias = std::move(state["bias"]);
  return m;
}

/// Loads `module` into `layer`, which must have the shape adapter.layer_config(module) gives.
template <class T, class Backend>
void load_smora_module(Smora<T, Backend>& layer, const SmoraModule& module) {
  TensorMap state;
  state["lora_A"] = module.a;
  state["lora_B"] = module.b;
  state["router"] = module.router;
  state["bias"] = module.bias;
  layer.load_state(state);
}

}  // namespace io
}  // namespace rankwise
