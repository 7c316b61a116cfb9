// Little-endian loads and stores of up to eight bytes: safetensors data and headers
// are little-endian whatever the host.
#pragma once

#include <cstdint>

namespace rankwise {
namespace io {

namespace detail {

inline std::uint64_t load_le(const std::uint8_t* p, int bytes) {
  std::uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
inline void store_le(std::uint8_t* p, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

}  // namespace detail

}  // namespace io
}  // namespace rankwise
