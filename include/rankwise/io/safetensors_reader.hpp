// Reading safetensors files, from memory or from disk, validated before any tensor
// data is read or allocated.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <system_error>
#include <utility>

#include "rankwise/core/error.hpp"
#include "rankwise/io/detail/byte_order.hpp"
#include "rankwise/io/detail/safetensors_header.hpp"
#include "rankwise/io/detail/safetensors_where.hpp"
#include "rankwise/io/safetensors_file.hpp"

namespace rankwise {
namespace io {

namespace detail {

// Reads the file through `read(offset, dst, n)`, which must fill dst or throw.
template <class Read>
SafetensorsFile read_safetensors_from(const std::string& label, std::uint64_t file_bytes,
                                      Read&& read) {
  const std::string where = file_where(label);
  RANKWISE_CHECK_CODE(file_bytes >= 8, ErrorCode::kIo, where, ": file is ", file_bytes,
                      " bytes, shorter than the 8-byte header length");
  std::uint8_t prefix[8];
  read(0, prefix, 8);
  const std::uint64_t n = load_le(prefix, 8);
  RANKWISE_CHECK_CODE(n <= kMaxSafetensorsHeaderBytes, ErrorCode::kIo, where, ": header length ", n,
                      " exceeds the limit of ", kMaxSafetensorsHeaderBytes, " bytes");
  RANKWISE_CHECK_CODE(n <= file_bytes - 8, ErrorCode::kIo, where, ": header length ", n,
                      " exceeds the ", file_bytes - 8, " bytes after the length prefix");

  std::string text(static_cast<std::size_t>(n), '\0');
  if (n > 0) read(8, reinterpret_cast<std::uint8_t*>(&text[0]), static_cast<std::size_t>(n));
  ParsedHeader header = parse_header(label, text, file_bytes - 8 - n);

  SafetensorsFile file;
  file.metadata = std::move(header.metadata);
  for (auto& entry : header.entries) {
    SafetensorsTensor tensor;
    tensor.dtype = entry.dtype;
    tensor.shape = std::move(entry.shape);
    const std::uint64_t bytes = entry.end - entry.begin;
    RANKWISE_CHECK_CODE(bytes <= std::numeric_limits<std::size_t>::max(), ErrorCode::kIo,
                        tensor_where(label, entry.name), ": ", bytes,
                        " bytes do not fit in memory");
    tensor.data.resize(static_cast<std::size_t>(bytes));
    if (bytes > 0) read(8 + n + entry.begin, tensor.data.data(), static_cast<std::size_t>(bytes));
    file.tensors.emplace(std::move(entry.name), std::move(tensor));
  }
  return file;
}

}  // namespace detail

/// Parses a safetensors file held in memory. `label` names it in errors.
/// Throws rankwise::error(kIo) naming the rule broken (and the tensor, when
/// one is at fault) for any malformed input; never reads out of bounds.
inline SafetensorsFile parse_safetensors(const std::uint8_t* bytes, std::size_t size,
                                         const std::string& label = "<memory>") {
  return detail::read_safetensors_from(
      label, size, [&](std::uint64_t offset, std::uint8_t* dst, std::size_t n) {
        RANKWISE_CHECK_CODE(offset <= size && n <= size - offset, ErrorCode::kIo,
                            detail::file_where(label), ": read past the end of the buffer");
        std::memcpy(dst, bytes + offset, n);
      });
}

/// Reads and validates the safetensors file at `path` (see parse_safetensors).
/// Only the header is read before validation; tensor data is then read into
/// buffers whose sizes the validated header fixed and the file size bounds.
inline SafetensorsFile read_safetensors(const std::string& path) {
  std::error_code ec;
  const bool regular = std::filesystem::is_regular_file(path, ec);
  RANKWISE_CHECK_CODE(regular && !ec, ErrorCode::kIo, detail::file_where(path),
                      ": not a readable regular file",
                      ec ? ::rankwise::detail::concat(" (", ec.message(), ")") : std::string());
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, detail::file_where(path), ": cannot get its size (",
                      ec.message(), ")");
  std::ifstream in(path, std::ios::binary);
  RANKWISE_CHECK_CODE(in.is_open(), ErrorCode::kIo, detail::file_where(path), ": cannot open it");
  return detail::read_safetensors_from(
      path, static_cast<std::uint64_t>(size),
      [&](std::uint64_t offset, std::uint8_t* dst, std::size_t n) {
        in.seekg(static_cast<std::streamoff>(offset));
        in.read(reinterpret_cast<char*>(dst), static_cast<std::streamsize>(n));
        RANKWISE_CHECK_CODE(in && static_cast<std::size_t>(in.gcount()) == n, ErrorCode::kIo,
                            detail::file_where(path), ": short read of ", n, " bytes at offset ",
                            offset, " (the file changed while being read?)");
      });
}

}  // namespace io
}  // namespace rankwise
