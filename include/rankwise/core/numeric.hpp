// Accumulation types and integer helpers shared by host and device code.
#pragma once

#include <cstddef>
#include <cstdint>

#include "rankwise/core/config.hpp"

namespace rankwise {

/// The type arithmetic accumulates in for storage type T: double for double,
/// float for everything narrower (float, __half, __nv_bfloat16).
template <class T>
struct Accumulator {
  using type = float;
};
template <>
struct Accumulator<double> {
  using type = double;
};
template <class T>
using accumulator_t = typename Accumulator<T>::type;

/// ceil(a / b) for positive b.
RANKWISE_HOST_DEVICE constexpr std::int64_t ceil_div(std::int64_t a, std::int64_t b) {
  return (a + b - 1) / b;
}

/// `bytes` rounded up to a multiple of `alignment` (a power of two).
RANKWISE_HOST_DEVICE constexpr std::size_t align_up(std::size_t bytes, std::size_t alignment) {
  return (bytes + alignment - 1) & ~(alignment - 1);
}

}  // namespace rankwise
