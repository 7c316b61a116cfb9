// Counter-based random numbers: value i of stream `seed` is a pure function of
// (seed, i), so the CPU and the GPU initialise parameters to the same bits.
#pragma once

#include <cmath>
#include <cstdint>

#include "rankwise/core/config.hpp"

namespace rankwise {

/// SplitMix64 finaliser: a bijective mix of 64 bits (Steele et al., 2014).
RANKWISE_HOST_DEVICE inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// Uniform double in [0, 1) for element `index` of stream `seed` (53 random bits).
RANKWISE_HOST_DEVICE inline double uniform01(std::uint64_t seed, std::uint64_t index) {
  const std::uint64_t bits = mix64(mix64(seed) + 0x9e3779b97f4a7c15ULL * (index + 1));
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

/// Uniform double in [lo, hi), as one fused multiply-add on both sides: a
/// correctly rounded FMA gives the same bits on the host and the device,
/// whatever contraction either compiler would apply to a plain expression.
RANKWISE_HOST_DEVICE inline double uniform(std::uint64_t seed, std::uint64_t index, double lo,
                                           double hi) {
  const double u = uniform01(seed, index);
#if defined(__CUDA_ARCH__)
  return __fma_rn(hi - lo, u, lo);
#else
  return std::fma(hi - lo, u, lo);
#endif
}

/// Seed of an independent stream derived from `seed` (one per tensor).
RANKWISE_HOST_DEVICE inline std::uint64_t substream(std::uint64_t seed, std::uint64_t which) {
  return mix64(seed ^ mix64(which + 0x632be59bd9b4e019ULL));
}

}  // namespace rankwise
