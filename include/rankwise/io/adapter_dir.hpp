// Shared pieces of the adapter-directory formats (SMoRA, MoS): bounded config reading, value
// checks, and a directory write that leaves nothing behind when it fails.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "rankwise/core/error.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/io/json_reader.hpp"
#include "rankwise/io/peft_adapter.hpp"
#include "rankwise/io/safetensors.hpp"

namespace rankwise {
namespace io {
namespace detail {

/// The largest adapter_config.json the readers accept.
inline constexpr std::uintmax_t kMaxAdapterConfigBytes = std::uintmax_t{16} << 20;

// adapter_config.json of `dir` as a JSON object, parsed in linear time and bounded depth.
inline nlohmann::json read_adapter_config(const std::filesystem::path& path,
                                          const std::string& where) {
  const std::string text = read_text_file(path, kMaxAdapterConfigBytes);
  nlohmann::json config;
  JsonReadOptions options;
  options.max_depth = kMaxPeftConfigDepth;
  options.reject_duplicates = true;
  JsonReadError problem;
  if (!parse_json_bounded(text, options, config, problem)) {
    RANKWISE_CHECK_CODE(problem.kind != JsonReadError::kTooDeep, ErrorCode::kIo, where,
                        ": nests JSON deeper than the limit of ", kMaxPeftConfigDepth, " levels");
    RANKWISE_CHECK_CODE(problem.kind != JsonReadError::kDuplicateKey, ErrorCode::kIo, where,
                        ": duplicate key ", quote_brief(problem.key));
    RANKWISE_CHECK_CODE(false, ErrorCode::kIo, where, ": not valid JSON (", problem.message, ")");
  }
  RANKWISE_CHECK_CODE(config.is_object(), ErrorCode::kIo, where, ": not a JSON object");
  return config;
}

// The peft_type string of a config, or "" when absent or not a string.
inline std::string config_peft_type(const nlohmann::json& config) {
  const auto it = config.find("peft_type");
  return it != config.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// A required positive integer `key`.
inline std::int64_t config_positive_int(const nlohmann::json& config, const char* key,
                                        const std::string& where) {
  const auto it = config.find(key);
  RANKWISE_CHECK_CODE(it != config.end(), ErrorCode::kIo, where, ": missing \"", key, "\"");
  std::int64_t out = 0;
  RANKWISE_CHECK_CODE(json_positive_int(*it, out), ErrorCode::kIo, where, ": \"", key,
                      "\" must be a positive integer, got ", json_brief(*it));
  return out;
}

// An optional non-negative integer `key` that fits uint64 (absent: fallback).
inline std::uint64_t config_uint(const nlohmann::json& config, const char* key,
                                 std::uint64_t fallback, const std::string& where) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  RANKWISE_CHECK_CODE(it->is_number_unsigned(), ErrorCode::kIo, where, ": \"", key,
                      "\" must be a non-negative integer, got ", json_brief(*it));
  return it->get<std::uint64_t>();
}

// An optional finite number `key` (absent or null: fallback).
inline double config_number(const nlohmann::json& config, const char* key, double fallback,
                            const std::string& where) {
  const auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  double out = 0;
  RANKWISE_CHECK_CODE(json_finite_number(*it, out), ErrorCode::kIo, where, ": \"", key,
                      "\" must be a finite number, got ", json_brief(*it));
  return out;
}

// True when `key` is absent, null or an empty object/array: the PEFT options a
// format does not implement may only be left at their defaults.
inline bool config_empty(const nlohmann::json& config, const char* key) {
  const auto it = config.find(key);
  return it == config.end() || it->is_null() || (it->is_structured() && it->empty());
}

// target_modules as a list or one regular expression (see PeftAdapter).
inline void config_targets(const nlohmann::json& config, const std::string& where,
                           std::vector<std::string>& list, std::string& regex) {
  list.clear();
  regex.clear();
  const auto it = config.find("target_modules");
  if (it == config.end() || it->is_null()) return;
  if (it->is_string()) {
    regex = it->get<std::string>();
    return;
  }
  RANKWISE_CHECK_CODE(it->is_array(), ErrorCode::kIo, where,
                      ": \"target_modules\" must be a list of names, a string or null, got ",
                      json_brief(*it));
  for (const auto& t : *it) {
    RANKWISE_CHECK_CODE(t.is_string(), ErrorCode::kIo, where,
                        ": \"target_modules\" holds a non-string ", json_brief(t));
    list.push_back(t.get<std::string>());
  }
}

// The number of NaN and infinite values of `t`.
inline std::int64_t count_non_finite(const HostTensor& t) {
  std::int64_t n = 0;
  for (const double v : t.values) n += std::isfinite(v) ? 0 : 1;
  return n;
}

// A tensor converted to values, refusing non-float dtypes and non-finite values
// (an adapter holding NaN or infinity is the output of a diverged run).
inline HostTensor finite_values(const SafetensorsTensor& t, const std::string& where,
                                const std::string& key) {
  RANKWISE_CHECK_CODE(dtype_has_values(t.dtype), ErrorCode::kIo, where, ", tensor \"",
                      name_brief(key), "\": dtype ", dtype_name(t.dtype),
                      " is not a float type (supported: F32, F16, BF16, F64)");
  HostTensor host = to_host_tensor(t, key);
  const std::int64_t bad = count_non_finite(host);
  RANKWISE_CHECK_CODE(bad == 0, ErrorCode::kIo, where, ", tensor \"", name_brief(key), "\": holds ",
                      bad, " non-finite values (NaN or infinity) of ", host.values.size());
  return host;
}

// Requires `t` to have exactly `shape`, naming the tensor and the role of each dimension.
inline void require_shape(const std::vector<std::int64_t>& actual,
                          const std::vector<std::int64_t>& expected, const std::string& where,
                          const std::string& key, const char* layout) {
  RANKWISE_CHECK_CODE(actual == expected, ErrorCode::kIo, where, ", tensor \"", name_brief(key),
                      "\": shape ", shape_string(actual), ", expected ", shape_string(expected),
                      " ", layout);
}

// One file of a staged directory write: its name and how to write it at a path.
using StagedFile = std::pair<std::string, std::function<void(const std::string&)>>;

// Writes `files` into directory `dir` as PEFT's writer does: into a temporary
// sibling first, then moved into place, so a failure at any point leaves the
// target as it was. An existing non-empty `dir` is refused unless `overwrite`;
// then only the named files are replaced and the others kept.
inline void write_staged_directory(const std::string& dir, const std::vector<StagedFile>& files,
                                   bool overwrite, const char* what) {
  namespace fs = std::filesystem;
  fs::path target(dir);
  if (!target.has_filename()) target = target.parent_path();
  RANKWISE_CHECK_CODE(!target.empty() && target.has_filename(), ErrorCode::kIo, what, ": \"", dir,
                      "\" does not name a directory to write");
  std::error_code ec;
  const bool exists = fs::exists(target, ec);
  RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, what, ": cannot inspect \"", target.string(), "\" (",
                      ec.message(), ")");
  if (exists) {
    RANKWISE_CHECK_CODE(fs::is_directory(target, ec), ErrorCode::kIo, what, ": \"", target.string(),
                        "\" exists and is not a directory");
    const bool empty = fs::is_empty(target, ec);
    RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, what, ": cannot list \"", target.string(), "\" (",
                        ec.message(), ")");
    RANKWISE_CHECK_CODE(empty || overwrite, ErrorCode::kIo, what, ": refusing to overwrite \"",
                        target.string(), "\", an existing non-empty directory (pass overwrite)");
  }
  const fs::path staging = temporary_sibling(target, "tmp");
  fs::create_directory(staging, ec);
  RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, what, ": cannot create the temporary directory \"",
                      staging.string(), "\" (", ec.message(), ")");
  std::vector<bool> moved(files.size(), false), backed(files.size(), false);
  try {
    for (const auto& f : files) f.second((staging / f.first).string());
    if (!exists) {
      fs::rename(staging, target, ec);
      RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, what, ": cannot rename \"", staging.string(),
                          "\" to \"", target.string(), "\" (", ec.message(), ")");
      return;
    }
    for (std::size_t i = 0; i < files.size(); ++i) {
      const fs::path old_file = target / files[i].first;
      if (fs::exists(old_file, ec)) {
        fs::rename(old_file, staging / (files[i].first + ".old"), ec);
        RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, what, ": cannot move \"", old_file.string(),
                            "\" aside (", ec.message(), ")");
        backed[i] = true;
      }
      fs::rename(staging / files[i].first, old_file, ec);
      RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, what, ": cannot move the new \"", files[i].first,
                          "\" into \"", target.string(), "\" (", ec.message(), ")");
      moved[i] = true;
    }
  } catch (...) {
    std::error_code ignored;
    for (std::size_t i = 0; i < files.size(); ++i) {
      const fs::path file = target / files[i].first;
      if (backed[i]) {
        fs::rename(staging / (files[i].first + ".old"), file, ignored);
      } else if (moved[i]) {
        fs::remove(file, ignored);
      }
    }
    fs::remove_all(staging, ignored);
    throw;
  }
  fs::remove_all(staging, ec);
}

// Text written through a temporary file renamed into place.
inline void write_text_atomically(const std::string& path, const std::string& text,
                                  const char* what) {
  write_file_atomically(
      std::filesystem::path(path), [&](std::ostream& out) { out << text; }, what);
}

// JSON as Python's json.dumps(indent=2) writes it: sorted keys, ASCII only.
inline std::string dump_config(const nlohmann::json& config, const char* what) {
  try {
    return config.dump(2, ' ', true, nlohmann::json::error_handler_t::strict);
  } catch (const nlohmann::json::exception&) {
    RANKWISE_CHECK(false, what, ": a name or path in the config is not valid UTF-8");
  }
  return {};
}

}  // namespace detail
}  // namespace io
}  // namespace rankwise
