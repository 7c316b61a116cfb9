// The summary rankwise-inspect prints: what an adapter directory holds and what is wrong with it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <rankwise/io/mos_adapter.hpp>
#include <rankwise/io/peft_adapter.hpp>
#include <rankwise/io/safetensors.hpp>
#include <rankwise/io/smora_adapter.hpp>
#include <string>
#include <vector>

namespace inspect {

namespace io = rankwise::io;

struct TensorInfo {
  std::string name;
  std::string role;  // lora_A, lora_B, router, bias, shards, indices, full, wrapper-lora, dora, ...
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t bytes = 0;
  std::int64_t non_finite = 0;  // -1: not a float tensor
  std::int64_t numel = 0;
};

struct ModuleInfo {
  std::string name;
  std::int64_t rank = 0, d_in = 0, d_out = 0;
  double alpha = 0, scale = 0;
  std::string dtype;
  std::uint64_t bytes = 0;
};

struct Summary {
  std::string dir;
  std::string kind;  // peft_type, or "?" when the config cannot be read
  std::string base_model;
  std::vector<ModuleInfo> modules;
  std::vector<TensorInfo> tensors;  // every tensor of the weights file
  std::vector<std::string> problems;
  bool ok() const { return problems.empty(); }
};

inline bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}
inline bool contains(const std::string& s, const std::string& t) {
  return s.find(t) != std::string::npos;
}

// What a tensor is, by the naming rules of PEFT and the reference codes.
inline std::string role_of(const std::string& key) {
  const bool lora = ends_with(key, ".lora_A.weight") || ends_with(key, ".lora_B.weight");
  if (lora && (contains(key, ".modules_to_save.") || contains(key, ".original_module."))) {
    return "wrapper-lora";
  }
  if (ends_with(key, ".lora_A.weight")) return "lora_A";
  if (ends_with(key, ".lora_B.weight")) return "lora_B";
  if (contains(key, "lora_magnitude_vector")) return "dora-magnitude";
  if (ends_with(key, ".lora_router.weight")) return "router";
  if (ends_with(key, ".lora_biases")) return "bias";
  if (ends_with(key, ".shards_A") || ends_with(key, ".shards_B")) return "shards";
  if (ends_with(key, ".mos_indices_A") || ends_with(key, ".mos_indices_B")) return "indices";
  if (contains(key, ".base_layer.")) return "base-layer-copy";
  if (contains(key, "lora_embedding_")) return "embedding-lora";
  return "full";
}

inline std::string module_of(const std::string& key, const std::string& suffix) {
  std::string m = key.substr(0, key.size() - suffix.size());
  const std::string prefix = "base_model.model.";
  if (m.compare(0, prefix.size(), prefix) == 0) m = m.substr(prefix.size());
  return m;
}

inline Summary summarize(const std::string& dir) {
  namespace fs = std::filesystem;
  Summary s;
  s.dir = dir;
  s.kind = "?";
  nlohmann::json config;
  try {
    config =
        io::detail::read_adapter_config(fs::path(dir) / io::kPeftConfigFile, "adapter_config.json");
    s.kind = io::detail::config_peft_type(config);
    if (s.kind.empty()) s.kind = "?";
    const auto base = config.find("base_model_name_or_path");
    if (base != config.end() && base->is_string()) s.base_model = base->get<std::string>();
  } catch (const std::exception& e) {
    s.problems.push_back(e.what());
  }
  io::SafetensorsFile file;
  bool have_file = false;
  try {
    file = io::read_safetensors((fs::path(dir) / io::kPeftWeightsFile).string());
    have_file = true;
  } catch (const std::exception& e) {
    s.problems.push_back(e.what());
  }
  std::map<std::string, ModuleInfo> modules;
  std::int64_t all_values = 0, all_bad = 0;
  for (const auto& kv : file.tensors) {
    TensorInfo t;
    t.name = kv.first;
    t.role = role_of(kv.first);
    t.dtype = io::dtype_name(kv.second.dtype);
    t.shape = kv.second.shape;
    t.bytes = kv.second.data.size();
    t.numel = kv.second.numel();
    t.non_finite = -1;
    if (io::dtype_has_values(kv.second.dtype)) {
      const rankwise::HostTensor h = io::to_host_tensor(kv.second, kv.first);
      t.non_finite = io::detail::count_non_finite(h);
      all_values += t.numel;
      all_bad += t.non_finite;
    }
    if ((t.role == "lora_A" || t.role == "lora_B") && t.shape.size() == 2) {
      ModuleInfo& m = modules[module_of(kv.first, ".lora_A.weight")];
      m.name = module_of(kv.first, ".lora_A.weight");
      if (t.role == "lora_A") {
        m.rank = t.shape[0];
        m.d_in = t.shape[1];
        m.dtype = t.dtype;
      } else {
        m.d_out = t.shape[0];
      }
      m.bytes += t.bytes;
    }
    if ((t.role == "router" || t.role == "bias")) {
      const std::string m =
          module_of(kv.first, t.role == "router" ? ".lora_router.weight" : ".lora_biases");
      modules[m].bytes += t.bytes;
    }
    s.tensors.push_back(std::move(t));
  }
  // Alphas and scales as the format's own reader resolves them; its refusal is a problem.
  std::map<std::string, std::pair<double, double>> scales;
  if (have_file && s.kind != "?") {
    try {
      if (s.kind == "LORA") {
        const io::PeftAdapter a = io::read_peft_adapter(dir);
        for (const auto& m : a.modules) scales[m.name] = {m.alpha, m.scale};
      } else if (s.kind == io::kSmoraPeftType) {
        const io::SmoraAdapter a = io::read_smora_adapter(dir);
        for (const auto& m : a.modules) scales[m.name] = {a.lora_alpha, a.scale()};
      } else if (s.kind == io::kMosPeftType) {
        const io::MosAdapter a = io::read_mos_adapter(dir);
        for (const auto& l : a.layers) {
          const auto& c = a.pools.at(l.pool).config;
          ModuleInfo& m = modules[l.module];
          m.name = l.module;
          m.rank = c.rank;
          m.d_in = a.pools.at(l.pool).pool.d_in;
          m.d_out = a.pools.at(l.pool).pool.d_out;
          m.dtype = io::dtype_name(a.pools.at(l.pool).dtype);
          scales[l.module] = {c.alpha, c.scale()};
        }
      } else {
        s.problems.push_back("peft_type \"" + s.kind +
                             "\" is not one rankwise reads (LORA, SRMOLE, RANKWISE_MOS)");
      }
    } catch (const std::exception& e) {
      s.problems.push_back(e.what());
    }
  }
  for (auto& kv : modules) {
    const auto it = scales.find(kv.first);
    if (it != scales.end()) {
      kv.second.alpha = it->second.first;
      kv.second.scale = it->second.second;
    }
    s.modules.push_back(kv.second);
  }
  std::int64_t bad_tensors = 0;
  for (const auto& t : s.tensors) bad_tensors += t.non_finite > 0 ? 1 : 0;
  if (all_bad > 0) {
    s.problems.push_back(rankwise::detail::concat(
        all_bad == all_values ? "every value is non-finite: " : "non-finite values: ", all_bad,
        " of ", all_values, " values (NaN or infinity) in ", bad_tensors, " of ", s.tensors.size(),
        " tensors; a diverged run, unusable"));
  }
  const bool explained = std::any_of(
      s.problems.begin(), s.problems.end(),
      [](const std::string& p) { return p.find("modules_to_save wrapper") != std::string::npos; });
  for (const auto& t : s.tensors) {
    if (t.role == "wrapper-lora" && !explained) {
      s.problems.push_back("tensor \"" + t.name +
                           "\" is a LoRA placed on PEFT's modules_to_save wrapper: the module "
                           "is both trained in full and LoRA-adapted, which no merge can express");
      break;
    }
  }
  return s;
}

inline std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out;
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? "x" : "") + std::to_string(shape[i]);
  return out.empty() ? "scalar" : out;
}

inline nlohmann::json to_json(const Summary& s) {
  using nlohmann::json;
  json out;
  out["dir"] = s.dir;
  out["kind"] = s.kind;
  out["base_model"] = s.base_model.empty() ? json(nullptr) : json(s.base_model);
  out["ok"] = s.ok();
  out["problems"] = s.problems;
  json modules = json::array();
  std::uint64_t bytes = 0;
  for (const auto& m : s.modules) {
    modules.push_back({{"name", m.name},
                       {"rank", m.rank},
                       {"d_in", m.d_in},
                       {"d_out", m.d_out},
                       {"alpha", m.alpha},
                       {"scale", m.scale},
                       {"dtype", m.dtype},
                       {"bytes", m.bytes}});
  }
  json tensors = json::array();
  json other = json::array();
  for (const auto& t : s.tensors) {
    bytes += t.bytes;
    json j = {
        {"name", t.name},   {"role", t.role},
        {"dtype", t.dtype}, {"shape", t.shape},
        {"bytes", t.bytes}, {"non_finite", t.non_finite < 0 ? json(nullptr) : json(t.non_finite)}};
    tensors.push_back(j);
    if (t.role != "lora_A" && t.role != "lora_B") other.push_back(t.name);
  }
  out["modules"] = modules;
  out["non_lora_tensors"] = other;
  out["tensors"] = tensors;
  out["bytes"] = bytes;
  return out;
}

}  // namespace inspect
