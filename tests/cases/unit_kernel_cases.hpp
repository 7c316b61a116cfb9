// Backend primitive test bodies for the rank-unit, router and optimiser
// primitives of Kernels<Backend, T> (rankwise/backend/kernels_decl.hpp), each
// tested alone against a plain-loop double reference over one case table,
// written once over a harness H and a storage type T and instantiated for
// every backend by RWTEST_UNIT_KERNEL_TEST_CASES (the pattern of
// kernel_cases.hpp, which covers gemm, copy, fill and the transfers).
//
// Error measure: support/compare.hpp's, element by element in units of the
// magnitude (the reference run on |inputs|), held to tolerance.hpp's bounds.
// Results a primitive keeps in the accumulator type Acc (gather_dot's out,
// gemm_acc's c, Adam's moments, the routing) pay u_Acc per rounding where a
// store into T pays u_T: acc_tolerance below. Integer results (indices,
// counts) and data movement (gather_cols) are compared exactly.
//
// Inputs that the kernels take on trust (unit and expert indices, except in
// check_units) are always valid: the CPU backend does not check them (its
// callers scan first, core/unit_index.hpp), so a case with a bad index would
// be undefined behaviour there rather than a test.
#pragma once

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <ostream>
#include <random>
#include <utility>
#include <vector>

#include "cases/kernel_cases.hpp"
#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/adam_rule.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/numeric.hpp"
#include "rankwise/core/router_config.hpp"
#include "rankwise/core/routing.hpp"
#include "support/compare.hpp"
#include "support/harness_common.hpp"
#include "support/reference.hpp"
#include "support/smora_io.hpp"
#include "support/tolerance.hpp"

namespace rwtest {
namespace unit_kernel_cases {

using rankwise::MatrixView;
using rankwise::Op;
using rankwise::RoutingRule;

// ---------------------------------------------------------------------------
// Tolerances
// ---------------------------------------------------------------------------

/// tolerance<T>(roundings, k) (tolerance.hpp: `roundings` stores into T after
/// accumulations of k terms in all) plus `acc_roundings` roundings in the
/// accumulator type Acc, each costing u_Acc of the result's magnitude as a
/// store into T costs u_T: a result kept in Acc (gemm_acc, gather_dot) or the
/// fixed chain of operations of an element-wise rule (Adam, the routing
/// backward), counted along its longest path. With T = Acc (every CPU type)
/// it is tolerance<T>(roundings + acc_roundings, k).
template <class T>
Bound acc_tolerance(int roundings, int acc_roundings, std::int64_t k) {
  using Acc = rankwise::accumulator_t<T>;
  Bound b = tolerance<T>(roundings, k);
  b.rel += acc_roundings * Tolerance<Acc>::kUnitRoundoff;
  b.abs += acc_roundings * Tolerance<Acc>::kUnderflow;
  return b;
}

/// Roundings of route_token's scores in Acc: the shift l - max (|l| <= 2, so
/// up to 4 u of the exponent), exp (CUDA's expf: 2 ulp, up to 4 u), the
/// division, and sigmoid's 1 + e; the softmax sum over E comes on top as an
/// accumulation of E terms.
inline constexpr int kScoreRoundings = 16;
/// Gates: a score's error (or z = s0 + b's), the normaliser's (kc selected
/// values, whose own scores carry kScoreRoundings), its clamp division and
/// the product; accumulation of E + kc terms on top.
inline constexpr int kGateRoundings = 2 * kScoreRoundings + 8;
/// adam_update's longest path (clip: sqrt, + 1e-6, division; g = grad clip;
/// m, v: 2 products and a sum each; the bias corrections; sqrt; + eps; the
/// ratio; weight decay; lr; the update): 19 roundings, counted with room.
inline constexpr int kAdamRoundings = 24;

/// route_token_backward's longest path in Acc: the units' dgates summed per
/// choice (u), the normaliser and the weighted sum (2 kc), the rescaled dv (5
/// operations), the per-expert sums (kc), and through the score function
/// (sigmoid: 3; softmax: the dot over E, 2 E, and 2).
inline int route_backward_roundings(const RoutingRule& rule) {
  return rule.units_per_choice + 3 * rule.choices_per_token + 8 +
         (rule.score == rankwise::ScoreFunction::kSoftmax ? 2 * rule.num_experts : 0);
}

// ---------------------------------------------------------------------------
// Index matrices (int32) in backend memory
// ---------------------------------------------------------------------------

/// How a unit (index) view is laid out: packed rows, rows ld = cols + 3 apart
/// (with padding between them), or one row of indices that every token reads
/// (ld = 0, MoS and LoRA-LEGO routings). Float views of the same case are
/// strided whenever the unit view is not contiguous.
enum class Layout { kContiguous, kStrided, kBroadcast };

inline const char* layout_name(Layout l) {
  return l == Layout::kContiguous ? "contiguous" : l == Layout::kStrided ? "strided" : "broadcast";
}

inline const std::vector<Layout>& all_layouts() {
  static const std::vector<Layout> layouts = {Layout::kContiguous, Layout::kStrided,
                                              Layout::kBroadcast};
  return layouts;
}

/// Extra elements per row of the float views of a case.
inline std::int64_t data_padding(Layout l) { return l == Layout::kContiguous ? 0 : 3; }

/// An int32 index matrix on the host, rows x cols, row-major; a broadcast one
/// stores a single row that every row reads.
struct HostIndices {
  std::int64_t rows = 0, cols = 0;
  bool broadcast = false;
  std::vector<std::int32_t> v;  // stored_rows() x cols

  HostIndices() = default;
  HostIndices(std::int64_t rows_, std::int64_t cols_, bool broadcast_, std::int32_t fill = 0)
      : rows(rows_),
        cols(cols_),
        broadcast(broadcast_),
        v(static_cast<std::size_t>((broadcast_ ? 1 : rows_) * cols_), fill) {}

  std::int64_t stored_rows() const { return broadcast ? 1 : rows; }
  std::int32_t operator()(std::int64_t i, std::int64_t j) const {
    return v[static_cast<std::size_t>((broadcast ? 0 : i) * cols + j)];
  }
  std::int32_t& at(std::int64_t i, std::int64_t j) {
    return v[static_cast<std::size_t>((broadcast ? 0 : i) * cols + j)];
  }
};

/// An int32 matrix in H's memory: the view (rows x cols, leading dimension
/// ld, 0 for broadcast) over an allocation of stored_rows x stored_ld.
template <class H>
struct DeviceIndices {
  using Backend = typename H::Backend;
  std::int64_t rows = 0, cols = 0, ld = 0;
  std::int64_t stored_rows = 0, stored_ld = 0;
  rankwise::Buffer<Backend, std::int32_t> buf;

  DeviceIndices(std::int64_t rows_, std::int64_t cols_, std::int64_t ld_, std::int64_t stored_rows_,
                std::int64_t stored_ld_)
      : rows(rows_),
        cols(cols_),
        ld(ld_),
        stored_rows(stored_rows_),
        stored_ld(stored_ld_),
        buf(stored_rows_ * stored_ld_) {}

  MatrixView<std::int32_t> view() {
    return MatrixView<std::int32_t>(buf.data(), rows, cols, Backend::kMemorySpace, ld);
  }
  MatrixView<const std::int32_t> cview() const {
    return MatrixView<const std::int32_t>(buf.data(), rows, cols, Backend::kMemorySpace, ld);
  }
  /// The whole allocation as a contiguous stored_rows x stored_ld matrix.
  MatrixView<std::int32_t> storage() {
    return MatrixView<std::int32_t>(buf.data(), stored_rows, stored_ld, Backend::kMemorySpace,
                                    stored_ld);
  }
};

/// Uploads `u` through Kernels<Backend, T>::upload_indices, laid out as
/// `layout` says (u.broadcast must match kBroadcast); padding holds `pad`.
template <class H, class T>
DeviceIndices<H> indices_to_device(typename H::Ctx& ctx, const HostIndices& u, Layout layout,
                                   std::int32_t pad = 0) {
  const std::int64_t stored_ld = u.cols + (layout == Layout::kStrided ? 3 : 0);
  const std::int64_t ld = layout == Layout::kBroadcast ? 0 : stored_ld;
  DeviceIndices<H> d(u.rows, u.cols, ld, u.stored_rows(), stored_ld);
  std::vector<std::int32_t> host(static_cast<std::size_t>(d.stored_rows * stored_ld), pad);
  for (std::int64_t i = 0; i < d.stored_rows; ++i)
    for (std::int64_t j = 0; j < u.cols; ++j)
      host[static_cast<std::size_t>(i * stored_ld + j)] =
          u.v[static_cast<std::size_t>(i * u.cols + j)];
  if (!host.empty()) {
    rankwise::Kernels<typename H::Backend, T>::upload_indices(ctx, host.data(), d.storage());
  }
  return d;
}

/// The whole allocation of `d` (stored_rows x stored_ld, padding included).
template <class H>
std::vector<std::int32_t> indices_storage_to_host(typename H::Ctx& ctx, const DeviceIndices<H>& d) {
  std::vector<std::int32_t> all(static_cast<std::size_t>(d.stored_rows * d.stored_ld));
  rankwise::Memory<typename H::Backend>::download(ctx, all.data(), d.buf.data(),
                                                  sizeof(std::int32_t) * all.size());
  return all;
}

/// The stored rows of `d`'s view (rows x cols, or 1 x cols when broadcast), packed.
template <class H>
std::vector<std::int32_t> indices_to_host(typename H::Ctx& ctx, const DeviceIndices<H>& d) {
  const std::vector<std::int32_t> all = indices_storage_to_host<H>(ctx, d);
  std::vector<std::int32_t> out(static_cast<std::size_t>(d.stored_rows * d.cols));
  for (std::int64_t i = 0; i < d.stored_rows; ++i)
    for (std::int64_t j = 0; j < d.cols; ++j)
      out[static_cast<std::size_t>(i * d.cols + j)] =
          all[static_cast<std::size_t>(i * d.stored_ld + j)];
  return out;
}

/// True when every element of `d`'s allocation past its view's columns holds `pad`.
template <class H>
bool index_padding_intact(typename H::Ctx& ctx, const DeviceIndices<H>& d, std::int32_t pad) {
  const std::vector<std::int32_t> all = indices_storage_to_host<H>(ctx, d);
  for (std::int64_t i = 0; i < d.stored_rows; ++i)
    for (std::int64_t j = d.cols; j < d.stored_ld; ++j)
      if (all[static_cast<std::size_t>(i * d.stored_ld + j)] != pad) return false;
  return true;
}

/// A device int32 matrix of rows x cols filled with `fill` (outputs whose
/// old contents must not matter, and their padding).
template <class H, class T>
DeviceIndices<H> index_output(typename H::Ctx& ctx, std::int64_t rows, std::int64_t cols,
                              bool strided, std::int32_t fill) {
  return indices_to_device<H, T>(ctx, HostIndices(rows, cols, false, fill),
                                 strided ? Layout::kStrided : Layout::kContiguous, fill);
}

inline double uniform_draw(std::mt19937_64& gen, double lo, double hi) {
  return lo + (hi - lo) * (static_cast<double>(gen() >> 11) * 0x1.0p-53);
}

inline std::int32_t index_draw(std::mt19937_64& gen, std::int64_t count) {
  return static_cast<std::int32_t>(gen() % static_cast<std::uint64_t>(count));
}

// ---------------------------------------------------------------------------
// Rank-unit cases: gather_dot, gather_axpy, scatter_axpy, densify, gather_cols
// ---------------------------------------------------------------------------

/// n tokens, k units per token out of r, rows of d.
struct UnitShape {
  std::int64_t n, k, r, d;
};
inline std::ostream& operator<<(std::ostream& out, const UnitShape& s) {
  return out << "{n " << s.n << ", k " << s.k << ", r " << s.r << ", d " << s.d << "}";
}

/// No token; one token; k = 1; k > r (repeats forced); k = 17 (past the CPU's
/// blocks of 16 unit rows); tokens on either side of the CPU small-batch and
/// broadcast bounds (8/9, 16/17, 24/25); d = 1, 3, 300, primes and one past
/// a warp (33) and a CUDA block of columns (257); n k past the 256 pairs the
/// CUDA scatter stages at a time (300 x 9).
inline const std::vector<UnitShape>& unit_shapes() {
  static const std::vector<UnitShape> shapes = {
      {0, 3, 8, 5},    {1, 1, 1, 1},     {1, 1, 4, 300}, {1, 8, 16, 3},    {2, 5, 7, 37},
      {7, 3, 11, 13},  {8, 2, 5, 17},    {9, 4, 9, 33},  {9, 3, 5, 300},   {16, 3, 8, 64},
      {17, 6, 13, 31}, {24, 2, 6, 257},  {25, 7, 29, 3}, {33, 17, 64, 40}, {5, 20, 6, 7},
      {70, 1, 3, 1},   {300, 9, 64, 11},
  };
  return shapes;
}

/// Units of a case: uniform in [0, r), with every third token's last slot a
/// repeat of its first (when k >= 2), so repeated units within a token occur
/// on every layout; a broadcast routing is one such row.
inline HostIndices random_units(const UnitShape& s, Layout layout, std::uint64_t seed) {
  HostIndices u(s.n, s.k, layout == Layout::kBroadcast);
  std::mt19937_64 gen(seed);
  for (std::int64_t i = 0; i < u.stored_rows(); ++i) {
    for (std::int64_t j = 0; j < s.k; ++j) u.at(i, j) = index_draw(gen, s.r);
    if (s.k >= 2 && i % 3 == 0) u.at(i, s.k - 1) = u.at(i, 0);
  }
  return u;
}

/// The most (token, slot) pairs that name one unit: the longest sum scatter_axpy forms.
inline std::int64_t max_unit_count(const HostIndices& u, std::int64_t r) {
  std::vector<std::int64_t> count(static_cast<std::size_t>(r), 0);
  std::int64_t most = 0;
  for (std::int64_t i = 0; i < u.rows; ++i)
    for (std::int64_t j = 0; j < u.cols; ++j)
      most = std::max(most, ++count[static_cast<std::size_t>(u(i, j))]);
  return most;
}

/// out[t][j] = alpha w[units[t][j]] · x[t] + beta out0[t][j]; beta = 0 ignores out0.
inline HostMatrix ref_gather_dot(double alpha, const HostMatrix& x, const HostMatrix& w,
                                 const HostIndices& u, double beta, const HostMatrix& out0) {
  HostMatrix out(u.rows, u.cols);
  for (std::int64_t t = 0; t < u.rows; ++t) {
    for (std::int64_t j = 0; j < u.cols; ++j) {
      double acc = 0.0;
      for (std::int64_t c = 0; c < x.cols; ++c) acc += w(u(t, j), c) * x(t, c);
      out(t, j) = alpha * acc + (beta == 0.0 ? 0.0 : beta * out0(t, j));
    }
  }
  return out;
}

/// y[t] = y0[t] + alpha Σ_j coef[t][j] w[units[t][j]].
inline HostMatrix ref_gather_axpy(double alpha, const HostMatrix& coef, const HostMatrix& w,
                                  const HostIndices& u, const HostMatrix& y0) {
  HostMatrix y = y0;
  for (std::int64_t t = 0; t < u.rows; ++t) {
    for (std::int64_t c = 0; c < y.cols; ++c) {
      double acc = 0.0;
      for (std::int64_t j = 0; j < u.cols; ++j) acc += coef(t, j) * w(u(t, j), c);
      y(t, c) += alpha * acc;
    }
  }
  return y;
}

/// out[i] = beta out0[i] + alpha Σ_{(t, j): units[t][j] = i} coef[t][j] src[t].
inline HostMatrix ref_scatter_axpy(double alpha, const HostMatrix& coef, const HostMatrix& src,
                                   const HostIndices& u, double beta, const HostMatrix& out0) {
  HostMatrix out(out0.rows, out0.cols);
  for (std::int64_t i = 0; i < out.rows; ++i)
    for (std::int64_t c = 0; c < out.cols; ++c) out(i, c) = beta == 0.0 ? 0.0 : beta * out0(i, c);
  for (std::int64_t t = 0; t < u.rows; ++t)
    for (std::int64_t j = 0; j < u.cols; ++j)
      for (std::int64_t c = 0; c < out.cols; ++c) out(u(t, j), c) += alpha * coef(t, j) * src(t, c);
  return out;
}

/// dense (n x r) = 0, then dense[t][units[t][j]] += values[t][j].
inline HostMatrix ref_densify(const HostIndices& u, const HostMatrix& values, std::int64_t r) {
  HostMatrix dense(u.rows, r);
  for (std::int64_t t = 0; t < u.rows; ++t)
    for (std::int64_t j = 0; j < u.cols; ++j) dense(t, u(t, j)) += values(t, j);
  return dense;
}

/// out[t][j] = dense[t][units[t][j]].
inline HostMatrix ref_gather_cols(const HostMatrix& dense, const HostIndices& u) {
  HostMatrix out(u.rows, u.cols);
  for (std::int64_t t = 0; t < u.rows; ++t)
    for (std::int64_t j = 0; j < u.cols; ++j) out(t, j) = dense(t, u(t, j));
  return out;
}

/// out = alpha w[units] · x + beta out, out in Acc: beta = 0 over a NaN out,
/// nonzero beta, every layout.
template <class H, class T>
void gather_dot_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 1000;
  const double pad = -555.0;
  for (const UnitShape& sh : unit_shapes()) {
    for (const Layout layout : all_layouts()) {
      for (const auto& ab : {std::pair<double, double>{1.0, 0.0}, {-0.75, 0.5}}) {
        ++seed;
        const double alpha = ab.first, beta = ab.second;
        RWTEST_CONTEXT(H, T,
                       "shape " << sh << ", layout " << layout_name(layout) << ", alpha " << alpha
                                << ", beta " << beta,
                       seed);
        const HostIndices units = random_units(sh, layout, seed * 8);
        const HostMatrix x = quantize<H, T>(random_matrix(sh.n, sh.d, seed * 8 + 1));
        const HostMatrix w = quantize<H, T>(random_matrix(sh.r, sh.d, seed * 8 + 2));
        const HostMatrix out0 = beta == 0.0
                                    ? HostMatrix(sh.n, sh.k, std::nan(""))
                                    : quantize<H, Acc>(random_matrix(sh.n, sh.k, seed * 8 + 3));
        const std::int64_t extra = data_padding(layout);
        const auto dx = to_device<H, T>(ctx, x, x.cols + extra, pad);
        const auto dw = to_device<H, T>(ctx, w, w.cols + extra, pad);
        const auto du = indices_to_device<H, T>(ctx, units, layout);
        auto dout = to_device<H, Acc>(ctx, out0, out0.cols + extra, pad);
        K::gather_dot(ctx, static_cast<Acc>(alpha), dx.cview(), dw.cview(), du.cview(), dout.view(),
                      static_cast<Acc>(beta));
        // Accumulated over d in Acc, stored once in Acc.
        RWTEST_CHECK_CLOSE(to_host<H, Acc>(ctx, dout),
                           ref_gather_dot(alpha, x, w, units, beta, out0),
                           ref_gather_dot(std::abs(alpha), abs_of(x), abs_of(w), units,
                                          std::abs(beta), abs_of(out0)),
                           acc_tolerance<T>(0, 1, sh.d));
        if (extra > 0) CHECK(padding_intact<H, Acc>(ctx, dout, pad));
      }
    }
  }
}

/// y += alpha Σ_j coef[j] w[units[j]], y in T.
template <class H, class T>
void gather_axpy_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 2000;
  const double pad = -555.0;
  for (const UnitShape& sh : unit_shapes()) {
    for (const Layout layout : all_layouts()) {
      for (const double alpha : {1.0, -0.75}) {
        ++seed;
        RWTEST_CONTEXT(H, T,
                       "shape " << sh << ", layout " << layout_name(layout) << ", alpha " << alpha,
                       seed);
        const HostIndices units = random_units(sh, layout, seed * 8);
        const HostMatrix coef = quantize<H, Acc>(random_matrix(sh.n, sh.k, seed * 8 + 1));
        const HostMatrix w = quantize<H, T>(random_matrix(sh.r, sh.d, seed * 8 + 2));
        const HostMatrix y0 = quantize<H, T>(random_matrix(sh.n, sh.d, seed * 8 + 3));
        const std::int64_t extra = data_padding(layout);
        const auto dcoef = to_device<H, Acc>(ctx, coef, coef.cols + extra, pad);
        const auto dw = to_device<H, T>(ctx, w, w.cols + extra, pad);
        const auto du = indices_to_device<H, T>(ctx, units, layout);
        auto dy = to_device<H, T>(ctx, y0, y0.cols + extra, pad);
        K::gather_axpy(ctx, static_cast<Acc>(alpha), dcoef.cview(), dw.cview(), du.cview(),
                       dy.view());
        // k products plus y, one rounding to T (the CPU also rounds alpha coef first).
        RWTEST_CHECK_CLOSE(
            to_host<H, T>(ctx, dy), ref_gather_axpy(alpha, coef, w, units, y0),
            ref_gather_axpy(std::abs(alpha), abs_of(coef), abs_of(w), units, abs_of(y0)),
            tolerance<T>(1, sh.k + 1));
        if (extra > 0) CHECK(padding_intact<H, T>(ctx, dy, pad));
      }
    }
  }
}

/// out = beta out + alpha Σ coef src over the (token, slot) pairs of each
/// unit, out (r x d) in T: repeated units in a token add up, beta = 0 over a
/// NaN out, and a second run from the same out gives the same bits.
template <class H, class T>
void scatter_axpy_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 3000;
  const double pad = -555.0;
  for (const UnitShape& sh : unit_shapes()) {
    for (const Layout layout : all_layouts()) {
      for (const auto& ab : {std::pair<double, double>{1.0, 0.0}, {-0.75, 0.5}, {0.5, 1.0}}) {
        ++seed;
        const double alpha = ab.first, beta = ab.second;
        RWTEST_CONTEXT(H, T,
                       "shape " << sh << ", layout " << layout_name(layout) << ", alpha " << alpha
                                << ", beta " << beta,
                       seed);
        const HostIndices units = random_units(sh, layout, seed * 8);
        const HostMatrix coef = quantize<H, Acc>(random_matrix(sh.n, sh.k, seed * 8 + 1));
        const HostMatrix src = quantize<H, T>(random_matrix(sh.n, sh.d, seed * 8 + 2));
        const HostMatrix out0 = beta == 0.0
                                    ? HostMatrix(sh.r, sh.d, std::nan(""))
                                    : quantize<H, T>(random_matrix(sh.r, sh.d, seed * 8 + 3));
        const std::int64_t extra = data_padding(layout);
        const auto dcoef = to_device<H, Acc>(ctx, coef, coef.cols + extra, pad);
        const auto dsrc = to_device<H, T>(ctx, src, src.cols + extra, pad);
        const auto du = indices_to_device<H, T>(ctx, units, layout);
        auto dout = to_device<H, T>(ctx, out0, out0.cols + extra, pad);
        K::scatter_axpy(ctx, static_cast<Acc>(alpha), dcoef.cview(), dsrc.cview(), du.cview(),
                        static_cast<Acc>(beta), dout.view());
        // beta out is stored in T first (CPU; CUDA's broadcast path), then the
        // sum of each unit's pairs is added and stored: two roundings.
        RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dout),
                           ref_scatter_axpy(alpha, coef, src, units, beta, out0),
                           ref_scatter_axpy(std::abs(alpha), abs_of(coef), abs_of(src), units,
                                            std::abs(beta), abs_of(out0)),
                           tolerance<T>(2, max_unit_count(units, sh.r) + 1));
        if (extra > 0) CHECK(padding_intact<H, T>(ctx, dout, pad));

        auto again = to_device<H, T>(ctx, out0, out0.cols + extra, pad);
        K::scatter_axpy(ctx, static_cast<Acc>(alpha), dcoef.cview(), dsrc.cview(), du.cview(),
                        static_cast<Acc>(beta), again.view());
        CHECK(first_bit_difference(to_host_raw<H, T>(ctx, again.cview()),
                                   to_host_raw<H, T>(ctx, dout.cview())) == -1);
      }
    }
  }
}

/// dense (n x r, Acc) = 0 over a NaN dense, then each slot's value added at
/// its unit: repeated units add up.
template <class H, class T>
void densify_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 4000;
  const double pad = -555.0;
  for (const UnitShape& sh : unit_shapes()) {
    for (const Layout layout : all_layouts()) {
      ++seed;
      RWTEST_CONTEXT(H, T, "shape " << sh << ", layout " << layout_name(layout), seed);
      const HostIndices units = random_units(sh, layout, seed * 8);
      const HostMatrix values = quantize<H, Acc>(random_matrix(sh.n, sh.k, seed * 8 + 1));
      const std::int64_t extra = data_padding(layout);
      const auto dvalues = to_device<H, Acc>(ctx, values, values.cols + extra, pad);
      const auto du = indices_to_device<H, T>(ctx, units, layout);
      auto dense = to_device<H, Acc>(ctx, HostMatrix(sh.n, sh.r, std::nan("")), sh.r + extra, pad);
      K::densify(ctx, du.cview(), dvalues.cview(), dense.view());
      // Sums of at most k values in Acc (exact where a token's units differ).
      RWTEST_CHECK_CLOSE(to_host<H, Acc>(ctx, dense), ref_densify(units, values, sh.r),
                         ref_densify(units, abs_of(values), sh.r), tolerance<Acc>(0, sh.k));
      if (extra > 0) CHECK(padding_intact<H, Acc>(ctx, dense, pad));
    }
  }
}

/// out[t][j] = dense[t][units[t][j]] into Acc, exactly: dense in T
/// (Kernels<Backend, T>) and dense in Acc (Kernels<Backend, Acc>, as the dense
/// backward calls it).
template <class H, class T>
void gather_cols_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  using KA = rankwise::Kernels<typename H::Backend, Acc>;
  typename H::Ctx ctx;
  std::uint64_t seed = 5000;
  const double pad = -555.0;
  for (const UnitShape& sh : unit_shapes()) {
    for (const Layout layout : all_layouts()) {
      ++seed;
      RWTEST_CONTEXT(H, T, "shape " << sh << ", layout " << layout_name(layout), seed);
      const HostIndices units = random_units(sh, layout, seed * 8);
      const std::int64_t extra = data_padding(layout);
      const auto du = indices_to_device<H, T>(ctx, units, layout);
      {
        INFO("dense in T");
        const HostMatrix dense = quantize<H, T>(random_matrix(sh.n, sh.r, seed * 8 + 1));
        const auto ddense = to_device<H, T>(ctx, dense, dense.cols + extra, pad);
        auto out = to_device<H, Acc>(ctx, HostMatrix(sh.n, sh.k, std::nan("")), sh.k + extra, pad);
        K::gather_cols(ctx, ddense.cview(), du.cview(), out.view());
        CHECK(
            compare(to_host<H, Acc>(ctx, out), ref_gather_cols(dense, units), "out").max_abs_err ==
            0.0);
        if (extra > 0) CHECK(padding_intact<H, Acc>(ctx, out, pad));
      }
      {
        INFO("dense in Acc");
        const HostMatrix dense = quantize<H, Acc>(random_matrix(sh.n, sh.r, seed * 8 + 2));
        const auto ddense = to_device<H, Acc>(ctx, dense, dense.cols + extra, pad);
        auto out = to_device<H, Acc>(ctx, HostMatrix(sh.n, sh.k, std::nan("")), sh.k + extra, pad);
        KA::gather_cols(ctx, ddense.cview(), du.cview(), out.view());
        CHECK(
            compare(to_host<H, Acc>(ctx, out), ref_gather_cols(dense, units), "out").max_abs_err ==
            0.0);
        if (extra > 0) CHECK(padding_intact<H, Acc>(ctx, out, pad));
      }
    }
  }
}

// The multi-adapter pool's token moves: take_rows, add_rows (distinct rows),
// and remap_units (local unit indices to pool ones).

/// m distinct rows of [0, count), in shuffled order.
inline HostIndices distinct_rows(std::int64_t m, std::int64_t count, std::uint64_t seed) {
  std::vector<std::int32_t> all(static_cast<std::size_t>(count));
  for (std::int64_t i = 0; i < count; ++i)
    all[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
  std::mt19937_64 gen(seed);
  std::shuffle(all.begin(), all.end(), gen);
  HostIndices rows(m, 1, false);
  for (std::int64_t i = 0; i < m; ++i) rows.at(i, 0) = all[static_cast<std::size_t>(i)];
  return rows;
}

template <class H, class T>
void take_and_add_rows_match_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  typename H::Ctx ctx;
  std::uint64_t seed = 5500;
  const double pad = -555.0;
  for (const auto& md : std::vector<std::pair<std::int64_t, std::int64_t>>{
           {0, 5}, {1, 1}, {1, 300}, {7, 3}, {33, 37}, {300, 257}}) {
    for (const Layout layout : {Layout::kContiguous, Layout::kStrided}) {
      ++seed;
      const std::int64_t m = md.first, d = md.second, count = m + 4, extra = data_padding(layout);
      RWTEST_CONTEXT(H, T, "m " << m << ", d " << d << ", " << layout_name(layout), seed);
      const HostIndices rows = distinct_rows(m, count, seed);
      const auto drows = indices_to_device<H, T>(ctx, rows, layout);
      const HostMatrix src = quantize<H, T>(random_matrix(count, d, seed * 4));
      const auto dsrc = to_device<H, T>(ctx, src, d + extra, pad);
      auto taken = to_device<H, T>(ctx, HostMatrix(m, d, std::nan("")), d + extra, pad);
      K::take_rows(ctx, dsrc.cview(), drows.cview(), taken.view());
      HostMatrix want(m, d);
      for (std::int64_t i = 0; i < m; ++i)
        for (std::int64_t c = 0; c < d; ++c) want(i, c) = src(rows(i, 0), c);
      CHECK(compare(to_host<H, T>(ctx, taken), want, "taken").max_abs_err == 0.0);
      if (extra > 0) CHECK(padding_intact<H, T>(ctx, taken, pad));

      const HostMatrix base = quantize<H, T>(random_matrix(count, d, seed * 4 + 1));
      const HostMatrix inc = quantize<H, T>(random_matrix(m, d, seed * 4 + 2));
      auto dbase = to_device<H, T>(ctx, base, d + extra, pad);
      const auto dinc = to_device<H, T>(ctx, inc, d + extra, pad);
      K::add_rows(ctx, dinc.cview(), drows.cview(), dbase.view());
      HostMatrix sum = base;
      for (std::int64_t i = 0; i < m; ++i)
        for (std::int64_t c = 0; c < d; ++c) sum(rows(i, 0), c) += inc(i, c);
      // One rounding of each sum to T; the rows not named stay as they were.
      RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dbase), sum, abs_of(sum), tolerance<T>(1, 1));
      const HostMatrix after = to_host<H, T>(ctx, dbase);
      for (std::int64_t r = 0; r < count; ++r) {
        bool named = false;
        for (std::int64_t i = 0; i < m; ++i) named = named || rows(i, 0) == r;
        if (named) continue;
        for (std::int64_t c = 0; c < d; ++c) CHECK(after(r, c) == base(r, c));
      }
      if (extra > 0) CHECK(padding_intact<H, T>(ctx, dbase, pad));
    }
  }
}

template <class H, class T>
void remap_units_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  typename H::Ctx ctx;
  std::uint64_t seed = 5700;
  for (const UnitShape& sh : unit_shapes()) {
    for (const Layout layout : all_layouts()) {
      ++seed;
      RWTEST_CONTEXT(H, T, "shape " << sh << ", layout " << layout_name(layout), seed);
      HostIndices table(1, sh.r, false);
      std::mt19937_64 gen(seed);
      for (std::int64_t j = 0; j < sh.r; ++j) table.at(0, j) = index_draw(gen, 100000);
      const HostIndices units = random_units(sh, layout, seed * 8);
      const auto dtable = indices_to_device<H, T>(ctx, table, Layout::kContiguous);
      const auto du = indices_to_device<H, T>(ctx, units, layout);
      auto out = index_output<H, T>(ctx, sh.n, sh.k, layout == Layout::kStrided, -9);
      K::remap_units(ctx, dtable.cview(), du.cview(), out.view());
      const std::vector<std::int32_t> got = indices_to_host<H>(ctx, out);
      std::int64_t wrong = 0;
      for (std::int64_t t = 0; t < sh.n; ++t)
        for (std::int64_t j = 0; j < sh.k; ++j)
          wrong += got[static_cast<std::size_t>(t * sh.k + j)] != table(0, units(t, j));
      CHECK(wrong == 0);
      if (layout == Layout::kStrided) CHECK(index_padding_intact<H>(ctx, out, -9));
    }
  }
}

// ---------------------------------------------------------------------------
// Element-wise and reduction cases: hadamard, scale_by, sum_rows, sum_squares
// ---------------------------------------------------------------------------

/// Empty, 1 x 1, a column, primes, past a warp and a CUDA block, a long row.
inline const std::vector<std::pair<std::int64_t, std::int64_t>>& elementwise_shapes() {
  static const std::vector<std::pair<std::int64_t, std::int64_t>> shapes = {
      {0, 4}, {1, 1}, {3, 7}, {9, 1}, {33, 65}, {300, 17}, {5, 300}, {1, 1025},
  };
  return shapes;
}

/// out = a ⊙ b in Acc, over a NaN out; a, b and out with different strides.
template <class H, class T>
void hadamard_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 6000;
  const double pad = -555.0;
  for (const auto& shape : elementwise_shapes()) {
    for (const bool strided : {false, true}) {
      ++seed;
      const std::int64_t rows = shape.first, cols = shape.second;
      RWTEST_CONTEXT(H, T, "shape " << rows << " x " << cols << ", strided " << strided, seed);
      const HostMatrix a = quantize<H, Acc>(random_matrix(rows, cols, seed * 4));
      const HostMatrix b = quantize<H, Acc>(random_matrix(rows, cols, seed * 4 + 1, -2.0, 2.0));
      HostMatrix want(rows, cols);
      for (std::size_t i = 0; i < want.v.size(); ++i) want.v[i] = a.v[i] * b.v[i];
      const auto da = to_device<H, Acc>(ctx, a, cols + (strided ? 3 : 0), pad);
      const auto db = to_device<H, Acc>(ctx, b, cols + (strided ? 1 : 0), pad);
      auto dout = to_device<H, Acc>(ctx, HostMatrix(rows, cols, std::nan("")),
                                    cols + (strided ? 2 : 0), pad);
      K::hadamard(ctx, da.cview(), db.cview(), dout.view());
      RWTEST_CHECK_CLOSE(to_host<H, Acc>(ctx, dout), want, abs_of(want), tolerance<Acc>(1, 0));
      if (strided) CHECK(padding_intact<H, Acc>(ctx, dout, pad));
    }
  }
}

/// m ⊙= factors, m in T, factors in Acc.
template <class H, class T>
void scale_by_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 7000;
  const double pad = -555.0;
  for (const auto& shape : elementwise_shapes()) {
    for (const bool strided : {false, true}) {
      ++seed;
      const std::int64_t rows = shape.first, cols = shape.second;
      RWTEST_CONTEXT(H, T, "shape " << rows << " x " << cols << ", strided " << strided, seed);
      const HostMatrix m0 = quantize<H, T>(random_matrix(rows, cols, seed * 4));
      const HostMatrix f = quantize<H, Acc>(random_matrix(rows, cols, seed * 4 + 1, -2.0, 2.0));
      HostMatrix want(rows, cols);
      for (std::size_t i = 0; i < want.v.size(); ++i) want.v[i] = m0.v[i] * f.v[i];
      const auto df = to_device<H, Acc>(ctx, f, cols + (strided ? 1 : 0), pad);
      auto dm = to_device<H, T>(ctx, m0, cols + (strided ? 3 : 0), pad);
      K::scale_by(ctx, df.cview(), dm.view());
      // The product in Acc, then one rounding to T.
      RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dm), want, abs_of(want), acc_tolerance<T>(1, 1, 0));
      if (strided) CHECK(padding_intact<H, T>(ctx, dm, pad));
    }
  }
}

/// out (1 x C) = Σ_rows m + beta out in Acc: no rows, one row, rows on either
/// side of 8, 16 and 24, many rows; beta = 0 over a NaN out; the same bits
/// on a second run.
template <class H, class T>
void sum_rows_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 8000;
  const double pad = -555.0;
  const std::vector<std::pair<std::int64_t, std::int64_t>> shapes = {
      {0, 3},  {1, 1},  {3, 257}, {8, 5},   {9, 5},   {16, 2},
      {17, 2}, {24, 3}, {25, 3},  {300, 7}, {1030, 1}};
  for (const auto& shape : shapes) {
    for (const double beta : {0.0, 0.5}) {
      for (const bool strided : {false, true}) {
        ++seed;
        const std::int64_t rows = shape.first, cols = shape.second;
        RWTEST_CONTEXT(
            H, T, "m " << rows << " x " << cols << ", beta " << beta << ", strided " << strided,
            seed);
        const HostMatrix m = quantize<H, Acc>(random_matrix(rows, cols, seed * 4));
        const HostMatrix out0 = beta == 0.0
                                    ? HostMatrix(1, cols, std::nan(""))
                                    : quantize<H, Acc>(random_matrix(1, cols, seed * 4 + 1));
        HostMatrix want(1, cols), mag(1, cols);
        for (std::int64_t j = 0; j < cols; ++j) {
          double acc = 0.0, acc_abs = 0.0;
          for (std::int64_t i = 0; i < rows; ++i) {
            acc += m(i, j);
            acc_abs += std::abs(m(i, j));
          }
          want(0, j) = acc + (beta == 0.0 ? 0.0 : beta * out0(0, j));
          mag(0, j) = acc_abs + (beta == 0.0 ? 0.0 : beta * std::abs(out0(0, j)));
        }
        const auto dm = to_device<H, Acc>(ctx, m, cols + (strided ? 3 : 0), pad);
        auto dout = to_device<H, Acc>(ctx, out0);
        K::sum_rows(ctx, dm.cview(), static_cast<Acc>(beta), dout.view());
        RWTEST_CHECK_CLOSE(to_host<H, Acc>(ctx, dout), want, mag, tolerance<Acc>(1, rows));

        auto again = to_device<H, Acc>(ctx, out0);
        K::sum_rows(ctx, dm.cview(), static_cast<Acc>(beta), again.view());
        CHECK(first_bit_difference(to_host_raw<H, Acc>(ctx, again.cview()),
                                   to_host_raw<H, Acc>(ctx, dout.cview())) == -1);
      }
    }
  }
}

/// out (1 x 1, Acc) += Σ m² over m in T, whatever its stride; the same bits on
/// a second run; an empty m leaves out as it was.
template <class H, class T>
void sum_squares_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 9000;
  const double pad = -555.0;
  for (const auto& shape : elementwise_shapes()) {
    for (const bool strided : {false, true}) {
      ++seed;
      const std::int64_t rows = shape.first, cols = shape.second;
      RWTEST_CONTEXT(H, T, "shape " << rows << " x " << cols << ", strided " << strided, seed);
      const HostMatrix m = quantize<H, T>(random_matrix(rows, cols, seed * 4));
      const HostMatrix out0(1, 1, 0.25);
      HostMatrix want = out0;
      for (double x : m.v) want.v[0] += x * x;
      const auto dm = to_device<H, T>(ctx, m, cols + (strided ? 3 : 0), pad);
      auto dout = to_device<H, Acc>(ctx, out0);
      K::sum_squares(ctx, dm.cview(), dout.view());
      // Every term positive: the magnitude is the result.
      RWTEST_CHECK_CLOSE(to_host<H, Acc>(ctx, dout), want, want,
                         acc_tolerance<T>(0, 1, m.size() + 1));

      auto again = to_device<H, Acc>(ctx, out0);
      K::sum_squares(ctx, dm.cview(), again.view());
      CHECK(first_bit_difference(to_host_raw<H, Acc>(ctx, again.cview()),
                                 to_host_raw<H, Acc>(ctx, dout.cview())) == -1);
    }
  }
}

// ---------------------------------------------------------------------------
// Router primitives on counts: count_experts, update_bias, aux_loss_grad
// ---------------------------------------------------------------------------

/// n tokens choosing `per_token` distinct of `num` experts.
struct CountShape {
  std::int64_t n, per_token, num;
};
inline std::ostream& operator<<(std::ostream& out, const CountShape& s) {
  return out << "{n " << s.n << ", per token " << s.per_token << ", experts " << s.num << "}";
}

/// Distinct choices per token, uniform.
inline HostIndices random_choices(std::int64_t n, std::int64_t per_token, std::int64_t num,
                                  std::uint64_t seed) {
  HostIndices e(n, per_token, false);
  std::mt19937_64 gen(seed);
  std::vector<std::int32_t> pool(static_cast<std::size_t>(num));
  for (std::int64_t t = 0; t < n; ++t) {
    for (std::int64_t c = 0; c < num; ++c)
      pool[static_cast<std::size_t>(c)] = static_cast<std::int32_t>(c);
    for (std::int64_t j = 0; j < per_token; ++j) {
      const std::int64_t pick = j + index_draw(gen, num - j);
      std::swap(pool[static_cast<std::size_t>(j)], pool[static_cast<std::size_t>(pick)]);
      e.at(t, j) = pool[static_cast<std::size_t>(j)];
    }
  }
  return e;
}

/// counts (1 x E) = assignments over the unmasked tokens, over stale counts:
/// no mask, a mask with holes, every token masked; strided experts.
template <class H, class T>
void count_experts_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  typename H::Ctx ctx;
  std::uint64_t seed = 10000;
  const std::vector<CountShape> shapes = {{0, 2, 4},  {1, 1, 1},  {9, 2, 8},
                                          {17, 3, 5}, {25, 8, 8}, {300, 4, 64}};
  for (const CountShape& sh : shapes) {
    for (const int mask_kind : {0, 1, 2}) {  // none, holes, all masked
      for (const bool strided : {false, true}) {
        ++seed;
        RWTEST_CONTEXT(H, T,
                       "shape " << sh << ", mask "
                                << (mask_kind == 0   ? "none"
                                    : mask_kind == 1 ? "holes"
                                                     : "all 0")
                                << ", strided " << strided,
                       seed);
        const HostIndices experts = random_choices(sh.n, sh.per_token, sh.num, seed);
        std::vector<std::uint8_t> mask;
        if (mask_kind > 0) {
          mask.resize(static_cast<std::size_t>(sh.n));
          for (std::int64_t t = 0; t < sh.n; ++t)
            mask[static_cast<std::size_t>(t)] = mask_kind == 1 && t % 3 != 1 ? 1 : 0;
        }
        std::vector<std::int32_t> want(static_cast<std::size_t>(sh.num), 0);
        for (std::int64_t t = 0; t < sh.n; ++t) {
          if (!mask.empty() && mask[static_cast<std::size_t>(t)] == 0) continue;
          for (std::int64_t j = 0; j < sh.per_token; ++j)
            ++want[static_cast<std::size_t>(experts(t, j))];
        }
        const auto de = indices_to_device<H, T>(
            ctx, experts, strided ? Layout::kStrided : Layout::kContiguous, -3);
        const DeviceMask<H> dmask(ctx, mask);
        auto counts = index_output<H, T>(ctx, 1, sh.num, false, 777);
        K::count_experts(ctx, de.cview(), dmask.view(), counts.view());
        CHECK(first_bit_difference(indices_to_host<H>(ctx, counts), want) == -1);
      }
    }
  }
}

/// Per-expert counts: random, all equal (no step), all zero.
inline std::vector<std::int32_t> count_pattern(int kind, std::int64_t num, std::uint64_t seed) {
  std::vector<std::int32_t> c(static_cast<std::size_t>(num), 0);
  std::mt19937_64 gen(seed);
  for (std::int32_t& x : c) x = kind == 0 ? index_draw(gen, 21) : kind == 1 ? 6 : 0;
  return c;
}
inline const char* count_pattern_name(int kind) {
  return kind == 0 ? "random" : kind == 1 ? "equal" : "zero";
}

/// bias_e += rate · sign(mean(counts) − counts_e), from integer counts.
template <class H, class T>
void update_bias_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 11000;
  for (const std::int64_t num : {1, 2, 7, 64}) {
    for (const int kind : {0, 1, 2}) {
      for (const float rate : {1e-3f, 0.25f, 0.0f}) {
        ++seed;
        RWTEST_CONTEXT(
            H, T, "experts " << num << ", counts " << count_pattern_name(kind) << ", rate " << rate,
            seed);
        const std::vector<std::int32_t> counts = count_pattern(kind, num, seed);
        const HostMatrix bias0 = quantize<H, Acc>(random_matrix(1, num, seed, -0.1, 0.1));
        long long total = 0;
        for (std::int32_t c : counts) total += c;
        HostMatrix want = bias0, mag = abs_of(bias0);
        for (std::int64_t e = 0; e < num; ++e) {
          const long long diff =
              total - num * static_cast<long long>(counts[static_cast<std::size_t>(e)]);
          const double step = diff > 0 ? rate : diff < 0 ? -static_cast<double>(rate) : 0.0;
          want(0, e) += step;
          mag(0, e) += std::abs(step);
        }
        HostIndices hc(1, num, false);
        hc.v = counts;
        const auto dcounts = indices_to_device<H, T>(ctx, hc, Layout::kContiguous);
        auto dbias = to_device<H, Acc>(ctx, bias0);
        K::update_bias(ctx, dcounts.cview(), rate, dbias.view());
        RWTEST_CHECK_CLOSE(to_host<H, Acc>(ctx, dbias), want, mag, tolerance<Acc>(1, 0));
      }
    }
  }
}

/// extra_e = ∂(coef E Σ f P)/∂s0 = coef E c_e (k/g) / (Σ c)², 0 with no counts.
template <class H, class T>
void aux_loss_grad_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 12000;
  for (const std::int64_t num : {1, 4, 16}) {
    for (const int per_token : {1, 2, 3}) {
      for (const double coef_in : {0.01, 1.5}) {
        for (const int kind : {0, 2}) {
          ++seed;
          RWTEST_CONTEXT(H, T,
                         "experts " << num << ", per token " << per_token << ", coef " << coef_in
                                    << ", counts " << count_pattern_name(kind),
                         seed);
          const std::vector<std::int32_t> counts = count_pattern(kind, num, seed);
          const double coef = H::to_double(H::template from_double<Acc>(coef_in));
          double total = 0.0;
          for (std::int32_t c : counts) total += c;
          HostMatrix want(1, num);
          for (std::int64_t e = 0; e < num; ++e) {
            want(0, e) = total == 0.0 ? 0.0
                                      : coef * static_cast<double>(num) *
                                            counts[static_cast<std::size_t>(e)] * per_token /
                                            (total * total);
          }
          HostIndices hc(1, num, false);
          hc.v = counts;
          const auto dcounts = indices_to_device<H, T>(ctx, hc, Layout::kContiguous);
          auto dextra = to_device<H, Acc>(ctx, HostMatrix(1, num, std::nan("")));
          K::aux_loss_grad(ctx, dcounts.cview(), per_token, static_cast<Acc>(coef_in),
                           dextra.view());
          // A product and quotients (in double on both backends), one
          // rounding to Acc; all terms positive.
          RWTEST_CHECK_CLOSE(to_host<H, Acc>(ctx, dextra), want, want, tolerance<Acc>(1, 4));
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Index safety: check_units
// ---------------------------------------------------------------------------

/// bad (1 x 1) = the (token, slot) entries outside [0, r): negative, r and
/// beyond, the int32 extremes; padding holding invalid values is not read; a
/// broadcast row counts once per token (both backends; check_unit_routing
/// reports that count "of units.size()"); r = 0 rejects everything.
template <class H, class T>
void check_units_counts_invalid_indices() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  typename H::Ctx ctx;
  std::uint64_t seed = 13000;
  for (const UnitShape& sh : unit_shapes()) {
    for (const Layout layout : all_layouts()) {
      for (const bool inject : {false, true}) {
        for (const std::int64_t r : {sh.r, std::int64_t{0}}) {
          if (r == 0 && inject) continue;
          ++seed;
          RWTEST_CONTEXT(H, T,
                         "shape " << sh << ", layout " << layout_name(layout) << ", r " << r
                                  << ", invalid injected " << inject,
                         seed);
          HostIndices units = random_units(sh, layout, seed);
          if (inject) {
            const std::int32_t bad_values[] = {-1,
                                               static_cast<std::int32_t>(sh.r),
                                               std::numeric_limits<std::int32_t>::min(),
                                               std::numeric_limits<std::int32_t>::max(),
                                               1 << 30,
                                               static_cast<std::int32_t>(-sh.r)};
            for (std::size_t i = 2; i < units.v.size(); i += 5)
              units.v[i] = bad_values[(i / 5) % 6];
          }
          std::int32_t want = 0;
          for (std::int64_t t = 0; t < sh.n; ++t)
            for (std::int64_t j = 0; j < sh.k; ++j)
              want += (units(t, j) < 0 || units(t, j) >= r) ? 1 : 0;
          const auto du = indices_to_device<H, T>(ctx, units, layout, -7);  // invalid padding
          auto bad = index_output<H, T>(ctx, 1, 1, false, 999);
          K::check_units(ctx, du.cview(), r, bad.view());
          CHECK(K::read_int(ctx, bad.cview()) == want);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Products with an operand or the result in Acc: gemm_acc, gemm_mixed
// ---------------------------------------------------------------------------

/// c (Acc) = alpha op(a) op(b) + beta c over a, b in T: all op pairs, beta =
/// 0 over a NaN c, contiguous and strided.
template <class H, class T>
void gemm_acc_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  using kernel_cases::GemmShape;
  using kernel_cases::op_name;
  typename H::Ctx ctx;
  std::uint64_t seed = 14000;
  const double pad = -555.0;
  for (const GemmShape& sh : kernel_cases::gemm_shapes()) {
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
            const HostMatrix a =
                quantize<H, T>(op_a == Op::kNoTrans ? random_matrix(sh.m, sh.k, seed * 4)
                                                    : random_matrix(sh.k, sh.m, seed * 4));
            const HostMatrix b =
                quantize<H, T>(op_b == Op::kNoTrans ? random_matrix(sh.k, sh.n, seed * 4 + 1)
                                                    : random_matrix(sh.n, sh.k, seed * 4 + 1));
            const HostMatrix c0 = beta == 0.0
                                      ? HostMatrix(sh.m, sh.n, std::nan(""))
                                      : quantize<H, Acc>(random_matrix(sh.m, sh.n, seed * 4 + 2));
            const std::int64_t extra = strided ? 3 : 0;
            const auto da = to_device<H, T>(ctx, a, a.cols + extra, pad);
            const auto db = to_device<H, T>(ctx, b, b.cols + extra, pad);
            auto dc = to_device<H, Acc>(ctx, c0, c0.cols + extra, pad);
            K::gemm_acc(ctx, static_cast<Acc>(alpha), da.cview(), op_a, db.cview(), op_b,
                        static_cast<Acc>(beta), dc.view());
            // Accumulated as gemm does, stored once in Acc.
            RWTEST_CHECK_CLOSE(to_host<H, Acc>(ctx, dc),
                               ref_gemm(alpha, a, op_a, b, op_b, beta, c0),
                               ref_gemm(std::abs(alpha), abs_of(a), op_a, abs_of(b), op_b,
                                        std::abs(beta), abs_of(c0)),
                               acc_tolerance<T>(0, 1, sh.k));
            if (strided) CHECK(padding_intact<H, Acc>(ctx, dc, pad));
          }
        }
      }
    }
  }
}

/// Acc scratch for gemm_mixed (gemm_mixed_scratch<T> elements), NaN-filled
/// so that a read before a write shows; none where T is Acc.
template <class H, class T>
DeviceMatrix<H, rankwise::accumulator_t<T>> mixed_scratch(typename H::Ctx& ctx, std::int64_t rows,
                                                          std::int64_t inner) {
  using Acc = rankwise::accumulator_t<T>;
  DeviceMatrix<H, Acc> s(1, rankwise::gemm_mixed_scratch<T>(rows, inner));
  rankwise::Kernels<typename H::Backend, Acc>::fill(ctx, s.view(), std::nan(""));
  return s;
}

/// c (T) = alpha op(a) op(b) + beta c with a in Acc: the gemm shapes plus c
/// wider than a 512-column panel of the GPU's widening path (512, 513, 1030),
/// beta = 0 over a NaN c (and NaN scratch); then a of magnitude 2^-20 with
/// alpha = 2^20, which only survives if a is never rounded to T (in half it
/// would be subnormal).
template <class H, class T>
void gemm_mixed_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  using kernel_cases::GemmShape;
  using kernel_cases::op_name;
  typename H::Ctx ctx;
  std::uint64_t seed = 15000;
  const double pad = -555.0;
  std::vector<GemmShape> shapes = kernel_cases::gemm_shapes();
  shapes.push_back({3, 513, 7});
  shapes.push_back({2, 1030, 5});
  shapes.push_back({5, 512, 3});
  for (const bool tiny_a : {false, true}) {
    for (const GemmShape& sh : shapes) {
      for (const Op op_a : {Op::kNoTrans, Op::kTrans}) {
        for (const Op op_b : {Op::kNoTrans, Op::kTrans}) {
          for (const auto& ab : {std::pair<double, double>{1.0, 0.0}, {1.0, 1.0}, {-0.75, 0.5}}) {
            for (const bool strided : {false, true}) {
              if (tiny_a && (strided || ab.second == 1.0)) continue;
              ++seed;
              const double scale = tiny_a ? 0x1.0p-20 : 1.0;
              const double alpha = ab.first / scale, beta = ab.second;
              RWTEST_CONTEXT(H, T,
                             "shape " << sh << ", op_a " << op_name(op_a) << ", op_b "
                                      << op_name(op_b) << ", alpha " << alpha << ", beta " << beta
                                      << ", strided " << strided << ", a scaled by " << scale,
                             seed);
              const HostMatrix a = quantize<H, Acc>(
                  op_a == Op::kNoTrans ? random_matrix(sh.m, sh.k, seed * 4, -scale, scale)
                                       : random_matrix(sh.k, sh.m, seed * 4, -scale, scale));
              const HostMatrix b =
                  quantize<H, T>(op_b == Op::kNoTrans ? random_matrix(sh.k, sh.n, seed * 4 + 1)
                                                      : random_matrix(sh.n, sh.k, seed * 4 + 1));
              const HostMatrix c0 = beta == 0.0
                                        ? HostMatrix(sh.m, sh.n, std::nan(""))
                                        : quantize<H, T>(random_matrix(sh.m, sh.n, seed * 4 + 2));
              const std::int64_t extra = strided ? 3 : 0;
              const auto da = to_device<H, Acc>(ctx, a, a.cols + extra, pad);
              const auto db = to_device<H, T>(ctx, b, b.cols + extra, pad);
              auto dc = to_device<H, T>(ctx, c0, c0.cols + extra, pad);
              auto scratch = mixed_scratch<H, T>(ctx, sh.m, sh.k);
              K::gemm_mixed(ctx, static_cast<Acc>(alpha), da.cview(), op_a, db.cview(), op_b,
                            static_cast<Acc>(beta), dc.view(), scratch.view());
              // b and c widen exactly; one fp32/Acc product, one rounding to T.
              RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dc),
                                 ref_gemm(alpha, a, op_a, b, op_b, beta, c0),
                                 ref_gemm(std::abs(alpha), abs_of(a), op_a, abs_of(b), op_b,
                                          std::abs(beta), abs_of(c0)),
                                 tolerance<T>(1, sh.k));
              if (strided) CHECK(padding_intact<H, T>(ctx, dc, pad));
            }
          }
        }
      }
    }
  }
}

/// gemm_acc and gemm_mixed with an empty inner dimension scale c by beta
/// (beta = 0 clears a NaN c), alpha = 0 does the same, an empty c is a no-op.
template <class H, class T>
void gemm_acc_mixed_degenerate() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  constexpr rankwise::MemorySpace space = H::Backend::kMemorySpace;
  typename H::Ctx ctx;
  const std::int64_t m = 9, n = 14;
  const std::uint64_t seed = 16000;
  RWTEST_CONTEXT(H, T, "gemm_acc / gemm_mixed, degenerate shapes", seed);
  // |c| >= 0.25: halving stays clear of half's subnormals, so it is exact.
  const HostMatrix c0 = quantize<H, T>(random_matrix(m, n, seed, 0.25, 1.0));
  const HostMatrix at = quantize<H, T>(random_matrix(m, 6, seed + 1));
  const HostMatrix aa = quantize<H, Acc>(random_matrix(m, 6, seed + 1));
  const HostMatrix b = quantize<H, T>(random_matrix(6, n, seed + 2));
  const auto dat = to_device<H, T>(ctx, at);
  const auto daa = to_device<H, Acc>(ctx, aa);
  const auto db = to_device<H, T>(ctx, b);
  const MatrixView<const T> b_empty(nullptr, 0, n, space);
  HostMatrix half = c0, twice = c0;
  for (double& v : half.v) v *= 0.5;
  for (double& v : twice.v) v *= -2.0;
  for (const Op op_a : {Op::kNoTrans, Op::kTrans}) {
    INFO("op_a " << kernel_cases::op_name(op_a));
    const std::int64_t ar = op_a == Op::kNoTrans ? m : 0, ac = op_a == Op::kNoTrans ? 0 : m;
    for (const double beta : {0.0, 1.0, 0.5}) {
      INFO("beta " << beta);
      const HostMatrix& start = beta == 0.0 ? HostMatrix(m, n, std::nan("")) : c0;
      const HostMatrix want = beta == 0.0 ? HostMatrix(m, n) : beta == 1.0 ? c0 : half;
      auto c1 = to_device<H, Acc>(ctx, start);
      K::gemm_acc(ctx, Acc(1), MatrixView<const T>(nullptr, ar, ac, space), op_a, b_empty,
                  Op::kNoTrans, static_cast<Acc>(beta), c1.view());
      CHECK(compare(to_host<H, Acc>(ctx, c1), want, "C").max_abs_err == 0.0);
      auto c2 = to_device<H, T>(ctx, start);
      K::gemm_mixed(ctx, Acc(1), MatrixView<const Acc>(nullptr, ar, ac, space), op_a, b_empty,
                    Op::kNoTrans, static_cast<Acc>(beta), c2.view(), MatrixView<Acc>());
      CHECK(compare(to_host<H, T>(ctx, c2), want, "C").max_abs_err == 0.0);
    }
  }
  auto c3 = to_device<H, Acc>(ctx, c0);
  K::gemm_acc(ctx, Acc(0), dat.cview(), Op::kNoTrans, db.cview(), Op::kNoTrans, Acc(-2), c3.view());
  CHECK(compare(to_host<H, Acc>(ctx, c3), twice, "C").max_abs_err == 0.0);
  auto c4 = to_device<H, T>(ctx, c0);
  auto scratch = mixed_scratch<H, T>(ctx, m, 6);
  K::gemm_mixed(ctx, Acc(0), daa.cview(), Op::kNoTrans, db.cview(), Op::kNoTrans, Acc(-2),
                c4.view(), scratch.view());
  CHECK(compare(to_host<H, T>(ctx, c4), twice, "C").max_abs_err == 0.0);
  CHECK_NOTHROW(K::gemm_acc(ctx, Acc(1), MatrixView<const T>(nullptr, 0, 6, space), Op::kNoTrans,
                            db.cview(), Op::kNoTrans, Acc(0),
                            MatrixView<Acc>(nullptr, 0, n, space)));
  CHECK_NOTHROW(K::gemm_mixed(ctx, Acc(1), MatrixView<const Acc>(nullptr, 0, 6, space),
                              Op::kNoTrans, db.cview(), Op::kNoTrans, Acc(0),
                              MatrixView<T>(nullptr, 0, n, space), MatrixView<Acc>()));
}

// ---------------------------------------------------------------------------
// Optimiser: adam
// ---------------------------------------------------------------------------

/// adam_update per element against a plain-loop AdamW in double: every
/// hyper-parameter exact in float (so that Acc and the reference see the same
/// step), no clipping (empty norm_sq), clipping inactive and active, with
/// and without weight decay, strided views.
template <class H, class T>
void adam_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 17000;
  const double pad = -555.0;
  for (const auto& shape : elementwise_shapes()) {
    for (const int clip_mode : {0, 1, 2}) {  // no norm_sq, clip inactive, clip active
      for (const double wd : {0.0, 0.0625}) {
        for (const bool strided : {false, true}) {
          ++seed;
          const std::int64_t rows = shape.first, cols = shape.second;
          rankwise::AdamStep step;
          step.lr = 0x1.0p-7;
          step.beta1 = 0.875;
          step.beta2 = 1.0 - 0x1.0p-9;
          step.eps = 0x1.0p-20;
          step.weight_decay = wd;
          step.correction1 = 0.5;
          step.correction2 = 0.25;
          step.max_grad_norm = clip_mode == 1 ? 1024.0 : 0.75;
          const double norm_sq = clip_mode == 1 ? 4.0 : 9.0;
          RWTEST_CONTEXT(H, T,
                         "shape " << rows << " x " << cols << ", clip "
                                  << (clip_mode == 0   ? "none"
                                      : clip_mode == 1 ? "inactive"
                                                       : "active")
                                  << ", weight decay " << wd << ", strided " << strided,
                         seed);
          const HostMatrix p0 = quantize<H, T>(random_matrix(rows, cols, seed * 4));
          const HostMatrix g0 = quantize<H, T>(random_matrix(rows, cols, seed * 4 + 1));
          const HostMatrix m0 =
              quantize<H, Acc>(random_matrix(rows, cols, seed * 4 + 2, -0.1, 0.1));
          const HostMatrix v0 =
              quantize<H, Acc>(random_matrix(rows, cols, seed * 4 + 3, 0.0, 0.01));
          const double clip = clip_mode == 0
                                  ? 1.0
                                  : std::min(1.0, step.max_grad_norm / (std::sqrt(norm_sq) + 1e-6));
          HostMatrix p1(rows, cols), m1(rows, cols), v1(rows, cols);
          HostMatrix p_mag(rows, cols), m_mag(rows, cols);
          for (std::size_t i = 0; i < p1.v.size(); ++i) {
            const double g = g0.v[i] * clip;
            m1.v[i] = step.beta1 * m0.v[i] + (1.0 - step.beta1) * g;
            v1.v[i] = step.beta2 * v0.v[i] + (1.0 - step.beta2) * g * g;
            m_mag.v[i] = step.beta1 * std::abs(m0.v[i]) + (1.0 - step.beta1) * std::abs(g);
            const double denom = std::sqrt(v1.v[i] / step.correction2) + step.eps;
            p1.v[i] = p0.v[i] - step.lr * (m1.v[i] / step.correction1 / denom + wd * p0.v[i]);
            p_mag.v[i] = std::abs(p0.v[i]) +
                         step.lr * (m_mag.v[i] / step.correction1 / denom + wd * std::abs(p0.v[i]));
          }
          const std::int64_t extra = strided ? 3 : 0;
          auto dp = to_device<H, T>(ctx, p0, cols + extra, pad);
          const auto dg = to_device<H, T>(ctx, g0, cols + (strided ? 1 : 0), pad);
          auto dm = to_device<H, Acc>(ctx, m0, cols + extra, pad);
          auto dv = to_device<H, Acc>(ctx, v0, cols + (strided ? 2 : 0), pad);
          const auto dnorm = to_device<H, Acc>(ctx, HostMatrix(1, 1, norm_sq));
          K::adam(ctx, step, dp.view(), dg.cview(), dm.view(), dv.view(),
                  clip_mode == 0 ? MatrixView<const Acc>() : dnorm.cview());
          RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dp), p1, p_mag,
                             acc_tolerance<T>(1, kAdamRoundings, 0));
          RWTEST_CHECK_CLOSE(to_host<H, Acc>(ctx, dm), m1, m_mag,
                             acc_tolerance<T>(0, kAdamRoundings, 0));
          RWTEST_CHECK_CLOSE(to_host<H, Acc>(ctx, dv), v1, v1,
                             acc_tolerance<T>(0, kAdamRoundings, 0));
          if (strided) {
            CHECK(padding_intact<H, T>(ctx, dp, pad));
            CHECK(padding_intact<H, Acc>(ctx, dm, pad));
            CHECK(padding_intact<H, Acc>(ctx, dv, pad));
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Routing: route, route_backward (reference: route_token, route_token_backward
// of rankwise/core/routing.hpp in double, one token at a time)
// ---------------------------------------------------------------------------

/// A router configuration: r units in experts of g, k units per token.
struct RouteCase {
  std::int64_t r, g, k;
  rankwise::ScoreFunction score;
  rankwise::GateNormalization normalization;
  bool gate_uses_bias, bias_per_rank, with_bias;
};
inline std::ostream& operator<<(std::ostream& out, const RouteCase& c) {
  const char* norm = c.normalization == rankwise::GateNormalization::kSumToK     ? "kSumToK"
                     : c.normalization == rankwise::GateNormalization::kSumToOne ? "kSumToOne"
                                                                                 : "kNone";
  return out << "{r " << c.r << ", g " << c.g << ", k " << c.k << ", "
             << (c.score == rankwise::ScoreFunction::kSigmoid ? "sigmoid" : "softmax") << ", "
             << norm << ", gate_uses_bias " << c.gate_uses_bias << ", bias_per_rank "
             << c.bias_per_rank << ", bias " << c.with_bias << "}";
}

/// g = 1 and g > 1, a per-rank bias, k = 1, one expert, every expert chosen
/// (k = r), many experts; both score functions, every normalisation.
inline const std::vector<RouteCase>& route_cases() {
  using rankwise::GateNormalization;
  using rankwise::ScoreFunction;
  static const std::vector<RouteCase> cases = {
      {8, 1, 2, ScoreFunction::kSigmoid, GateNormalization::kSumToK, true, false, true},
      {12, 3, 6, ScoreFunction::kSoftmax, GateNormalization::kSumToOne, false, false, true},
      {16, 4, 8, ScoreFunction::kSigmoid, GateNormalization::kSumToK, true, true, true},
      {5, 1, 1, ScoreFunction::kSoftmax, GateNormalization::kNone, false, false, false},
      {64, 1, 8, ScoreFunction::kSigmoid, GateNormalization::kSumToK, true, false, true},
      {7, 7, 7, ScoreFunction::kSoftmax, GateNormalization::kNone, true, false, true},
      {6, 2, 6, ScoreFunction::kSoftmax, GateNormalization::kSumToK, true, false, true},
      {9, 3, 3, ScoreFunction::kSigmoid, GateNormalization::kSumToOne, true, false, false},
  };
  return cases;
}

inline RoutingRule route_rule(const RouteCase& c) {
  rankwise::RouterConfig cfg;
  cfg.num_units = c.r;
  cfg.group_size = c.g;
  cfg.top_k = c.k;
  cfg.score = c.score;
  cfg.normalization = c.normalization;
  cfg.gate_uses_bias = c.gate_uses_bias;
  cfg.bias_per_rank = c.bias_per_rank;
  return RoutingRule::from(cfg);
}

/// Which inputs hold a NaN or an infinity.
enum class NonFinite { kNone, kLogits, kBias };
inline const char* non_finite_name(NonFinite f) {
  return f == NonFinite::kNone ? "none" : f == NonFinite::kLogits ? "some logits" : "bias";
}

/// Each top-k decision is at least this far apart in z = s0 + b, so that the
/// selection does not depend on the precision the scores are computed in
/// (float scores are off by ~1e-7).
inline constexpr double kRouteMargin = 1e-4;

/// Routing inputs rounded to Acc and the double reference routing of them.
struct RouteProblem {
  HostMatrix logits;    // (n, E)
  HostMatrix bias;      // (1, C), or 0 x 0 for none
  HostMatrix scores;    // (n, E) reference
  HostMatrix gates;     // (n, k) reference
  HostIndices experts;  // (n, kc) reference choices
  HostIndices units;    // (n, k) reference units
  std::int32_t bad = 0;
};

/// Whether the best kc + 1 choices of one token are kRouteMargin apart in z.
inline bool well_separated(const RoutingRule& rule, const double* scores, const double* bias) {
  std::vector<double> z(static_cast<std::size_t>(rule.num_choices));
  for (int c = 0; c < rule.num_choices; ++c)
    z[static_cast<std::size_t>(c)] = scores[rule.expert_of(c)] + (bias != nullptr ? bias[c] : 0.0);
  std::sort(z.begin(), z.end(), [](double a, double b) { return a > b; });
  const std::size_t top =
      std::min<std::size_t>(z.size(), static_cast<std::size_t>(rule.choices_per_token) + 1);
  for (std::size_t i = 1; i < top; ++i)
    if (z[i - 1] - z[i] < kRouteMargin) return false;
  return true;
}

/// Logits in U(-2, 2) per token, redrawn until the token is well separated;
/// a bias of distinct values in [0, 0.04) (nonnegative, so every selected z
/// and normaliser is positive and the gates' magnitudes are their values).
/// Non-finite inputs: a NaN or an infinity in every fourth token's logits,
/// or in the bias (every token).
template <class H, class Acc>
RouteProblem make_route_problem(const RouteCase& rc, std::int64_t n, NonFinite nf,
                                std::uint64_t seed) {
  const RoutingRule rule = route_rule(rc);
  const std::int64_t E = rule.num_experts, C = rule.num_choices, kc = rule.choices_per_token,
                     k = rule.units_per_token();
  RouteProblem p;
  p.logits = HostMatrix(n, E);
  p.bias = rc.with_bias ? HostMatrix(1, C) : HostMatrix();
  for (std::int64_t c = 0; c < p.bias.cols; ++c)
    p.bias(0, c) = 0.04 * static_cast<double>((c * 7 + 3) % C) / static_cast<double>(C);
  p.bias = quantize<H, Acc>(p.bias);
  if (nf == NonFinite::kBias) p.bias(0, C - 1) = std::numeric_limits<double>::infinity();
  p.scores = HostMatrix(n, E);
  p.gates = HostMatrix(n, k);
  p.experts = HostIndices(n, kc, false);
  p.units = HostIndices(n, k, false);
  const double* bias = rc.with_bias ? p.bias.v.data() : nullptr;
  std::mt19937_64 gen(seed);
  std::vector<double> row(static_cast<std::size_t>(E)), scores(static_cast<std::size_t>(E)),
      gates(static_cast<std::size_t>(k));
  std::vector<int> choices(static_cast<std::size_t>(kc)), units(static_cast<std::size_t>(k));
  for (std::int64_t t = 0; t < n; ++t) {
    for (int attempt = 0; attempt < 1000; ++attempt) {
      for (double& x : row)
        x = H::to_double(H::template from_double<Acc>(uniform_draw(gen, -2.0, 2.0)));
      rankwise::route_token<double>(rule, row.data(), nullptr, scores.data(), choices.data(),
                                    units.data(), gates.data());
      if (nf == NonFinite::kBias || well_separated(rule, scores.data(), bias)) break;
    }
    if (nf == NonFinite::kLogits && t % 4 == 3) {
      row[static_cast<std::size_t>(t % E)] =
          t % 8 == 3 ? std::nan("")
                     : (t % 16 == 7 ? -1.0 : 1.0) * std::numeric_limits<double>::infinity();
    }
    const bool ok = rankwise::route_token<double>(rule, row.data(), bias, scores.data(),
                                                  choices.data(), units.data(), gates.data());
    p.bad += ok ? 0 : 1;
    for (std::int64_t e = 0; e < E; ++e) {
      p.logits(t, e) = row[static_cast<std::size_t>(e)];
      p.scores(t, e) = scores[static_cast<std::size_t>(e)];
    }
    for (std::int64_t c = 0; c < kc; ++c) p.experts.at(t, c) = choices[static_cast<std::size_t>(c)];
    for (std::int64_t j = 0; j < k; ++j) {
      p.units.at(t, j) = units[static_cast<std::size_t>(j)];
      p.gates(t, j) = gates[static_cast<std::size_t>(j)];
    }
  }
  return p;
}

inline const std::vector<std::int64_t>& route_token_counts() {
  static const std::vector<std::int64_t> counts = {0, 1, 9, 17, 300};
  return counts;
}

/// route_token for every row of logits: scores and gates within tolerance,
/// choices and units exactly, `bad` the number of tokens with a non-finite
/// logit or bias (those get the safe routing: first choices, zero gates);
/// stale outputs (NaN, wrong indices) overwritten, strided views.
template <class H, class T>
void route_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 18000;
  const double pad = -555.0;
  const std::int32_t ipad = -5;
  for (const RouteCase& rc : route_cases()) {
    const RoutingRule rule = route_rule(rc);
    const std::int64_t E = rule.num_experts, kc = rule.choices_per_token,
                       k = rule.units_per_token();
    for (const std::int64_t n : route_token_counts()) {
      for (const NonFinite nf : {NonFinite::kNone, NonFinite::kLogits, NonFinite::kBias}) {
        if ((nf == NonFinite::kBias && !rc.with_bias) || (nf != NonFinite::kNone && n < 9))
          continue;
        for (const bool strided : {false, true}) {
          ++seed;
          RWTEST_CONTEXT(H, T,
                         "router " << rc << ", n " << n << ", non-finite " << non_finite_name(nf)
                                   << ", strided " << strided,
                         seed);
          const RouteProblem p = make_route_problem<H, Acc>(rc, n, nf, seed);
          const std::int64_t extra = strided ? 3 : 0;
          const auto dlogits = to_device<H, Acc>(ctx, p.logits, E + extra, pad);
          const auto dbias = to_device<H, Acc>(ctx, p.bias);
          auto dscores = to_device<H, Acc>(ctx, HostMatrix(n, E, std::nan("")), E + extra, pad);
          auto dgates = to_device<H, Acc>(ctx, HostMatrix(n, k, std::nan("")), k + extra, pad);
          auto dexperts = index_output<H, T>(ctx, n, kc, strided, ipad);
          auto dunits = index_output<H, T>(ctx, n, k, strided, ipad);
          auto bad = index_output<H, T>(ctx, 1, 1, false, 999);
          K::route(ctx, rule, dlogits.cview(), dbias.cview(), dscores.view(), dexperts.view(),
                   dunits.view(), dgates.view(), bad.view());
          CHECK(K::read_int(ctx, bad.cview()) == p.bad);
          CHECK(first_bit_difference(indices_to_host<H>(ctx, dexperts), p.experts.v) == -1);
          CHECK(first_bit_difference(indices_to_host<H>(ctx, dunits), p.units.v) == -1);
          // Every score and gate is positive here: the magnitude is the value.
          RWTEST_CHECK_CLOSE(to_host<H, Acc>(ctx, dscores), p.scores, abs_of(p.scores),
                             tolerance<Acc>(kScoreRoundings, E));
          RWTEST_CHECK_CLOSE(to_host<H, Acc>(ctx, dgates), p.gates, abs_of(p.gates),
                             tolerance<Acc>(kGateRoundings, E + kc));
          if (strided) {
            CHECK(padding_intact<H, Acc>(ctx, dscores, pad));
            CHECK(padding_intact<H, Acc>(ctx, dgates, pad));
            CHECK(index_padding_intact<H>(ctx, dexperts, ipad));
            CHECK(index_padding_intact<H>(ctx, dunits, ipad));
          }
        }
      }
    }
  }
}

/// Magnitudes of route_token_backward's outputs for one token: the same
/// chain with every term by absolute value (D_t = Σ|dgates|, the weighted
/// sum and the softmax dot over |terms|), so that each rounding along it is
/// bounded by u times these. Valid because the selected values v, hence the
/// normaliser S, are positive here (|1/S| = 1/S).
inline void ref_route_backward_magnitude(const RoutingRule& rule, const double* scores,
                                         const double* bias, const int* choices,
                                         const double* dgates, const double* extra,
                                         double* mag_dlogits, double* mag_dbias) {
  const int kc = rule.choices_per_token, u = rule.units_per_choice, E = rule.num_experts;
  std::vector<double> d(static_cast<std::size_t>(kc));
  double norm = 0.0, weighted = 0.0;
  for (int t = 0; t < kc; ++t) {
    const int ch = choices[t];
    const double v =
        scores[rule.expert_of(ch)] + (rule.gate_uses_bias && bias != nullptr ? bias[ch] : 0.0);
    double dt = 0.0;
    for (int q = 0; q < u; ++q) dt += std::abs(dgates[t * u + q]);
    d[static_cast<std::size_t>(t)] = dt;
    norm += v * u;
    weighted += dt * v;
  }
  const double eps = static_cast<double>(rule.epsilon);
  const bool clamped = !(norm > eps);
  const double s = clamped ? eps : norm;
  const double c = rule.normalization == rankwise::GateNormalization::kSumToK
                       ? static_cast<double>(rule.units_per_token())
                       : 1.0;
  std::vector<double> ds0(static_cast<std::size_t>(E));
  for (int e = 0; e < E; ++e)
    ds0[static_cast<std::size_t>(e)] = extra != nullptr ? std::abs(extra[e]) : 0.0;
  if (mag_dbias != nullptr)
    for (int ch = 0; ch < rule.num_choices; ++ch) mag_dbias[ch] = 0.0;
  for (int t = 0; t < kc; ++t) {
    const double dt = d[static_cast<std::size_t>(t)];
    double dv = dt;
    if (rule.normalization != rankwise::GateNormalization::kNone)
      dv = clamped ? c / s * dt : c / s * (dt + u * weighted / s);
    ds0[static_cast<std::size_t>(rule.expert_of(choices[t]))] += dv;
    if (mag_dbias != nullptr && rule.gate_uses_bias) mag_dbias[choices[t]] += dv;
  }
  if (rule.score == rankwise::ScoreFunction::kSigmoid) {
    for (int e = 0; e < E; ++e)
      mag_dlogits[e] = ds0[static_cast<std::size_t>(e)] * scores[e] * (1.0 - scores[e]);
  } else {
    double dot = 0.0;
    for (int e = 0; e < E; ++e) dot += ds0[static_cast<std::size_t>(e)] * scores[e];
    for (int e = 0; e < E; ++e)
      mag_dlogits[e] = scores[e] * (ds0[static_cast<std::size_t>(e)] + dot);
  }
}

/// route_token_backward per token: dlogits (T) and dbias (n x C, Acc) against
/// the double reference on the forward reference's scores and choices; an
/// extra ∂L/∂s0 (added for unmasked tokens only), a token mask, dbias asked
/// for or not; stale NaN outputs and NaN scratch.
template <class H, class T>
void route_backward_matches_reference() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  using Acc = typename K::Acc;
  typename H::Ctx ctx;
  std::uint64_t seed = 19000;
  const double pad = -555.0;
  for (const RouteCase& rc : route_cases()) {
    const RoutingRule rule = route_rule(rc);
    const std::int64_t E = rule.num_experts, C = rule.num_choices, k = rule.units_per_token();
    const int chain = route_backward_roundings(rule);
    for (const std::int64_t n : route_token_counts()) {
      for (const bool with_extra : {false, true}) {
        for (const bool with_mask : {false, true}) {
          for (const bool want_dbias : {false, true}) {
            ++seed;
            const bool strided = with_mask != want_dbias;
            RWTEST_CONTEXT(H, T,
                           "router " << rc << ", n " << n << ", extra " << with_extra << ", mask "
                                     << with_mask << ", dbias " << want_dbias << ", strided "
                                     << strided,
                           seed);
            const RouteProblem p = make_route_problem<H, Acc>(rc, n, NonFinite::kNone, seed);
            const HostMatrix scores = quantize<H, Acc>(p.scores);
            const HostMatrix dgates = quantize<H, Acc>(random_matrix(n, k, seed * 4 + 1));
            const HostMatrix extra =
                with_extra ? quantize<H, Acc>(random_matrix(1, E, seed * 4 + 2, -0.5, 0.5))
                           : HostMatrix();
            std::vector<std::uint8_t> mask;
            if (with_mask) {
              mask.resize(static_cast<std::size_t>(n));
              for (std::int64_t t = 0; t < n; ++t)
                mask[static_cast<std::size_t>(t)] = t % 3 == 1 ? 0 : 1;
            }
            HostMatrix want(n, E), mag(n, E), want_db(n, C), mag_db(n, C);
            std::vector<int> choices(static_cast<std::size_t>(rule.choices_per_token));
            for (std::int64_t t = 0; t < n; ++t) {
              for (std::int64_t c = 0; c < rule.choices_per_token; ++c)
                choices[static_cast<std::size_t>(c)] = p.experts(t, c);
              const bool masked_out = with_mask && mask[static_cast<std::size_t>(t)] == 0;
              const double* x = with_extra && !masked_out ? extra.v.data() : nullptr;
              const double* b = rc.with_bias ? p.bias.v.data() : nullptr;
              const double* s_row = scores.v.data() + t * E;
              const double* dg_row = dgates.v.data() + t * k;
              rankwise::route_token_backward<double>(rule, s_row, b, choices.data(), dg_row, x,
                                                     want.v.data() + t * E,
                                                     want_db.v.data() + t * C);
              ref_route_backward_magnitude(rule, s_row, b, choices.data(), dg_row, x,
                                           mag.v.data() + t * E, mag_db.v.data() + t * C);
            }
            const std::int64_t pe = strided ? 3 : 0;
            const auto dscores = to_device<H, Acc>(ctx, scores, E + pe, pad);
            const auto dbias_in = to_device<H, Acc>(ctx, p.bias);
            const auto dexperts = indices_to_device<H, T>(
                ctx, p.experts, strided ? Layout::kStrided : Layout::kContiguous, -5);
            const auto ddgates = to_device<H, Acc>(ctx, dgates, k + pe, pad);
            const auto dextra = to_device<H, Acc>(ctx, extra);
            const DeviceMask<H> dmask(ctx, mask);
            auto scratch = to_device<H, Acc>(ctx, HostMatrix(n, E, std::nan("")), E + pe, pad);
            auto dlogits = to_device<H, T>(ctx, HostMatrix(n, E, std::nan("")), E + pe, pad);
            auto ddbias = to_device<H, Acc>(ctx, HostMatrix(n, C, std::nan("")), C + pe, pad);
            K::route_backward(ctx, rule, dscores.cview(), dbias_in.cview(), dexperts.cview(),
                              ddgates.cview(), dextra.cview(), dmask.view(), scratch.view(),
                              dlogits.view(), want_dbias ? ddbias.view() : MatrixView<Acc>());
            // The chain in Acc, then one rounding of dlogits to T.
            RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dlogits), want, mag,
                               acc_tolerance<T>(1, chain, 0));
            if (want_dbias) {
              RWTEST_CHECK_CLOSE(to_host<H, Acc>(ctx, ddbias), want_db, mag_db,
                                 tolerance<Acc>(chain, 0));
            }
            if (strided) CHECK(padding_intact<H, T>(ctx, dlogits, pad));
            if (strided && want_dbias) CHECK(padding_intact<H, Acc>(ctx, ddbias, pad));
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// The remaining transfers: upload_doubles, download_doubles, upload_indices, read_int
// ---------------------------------------------------------------------------

/// upload_doubles rounds as the harness does (H::from_double: on CUDA through
/// float), download_doubles widens exactly, upload_indices fills a strided
/// view and leaves its padding, read_int reads element (0, 0).
template <class H, class T>
void double_and_index_transfers() {
  using K = rankwise::Kernels<typename H::Backend, T>;
  typename H::Ctx ctx;
  std::uint64_t seed = 20000;
  const double pad = 99.0;
  for (const auto& shape : elementwise_shapes()) {
    for (const bool strided : {false, true}) {
      ++seed;
      const std::int64_t rows = shape.first, cols = shape.second;
      RWTEST_CONTEXT(H, T, "shape " << rows << " x " << cols << ", strided " << strided, seed);
      // Unrounded doubles, some beyond T's precision.
      const HostMatrix src = random_matrix(rows, cols, seed, -3.0, 3.0);
      auto dst =
          to_device<H, T>(ctx, HostMatrix(rows, cols, std::nan("")), cols + (strided ? 3 : 0), pad);
      if (!src.v.empty()) K::upload_doubles(ctx, src.v.data(), dst.view());
      std::vector<T> want(src.v.size());
      for (std::size_t i = 0; i < want.size(); ++i) want[i] = H::template from_double<T>(src.v[i]);
      CHECK(first_bit_difference(to_host_raw<H, T>(ctx, dst.cview()), want) == -1);
      if (strided) CHECK(padding_intact<H, T>(ctx, dst, pad));
      std::vector<double> back(src.v.size(), std::nan("")), widened(src.v.size());
      if (!back.empty()) K::download_doubles(ctx, dst.cview(), back.data());
      for (std::size_t i = 0; i < want.size(); ++i) widened[i] = H::to_double(want[i]);
      CHECK(first_bit_difference(back, widened) == -1);

      HostIndices ints(rows, cols, false);
      std::mt19937_64 gen(seed);
      for (std::int32_t& v : ints.v) v = static_cast<std::int32_t>(gen());
      auto di = index_output<H, T>(ctx, rows, cols, strided, -9);
      if (!ints.v.empty()) K::upload_indices(ctx, ints.v.data(), di.view());
      CHECK(first_bit_difference(indices_to_host<H>(ctx, di), ints.v) == -1);
      if (strided) CHECK(index_padding_intact<H>(ctx, di, -9));
      if (!ints.v.empty()) CHECK(K::read_int(ctx, di.cview()) == ints.v[0]);
    }
  }
  for (const std::int32_t v : {0, -42, 123456789, std::numeric_limits<std::int32_t>::min(),
                               std::numeric_limits<std::int32_t>::max()}) {
    INFO("read_int " << v);
    auto one = index_output<H, T>(ctx, 1, 1, false, v);
    CHECK(K::read_int(ctx, one.cview()) == v);
  }
}

}  // namespace unit_kernel_cases
}  // namespace rwtest

/// Instantiates every rank-unit, router and optimiser primitive case for
/// HARNESS and the storage types that follow, tagged TAG.
#define RWTEST_UNIT_KERNEL_TEST_CASES(HARNESS, TAG, ...)                                           \
  TEMPLATE_TEST_CASE("kernels: gather_dot matches the double reference", "[kernels][units]" TAG,   \
                     __VA_ARGS__) {                                                                \
    ::rwtest::unit_kernel_cases::gather_dot_matches_reference<HARNESS, TestType>();                \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: gather_axpy matches the double reference", "[kernels][units]" TAG,  \
                     __VA_ARGS__) {                                                                \
    ::rwtest::unit_kernel_cases::gather_axpy_matches_reference<HARNESS, TestType>();               \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: scatter_axpy matches the double reference and is deterministic",    \
                     "[kernels][units]" TAG, __VA_ARGS__) {                                        \
    ::rwtest::unit_kernel_cases::scatter_axpy_matches_reference<HARNESS, TestType>();              \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: densify matches the double reference", "[kernels][units]" TAG,      \
                     __VA_ARGS__) {                                                                \
    ::rwtest::unit_kernel_cases::densify_matches_reference<HARNESS, TestType>();                   \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: gather_cols gathers exactly", "[kernels][units]" TAG,               \
                     __VA_ARGS__) {                                                                \
    ::rwtest::unit_kernel_cases::gather_cols_matches_reference<HARNESS, TestType>();               \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: take_rows and add_rows move token rows exactly",                    \
                     "[kernels][units]" TAG, __VA_ARGS__) {                                        \
    ::rwtest::unit_kernel_cases::take_and_add_rows_match_reference<HARNESS, TestType>();           \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: remap_units maps local units to pool units",                        \
                     "[kernels][units]" TAG, __VA_ARGS__) {                                        \
    ::rwtest::unit_kernel_cases::remap_units_matches_reference<HARNESS, TestType>();               \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: hadamard matches the double reference", "[kernels][units]" TAG,     \
                     __VA_ARGS__) {                                                                \
    ::rwtest::unit_kernel_cases::hadamard_matches_reference<HARNESS, TestType>();                  \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: scale_by matches the double reference", "[kernels][units]" TAG,     \
                     __VA_ARGS__) {                                                                \
    ::rwtest::unit_kernel_cases::scale_by_matches_reference<HARNESS, TestType>();                  \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: sum_rows matches the double reference and is deterministic",        \
                     "[kernels][router]" TAG, __VA_ARGS__) {                                       \
    ::rwtest::unit_kernel_cases::sum_rows_matches_reference<HARNESS, TestType>();                  \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: count_experts counts unmasked assignments",                         \
                     "[kernels][router]" TAG, __VA_ARGS__) {                                       \
    ::rwtest::unit_kernel_cases::count_experts_matches_reference<HARNESS, TestType>();             \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: update_bias matches the double reference", "[kernels][router]" TAG, \
                     __VA_ARGS__) {                                                                \
    ::rwtest::unit_kernel_cases::update_bias_matches_reference<HARNESS, TestType>();               \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: aux_loss_grad matches the double reference",                        \
                     "[kernels][router]" TAG, __VA_ARGS__) {                                       \
    ::rwtest::unit_kernel_cases::aux_loss_grad_matches_reference<HARNESS, TestType>();             \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: check_units counts indices outside [0, r)",                         \
                     "[kernels][units][indices]" TAG, __VA_ARGS__) {                               \
    ::rwtest::unit_kernel_cases::check_units_counts_invalid_indices<HARNESS, TestType>();          \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: gemm_acc matches the double reference", "[kernels]" TAG,            \
                     __VA_ARGS__) {                                                                \
    ::rwtest::unit_kernel_cases::gemm_acc_matches_reference<HARNESS, TestType>();                  \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: gemm_mixed matches the double reference", "[kernels]" TAG,          \
                     __VA_ARGS__) {                                                                \
    ::rwtest::unit_kernel_cases::gemm_mixed_matches_reference<HARNESS, TestType>();                \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: gemm_acc and gemm_mixed with empty inner dimension, alpha 0",       \
                     "[kernels]" TAG, __VA_ARGS__) {                                               \
    ::rwtest::unit_kernel_cases::gemm_acc_mixed_degenerate<HARNESS, TestType>();                   \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: sum_squares matches the double reference and is deterministic",     \
                     "[kernels][optim]" TAG, __VA_ARGS__) {                                        \
    ::rwtest::unit_kernel_cases::sum_squares_matches_reference<HARNESS, TestType>();               \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: adam matches the double reference", "[kernels][optim]" TAG,         \
                     __VA_ARGS__) {                                                                \
    ::rwtest::unit_kernel_cases::adam_matches_reference<HARNESS, TestType>();                      \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: route matches route_token per token", "[kernels][router]" TAG,      \
                     __VA_ARGS__) {                                                                \
    ::rwtest::unit_kernel_cases::route_matches_reference<HARNESS, TestType>();                     \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: route_backward matches route_token_backward per token",             \
                     "[kernels][router]" TAG, __VA_ARGS__) {                                       \
    ::rwtest::unit_kernel_cases::route_backward_matches_reference<HARNESS, TestType>();            \
  }                                                                                                \
  TEMPLATE_TEST_CASE("kernels: upload_doubles, download_doubles, upload_indices, read_int",        \
                     "[kernels]" TAG, __VA_ARGS__) {                                               \
    ::rwtest::unit_kernel_cases::double_and_index_transfers<HARNESS, TestType>();                  \
  }
