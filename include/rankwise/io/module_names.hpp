// Hugging Face module paths to llama.cpp's GGUF tensor names, per model family: a table the user
// can extend.
#pragma once

#include <algorithm>
#include <cctype>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "rankwise/core/error.hpp"

namespace rankwise {
namespace io {

/// One mapping rule: `hf` is a module path with "{bid}" standing for a layer
/// number (decimal digits), `gguf` the base tensor name with the same
/// placeholder, e.g. "model.layers.{bid}.self_attn.q_proj" ->
/// "blk.{bid}.attn_q.weight".
struct ModuleNameRule {
  std::string hf;
  std::string gguf;
};

/// The rules of one architecture (llama.cpp's general.architecture value).
class ModuleNameMap {
 public:
  ModuleNameMap() = default;
  explicit ModuleNameMap(std::string architecture, std::vector<ModuleNameRule> rules = {})
      : architecture_(std::move(architecture)), rules_(std::move(rules)) {}

  const std::string& architecture() const { return architecture_; }
  const std::vector<ModuleNameRule>& rules() const { return rules_; }

  /// Adds a rule, tried before the existing ones (so a user rule overrides a built-in one).
  void add(const std::string& hf, const std::string& gguf) {
    RANKWISE_CHECK(!hf.empty() && !gguf.empty(), "ModuleNameMap::add: empty pattern");
    RANKWISE_CHECK(count(hf) <= 1 && count(hf) == count(gguf), "ModuleNameMap::add: \"", hf,
                   "\" -> \"", gguf, "\" must both hold {bid} once, or both not at all");
    rules_.insert(rules_.begin(), ModuleNameRule{hf, gguf});
  }

  /// The base tensor name of `module`, or nullopt when no rule matches.
  std::optional<std::string> map(const std::string& module) const {
    for (const auto& rule : rules_) {
      const auto bid = match(rule.hf, module);
      if (!bid) continue;
      std::string out = rule.gguf;
      const auto at = out.find(kBid);
      if (at != std::string::npos) out.replace(at, std::string(kBid).size(), *bid);
      return out;
    }
    return std::nullopt;
  }

 private:
  static constexpr const char* kBid = "{bid}";
  static std::size_t count(const std::string& s) {
    std::size_t n = 0;
    for (auto at = s.find(kBid); at != std::string::npos; at = s.find(kBid, at + 1)) ++n;
    return n;
  }
  // The digits standing for {bid} when `module` matches `pattern` ("" without a placeholder).
  static std::optional<std::string> match(const std::string& pattern, const std::string& module) {
    const auto at = pattern.find(kBid);
    if (at == std::string::npos) {
      return pattern == module ? std::optional<std::string>(std::string()) : std::nullopt;
    }
    const std::string head = pattern.substr(0, at), tail = pattern.substr(at + 5);
    if (module.size() <= head.size() + tail.size()) return std::nullopt;
    if (module.compare(0, head.size(), head) != 0) return std::nullopt;
    if (module.compare(module.size() - tail.size(), tail.size(), tail) != 0) return std::nullopt;
    const std::string digits =
        module.substr(head.size(), module.size() - head.size() - tail.size());
    const bool ok = digits.size() <= 9 && std::all_of(digits.begin(), digits.end(), [](char c) {
                      return std::isdigit(static_cast<unsigned char>(c)) != 0;
                    });
    return ok ? std::optional<std::string>(digits) : std::nullopt;
  }

  std::string architecture_;
  std::vector<ModuleNameRule> rules_;
};

namespace detail {

// The decoder layout shared by LLaMA, Qwen2 and Gemma (gguf-py's tensor_mapping).
inline std::vector<ModuleNameRule> llama_like_rules(bool with_lm_head) {
  std::vector<ModuleNameRule> rules;
  const std::pair<const char*, const char*> layer[] = {
      {"self_attn.q_proj", "attn_q"}, {"self_attn.k_proj", "attn_k"},
      {"self_attn.v_proj", "attn_v"}, {"self_attn.o_proj", "attn_output"},
      {"mlp.gate_proj", "ffn_gate"},  {"mlp.up_proj", "ffn_up"},
      {"mlp.down_proj", "ffn_down"}};
  for (const auto& p : layer) {
    rules.push_back({std::string("model.layers.{bid}.") + p.first,
                     std::string("blk.{bid}.") + p.second + ".weight"});
  }
  // Tied embeddings (Gemma, small Qwen2) have no output tensor: llama.cpp
  // would refuse lm_head, so it is mapped only where the base has one.
  if (with_lm_head) rules.push_back({"lm_head", "output.weight"});
  return rules;
}

}  // namespace detail

/// The built-in map of `architecture`: "llama", "qwen2", "gemma", "gpt2" or
/// "opt" (llama.cpp has no OPT loader; the file is well formed, but llama.cpp
/// refuses its architecture). Throws rankwise::error naming the known ones.
inline ModuleNameMap module_name_map(const std::string& architecture) {
  if (architecture == "llama" || architecture == "qwen2") {
    return ModuleNameMap(architecture, detail::llama_like_rules(true));
  }
  if (architecture == "gemma") return ModuleNameMap(architecture, detail::llama_like_rules(false));
  if (architecture == "gpt2") {
    std::vector<ModuleNameRule> rules;
    const std::pair<const char*, const char*> layer[] = {{"attn.c_attn", "attn_qkv"},
                                                         {"attn.c_proj", "attn_output"},
                                                         {"mlp.c_fc", "ffn_up"},
                                                         {"mlp.c_proj", "ffn_down"}};
    for (const char* root : {"transformer.h.{bid}.", "h.{bid}."}) {
      for (const auto& p : layer) {
        rules.push_back(
            {std::string(root) + p.first, std::string("blk.{bid}.") + p.second + ".weight"});
      }
    }
    return ModuleNameMap(architecture, std::move(rules));
  }
  if (architecture == "opt") {
    std::vector<ModuleNameRule> rules;
    const std::pair<const char*, const char*> layer[] = {{"self_attn.q_proj", "attn_q"},
                                                         {"self_attn.k_proj", "attn_k"},
                                                         {"self_attn.v_proj", "attn_v"},
                                                         {"self_attn.out_proj", "attn_output"},
                                                         {"fc1", "ffn_up"},
                                                         {"fc2", "ffn_down"}};
    for (const auto& p : layer) {
      rules.push_back({std::string("model.decoder.layers.{bid}.") + p.first,
                       std::string("blk.{bid}.") + p.second + ".weight"});
    }
    return ModuleNameMap(architecture, std::move(rules));
  }
  RANKWISE_CHECK(false, "module_name_map: unknown architecture \"", architecture,
                 "\" (known: llama, qwen2, gemma, gpt2, opt; build a ModuleNameMap for others)");
  return {};
}

/// The architecture a base model name suggests ("Qwen/Qwen2.5-0.5B" ->
/// "qwen2"), or nullopt. Only a guess: callers let the user override it.
inline std::optional<std::string> guess_architecture(const std::string& base_model) {
  std::string s = base_model;
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  const auto has = [&](const char* needle) { return s.find(needle) != std::string::npos; };
  if (has("qwen2") && !has("vl")) return std::string("qwen2");
  // Gemma 2 and 3 ("gemma-2-9b", "gemma-3-4b") are other llama.cpp architectures; "gemma-2b" is
  // Gemma.
  if (has("gemma") && !has("gemma-2-") && !has("gemma2") && !has("gemma-3-") && !has("gemma3")) {
    return std::string("gemma");
  }
  if (has("llama")) return std::string("llama");
  if (has("gpt2")) return std::string("gpt2");
  if (has("opt-")) return std::string("opt");
  return std::nullopt;
}

}  // namespace io
}  // namespace rankwise
