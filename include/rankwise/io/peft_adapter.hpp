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
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "rankwise/core/error.hpp"
#include "rankwise/core/lora_config.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/io/json_reader.hpp"
#include "rankwise/io/modules_to_save.hpp"
#include "rankwise/io/regex.hpp"
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
  /// modules_to_save as in the config: modules trained in full and saved whole.
  std::vector<std::string> modules_to_save;
  /// Their tensors by key as stored ("base_model.model.<module>.<param>"), bytes
  /// unchanged; applying them replaces the base model's tensors (not adds).
  std::map<std::string, SafetensorsTensor> saved_tensors;

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

// True when `key` holds only characters module paths use ([A-Za-z0-9_-] and
// '.'): as a regular expression it is a literal whose dots match any character.
inline bool plain_pattern(const std::string& key) {
  if (key.empty()) return false;
  for (const char c : key) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '_' || c == '-' || c == '.';
    if (!ok) return false;
  }
  return true;
}

// PEFT's get_pattern_key rule: pattern key k applies to module path m when
// re.match(rf"(.*\.)?({k})$", m) does. The key is a regular expression; a
// plain name matches the module of that name and every module whose path ends
// with "." + name. Matching is linear in the module name (see regex.hpp);
// plain keys, the common case, take a direct comparison with the same result.
class PatternMatcher {
 public:
  PatternMatcher(const std::string& key, const std::string& where)
      : key_(key), where_(where), plain_(plain_pattern(key)) {
    std::string why;
    RANKWISE_CHECK_CODE(key.size() <= kMaxRegexLength, ErrorCode::kIo, where, ": pattern key ",
                        quote_brief(key), " is not a regular expression rankwise can evaluate (",
                        "longer than the ", kMaxRegexLength, "-byte limit for a pattern)");
    // Compiled as PEFT writes it, textually, so a key such as "a)|(b" means
    // what it means to PEFT.
    regex_ = Regex::compile("(.*\\.)?(" + key + ")$", why);
    if (!regex_) {
      // The key's own error, with positions in the key rather than the wrapper.
      std::string own;
      if (!Regex::compile(key, own)) why = own;
      RANKWISE_CHECK_CODE(false, ErrorCode::kIo, where, ": pattern key ", quote_brief(key),
                          " is not a regular expression rankwise can evaluate (", why, ")");
    }
  }

  /// Whether the key applies to `module`. Throws rankwise::error(kIo) for a
  /// module name longer than kMaxRegexSubject.
  bool matches(const std::string& module) const {
    RANKWISE_CHECK_CODE(module.size() <= kMaxRegexSubject, ErrorCode::kIo, where_,
                        ": module name of ", module.size(), " bytes (", quote_brief(module, 40),
                        ") is longer than the ", kMaxRegexSubject,
                        "-byte limit for matching pattern key ", quote_brief(key_));
    if (plain_ && ascii_line(module)) return plain_matches(module);
    return regex_->matches(module, Regex::Anchor::kPrefix).value_or(false);
  }
  const std::string& key() const { return key_; }

 private:
  static bool ascii_line(const std::string& s) {
    for (const char c : s) {
      if (static_cast<unsigned char>(c) >= 0x80 || c == '\n') return false;
    }
    return true;
  }
  // The key matches the whole module or its end after a '.', each '.' of the
  // key standing for any one character.
  bool plain_matches(const std::string& module) const {
    const std::size_t n = module.size(), k = key_.size();
    if (n < k || (n > k && module[n - k - 1] != '.')) return false;
    for (std::size_t i = 0; i < k; ++i) {
      if (key_[i] != '.' && key_[i] != module[n - k + i]) return false;
    }
    return true;
  }

  std::string key_;
  std::string where_;
  bool plain_ = false;
  std::optional<Regex> regex_;
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
inline bool config_bool(const nlohmann::json& config, const char* key, bool fallback,
                        const std::string& where) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  RANKWISE_CHECK_CODE(it->is_boolean(), ErrorCode::kIo, where, ": \"", key,
                      "\" must be true or false, got ", json_brief(*it));
  return it->get<bool>();
}

// Reads the optional string `key`: absent or null gives "".
inline std::string config_string(const nlohmann::json& config, const char* key,
                                 const std::string& where) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return {};
  RANKWISE_CHECK_CODE(it->is_string(), ErrorCode::kIo, where, ": \"", key,
                      "\" must be a string or null, got ", json_brief(*it));
  return it->get<std::string>();
}

inline bool json_positive_int(const nlohmann::json& v, std::int64_t& out) {
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

inline bool json_finite_number(const nlohmann::json& v, double& out) {
  if (!v.is_number()) return false;
  out = v.get<double>();
  return std::isfinite(out);
}

/// The deepest nesting accepted in adapter_config.json. PEFT's own configs
/// nest three deep (layer_replication); the limit only keeps a hostile file
/// from building a huge tree.
inline constexpr int kMaxPeftConfigDepth = 32;

// The config fields rankwise uses; unknown keys are ignored, as PEFT does.
// Parsing is linear in the file (see json_reader.hpp) and bounded in depth;
// messages quote values through json_brief, so they stay short.
inline void parse_peft_config(const std::string& text, const std::string& where, PeftAdapter& out) {
  nlohmann::json config;
  JsonReadOptions options;
  options.max_depth = kMaxPeftConfigDepth;
  options.keep_order = {"rank_pattern", "alpha_pattern"};
  JsonReadError problem;
  std::map<std::string, std::vector<std::string>> order;
  if (!parse_json_bounded(text, options, config, problem, &order)) {
    RANKWISE_CHECK_CODE(problem.kind != JsonReadError::kTooDeep, ErrorCode::kIo, where,
                        ": nests JSON deeper than the limit of ", kMaxPeftConfigDepth, " levels");
    RANKWISE_CHECK_CODE(false, ErrorCode::kIo, where, ": not valid JSON (", problem.message, ")");
  }
  RANKWISE_CHECK_CODE(config.is_object(), ErrorCode::kIo, where, ": not a JSON object");

  const auto type_it = config.find("peft_type");
  RANKWISE_CHECK_CODE(type_it != config.end(), ErrorCode::kIo, where, ": missing \"peft_type\"");
  RANKWISE_CHECK_CODE(type_it->is_string() && type_it->get<std::string>() == "LORA", ErrorCode::kIo,
                      where, ": peft_type is ", json_brief(*type_it),
                      ", but only \"LORA\" adapters are supported");
  RANKWISE_CHECK_CODE(!config_bool(config, "use_dora", false, where), ErrorCode::kIo, where,
                      ": use_dora is true; DoRA adapters are not supported");

  const auto r_it = config.find("r");
  RANKWISE_CHECK_CODE(r_it != config.end(), ErrorCode::kIo, where, ": missing \"r\"");
  RANKWISE_CHECK_CODE(json_positive_int(*r_it, out.r), ErrorCode::kIo, where,
                      ": \"r\" must be a positive integer, got ", json_brief(*r_it));

  out.lora_alpha = 8;  // PEFT's LoraConfig default
  const auto alpha_it = config.find("lora_alpha");
  if (alpha_it != config.end() && !alpha_it->is_null()) {
    RANKWISE_CHECK_CODE(json_finite_number(*alpha_it, out.lora_alpha), ErrorCode::kIo, where,
                        ": \"lora_alpha\" must be a finite number, got ", json_brief(*alpha_it));
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
                          json_brief(*target_it));
      for (const auto& t : *target_it) {
        RANKWISE_CHECK_CODE(t.is_string(), ErrorCode::kIo, where,
                            ": \"target_modules\" holds a non-string ", json_brief(t));
        out.target_modules.push_back(t.get<std::string>());
      }
    }
  }

  out.modules_to_save.clear();
  const auto saved_it = config.find("modules_to_save");
  if (saved_it != config.end() && !saved_it->is_null()) {
    RANKWISE_CHECK_CODE(saved_it->is_array(), ErrorCode::kIo, where,
                        ": \"modules_to_save\" must be a list of names or null, got ",
                        json_brief(*saved_it));
    for (const auto& t : *saved_it) {
      RANKWISE_CHECK_CODE(t.is_string(), ErrorCode::kIo, where,
                          ": \"modules_to_save\" holds a non-string ", json_brief(t));
      out.modules_to_save.push_back(t.get<std::string>());
    }
  }

  // The pattern objects in file order: PEFT takes the first key that matches.
  const auto read_patterns = [&](const char* name, auto&& convert) {
    const auto it = config.find(name);
    if (it == config.end() || it->is_null()) return;
    RANKWISE_CHECK_CODE(it->is_object(), ErrorCode::kIo, where, ": \"", name,
                        "\" must be an object, got ", json_brief(*it));
    for (const std::string& key : order[name]) convert(key, it->at(key));
  };
  out.rank_pattern.clear();
  out.alpha_pattern.clear();
  read_patterns("rank_pattern", [&](const std::string& key, const nlohmann::json& value) {
    std::int64_t rank = 0;
    RANKWISE_CHECK_CODE(json_positive_int(value, rank), ErrorCode::kIo, where, ": rank_pattern[",
                        quote_brief(key), "] must be a positive integer, got ", json_brief(value));
    out.rank_pattern.emplace_back(key, rank);
  });
  read_patterns("alpha_pattern", [&](const std::string& key, const nlohmann::json& value) {
    double alpha = 0;
    RANKWISE_CHECK_CODE(json_finite_number(value, alpha), ErrorCode::kIo, where, ": alpha_pattern[",
                        quote_brief(key), "] must be a finite number, got ", json_brief(value));
    out.alpha_pattern.emplace_back(key, alpha);
  });
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

// The reader on a config's text and a loader of the weights file, so that the
// fuzz target drives the same code without files. `load_weights()` runs after
// the config is parsed and its patterns compiled, so config errors come first.
template <class LoadWeights>
PeftAdapter peft_adapter_from(const std::string& config_text, LoadWeights&& load_weights,
                              const std::string& config_where, const std::string& weights_where) {
  PeftAdapter adapter;
  detail::parse_peft_config(config_text, config_where, adapter);
  const auto rank_patterns = detail::compile_patterns(adapter.rank_pattern, config_where);
  const auto alpha_patterns = detail::compile_patterns(adapter.alpha_pattern, config_where);

  const SafetensorsFile file = load_weights();
  RANKWISE_CHECK_CODE(!file.tensors.empty(), ErrorCode::kIo, weights_where, ": holds no tensors");

  struct Pair {
    const SafetensorsTensor* a = nullptr;
    const SafetensorsTensor* b = nullptr;
  };
  std::map<std::string, Pair> pairs;  // sorted by module name
  const std::string prefix = detail::kPeftKeyPrefix;
  // LoRA on the modules_to_save wrapper and DoRA are refused first, so the
  // message names the key that explains the file rather than a side tensor.
  for (const PeftKeyKind refused : {PeftKeyKind::kWrapperLora, PeftKeyKind::kDoraMagnitude}) {
    for (const auto& kv : file.tensors) {
      RANKWISE_CHECK_CODE(classify_peft_key(kv.first, adapter.modules_to_save).kind != refused,
                          ErrorCode::kIo, weights_where, ": ",
                          peft_key_refusal(kv.first, refused, adapter.modules_to_save));
    }
  }
  for (const auto& kv : file.tensors) {
    const PeftKeyInfo info = classify_peft_key(kv.first, adapter.modules_to_save);
    if (info.kind == PeftKeyKind::kSavedModule) {
      adapter.saved_tensors.emplace(kv.first, kv.second);
      continue;
    }
    RANKWISE_CHECK_CODE(info.kind == PeftKeyKind::kLoraA || info.kind == PeftKeyKind::kLoraB,
                        ErrorCode::kIo, weights_where, ": ",
                        peft_key_refusal(kv.first, info.kind, adapter.modules_to_save));
    (info.kind == PeftKeyKind::kLoraA ? pairs[info.module].a : pairs[info.module].b) = &kv.second;
  }

  for (const auto& kv : pairs) {
    const std::string& name = kv.first;
    const std::string at =
        ::rankwise::detail::concat(weights_where, ", module \"", detail::name_brief(name), "\"");
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

}  // namespace detail

/// Reads the PEFT LoRA adapter in directory `dir`. Each module's rank and
/// alpha follow rank_pattern / alpha_pattern (PEFT's first-match rule) over r
/// and lora_alpha, and its tensors are checked against them: lora_A must be
/// (rank x d_in) and lora_B (d_out x rank). The tensors of modules in
/// modules_to_save (whole modules PEFT trains in full, e.g. a classifier
/// head) are kept, bytes unchanged, in saved_tensors. Throws
/// rankwise::error(kIo) naming the file, module or tensor and the rule
/// broken: peft_type other than "LORA", DoRA (use_dora or a magnitude
/// vector), missing r, LoRA on PEFT's modules_to_save wrapper, a tensor that
/// is neither a LoRA weight nor of a saved module, a module
/// with only one of A and B, a rank mismatch, a malformed safetensors file,
/// a config nested deeper than kMaxPeftConfigDepth, a pattern key rankwise
/// cannot evaluate (see regex.hpp) or a module name too long to match.
inline PeftAdapter read_peft_adapter(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path config_path = fs::path(dir) / kPeftConfigFile;
  const fs::path weights_path = fs::path(dir) / kPeftWeightsFile;
  const std::string config_where =
      ::rankwise::detail::concat("PEFT config \"", config_path.string(), "\"");
  const std::string weights_where =
      ::rankwise::detail::concat("PEFT weights \"", weights_path.string(), "\"");
  return detail::peft_adapter_from(
      detail::read_text_file(config_path, std::uintmax_t{16} << 20),
      [&] { return read_safetensors(weights_path.string()); }, config_where, weights_where);
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
// another module under PEFT's rule, then escaped. A name with characters
// other than [A-Za-z0-9_.-] is always escaped: as a regular expression it
// would mean something else. PEFT reads the keys in file order, which is
// sorted, so verification follows that order.
template <class Value>
std::vector<std::pair<std::string, Value>> module_patterns(const std::vector<LoraModule>& modules,
                                                           Value (*get)(const LoraModule&),
                                                           Value fallback, const char* what) {
  for (int escaped = 0; escaped < 2; ++escaped) {
    std::map<std::string, Value> sorted;
    for (const auto& m : modules) {
      if (get(m) != fallback) {
        sorted[escaped || !plain_pattern(m.name) ? regex_escape(m.name) : m.name] = get(m);
      }
    }
    std::vector<std::pair<std::string, Value>> patterns(sorted.begin(), sorted.end());
    const std::vector<std::pair<PatternMatcher, Value>> compiled =
        compile_patterns(patterns, ::rankwise::detail::concat("PEFT writer: ", what));
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
  config["modules_to_save"] =
      adapter.modules_to_save.empty() ? json(nullptr) : json(adapter.modules_to_save);
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
  const std::string at =
      ::rankwise::detail::concat("PEFT writer: module \"", name_brief(m.name), "\"");
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

// Everything the writer checks before touching the disk, and the config text
// it derives; separate so that the fuzz target runs it without files.
inline std::string prepare_peft_config(const PeftAdapter& adapter) {
  RANKWISE_CHECK(!adapter.modules.empty(), "PEFT writer: the adapter has no modules");
  std::vector<std::int64_t> ranks;
  std::vector<double> alphas;
  std::set<std::string> seen_names;
  for (std::size_t i = 0; i < adapter.modules.size(); ++i) {
    const LoraModule& m = adapter.modules[i];
    check_module(m, adapter.scale_rule());
    RANKWISE_CHECK(seen_names.insert(m.name).second, "PEFT writer: module \"", name_brief(m.name),
                   "\" appears twice");
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
  // PEFT full-matches a target_modules string (re.fullmatch).
  std::optional<Regex> target_regex;
  if (!adapter.target_modules_regex.empty()) {
    std::string why;
    // Syntax rankwise does not evaluate (lookaround...) is left to PEFT: not checked.
    target_regex = Regex::compile(adapter.target_modules_regex, why);
  }
  for (const auto& m : adapter.modules) {
    bool targeted = false;
    if (!adapter.target_modules_regex.empty()) {
      const auto matched =
          target_regex ? target_regex->matches(m.name, Regex::Anchor::kFull) : true;
      RANKWISE_CHECK(matched.has_value(), "PEFT writer: module name of ", m.name.size(),
                     " bytes is longer than the ", kMaxRegexSubject,
                     "-byte limit for matching target_modules");
      targeted = *matched;
    } else {
      for (const auto& t : targets)
        targeted = targeted || m.name == t || ends_with(m.name, "." + t);
    }
    RANKWISE_CHECK(targeted, "PEFT writer: module \"", name_brief(m.name),
                   "\" is not matched by target_modules, so PEFT would not load it");
  }
  return peft_config_text(adapter, r, alpha, rank_pattern, alpha_pattern, targets);
}

// The whole-directory write, with `dtype_of(module, is_b)` choosing each tensor's dtype.
template <class DTypeOf>
void write_peft_adapter_impl(const PeftAdapter& adapter, const std::string& dir, DTypeOf dtype_of,
                             bool overwrite) {
  namespace fs = std::filesystem;
  const std::string config_text = prepare_peft_config(adapter);

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
    for (const auto& kv : adapter.saved_tensors) {
      // Every saved tensor must read back as one: of a listed module, not a LoRA key.
      RANKWISE_CHECK(
          classify_peft_key(kv.first, adapter.modules_to_save).kind == PeftKeyKind::kSavedModule &&
              weights.tensors.count(kv.first) == 0,
          "PEFT writer: saved tensor \"", name_brief(kv.first),
          "\" is not base_model.model.<module>.<param> of a module in modules_to_save");
      weights.tensors.emplace(kv.first, kv.second);
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
