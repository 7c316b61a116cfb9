// Every numeric tolerance of the test suite, per storage type, in one place.
//
// What is measured (support/compare.hpp): for each element, |got - ref|
// divided by its magnitude, the reference evaluated on |inputs| (the sum of
// the absolute values of every term that went into that element). Rounding
// error analysis bounds errors by multiples of that magnitude, element by
// element; |ref| itself can be made arbitrarily small by cancellation, so it
// is no yardstick. Inputs are rounded to T before the reference sees them, so
// input rounding is no part of the error.
//
// A result that went through `roundings` stores into T (the kernel's output,
// and intermediates such as H = X Aᵀ, dH = s dY B or a merged weight, which
// the library keeps in T) and through accumulations totalling k terms is
// within
//
//     roundings * u_T  +  accumulation(k)               (times its magnitude)
//     + roundings * eta_T                               (absolute)
//
// u_T: unit roundoff of T, the largest relative error of one rounding to
//   nearest. Each store into T adds at most u_T times the magnitude: the
//   value rounded is bounded by the magnitude of its terms, and an error
//   already in an intermediate (H, dH) reaches the result multiplied by
//   factors whose magnitudes the result's magnitude already includes.
// accumulation(k): error of summing k products in the accumulator type.
//   float and double (CPU Eigen, cuBLAS FFMA, round to nearest): the
//   probabilistic bound lambda * sqrt(k) * u_Acc of Higham & Mary ("A new
//   approach to probabilistic rounding error analysis", SISC 2019), which
//   holds whatever the summation order; lambda = 6. Observed on the CPU: at
//   most about a third of the bound (gemm with k = 1), usually a tenth.
//   __half and __nv_bfloat16 (fp32 accumulation in cuBLAS, possibly on tensor
//   cores whose fp32 additions may truncate rather than round): the
//   deterministic worst case 2 (k + 2) u_fp32, where 2 u_fp32 is the error of
//   one truncated addition and the 2 covers alpha and beta. At the largest k
//   here (432) it is a tenth of u_half, so it costs little and never depends
//   on luck.
// eta_T: half the smallest subnormal, the absolute error of a rounding in the
//   gradual-underflow range (reachable for __half at these data: values
//   below 6.1e-5). Negligible for the other types.
//
// k: for a gemm, its inner dimension; for LoRA, n + d_in + d_out + r, which
// bounds the summed length of every accumulation chain (e.g. dB: H over d_in,
// then over n) without tracking each one.
//
// Emulating the half and bfloat16 arithmetic on the host (inputs in T, fp32
// accumulation, one rounding per stored result) over 300 seeds of every shape
// in these tests gave at most 0.997 of these bounds (a single rounding next to
// a power of two reaches u_T), never above: the bounds are tight and hold.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace rwtest {

/// Allowed error of one comparison: `rel` times each element's magnitude,
/// plus `abs`.
struct Bound {
  double rel;
  double abs;
};

/// lambda of the probabilistic accumulation bound for round-to-nearest types.
inline constexpr double kLambda = 6.0;

template <class T>
struct Tolerance;

template <>
struct Tolerance<double> {
  static constexpr const char* kName = "double";
  static constexpr double kUnitRoundoff = 0x1.0p-53;
  static constexpr double kUnderflow = 0x1.0p-1074;  // (half of it is not a double)
  static constexpr double kAccumulatorRoundoff = 0x1.0p-53;
  static double accumulation(std::int64_t k) {
    return kLambda * std::sqrt(static_cast<double>(k + 2)) * 0x1.0p-53;
  }
  /// Central differences with h = 1e-3 of a loss that is linear in each
  /// argument: no truncation error, only the rounding of L(+h) - L(-h),
  /// about eps * |L| / h = 2.2e-16 * 72 / 1e-3 = 1.6e-11 of the largest
  /// gradient entry at the test's sizes (|L| <= n * d_out * max |y|).
  /// Observed: 1.8e-13.
  static constexpr double kFiniteDifference = 1e-10;
};

template <>
struct Tolerance<float> {
  static constexpr const char* kName = "float";
  static constexpr double kUnitRoundoff = 0x1.0p-24;
  static constexpr double kUnderflow = 0x1.0p-150;
  static constexpr double kAccumulatorRoundoff = 0x1.0p-24;
  static double accumulation(std::int64_t k) {
    return kLambda * std::sqrt(static_cast<double>(k + 2)) * 0x1.0p-24;
  }
};

#if defined(__CUDACC__)
template <>
struct Tolerance<__half> {
  static constexpr const char* kName = "half";
  static constexpr double kUnitRoundoff = 0x1.0p-11;  // 11 significant bits
  static constexpr double kUnderflow = 0x1.0p-25;     // smallest subnormal 2^-24
  static constexpr double kAccumulatorRoundoff = 0x1.0p-24;  // accumulates in float
  static double accumulation(std::int64_t k) {
    return 2.0 * static_cast<double>(k + 2) * 0x1.0p-24;
  }
};

template <>
struct Tolerance<__nv_bfloat16> {
  static constexpr const char* kName = "bfloat16";
  static constexpr double kUnitRoundoff = 0x1.0p-8;  // 8 significant bits
  static constexpr double kUnderflow = 0x1.0p-134;   // float's exponent range
  static constexpr double kAccumulatorRoundoff = 0x1.0p-24;  // accumulates in float
  static double accumulation(std::int64_t k) {
    return 2.0 * static_cast<double>(k + 2) * 0x1.0p-24;
  }
};
#endif

/// The bound for a result stored `roundings` times into T after accumulations
/// of k terms in all (see the top of this file).
template <class T>
Bound tolerance(int roundings, std::int64_t k) {
  return {roundings * Tolerance<T>::kUnitRoundoff + Tolerance<T>::accumulation(k),
          roundings * Tolerance<T>::kUnderflow};
}

/// The same model with the deterministic accumulation term instead of the
/// probabilistic one: a sum of k products in any order is within k u_Acc of
/// the sum of |terms| (Higham, Accuracy and Stability, section 3.1), and the
/// factor 2 leaves room for accumulators that truncate (tensor cores) and for
/// gamma_k = k u / (1 - k u) > k u. `chain` bounds k along the longest path.
/// Worst case, so no seed can make it flake; no absolute part (callers that
/// use it compare normwise or where nothing underflows). Used by MoS
/// (cases/mos_cases.hpp) and, with SMoRA's parameters, by
/// support/smora_tolerance.hpp.
template <class T>
constexpr Bound worst_case_tolerance(int roundings, std::int64_t chain) {
  return {roundings * Tolerance<T>::kUnitRoundoff +
              2.0 * static_cast<double>(chain) * Tolerance<T>::kAccumulatorRoundoff,
          0.0};
}

/// For checks that are not rounding-error bounds (finite differences): `rel`
/// of each element's magnitude, nothing absolute.
inline Bound relative(double rel) { return {rel, 0.0}; }

}  // namespace rwtest
