// PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors): read, validate,
// write.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "rankwise/core/error.hpp"
#include "rankwise/core/lora_config.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/io/safetensors.hpp"

namespace rankwise {
namespace io {

/// File names inside a PEFT adapter directory.
inline constexpr const char* kPeftConfigFile = "adapter_config.json";
inline constexpr const char* kPeftWeightsFile = "adapter_model.safetensors";

/// One LoRA-adapted layer: y += scale * B A x.
struct LoraModule {
  std::string name;  ///< module path in the base model, e.g. "transformer.h.0.attn.c_attn"
  HostTensor a;      ///< lora_A: (rank x d_in)
  HostTensor b;      ///< lora_B: (d_out x rank)
  std::int64_t rank = 0;
  double alpha = 0;
  double scale = 0;             ///< alpha / rank, or alpha / sqrt(rank) with rsLoRA
  DType a_dtype = DType::kF32;  ///< dtype lora_A was stored in (kept for a rewrite)
  DType b_dtype = DType::kF32;  ///< dtype lora_B was stored in

  /// Input width: lora_A's columns (0 when lora_A is not a matrix).
  std::int64_t d_in() const { return a.shape.size() == 2 ? a.shape[1] : 0; }
  /// Output width: lora_B's rows (0 when lora_B is not a matrix).
  std::int64_t d_out() const { return b.shape.size() == 2 ? b.shape[0] : 0; }
};

/// A PEFT LoRA adapter: the config fields rankwise uses and every module.
struct PeftAdapter {
  std::string base_model_name_or_path;  ///< empty: null in the config
  std::string task_type;                ///< e.g. "CAUSAL_LM"; empty: null
  std::int64_t r = 8;                   ///< default rank
  double lora_alpha = 8;                ///< default alpha
  bool use_rslora = false;              ///< scale alpha / sqrt(r) instead of alpha / r
  bool fan_in_fan_out = false;          ///< base weights stored (d_in x d_out), as GPT-2's Conv1D
  /// target_modules as a list of names (PEFT matches a module whose path is
  /// the name or ends with "." + name) ...
  std::vector<std::string> target_modules;
  /// ... or as one regular expression (PEFT full-matches the module path);
  /// used instead of the list when non-empty.
  std::string target_modules_regex;
  /// Per-module overrides as in the config, in file order (PEFT takes the
  /// first key that matches). Already applied to `modules` on reading; the
  /// writer derives them afresh from `modules`.
  std::vector<std::pair<std::string, std::int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::vector<LoraModule> modules;  ///< sorted by name

  /// alpha / sqrt(r) with use_rslora, else alpha / r.
  ScaleRule scale_rule() const {
    return use_rslora ? ScaleRule::kAlphaOverSqrtRank : ScaleRule::kAlphaOverRank;
  }
  /// How the base model stores the weights these modules adapt.
  WeightLayout base_layout() const {
    return fan_in_fan_out ? WeightLayout::kInOut : WeightLayout::kOutIn;
  }

  /// The module named `name`, or nullptr.
  const LoraModule* find_module(const std::string& name) const {
    for (const auto& m : modules) {
      if (m.name == name) return &m;
    }
    return nullptr;
  }

  /// The LoraConfig of `module` (d_in, d_out, rank, alpha, scale rule).
  LoraConfig module_config(const LoraModule& module) const {
    LoraConfig config;
    config.d_in = module.d_in();
    config.d_out = module.d_out();
    config.rank = module.rank;
    config.alpha = module.alpha;
    config.scale_rule = scale_rule();
    return config;
  }
};

/// The scale PEFT applies for `alpha` and `rank` under `rule`.
inline double lora_scale(double alpha, std::int64_t rank, ScaleRule rule) {
  return rule == ScaleRule::kAlphaOverRank ? alpha / static_cast<double>(rank)
                                           : alpha / std::sqrt(static_cast<double>(rank));
}

namespace detail {

// PEFT names every LoRA weight <prefix><module>.lora_A.weight / .lora_B.weight.
inline constexpr const char* kPeftKeyPrefix = "base_model.model.";
inline constexpr const char* kPeftASuffix = ".lora_A.weight";
inline constexpr const char* kPeftBSuffix = ".lora_B.weight";

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// PEFT's get_pattern_key rule: pattern key k applies to module path m when
// re.match(rf"(.*\.)?({k})$", m) does, i.e. when "(.*\.)?(k)" matches all of
// m. The key is a regular expression; a plain name matches the module of
// that name and every module whose path ends with "." + name.
class PatternMatcher {
 public:
  PatternMatcher(const std::string& key, const std::string& where) : key_(key) {
    try {
      re_ = std::regex("(.*\\.)?(" + key + ")", std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      RANKWISE_CHECK_CODE(false, ErrorCode::kIo, where, ": pattern key \"", key,
                          "\" is not a regular expression rankwise can evaluate (", e.what(), ")");
    }
  }
  bool matches(const std::string& module) const { return std::regex_match(module, re_); }
  const std::string& key() const { return key_; }

 private:
  std::string key_;
  std::regex re_;
};

inline std::string read_text_file(const std::filesystem::path& path, std::uintmax_t limit) {
  std::error_code ec;
  const bool regular = std::filesystem::is_regular_file(path, ec);
  RANKWISE_CHECK_CODE(regular && !ec, ErrorCode::kIo, "\"", path.string(),
                      "\": missing or not a regular file");
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, "\"", path.string(), "\": cannot get its size (",
                      ec.message(), ")");
  RANKWISE_CHECK_CODE(size <= limit, ErrorCode::kIo, "\"", path.string(), "\": ", size,
                      " bytes, larger than the ", limit, "-byte limit for a config file");
  std::ifstream in(path, std::ios::binary);
  RANKWISE_CHECK_CODE(in.is_open(), ErrorCode::kIo, "\"", path.string(), "\": cannot open it");
  std::string text(static_cast<std::size_t>(size), '\0');
  if (size > 0) in.read(&text[0], static_cast<std::streamsize>(size));
  RANKWISE_CHECK_CODE(static_cast<std::uintmax_t>(in.gcount()) == size, ErrorCode::kIo, "\"",
                      path.string(), "\": short read");
  return text;
}

// Reads the optional boolean `key`: absent or null gives `fallback`.
inline bool config_bool(const nlohmann::ordered_json& config, const char* key, bool fallback,
                        const std::string& where) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  RANKWISE_CHECK_CODE(it->is_boolean(), ErrorCode::kIo, where, ": \"", key,
                      "\" must be true or false, got ", it->dump());
  return it->get<bool>();
}

// Reads the optional string `key`: absent or null gives "".
inline std::string config_string(const nlohmann::ordered_json& config, const char* key,
                                 const std::string& where) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return {};
  RANKWISE_CHECK_CODE(it->is_string(), ErrorCode::kIo, where, ": \"", key,
                      "\" must be a string or null, got ", it->dump());
  return it->get<std::string>();
}

inline bool json_positive_int(const nlohmann::ordered_json& v, std::int64_t& out) {
  if (v.is_number_unsigned()) {
    if (v.get<std::uint64_t>() == 0 ||
        v.get<std::uint64_t>() >
            static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      return false;
    }
    out = static_cast<std::int64_t>(v.get<std::uint64_t>());
    return true;
  }
  if (v.is_number_float()) {  // Python writes an int, but 8.0 means 8
    const double d = v.get<double>();
    if (!(d >= 1 && d <= 9007199254740992.0) || std::floor(d) != d) return false;
    out = static_cast<std::int64_t>(d);
    return true;
  }
  return false;
}

inline bool json_finite_number(const nlohmann::ordered_json& v, double& out) {
  if (!v.is_number()) return false;
  out = v.get<double>();
  return std::isfinite(out);
}

// The config fields rankwise uses; unknown keys are ignored, as PEFT does.
inline void parse_peft_config(const std::string& text, const std::string& where, PeftAdapter& out) {
  nlohmann::ordered_json config;
  try {
    config = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    RANKWISE_CHECK_CODE(false, ErrorCode::kIo, where, ": not valid JSON (", e.what(), ")");
  }
  RANKWISE_CHECK_CODE(config.is_object(), ErrorCode::kIo, where, ": not a JSON object");

  const auto type_it = config.find("peft_type");
  RANKWISE_CHECK_CODE(type_it != config.end(), ErrorCode::kIo, where, ": missing \"peft_type\"");
  RANKWISE_CHECK_CODE(type_it->is_string() && type_it->get<std::string>() == "LORA", ErrorCode::kIo,
                      where, ": peft_type is ", type_it->dump(),
                      ", but only \"LORA\" adapters are supported");
  RANKWISE_CHECK_CODE(!config_bool(config, "use_dora", false, where), ErrorCode::kIo, where,
                      ": use_dora is true; DoRA adapters are not supported");

  const auto r_it = config.find("r");
  RANKWISE_CHECK_CODE(r_it != config.end(), ErrorCode::kIo, where, ": missing \"r\"");
  RANKWISE_CHECK_CODE(json_positive_int(*r_it, out.r), ErrorCode::kIo, where,
                      ": \"r\" must be a positive integer, got ", r_it->dump());

  out.lora_alpha = 8;  // PEFT's LoraConfig default
  const auto alpha_it = config.find("lora_alpha");
  if (alpha_it != config.end() && !alpha_it->is_null()) {
    RANKWISE_CHECK_CODE(json_finite_number(*alpha_it, out.lora_alpha), ErrorCode::kIo, where,
                        ": \"lora_alpha\" must be a finite number, got ", alpha_it->dump());
  }
  out.use_rslora = config_bool(config, "use_rslora", false, where);
  out.fan_in_fan_out = config_bool(config, "fan_in_fan_out", false, where);
  out.base_model_name_or_path = config_string(config, "base_model_name_or_path", where);
  out.task_type = config_string(config, "task_type", where);

  out.target_modules.clear();
  out.target_modules_regex.clear();
  const auto target_it = config.find("target_modules");
  if (target_it != config.end() && !target_it->is_null()) {
    if (target_it->is_string()) {
      out.target_modules_regex = target_it->get<std::string>();
    } else {
      RANKWISE_CHECK_CODE(target_it->is_array(), ErrorCode::kIo, where,
                          ": \"target_modules\" must be a list of names, a string or null, got ",
                          target_it->dump());
      for (const auto& t : *target_it) {
        RANKWISE_CHECK_CODE(t.is_string(), ErrorCode::kIo, where,
                            ": \"target_modules\" holds a non-string ", t.dump());
        out.target_modules.push_back(t.get<std::string>());
      }
    }
  }

  out.rank_pattern.clear();
  out.alpha_pattern.clear();
  const auto rank_it = config.find("rank_pattern");
  if (rank_it != config.end() && !rank_it->is_null()) {
    RANKWISE_CHECK_CODE(rank_it->is_object(), ErrorCode::kIo, where,
                        ": \"rank_pattern\" must be an object, got ", rank_it->dump());
    for (const auto& kv : rank_it->items()) {
      std::int64_t rank = 0;
      RANKWISE_CHECK_CODE(json_positive_int(kv.value(), rank), ErrorCode::kIo, where,
                          ": rank_pattern[\"", kv.key(), "\"] must be a positive integer, got ",
                          kv.value().dump());
      out.rank_pattern.emplace_back(kv.key(), rank);
    }
  }
  const auto alpha_pattern_it = config.find("alpha_pattern");
  if (alpha_pattern_it != config.end() && !alpha_pattern_it->is_null()) {
    RANKWISE_CHECK_CODE(alpha_pattern_it->is_object(), ErrorCode::kIo, where,
                        ": \"alpha_pattern\" must be an object, got ", alpha_pattern_it->dump());
    for (const auto& kv : alpha_pattern_it->items()) {
      double alpha = 0;
      RANKWISE_CHECK_CODE(json_finite_number(kv.value(), alpha), ErrorCode::kIo, where,
                          ": alpha_pattern[\"", kv.key(), "\"] must be a finite number, got ",
                          kv.value().dump());
      out.alpha_pattern.emplace_back(kv.key(), alpha);
    }
  }
}

// The first pattern (in order) matching `module`, else nullopt.
template <class Value>
std::optional<Value> resolve_pattern(const std::vector<std::pair<PatternMatcher, Value>>& patterns,
                                     const std::string& module) {
  for (const auto& p : patterns) {
    if (p.first.matches(module)) return p.second;
  }
  return std::nullopt;
}

template <class Value>
std::vector<std::pair<PatternMatcher, Value>> compile_patterns(
    const std::vector<std::pair<std::string, Value>>& patterns, const std::string& where) {
  std::vector<std::pair<PatternMatcher, Value>> out;
  out.reserve(patterns.size());
  for (const auto& p : patterns) out.emplace_back(PatternMatcher(p.first, where), p.second);
  return out;
}

}  // namespace detail

/// Reads the PEFT LoRA adapter in directory `dir`. Each module's rank and
/// alpha follow rank_pattern / alpha_pattern (PEFT's first-match rule) over r
/// and lora_alpha, and its tensors are checked against them: lora_A must be
/// (rank x d_in) and lora_B (d_out x rank). Throws rankwise::error(kIo)
/// naming the file, module or tensor and the rule broken: peft_type other
/// than "LORA", DoRA, missing r, a tensor that is not a LoRA weight, a module
/// with only one of A and B, a rank mismatch, a malformed safetensors file.
inline PeftAdapter read_peft_adapter(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path config_path = fs::path(dir) / kPeftConfigFile;
  const fs::path weights_path = fs::path(dir) / kPeftWeightsFile;
  const std::string config_where =
      ::rankwise::detail::concat("PEFT config \"", config_path.string(), "\"");
  const std::string weights_where =
      ::rankwise::detail::concat("PEFT weights \"", weights_path.string(), "\"");

  PeftAdapter adapter;
  detail::parse_peft_config(detail::read_text_file(config_path, std::uintmax_t{16} << 20),
                            config_where, adapter);
  const auto rank_patterns = detail::compile_patterns(adapter.rank_pattern, config_where);
  const auto alpha_patterns = detail::compile_patterns(adapter.alpha_pattern, config_where);

  SafetensorsFile file = read_safetensors(weights_path.string());
  RANKWISE_CHECK_CODE(!file.tensors.empty(), ErrorCode::kIo, weights_where, ": holds no tensors");

  struct Pair {
    const SafetensorsTensor* a = nullptr;
    const SafetensorsTensor* b = nullptr;
  };
  std::map<std::string, Pair> pairs;  // sorted by module name
  const std::string prefix = detail::kPeftKeyPrefix;
  for (const auto& kv : file.tensors) {
    const std::string& key = kv.first;
    const bool is_a = detail::ends_with(key, detail::kPeftASuffix);
    const bool is_b = detail::ends_with(key, detail::kPeftBSuffix);
    const std::size_t suffix = std::char_traits<char>::length(detail::kPeftASuffix);
    RANKWISE_CHECK_CODE(key.compare(0, prefix.size(), prefix) == 0 && (is_a || is_b) &&
                            key.size() > prefix.size() + suffix,
                        ErrorCode::kIo, weights_where, ": tensor \"", key,
                        "\" is not a LoRA weight (expected ", prefix, "<module>",
                        detail::kPeftASuffix, " or ", detail::kPeftBSuffix,
                        "; DoRA, bias, embedding and modules_to_save tensors are not supported)");
    const std::string module = key.substr(prefix.size(), key.size() - prefix.size() - suffix);
    (is_a ? pairs[module].a : pairs[module].b) = &kv.second;
  }

  for (const auto& kv : pairs) {
    const std::string& name = kv.first;
    const std::string at = ::rankwise::detail::concat(weights_where, ", module \"", name, "\"");
    RANKWISE_CHECK_CODE(kv.second.a != nullptr, ErrorCode::kIo, at, ": has lora_B but no lora_A");
    RANKWISE_CHECK_CODE(kv.second.b != nullptr, ErrorCode::kIo, at, ": has lora_A but no lora_B");

    LoraModule m;
    m.name = name;
    m.a_dtype = kv.second.a->dtype;
    m.b_dtype = kv.second.b->dtype;
    RANKWISE_CHECK_CODE(dtype_has_values(m.a_dtype) && dtype_has_values(m.b_dtype), ErrorCode::kIo,
                        at, ": lora_A is ", dtype_name(m.a_dtype), " and lora_B is ",
                        dtype_name(m.b_dtype), "; only F32, F16, BF16 and F64 are supported");
    m.a = to_host_tensor(*kv.second.a, prefix + name + detail::kPeftASuffix);
    m.b = to_host_tensor(*kv.second.b, prefix + name + detail::kPeftBSuffix);
    m.rank = detail::resolve_pattern(rank_patterns, name).value_or(adapter.r);
    m.alpha = detail::resolve_pattern(alpha_patterns, name).value_or(adapter.lora_alpha);
    m.scale = lora_scale(m.alpha, m.rank, adapter.scale_rule());

    RANKWISE_CHECK_CODE(m.a.shape.size() == 2 && m.b.shape.size() == 2, ErrorCode::kIo, at,
                        ": lora_A ", detail::shape_string(m.a.shape), " and lora_B ",
                        detail::shape_string(m.b.shape), " must both be matrices");
    RANKWISE_CHECK_CODE(m.a.shape[0] == m.rank && m.b.shape[1] == m.rank, ErrorCode::kIo, at,
                        ": rank mismatch: the config gives rank ", m.rank, ", lora_A is ",
                        detail::shape_string(m.a.shape), " (rank x d_in) and lora_B is ",
                        detail::shape_string(m.b.shape), " (d_out x rank)");
    RANKWISE_CHECK_CODE(m.d_in() > 0 && m.d_out() > 0, ErrorCode::kIo, at, ": empty lora_A ",
                        detail::shape_string(m.a.shape), " or lora_B ",
                        detail::shape_string(m.b.shape));
    adapter.modules.push_back(std::move(m));
  }
  return adapter;
}

namespace detail {

// The most frequent value, ties going to `preferred` if it is among them,
// else to the smallest: the config's default, so that rank_pattern and
// alpha_pattern list only the exceptions.
template <class Value>
Value most_common(const std::vector<Value>& values, Value preferred) {
  std::map<Value, std::size_t> counts;
  for (const auto& v : values) ++counts[v];
  Value best = preferred;
  std::size_t best_count = counts.count(preferred) ? counts[preferred] : 0;
  for (const auto& kv : counts) {
    if (kv.second > best_count) {
      best = kv.first;
      best_count = kv.second;
    }
  }
  return best;
}

// Escapes every regular-expression metacharacter, for a pattern key that
// must match one module path literally.
inline std::string regex_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::string(".^$|()[]{}*+?\\").find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

// The per-module overrides of a default, keyed by module path: plainly
// (readable, and what PEFT users write) unless some key would also match
// another module under PEFT's rule, then escaped. PEFT reads the keys in
// file order, which is sorted, so verification follows that order.
template <class Value>
std::vector<std::pair<std::string, Value>> module_patterns(const std::vector<LoraModule>& modules,
                                                           Value (*get)(const LoraModule&),
                                                           Value fallback, const char* what) {
  for (int escaped = 0; escaped < 2; ++escaped) {
    std::map<std::string, Value> sorted;
    for (const auto& m : modules) {
      if (get(m) != fallback) sorted[escaped ? regex_escape(m.name) : m.name] = get(m);
    }
    std::vector<std::pair<std::string, Value>> patterns(sorted.begin(), sorted.end());
    std::vector<std::pair<PatternMatcher, Value>> compiled;
    try {
      compiled = compile_patterns(patterns, what);
    } catch (const error&) {
      if (escaped) throw;
      continue;  // a name that is not a valid regular expression: escape it
    }
    bool exact = true;
    for (const auto& m : modules) {
      exact = exact && resolve_pattern(compiled, m.name).value_or(fallback) == get(m);
    }
    if (exact) return patterns;
  }
  RANKWISE_CHECK(false, "PEFT writer: no ", what, " resolves every module to its own value");
  return {};
}

inline std::int64_t module_rank(const LoraModule& m) { return m.rank; }
inline double module_alpha(const LoraModule& m) { return m.alpha; }

// An alpha that is a whole number is written as a JSON integer, as PEFT does.
inline nlohmann::json alpha_json(double alpha) {
  if (std::floor(alpha) == alpha && std::fabs(alpha) < 9007199254740992.0) {
    return static_cast<std::int64_t>(alpha);
  }
  return alpha;
}

// adapter_config.json for `adapter`, with keys sorted and two-space indents as
// PEFT writes it, and every key recent PEFT versions write, so that
// LoraConfig.from_pretrained loads it without complaint.
inline std::string peft_config_text(const PeftAdapter& adapter, std::int64_t r, double alpha,
                                    const std::vector<std::pair<std::string, std::int64_t>>& ranks,
                                    const std::vector<std::pair<std::string, double>>& alphas,
                                    const std::vector<std::string>& targets) {
  using nlohmann::json;
  json config = json::object();
  json rank_pattern = json::object();
  for (const auto& p : ranks) rank_pattern[p.first] = p.second;
  json alpha_pattern = json::object();
  for (const auto& p : alphas) alpha_pattern[p.first] = alpha_json(p.second);

  config["alpha_pattern"] = alpha_pattern;
  config["auto_mapping"] = nullptr;
  config["base_model_name_or_path"] = adapter.base_model_name_or_path.empty()
                                          ? json(nullptr)
                                          : json(adapter.base_model_name_or_path);
  config["bias"] = "none";
  config["corda_config"] = nullptr;
  config["eva_config"] = nullptr;
  config["exclude_modules"] = nullptr;
  config["fan_in_fan_out"] = adapter.fan_in_fan_out;
  config["inference_mode"] = true;
  config["init_lora_weights"] = true;
  config["layer_replication"] = nullptr;
  config["layers_pattern"] = nullptr;
  config["layers_to_transform"] = nullptr;
  config["loftq_config"] = json::object();
  config["lora_alpha"] = alpha_json(alpha);
  config["lora_bias"] = false;
  config["lora_dropout"] = 0.0;
  config["megatron_config"] = nullptr;
  config["megatron_core"] = "megatron.core";
  config["modules_to_save"] = nullptr;
  config["peft_type"] = "LORA";
  config["qalora_group_size"] = 16;
  config["r"] = r;
  config["rank_pattern"] = rank_pattern;
  config["revision"] = nullptr;
  config["target_modules"] =
      adapter.target_modules_regex.empty() ? json(targets) : json(adapter.target_modules_regex);
  config["target_parameters"] = nullptr;
  config["task_type"] = adapter.task_type.empty() ? json(nullptr) : json(adapter.task_type);
  config["trainable_token_indices"] = nullptr;
  config["use_dora"] = false;
  config["use_qalora"] = false;
  config["use_rslora"] = adapter.use_rslora;
  try {
    // ensure_ascii, as Python's json.dumps.
    return config.dump(2, ' ', true, json::error_handler_t::strict);
  } catch (const json::exception&) {
    RANKWISE_CHECK(false,
                   "PEFT writer: base_model_name_or_path, task_type, target_modules or a "
                   "module name is not valid UTF-8");
  }
  return {};
}

inline void check_module(const LoraModule& m, ScaleRule rule) {
  const std::string at = ::rankwise::detail::concat("PEFT writer: module \"", m.name, "\"");
  RANKWISE_CHECK(!m.name.empty(), "PEFT writer: a module has an empty name");
  RANKWISE_CHECK(m.rank > 0, at, ": rank must be positive, got ", m.rank);
  RANKWISE_CHECK(m.a.shape.size() == 2 && m.a.shape[0] == m.rank && m.a.shape[1] > 0, at,
                 ": lora_A has shape ", shape_string(m.a.shape), ", expected (", m.rank,
                 " x d_in)");
  RANKWISE_CHECK(m.b.shape.size() == 2 && m.b.shape[1] == m.rank && m.b.shape[0] > 0, at,
                 ": lora_B has shape ", shape_string(m.b.shape), ", expected (d_out x ", m.rank,
                 ")");
  const auto a_numel = checked_numel(m.a.shape);
  const auto b_numel = checked_numel(m.b.shape);
  RANKWISE_CHECK(a_numel && b_numel && static_cast<std::int64_t>(m.a.values.size()) == *a_numel &&
                     static_cast<std::int64_t>(m.b.values.size()) == *b_numel,
                 at, ": lora_A holds ", m.a.values.size(), " values and lora_B ", m.b.values.size(),
                 " for shapes ", shape_string(m.a.shape), " and ", shape_string(m.b.shape));
  RANKWISE_CHECK(std::isfinite(m.alpha), at, ": alpha must be finite, got ", m.alpha);
  // PEFT recomputes the scale from alpha and rank: a scale that does not
  // follow from them would be lost silently.
  const double expected = lora_scale(m.alpha, m.rank, rule);
  RANKWISE_CHECK(std::fabs(m.scale - expected) <= 1e-12 * std::max(1.0, std::fabs(expected)), at,
                 ": scale ", m.scale, " does not follow from alpha ", m.alpha, " and rank ", m.rank,
                 " (expected ", expected, "); set alpha so that the scale comes out");
}

// The whole-directory write, with `dtype_of(module, is_b)` choosing each tensor's dtype.
template <class DTypeOf>
void write_peft_adapter_impl(const PeftAdapter& adapter, const std::string& dir, DTypeOf dtype_of,
                             bool overwrite) {
  namespace fs = std::filesystem;

  // Everything that can be checked before touching the disk is checked first.
  RANKWISE_CHECK(!adapter.modules.empty(), "PEFT writer: the adapter has no modules");
  std::vector<std::int64_t> ranks;
  std::vector<double> alphas;
  for (std::size_t i = 0; i < adapter.modules.size(); ++i) {
    const LoraModule& m = adapter.modules[i];
    check_module(m, adapter.scale_rule());
    for (std::size_t j = 0; j < i; ++j) {
      RANKWISE_CHECK(adapter.modules[j].name != m.name, "PEFT writer: module \"", m.name,
                     "\" appears twice");
    }
    ranks.push_back(m.rank);
    alphas.push_back(m.alpha);
  }
  const std::int64_t r = most_common(ranks, adapter.r);
  const double alpha = most_common(alphas, adapter.lora_alpha);
  const auto rank_pattern = module_patterns(adapter.modules, &module_rank, r, "rank_pattern");
  const auto alpha_pattern =
      module_patterns(adapter.modules, &module_alpha, alpha, "alpha_pattern");

  std::vector<std::string> targets = adapter.target_modules;
  if (adapter.target_modules_regex.empty() && targets.empty()) {
    // The last path component of every module, as PEFT users usually write them.
    for (const auto& m : adapter.modules) {
      const auto dot = m.name.rfind('.');
      targets.push_back(dot == std::string::npos ? m.name : m.name.substr(dot + 1));
    }
    std::sort(targets.begin(), targets.end());
    targets.erase(std::unique(targets.begin(), targets.end()), targets.end());
  }
  // A module PEFT would not target would be dropped on loading: refuse.
  std::optional<std::regex> target_regex;
  if (!adapter.target_modules_regex.empty()) {
    try {
      target_regex = std::regex(adapter.target_modules_regex, std::regex::ECMAScript);
    } catch (const std::regex_error&) {
      // Python-only syntax: PEFT can evaluate it, rankwise cannot; not checked.
    }
  }
  for (const auto& m : adapter.modules) {
    bool targeted = false;
    if (!adapter.target_modules_regex.empty()) {
      targeted = !target_regex || std::regex_match(m.name, *target_regex);
    } else {
      for (const auto& t : targets)
        targeted = targeted || m.name == t || ends_with(m.name, "." + t);
    }
    RANKWISE_CHECK(targeted, "PEFT writer: module \"", m.name,
                   "\" is not matched by target_modules, so PEFT would not load it");
  }
  const std::string config_text =
      peft_config_text(adapter, r, alpha, rank_pattern, alpha_pattern, targets);

  // Where the output goes.
  fs::path target(dir);
  if (!target.has_filename()) target = target.parent_path();  // "out/" names "out"
  RANKWISE_CHECK_CODE(!target.empty() && target.has_filename(), ErrorCode::kIo, "PEFT writer: \"",
                      dir, "\" does not name a directory to write");
  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::error_code ec;
  const bool exists = fs::exists(target, ec);
  RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, "PEFT writer: cannot inspect \"", target.string(),
                      "\" (", ec.message(), ")");
  if (exists) {
    RANKWISE_CHECK_CODE(fs::is_directory(target, ec), ErrorCode::kIo, "PEFT writer: \"",
                        target.string(), "\" exists and is not a directory");
    const bool empty = fs::is_empty(target, ec);
    RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, "PEFT writer: cannot list \"", target.string(), "\" (",
                        ec.message(), ")");
    RANKWISE_CHECK_CODE(empty || overwrite, ErrorCode::kIo, "PEFT writer: refusing to overwrite \"",
                        target.string(), "\", an existing non-empty directory (pass overwrite)");
  }

  // Both files go into a temporary sibling directory first, so a failure at
  // any point leaves the target as it was.
  const fs::path staging = temporary_sibling(target, "tmp");
  fs::create_directory(staging, ec);
  RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, "PEFT writer: cannot create the temporary directory \"",
                      staging.string(), "\" next to \"", target.string(), "\" (", ec.message(),
                      ")");
  const char* names[2] = {kPeftWeightsFile, kPeftConfigFile};
  bool moved[2] = {false, false};   // new file now in target
  bool backed[2] = {false, false};  // old file kept in staging as <name>.old
  try {
    write_file_atomically(
        staging / kPeftConfigFile, [&](std::ostream& out) { out << config_text; }, "PEFT config");
    SafetensorsFile weights;
    weights.metadata = std::map<std::string, std::string>{{"format", "pt"}};
    for (const auto& m : adapter.modules) {
      const std::string key = std::string(kPeftKeyPrefix) + m.name;
      weights.tensors.emplace(key + kPeftASuffix,
                              from_host_tensor(m.a, dtype_of(m, false), key + kPeftASuffix));
      weights.tensors.emplace(key + kPeftBSuffix,
                              from_host_tensor(m.b, dtype_of(m, true), key + kPeftBSuffix));
    }
    write_safetensors(weights, (staging / kPeftWeightsFile).string());

    if (!exists) {
      fs::rename(staging, target, ec);
      RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, "PEFT writer: cannot rename \"", staging.string(),
                          "\" to \"", target.string(), "\" (", ec.message(), ")");
      return;
    }
    // An existing directory keeps its other files (README.md, tokenizer...):
    // the two adapter files are swapped in, the old ones kept until both are.
    for (int i = 0; i < 2; ++i) {
      const fs::path old_file = target / names[i];
      if (fs::exists(old_file, ec)) {
        fs::rename(old_file, staging / (std::string(names[i]) + ".old"), ec);
        RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, "PEFT writer: cannot move \"", old_file.string(),
                            "\" aside (", ec.message(), ")");
        backed[i] = true;
      }
      fs::rename(staging / names[i], old_file, ec);
      RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, "PEFT writer: cannot move the new \"", names[i],
                          "\" into \"", target.string(), "\" (", ec.message(), ")");
      moved[i] = true;
    }
  } catch (...) {
    std::error_code ignored;
    for (int i = 0; i < 2; ++i) {
      const fs::path file = target / names[i];
      if (backed[i]) {
        fs::rename(staging / (std::string(names[i]) + ".old"), file, ignored);
      } else if (moved[i]) {
        fs::remove(file, ignored);
      }
    }
    fs::remove_all(staging, ignored);
    throw;
  }
  fs::remove_all(staging, ec);
}

}  // namespace detail

/// Writes `adapter` as a PEFT LoRA adapter directory `dir` with every tensor
/// stored as `dtype` (F32, F16, BF16 or F64). adapter_config.json is derived
/// from the modules: r and lora_alpha are the most common module values
/// (ties to adapter.r / adapter.lora_alpha), rank_pattern and alpha_pattern
/// list each module that differs, keyed by its path; target_modules is the
/// adapter's, or the modules' last path components when it has none.
///
/// The files are written into a temporary directory next to `dir` and moved
/// into place only when complete, so a failure leaves no partial output. A
/// `dir` that exists and is not empty is refused unless `overwrite`; then
/// its adapter_config.json and adapter_model.safetensors are replaced and
/// its other files kept. Throws rankwise::error: kInvalidArgument for an
/// inconsistent adapter (shapes, a scale that does not follow from alpha and
/// rank, a module target_modules does not match, a value overflowing
/// `dtype`), kIo for file system failures and refusals.
inline void write_peft_adapter(const PeftAdapter& adapter, const std::string& dir, DType dtype,
                               bool overwrite = false) {
  RANKWISE_CHECK(dtype_has_values(dtype), "PEFT writer: cannot store LoRA weights as ",
                 dtype_name(dtype), " (supported: F32, F16, BF16, F64)");
  detail::write_peft_adapter_impl(
      adapter, dir, [dtype](const LoraModule&, bool) { return dtype; }, overwrite);
}

/// As above, storing each tensor in the dtype it was read in (a_dtype, b_dtype).
inline void write_peft_adapter(const PeftAdapter& adapter, const std::string& dir,
                               bool overwrite = false) {
  detail::write_peft_adapter_impl(
      adapter, dir, [](const LoraModule& m, bool is_b) { return is_b ? m.b_dtype : m.a_dtype; },
      overwrite);
}

}  // namespace io
}  // namespace rankwise
