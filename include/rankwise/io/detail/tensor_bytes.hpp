// Element and byte counts of a tensor's shape, checked for overflow as safetensors
// checks them, and the shape as text for error messages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "rankwise/io/dtype.hpp"

namespace rankwise {
namespace io {

namespace detail {

inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string out = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    out += (i ? " x " : "") + std::to_string(shape[i]);
  }
  return out + ")";
}

// Element count of `shape` with the running product checked against int64,
// as safetensors checks it (a later zero does not excuse an earlier overflow).
// nullopt on overflow.
inline std::optional<std::int64_t> checked_numel(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (auto d : shape) {
    if (d < 0) return std::nullopt;
    if (d != 0 && n > std::numeric_limits<std::int64_t>::max() / d) return std::nullopt;
    n *= d;
  }
  return n;
}

// Bytes of `numel` elements of `dtype`; nullopt on overflow or when a
// sub-byte dtype does not fill whole bytes.
inline std::optional<std::uint64_t> checked_bytes(std::int64_t numel, DType dtype) {
  const auto bits = static_cast<std::uint64_t>(dtype_bits(dtype));
  const auto n = static_cast<std::uint64_t>(numel);
  if (n > std::numeric_limits<std::uint64_t>::max() / bits) return std::nullopt;
  if ((n * bits) % 8 != 0) return std::nullopt;
  return n * bits / 8;
}

}  // namespace detail

}  // namespace io
}  // namespace rankwise
