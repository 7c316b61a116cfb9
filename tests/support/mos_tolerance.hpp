// Tolerances of the MoS tests, per storage type, in one place.
//
// Every check compares against the double reference fed the same rounded
// inputs (support/mos_reference.hpp) in units of the result's magnitude: the
// same reference run on |inputs|, i.e. the sum of |terms| behind each element
// (support/compare.hpp). Relative to that yardstick rounding error has a
// worst-case bound that does not depend on the data:
//
//   |got − ref| ≤ (roundings · u_T + 2 · chain · u_Acc) · mag
//
//   u_T      unit roundoff of the storage type: every intermediate the backend
//            stores in T (h, dh, dA on the assembled path; y; the pool
//            gradient after each addition) costs at most u_T of its own
//            magnitude, which the final magnitude bounds;
//   u_Acc    unit roundoff of the accumulator (float, or double for double):
//            a sum of k products in any order is within k · u_Acc of the sum
//            of |terms| (Higham, Accuracy and Stability, §3.1); chain bounds k
//            along the longest path (mos_chain in mos_reference.hpp);
//   2        room for hardware accumulators that truncate instead of
//            rounding (tensor cores) and for γ_k = k u / (1 − k u) > k u.
//
// It is worst-case, not statistical, so no seed can make it flake; the bugs
// the tests exist for (a wrong shard, a wrong chunk, a lost scale, a gradient
// overwritten instead of added) are O(1) in these units, 10^4 times (float)
// or 10^2 times (bfloat16) above it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace rwtest {

template <class T>
struct MosTolerance;

template <>
struct MosTolerance<double> {
  static constexpr const char* kName = "double";
  static constexpr double kStorageRoundoff = 0x1.0p-53;
  static constexpr double kAccumulatorRoundoff = 0x1.0p-53;
  /// Central differences of L = Σ w ⊙ y, measured normwise (max |fd − g| over
  /// max |g|). L is linear in A_pool, in B_pool and in x separately (a shard
  /// listed twice still enters linearly), so there is no truncation error,
  /// only rounding: ≈ 2^-53 · |L| / h with h = 1e-3 and |L| ≤ 50, i.e. ≤ 1e-11
  /// against gradients of O(1). 1e-8 leaves room and still fails on any real
  /// gradient error.
  static constexpr double kFiniteDifference = 1e-8;
};

template <>
struct MosTolerance<float> {
  static constexpr const char* kName = "float";
  static constexpr double kStorageRoundoff = 0x1.0p-24;
  static constexpr double kAccumulatorRoundoff = 0x1.0p-24;
};

#if defined(__CUDACC__)
template <>
struct MosTolerance<__half> {
  static constexpr const char* kName = "half";
  static constexpr double kStorageRoundoff = 0x1.0p-11;
  static constexpr double kAccumulatorRoundoff = 0x1.0p-24;  // accumulates in float
};

template <>
struct MosTolerance<__nv_bfloat16> {
  static constexpr const char* kName = "bfloat16";
  static constexpr double kStorageRoundoff = 0x1.0p-8;
  static constexpr double kAccumulatorRoundoff = 0x1.0p-24;  // accumulates in float
};
#endif

/// Roundings to T along the longest path of each result:
///   forward   2   h = x Aᵀ (stored in T on the assembled path), y
///   backward  4   h, dh, dA or dBᵀ (assembled path, before the scatter), the
///                 pool gradient; +1 for every further call adding into the
///                 same gradient (a second batch, another layer)
inline constexpr int kMosForwardRoundings = 2;
inline constexpr int kMosBackwardRoundings = 4;

/// The bound above for a result with `roundings` roundings to T and a chain
/// of `chain` accumulations (mos_chain).
template <class T>
double mos_tolerance(int roundings, std::int64_t chain) {
  return roundings * MosTolerance<T>::kStorageRoundoff +
         2.0 * static_cast<double>(chain) * MosTolerance<T>::kAccumulatorRoundoff;
}

}  // namespace rwtest
