// SMoRA's and the router's parameters of the one tolerance model
// (support/tolerance.hpp): no per-type numbers here, only what is specific to
// these layers, fed to worst_case_tolerance<T>, and the normwise measure
// (compare_normwise, RWTEST_CHECK_NORMWISE in support/compare.hpp).
//
// Every bound is on a normwise relative error: max |got − ref| over the
// largest magnitude of the result (the reference computed on |inputs| with
// every term by absolute value, support/smora_reference.hpp), against the
// double reference fed the same rounded inputs. So a bound only has to cover
// the backend's own rounding. The bugs these tests exist for (a wrong unit or
// expert, a lost gate, a gradient through the wrong bias, an overwritten
// accumulation) are errors of 1e-3 and up.
//
// kSmoraRoundings: stores into T along the longest path. Outputs are rounded
//   to T once on the sparse path; the dense path also stores H = X Aᵀ and
//   gate ⊙ H (and dH) in T, dW_r goes through dlogits stored in T, and the
//   LoRA and mixture identities round on both sides (dy_e is fed in T too):
//   at most ~6 roundings, 7 allowed.
// kSmoraChain: the accumulation allowance, 2 · 13 = 26 u_Acc. Normwise over
//   dots of ≤ 40 terms and sums over ≤ 300 tokens the errors average out:
//   measured on the CPU ≤ 3.6e-16 (≈ 3 u) in double, ≤ 2.0e-7 (≈ 3.4 u) in
//   float for scores and gates, ≤ 1.4e-7 for y and the gradients; 26 u_Acc
//   (+ 7 u_T) leaves ~8x room for other summation orders (cuBLAS, warp
//   reductions). Router state (scores, gates) is Acc and stores nothing in T:
//   0 roundings. Half and bfloat16 not yet measured on a GPU.
//
// Selection is compared exactly: test inputs keep every top-k decision at
// least kMargin apart in z (RefRouting::margin), far above the float rounding
// of a score (logits are dots of ≤ 37 terms: ≈ 1e-6 at worst).
//
// Problem sizes the bounds assume (tests/cases/smora_cases.hpp): n ≤ 300,
// d_in, d_out ≤ 40, r ≤ 64, x, dy, y0 in U(±1), A in U(±1/√d_in), B in
// U(±1/√r), W_r in U(±3/√d_in), |bias| ≤ 0.05, alpha / k ≤ 8.
#pragma once

#include <cstdint>

#include "support/compare.hpp"
#include "support/smora_reference.hpp"
#include "support/tolerance.hpp"

namespace rwtest {

inline constexpr int kSmoraRoundings = 7;
inline constexpr int kSmoraRouterRoundings = 0;
inline constexpr std::int64_t kSmoraChain = 13;

/// The model's bounds for the SMoRA checks of storage type T (router checks
/// use T = Acc). Derived, not tabulated: every member is worst_case_tolerance.
template <class T>
struct SmoraTolerance {
  static constexpr Bound kRouter = worst_case_tolerance<T>(kSmoraRouterRoundings, kSmoraChain);
  static constexpr Bound kForward = worst_case_tolerance<T>(kSmoraRoundings, kSmoraChain);
  static constexpr Bound kBackward = worst_case_tolerance<T>(kSmoraRoundings, kSmoraChain);
  static constexpr Bound kPaths = worst_case_tolerance<T>(kSmoraRoundings, kSmoraChain);
  /// Central differences with h = 1e-6 (support/finite_difference.hpp) on an
  /// O(1) loss, normwise against the largest FD gradient: rounding ≈ 1e-16 ·
  /// |L| / h ≈ 1e-9, truncation ≈ h² · |L'''| ≈ 1e-12. 1e-6 leaves room and
  /// still fails on any real error in a gradient. Not a rounding model.
  static constexpr double kFiniteDifference = 1e-6;
  /// Input generation, not a tolerance: top-k decisions kept this far apart.
  static constexpr double kMargin = 2e-4;
};

}  // namespace rwtest
