// The one finite-difference helper of the suite: central differences in
// double of a scalar loss over every element of a parameter or input, and the
// one way they are compared with an analytic gradient.
//
//   fd_i = (L(base + h e_i) - L(base - h e_i)) / (2 h)
//
// Compared normwise: max |analytic - fd| over max |fd|, purely relative (no
// absolute part: finite differences are no rounding-error model). What h and
// the tolerance are depends on the loss, stated where they are chosen: a loss
// linear in each argument (LoRA, MoS) has no truncation error, so h = 1e-3
// (kLinearStep) and only the rounding of L(+h) - L(-h), about
// eps |L| / h, remains; a smooth nonlinear one (SMoRA's gates) trades
// truncation h² |L'''| against rounding with a smaller h.
#pragma once

#include <cstddef>

#include "support/compare.hpp"
#include "support/reference.hpp"

namespace rwtest {

/// The step for losses linear in the perturbed argument.
inline constexpr double kLinearStep = 1e-3;

/// Central differences of `evaluate(const HostMatrix&) -> double` over every
/// element of `base`, step h; L(+h) is evaluated before L(-h).
template <class Evaluate>
HostMatrix central_difference(const HostMatrix& base, double h, Evaluate&& evaluate) {
  HostMatrix fd(base.rows, base.cols);
  for (std::size_t i = 0; i < base.v.size(); ++i) {
    HostMatrix plus = base, minus = base;
    plus.v[i] += h;
    minus.v[i] -= h;
    const double lp = evaluate(plus);
    const double lm = evaluate(minus);
    fd.v[i] = (lp - lm) / (2 * h);
  }
  return fd;
}

/// The comparison: normwise against max |fd|, `tolerance` relative only.
inline Comparison compare_finite_difference(const char* what, const HostMatrix& analytic,
                                            const HostMatrix& fd, double tolerance) {
  return compare_normwise(what, analytic, fd, fd, relative(tolerance));
}

}  // namespace rwtest

/// RWTEST_CHECK_FINITE_DIFFERENCE(analytic, fd, tolerance): CHECKs the
/// HostMatrix `analytic` against central differences `fd` normwise (errors in
/// units of max |fd|), within the relative `tolerance`. Variadic so template
/// arguments need no parentheses.
#define RWTEST_CHECK_FINITE_DIFFERENCE(...)                                          \
  do {                                                                               \
    const ::rwtest::Comparison rwtest_cmp_ =                                         \
        ::rwtest::compare_finite_difference(#__VA_ARGS__, __VA_ARGS__);              \
    INFO(rwtest_cmp_);                                                               \
    CHECK(rwtest_cmp_.rel <= rwtest_cmp_.tolerance);                                 \
  } while (false)
