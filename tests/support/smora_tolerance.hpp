// Tolerances of the SMoRA and router tests, per storage type, in one place.
// Every bound is on a normwise relative error: max |got − ref| over the
// largest magnitude of the result (the reference computed on |inputs| with
// every term by absolute value, support/smora_reference.hpp), against the
// double reference fed the same rounded inputs. So a bound only has to cover
// the backend's own rounding, described with each value. The bugs these
// tests exist for (a wrong unit or expert, a lost gate, a gradient through the
// wrong bias, an overwritten accumulation) are errors of 1e-3 and up.
//
// Selection is compared exactly: test inputs keep every top-k decision at
// least kMargin apart in z (RefRouting::margin), far above the float rounding
// of a score (logits are dots of ≤ 37 terms: ≈ 1e-6 at worst).
//
// Problem sizes the bounds assume (tests/cases/smora_cases.hpp): n ≤ 300,
// d_in, d_out ≤ 40, r ≤ 64, x, dy, y0 in U(±1), A in U(±1/√d_in), B in
// U(±1/√r), W_r in U(±3/√d_in), |bias| ≤ 0.05, alpha / k ≤ 8.
#pragma once

#include "support/compare.hpp"
#include "support/smora_reference.hpp"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace rwtest {

template <class T>
struct SmoraTolerance;

template <>
struct SmoraTolerance<double> {
  // Dots of ≤ 40 terms, sums over ≤ 300 tokens, the gate normalisation over
  // ≤ 8 experts: measured ≤ 3.6e-16 (≈ 3 u, u = 2^-53 = 1.1e-16) on every
  // check; 1e-14 is ≈ 90 u.
  static constexpr double kRouter = 1e-14;    // scores, gates
  static constexpr double kForward = 1e-14;   // y
  static constexpr double kBackward = 1e-14;  // dA, dB, dW_r, dx, dgates
  static constexpr double kPaths = 1e-14;     // sparse vs dense vs LoRA vs mixture
  /// Central differences with h = 1e-6 (test_smora.cpp) on an O(1) loss,
  /// normwise against the largest FD gradient: rounding ≈ 1e-16 · |L| / h ≈
  /// 1e-9, truncation ≈ h² · |L'''| ≈ 1e-12. 1e-6 leaves room and still
  /// fails on any real error in a gradient.
  static constexpr double kFiniteDifference = 1e-6;
  static constexpr double kMargin = 2e-4;
};

template <>
struct SmoraTolerance<float> {
  // The same sums in float (u = 2^-24 = 6e-8): measured ≤ 2.0e-7 (≈ 3.3 u)
  // for scores and gates, ≤ 1.4e-7 for y and the gradients, on the CPU
  // backend. 2e-6 is ≈ 34 u: room for other summation orders (cuBLAS, warp
  // reductions) and for the router state of half and bfloat16 runs, which
  // is float too.
  static constexpr double kRouter = 2e-6;
  static constexpr double kForward = 2e-6;
  static constexpr double kBackward = 2e-6;
  static constexpr double kPaths = 2e-6;
  static constexpr double kMargin = 2e-4;
};

#if defined(__CUDACC__)
template <>
struct SmoraTolerance<__half> {
  // Router state stays float (Acc), so kRouter is float's. Outputs are
  // rounded to half (u = 2^-11 = 4.9e-4) once on the sparse path; the dense
  // path also stores H = X Aᵀ and gate ⊙ H (and dH) in half, dW_r goes
  // through dlogits stored in half, and the LoRA and mixture identities
  // round on both sides (dy_e is fed in half too): at most ~6 roundings of u
  // relative to the magnitude, which 4e-3 (≈ 8 u) covers. Not yet measured
  // on a GPU.
  static constexpr double kRouter = 2e-6;
  static constexpr double kForward = 4e-3;
  static constexpr double kBackward = 4e-3;
  static constexpr double kPaths = 4e-3;
  static constexpr double kMargin = 2e-4;
};

template <>
struct SmoraTolerance<__nv_bfloat16> {
  // As half, with bfloat16's u = 2^-8 = 3.9e-3: 3e-2 ≈ 8 u. Not yet measured
  // on a GPU.
  static constexpr double kRouter = 2e-6;
  static constexpr double kForward = 3e-2;
  static constexpr double kBackward = 3e-2;
  static constexpr double kPaths = 3e-2;
  static constexpr double kMargin = 2e-4;
};
#endif

/// compare() normwise against `scale`: max |got − ref| / max scale.
inline Comparison smora_compare(const char* what, const HostMatrix& got, const HostMatrix& ref,
                                const HostMatrix& scale, double tolerance) {
  return compare_within(what, got, ref, normwise_magnitude(scale), tolerance);
}
/// Against a reference and its magnitude (smora_reference.hpp): errors in
/// units of the largest magnitude.
inline Comparison smora_compare(const char* what, const HostMatrix& got, const SmoraExpected& e,
                                double tolerance) {
  return smora_compare(what, got, e.ref, e.mag, tolerance);
}
/// Against a plain reference: errors in units of max |ref|.
inline Comparison smora_compare(const char* what, const HostMatrix& got, const HostMatrix& ref,
                                double tolerance) {
  return smora_compare(what, got, ref, ref, tolerance);
}

}  // namespace rwtest

/// RWTEST_SMORA_CLOSE(got, expected, tol): CHECKs that HostMatrix `got` is
/// within `tol` of `expected` (a SmoraExpected, or a HostMatrix standing for
/// itself and its magnitude) normwise, the measure every SmoraTolerance
/// bound is stated in. On failure prints the worst element and
/// every INFO in scope. Variadic so template arguments need no parentheses.
#define RWTEST_SMORA_CLOSE(...)                                                              \
  do {                                                                                       \
    const ::rwtest::Comparison rwtest_cmp_ = ::rwtest::smora_compare(#__VA_ARGS__, __VA_ARGS__); \
    INFO(rwtest_cmp_);                                                                       \
    CHECK(rwtest_cmp_.rel <= rwtest_cmp_.tolerance);                                         \
  } while (false)
