// LoRA test bodies, written once over a harness H (support/harness_*.hpp) and
// a storage type T, instantiated for every backend by RWTEST_LORA_TEST_CASES.
// Every numeric check is against the plain-loop double reference
// (support/reference.hpp) with the tolerances of support/tolerance.hpp; every
// case prints its backend, type, shape and seed on failure.
#pragma once

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "rankwise/core/lora_config.hpp"
#include "rankwise/core/numeric.hpp"
#include "rankwise/core/random.hpp"
#include "rankwise/core/workspace.hpp"
#include "rankwise/layers/lora.hpp"
#include "rankwise/layers/lora_ops.hpp"
#include "support/compare.hpp"
#include "support/harness_common.hpp"
#include "support/reference.hpp"
#include "support/tolerance.hpp"

namespace rwtest {
namespace lora_cases {

using rankwise::ErrorCode;
using rankwise::LoraConfig;
using rankwise::MatrixView;
using rankwise::ScaleRule;

/// n tokens through a d_in -> d_out adapter of rank r.
struct LoraShape {
  std::int64_t n, d_in, d_out, r;
};
inline std::ostream& operator<<(std::ostream& out, const LoraShape& s) {
  return out << "{n " << s.n << ", d_in " << s.d_in << ", d_out " << s.d_out << ", r " << s.r
             << "}";
}

/// Shapes that stress edges: rank 1, one token, one feature, dimensions that
/// are not multiples of 8 (vector widths, tensor-core tiles) and a few that are.
inline const std::vector<LoraShape>& awkward_shapes() {
  static const std::vector<LoraShape> shapes = {
      {1, 1, 1, 1},  {1, 16, 8, 4},    {3, 7, 5, 1},      {17, 13, 9, 3}, {5, 33, 31, 7},
      {9, 8, 24, 8}, {40, 129, 65, 5}, {64, 100, 36, 16}, {2, 257, 3, 2}, {33, 3, 130, 1},
  };
  return shapes;
}

inline LoraConfig config_for(const LoraShape& s, double alpha = 16.0,
                             ScaleRule rule = ScaleRule::kAlphaOverRank) {
  LoraConfig c;
  c.d_in = s.d_in;
  c.d_out = s.d_out;
  c.rank = s.r;
  c.alpha = alpha;
  c.scale_rule = rule;
  return c;
}

/// Test data, already rounded to the storage type: A scaled like PEFT's init
/// (entries ~ 1/sqrt(d_in)), B like a trained one (~ 1/sqrt(r)), so every
/// intermediate is O(1) whatever the shape.
struct LoraProblem {
  HostMatrix x;    // (n, d_in)
  HostMatrix a;    // (r, d_in)
  HostMatrix b;    // (d_out, r), PEFT layout
  HostMatrix y0;   // (n, d_out), what y holds before forward adds to it
  HostMatrix dy;   // (n, d_out)
  HostMatrix dx0;  // (n, d_in), what dx holds before backward adds to it
};

template <class H, class T>
LoraProblem make_problem(const LoraShape& s, std::uint64_t seed) {
  const double ra = 1.0 / std::sqrt(static_cast<double>(s.d_in));
  const double rb = 1.0 / std::sqrt(static_cast<double>(s.r));
  return {quantize<H, T>(random_matrix(s.n, s.d_in, seed * 8 + 0)),
          quantize<H, T>(random_matrix(s.r, s.d_in, seed * 8 + 1, -ra, ra)),
          quantize<H, T>(random_matrix(s.d_out, s.r, seed * 8 + 2, -rb, rb)),
          quantize<H, T>(random_matrix(s.n, s.d_out, seed * 8 + 3)),
          quantize<H, T>(random_matrix(s.n, s.d_out, seed * 8 + 4)),
          quantize<H, T>(random_matrix(s.n, s.d_in, seed * 8 + 5))};
}

template <class H, class T>
using LoraOf = rankwise::Lora<T, typename H::Backend>;

/// A workspace block type with the alignment WorkspaceCarver demands (the
/// CPU Buffer aligns to 64 bytes only, so a Buffer of bytes would not do).
struct alignas(rankwise::kWorkspaceAlignment) WorkspaceWord {
  unsigned char bytes[rankwise::kWorkspaceAlignment];
};

/// A reference result and its magnitude (the same reference on |inputs|),
/// which rounding errors are measured against (support/compare.hpp).
struct Expected {
  HostMatrix ref, mag;
};

inline Expected expect_forward(double s, const HostMatrix& x, const HostMatrix& a,
                               const HostMatrix& b, const HostMatrix& y0) {
  return {ref_lora_forward(s, x, a, b, y0),
          ref_lora_forward(std::abs(s), abs_of(x), abs_of(a), abs_of(b), abs_of(y0))};
}

/// y = x W0ᵀ + s B A x (or x W0 + ..., kInOut).
inline Expected expect_forward_with_base(double s, const HostMatrix& x, const HostMatrix& a,
                                         const HostMatrix& b, const HostMatrix& w0,
                                         rankwise::WeightLayout layout) {
  return {ref_lora_forward(s, x, a, b, ref_base_forward(x, w0, layout)),
          ref_lora_forward(std::abs(s), abs_of(x), abs_of(a), abs_of(b),
                           ref_base_forward(abs_of(x), abs_of(w0), layout))};
}

inline Expected expect_merge(const HostMatrix& w0, rankwise::WeightLayout layout,
                             const HostMatrix& a, const HostMatrix& b, double s,
                             double sign = 1.0) {
  return {ref_merge(w0, layout, a, b, s, sign),
          ref_merge(abs_of(w0), layout, abs_of(a), abs_of(b), std::abs(s))};
}

struct ExpectedGrads {
  LoraGrads ref, mag;
  /// dx after `dx += ...` on a dx that held dx0.
  Expected dx_after(const HostMatrix& dx0) const {
    return {add(dx0, ref.dx), add(abs_of(dx0), mag.dx)};
  }
};

inline ExpectedGrads expect_backward(double s, const HostMatrix& x, const HostMatrix& a,
                                     const HostMatrix& b, const HostMatrix& dy) {
  return {ref_lora_backward(s, x, a, b, dy),
          ref_lora_backward(std::abs(s), abs_of(x), abs_of(a), abs_of(b), abs_of(dy))};
}

/// The longest chain of accumulations any LoRA result goes through is bounded
/// by the sum of the dimensions (e.g. dbt: H over d_in, then over n).
inline std::int64_t chain(const LoraShape& s) { return s.n + s.d_in + s.d_out + s.r; }

/// Copies A and B (PEFT layout) into the layer through set_a / set_b.
template <class H, class T>
void load(typename H::Ctx& ctx, LoraOf<H, T>& layer, const HostMatrix& a, const HostMatrix& b) {
  const auto da = to_device<H, T>(ctx, a);
  const auto db = to_device<H, T>(ctx, b);
  layer.set_a(da.cview());
  layer.set_b(db.cview());
}

template <class H, class T>
HostMatrix grad_b_of(typename H::Ctx& ctx, const LoraOf<H, T>& layer) {
  DeviceMatrix<H, T> db(layer.config().d_out, layer.config().rank);
  layer.get_grad_b(db.view());
  return to_host<H, T>(ctx, db);
}

template <class H, class T>
HostMatrix grad_a_of(typename H::Ctx& ctx, LoraOf<H, T>& layer) {
  return to_host<H, T>(ctx, MatrixView<const T>(layer.grad_a()));
}

inline const char* layout_name(rankwise::WeightLayout l) {
  return l == rankwise::WeightLayout::kOutIn ? "kOutIn" : "kInOut";
}

/// A base weight of `layout`'s shape for a d_in -> d_out map.
inline HostMatrix base_shape(rankwise::WeightLayout layout, std::int64_t d_in, std::int64_t d_out,
                             std::uint64_t seed) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(d_in));
  return layout == rankwise::WeightLayout::kOutIn ? random_matrix(d_out, d_in, seed, -bound, bound)
                                                  : random_matrix(d_in, d_out, seed, -bound, bound);
}

// ---------------------------------------------------------------------------

/// y += s B A x matches the reference for every awkward shape.
template <class H, class T>
void forward_matches_reference() {
  typename H::Ctx ctx;
  std::uint64_t seed = 100;
  for (const LoraShape& sh : awkward_shapes()) {
    ++seed;
    RWTEST_CONTEXT(H, T, "shape " << sh, seed);
    const LoraConfig cfg = config_for(sh);
    LoraOf<H, T> layer(ctx, cfg);
    const LoraProblem p = make_problem<H, T>(sh, seed);
    load<H, T>(ctx, layer, p.a, p.b);
    const auto x = to_device<H, T>(ctx, p.x);
    auto y = to_device<H, T>(ctx, p.y0);
    layer.forward(x.cview(), y.view());
    // Roundings to T: H, then y.
    const Expected e = expect_forward(cfg.scale(), p.x, p.a, p.b, p.y0);
    RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, y), e.ref, e.mag, tolerance<T>(2, chain(sh)));
  }
}

/// y = x W0ᵀ + s B A x in both weight layouts; y's old contents (NaN) are
/// overwritten, and a base weight in the other layout is rejected.
template <class H, class T>
void forward_with_base_weight() {
  typename H::Ctx ctx;
  const LoraShape sh{23, 37, 19, 4};
  std::uint64_t seed = 200;
  for (const auto layout : {rankwise::WeightLayout::kOutIn, rankwise::WeightLayout::kInOut}) {
    ++seed;
    RWTEST_CONTEXT(H, T, "shape " << sh, seed);
    INFO("layout " << layout_name(layout));
    const LoraConfig cfg = config_for(sh);
    LoraOf<H, T> layer(ctx, cfg);
    const LoraProblem p = make_problem<H, T>(sh, seed);
    load<H, T>(ctx, layer, p.a, p.b);
    const HostMatrix w0 = quantize<H, T>(base_shape(layout, sh.d_in, sh.d_out, seed * 8 + 7));
    const auto x = to_device<H, T>(ctx, p.x);
    const auto w = to_device<H, T>(ctx, w0);
    auto y = to_device<H, T>(ctx, HostMatrix(sh.n, sh.d_out, std::nan("")));
    layer.forward(x.cview(), w.cview(), layout, y.view());
    // Roundings to T: the base product and H (each at most one rounding of a
    // part of y), then y.
    const Expected e = expect_forward_with_base(cfg.scale(), p.x, p.a, p.b, w0, layout);
    RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, y), e.ref, e.mag, tolerance<T>(2, chain(sh)));

    // The same numbers in the other layout's shape: d_in != d_out, so rejected.
    const auto other = layout == rankwise::WeightLayout::kOutIn ? rankwise::WeightLayout::kInOut
                                                                : rankwise::WeightLayout::kOutIn;
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "expected shape",
                       layer.forward(x.cview(), w.cview(), other, y.view()));
  }
}

/// dA, dB (PEFT layout through get_grad_b) and dx += ... match the reference;
/// accumulate adds to the gradients, the default overwrites them, and dx is
/// optional.
template <class H, class T>
void backward_matches_reference() {
  typename H::Ctx ctx;
  std::uint64_t seed = 300;
  for (const LoraShape& sh : awkward_shapes()) {
    ++seed;
    RWTEST_CONTEXT(H, T, "shape " << sh, seed);
    const LoraConfig cfg = config_for(sh);
    const double s = cfg.scale();
    LoraOf<H, T> layer(ctx, cfg);
    const LoraProblem p = make_problem<H, T>(sh, seed);
    const LoraProblem q = make_problem<H, T>(sh, seed + 1000);  // a second batch
    load<H, T>(ctx, layer, p.a, p.b);
    const auto x = to_device<H, T>(ctx, p.x);
    const auto dy = to_device<H, T>(ctx, p.dy);
    auto dx = to_device<H, T>(ctx, p.dx0);
    layer.backward(x.cview(), dy.cview(), dx.view());
    // Roundings to T: dH (or H), then the gradient.
    const Bound tol = tolerance<T>(2, chain(sh));
    const ExpectedGrads g = expect_backward(s, p.x, p.a, p.b, p.dy);
    RWTEST_CHECK_CLOSE(grad_a_of<H, T>(ctx, layer), g.ref.da, g.mag.da, tol);
    RWTEST_CHECK_CLOSE(grad_b_of<H, T>(ctx, layer), g.ref.db, g.mag.db, tol);
    const Expected e_dx = g.dx_after(p.dx0);
    RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dx), e_dx.ref, e_dx.mag, tol);
    // The internal Bᵀ gradient is exactly the transpose of what get_grad_b gives.
    CHECK(compare(to_host<H, T>(ctx, MatrixView<const T>(layer.grad_bt())),
                  transpose(grad_b_of<H, T>(ctx, layer)), "dBt")
              .max_abs_err == 0.0);

    // accumulate = true adds a second batch's gradients, without dx.
    const auto x2 = to_device<H, T>(ctx, q.x);
    const auto dy2 = to_device<H, T>(ctx, q.dy);
    layer.backward(x2.cview(), dy2.cview(), {}, true);
    const ExpectedGrads g2 = expect_backward(s, q.x, p.a, p.b, q.dy);
    // One more rounding: the sum of the stored first gradient and the second.
    const Bound tol_acc = tolerance<T>(3, 2 * chain(sh));
    RWTEST_CHECK_CLOSE(grad_a_of<H, T>(ctx, layer), add(g.ref.da, g2.ref.da),
                       add(g.mag.da, g2.mag.da), tol_acc);
    RWTEST_CHECK_CLOSE(grad_b_of<H, T>(ctx, layer), add(g.ref.db, g2.ref.db),
                       add(g.mag.db, g2.mag.db), tol_acc);

    // The default overwrites.
    layer.backward(x2.cview(), dy2.cview());
    RWTEST_CHECK_CLOSE(grad_a_of<H, T>(ctx, layer), g2.ref.da, g2.mag.da, tol);
    RWTEST_CHECK_CLOSE(grad_b_of<H, T>(ctx, layer), g2.ref.db, g2.mag.db, tol);
  }
}

/// Merge adds s B A to W0 in either layout; forward through the merged base
/// equals base + adapter; unmerge restores W0; a PEFT-initialised adapter
/// (B = 0) merges to the same bits.
template <class H, class T>
void merge_round_trip() {
  typename H::Ctx ctx;
  const LoraShape sh{12, 45, 27, 6};
  std::uint64_t seed = 400;
  for (const auto layout : {rankwise::WeightLayout::kOutIn, rankwise::WeightLayout::kInOut}) {
    ++seed;
    RWTEST_CONTEXT(H, T, "shape " << sh, seed);
    INFO("layout " << layout_name(layout));
    const LoraConfig cfg = config_for(sh);
    const double s = cfg.scale();
    LoraOf<H, T> layer(ctx, cfg);
    const LoraProblem p = make_problem<H, T>(sh, seed);
    load<H, T>(ctx, layer, p.a, p.b);
    const HostMatrix w0 = quantize<H, T>(base_shape(layout, sh.d_in, sh.d_out, seed * 8 + 7));
    const auto x = to_device<H, T>(ctx, p.x);
    const auto w_base = to_device<H, T>(ctx, w0);
    auto w = to_device<H, T>(ctx, w0);

    const Bound tol = tolerance<T>(2, chain(sh));
    layer.merge(w.view(), layout);
    const Expected merged = expect_merge(w0, layout, p.a, p.b, s);
    // One rounding to T: W0 + s B A.
    RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, w), merged.ref, merged.mag, tolerance<T>(1, chain(sh)));

    const Expected e = expect_forward_with_base(s, p.x, p.a, p.b, w0, layout);
    auto y_merged = to_device<H, T>(ctx, HostMatrix(sh.n, sh.d_out));
    rankwise::base_forward<typename H::Backend, T>(ctx, x.cview(), w.cview(), layout,
                                                   y_merged.view());
    auto y_split = to_device<H, T>(ctx, HostMatrix(sh.n, sh.d_out));
    layer.forward(x.cview(), w_base.cview(), layout, y_split.view());
    // Two roundings either way: merged W then y; or H then y.
    RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, y_merged), e.ref, e.mag, tol);
    RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, y_split), e.ref, e.mag, tol);

    // Two roundings: merged W, then W - s B A. Measured against
    // |W0| + s |B| |A|, since the merged weight was rounded at that size.
    layer.unmerge(w.view(), layout);
    RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, w), w0, merged.mag, tol);

    // B = 0 after init_peft: merging adds exact zeros.
    layer.init_peft(seed);
    auto w_init = to_device<H, T>(ctx, w0);
    layer.merge(w_init.view(), layout);
    CHECK(first_bit_difference(to_host_raw<H, T>(ctx, w_init.cview()),
                               to_host_raw<H, T>(ctx, w_base.cview())) == -1);
  }
}

/// init_peft: A ~ U(±1/sqrt(d_in)) with the exact bits of rankwise::uniform on
/// stream substream(seed, 0), B = 0, same seed same bits, other seed other values.
template <class H, class T>
void init_peft_contract() {
  typename H::Ctx ctx;
  const LoraShape sh{1, 37, 23, 5};
  const std::uint64_t seed = 1234;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  const LoraConfig cfg = config_for(sh);
  LoraOf<H, T> layer(ctx, cfg);
  const LoraProblem p = make_problem<H, T>(sh, 7);
  load<H, T>(ctx, layer, p.a, p.b);  // nonzero B, so init_peft must clear it
  layer.init_peft(seed);

  const double bound = 1.0 / std::sqrt(static_cast<double>(sh.d_in));
  const std::vector<T> a_bits = to_host_raw<H, T>(ctx, MatrixView<const T>(layer.a()));
  std::vector<T> expected(a_bits.size());
  const std::uint64_t stream = rankwise::substream(seed, 0);
  for (std::int64_t i = 0; i < sh.r; ++i)
    for (std::int64_t j = 0; j < sh.d_in; ++j)
      expected[static_cast<std::size_t>(i * sh.d_in + j)] = H::template from_double<T>(
          rankwise::uniform(stream, static_cast<std::uint64_t>(i * sh.d_in + j), -bound, bound));
  CHECK(first_bit_difference(a_bits, expected) == -1);

  const HostMatrix a = to_host<H, T>(ctx, MatrixView<const T>(layer.a()));
  const double bound_t = H::to_double(H::template from_double<T>(bound));
  double lo = bound, hi = -bound;
  for (double v : a.v) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  CAPTURE(bound, bound_t, lo, hi);
  CHECK(lo >= -bound_t);
  CHECK(hi <= bound_t);
  CHECK(lo < -0.8 * bound);  // 185 draws span the interval
  CHECK(hi > 0.8 * bound);

  DeviceMatrix<H, T> b(sh.d_out, sh.r);
  layer.get_b(b.view());
  CHECK(compare(to_host<H, T>(ctx, b), HostMatrix(sh.d_out, sh.r), "B").max_abs_err == 0.0);

  LoraOf<H, T> same(ctx, cfg);
  same.init_peft(seed);
  CHECK(first_bit_difference(to_host_raw<H, T>(ctx, MatrixView<const T>(same.a())), a_bits) == -1);

  LoraOf<H, T> other(ctx, cfg);
  other.init_peft(seed + 1);
  const std::vector<T> other_bits = to_host_raw<H, T>(ctx, MatrixView<const T>(other.a()));
  int equal = 0;
  for (std::size_t i = 0; i < a_bits.size(); ++i)
    equal += std::memcmp(&a_bits[i], &other_bits[i], sizeof(T)) == 0 ? 1 : 0;
  CAPTURE(equal);
  CHECK(equal * 10 < static_cast<int>(a_bits.size()));
}

/// rsLoRA: s = alpha / sqrt(r), through forward and backward.
template <class H, class T>
void rslora_scale() {
  typename H::Ctx ctx;
  const LoraShape sh{6, 14, 10, 9};
  const std::uint64_t seed = 500;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  LoraOf<H, T> rs(ctx, config_for(sh, 6.0, ScaleRule::kAlphaOverSqrtRank));
  LoraOf<H, T> peft(ctx, config_for(sh, 6.0, ScaleRule::kAlphaOverRank));
  CHECK(rs.scale() == 2.0);          // 6 / sqrt(9)
  CHECK(peft.scale() == 6.0 / 9.0);  // 6 / 9
  const LoraProblem p = make_problem<H, T>(sh, seed);
  load<H, T>(ctx, rs, p.a, p.b);
  const auto x = to_device<H, T>(ctx, p.x);
  auto y = to_device<H, T>(ctx, p.y0);
  rs.forward(x.cview(), y.view());
  const HostMatrix got = to_host<H, T>(ctx, y);
  const Bound tol = tolerance<T>(2, chain(sh));
  const Expected e = expect_forward(2.0, p.x, p.a, p.b, p.y0);
  RWTEST_CHECK_CLOSE(got, e.ref, e.mag, tol);
  // The PEFT scale gives a clearly different answer, so the check above can fail.
  CHECK(compare(got, ref_lora_forward(6.0 / 9.0, p.x, p.a, p.b, p.y0), "y").normwise > 0.1);

  const auto dy = to_device<H, T>(ctx, p.dy);
  rs.backward(x.cview(), dy.cview());
  const ExpectedGrads g = expect_backward(2.0, p.x, p.a, p.b, p.dy);
  RWTEST_CHECK_CLOSE(grad_a_of<H, T>(ctx, rs), g.ref.da, g.mag.da, tol);
  RWTEST_CHECK_CLOSE(grad_b_of<H, T>(ctx, rs), g.ref.db, g.mag.db, tol);
}

/// N = 0 tokens: forward does nothing; backward zeroes the gradients, or
/// leaves them alone with accumulate; the low level needs no workspace.
template <class H, class T>
void zero_tokens() {
  typename H::Ctx ctx;
  const LoraShape sh{5, 11, 7, 3};
  const std::uint64_t seed = 600;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  LoraOf<H, T> layer(ctx, config_for(sh));
  const LoraProblem p = make_problem<H, T>(sh, seed);
  load<H, T>(ctx, layer, p.a, p.b);
  const auto x = to_device<H, T>(ctx, p.x);
  const auto dy = to_device<H, T>(ctx, p.dy);
  layer.backward(x.cview(), dy.cview());  // nonzero gradients
  const std::vector<T> ga = to_host_raw<H, T>(ctx, MatrixView<const T>(layer.grad_a()));
  const std::vector<T> gbt = to_host_raw<H, T>(ctx, MatrixView<const T>(layer.grad_bt()));
  REQUIRE(compare(to_host<H, T>(ctx, MatrixView<const T>(layer.grad_a())),
                  HostMatrix(sh.r, sh.d_in), "dA")
              .max_abs_err > 0.0);

  DeviceMatrix<H, T> x0(0, sh.d_in), y0(0, sh.d_out), dy0(0, sh.d_out), dx0(0, sh.d_in);
  CHECK(x0.view().data == nullptr);  // empty views may be null
  CHECK_NOTHROW(layer.forward(x0.cview(), y0.view()));
  CHECK_NOTHROW(layer.backward(x0.cview(), dy0.cview(), dx0.view(), true));
  CHECK(first_bit_difference(to_host_raw<H, T>(ctx, MatrixView<const T>(layer.grad_a())), ga) ==
        -1);
  CHECK(first_bit_difference(to_host_raw<H, T>(ctx, MatrixView<const T>(layer.grad_bt())), gbt) ==
        -1);
  CHECK_NOTHROW(layer.backward(x0.cview(), dy0.cview()));
  CHECK(compare(grad_a_of<H, T>(ctx, layer), HostMatrix(sh.r, sh.d_in), "dA").max_abs_err == 0.0);
  CHECK(compare(grad_b_of<H, T>(ctx, layer), HostMatrix(sh.d_out, sh.r), "dB").max_abs_err == 0.0);

  CHECK(rankwise::lora_forward_workspace_bytes<T>(0, sh.r) == 0);
  CHECK_NOTHROW(rankwise::lora_forward<typename H::Backend, T>(
      ctx, layer.scale(), x0.cview(), MatrixView<const T>(layer.a()),
      MatrixView<const T>(layer.bt()), y0.view(), nullptr, 0));
}

/// Same inputs, same bits: twice through one layer (reusing its workspace)
/// and once through a second layer.
template <class H, class T>
void deterministic() {
  typename H::Ctx ctx;
  const LoraShape sh{65, 70, 45, 6};
  const std::uint64_t seed = 700;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  const LoraProblem p = make_problem<H, T>(sh, seed);
  const auto x = to_device<H, T>(ctx, p.x);
  const auto dy = to_device<H, T>(ctx, p.dy);
  struct Run {
    std::vector<T> y, dx, da, db;
  };
  auto run = [&](LoraOf<H, T>& layer) {
    auto y = to_device<H, T>(ctx, p.y0);
    auto dx = to_device<H, T>(ctx, p.dx0);
    DeviceMatrix<H, T> db(sh.d_out, sh.r);
    layer.forward(x.cview(), y.view());
    layer.backward(x.cview(), dy.cview(), dx.view());
    layer.get_grad_b(db.view());
    return Run{to_host_raw<H, T>(ctx, y.cview()), to_host_raw<H, T>(ctx, dx.cview()),
               to_host_raw<H, T>(ctx, MatrixView<const T>(layer.grad_a())),
               to_host_raw<H, T>(ctx, db.cview())};
  };
  LoraOf<H, T> first(ctx, config_for(sh));
  LoraOf<H, T> second(ctx, config_for(sh));
  load<H, T>(ctx, first, p.a, p.b);
  load<H, T>(ctx, second, p.a, p.b);
  const Run r1 = run(first), r2 = run(first), r3 = run(second);
  for (const Run* r : {&r2, &r3}) {
    CHECK(first_bit_difference(r1.y, r->y) == -1);
    CHECK(first_bit_difference(r1.dx, r->dx) == -1);
    CHECK(first_bit_difference(r1.da, r->da) == -1);
    CHECK(first_bit_difference(r1.db, r->db) == -1);
  }
}

/// Every argument check: the message names the argument and both shapes, the
/// code says what kind of error, and a rejected call changes nothing.
template <class H, class T>
void rejects_bad_input() {
  typename H::Ctx ctx;
  const LoraShape sh{5, 16, 12, 4};
  const std::uint64_t seed = 800;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  using rankwise::WeightLayout;
  constexpr auto kArg = ErrorCode::kInvalidArgument;
  const LoraConfig cfg = config_for(sh);
  LoraOf<H, T> layer(ctx, cfg);
  const LoraProblem p = make_problem<H, T>(sh, seed);
  load<H, T>(ctx, layer, p.a, p.b);
  const auto x = to_device<H, T>(ctx, p.x);
  const auto dy = to_device<H, T>(ctx, p.dy);
  auto y = to_device<H, T>(ctx, p.y0);
  auto dx = to_device<H, T>(ctx, p.dx0);
  layer.backward(x.cview(), dy.cview());
  const std::vector<T> ga = to_host_raw<H, T>(ctx, MatrixView<const T>(layer.grad_a()));
  const std::vector<T> y_bits = to_host_raw<H, T>(ctx, y.cview());

  const auto x_wide = to_device<H, T>(ctx, HostMatrix(5, 15));
  auto y_wide = to_device<H, T>(ctx, HostMatrix(5, 13));
  auto y_short = to_device<H, T>(ctx, HostMatrix(4, 12));
  const auto dy_narrow = to_device<H, T>(ctx, HostMatrix(5, 11));
  auto dx_wide = to_device<H, T>(ctx, HostMatrix(5, 17));
  const auto a_t = to_device<H, T>(ctx, transpose(p.a));  // (d_in x r)
  const auto b_t = to_device<H, T>(ctx, transpose(p.b));  // (r x d_out): internal, not PEFT
  auto db_t = to_device<H, T>(ctx, HostMatrix(4, 12));
  auto w_out_in = to_device<H, T>(ctx, HostMatrix(12, 16));
  auto w_in_out = to_device<H, T>(ctx, HostMatrix(16, 12));

  RWTEST_CHECK_ERROR(kArg, "x (n x d_in): expected shape (5 x 16), got (5 x 15)",
                     layer.forward(x_wide.cview(), y.view()));
  RWTEST_CHECK_ERROR(kArg, "y (n x d_out): expected shape (5 x 12), got (5 x 13)",
                     layer.forward(x.cview(), y_wide.view()));
  RWTEST_CHECK_ERROR(kArg, "y (n x d_out): expected shape (5 x 12), got (4 x 12)",
                     layer.forward(x.cview(), y_short.view()));
  RWTEST_CHECK_ERROR(kArg, "dy (n x d_out): expected shape (5 x 12), got (5 x 11)",
                     layer.backward(x.cview(), dy_narrow.cview()));
  RWTEST_CHECK_ERROR(kArg, "dx (n x d_in): expected shape (5 x 16), got (5 x 17)",
                     layer.backward(x.cview(), dy.cview(), dx_wide.view()));
  RWTEST_CHECK_ERROR(kArg, "A (r x d_in): expected shape (4 x 16), got (16 x 4)",
                     layer.set_a(a_t.cview()));
  RWTEST_CHECK_ERROR(kArg, "B (d_out x r): expected shape (12 x 4), got (4 x 12)",
                     layer.set_b(b_t.cview()));
  RWTEST_CHECK_ERROR(kArg, "B (d_out x r): expected shape (12 x 4), got (4 x 12)",
                     layer.get_b(db_t.view()));
  RWTEST_CHECK_ERROR(kArg, "dB (d_out x r): expected shape (12 x 4), got (4 x 12)",
                     layer.get_grad_b(db_t.view()));
  RWTEST_CHECK_ERROR(kArg, "w0 (d_out x d_in): expected shape (12 x 16), got (16 x 12)",
                     layer.merge(w_in_out.view(), WeightLayout::kOutIn));
  RWTEST_CHECK_ERROR(kArg,
                     "w0 (d_in x d_out), fan_in_fan_out: expected shape (16 x 12), got (12 x 16)",
                     layer.unmerge(w_out_in.view(), WeightLayout::kInOut));
  RWTEST_CHECK_ERROR(kArg, "w0 (d_out x d_in): expected shape (12 x 16), got (16 x 12)",
                     layer.forward(x.cview(), w_in_out.cview(), WeightLayout::kOutIn, y.view()));

  // Null data, a too-small leading dimension, the wrong memory space.
  const MatrixView<const T> x_null(nullptr, 5, 16, H::Backend::kMemorySpace);
  RWTEST_CHECK_ERROR(kArg, "x (n x d_in): null data for a non-empty (5 x 16) matrix",
                     layer.forward(x_null, y.view()));
  const MatrixView<const T> x_short_ld(x.buf.data(), 5, 16, H::Backend::kMemorySpace, 8);
  RWTEST_CHECK_ERROR(kArg, "x (n x d_in): leading dimension 8 is smaller than its 16 columns",
                     layer.forward(x_short_ld, y.view()));
  std::vector<T> host(5 * 16);
  const MatrixView<const T> x_foreign(host.data(), 5, 16, foreign_space<H>());
  const std::string space_msg = std::string("x (n x d_in): expected ") +
                                rankwise::to_string(H::Backend::kMemorySpace) + " memory, got " +
                                rankwise::to_string(foreign_space<H>());
  RWTEST_CHECK_ERROR(ErrorCode::kMemorySpace, space_msg, layer.forward(x_foreign, y.view()));
  RWTEST_CHECK_ERROR(ErrorCode::kMemorySpace, "A (r x d_in): expected",
                     layer.set_a(MatrixView<const T>(host.data(), 4, 16, foreign_space<H>())));
  RWTEST_CHECK_ERROR(
      ErrorCode::kMemorySpace, "dx (n x d_in): expected",
      layer.backward(x.cview(), dy.cview(), MatrixView<T>(host.data(), 5, 16, foreign_space<H>())));

  // Nothing changed: y untouched, gradients as before.
  CHECK(first_bit_difference(to_host_raw<H, T>(ctx, y.cview()), y_bits) == -1);
  CHECK(first_bit_difference(to_host_raw<H, T>(ctx, MatrixView<const T>(layer.grad_a())), ga) ==
        -1);

  // Invalid configurations never reach an allocation.
  auto with = [&](auto change) {
    LoraConfig c = cfg;
    change(c);
    return c;
  };
  RWTEST_CHECK_ERROR(kArg, "LoraConfig.rank must be positive, got 0",
                     (void)LoraOf<H, T>(ctx, with([](LoraConfig& c) { c.rank = 0; })));
  RWTEST_CHECK_ERROR(kArg, "LoraConfig.d_in must be positive, got 0",
                     (void)LoraOf<H, T>(ctx, with([](LoraConfig& c) { c.d_in = 0; })));
  RWTEST_CHECK_ERROR(kArg, "LoraConfig.d_out must be positive, got -3",
                     (void)LoraOf<H, T>(ctx, with([](LoraConfig& c) { c.d_out = -3; })));
  for (double alpha : {std::nan(""), std::numeric_limits<double>::infinity(),
                       -std::numeric_limits<double>::infinity()}) {
    CAPTURE(alpha);
    RWTEST_CHECK_ERROR(kArg, "LoraConfig.alpha must be finite",
                       (void)LoraOf<H, T>(ctx, with([&](LoraConfig& c) { c.alpha = alpha; })));
    RWTEST_CHECK_ERROR(kArg, "LoraConfig.alpha must be finite",
                       (void)LoraOf<H, T>(ctx, with([&](LoraConfig& c) {
                                            c.alpha = alpha;
                                            c.scale_rule = ScaleRule::kAlphaOverSqrtRank;
                                          })));
  }
}

/// The low-level API on caller-owned memory and workspace: sizes, results,
/// and rejection of a short, misaligned or null workspace, a bad scale and a
/// rank-0 factor, before anything is written.
template <class H, class T>
void low_level_api() {
  using Backend = typename H::Backend;
  typename H::Ctx ctx;
  const LoraShape sh{7, 20, 9, 3};
  const std::uint64_t seed = 900;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  const double s = 1.75;
  constexpr auto kArg = ErrorCode::kInvalidArgument;

  const std::size_t fwd_bytes = rankwise::lora_forward_workspace_bytes<T>(sh.n, sh.r);
  const std::size_t bwd_bytes = rankwise::lora_backward_workspace_bytes<T>(sh.n, sh.r);
  CHECK(fwd_bytes == rankwise::align_up(sh.n * sh.r * sizeof(T), 256));
  CHECK(bwd_bytes == 2 * fwd_bytes);
  CHECK(rankwise::lora_forward_workspace_bytes<T>(100, 16) ==
        rankwise::align_up(100 * 16 * sizeof(T), 256));
  CHECK(rankwise::lora_backward_workspace_bytes<T>(100, 16) ==
        2 * rankwise::align_up(100 * 16 * sizeof(T), 256));

  const LoraProblem p = make_problem<H, T>(sh, seed);
  const auto x = to_device<H, T>(ctx, p.x);
  const auto a = to_device<H, T>(ctx, p.a);
  const auto bt = to_device<H, T>(ctx, transpose(p.b));
  const auto dy = to_device<H, T>(ctx, p.dy);
  auto y = to_device<H, T>(ctx, p.y0);
  auto dx = to_device<H, T>(ctx, p.dx0);
  const double nan = std::nan("");
  auto da = to_device<H, T>(ctx, HostMatrix(sh.r, sh.d_in, nan));    // overwritten
  auto dbt = to_device<H, T>(ctx, HostMatrix(sh.r, sh.d_out, nan));  // overwritten
  rankwise::Buffer<Backend, WorkspaceWord> ws(
      rankwise::ceil_div(static_cast<std::int64_t>(bwd_bytes), sizeof(WorkspaceWord)));

  rankwise::lora_forward<Backend, T>(ctx, s, x.cview(), a.cview(), bt.cview(), y.view(), ws.data(),
                                     fwd_bytes);
  const Bound tol = tolerance<T>(2, chain(sh));
  const Expected e = expect_forward(s, p.x, p.a, p.b, p.y0);
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, y), e.ref, e.mag, tol);

  rankwise::lora_backward<Backend, T>(ctx, s, x.cview(), a.cview(), bt.cview(), dy.cview(),
                                      dx.view(), da.view(), dbt.view(), false, ws.data(),
                                      bwd_bytes);
  const ExpectedGrads g = expect_backward(s, p.x, p.a, p.b, p.dy);
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, da), g.ref.da, g.mag.da, tol);
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dbt), transpose(g.ref.db), transpose(g.mag.db), tol);
  const Expected e_dx = g.dx_after(p.dx0);
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dx), e_dx.ref, e_dx.mag, tol);

  const HostMatrix w0 = quantize<H, T>(random_matrix(sh.d_out, sh.d_in, seed * 8 + 7));
  auto w = to_device<H, T>(ctx, w0);
  rankwise::lora_merge<Backend, T>(ctx, s, a.cview(), bt.cview(), w.view(),
                                   rankwise::WeightLayout::kOutIn, -1.0);
  const Expected unmerged = expect_merge(w0, rankwise::WeightLayout::kOutIn, p.a, p.b, s, -1.0);
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, w), unmerged.ref, unmerged.mag, tolerance<T>(1, chain(sh)));
  auto yb = to_device<H, T>(ctx, HostMatrix(sh.n, sh.d_out, nan));
  rankwise::base_forward<Backend, T>(ctx, x.cview(), w.cview(), rankwise::WeightLayout::kOutIn,
                                     yb.view());
  const HostMatrix w_now = to_host<H, T>(ctx, w);
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, yb),
                     ref_base_forward(p.x, w_now, rankwise::WeightLayout::kOutIn),
                     ref_base_forward(abs_of(p.x), abs_of(w_now), rankwise::WeightLayout::kOutIn),
                     tolerance<T>(1, chain(sh)));

  // Rejections; y must be untouched afterwards.
  const std::vector<T> y_bits = to_host_raw<H, T>(ctx, y.cview());
  auto fwd = [&](double scale, MatrixView<const T> a_in, void* w_ptr, std::size_t w_bytes) {
    rankwise::lora_forward<Backend, T>(ctx, scale, x.cview(), a_in, bt.cview(), y.view(), w_ptr,
                                       w_bytes);
  };
  RWTEST_CHECK_ERROR(kArg,
                     "lora_forward: workspace of " + std::to_string(fwd_bytes - 1) +
                         " bytes is too small, need at least " + std::to_string(fwd_bytes),
                     fwd(s, a.cview(), ws.data(), fwd_bytes - 1));
  RWTEST_CHECK_ERROR(
      kArg, "lora_forward: workspace must be 256-byte aligned",
      fwd(s, a.cview(), reinterpret_cast<unsigned char*>(ws.data()) + 64, fwd_bytes));
  RWTEST_CHECK_ERROR(kArg, "lora_forward: workspace is null",
                     fwd(s, a.cview(), nullptr, fwd_bytes));
  RWTEST_CHECK_ERROR(kArg, "lora_forward: scale must be finite, got nan",
                     fwd(nan, a.cview(), ws.data(), fwd_bytes));
  RWTEST_CHECK_ERROR(kArg, "lora_forward: scale must be finite, got inf",
                     fwd(std::numeric_limits<double>::infinity(), a.cview(), ws.data(), fwd_bytes));
  RWTEST_CHECK_ERROR(kArg, "lora_forward: a must have at least one rank (row), got (0 x 20)",
                     fwd(s, MatrixView<const T>(a.buf.data(), 0, sh.d_in, Backend::kMemorySpace),
                         ws.data(), fwd_bytes));
  RWTEST_CHECK_ERROR(kArg, "bt (r x d_out): expected shape (2 x 9), got (3 x 9)",
                     fwd(s, MatrixView<const T>(a.buf.data(), 2, sh.d_in, Backend::kMemorySpace),
                         ws.data(), fwd_bytes));
  RWTEST_CHECK_ERROR(kArg,
                     "lora_backward: workspace of " + std::to_string(bwd_bytes - 256) +
                         " bytes is too small, need at least " + std::to_string(bwd_bytes),
                     rankwise::lora_backward<Backend, T>(
                         ctx, s, x.cview(), a.cview(), bt.cview(), dy.cview(), dx.view(), da.view(),
                         dbt.view(), false, ws.data(), bwd_bytes - 256));
  RWTEST_CHECK_ERROR(kArg, "lora_merge: scale must be finite",
                     rankwise::lora_merge<Backend, T>(ctx, nan, a.cview(), bt.cview(), w.view(),
                                                      rankwise::WeightLayout::kOutIn, 1.0));
  CHECK(first_bit_difference(to_host_raw<H, T>(ctx, y.cview()), y_bits) == -1);
}

/// Views with ld > cols everywhere: results match and the padding between
/// rows is never written.
template <class H, class T>
void strided_views() {
  typename H::Ctx ctx;
  const LoraShape sh{6, 13, 10, 3};
  const std::uint64_t seed = 1000;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  const double pad = 777.0;  // sentinel in the padding
  const LoraConfig cfg = config_for(sh);
  const double s = cfg.scale();
  LoraOf<H, T> layer(ctx, cfg);
  const LoraProblem p = make_problem<H, T>(sh, seed);
  const auto a = to_device<H, T>(ctx, p.a, sh.d_in + 3, pad);
  const auto b = to_device<H, T>(ctx, p.b, sh.r + 5, pad);
  layer.set_a(a.cview());
  layer.set_b(b.cview());
  const auto x = to_device<H, T>(ctx, p.x, sh.d_in + 5, pad);
  const auto dy = to_device<H, T>(ctx, p.dy, sh.d_out + 7, pad);
  auto y = to_device<H, T>(ctx, p.y0, sh.d_out + 3, pad);
  auto dx = to_device<H, T>(ctx, p.dx0, sh.d_in + 2, pad);

  const Bound tol = tolerance<T>(2, chain(sh));
  layer.forward(x.cview(), y.view());
  const Expected e = expect_forward(s, p.x, p.a, p.b, p.y0);
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, y), e.ref, e.mag, tol);
  CHECK(padding_intact<H, T>(ctx, y, pad));

  layer.backward(x.cview(), dy.cview(), dx.view());
  const ExpectedGrads g = expect_backward(s, p.x, p.a, p.b, p.dy);
  const Expected e_dx = g.dx_after(p.dx0);
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dx), e_dx.ref, e_dx.mag, tol);
  CHECK(padding_intact<H, T>(ctx, dx, pad));
  auto db = to_device<H, T>(ctx, HostMatrix(sh.d_out, sh.r), sh.r + 1, pad);
  layer.get_grad_b(db.view());
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, db), g.ref.db, g.mag.db, tol);
  CHECK(padding_intact<H, T>(ctx, db, pad));

  auto b_out = to_device<H, T>(ctx, HostMatrix(sh.d_out, sh.r), sh.r + 2, pad);
  layer.get_b(b_out.view());
  CHECK(compare(to_host<H, T>(ctx, b_out), p.b, "B").max_abs_err == 0.0);
  CHECK(padding_intact<H, T>(ctx, b_out, pad));

  for (const auto layout : {rankwise::WeightLayout::kOutIn, rankwise::WeightLayout::kInOut}) {
    INFO("layout " << layout_name(layout));
    const HostMatrix w0 = quantize<H, T>(base_shape(layout, sh.d_in, sh.d_out, seed * 8 + 7));
    auto w = to_device<H, T>(ctx, w0, w0.cols + 4, pad);
    layer.merge(w.view(), layout);
    const Expected merged = expect_merge(w0, layout, p.a, p.b, s);
    RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, w), merged.ref, merged.mag, tolerance<T>(1, chain(sh)));
    CHECK(padding_intact<H, T>(ctx, w, pad));
  }
}

/// A view of one row may have any leading dimension (check_view and
/// MatrixView::contiguous() say so): rank 1, one token, and every one-row view
/// with ld = 1 < cols, through the layer and the low level.
template <class H, class T>
void single_row_views_ignore_ld() {
  using Backend = typename H::Backend;
  typename H::Ctx ctx;
  const LoraShape sh{1, 10, 7, 1};
  const std::uint64_t seed = 1200;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  const LoraConfig cfg = config_for(sh);
  const double s = cfg.scale();
  const Bound tol = tolerance<T>(2, chain(sh));
  LoraOf<H, T> layer(ctx, cfg);
  const LoraProblem p = make_problem<H, T>(sh, seed);
  auto one_row = [](auto& m) {
    REQUIRE(m.rows == 1);
    return MatrixView<T>(m.buf.data(), 1, m.cols, Backend::kMemorySpace, 1);
  };
  auto a = to_device<H, T>(ctx, p.a);
  const auto b = to_device<H, T>(ctx, p.b);
  auto x = to_device<H, T>(ctx, p.x);
  auto dy = to_device<H, T>(ctx, p.dy);
  auto y = to_device<H, T>(ctx, p.y0);
  auto dx = to_device<H, T>(ctx, p.dx0);
  layer.set_a(one_row(a));
  layer.set_b(b.cview());

  layer.forward(one_row(x), one_row(y));
  const Expected e = expect_forward(s, p.x, p.a, p.b, p.y0);
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, y), e.ref, e.mag, tol);

  layer.backward(one_row(x), one_row(dy), one_row(dx));
  const ExpectedGrads g = expect_backward(s, p.x, p.a, p.b, p.dy);
  RWTEST_CHECK_CLOSE(grad_a_of<H, T>(ctx, layer), g.ref.da, g.mag.da, tol);
  const Expected e_dx = g.dx_after(p.dx0);
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dx), e_dx.ref, e_dx.mag, tol);

  auto a_out = to_device<H, T>(ctx, HostMatrix(1, sh.d_in));
  layer.get_a(one_row(a_out));
  CHECK(compare(to_host<H, T>(ctx, a_out), p.a, "A").max_abs_err == 0.0);

  auto bt = to_device<H, T>(ctx, transpose(p.b));  // (1 x d_out)
  auto y2 = to_device<H, T>(ctx, p.y0);
  rankwise::Buffer<Backend, WorkspaceWord> ws(1);
  rankwise::lora_forward<Backend, T>(ctx, s, one_row(x), one_row(a), one_row(bt), one_row(y2),
                                     ws.data(), sizeof(WorkspaceWord));
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, y2), e.ref, e.mag, tol);
}

/// Construction zeroes everything; set/get round-trip bit for bit; bt() holds
/// Bᵀ; parameters() exposes the internal tensors and their gradients.
template <class H, class T>
void parameters_and_accessors() {
  typename H::Ctx ctx;
  const LoraShape sh{4, 19, 11, 5};
  const std::uint64_t seed = 1100;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  LoraOf<H, T> layer(ctx, config_for(sh));
  CHECK(layer.num_parameters() == sh.r * (sh.d_in + sh.d_out));
  CHECK(compare(to_host<H, T>(ctx, MatrixView<const T>(layer.a())), HostMatrix(sh.r, sh.d_in), "A")
            .max_abs_err == 0.0);
  CHECK(
      compare(to_host<H, T>(ctx, MatrixView<const T>(layer.bt())), HostMatrix(sh.r, sh.d_out), "Bt")
          .max_abs_err == 0.0);
  CHECK(compare(grad_a_of<H, T>(ctx, layer), HostMatrix(sh.r, sh.d_in), "dA").max_abs_err == 0.0);
  CHECK(compare(grad_b_of<H, T>(ctx, layer), HostMatrix(sh.d_out, sh.r), "dB").max_abs_err == 0.0);

  // A fresh adapter (B = 0) adds exact zeros.
  const LoraProblem p = make_problem<H, T>(sh, seed);
  const auto x = to_device<H, T>(ctx, p.x);
  auto y = to_device<H, T>(ctx, p.y0);
  layer.forward(x.cview(), y.view());
  CHECK(compare(to_host<H, T>(ctx, y), p.y0, "y").max_abs_err == 0.0);

  load<H, T>(ctx, layer, p.a, p.b);
  DeviceMatrix<H, T> a_out(sh.r, sh.d_in), b_out(sh.d_out, sh.r);
  layer.get_a(a_out.view());
  layer.get_b(b_out.view());
  CHECK(compare(to_host<H, T>(ctx, a_out), p.a, "A").max_abs_err == 0.0);
  CHECK(compare(to_host<H, T>(ctx, b_out), p.b, "B").max_abs_err == 0.0);
  CHECK(compare(to_host<H, T>(ctx, MatrixView<const T>(layer.bt())), transpose(p.b), "Bt")
            .max_abs_err == 0.0);

  const auto params = layer.parameters();
  REQUIRE(params.size() == 2);
  CHECK(params[0].name == "lora_A");
  CHECK(params[1].name == "lora_B_t");
  CHECK(params[0].value.data == layer.a().data);
  CHECK(params[0].grad.data == layer.grad_a().data);
  CHECK(params[1].value.data == layer.bt().data);
  CHECK(params[1].grad.data == layer.grad_bt().data);
  for (const auto& prm : params) {
    CHECK(prm.value.rows == sh.r);
    CHECK(prm.grad.rows == prm.value.rows);
    CHECK(prm.grad.cols == prm.value.cols);
    CHECK(prm.value.space == H::Backend::kMemorySpace);
  }
  CHECK(params[0].value.cols == sh.d_in);
  CHECK(params[1].value.cols == sh.d_out);
}

}  // namespace lora_cases
}  // namespace rwtest

/// Instantiates every LoRA case for HARNESS and the storage types that follow,
/// tagged TAG (e.g. "[cpu]"): the same bodies on every backend.
#define RWTEST_LORA_TEST_CASES(HARNESS, TAG, ...)                                                \
  TEMPLATE_TEST_CASE("lora: forward matches the double reference", "[lora]" TAG, __VA_ARGS__) {  \
    ::rwtest::lora_cases::forward_matches_reference<HARNESS, TestType>();                        \
  }                                                                                              \
  TEMPLATE_TEST_CASE("lora: forward with a base weight in both layouts", "[lora]" TAG,           \
                     __VA_ARGS__) {                                                              \
    ::rwtest::lora_cases::forward_with_base_weight<HARNESS, TestType>();                         \
  }                                                                                              \
  TEMPLATE_TEST_CASE("lora: backward matches the double reference", "[lora]" TAG, __VA_ARGS__) { \
    ::rwtest::lora_cases::backward_matches_reference<HARNESS, TestType>();                       \
  }                                                                                              \
  TEMPLATE_TEST_CASE("lora: merge, forward through the merged base, unmerge", "[lora]" TAG,      \
                     __VA_ARGS__) {                                                              \
    ::rwtest::lora_cases::merge_round_trip<HARNESS, TestType>();                                 \
  }                                                                                              \
  TEMPLATE_TEST_CASE("lora: init_peft", "[lora][init]" TAG, __VA_ARGS__) {                       \
    ::rwtest::lora_cases::init_peft_contract<HARNESS, TestType>();                               \
  }                                                                                              \
  TEMPLATE_TEST_CASE("lora: rsLoRA scale", "[lora]" TAG, __VA_ARGS__) {                          \
    ::rwtest::lora_cases::rslora_scale<HARNESS, TestType>();                                     \
  }                                                                                              \
  TEMPLATE_TEST_CASE("lora: zero tokens", "[lora]" TAG, __VA_ARGS__) {                           \
    ::rwtest::lora_cases::zero_tokens<HARNESS, TestType>();                                      \
  }                                                                                              \
  TEMPLATE_TEST_CASE("lora: deterministic", "[lora][determinism]" TAG, __VA_ARGS__) {            \
    ::rwtest::lora_cases::deterministic<HARNESS, TestType>();                                    \
  }                                                                                              \
  TEMPLATE_TEST_CASE("lora: rejects bad input", "[lora][errors]" TAG, __VA_ARGS__) {             \
    ::rwtest::lora_cases::rejects_bad_input<HARNESS, TestType>();                                \
  }                                                                                              \
  TEMPLATE_TEST_CASE("lora: low-level API with a caller workspace", "[lora][low-level]" TAG,     \
                     __VA_ARGS__) {                                                              \
    ::rwtest::lora_cases::low_level_api<HARNESS, TestType>();                                    \
  }                                                                                              \
  TEMPLATE_TEST_CASE("lora: strided views", "[lora]" TAG, __VA_ARGS__) {                         \
    ::rwtest::lora_cases::strided_views<HARNESS, TestType>();                                    \
  }                                                                                              \
  TEMPLATE_TEST_CASE("lora: parameters and accessors", "[lora]" TAG, __VA_ARGS__) {              \
    ::rwtest::lora_cases::parameters_and_accessors<HARNESS, TestType>();                         \
  }                                                                                              \
  TEMPLATE_TEST_CASE("lora: one-row views with any leading dimension", "[lora]" TAG,             \
                     __VA_ARGS__) {                                                              \
    ::rwtest::lora_cases::single_row_views_ignore_ld<HARNESS, TestType>();                       \
  }
