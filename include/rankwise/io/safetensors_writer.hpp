// Writing safetensors files laid out byte for byte as safetensors' own writer lays
// them out, to memory or atomically to disk.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "rankwise/core/error.hpp"
#include "rankwise/io/detail/atomic_file.hpp"
#include "rankwise/io/detail/byte_order.hpp"
#include "rankwise/io/detail/tensor_bytes.hpp"
#include "rankwise/io/dtype.hpp"
#include "rankwise/io/safetensors_file.hpp"

namespace rankwise {
namespace io {

namespace detail {

inline std::string json_string(const std::string& s, const char* what) {
  try {
    return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
  } catch (const nlohmann::json::exception&) {
    RANKWISE_CHECK(false, "safetensors writer: ", what, " is not valid UTF-8");
  }
  return {};
}

// The header and the tensors in file order, validated.
struct PreparedFile {
  std::string header;  // padded with spaces to a multiple of 8
  std::vector<const SafetensorsTensor*> order;
};

// Lays the file out as safetensors' own writer does: tensors sorted by dtype
// alignment (largest first), then by name; compact JSON with keys dtype,
// shape, data_offsets; __metadata__ first; header padded with spaces to a
// multiple of 8 so the data section (and so each tensor) stays aligned.
inline PreparedFile prepare_file(const SafetensorsFile& file) {
  std::vector<std::pair<const std::string*, const SafetensorsTensor*>> items;
  for (const auto& kv : file.tensors) {
    const std::string& name = kv.first;
    const SafetensorsTensor& t = kv.second;
    RANKWISE_CHECK(name != "__metadata__",
                   "safetensors writer: a tensor may not be named __metadata__");
    const auto numel = checked_numel(t.shape);
    RANKWISE_CHECK(numel.has_value(), "safetensors writer: tensor \"", name, "\" has shape ",
                   shape_string(t.shape), " with a negative dimension or too many elements");
    const auto bytes = checked_bytes(*numel, t.dtype);
    RANKWISE_CHECK(bytes.has_value() && *bytes == t.data.size(), "safetensors writer: tensor \"",
                   name, "\" holds ", t.data.size(), " bytes but dtype ", dtype_name(t.dtype),
                   " and shape ", shape_string(t.shape), " need ",
                   bytes ? std::to_string(*bytes) : std::string("a whole number of"), " bytes");
    items.emplace_back(&name, &t);
  }
  std::stable_sort(items.begin(), items.end(), [](const auto& x, const auto& y) {
    const int ox = dtype_info(x.second->dtype).order;
    const int oy = dtype_info(y.second->dtype).order;
    return ox != oy ? ox > oy : *x.first < *y.first;
  });

  PreparedFile out;
  std::string& h = out.header;
  h = "{";
  bool first = true;
  if (file.metadata) {
    h += "\"__metadata__\":{";
    bool first_meta = true;
    for (const auto& kv : *file.metadata) {
      if (!first_meta) h += ',';
      first_meta = false;
      h += json_string(kv.first, "a __metadata__ key");
      h += ':';
      h += json_string(kv.second, "a __metadata__ value");
    }
    h += '}';
    first = false;
  }
  std::uint64_t offset = 0;
  for (const auto& item : items) {
    if (!first) h += ',';
    first = false;
    h += json_string(*item.first, "a tensor name");
    h += ":{\"dtype\":\"";
    h += dtype_name(item.second->dtype);
    h += "\",\"shape\":[";
    for (std::size_t i = 0; i < item.second->shape.size(); ++i) {
      if (i) h += ',';
      h += std::to_string(item.second->shape[i]);
    }
    const std::uint64_t end = offset + item.second->data.size();
    h += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(end) + "]}";
    offset = end;
    out.order.push_back(item.second);
  }
  h += '}';
  h.append((8 - h.size() % 8) % 8, ' ');
  RANKWISE_CHECK(h.size() <= kMaxSafetensorsHeaderBytes, "safetensors writer: the header would be ",
                 h.size(), " bytes, over the ", kMaxSafetensorsHeaderBytes,
                 "-byte limit readers enforce");
  return out;
}

// Writes `file` to the stream; the caller checks the stream state.
inline void write_prepared(std::ostream& out, const PreparedFile& prepared) {
  std::uint8_t prefix[8];
  store_le(prefix, prepared.header.size(), 8);
  out.write(reinterpret_cast<const char*>(prefix), 8);
  out.write(prepared.header.data(), static_cast<std::streamsize>(prepared.header.size()));
  for (const auto* t : prepared.order) {
    if (!t->data.empty()) {
      out.write(reinterpret_cast<const char*>(t->data.data()),
                static_cast<std::streamsize>(t->data.size()));
    }
  }
}

}  // namespace detail

/// The bytes of `file` in safetensors format, laid out as the reference
/// implementation lays them out (so a file it wrote reads and re-serializes
/// to the identical bytes). Throws rankwise::error(kInvalidArgument) when a
/// tensor's data does not match its dtype and shape.
inline std::vector<std::uint8_t> serialize_safetensors(const SafetensorsFile& file) {
  const detail::PreparedFile prepared = detail::prepare_file(file);
  std::size_t total = 8 + prepared.header.size();
  for (const auto* t : prepared.order) total += t->data.size();
  std::vector<std::uint8_t> out(total);
  detail::store_le(out.data(), prepared.header.size(), 8);
  std::memcpy(out.data() + 8, prepared.header.data(), prepared.header.size());
  std::size_t at = 8 + prepared.header.size();
  for (const auto* t : prepared.order) {
    if (!t->data.empty()) std::memcpy(out.data() + at, t->data.data(), t->data.size());
    at += t->data.size();
  }
  return out;
}

/// Writes `file` to `path` (see serialize_safetensors), through a temporary
/// file renamed into place so `path` never holds a partial file.
inline void write_safetensors(const SafetensorsFile& file, const std::string& path) {
  const detail::PreparedFile prepared = detail::prepare_file(file);
  detail::write_file_atomically(
      std::filesystem::path(path),
      [&](std::ostream& out) { detail::write_prepared(out, prepared); }, "safetensors file");
}

}  // namespace io
}  // namespace rankwise
