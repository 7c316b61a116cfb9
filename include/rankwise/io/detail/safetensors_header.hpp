// The safetensors header validated: every rule of the format checked before any
// tensor data is read, giving each tensor's dtype, shape and byte range.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "rankwise/core/error.hpp"
#include "rankwise/io/detail/safetensors_header_reader.hpp"
#include "rankwise/io/detail/safetensors_where.hpp"
#include "rankwise/io/detail/tensor_bytes.hpp"
#include "rankwise/io/dtype.hpp"
#include "rankwise/io/json_reader.hpp"

namespace rankwise {
namespace io {

namespace detail {

// Where a tensor's bytes lie, relative to the start of the data section.
struct HeaderEntry {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

struct ParsedHeader {
  std::optional<std::map<std::string, std::string>> metadata;
  std::vector<HeaderEntry> entries;  // sorted by offset
};

// Parses and validates the JSON header of a file whose data section holds
// `data_bytes` bytes. Every rule of the format is checked here, before any
// tensor data is read or allocated; parsing and checking are linear in the
// header (the offset sort aside).
inline ParsedHeader parse_header(const std::string& label, const std::string& text,
                                 std::uint64_t data_bytes) {
  const std::string where = file_where(label);
  HeaderReader reader;
  const bool parsed = nlohmann::json::sax_parse(text.begin(), text.end(), &reader);
  const JsonReadError& problem = reader.error;
  RANKWISE_CHECK_CODE(problem.kind != JsonReadError::kTooDeep, ErrorCode::kIo, where,
                      ": header nests JSON deeper than a safetensors header can "
                      "(object > tensor entry > shape)");
  RANKWISE_CHECK_CODE(
      problem.kind != JsonReadError::kSyntax && (parsed || problem.kind != JsonReadError::kNone),
      ErrorCode::kIo, where, ": header is not valid JSON (", problem.message, ")");
  if (problem.kind == JsonReadError::kDuplicateKey) {
    const std::string parent = problem.at.empty() ? std::string() : problem.at.front();
    RANKWISE_CHECK_CODE(!problem.at.empty(), ErrorCode::kIo, where, ": duplicate key ",
                        quote_brief(problem.key), " in header");
    RANKWISE_CHECK_CODE(parent != "__metadata__", ErrorCode::kIo, where, ": duplicate key ",
                        quote_brief(problem.key), " in __metadata__");
    RANKWISE_CHECK_CODE(false, ErrorCode::kIo, tensor_where(label, parent), ": duplicate key ",
                        quote_brief(problem.key), " in its header entry");
  }
  RANKWISE_CHECK_CODE(reader.root_type == nullptr, ErrorCode::kIo, where,
                      ": header is not a JSON object (it is ", reader.root_type, ")");

  ParsedHeader out;
  if (reader.metadata) {
    RANKWISE_CHECK_CODE(reader.metadata_not_object == nullptr, ErrorCode::kIo, where,
                        ": __metadata__ must be an object mapping strings to strings (it is ",
                        reader.metadata_not_object, ")");
    RANKWISE_CHECK_CODE(reader.metadata_bad_type == nullptr, ErrorCode::kIo, where,
                        ": __metadata__ value of \"", name_brief(reader.metadata_bad_key),
                        "\" must be a string (it is ", reader.metadata_bad_type, ")");
    out.metadata = std::move(reader.metadata);
  }
  out.entries.reserve(reader.entries.size());
  for (RawEntry& raw : reader.entries) {
    const std::string& name = raw.name;
    // Built only when a check fails: the happy path stays free of string formatting.
    const auto at = [&] { return tensor_where(label, name); };
    RANKWISE_CHECK_CODE(raw.not_object == nullptr, ErrorCode::kIo, at(),
                        ": header entry must be an object with dtype, shape and data_offsets");

    HeaderEntry entry;
    RANKWISE_CHECK_CODE(raw.dtype_ok, ErrorCode::kIo, at(), ": missing or non-string \"dtype\"");
    const auto dtype = parse_dtype(raw.dtype);
    RANKWISE_CHECK_CODE(dtype.has_value(), ErrorCode::kIo, at(), ": unknown dtype ",
                        quote_brief(raw.dtype));
    entry.dtype = *dtype;

    RANKWISE_CHECK_CODE(raw.has_shape && raw.shape_array, ErrorCode::kIo, at(),
                        ": missing \"shape\" or it is not an array");
    RANKWISE_CHECK_CODE(raw.bad_dim.empty(), ErrorCode::kIo, at(),
                        ": shape must hold non-negative integers, found ", raw.bad_dim);
    entry.shape.reserve(raw.shape.size());
    for (const std::uint64_t d : raw.shape) {
      RANKWISE_CHECK_CODE(d <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                          ErrorCode::kIo, at(), ": shape dimension ", d, " overflows");
      entry.shape.push_back(static_cast<std::int64_t>(d));
    }
    const auto numel = checked_numel(entry.shape);
    RANKWISE_CHECK_CODE(numel.has_value(), ErrorCode::kIo, at(), ": element count of shape ",
                        shape_string(entry.shape), " overflows");
    const auto bytes = checked_bytes(*numel, entry.dtype);
    RANKWISE_CHECK_CODE(bytes.has_value(), ErrorCode::kIo, at(), ": byte size of shape ",
                        shape_string(entry.shape), " in ", dtype_name(entry.dtype),
                        " overflows or is not a whole number of bytes");

    RANKWISE_CHECK_CODE(raw.has_offsets && raw.offsets_ok, ErrorCode::kIo, at(),
                        ": data_offsets must be [begin, end], two non-negative integers");
    entry.begin = raw.offsets[0];
    entry.end = raw.offsets[1];
    RANKWISE_CHECK_CODE(entry.begin <= entry.end, ErrorCode::kIo, at(), ": data_offsets begin ",
                        entry.begin, " is past end ", entry.end);
    RANKWISE_CHECK_CODE(entry.end - entry.begin == *bytes, ErrorCode::kIo, at(), ": data_offsets [",
                        entry.begin, ", ", entry.end, "] span ", entry.end - entry.begin,
                        " bytes but dtype ", dtype_name(entry.dtype), " and shape ",
                        shape_string(entry.shape), " need ", *bytes, " bytes");
    entry.name = std::move(raw.name);
    out.entries.push_back(std::move(entry));
  }

  // The data section must be tiled exactly: in offset order each tensor
  // starts where the previous one ended, and the last one ends the file.
  std::stable_sort(out.entries.begin(), out.entries.end(),
                   [](const HeaderEntry& x, const HeaderEntry& y) {
                     return x.begin != y.begin ? x.begin < y.begin : x.end < y.end;
                   });
  std::uint64_t expected = 0;
  const HeaderEntry* previous = nullptr;
  for (const auto& entry : out.entries) {
    const auto at = [&] { return tensor_where(label, entry.name); };
    if (entry.begin < expected) {
      RANKWISE_CHECK_CODE(false, ErrorCode::kIo, at(), ": data_offsets [", entry.begin, ", ",
                          entry.end, "] overlap tensor \"", name_brief(previous->name),
                          "\", which ends at ", expected);
    }
    if (entry.begin > expected) {
      RANKWISE_CHECK_CODE(
          false, ErrorCode::kIo, at(), ": data_offsets begin at ", entry.begin,
          ", leaving a hole of ", entry.begin - expected, " bytes after ",
          previous ? ::rankwise::detail::concat("tensor \"", name_brief(previous->name), "\"")
                   : std::string("the start of the data section"));
    }
    expected = entry.end;
    previous = &entry;
  }
  RANKWISE_CHECK_CODE(expected <= data_bytes, ErrorCode::kIo, where,
                      ": file is truncated: the tensors need ", expected,
                      " bytes of data but the data section holds ", data_bytes);
  RANKWISE_CHECK_CODE(expected == data_bytes, ErrorCode::kIo, where, ": ", data_bytes - expected,
                      " trailing bytes after the last tensor (data section holds ", data_bytes,
                      " bytes, the tensors cover ", expected, ")");
  return out;
}

}  // namespace detail

}  // namespace io
}  // namespace rankwise
