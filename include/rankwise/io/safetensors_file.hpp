// A safetensors file in memory: tensors as stored (dtype, shape, little-endian bytes)
// and the optional __metadata__ map, shared by the reader and the writer.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "rankwise/io/dtype.hpp"

namespace rankwise {
namespace io {

/// One tensor of a safetensors file, as stored: row-major little-endian bytes.
struct SafetensorsTensor {
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> data;  ///< exactly byte_size() bytes when valid

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

/// The contents of a safetensors file: tensors by name and the optional
/// `__metadata__` string map (absent and empty are kept apart, so a file reads
/// back and writes out byte for byte).
struct SafetensorsFile {
  std::optional<std::map<std::string, std::string>> metadata;
  std::map<std::string, SafetensorsTensor> tensors;
};

/// The largest header the reader accepts, as safetensors itself (100 MB).
inline constexpr std::uint64_t kMaxSafetensorsHeaderBytes = 100000000;

}  // namespace io
}  // namespace rankwise
