// MoS's parameters of the one tolerance model (support/tolerance.hpp): no
// per-type numbers here. Every MoS check compares against the double
// reference fed the same rounded inputs (support/mos_reference.hpp) in units
// of the result's magnitude (support/compare.hpp), held to
//
//   worst_case_tolerance<T>(roundings, chain)
//     = roundings · u_T + 2 · chain · u_Acc
//
// with the roundings to T below and chain = mos_chain (mos_reference.hpp),
// the longest accumulation path. Worst-case, not statistical, so no seed can
// make it flake; the bugs the tests exist for (a wrong shard, a wrong chunk, a
// lost scale, a gradient overwritten instead of added) are O(1) in these
// units, 10^4 times (float) or 10^2 times (bfloat16) above it.
#pragma once

#include "support/tolerance.hpp"

namespace rwtest {

/// Roundings to T along the longest path of each result:
///   forward   2   h = x Aᵀ (stored in T on the assembled path), y
///   backward  4   h, dh, dA or dBᵀ (assembled path, before the scatter), the
///                 pool gradient; +1 for every further call adding into the
///                 same gradient (a second batch, another layer)
inline constexpr int kMosForwardRoundings = 2;
inline constexpr int kMosBackwardRoundings = 4;

/// Central differences of L = Σ w ⊙ y (double), measured normwise (max |fd −
/// g| over max |g|). L is linear in A_pool, in B_pool and in x separately (a
/// shard listed twice still enters linearly), so there is no truncation
/// error, only rounding: ≈ 2^-53 · |L| / h with h = 1e-3 and |L| ≤ 50, i.e.
/// ≤ 1e-11 against gradients of O(1). 1e-8 leaves room and still fails on any
/// real gradient error. Not a rounding model.
inline constexpr double kMosFiniteDifference = 1e-8;

}  // namespace rwtest
