// Comparison and error-checking helpers shared by every test binary: relative
// error against a double reference, bit equality, and rankwise::error checks
// that look at both the message and the code. No Eigen, no CUDA.
#pragma once

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "rankwise/core/error.hpp"
#include "support/reference.hpp"
#include "support/tolerance.hpp"

namespace rwtest {

/// How far `got` is from `ref`, element by element, in units of `mag`: the
/// sum of the magnitudes of the terms behind each element (the reference run
/// on |inputs|, see abs_of). Rounding errors are bounded by a multiple of mag,
/// never of |ref| (which cancellation can make arbitrarily small), so
/// rel = max (|got - ref| - abs_floor) / mag is what tolerance.hpp's bounds
/// apply to (abs_floor: the underflow allowance). A NaN or infinity in `got`,
/// an error above the floor where mag is 0, or a shape mismatch makes rel
/// infinite. The normwise max |got - ref| / max |ref| is reported too.
struct Comparison {
  std::string what;
  std::int64_t rows = 0, cols = 0;
  bool same_shape = true;
  double rel = 0.0;          // max over elements of (|got - ref| - abs_floor) / mag
  double abs_floor = 0.0;    // absolute error allowed on top of rel * mag
  double tolerance = 0.0;    // what rel is held to, when checked
  double max_abs_err = 0.0;  // max |got - ref|
  double ref_scale = 0.0;    // max |ref|
  double normwise = 0.0;     // max_abs_err / ref_scale
  std::int64_t worst_row = -1, worst_col = -1;  // where rel is attained
  double got_at = 0.0, ref_at = 0.0, mag_at = 0.0;
};

inline std::ostream& operator<<(std::ostream& out, const Comparison& c) {
  out << c.what << " (" << c.rows << " x " << c.cols << "): ";
  if (!c.same_shape) return out << "shape differs from the reference";
  out << "max |got - ref| / magnitude = " << c.rel << " (tolerance " << c.tolerance
      << "); max |got - ref| = " << c.max_abs_err << ", max |ref| = " << c.ref_scale;
  if (c.worst_row >= 0) {
    out << "; worst at (" << c.worst_row << ", " << c.worst_col << "): got " << c.got_at << ", ref "
        << c.ref_at << ", magnitude " << c.mag_at;
  }
  return out;
}

inline Comparison compare(const HostMatrix& got, const HostMatrix& ref, const HostMatrix& mag,
                          const char* what, double abs_floor = 0.0) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  Comparison c;
  c.what = what;
  c.abs_floor = abs_floor;
  c.rows = ref.rows;
  c.cols = ref.cols;
  if (got.rows != ref.rows || got.cols != ref.cols || mag.rows != ref.rows ||
      mag.cols != ref.cols) {
    c.same_shape = false;
    c.rel = kInf;
    return c;
  }
  for (std::int64_t i = 0; i < ref.rows; ++i) {
    for (std::int64_t j = 0; j < ref.cols; ++j) {
      const double d = std::abs(got(i, j) - ref(i, j));
      const double err = std::isfinite(d) ? d : kInf;
      const double excess = err - abs_floor;
      const double ratio = excess <= 0.0 ? 0.0 : (mag(i, j) > 0.0 ? excess / mag(i, j) : kInf);
      c.ref_scale = std::max(c.ref_scale, std::abs(ref(i, j)));
      c.max_abs_err = std::max(c.max_abs_err, err);
      if (ratio > c.rel || (c.worst_row < 0 && ratio == kInf)) {
        c.rel = ratio;
        c.worst_row = i;
        c.worst_col = j;
        c.got_at = got(i, j);
        c.ref_at = ref(i, j);
        c.mag_at = mag(i, j);
      }
    }
  }
  c.normwise = c.ref_scale > 0.0 ? c.max_abs_err / c.ref_scale : c.max_abs_err;
  return c;
}

/// For exact results: mag = |ref|, so any difference at a nonzero element
/// counts in units of that element and any difference at a zero is infinite.
inline Comparison compare(const HostMatrix& got, const HostMatrix& ref, const char* what) {
  return compare(got, ref, abs_of(ref), what);
}

/// A magnitude of max |ref| everywhere: compare() then measures normwise.
inline HostMatrix normwise_magnitude(const HostMatrix& ref) {
  double m = 0.0;
  for (double x : ref.v) m = std::max(m, std::abs(x));
  return HostMatrix(ref.rows, ref.cols, m);
}

/// compare() with the tolerance it will be held to, for RWTEST_CHECK_CLOSE.
inline Comparison compare_within(const char* what, const HostMatrix& got, const HostMatrix& ref,
                                 const HostMatrix& mag, Bound bound) {
  Comparison c = compare(got, ref, mag, what, bound.abs);
  c.tolerance = bound.rel;
  return c;
}

/// The same with a purely relative tolerance (no underflow allowance).
inline Comparison compare_within(const char* what, const HostMatrix& got, const HostMatrix& ref,
                                 const HostMatrix& mag, double tolerance) {
  return compare_within(what, got, ref, mag, Bound{tolerance, 0.0});
}

/// The normwise measure of the model: compare_within() against a magnitude
/// of max |scale| everywhere, i.e. max |got - ref| / max |scale|.
inline Comparison compare_normwise(const char* what, const HostMatrix& got, const HostMatrix& ref,
                                   const HostMatrix& scale, Bound bound) {
  return compare_within(what, got, ref, normwise_magnitude(scale), bound);
}
inline Comparison compare_normwise(const char* what, const HostMatrix& got, const HostMatrix& ref,
                                   const HostMatrix& scale, double tolerance) {
  return compare_normwise(what, got, ref, scale, Bound{tolerance, 0.0});
}
/// Against a plain reference: errors in units of max |ref|.
inline Comparison compare_normwise(const char* what, const HostMatrix& got, const HostMatrix& ref,
                                   Bound bound) {
  return compare_normwise(what, got, ref, ref, bound);
}
inline Comparison compare_normwise(const char* what, const HostMatrix& got, const HostMatrix& ref,
                                   double tolerance) {
  return compare_normwise(what, got, ref, ref, Bound{tolerance, 0.0});
}
/// Against an expected value with .ref and .mag (e.g. SmoraExpected): errors
/// in units of the largest magnitude.
template <class E, class = decltype(std::declval<const E&>().mag)>
Comparison compare_normwise(const char* what, const HostMatrix& got, const E& e, Bound bound) {
  return compare_normwise(what, got, e.ref, e.mag, bound);
}

/// Index of the first element whose bytes differ, or -1 when all are equal.
template <class T>
std::int64_t first_bit_difference(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return static_cast<std::int64_t>(i);
  }
  return -1;
}

/// A value no ErrorCode has, returned when nothing was thrown.
inline constexpr auto kNoError = static_cast<rankwise::ErrorCode>(-1);

/// The code of the rankwise::error `f` throws, or kNoError. Other exceptions
/// propagate, so Catch reports them as unexpected.
template <class F>
rankwise::ErrorCode error_code_of(F&& f) {
  try {
    f();
  } catch (const rankwise::error& e) {
    return e.code();
  }
  return kNoError;
}

}  // namespace rwtest

namespace Catch {
template <>
struct StringMaker<rankwise::ErrorCode> {
  static std::string convert(rankwise::ErrorCode code) {
    switch (code) {
      case rankwise::ErrorCode::kInvalidArgument:
        return "kInvalidArgument";
      case rankwise::ErrorCode::kMemorySpace:
        return "kMemorySpace";
      case rankwise::ErrorCode::kCuda:
        return "kCuda";
      case rankwise::ErrorCode::kCublas:
        return "kCublas";
      case rankwise::ErrorCode::kIo:
        return "kIo";
      case rankwise::ErrorCode::kOutOfMemory:
        return "kOutOfMemory";
    }
    return "no rankwise::error thrown";
  }
};
}  // namespace Catch

/// RWTEST_CHECK_CLOSE(got, ref, mag, bound): CHECKs that HostMatrix `got` is
/// within Bound `bound` of `ref` in units of `mag` (see Comparison and
/// tolerance.hpp); on failure prints
/// the shapes, the error, the worst element and every INFO in scope (seeds and
/// shapes). Variadic so that template arguments (`to_host<H, T>(...)`) need no
/// extra parentheses.
#define RWTEST_CHECK_CLOSE(...)                                                                   \
  do {                                                                                            \
    const ::rwtest::Comparison rwtest_cmp_ = ::rwtest::compare_within(#__VA_ARGS__, __VA_ARGS__); \
    INFO(rwtest_cmp_);                                                                            \
    CHECK(rwtest_cmp_.rel <= rwtest_cmp_.tolerance);                                              \
  } while (false)

/// RWTEST_CHECK_NORMWISE(got, expected[, scale], bound): the normwise mode of
/// RWTEST_CHECK_CLOSE (compare_normwise): `expected` is a HostMatrix (its own
/// scale unless `scale` is given) or has .ref and .mag.
#define RWTEST_CHECK_NORMWISE(...)                             \
  do {                                                         \
    const ::rwtest::Comparison rwtest_cmp_ =                   \
        ::rwtest::compare_normwise(#__VA_ARGS__, __VA_ARGS__); \
    INFO(rwtest_cmp_);                                         \
    CHECK(rwtest_cmp_.rel <= rwtest_cmp_.tolerance);           \
  } while (false)

/// The one way a check states its context (Catch INFO): backend, storage type,
/// what is checked (a streamable expression: "shape " << sh, ...) and the seed.
#define RWTEST_CONTEXT(H, T, what, seed) RWTEST_CONTEXT_OF(H, T, what << ", seed " << seed)
/// The same for a check whose inputs are fixed (no seed to print).
#define RWTEST_CONTEXT_OF(H, T, what) \
  INFO("backend " << H::kName << ", type " << H::template type_name<T>() << ", " << what)

/// CHECKs that the statement throws a rankwise::error whose message contains
/// `text` and whose code is `code`.
#define RWTEST_CHECK_ERROR(code, text, ...)                   \
  do {                                                        \
    const auto rwtest_call_ = [&] { __VA_ARGS__; };           \
    INFO("statement: " #__VA_ARGS__);                         \
    CHECK_THROWS_WITH(rwtest_call_(), Catch::Contains(text)); \
    CHECK(::rwtest::error_code_of(rwtest_call_) == (code));   \
  } while (false)
