// PEFT's modules_to_save in a LoRA file: which tensors are whole saved modules, which are refused
// (LoRA on the modules_to_save wrapper, DoRA magnitudes, anything unknown) and why, and which a
// merge of several adapters carries.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "rankwise/core/error.hpp"
#include "rankwise/io/safetensors.hpp"

namespace rankwise {
namespace io {

/// What a tensor key of a PEFT LoRA file is.
enum class PeftKeyKind {
  kLoraA,          ///< <prefix><module>.lora_A.weight
  kLoraB,          ///< <prefix><module>.lora_B.weight
  kSavedModule,    ///< <prefix><module>.<param> of a module in modules_to_save
  kWrapperLora,    ///< LoRA under .modules_to_save. / .original_module. (refused)
  kDoraMagnitude,  ///< lora_magnitude_vector (refused)
  kUnknown,        ///< anything else (refused)
};

struct PeftKeyInfo {
  PeftKeyKind kind = PeftKeyKind::kUnknown;
  std::string module;  ///< the LoRA module, or the saved module's path
};

namespace detail {

inline bool key_ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}

// PEFT wraps a module whose path is a modules_to_save entry or ends with "." + entry.
inline bool saved_module_matches(const std::string& module, const std::vector<std::string>& names) {
  for (const auto& n : names) {
    if (!n.empty() && (module == n || key_ends_with(module, "." + n))) return true;
  }
  return false;
}

}  // namespace detail

/// Classifies `key` of a PEFT LoRA file whose config lists `modules_to_save`.
/// PEFT saves a wrapped module's own copy under the module's path with the
/// wrapper's ".modules_to_save.<adapter>" removed, so a saved tensor is
/// "base_model.model.<module>.<param>" with <module> matching an entry.
inline PeftKeyInfo classify_peft_key(const std::string& key,
                                     const std::vector<std::string>& modules_to_save) {
  const std::string prefix = "base_model.model.";
  const std::string a = ".lora_A.weight", b = ".lora_B.weight";
  PeftKeyInfo info;
  if (key.find("lora_magnitude_vector") != std::string::npos) {
    info.kind = PeftKeyKind::kDoraMagnitude;
    return info;
  }
  const bool lora = detail::key_ends_with(key, a) || detail::key_ends_with(key, b);
  const bool has_prefix = key.compare(0, prefix.size(), prefix) == 0;
  if (key.find(".modules_to_save.") != std::string::npos ||
      key.find(".original_module.") != std::string::npos) {
    info.kind = lora ? PeftKeyKind::kWrapperLora : PeftKeyKind::kUnknown;
    return info;
  }
  if (lora && has_prefix && key.size() > prefix.size() + a.size()) {
    info.kind = detail::key_ends_with(key, a) ? PeftKeyKind::kLoraA : PeftKeyKind::kLoraB;
    info.module = key.substr(prefix.size(), key.size() - prefix.size() - a.size());
    return info;
  }
  const auto dot = key.rfind('.');
  if (has_prefix && !lora && key.find("lora_") == std::string::npos && dot != std::string::npos &&
      dot > prefix.size() && dot + 1 < key.size()) {
    const std::string module = key.substr(prefix.size(), dot - prefix.size());
    if (detail::saved_module_matches(module, modules_to_save)) {
      info.kind = PeftKeyKind::kSavedModule;
      info.module = module;
    }
  }
  return info;
}

/// Why a key of kind kWrapperLora, kDoraMagnitude or kUnknown is refused.
inline std::string peft_key_refusal(const std::string& key, PeftKeyKind kind,
                                    const std::vector<std::string>& modules_to_save) {
  const std::string quoted = "tensor \"" + detail::name_brief(key) + "\"";
  switch (kind) {
    case PeftKeyKind::kWrapperLora:
      return quoted +
             " is a LoRA placed on PEFT's modules_to_save wrapper (its target_modules matched a "
             "module that modules_to_save also wraps, so the module has a trained full copy and "
             "LoRA factors on both the copy and the original); no single ΔW describes it, so it "
             "is not supported";
    case PeftKeyKind::kDoraMagnitude:
      return quoted +
             " is a DoRA magnitude vector (lora_magnitude_vector): DoRA rescales every column of "
             "W0 + ΔW, which a LoRA ΔW cannot express; DoRA adapters are not supported";
    default: {
      std::string list;
      for (const auto& m : modules_to_save) list += (list.empty() ? "" : ", ") + m;
      return quoted +
             " is not a LoRA weight (expected base_model.model.<module>.lora_A.weight or "
             ".lora_B.weight) nor a tensor of a module in modules_to_save [" +
             list + "]; refusing it rather than dropping it";
    }
  }
}

/// The saved-module tensors a merge carries from `inputs` (each input's
/// tensors by key, in input order; `labels` name the inputs in errors). With
/// one input, or when every input holds the same keys with the same dtype,
/// shape and bytes, those are carried unchanged. Otherwise the inputs
/// disagree, which is refused naming the first module that differs, unless
/// `from` names the input (0-based) whose tensors to take. Throws
/// rankwise::error(kInvalidArgument).
inline std::map<std::string, SafetensorsTensor> merged_saved_tensors(
    const std::vector<const std::map<std::string, SafetensorsTensor>*>& inputs,
    const std::vector<std::string>& labels, std::optional<std::size_t> from = std::nullopt) {
  RANKWISE_CHECK(!inputs.empty(), "modules_to_save: no inputs");
  const auto label = [&](std::size_t i) {
    return i < labels.size() ? "input " + std::to_string(i) + " (\"" + labels[i] + "\")"
                             : "input " + std::to_string(i);
  };
  if (from) {
    RANKWISE_CHECK(*from < inputs.size(), "modules_to_save: input ", *from,
                   " to take the saved modules from is out of range (", inputs.size(), " inputs)");
    return *inputs[*from];
  }
  const auto module_of = [](const std::string& key) {
    const auto dot = key.rfind('.');
    return dot == std::string::npos ? key : key.substr(0, dot);
  };
  const auto& first = *inputs[0];
  for (std::size_t i = 1; i < inputs.size(); ++i) {
    const auto& other = *inputs[i];
    auto x = first.begin();
    auto y = other.begin();
    while (x != first.end() || y != other.end()) {
      std::string differs;
      if (x == first.end() || (y != other.end() && y->first < x->first)) {
        differs = y->first;
      } else if (y == other.end() || x->first < y->first) {
        differs = x->first;
      } else if (x->second.dtype != y->second.dtype || x->second.shape != y->second.shape ||
                 x->second.data != y->second.data) {
        differs = x->first;
      }
      RANKWISE_CHECK(differs.empty(), "modules_to_save: saved module \"",
                     detail::name_brief(module_of(differs)), "\" (tensor \"",
                     detail::name_brief(differs), "\") differs between ", label(0), " and ",
                     label(i),
                     "; a merge cannot combine full module copies: say which input to take "
                     "them from");
      ++x;
      ++y;
    }
  }
  return first;
}

}  // namespace io
}  // namespace rankwise
