// Backend primitive test bodies (Kernels<Backend, T>: gemm, copy, fill,
// fill_uniform, upload/download), written once over a harness H and a storage
// type T and instantiated for every backend by RWTEST_KERNEL_TEST_CASES.
#pragma once

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <ostream>
#include <utility>
#include <vector>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/random.hpp"
#include "support/compare.hpp"
#include "support/harness_common.hpp"
#include "support/reference.hpp"
#include "support/tolerance.hpp"

namespace rwtest {
namespace kernel_cases {

using rankwise::MatrixView;
using rankwise::Op;

inline const char* op_name(Op op) { return op == Op::kNoTrans ? "N" : "T"; }

/// C (m x n) = op(A) op(B) with inner dimension k.
struct GemmShape {
  std::int64_t m, n, k;
};
inline std::ostream& operator<<(std::ostream& out, const GemmShape& s) {
  return out << "{m " << s.m << ", n " << s.n << ", k " << s.k << "}";
}

/// Awkward sizes: 1s, primes, one past a tile edge (32, 64), a long inner
/// dimension, and a few round ones.
inline const std::vector<GemmShape>& gemm_shapes() {
  static const std::vector<GemmShape> shapes = {
      {1, 1, 1},    {1, 9, 5},    {7, 1, 3},   {7, 5, 3},    {13, 17, 1},
      {33, 17, 65}, {64, 64, 64}, {5, 3, 300}, {65, 33, 17}, {31, 70, 9},
  };
  return shapes;
}

/// c = alpha op(a) op(b) + beta c for all four op pairs, several alpha/beta
/// (beta = 0 over a NaN-filled C must not propagate), contiguous and strided.
template <class H, class T>
void gemm_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 10;
  const double pad = -555.0;
  for (const GemmShape& sh : gemm_shapes()) {
    for (const Op op_a : {Op::kNoTrans, Op::kTrans}) {
      for (const Op op_b : {Op::kNoTrans, Op::kTrans}) {
        for (const auto& ab : {std::pair<double, double>{1.0, 0.0}, {1.0, 1.0}, {-0.75, 0.5}}) {
          for (const bool strided : {false, true}) {
            ++seed;
            const double alpha = ab.first, beta = ab.second;
            RWTEST_CONTEXT(H, T,
                           "shape " << sh << ", op_a " << op_name(op_a) << ", op_b "
                                    << op_name(op_b) << ", alpha " << alpha << ", beta " << beta
                                    << ", strided " << strided,
                           seed);
            // op(a) is (m x k), op(b) is (k x n); each is stored as op says.
            const HostMatrix a =
                quantize<H, T>(op_a == Op::kNoTrans ? random_matrix(sh.m, sh.k, seed * 4)
                                                    : random_matrix(sh.k, sh.m, seed * 4));
            const HostMatrix b_stored =
                quantize<H, T>(op_b == Op::kNoTrans ? random_matrix(sh.k, sh.n, seed * 4 + 1)
                                                    : random_matrix(sh.n, sh.k, seed * 4 + 1));
            const HostMatrix c0 = beta == 0.0
                                      ? HostMatrix(sh.m, sh.n, std::nan(""))
                                      : quantize<H, T>(random_matrix(sh.m, sh.n, seed * 4 + 2));
            const std::int64_t extra = strided ? 3 : 0;
            const auto da = to_device<H, T>(ctx, a, a.cols + extra, pad);
            const auto db = to_device<H, T>(ctx, b_stored, b_stored.cols + extra, pad);
            auto dc = to_device<H, T>(ctx, c0, c0.cols + extra, pad);
            K::gemm(ctx, static_cast<Acc>(alpha), da.cview(), op_a, db.cview(), op_b,
                    static_cast<Acc>(beta), dc.view());
            // One rounding to T, after accumulating k products.
            RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dc),
                               ref_gemm(alpha, a, op_a, b_stored, op_b, beta, c0),
                               ref_gemm(std::abs(alpha), abs_of(a), op_a, abs_of(b_stored), op_b,
                                        std::abs(beta), abs_of(c0)),
                               tolerance<T>(1, sh.k));
            if (strided) CHECK(padding_intact<H, T>(ctx, dc, pad));
          }
        }
      }
    }
  }
}

/// An empty inner dimension scales C by beta (beta = 0 clears a NaN C);
/// alpha = 0 does the same; an empty C is a no-op.
template <class H, class T>
void gemm_degenerate() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  const std::int64_t m = 9, n = 14;
  const std::uint64_t seed = 77;
  RWTEST_CONTEXT(H, T, "gemm, degenerate shapes", seed);
  // |c| >= 0.25: halving stays clear of half's subnormals, so it is exact.
  const HostMatrix c0 = quantize<H, T>(random_matrix(m, n, seed, 0.25, 1.0));
  const HostMatrix a = quantize<H, T>(random_matrix(m, 6, seed + 1));
  const HostMatrix b = quantize<H, T>(random_matrix(6, n, seed + 2));
  const auto da = to_device<H, T>(ctx, a);
  const auto db = to_device<H, T>(ctx, b);
  const MatrixView<const T> a_empty(nullptr, m, 0, H::Backend::kMemorySpace);
  const MatrixView<const T> a_empty_t(nullptr, 0, m, H::Backend::kMemorySpace);
  const MatrixView<const T> b_empty(nullptr, 0, n, H::Backend::kMemorySpace);

  for (const Op op_a : {Op::kNoTrans, Op::kTrans}) {
    INFO("op_a " << op_name(op_a));
    const MatrixView<const T> ae = op_a == Op::kNoTrans ? a_empty : a_empty_t;
    auto c = to_device<H, T>(ctx, HostMatrix(m, n, std::nan("")));
    K::gemm(ctx, Acc(1), ae, op_a, b_empty, Op::kNoTrans, Acc(0), c.view());
    CHECK(compare(to_host<H, T>(ctx, c), HostMatrix(m, n), "C").max_abs_err == 0.0);

    auto c1 = to_device<H, T>(ctx, c0);
    K::gemm(ctx, Acc(1), ae, op_a, b_empty, Op::kNoTrans, Acc(1), c1.view());
    CHECK(compare(to_host<H, T>(ctx, c1), c0, "C").max_abs_err == 0.0);

    auto c2 = to_device<H, T>(ctx, c0);
    K::gemm(ctx, Acc(1), ae, op_a, b_empty, Op::kNoTrans, Acc(0.5), c2.view());
    HostMatrix half = c0;
    for (double& v : half.v) v *= 0.5;
    CHECK(compare(to_host<H, T>(ctx, c2), half, "C").max_abs_err == 0.0);
  }

  auto c3 = to_device<H, T>(ctx, c0);
  K::gemm(ctx, Acc(0), da.cview(), Op::kNoTrans, db.cview(), Op::kNoTrans, Acc(-2), c3.view());
  HostMatrix twice = c0;
  for (double& v : twice.v) v *= -2.0;
  CHECK(compare(to_host<H, T>(ctx, c3), twice, "C").max_abs_err == 0.0);

  // An empty C: nothing to do, nothing read.
  CHECK_NOTHROW(K::gemm(ctx, Acc(1), MatrixView<const T>(nullptr, 0, 6, H::Backend::kMemorySpace),
                        Op::kNoTrans, db.cview(), Op::kNoTrans, Acc(0),
                        MatrixView<T>(nullptr, 0, n, H::Backend::kMemorySpace)));
}

/// Copies, plain and transposed, exact to the bit, with strided source and
/// destination whose padding stays untouched. The transposed shapes cross the
/// 32 x 32 tile edges of the GPU transpose.
template <class H, class T>
void copy_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  typename H::Ctx ctx;
  const double pad = 321.0;
  std::uint64_t seed = 20;
  const std::vector<std::pair<std::int64_t, std::int64_t>> shapes = {
      {1, 1}, {1, 37}, {37, 1}, {31, 33}, {32, 32}, {33, 65}, {70, 45}, {64, 96}, {5, 300}};
  for (const auto& shape : shapes) {
    for (const Op op : {Op::kNoTrans, Op::kTrans}) {
      for (const bool strided : {false, true}) {
        ++seed;
        RWTEST_CONTEXT(H, T,
                       "dst " << shape.first << " x " << shape.second << ", op " << op_name(op)
                              << ", strided " << strided,
                       seed);
        const HostMatrix want = quantize<H, T>(random_matrix(shape.first, shape.second, seed));
        const HostMatrix src = op == Op::kNoTrans ? want : transpose(want);
        const auto dsrc = to_device<H, T>(ctx, src, src.cols + (strided ? 5 : 0), pad);
        auto ddst = to_device<H, T>(ctx, HostMatrix(want.rows, want.cols, std::nan("")),
                                    want.cols + (strided ? 2 : 0), pad);
        K::copy(ctx, dsrc.cview(), op, ddst.view());
        CHECK(compare(to_host<H, T>(ctx, ddst), want, "dst").max_abs_err == 0.0);
        if (strided) CHECK(padding_intact<H, T>(ctx, ddst, pad));
      }
    }
  }
}

/// fill sets every element and no padding; fill_uniform gives element (i, j)
/// the bits of uniform(seed, i * cols + j) rounded to T, whatever the stride.
template <class H, class T>
void fills() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  typename H::Ctx ctx;
  const double pad = 99.0;
  for (const auto& shape :
       std::vector<std::pair<std::int64_t, std::int64_t>>{{1, 1}, {3, 7}, {33, 65}, {300, 1000}}) {
    for (const bool strided : {false, true}) {
      const std::int64_t rows = shape.first, cols = shape.second;
      const std::uint64_t seed = 0xC0FFEEull + static_cast<std::uint64_t>(rows);
      RWTEST_CONTEXT(H, T, "shape " << rows << " x " << cols << ", strided " << strided, seed);
      auto m = to_device<H, T>(ctx, HostMatrix(rows, cols), cols + (strided ? 3 : 0), pad);
      K::fill(ctx, m.view(), -1.25);
      CHECK(compare(to_host<H, T>(ctx, m), HostMatrix(rows, cols, -1.25), "m").max_abs_err == 0.0);
      if (strided) CHECK(padding_intact<H, T>(ctx, m, pad));

      K::fill_uniform(ctx, m.view(), -0.3, 0.7, seed);
      std::vector<T> want(static_cast<std::size_t>(rows * cols));
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t j = 0; j < cols; ++j)
          want[static_cast<std::size_t>(i * cols + j)] = H::template from_double<T>(
              rankwise::uniform(seed, static_cast<std::uint64_t>(i * cols + j), -0.3, 0.7));
      CHECK(first_bit_difference(to_host_raw<H, T>(ctx, m.cview()), want) == -1);
      if (strided) CHECK(padding_intact<H, T>(ctx, m, pad));
    }
  }
}

}  // namespace kernel_cases
}  // namespace rwtest

/// Instantiates every primitive case for HARNESS and the storage types that
/// follow, tagged TAG.
#define RWTEST_KERNEL_TEST_CASES(HARNESS, TAG, ...)                                                \
  TEMPLATE_TEST_CASE("kernels: gemm matches the double reference", "[kernels]" TAG, __VA_ARGS__) { \
    ::rwtest::kernel_cases::gemm_matches_reference<HARNESS, TestType>();                           \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: gemm with empty inner dimension, alpha 0, empty C",                 \
                     "[kernels]" TAG, __VA_ARGS__) {                                               \
    ::rwtest::kernel_cases::gemm_degenerate<HARNESS, TestType>();                                  \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: copy and transposed copy", "[kernels]" TAG, __VA_ARGS__) {          \
    ::rwtest::kernel_cases::copy_matches_reference<HARNESS, TestType>();                           \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: fill and fill_uniform", "[kernels]" TAG, __VA_ARGS__) {             \
    ::rwtest::kernel_cases::fills<HARNESS, TestType>();                                            \
  }
