// Rank-expert router and SMoRA test bodies, written once over a harness H
// (support/harness_*.hpp) and a storage type T, instantiated for every backend
// by RWTEST_SMORA_TEST_CASES. Numbers are checked against the plain-loop
// double reference of support/smora_reference.hpp with the tolerances of
// support/smora_tolerance.hpp; selections (experts, units, counts) and the
// balance bias are checked exactly. Every case prints its backend, type,
// shape, options and seed on failure.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <string>
#include <type_traits>
#include <vector>

#include "rankwise/core/numeric.hpp"
#include "rankwise/core/random.hpp"
#include "rankwise/core/router_config.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/core/workspace.hpp"
#include "rankwise/layers/lora.hpp"
#include "rankwise/layers/rank_units.hpp"
#include "rankwise/layers/router.hpp"
#include "rankwise/layers/smora.hpp"
#include "support/compare.hpp"
#include "support/harness_common.hpp"
#include "support/reference.hpp"
#include "support/smora_io.hpp"
#include "support/smora_reference.hpp"
#include "support/smora_tolerance.hpp"

namespace rwtest {
namespace smora_cases {

using rankwise::ErrorCode;
using rankwise::MatrixView;
using rankwise::Mode;
using rankwise::RankUnitPath;
using rankwise::SmoraConfig;

template <class T>
using AccOf = rankwise::accumulator_t<T>;
template <class H, class T>
using SmoraOf = rankwise::Smora<T, typename H::Backend>;

// ---------------------------------------------------------------------------
// Shapes, options, problems.

/// n tokens, d_in -> d_out, rank r, k ranks per token in experts of g ranks.
struct SmoraShape {
  std::int64_t n, d_in, d_out, r, k, g;
};
inline std::ostream& operator<<(std::ostream& out, const SmoraShape& s) {
  return out << "{n " << s.n << ", d_in " << s.d_in << ", d_out " << s.d_out << ", r " << s.r
             << ", k " << s.k << ", g " << s.g << "}";
}

/// Router options that change the numbers.
struct RouterOptions {
  ScoreFunction score = ScoreFunction::kSigmoid;
  GateNormalization normalization = GateNormalization::kSumToK;
  bool gate_uses_bias = true;
};
inline std::ostream& operator<<(std::ostream& out, const RouterOptions& o) {
  const char* norm = o.normalization == GateNormalization::kSumToK     ? "kSumToK"
                     : o.normalization == GateNormalization::kSumToOne ? "kSumToOne"
                                                                       : "kNone";
  return out << "{" << (o.score == ScoreFunction::kSigmoid ? "sigmoid" : "softmax") << ", "
             << norm << ", gate_uses_bias " << o.gate_uses_bias << "}";
}

/// Every combination: 2 score functions x 3 normalisations x gate_uses_bias.
inline std::vector<RouterOptions> all_router_options() {
  std::vector<RouterOptions> out;
  for (auto score : {ScoreFunction::kSigmoid, ScoreFunction::kSoftmax})
    for (auto norm : {GateNormalization::kSumToK, GateNormalization::kSumToOne,
                      GateNormalization::kNone})
      for (bool with_bias : {true, false}) out.push_back({score, norm, with_bias});
  return out;
}

inline const char* path_name(RankUnitPath p) {
  return p == RankUnitPath::kSparse ? "kSparse" : p == RankUnitPath::kDense ? "kDense" : "kAuto";
}

/// Router shapes (d_out unused): g = 1, 2, 3, k = r, k = 1, one expert, no token.
inline const std::vector<SmoraShape>& router_shapes() {
  static const std::vector<SmoraShape> shapes = {
      {9, 13, 0, 8, 3, 1}, {17, 7, 0, 16, 4, 2}, {6, 10, 0, 12, 6, 3}, {4, 5, 0, 6, 6, 1},
      {11, 3, 0, 4, 1, 1}, {3, 4, 0, 2, 2, 2},   {0, 5, 0, 8, 2, 1},
  };
  return shapes;
}

/// Layer shapes: d not a multiple of 8, one token, g = 1, 2, 3, k = r, d_out = 1,
/// and n past the CPU backend's dense crossover.
inline const std::vector<SmoraShape>& layer_shapes() {
  static const std::vector<SmoraShape> shapes = {
      {7, 13, 9, 8, 3, 1},   {1, 5, 3, 4, 2, 1},    {33, 19, 21, 16, 4, 2}, {20, 11, 17, 12, 6, 3},
      {9, 16, 8, 8, 8, 1},   {70, 37, 23, 16, 2, 1}, {5, 2, 1, 6, 2, 2},    {12, 8, 24, 6, 6, 3},
  };
  return shapes;
}

inline RouterConfig router_config(const SmoraShape& s, const RouterOptions& o = {}) {
  RouterConfig c;
  c.num_units = s.r;
  c.group_size = s.g;
  c.top_k = s.k;
  c.score = o.score;
  c.normalization = o.normalization;
  c.gate_uses_bias = o.gate_uses_bias;
  return c;
}

inline SmoraConfig smora_config(const SmoraShape& s, const RouterOptions& o = {},
                                RankUnitPath path = RankUnitPath::kAuto, double aux = 0.0) {
  SmoraConfig c;
  c.d_in = s.d_in;
  c.d_out = s.d_out;
  c.router = router_config(s, o);
  c.alpha = 16.0;
  c.path = path;
  c.aux_loss_coef = aux;
  return c;
}

/// Test data, rounded to the storage type (router state to Acc), with the
/// reference routing of those rounded values. A scaled like PEFT's init, B
/// like a trained one, W_r large enough that scores spread over (0, 1).
struct SmoraProblem {
  HostMatrix x;               // (n, d_in)
  HostMatrix a;               // (r, d_in)
  HostMatrix b;               // (d_out, r)
  HostMatrix wr;              // (E, d_in)
  std::vector<double> bias;   // (C: E, or r with a per-rank bias)
  HostMask mask;              // (n) or empty
  HostMatrix y0;              // (n, d_out)
  HostMatrix dy;              // (n, d_out)
  HostMatrix dx0;             // (n, d_in)
};

/// A uniform [lo, hi) row from its own stream, so a rejected row is redrawn
/// without disturbing the others.
inline std::vector<double> random_row(std::int64_t cols, std::uint64_t seed, double lo, double hi) {
  return random_matrix(1, cols, seed, lo, hi).v;
}

/// Draws x one token at a time, redrawing a token until its top-k decisions
/// are at least `margin` apart in z (so float and double select alike).
template <class H, class T>
HostMatrix well_separated_x(const RouterConfig& cfg, std::int64_t n, std::int64_t d_in,
                            const HostMatrix& wr, const std::vector<double>& bias, double margin,
                            std::uint64_t seed) {
  HostMatrix x(n, d_in);
  for (std::int64_t t = 0; t < n; ++t) {
    bool ok = false;
    for (std::uint64_t attempt = 0; attempt < 1000 && !ok; ++attempt) {
      HostMatrix row(1, d_in);
      row.v = random_row(d_in, rankwise::mix64(seed * 1000003 + t * 1009 + attempt), -1.0, 1.0);
      row = quantize<H, T>(row);
      if (ref_route(cfg, row, wr, bias).min_margin() >= margin) {
        for (std::int64_t i = 0; i < d_in; ++i) x(t, i) = row(0, i);
        ok = true;
      }
    }
    REQUIRE(ok);
  }
  return x;
}

/// As well_separated_x for logits given directly (n, E), rounded to Acc.
template <class H, class Acc>
HostMatrix well_separated_logits(const RouterConfig& cfg, std::int64_t n,
                                 const std::vector<double>& bias, double margin,
                                 std::uint64_t seed) {
  const std::int64_t E = cfg.num_experts();
  HostMatrix logits(n, E);
  for (std::int64_t t = 0; t < n; ++t) {
    bool ok = false;
    for (std::uint64_t attempt = 0; attempt < 1000 && !ok; ++attempt) {
      HostMatrix row(1, E);
      row.v = random_row(E, rankwise::mix64(seed * 7919 + t * 104729 + attempt), -3.0, 3.0);
      row = quantize<H, Acc>(row);
      if (ref_route_logits(cfg, row, bias).min_margin() >= margin) {
        for (std::int64_t e = 0; e < E; ++e) logits(t, e) = row(0, e);
        ok = true;
      }
    }
    REQUIRE(ok);
  }
  return logits;
}

/// Every third token (1, 4, 7, ...) masked out.
inline HostMask every_third_masked(std::int64_t n) {
  HostMask m(static_cast<std::size_t>(n), 1);
  for (std::int64_t t = 1; t < n; t += 3) m[t] = 0;
  return m;
}

template <class H, class T>
SmoraProblem make_problem(const SmoraShape& s, const RouterConfig& cfg, std::uint64_t seed,
                          bool masked = false, double bias_scale = 0.05) {
  using Acc = AccOf<T>;
  const double ra = 1.0 / std::sqrt(static_cast<double>(s.d_in));
  const double rb = 1.0 / std::sqrt(static_cast<double>(s.r));
  const std::int64_t E = cfg.num_experts(), C = cfg.num_choices();
  SmoraProblem p;
  p.a = quantize<H, T>(random_matrix(s.r, s.d_in, seed * 16 + 1, -ra, ra));
  p.b = quantize<H, T>(random_matrix(s.d_out, s.r, seed * 16 + 2, -rb, rb));
  p.wr = quantize<H, T>(random_matrix(E, s.d_in, seed * 16 + 3, -3 * ra, 3 * ra));
  p.bias = quantize<H, Acc>(random_matrix(1, C, seed * 16 + 4, -bias_scale, bias_scale)).v;
  p.x = well_separated_x<H, T>(cfg, s.n, s.d_in, p.wr, p.bias, SmoraTolerance<T>::kMargin,
                               seed * 16 + 5);
  p.y0 = quantize<H, T>(random_matrix(s.n, s.d_out, seed * 16 + 6));
  p.dy = quantize<H, T>(random_matrix(s.n, s.d_out, seed * 16 + 7));
  p.dx0 = quantize<H, T>(random_matrix(s.n, s.d_in, seed * 16 + 8));
  if (masked) p.mask = every_third_masked(s.n);
  return p;
}

// ---------------------------------------------------------------------------
// Backend plumbing.

/// A workspace of exactly `bytes` bytes (what the *_workspace_bytes functions
/// asked for), 256-byte aligned, in backend memory.
template <class H>
struct Workspace {
  struct alignas(rankwise::kWorkspaceAlignment) Word {
    unsigned char bytes[rankwise::kWorkspaceAlignment];
  };
  rankwise::Buffer<typename H::Backend, Word> buf;
  std::size_t bytes;
  explicit Workspace(std::size_t bytes_)
      : buf(static_cast<std::int64_t>(rankwise::ceil_div(static_cast<std::int64_t>(bytes_),
                                                         sizeof(Word)))),
        bytes(bytes_) {}
  void* data() { return buf.data(); }
};

/// Caller-owned routing outputs for the low-level router, zero-filled (so
/// every index in them is valid before the router writes).
template <class H, class T>
struct RoutingOut {
  using Acc = AccOf<T>;
  DeviceMatrix<H, Acc> scores;
  RawMatrix<H, std::int32_t> experts, units;
  DeviceMatrix<H, Acc> gates;
  RawMatrix<H, std::int32_t> counts;
  RoutingOut(typename H::Ctx& ctx, std::int64_t n, const RouterConfig& cfg)
      : scores(to_device<H, Acc>(ctx, HostMatrix(n, cfg.num_experts()))),
        experts(zeros(ctx, n, cfg.choices_per_token())),
        units(zeros(ctx, n, cfg.top_k)),
        gates(to_device<H, Acc>(ctx, HostMatrix(n, cfg.top_k))),
        counts(zeros(ctx, 1, cfg.num_choices())) {}
  static RawMatrix<H, std::int32_t> zeros(typename H::Ctx& ctx, std::int64_t rows,
                                          std::int64_t cols) {
    return upload_raw<H, std::int32_t>(
        ctx, std::vector<std::int32_t>(static_cast<std::size_t>(rows * cols), 0), rows, cols);
  }
  rankwise::RoutingBuffers<Acc> buffers() {
    return {scores.view(), experts.view(), units.view(), gates.view(), counts.view()};
  }
};

/// A routing downloaded to the host.
struct GotRouting {
  HostMatrix scores, gates;
  std::vector<std::int32_t> experts, units, counts;
};

template <class H, class Acc>
GotRouting fetch_routing(typename H::Ctx& ctx, const rankwise::RoutingBuffers<Acc>& rb) {
  return {to_host<H, Acc>(ctx, MatrixView<const Acc>(rb.scores)),
          to_host<H, Acc>(ctx, MatrixView<const Acc>(rb.gates)),
          download_raw<H, std::int32_t>(ctx, MatrixView<const std::int32_t>(rb.experts)),
          download_raw<H, std::int32_t>(ctx, MatrixView<const std::int32_t>(rb.units)),
          download_raw<H, std::int32_t>(ctx, MatrixView<const std::int32_t>(rb.counts))};
}

/// Selection exact, scores and gates within `tol`.
inline void check_routing(const GotRouting& got, const RefRouting& ref, Bound tol) {
  CHECK(got.experts == ref.experts);
  CHECK(got.units == ref.units);
  CHECK(got.counts == ref.counts);
  RWTEST_CHECK_NORMWISE(got.scores, ref.scores, tol);
  RWTEST_CHECK_NORMWISE(got.gates, ref.gates, tol);
}

/// Writes A, B (PEFT layout), W_r and the bias into the layer's own storage.
template <class H, class T>
void load(typename H::Ctx& ctx, SmoraOf<H, T>& layer, const HostMatrix& a, const HostMatrix& b,
          const HostMatrix& wr, const std::vector<double>& bias) {
  upload_into<H, T>(ctx, a, layer.a());
  upload_into<H, T>(ctx, transpose(b), layer.bt());
  upload_into<H, T>(ctx, wr, layer.wr());
  upload_into<H, AccOf<T>>(ctx, row_of(bias), layer.bias());
}

template <class H, class T>
void load(typename H::Ctx& ctx, SmoraOf<H, T>& layer, const SmoraProblem& p) {
  load<H, T>(ctx, layer, p.a, p.b, p.wr, p.bias);
}

template <class H, class T>
HostMatrix host_of(typename H::Ctx& ctx, MatrixView<T> v) {
  return to_host<H, T>(ctx, MatrixView<const T>(v));
}

template <class H, class T>
std::vector<T> raw_of(typename H::Ctx& ctx, MatrixView<T> v) {
  return to_host_raw<H, T>(ctx, MatrixView<const T>(v));
}

/// The layer's bias as stored (Acc), on the host.
template <class H, class T>
std::vector<AccOf<T>> bias_of(typename H::Ctx& ctx, SmoraOf<H, T>& layer) {
  return raw_of<H, AccOf<T>>(ctx, layer.bias());
}

/// Forward (y = y0 + ...) and, when dy is given, backward with dx = dx0 + ...
template <class H, class T>
struct LayerRun {
  HostMatrix y, da, db, dwr, dx;
  GotRouting routing;
};

/// `mask` holds p.mask in backend memory; the layer keeps a view of it for
/// backward, so it must outlive every backward of this forward.
template <class H, class T>
LayerRun<H, T> run_layer(typename H::Ctx& ctx, SmoraOf<H, T>& layer, const SmoraProblem& p,
                         const DeviceMask<H>& mask, Mode mode = Mode::kInference,
                         bool with_dx = true) {
  LayerRun<H, T> out;
  const auto x = to_device<H, T>(ctx, p.x);
  auto y = to_device<H, T>(ctx, p.y0);
  layer.forward(x.cview(), y.view(), mode, mask.view());
  out.y = to_host<H, T>(ctx, y);
  out.routing = fetch_routing<H, AccOf<T>>(ctx, layer.routing());
  const auto dy = to_device<H, T>(ctx, p.dy);
  auto dx = to_device<H, T>(ctx, p.dx0);
  layer.backward(x.cview(), dy.cview(), with_dx ? dx.view() : MatrixView<T>());
  out.da = host_of<H, T>(ctx, layer.grad_a());
  out.db = transpose(host_of<H, T>(ctx, layer.grad_bt()));
  out.dwr = host_of<H, T>(ctx, layer.grad_wr());
  out.dx = to_host<H, T>(ctx, dx);
  return out;
}

template <class H, class T>
SmoraReference reference_for(const SmoraConfig& cfg, const SmoraProblem& p) {
  return ref_smora(cfg.router, cfg.alpha, cfg.aux_loss_coef, p.x, p.a, p.b, p.wr, p.bias, p.mask,
                   p.y0, p.dy, p.dx0);
}

/// The layer's forward and backward against the reference, selection exact.
template <class H, class T>
void check_layer_against_reference(const LayerRun<H, T>& got, const SmoraReference& ref,
                                   bool with_dx = true) {
  using Tol = SmoraTolerance<T>;
  check_routing(got.routing, ref.routing, SmoraTolerance<AccOf<T>>::kRouter);
  RWTEST_CHECK_NORMWISE(got.y, ref.y, Tol::kForward);
  RWTEST_CHECK_NORMWISE(got.da, ref.da, Tol::kBackward);
  RWTEST_CHECK_NORMWISE(got.db, ref.db, Tol::kBackward);
  RWTEST_CHECK_NORMWISE(got.dwr, ref.dwr, Tol::kBackward);
  if (with_dx) RWTEST_CHECK_NORMWISE(got.dx, ref.dx, Tol::kBackward);
}

// ---------------------------------------------------------------------------
// Router core.

/// router_forward (from X and W_r) and router_forward_from_logits match the
/// reference for every shape, score function, normalisation and
/// gate_uses_bias, with and without a bias and a mask: scores and gates within
/// tolerance, experts, units and counts exactly.
template <class H, class T>
void router_matches_reference() {
  using Acc = AccOf<T>;
  using Backend = typename H::Backend;
  typename H::Ctx ctx;
  std::uint64_t seed = 1000;
  for (const SmoraShape& sh : router_shapes()) {
    for (const RouterOptions& opt : all_router_options()) {
      for (const bool masked : {false, true}) {
        ++seed;
        RWTEST_CONTEXT(H, T, "shape " << sh, seed);
        INFO("options " << opt << ", masked " << masked);
        const RouterConfig cfg = router_config(sh, opt);
        SmoraProblem p = make_problem<H, T>(sh, cfg, seed, masked);
        const bool with_bias = seed % 4 != 0;  // an empty bias view means none
        if (!with_bias) {
          p.bias.clear();
          p.x = well_separated_x<H, T>(cfg, sh.n, sh.d_in, p.wr, p.bias,
                                       SmoraTolerance<T>::kMargin, seed);
        }
        INFO("bias " << (with_bias ? "given" : "none"));
        const auto x = to_device<H, T>(ctx, p.x);
        const auto wr = to_device<H, T>(ctx, p.wr);
        const auto bias = to_device<H, Acc>(ctx, row_of(p.bias));
        const MatrixView<const Acc> bias_view = with_bias ? bias.cview() : MatrixView<const Acc>();
        const DeviceMask<H> mask(ctx, p.mask);
        Workspace<H> ws(rankwise::router_forward_workspace_bytes<T>(sh.n, cfg));
        {
          INFO("router_forward from X and W_r");
          RoutingOut<H, T> out(ctx, sh.n, cfg);
          rankwise::router_forward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias_view,
                                               mask.view(), out.buffers(), true, ws.data(),
                                               ws.bytes);
          const RefRouting ref = ref_route(cfg, p.x, p.wr, p.bias, p.mask);
          check_routing(fetch_routing<H, Acc>(ctx, out.buffers()), ref,
                        SmoraTolerance<Acc>::kRouter);
        }
        {
          INFO("router_forward_from_logits");
          const HostMatrix logits = well_separated_logits<H, Acc>(
              cfg, sh.n, p.bias, SmoraTolerance<T>::kMargin, seed + 77);
          const auto dl = to_device<H, Acc>(ctx, logits);
          RoutingOut<H, T> out(ctx, sh.n, cfg);
          rankwise::router_forward_from_logits<Backend, T>(ctx, cfg, dl.cview(), bias_view,
                                                           mask.view(), out.buffers(), true,
                                                           ws.data(), ws.bytes);
          const RefRouting ref = ref_route_logits(cfg, logits, p.bias, p.mask);
          check_routing(fetch_routing<H, Acc>(ctx, out.buffers()), ref,
                        SmoraTolerance<Acc>::kRouter);
          // The counts are the unmasked tokens' assignments, k/g each.
          std::int64_t total = 0, real = 0;
          for (auto c : ref.counts) total += c;
          for (std::int64_t t = 0; t < sh.n; ++t) real += token_counts(p.mask, t) ? 1 : 0;
          CHECK(total == real * cfg.experts_per_token());
        }
      }
    }
  }
}

/// Exact ties in z go to the lower expert index: from given logits (equal
/// values, equal values plus equal bias), from X and W_r with identical
/// router rows and exactly representable products, and W_r = 0.
template <class H, class T>
void router_ties_go_to_the_lower_index() {
  using Acc = AccOf<T>;
  using Backend = typename H::Backend;
  typename H::Ctx ctx;
  for (const std::int64_t g : {1, 2}) {
    RWTEST_CONTEXT_OF(H, T, "g " << g);
    // E = 6 experts, 3 per token.
    const SmoraShape sh{5, 4, 0, 6 * g, 3 * g, g};
    const RouterConfig cfg = router_config(sh);
    HostMatrix logits(sh.n, 6);
    const double rows[5][6] = {{0.5, 0.5, 0.5, 0.5, 0.5, 0.5},
                               {0.5, 1, 1, 0, 1, 1},
                               {1, 0, 0, 1, 0, 1},
                               {-1, 2, -1, 2, -1, -1},
                               {0, 0, 0, 0, 0, 0}};
    for (int t = 0; t < 5; ++t)
      for (int e = 0; e < 6; ++e) logits(t, e) = rows[t][e];
    const std::vector<std::int32_t> expected_plain = {0, 1, 2, 1, 2, 4, 0, 3, 5,
                                                      1, 3, 0, 0, 1, 2};
    // Equal bias on equal scores keeps the tie: 1 and 3 tie above the rest.
    const std::vector<double> tie_bias = {0, 0.25, 0, 0.25, 0, 0};
    const std::vector<std::int32_t> expected_row0_biased = {1, 3, 0};
    const auto dl = to_device<H, Acc>(ctx, logits);
    const auto bias = to_device<H, Acc>(ctx, row_of(tie_bias));
    Workspace<H> ws(rankwise::router_forward_workspace_bytes<T>(sh.n, cfg));
    {
      RoutingOut<H, T> out(ctx, sh.n, cfg);
      rankwise::router_forward_from_logits<Backend, T>(ctx, cfg, dl.cview(), {}, {},
                                                       out.buffers(), true, ws.data(), ws.bytes);
      const GotRouting got = fetch_routing<H, Acc>(ctx, out.buffers());
      CHECK(got.experts == expected_plain);
      CHECK(got.experts == ref_route_logits(cfg, logits, {}).experts);
      for (std::int64_t t = 0; t < sh.n; ++t)
        for (std::int64_t j = 0; j < sh.k; ++j)
          CHECK(got.units[t * sh.k + j] == got.experts[t * 3 + j / g] * g + j % g);
    }
    {
      RoutingOut<H, T> out(ctx, sh.n, cfg);
      rankwise::router_forward_from_logits<Backend, T>(ctx, cfg, dl.cview(), bias.cview(), {},
                                                       out.buffers(), true, ws.data(), ws.bytes);
      const GotRouting got = fetch_routing<H, Acc>(ctx, out.buffers());
      CHECK(std::vector<std::int32_t>(got.experts.begin(), got.experts.begin() + 3) ==
            expected_row0_biased);
      CHECK(got.experts == ref_route_logits(cfg, logits, tie_bias).experts);
    }
    {
      // Identical router rows and x, w multiples of 1/4 and 1/2: every
      // product and partial sum is exact, so all logits tie bit for bit.
      HostMatrix wr(6, sh.d_in), x(sh.n, sh.d_in);
      for (std::int64_t e = 0; e < 6; ++e)
        for (std::int64_t i = 0; i < sh.d_in; ++i) wr(e, i) = 0.25 * static_cast<double>(i - 1);
      for (std::int64_t t = 0; t < sh.n; ++t)
        for (std::int64_t i = 0; i < sh.d_in; ++i) x(t, i) = 0.5 * static_cast<double>((t + i) % 5 - 2);
      for (const bool zero_router : {false, true}) {
        INFO("W_r " << (zero_router ? "zero" : "identical rows"));
        const auto dx = to_device<H, T>(ctx, x);
        const auto dwr = to_device<H, T>(ctx, zero_router ? HostMatrix(6, sh.d_in) : wr);
        RoutingOut<H, T> out(ctx, sh.n, cfg);
        rankwise::router_forward<Backend, T>(ctx, cfg, dx.cview(), dwr.cview(), {}, {},
                                             out.buffers(), true, ws.data(), ws.bytes);
        const GotRouting got = fetch_routing<H, Acc>(ctx, out.buffers());
        for (std::int64_t t = 0; t < sh.n; ++t) {
          INFO("token " << t);
          CHECK(got.experts[t * 3 + 0] == 0);
          CHECK(got.experts[t * 3 + 1] == 1);
          CHECK(got.experts[t * 3 + 2] == 2);
        }
        CHECK(got.counts == std::vector<std::int32_t>{5, 5, 5, 0, 0, 0});
      }
    }
  }
}

/// router_backward matches the reference: dW_r = dlogitsᵀ X (overwritten or
/// accumulated) and dx += dlogits W_r, for every option, with the Switch aux
/// term on and off, with and without a mask.
template <class H, class T>
void router_backward_matches_reference() {
  using Acc = AccOf<T>;
  using Backend = typename H::Backend;
  typename H::Ctx ctx;
  std::uint64_t seed = 2000;
  const SmoraShape shapes[] = {{9, 13, 0, 8, 3, 1}, {17, 7, 0, 16, 4, 2}, {6, 10, 0, 12, 6, 3}};
  for (const SmoraShape& sh : shapes) {
    for (const RouterOptions& opt : all_router_options()) {
      for (const double aux : {0.0, 0.375}) {
        ++seed;
        const bool masked = seed % 2 == 0;
        RWTEST_CONTEXT(H, T, "shape " << sh, seed);
        INFO("options " << opt << ", aux " << aux << ", masked " << masked);
        const RouterConfig cfg = router_config(sh, opt);
        const SmoraProblem p = make_problem<H, T>(sh, cfg, seed, masked);
        const HostMatrix dgates = quantize<H, Acc>(random_matrix(sh.n, sh.k, seed * 3 + 1));
        const auto x = to_device<H, T>(ctx, p.x);
        const auto wr = to_device<H, T>(ctx, p.wr);
        const auto bias = to_device<H, Acc>(ctx, row_of(p.bias));
        const auto dg = to_device<H, Acc>(ctx, dgates);
        const DeviceMask<H> mask(ctx, p.mask);
        RoutingOut<H, T> out(ctx, sh.n, cfg);
        Workspace<H> fws(rankwise::router_forward_workspace_bytes<T>(sh.n, cfg));
        rankwise::router_forward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(),
                                             mask.view(), out.buffers(), true, fws.data(),
                                             fws.bytes);
        auto dx = to_device<H, T>(ctx, p.dx0);
        auto dwr = to_device<H, T>(ctx, HostMatrix(cfg.num_experts(), sh.d_in, 123.0));
        Workspace<H> bws(rankwise::router_backward_workspace_bytes<T>(sh.n, cfg));
        rankwise::router_backward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(),
                                              mask.view(), out.buffers(), dg.cview(), aux,
                                              dx.view(), dwr.view(), false, bws.data(), bws.bytes);
        const RefRouting ref = ref_route(cfg, p.x, p.wr, p.bias, p.mask);
        const RouterExpected e =
            expect_router_backward(cfg, ref, p.x, p.wr, {dgates, abs_of(dgates)},
                                   ref_aux_dscores(cfg, ref, p.mask, aux), p.dx0);
        RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, dwr), e.dwr, SmoraTolerance<T>::kBackward);
        RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, dx), e.dx, SmoraTolerance<T>::kBackward);
        // accumulate adds a second pass onto dW_r.
        rankwise::router_backward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(),
                                              mask.view(), out.buffers(), dg.cview(), aux,
                                              MatrixView<T>(), dwr.view(), true, bws.data(),
                                              bws.bytes);
        RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, dwr), twice(e.dwr), SmoraTolerance<T>::kBackward);
      }
    }
  }
}

/// With dgates = 0 and aux_loss_coef > 0, router_backward yields only the
/// Switch aux term: dlogits[n][e] = coef · E · f_e / N · s0 (1 − s0) for
/// unmasked tokens (sigmoid), 0 for masked ones, f_e = c_e / (N k/g); seen
/// through dW_r = dlogitsᵀ X. Written out here, not through the reference's
/// router backward.
template <class H, class T>
void aux_loss_gradient() {
  using Acc = AccOf<T>;
  using Backend = typename H::Backend;
  typename H::Ctx ctx;
  std::uint64_t seed = 2500;
  const SmoraShape shapes[] = {{10, 6, 0, 8, 2, 1}, {14, 9, 0, 12, 6, 3}};
  for (const SmoraShape& sh : shapes) {
    for (const bool masked : {false, true}) {
      ++seed;
      RWTEST_CONTEXT(H, T, "shape " << sh, seed);
      INFO("masked " << masked);
      const RouterConfig cfg = router_config(sh);
      const double coef = 0.75;
      const SmoraProblem p = make_problem<H, T>(sh, cfg, seed, masked);
      const auto x = to_device<H, T>(ctx, p.x);
      const auto wr = to_device<H, T>(ctx, p.wr);
      const auto bias = to_device<H, Acc>(ctx, row_of(p.bias));
      const auto dg = to_device<H, Acc>(ctx, HostMatrix(sh.n, sh.k));
      const DeviceMask<H> mask(ctx, p.mask);
      RoutingOut<H, T> out(ctx, sh.n, cfg);
      Workspace<H> fws(rankwise::router_forward_workspace_bytes<T>(sh.n, cfg));
      rankwise::router_forward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(),
                                           mask.view(), out.buffers(), true, fws.data(), fws.bytes);
      auto dwr = to_device<H, T>(ctx, HostMatrix(cfg.num_experts(), sh.d_in));
      Workspace<H> bws(rankwise::router_backward_workspace_bytes<T>(sh.n, cfg));
      rankwise::router_backward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(),
                                            mask.view(), out.buffers(), dg.cview(), coef,
                                            MatrixView<T>(), dwr.view(), false, bws.data(),
                                            bws.bytes);
      const RefRouting ref = ref_route(cfg, p.x, p.wr, p.bias, p.mask);
      const std::int64_t E = cfg.num_experts();
      double tokens = 0;
      for (std::int64_t t = 0; t < sh.n; ++t) tokens += token_counts(p.mask, t) ? 1 : 0;
      HostMatrix dlogits(sh.n, E);
      for (std::int64_t t = 0; t < sh.n; ++t) {
        if (!token_counts(p.mask, t)) continue;
        for (std::int64_t e = 0; e < E; ++e) {
          const double f = ref.counts[e] / (tokens * static_cast<double>(cfg.experts_per_token()));
          const double s = ref.scores(t, e);
          dlogits(t, e) = coef * static_cast<double>(E) * f / tokens * s * (1.0 - s);
        }
      }
      const SmoraExpected expected = {
          ref_gemm(1.0, dlogits, Op::kTrans, p.x, Op::kNoTrans, 0.0, HostMatrix(E, sh.d_in)),
          ref_gemm(1.0, dlogits, Op::kTrans, abs_of(p.x), Op::kNoTrans, 0.0, HostMatrix(E, sh.d_in))};
      RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, dwr), expected, SmoraTolerance<T>::kBackward);
      // Without the term, dgates = 0 gives no gradient at all.
      rankwise::router_backward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(),
                                            mask.view(), out.buffers(), dg.cview(), 0.0,
                                            MatrixView<T>(), dwr.view(), false, bws.data(),
                                            bws.bytes);
      CHECK(compare(to_host<H, T>(ctx, dwr), HostMatrix(E, sh.d_in), "dW_r").max_abs_err == 0.0);
    }
  }
}

/// Repeated router and layer calls on the same inputs give the same bits.
template <class H, class T>
void deterministic() {
  using Acc = AccOf<T>;
  using Backend = typename H::Backend;
  typename H::Ctx ctx;
  const SmoraShape sh{70, 37, 23, 16, 4, 2};
  const std::uint64_t seed = 2900;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  const RouterConfig cfg = router_config(sh);
  const SmoraProblem p = make_problem<H, T>(sh, cfg, seed, true);
  const auto x = to_device<H, T>(ctx, p.x);
  const auto wr = to_device<H, T>(ctx, p.wr);
  const auto bias = to_device<H, Acc>(ctx, row_of(p.bias));
  const DeviceMask<H> mask(ctx, p.mask);
  const auto dg = to_device<H, Acc>(ctx, quantize<H, Acc>(random_matrix(sh.n, sh.k, seed + 1)));
  Workspace<H> fws(rankwise::router_forward_workspace_bytes<T>(sh.n, cfg));
  Workspace<H> bws(rankwise::router_backward_workspace_bytes<T>(sh.n, cfg));
  std::vector<std::vector<Acc>> scores, gates;
  std::vector<std::vector<T>> dwrs, dxs;
  std::vector<std::vector<std::int32_t>> units;
  for (int rep = 0; rep < 3; ++rep) {
    RoutingOut<H, T> out(ctx, sh.n, cfg);
    rankwise::router_forward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(),
                                         mask.view(), out.buffers(), true, fws.data(), fws.bytes);
    auto dx = to_device<H, T>(ctx, p.dx0);
    DeviceMatrix<H, T> dwr(cfg.num_experts(), sh.d_in);
    rankwise::router_backward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(),
                                          mask.view(), out.buffers(), dg.cview(), 0.5, dx.view(),
                                          dwr.view(), false, bws.data(), bws.bytes);
    scores.push_back(to_host_raw<H, Acc>(ctx, out.scores.cview()));
    gates.push_back(to_host_raw<H, Acc>(ctx, out.gates.cview()));
    units.push_back(download_raw<H, std::int32_t>(ctx, out.units.cview()));
    dwrs.push_back(to_host_raw<H, T>(ctx, dwr.cview()));
    dxs.push_back(to_host_raw<H, T>(ctx, dx.cview()));
  }
  for (int rep = 1; rep < 3; ++rep) {
    CHECK(first_bit_difference(scores[0], scores[rep]) == -1);
    CHECK(first_bit_difference(gates[0], gates[rep]) == -1);
    CHECK(units[0] == units[rep]);
    CHECK(first_bit_difference(dwrs[0], dwrs[rep]) == -1);
    CHECK(first_bit_difference(dxs[0], dxs[rep]) == -1);
  }
  for (const RankUnitPath path : {RankUnitPath::kSparse, RankUnitPath::kDense}) {
    INFO("layer, path " << path_name(path));
    SmoraOf<H, T> layer(ctx, smora_config(sh, {}, path, 0.25));
    std::vector<std::vector<T>> ys, das, dbts, dwrl, dxl;
    for (int rep = 0; rep < 3; ++rep) {
      load<H, T>(ctx, layer, p);
      auto y = to_device<H, T>(ctx, p.y0);
      auto dx = to_device<H, T>(ctx, p.dx0);
      const auto dy = to_device<H, T>(ctx, p.dy);
      layer.forward(x.cview(), y.view(), Mode::kTraining, mask.view());
      layer.backward(x.cview(), dy.cview(), dx.view());
      ys.push_back(to_host_raw<H, T>(ctx, y.cview()));
      dxl.push_back(to_host_raw<H, T>(ctx, dx.cview()));
      das.push_back(raw_of<H, T>(ctx, layer.grad_a()));
      dbts.push_back(raw_of<H, T>(ctx, layer.grad_bt()));
      dwrl.push_back(raw_of<H, T>(ctx, layer.grad_wr()));
    }
    for (int rep = 1; rep < 3; ++rep) {
      CHECK(first_bit_difference(ys[0], ys[rep]) == -1);
      CHECK(first_bit_difference(dxl[0], dxl[rep]) == -1);
      CHECK(first_bit_difference(das[0], das[rep]) == -1);
      CHECK(first_bit_difference(dbts[0], dbts[rep]) == -1);
      CHECK(first_bit_difference(dwrl[0], dwrl[rep]) == -1);
    }
  }
}

// ---------------------------------------------------------------------------
// The layer.

/// Forward and backward match the reference on both rank-unit paths for every
/// layer shape (default options, a nonzero bias), then for every option with
/// a mask and the aux term; accumulate adds, dx is optional.
template <class H, class T>
void layer_matches_reference() {
  typename H::Ctx ctx;
  std::uint64_t seed = 3000;
  struct Case {
    SmoraShape shape;
    RouterOptions options;
    bool masked;
    double aux;
  };
  std::vector<Case> cases;
  for (const SmoraShape& sh : layer_shapes()) cases.push_back({sh, {}, false, 0.0});
  for (const RouterOptions& opt : all_router_options())
    cases.push_back({{11, 9, 7, 12, 4, 2}, opt, true, 0.125});
  for (const Case& c : cases) {
    for (const RankUnitPath path : {RankUnitPath::kSparse, RankUnitPath::kDense}) {
      ++seed;
      RWTEST_CONTEXT(H, T, "shape " << c.shape, seed);
      INFO("options " << c.options << ", masked " << c.masked << ", aux " << c.aux << ", path "
                      << path_name(path));
      const SmoraConfig cfg = smora_config(c.shape, c.options, path, c.aux);
      const SmoraProblem p = make_problem<H, T>(c.shape, cfg.router, seed, c.masked);
      SmoraOf<H, T> layer(ctx, cfg);
      load<H, T>(ctx, layer, p);
      const SmoraReference ref = reference_for<H, T>(cfg, p);
      const DeviceMask<H> mask(ctx, p.mask);
      const LayerRun<H, T> got = run_layer<H, T>(ctx, layer, p, mask);
      check_layer_against_reference<H, T>(got, ref);

      // A second backward with accumulate adds; without dx it still fills the
      // parameter gradients.
      const auto x = to_device<H, T>(ctx, p.x);
      const auto dy = to_device<H, T>(ctx, p.dy);
      layer.backward(x.cview(), dy.cview(), MatrixView<T>(), true);
      RWTEST_CHECK_NORMWISE(host_of<H, T>(ctx, layer.grad_a()), twice(ref.da),
                            SmoraTolerance<T>::kBackward);
      RWTEST_CHECK_NORMWISE(transpose(host_of<H, T>(ctx, layer.grad_bt())), twice(ref.db),
                            SmoraTolerance<T>::kBackward);
      RWTEST_CHECK_NORMWISE(host_of<H, T>(ctx, layer.grad_wr()), twice(ref.dwr),
                            SmoraTolerance<T>::kBackward);
    }
  }
}

/// backward() after a training forward differentiates the forward that ran:
/// the gates used the bias before this forward's balance update, so the
/// gradients must too (a large step u = 0.05 makes a stale bias visible in
/// every type). The bias itself moves by one balance step.
template <class H, class T>
void backward_after_training_forward() {
  using Acc = AccOf<T>;
  typename H::Ctx ctx;
  std::uint64_t seed = 3500;
  for (const SmoraShape& sh : {SmoraShape{13, 9, 7, 8, 3, 1}, SmoraShape{12, 10, 6, 12, 6, 3}}) {
    for (const RankUnitPath path : {RankUnitPath::kSparse, RankUnitPath::kDense}) {
      ++seed;
      RWTEST_CONTEXT(H, T, "shape " << sh, seed);
      INFO("path " << path_name(path));
      SmoraConfig cfg = smora_config(sh, {}, path);
      cfg.router.bias_update_rate = 0.05f;
      const SmoraProblem p = make_problem<H, T>(sh, cfg.router, seed);
      SmoraOf<H, T> layer(ctx, cfg);
      load<H, T>(ctx, layer, p);
      const SmoraReference ref = reference_for<H, T>(cfg, p);
      const DeviceMask<H> mask(ctx, p.mask);
      const LayerRun<H, T> got = run_layer<H, T>(ctx, layer, p, mask, Mode::kTraining);
      check_layer_against_reference<H, T>(got, ref);
      std::vector<Acc> before(p.bias.begin(), p.bias.end());
      CHECK(bias_of<H, T>(ctx, layer) == ref_balance_step(before, ref.routing.counts, 0.05f));
    }
  }
}

/// N = 0: forward adds nothing, backward overwrites the gradients with zeros
/// (or leaves them with accumulate), a training forward leaves the bias.
template <class H, class T>
void zero_tokens() {
  typename H::Ctx ctx;
  const SmoraShape sh{6, 9, 5, 8, 4, 2};
  const std::uint64_t seed = 3900;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  const SmoraConfig cfg = smora_config(sh, {}, RankUnitPath::kAuto, 0.5);
  const SmoraProblem p = make_problem<H, T>(sh, cfg.router, seed);
  SmoraOf<H, T> layer(ctx, cfg);
  load<H, T>(ctx, layer, p);
  const DeviceMask<H> no_mask(ctx, p.mask);
  run_layer<H, T>(ctx, layer, p, no_mask);  // leaves nonzero gradients behind
  const HostMatrix da_before = host_of<H, T>(ctx, layer.grad_a());
  REQUIRE(compare(da_before, HostMatrix(sh.r, sh.d_in), "dA").max_abs_err > 0.0);

  DeviceMatrix<H, T> x(0, sh.d_in), y(0, sh.d_out), dy(0, sh.d_out), dx(0, sh.d_in);
  const auto bias_before = bias_of<H, T>(ctx, layer);
  layer.forward(x.cview(), y.view(), Mode::kTraining);
  CHECK(bias_of<H, T>(ctx, layer) == bias_before);
  CHECK(layer.routing().units.rows == 0);
  layer.backward(x.cview(), dy.cview(), dx.view(), true);
  CHECK(compare(host_of<H, T>(ctx, layer.grad_a()), da_before, "dA").max_abs_err == 0.0);
  layer.backward(x.cview(), dy.cview(), dx.view());
  CHECK(compare(host_of<H, T>(ctx, layer.grad_a()), HostMatrix(sh.r, sh.d_in), "dA").max_abs_err == 0.0);
  CHECK(compare(host_of<H, T>(ctx, layer.grad_bt()), HostMatrix(sh.r, sh.d_out), "dBt").max_abs_err == 0.0);
  CHECK(compare(host_of<H, T>(ctx, layer.grad_wr()), HostMatrix(layer.experts(), sh.d_in), "dWr")
            .max_abs_err == 0.0);
  layer.update_bias();  // counts of an empty batch: nothing moves
  CHECK(bias_of<H, T>(ctx, layer) == bias_before);
}

/// W_r = 0, b = 0, k = r: every score is 0.5, every gate 1, and the layer is
/// a LoRA of rank r with the same A, B and alpha (scale alpha / k = alpha / r),
/// forward and backward, on both paths and for g = 1 and g > 1.
template <class H, class T>
void identity_lora() {
  typename H::Ctx ctx;
  std::uint64_t seed = 4000;
  for (const SmoraShape& sh : {SmoraShape{11, 13, 9, 8, 8, 1}, SmoraShape{6, 7, 10, 6, 6, 2}}) {
    for (const RankUnitPath path : {RankUnitPath::kSparse, RankUnitPath::kDense}) {
      ++seed;
      RWTEST_CONTEXT(H, T, "shape " << sh, seed);
      INFO("path " << path_name(path));
      const SmoraConfig cfg = smora_config(sh, {}, path);
      SmoraProblem p = make_problem<H, T>(sh, cfg.router, seed);
      p.wr = HostMatrix(cfg.router.num_experts(), sh.d_in);
      p.bias.assign(static_cast<std::size_t>(cfg.router.num_experts()), 0.0);
      SmoraOf<H, T> layer(ctx, cfg);
      load<H, T>(ctx, layer, p);
      const DeviceMask<H> mask(ctx, p.mask);
      const LayerRun<H, T> got = run_layer<H, T>(ctx, layer, p, mask);
      const SmoraReference ref = reference_for<H, T>(cfg, p);  // for the magnitudes
      CHECK(compare(got.routing.scores, HostMatrix(sh.n, cfg.router.num_experts(), 0.5), "scores")
                .max_abs_err == 0.0);
      CHECK(compare(got.routing.gates, HostMatrix(sh.n, sh.k, 1.0), "gates").max_abs_err == 0.0);

      rankwise::LoraConfig lc;
      lc.d_in = sh.d_in;
      lc.d_out = sh.d_out;
      lc.rank = sh.r;
      lc.alpha = cfg.alpha;
      REQUIRE(lc.scale() == cfg.scale());
      rankwise::Lora<T, typename H::Backend> lora(ctx, lc);
      const auto da = to_device<H, T>(ctx, p.a);
      const auto db = to_device<H, T>(ctx, p.b);
      lora.set_a(da.cview());
      lora.set_b(db.cview());
      const auto x = to_device<H, T>(ctx, p.x);
      auto y = to_device<H, T>(ctx, p.y0);
      lora.forward(x.cview(), y.view());
      const auto dy = to_device<H, T>(ctx, p.dy);
      auto dx = to_device<H, T>(ctx, p.dx0);
      lora.backward(x.cview(), dy.cview(), dx.view());
      RWTEST_CHECK_NORMWISE(got.y, to_host<H, T>(ctx, y), ref.y.mag, SmoraTolerance<T>::kPaths);
      RWTEST_CHECK_NORMWISE(got.da, host_of<H, T>(ctx, lora.grad_a()), ref.da.mag,
                            SmoraTolerance<T>::kPaths);
      RWTEST_CHECK_NORMWISE(got.db, transpose(host_of<H, T>(ctx, lora.grad_bt())), ref.db.mag,
                            SmoraTolerance<T>::kPaths);
      // W_r = 0: the router adds nothing to dx.
      RWTEST_CHECK_NORMWISE(got.dx, to_host<H, T>(ctx, dx), ref.dx.mag, SmoraTolerance<T>::kPaths);
    }
  }
}

/// g > 1 is a mixture of E rank-g LoRAs: expert e's LoRA has rows
/// [e g, (e + 1) g) of A and the same columns of B (alpha = g, scale 1), and
/// y = y0 + (alpha / k) Σ_e gate_e(x) · LoRA_e(x) with the expert gates of the
/// reference router. Backward: LoRA_e with dy scaled per token by
/// (alpha / k) gate_e gives expert e's block of dA and dB.
template <class H, class T>
void identity_mixture_of_loras() {
  typename H::Ctx ctx;
  std::uint64_t seed = 4100;
  for (const SmoraShape& sh : {SmoraShape{15, 11, 9, 12, 6, 3}, SmoraShape{21, 13, 6, 16, 4, 2}}) {
    for (const RankUnitPath path : {RankUnitPath::kSparse, RankUnitPath::kDense}) {
      ++seed;
      RWTEST_CONTEXT(H, T, "shape " << sh, seed);
      INFO("path " << path_name(path));
      const SmoraConfig cfg = smora_config(sh, {}, path);
      const SmoraProblem p = make_problem<H, T>(sh, cfg.router, seed);
      SmoraOf<H, T> layer(ctx, cfg);
      load<H, T>(ctx, layer, p);
      const DeviceMask<H> mask(ctx, p.mask);
      const LayerRun<H, T> got = run_layer<H, T>(ctx, layer, p, mask);
      const SmoraReference ref = reference_for<H, T>(cfg, p);  // for the magnitudes
      const RefRouting& route = ref.routing;
      REQUIRE(got.routing.units == route.units);

      const std::int64_t E = cfg.router.num_experts(), g = sh.g;
      const double s = cfg.scale();
      HostMatrix y = p.y0, da(sh.r, sh.d_in), db(sh.d_out, sh.r);
      rankwise::LoraConfig lc;
      lc.d_in = sh.d_in;
      lc.d_out = sh.d_out;
      lc.rank = g;
      lc.alpha = static_cast<double>(g);
      const auto x = to_device<H, T>(ctx, p.x);
      for (std::int64_t e = 0; e < E; ++e) {
        HostMatrix ae(g, sh.d_in), be(sh.d_out, g), dye(sh.n, sh.d_out);
        for (std::int64_t q = 0; q < g; ++q) {
          for (std::int64_t i = 0; i < sh.d_in; ++i) ae(q, i) = p.a(e * g + q, i);
          for (std::int64_t o = 0; o < sh.d_out; ++o) be(o, q) = p.b(o, e * g + q);
        }
        rankwise::Lora<T, typename H::Backend> lora(ctx, lc);
        const auto dae = to_device<H, T>(ctx, ae);
        const auto dbe = to_device<H, T>(ctx, be);
        lora.set_a(dae.cview());
        lora.set_b(dbe.cview());
        auto ye = to_device<H, T>(ctx, HostMatrix(sh.n, sh.d_out));
        lora.forward(x.cview(), ye.view());
        const HostMatrix yeh = to_host<H, T>(ctx, ye);
        for (std::int64_t t = 0; t < sh.n; ++t) {
          const double w = s * route.expert_gate(t, e);
          for (std::int64_t o = 0; o < sh.d_out; ++o) {
            y(t, o) += w * yeh(t, o);
            dye(t, o) = w * p.dy(t, o);
          }
        }
        // dy_e is rounded to T on the way in: kPaths covers that one rounding.
        const auto ddye = to_device<H, T>(ctx, dye);
        lora.backward(x.cview(), ddye.cview());
        const HostMatrix dae_h = host_of<H, T>(ctx, lora.grad_a());
        const HostMatrix dbte_h = host_of<H, T>(ctx, lora.grad_bt());
        for (std::int64_t q = 0; q < g; ++q) {
          for (std::int64_t i = 0; i < sh.d_in; ++i) da(e * g + q, i) = dae_h(q, i);
          for (std::int64_t o = 0; o < sh.d_out; ++o) db(o, e * g + q) = dbte_h(q, o);
        }
      }
      RWTEST_CHECK_NORMWISE(got.y, y, ref.y.mag, SmoraTolerance<T>::kPaths);
      RWTEST_CHECK_NORMWISE(got.da, da, ref.da.mag, SmoraTolerance<T>::kPaths);
      RWTEST_CHECK_NORMWISE(got.db, db, ref.db.mag, SmoraTolerance<T>::kPaths);
    }
  }
}

/// The sparse and dense paths agree within rounding (they sum in different
/// orders, so not bit for bit), and kAuto runs the path the backend's
/// tuning policy's prefer_dense names, bit for bit.
template <class H, class T>
void sparse_and_dense_agree() {
  typename H::Ctx ctx;
  std::uint64_t seed = 4200;
  for (const SmoraShape& sh : {SmoraShape{300, 24, 40, 16, 4, 1}, SmoraShape{5, 19, 7, 12, 6, 3},
                               SmoraShape{80, 9, 11, 64, 2, 2}}) {
    ++seed;
    RWTEST_CONTEXT(H, T, "shape " << sh, seed);
    const RouterConfig rc = router_config(sh);
    const SmoraProblem p = make_problem<H, T>(sh, rc, seed, true);
    const SmoraReference ref = reference_for<H, T>(smora_config(sh, {}, RankUnitPath::kAuto, 0.25), p);
    const DeviceMask<H> mask(ctx, p.mask);
    LayerRun<H, T> runs[3];
    std::vector<T> ys[3];
    const RankUnitPath paths[3] = {RankUnitPath::kSparse, RankUnitPath::kDense, RankUnitPath::kAuto};
    for (int i = 0; i < 3; ++i) {
      SmoraOf<H, T> layer(ctx, smora_config(sh, {}, paths[i], 0.25));
      load<H, T>(ctx, layer, p);
      runs[i] = run_layer<H, T>(ctx, layer, p, mask, Mode::kTraining);
      const auto x = to_device<H, T>(ctx, p.x);
      auto y = to_device<H, T>(ctx, p.y0);
      load<H, T>(ctx, layer, p);
      layer.forward(x.cview(), y.view());
      ys[i] = to_host_raw<H, T>(ctx, y.cview());
    }
    RWTEST_CHECK_NORMWISE(runs[1].y, runs[0].y, ref.y.mag, SmoraTolerance<T>::kPaths);
    RWTEST_CHECK_NORMWISE(runs[1].da, runs[0].da, ref.da.mag, SmoraTolerance<T>::kPaths);
    RWTEST_CHECK_NORMWISE(runs[1].db, runs[0].db, ref.db.mag, SmoraTolerance<T>::kPaths);
    RWTEST_CHECK_NORMWISE(runs[1].dwr, runs[0].dwr, ref.dwr.mag, SmoraTolerance<T>::kPaths);
    RWTEST_CHECK_NORMWISE(runs[1].dx, runs[0].dx, ref.dx.mag, SmoraTolerance<T>::kPaths);
    const int auto_is =
        rankwise::TuningPolicy<typename H::Backend>::prefer_dense(sh.n, sh.k, sh.r) ? 1 : 0;
    INFO("prefer_dense(" << sh.n << ", " << sh.k << ", " << sh.r << ") = " << auto_is);
    CHECK(first_bit_difference(ys[2], ys[auto_is]) == -1);
  }
}

// ---------------------------------------------------------------------------
// Loss-free balancing.

/// One-hot tokens that route to a chosen expert: x_t = e_{f_t} (d_in = E) and
/// W_r = 4 I, so token t's logits are 4 at expert f_t and 0 elsewhere.
inline void one_hot_batch(const std::vector<int>& features, std::int64_t E, HostMatrix& x,
                          HostMatrix& wr) {
  x = HostMatrix(static_cast<std::int64_t>(features.size()), E);
  for (std::size_t t = 0; t < features.size(); ++t) x(static_cast<std::int64_t>(t), features[t]) = 1.0;
  wr = HostMatrix(E, E);
  for (std::int64_t e = 0; e < E; ++e) wr(e, e) = 4.0;
}

/// A skewed batch (experts 0..3 chosen by 4, 2, 2 and 0 tokens): after each
/// training forward the overloaded expert's bias drops by exactly u, the idle
/// one rises by exactly u, experts at the mean stay; masked tokens do not
/// count; with update_bias_every_forward = false the bias moves only on
/// update_bias(); inference never moves it. Expected values are the same
/// float additions the layer makes, compared exactly.
template <class H, class T>
void balancing() {
  using Acc = AccOf<T>;
  typename H::Ctx ctx;
  const std::vector<int> features = {0, 0, 2, 0, 1, 0, 1, 2};  // counts 4, 2, 2, 0
  for (const std::int64_t g : {1, 2}) {
    RWTEST_CONTEXT_OF(H, T, "g " << g);
    const SmoraShape sh{8, 4, 3, 4 * g, g, g};  // one expert per token
    SmoraConfig cfg = smora_config(sh);
    const float u = cfg.router.bias_update_rate;
    REQUIRE(u == 1e-5f);
    SmoraProblem p;
    one_hot_batch(features, 4, p.x, p.wr);
    p.a = quantize<H, T>(random_matrix(sh.r, sh.d_in, 17));
    p.b = quantize<H, T>(random_matrix(sh.d_out, sh.r, 18));
    p.bias.assign(4, 0.0);
    p.y0 = HostMatrix(sh.n, sh.d_out);
    const auto x = to_device<H, T>(ctx, p.x);
    auto y = to_device<H, T>(ctx, p.y0);

    // Exactly u per update: 0 + u + u + ... in Acc, as the layer adds.
    auto steps = [&](int count, Acc sign) {
      Acc b = 0;
      for (int i = 0; i < count; ++i) b = static_cast<Acc>(b + sign * static_cast<Acc>(u));
      return b;
    };
    {
      INFO("every forward");
      SmoraOf<H, T> layer(ctx, cfg);
      load<H, T>(ctx, layer, p);
      layer.update_bias();  // before any forward: no counts, no move
      CHECK(bias_of<H, T>(ctx, layer) == std::vector<Acc>(4, Acc(0)));
      for (int step = 1; step <= 3; ++step) {
        INFO("step " << step);
        layer.forward(x.cview(), y.view(), Mode::kTraining);
        const GotRouting got = fetch_routing<H, Acc>(ctx, layer.routing());
        CHECK(got.counts == std::vector<std::int32_t>{4, 2, 2, 0});
        const std::vector<Acc> expected = {steps(step, Acc(-1)), 0, 0, steps(step, Acc(1))};
        CHECK(bias_of<H, T>(ctx, layer) == expected);
      }
      const std::vector<Acc> b = bias_of<H, T>(ctx, layer);
      CHECK(b[0] < 0);
      CHECK(b[3] > 0);
      CHECK(b[1] == 0);
      CHECK(b[2] == 0);
      // Inference routes and counts but never moves the bias.
      layer.forward(x.cview(), y.view(), Mode::kInference);
      CHECK(bias_of<H, T>(ctx, layer) == b);
    }
    {
      INFO("masked tokens do not count");
      SmoraOf<H, T> layer(ctx, cfg);
      load<H, T>(ctx, layer, p);
      const HostMask m = {1, 0, 1, 0, 1, 0, 1, 1};  // drops three of expert 0's tokens
      const DeviceMask<H> mask(ctx, m);
      layer.forward(x.cview(), y.view(), Mode::kTraining, mask.view());
      const GotRouting got = fetch_routing<H, Acc>(ctx, layer.routing());
      CHECK(got.counts == std::vector<std::int32_t>{1, 2, 2, 0});  // mean 5/4
      const Acc up = steps(1, Acc(1)), down = steps(1, Acc(-1));
      CHECK(bias_of<H, T>(ctx, layer) == std::vector<Acc>{up, down, down, up});
    }
    {
      INFO("update_bias_every_forward = false");
      SmoraConfig manual = cfg;
      manual.update_bias_every_forward = false;
      SmoraOf<H, T> layer(ctx, manual);
      load<H, T>(ctx, layer, p);
      layer.forward(x.cview(), y.view(), Mode::kTraining);
      layer.forward(x.cview(), y.view(), Mode::kTraining);
      CHECK(bias_of<H, T>(ctx, layer) == std::vector<Acc>(4, Acc(0)));
      layer.update_bias();
      CHECK(bias_of<H, T>(ctx, layer) ==
            std::vector<Acc>{steps(1, Acc(-1)), 0, 0, steps(1, Acc(1))});
    }
    {
      INFO("inference only");
      SmoraOf<H, T> layer(ctx, cfg);
      load<H, T>(ctx, layer, p);
      for (int i = 0; i < 3; ++i) layer.forward(x.cview(), y.view());
      CHECK(bias_of<H, T>(ctx, layer) == std::vector<Acc>(4, Acc(0)));
    }
  }
  {
    // Two experts per token: selections shift as the bias breaks the ties of
    // the idle experts, so follow the reference step by step.
    RWTEST_CONTEXT_OF(H, T, "k/g = 2");
    const SmoraShape sh{8, 4, 3, 8, 4, 2};
    SmoraConfig cfg = smora_config(sh);
    SmoraProblem p;
    one_hot_batch(features, 4, p.x, p.wr);
    p.a = quantize<H, T>(random_matrix(sh.r, sh.d_in, 27));
    p.b = quantize<H, T>(random_matrix(sh.d_out, sh.r, 28));
    p.bias.assign(4, 0.0);
    SmoraOf<H, T> layer(ctx, cfg);
    load<H, T>(ctx, layer, p);
    const auto x = to_device<H, T>(ctx, p.x);
    auto y = to_device<H, T>(ctx, HostMatrix(sh.n, sh.d_out));
    std::vector<Acc> bias(4, Acc(0));
    for (int step = 1; step <= 4; ++step) {
      INFO("step " << step);
      layer.forward(x.cview(), y.view(), Mode::kTraining);
      const RefRouting ref =
          ref_route(cfg.router, p.x, p.wr, std::vector<double>(bias.begin(), bias.end()));
      const GotRouting got = fetch_routing<H, Acc>(ctx, layer.routing());
      CHECK(got.counts == ref.counts);
      bias = ref_balance_step(bias, ref.counts, cfg.router.bias_update_rate);
      CHECK(bias_of<H, T>(ctx, layer) == bias);
    }
  }
}

// ---------------------------------------------------------------------------
// State, init, errors, low level.

/// state() holds A, B (PEFT layout), W_r and the bias exactly; load_state()
/// into a fresh layer gives back the same state bit for bit and the same
/// forward; a missing key or a wrong shape throws naming the key and shapes.
template <class H, class T>
void state_round_trip() {
  typename H::Ctx ctx;
  const SmoraShape sh{9, 7, 5, 6, 4, 2};
  const std::uint64_t seed = 5000;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  const SmoraConfig cfg = smora_config(sh);
  const SmoraProblem p = make_problem<H, T>(sh, cfg.router, seed);
  const std::int64_t E = cfg.router.num_experts();
  SmoraOf<H, T> layer(ctx, cfg);
  load<H, T>(ctx, layer, p);
  const rankwise::TensorMap state = layer.state();
  REQUIRE(state.size() == 4);
  auto values_of = [](const HostMatrix& m) { return m.v; };
  CHECK(state.at("lora_A").shape == std::vector<std::int64_t>{sh.r, sh.d_in});
  CHECK(state.at("lora_B").shape == std::vector<std::int64_t>{sh.d_out, sh.r});
  CHECK(state.at("router").shape == std::vector<std::int64_t>{E, sh.d_in});
  CHECK(state.at("bias").shape == std::vector<std::int64_t>{E});
  CHECK(state.at("lora_A").values == values_of(p.a));
  CHECK(state.at("lora_B").values == values_of(p.b));
  CHECK(state.at("router").values == values_of(p.wr));
  CHECK(state.at("bias").values == p.bias);

  SmoraOf<H, T> copy(ctx, cfg);
  copy.load_state(state);
  const rankwise::TensorMap again = copy.state();
  for (const auto& kv : state) {
    INFO("key " << kv.first);
    CHECK(again.at(kv.first).shape == kv.second.shape);
    CHECK(first_bit_difference(again.at(kv.first).values, kv.second.values) == -1);
  }
  const auto x = to_device<H, T>(ctx, p.x);
  auto y1 = to_device<H, T>(ctx, p.y0);
  auto y2 = to_device<H, T>(ctx, p.y0);
  layer.forward(x.cview(), y1.view());
  copy.forward(x.cview(), y2.view());
  CHECK(first_bit_difference(to_host_raw<H, T>(ctx, y1.cview()), to_host_raw<H, T>(ctx, y2.cview())) ==
        -1);

  auto shape_text = [](std::int64_t r0, std::int64_t c0) {
    return "(" + std::to_string(r0) + " x " + std::to_string(c0) + ")";
  };
  for (const char* key : {"lora_A", "lora_B", "router", "bias"}) {
    rankwise::TensorMap missing = state;
    missing.erase(key);
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, std::string("missing key \"") + key + "\"",
                       copy.load_state(missing));
  }
  {
    rankwise::TensorMap wrong = state;
    wrong["lora_B"].shape = {sh.r, sh.d_out};  // the internal (transposed) layout
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                       "\"lora_B\" has shape " + shape_text(sh.r, sh.d_out) + ", expected " +
                           shape_text(sh.d_out, sh.r),
                       copy.load_state(wrong));
  }
  {
    rankwise::TensorMap wrong = state;
    wrong["router"].shape = {E + 1, sh.d_in};
    wrong["router"].values.resize(static_cast<std::size_t>((E + 1) * sh.d_in));
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                       "\"router\" has shape " + shape_text(E + 1, sh.d_in) + ", expected " +
                           shape_text(E, sh.d_in),
                       copy.load_state(wrong));
  }
  {
    rankwise::TensorMap wrong = state;
    wrong["bias"].shape = {1, E};
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "\"bias\" has shape " + shape_text(1, E),
                       copy.load_state(wrong));
  }
  // A failed load leaves the layer as it was (all keys are checked first).
  rankwise::TensorMap partial = state;
  partial["lora_A"].values.assign(partial["lora_A"].values.size(), 0.0);
  partial.erase("bias");
  CHECK_THROWS(copy.load_state(partial));
  CHECK(copy.state().at("lora_A").values == state.at("lora_A").values);
}

/// init(seed): A and W_r are the counter-based uniforms U(±1/√d_in) of
/// substreams 0 and 2, bit for bit as rankwise/core/random.hpp defines them
/// (the same bits on every backend), B and the bias are zero.
template <class H, class T>
void init_contract() {
  using Acc = AccOf<T>;
  typename H::Ctx ctx;
  const SmoraShape sh{1, 13, 9, 8, 2, 1};
  const std::uint64_t seed = 20250707;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  SmoraOf<H, T> layer(ctx, smora_config(sh));
  load<H, T>(ctx, layer, HostMatrix(sh.r, sh.d_in, 7.0), HostMatrix(sh.d_out, sh.r, 7.0),
             HostMatrix(sh.r, sh.d_in, 7.0), std::vector<double>(sh.r, 7.0));
  layer.init(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(sh.d_in));
  auto expected = [&](std::uint64_t stream, std::int64_t rows) {
    std::vector<T> out;
    for (std::int64_t i = 0; i < rows * sh.d_in; ++i) {
      const double v = rankwise::uniform(rankwise::substream(seed, stream),
                                         static_cast<std::uint64_t>(i), -bound, bound);
      // Narrower types go through float, as every backend's fill does.
      out.push_back(std::is_same<T, double>::value
                        ? H::template from_double<T>(v)
                        : H::template from_double<T>(static_cast<double>(static_cast<float>(v))));
    }
    return out;
  };
  CHECK(first_bit_difference(raw_of<H, T>(ctx, layer.a()), expected(0, sh.r)) == -1);
  CHECK(first_bit_difference(raw_of<H, T>(ctx, layer.wr()), expected(2, layer.experts())) == -1);
  CHECK(compare(host_of<H, T>(ctx, layer.bt()), HostMatrix(sh.r, sh.d_out), "Bt").max_abs_err == 0.0);
  CHECK(bias_of<H, T>(ctx, layer) == std::vector<Acc>(static_cast<std::size_t>(sh.r), Acc(0)));
  const HostMatrix a = host_of<H, T>(ctx, layer.a());
  double lo = 1, hi = -1;
  for (double v : a.v) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  CHECK(lo >= -bound);
  CHECK(hi <= bound);
  CHECK(hi - lo > bound);  // not constant
}

/// Parameters, names, shapes and counts.
template <class H, class T>
void parameters_and_accessors() {
  typename H::Ctx ctx;
  const SmoraShape sh{1, 13, 9, 12, 6, 3};
  SmoraOf<H, T> layer(ctx, smora_config(sh));
  CHECK(layer.rank() == 12);
  CHECK(layer.experts() == 4);
  CHECK(layer.top_k() == 6);
  CHECK(layer.scale() == 16.0 / 6.0);
  CHECK(layer.num_parameters() == 12 * (13 + 9) + 4 * 13);
  const auto params = layer.parameters();
  REQUIRE(params.size() == 3);
  CHECK(params[0].name == "lora_A");
  CHECK(params[1].name == "lora_B_t");
  CHECK(params[2].name == "router");
  CHECK(params[0].value.data == layer.a().data);
  CHECK(params[1].value.data == layer.bt().data);
  CHECK(params[2].value.data == layer.wr().data);
  CHECK(params[0].grad.data == layer.grad_a().data);
  CHECK(params[1].grad.data == layer.grad_bt().data);
  CHECK(params[2].grad.data == layer.grad_wr().data);
  std::int64_t total = 0;
  for (const auto& prm : params) {
    CHECK(prm.grad.rows == prm.value.rows);
    CHECK(prm.grad.cols == prm.value.cols);
    CHECK(prm.value.space == H::Backend::kMemorySpace);
    total += prm.value.size();
  }
  CHECK(total == layer.num_parameters());
  CHECK(params[2].value.rows == 4);
  CHECK(params[2].value.cols == 13);
}

/// Bad configurations and inputs throw rankwise::error naming the problem.
template <class H, class T>
void rejects_bad_input() {
  using Acc = AccOf<T>;
  using Backend = typename H::Backend;
  typename H::Ctx ctx;
  RWTEST_CONTEXT_OF(H, T, "fixed inputs");
  auto config = [](std::int64_t r, std::int64_t k, std::int64_t g) {
    return smora_config(SmoraShape{1, 5, 3, r, k, g});
  };
  auto construct = [&](const SmoraConfig& c) { SmoraOf<H, T> layer(ctx, c); };
  const auto invalid = ErrorCode::kInvalidArgument;
  RWTEST_CHECK_ERROR(invalid, "top_k (k) = 9 must be in [1, r = 8]", construct(config(8, 9, 1)));
  RWTEST_CHECK_ERROR(invalid, "top_k (k) = 0 must be in [1, r = 8]", construct(config(8, 0, 1)));
  RWTEST_CHECK_ERROR(invalid, "top_k (k) = 3 must be a multiple of group_size (g) = 2",
                     construct(config(8, 3, 2)));
  RWTEST_CHECK_ERROR(invalid, "group_size (g) = 3 must be positive and divide num_units (r) = 8",
                     construct(config(8, 3, 3)));
  {
    SmoraConfig c = config(8, 2, 1);
    c.aux_loss_coef = -1.0;
    RWTEST_CHECK_ERROR(invalid, "aux_loss_coef must be finite and >= 0", construct(c));
    c = config(8, 2, 1);
    c.router.bias_update_rate = std::nanf("");
    RWTEST_CHECK_ERROR(invalid, "bias_update_rate must be finite and >= 0", construct(c));
  }

  const SmoraShape sh{4, 5, 3, 8, 2, 1};
  const SmoraConfig cfg = smora_config(sh);
  const RouterConfig& rc = cfg.router;
  {
    INFO("non-finite logits or bias in router_forward_from_logits");
    HostMatrix logits = random_matrix(sh.n, 8, 1);
    logits(2, 5) = std::nan("");
    const auto dl = to_device<H, Acc>(ctx, logits);
    RoutingOut<H, T> out(ctx, sh.n, rc);
    Workspace<H> ws(rankwise::router_forward_workspace_bytes<T>(sh.n, rc));
    RWTEST_CHECK_ERROR(invalid, "1 of 4 tokens have non-finite logits or bias",
                       rankwise::router_forward_from_logits<Backend, T>(
                           ctx, rc, dl.cview(), {}, {}, out.buffers(), true, ws.data(), ws.bytes));
    logits(2, 5) = 0.0;
    logits(0, 0) = std::numeric_limits<double>::infinity();
    logits(3, 7) = -std::numeric_limits<double>::infinity();
    const auto dl2 = to_device<H, Acc>(ctx, logits);
    RWTEST_CHECK_ERROR(invalid, "2 of 4 tokens have non-finite",
                       rankwise::router_forward_from_logits<Backend, T>(
                           ctx, rc, dl2.cview(), {}, {}, out.buffers(), true, ws.data(), ws.bytes));
    std::vector<double> bias(8, 0.0);
    bias[4] = std::nan("");
    const auto db = to_device<H, Acc>(ctx, row_of(bias));
    const auto dl3 = to_device<H, Acc>(ctx, random_matrix(sh.n, 8, 2));
    RWTEST_CHECK_ERROR(invalid, "4 of 4 tokens have non-finite",
                       rankwise::router_forward_from_logits<Backend, T>(
                           ctx, rc, dl3.cview(), db.cview(), {}, out.buffers(), true, ws.data(),
                           ws.bytes));
    // check_finite = false trusts the input: no throw, no read-back.
    CHECK_NOTHROW(rankwise::router_forward_from_logits<Backend, T>(
        ctx, rc, dl.cview(), {}, {}, out.buffers(), false, ws.data(), ws.bytes));
    // Wrong shapes of the router's own arguments.
    const auto bad_bias = to_device<H, Acc>(ctx, HostMatrix(1, 7));
    RWTEST_CHECK_ERROR(invalid, "bias (1 x E)",
                       rankwise::router_forward_from_logits<Backend, T>(
                           ctx, rc, dl3.cview(), bad_bias.cview(), {}, out.buffers(), true,
                           ws.data(), ws.bytes));
    const DeviceMask<H> short_mask(ctx, HostMask{1, 1, 1});
    RWTEST_CHECK_ERROR(invalid, "mask (1 x n)",
                       rankwise::router_forward_from_logits<Backend, T>(
                           ctx, rc, dl3.cview(), {}, short_mask.view(), out.buffers(), true,
                           ws.data(), ws.bytes));
    RoutingOut<H, T> small(ctx, sh.n - 1, rc);
    RWTEST_CHECK_ERROR(invalid, "routing.scores (n x E)",
                       rankwise::router_forward_from_logits<Backend, T>(
                           ctx, rc, dl3.cview(), {}, {}, small.buffers(), true, ws.data(),
                           ws.bytes));
    Workspace<H> tiny(rankwise::router_forward_workspace_bytes<T>(sh.n, rc) - 1);
    RWTEST_CHECK_ERROR(invalid, "router_forward: workspace of",
                       rankwise::router_forward_from_logits<Backend, T>(
                           ctx, rc, dl3.cview(), {}, {}, out.buffers(), true, tiny.data(),
                           tiny.bytes));
  }

  SmoraOf<H, T> layer(ctx, cfg);
  const SmoraProblem p = make_problem<H, T>(sh, rc, 6000);
  load<H, T>(ctx, layer, p);
  const auto x = to_device<H, T>(ctx, p.x);
  auto y = to_device<H, T>(ctx, p.y0);
  const auto dy = to_device<H, T>(ctx, p.dy);
  RWTEST_CHECK_ERROR(invalid, "no routed forward to differentiate",
                     layer.backward(x.cview(), dy.cview()));  // no forward yet
  {
    INFO("NaN in x reaches the router's logits, on a fresh layer");
    HostMatrix xn = p.x;
    xn(1, 3) = std::nan("");
    const auto dxn = to_device<H, T>(ctx, xn);
    RWTEST_CHECK_ERROR(invalid, "1 of 4 tokens have non-finite logits",
                       layer.forward(dxn.cview(), y.view()));
  }
  {
    const auto wide = to_device<H, T>(ctx, random_matrix(sh.n, sh.d_in + 1, 3));
    RWTEST_CHECK_ERROR(invalid, "x (n x d_in): expected shape (4 x 5), got (4 x 6)",
                       layer.forward(wide.cview(), y.view()));
    auto y_short = to_device<H, T>(ctx, HostMatrix(sh.n, sh.d_out - 1));
    RWTEST_CHECK_ERROR(invalid, "y (n x d_out): expected shape (4 x 3), got (4 x 2)",
                       layer.forward(x.cview(), y_short.view()));
    auto y_few = to_device<H, T>(ctx, HostMatrix(sh.n - 1, sh.d_out));
    RWTEST_CHECK_ERROR(invalid, "y (n x d_out): expected shape (4 x 3), got (3 x 3)",
                       layer.forward(x.cview(), y_few.view()));
    const MatrixView<const T> foreign(x.cview().data, sh.n, sh.d_in, foreign_space<H>());
    CHECK(error_code_of([&] { layer.forward(foreign, y.view()); }) == ErrorCode::kMemorySpace);
    const DeviceMask<H> short_mask(ctx, HostMask{1, 1});
    RWTEST_CHECK_ERROR(invalid, "mask (1 x n)", layer.forward(x.cview(), y.view(), Mode::kInference,
                                                             short_mask.view()));
  }
  layer.forward(x.cview(), y.view(), Mode::kTraining);
  {
    const auto x3 = to_device<H, T>(ctx, random_matrix(sh.n - 1, sh.d_in, 4));
    const auto dy3 = to_device<H, T>(ctx, random_matrix(sh.n - 1, sh.d_out, 5));
    RWTEST_CHECK_ERROR(invalid, "x has 3 tokens but the last forward routed 4",
                       layer.backward(x3.cview(), dy3.cview()));
    const auto dy_bad = to_device<H, T>(ctx, random_matrix(sh.n, sh.d_out + 2, 6));
    RWTEST_CHECK_ERROR(invalid, "dy (n x d_out)", layer.backward(x.cview(), dy_bad.cview()));
    auto dx_bad = to_device<H, T>(ctx, HostMatrix(sh.n, sh.d_in + 1));
    RWTEST_CHECK_ERROR(invalid, "dx (n x d_in)",
                       layer.backward(x.cview(), dy.cview(), dx_bad.view()));
    CHECK_NOTHROW(layer.backward(x.cview(), dy.cview()));
  }
  {
    INFO("router_update_bias shapes");
    RawMatrix<H, std::int32_t> counts(1, 7);
    DeviceMatrix<H, Acc> bias(1, 8);
    RWTEST_CHECK_ERROR(invalid, "counts (1 x E)",
                       rankwise::router_update_bias<Backend, T>(ctx, rc, counts.cview(), bias.view()));
  }
}

/// Smora::forward with a routing the caller supplies: y += (alpha / k) Σ_j
/// gate_j b_u (a_u · x) for the given units (any count per token, repeats,
/// one row broadcast with ld = 0), the router and the bias untouched; an
/// index outside [0, r) or a routing of the wrong shape throws before any
/// work.
template <class H, class T>
void user_routing_forward() {
  using Acc = AccOf<T>;
  typename H::Ctx ctx;
  const SmoraShape sh{7, 11, 6, 8, 3, 1};
  const std::uint64_t seed = 7300;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  const SmoraConfig cfg = smora_config(sh);
  const SmoraProblem p = make_problem<H, T>(sh, cfg.router, seed);
  SmoraOf<H, T> layer(ctx, cfg);
  load<H, T>(ctx, layer, p);
  const std::int64_t ku = 5;
  std::vector<std::int32_t> units(static_cast<std::size_t>(sh.n * ku));
  for (std::size_t i = 0; i < units.size(); ++i) units[i] = static_cast<std::int32_t>((i * 7 + i / 5) % sh.r);
  units[3] = units[4];  // a repeat within token 0
  const HostMatrix gates = quantize<H, Acc>(random_matrix(sh.n, ku, seed + 1, 0.0, 2.0));
  const RankUnitExpected e = expect_rank_units(cfg.scale(), p.x, p.a, p.b, units, gates, p.y0,
                                               p.dy, p.dx0);
  const auto x = to_device<H, T>(ctx, p.x);
  const auto du = upload_raw<H, std::int32_t>(ctx, units, sh.n, ku);
  const auto dg = to_device<H, Acc>(ctx, gates);
  const auto bias_before = bias_of<H, T>(ctx, layer);
  auto y = to_device<H, T>(ctx, p.y0);
  layer.forward(x.cview(), {du.cview(), dg.cview()}, y.view());
  RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, y), e.y, SmoraTolerance<T>::kForward);
  CHECK(bias_of<H, T>(ctx, layer) == bias_before);

  {
    INFO("one row for every token (ld = 0)");
    std::vector<std::int32_t> all;
    HostMatrix all_gates(sh.n, ku);
    for (std::int64_t t = 0; t < sh.n; ++t) {
      all.insert(all.end(), units.begin(), units.begin() + ku);
      for (std::int64_t j = 0; j < ku; ++j) all_gates(t, j) = gates(0, j);
    }
    const RankUnitExpected eb =
        expect_rank_units(cfg.scale(), p.x, p.a, p.b, all, all_gates, p.y0, p.dy, p.dx0);
    auto yb = to_device<H, T>(ctx, p.y0);
    layer.forward(x.cview(),
                  {MatrixView<const std::int32_t>(du.cview().data, sh.n, ku,
                                                  H::Backend::kMemorySpace, 0),
                   MatrixView<const Acc>(dg.cview().data, sh.n, ku, H::Backend::kMemorySpace, 0)},
                  yb.view());
    RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, yb), eb.y, SmoraTolerance<T>::kForward);
  }
  {
    INFO("bad routings");
    std::vector<std::int32_t> bad = units;
    bad[6] = static_cast<std::int32_t>(sh.r);
    bad[30] = -3;
    const auto dbad = upload_raw<H, std::int32_t>(ctx, bad, sh.n, ku);
    auto y2 = to_device<H, T>(ctx, p.y0);
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                       "routing: 2 of 35 unit indices in units (7 x 5) are outside [0, r = 8)",
                       layer.forward(x.cview(), {dbad.cview(), dg.cview()}, y2.view()));
    CHECK(compare(to_host<H, T>(ctx, y2), p.y0, "y").max_abs_err == 0.0);  // nothing added
    const auto short_units = upload_raw<H, std::int32_t>(
        ctx, std::vector<std::int32_t>(units.begin(), units.end() - ku), sh.n - 1, ku);
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "units (n x k)",
                       layer.forward(x.cview(), {short_units.cview(), dg.cview()}, y2.view()));
    const DeviceMatrix<H, Acc> narrow_gates(sh.n, ku - 1);
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "gates (n x k)",
                       layer.forward(x.cview(), {du.cview(), narrow_gates.cview()}, y2.view()));
  }
}

/// rank_units_backward takes dgates as optional (empty: carved from the
/// workspace), so rank_units_backward_workspace_bytes must cover that on both
/// paths; the gradients are the same as with a caller dgates.
template <class H, class T>
void rank_units_backward_without_dgates() {
  using Acc = AccOf<T>;
  using Backend = typename H::Backend;
  typename H::Ctx ctx;
  std::uint64_t seed = 7100;
  for (const SmoraShape& sh : {SmoraShape{6, 11, 7, 8, 3, 1}, SmoraShape{70, 9, 5, 16, 4, 1}}) {
    for (const RankUnitPath path : {RankUnitPath::kSparse, RankUnitPath::kDense}) {
      ++seed;
      RWTEST_CONTEXT(H, T, "shape " << sh, seed);
      INFO("path " << path_name(path));
      const RouterConfig cfg = router_config(sh);
      const SmoraProblem p = make_problem<H, T>(sh, cfg, seed);
      const RefRouting route = ref_route(cfg, p.x, p.wr, p.bias);
      const HostMatrix gates = quantize<H, Acc>(route.gates);
      const double s = 2.0;
      const RankUnitExpected e =
          expect_rank_units(s, p.x, p.a, p.b, route.units, gates, p.y0, p.dy, p.dx0);
      const auto x = to_device<H, T>(ctx, p.x);
      const auto a = to_device<H, T>(ctx, p.a);
      const auto bt = to_device<H, T>(ctx, transpose(p.b));
      const auto dy = to_device<H, T>(ctx, p.dy);
      const auto units = upload_raw<H, std::int32_t>(ctx, route.units, sh.n, sh.k);
      const auto dg = to_device<H, Acc>(ctx, gates);
      auto dx = to_device<H, T>(ctx, p.dx0);
      DeviceMatrix<H, T> da(sh.r, sh.d_in), dbt(sh.r, sh.d_out);
      Workspace<H> ws(rankwise::rank_units_backward_workspace_bytes<T>(sh.n, sh.k, sh.r));
      REQUIRE_NOTHROW(rankwise::rank_units_backward<Backend, T>(
          ctx, s, x.cview(), a.cview(), bt.cview(), {units.cview(), dg.cview()}, dy.cview(),
          dx.view(), da.view(), dbt.view(), MatrixView<Acc>(), false, path, ws.data(), ws.bytes));
      RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, da), e.da, SmoraTolerance<T>::kBackward);
      RWTEST_CHECK_NORMWISE(transpose(to_host<H, T>(ctx, dbt)), e.db, SmoraTolerance<T>::kBackward);
      RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, dx), e.dx, SmoraTolerance<T>::kBackward);
    }
  }
}

/// A token with a non-finite logit must not make the router write outside
/// its buffers or leave unit indices that the rank-unit kernels would follow
/// out of range. The experts and units start at an out-of-range sentinel and
/// the counts sit at the front of a larger zeroed buffer, so a stray count
/// lands in memory the test owns instead of corrupting the heap.
template <class H, class T>
void non_finite_token_writes_nowhere_else() {
  using Acc = AccOf<T>;
  using Backend = typename H::Backend;
  typename H::Ctx ctx;
  const SmoraShape sh{4, 5, 0, 8, 2, 1};
  const RouterConfig cfg = router_config(sh);
  const std::int64_t E = cfg.num_experts(), canary = 2048;
  const std::int32_t sentinel = 1000;
  HostMatrix logits = random_matrix(sh.n, E, 9);
  logits(2, 5) = std::nan("");
  const auto dl = to_device<H, Acc>(ctx, logits);
  Workspace<H> ws(rankwise::router_forward_workspace_bytes<T>(sh.n, cfg));
  for (const bool check_finite : {true, false}) {
    RWTEST_CONTEXT_OF(H, T, "check_finite " << check_finite);
    RoutingOut<H, T> out(ctx, sh.n, cfg);
    out.experts = upload_raw<H, std::int32_t>(
        ctx, std::vector<std::int32_t>(static_cast<std::size_t>(sh.n * sh.k / sh.g), sentinel),
        sh.n, sh.k / sh.g);
    out.units = upload_raw<H, std::int32_t>(
        ctx, std::vector<std::int32_t>(static_cast<std::size_t>(sh.n * sh.k), sentinel), sh.n, sh.k);
    auto big = RoutingOut<H, T>::zeros(ctx, 1, E + canary);
    rankwise::RoutingBuffers<Acc> buffers = out.buffers();
    buffers.counts = MatrixView<std::int32_t>(big.buf.data(), 1, E, H::Backend::kMemorySpace);
    auto call = [&] {
      rankwise::router_forward_from_logits<Backend, T>(ctx, cfg, dl.cview(), {}, {}, buffers,
                                                       check_finite, ws.data(), ws.bytes);
    };
    if (check_finite) CHECK_THROWS_WITH(call(), Catch::Contains("1 of 4 tokens"));
    else CHECK_NOTHROW(call());
    const std::vector<std::int32_t> all = download_raw<H, std::int32_t>(ctx, big.cview());
    std::int64_t stray = 0;
    for (std::int64_t i = E; i < E + canary; ++i) stray += all[i] != 0 ? 1 : 0;
    CHECK(stray == 0);
    std::int64_t out_of_range = 0;
    for (std::int32_t e : download_raw<H, std::int32_t>(ctx, out.experts.cview()))
      out_of_range += (e < 0 || e >= E) ? 1 : 0;
    for (std::int32_t u : download_raw<H, std::int32_t>(ctx, out.units.cview()))
      out_of_range += (u < 0 || u >= sh.r) ? 1 : 0;
    CHECK(out_of_range == 0);
  }
}

/// Low-level rank units with a user-supplied routing: Kernels::check_units
/// counts indices outside [0, r) and check_unit_routing throws with that
/// count; rank_units_forward / backward match the reference on both paths,
/// duplicates within a token adding up, k > r allowed, and a routing row
/// broadcast to every token (ld = 0) works as the same row repeated.
template <class H, class T>
void low_level_rank_units() {
  using Acc = AccOf<T>;
  using Backend = typename H::Backend;
  using K = rankwise::Kernels<Backend, T>;
  typename H::Ctx ctx;
  const std::int64_t n = 6, d_in = 11, d_out = 7, r = 8, k = 3;
  const std::uint64_t seed = 7000;
  RWTEST_CONTEXT(
      H, T, "n " << n << ", d_in " << d_in << ", d_out " << d_out << ", r " << r << ", k " << k,
      seed);
  {
    INFO("check_units");
    std::vector<std::int32_t> units(static_cast<std::size_t>(n * k));
    for (std::size_t i = 0; i < units.size(); ++i) units[i] = static_cast<std::int32_t>(i % r);
    RawMatrix<H, std::int32_t> bad(1, 1);
    auto count_bad = [&](const std::vector<std::int32_t>& u) {
      const auto du = upload_raw<H, std::int32_t>(ctx, u, n, k);
      K::check_units(ctx, du.cview(), r, bad.view());
      return download_raw<H, std::int32_t>(ctx, bad.cview())[0];
    };
    Workspace<H> ws(rankwise::check_unit_routing_workspace_bytes());
    const DeviceMatrix<H, Acc> g(n, k);
    auto check_routing_of = [&](const std::vector<std::int32_t>& u) {
      const auto du = upload_raw<H, std::int32_t>(ctx, u, n, k);
      rankwise::check_unit_routing<Backend, T>(ctx, {du.cview(), g.cview()}, n, r, ws.data(),
                                               ws.bytes);
    };
    CHECK(count_bad(units) == 0);
    CHECK_NOTHROW(check_routing_of(units));
    units[4] = -1;
    units[9] = static_cast<std::int32_t>(r);
    units[17] = 1 << 30;
    CHECK(count_bad(units) == 3);
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                       "routing: 3 of 18 unit indices in units (6 x 3) are outside [0, r = 8)",
                       check_routing_of(units));
  }
  const double ra = 1.0 / std::sqrt(static_cast<double>(d_in));
  const HostMatrix x = quantize<H, T>(random_matrix(n, d_in, seed + 1));
  const HostMatrix a = quantize<H, T>(random_matrix(r, d_in, seed + 2, -ra, ra));
  const HostMatrix b = quantize<H, T>(random_matrix(d_out, r, seed + 3));
  const HostMatrix y0 = quantize<H, T>(random_matrix(n, d_out, seed + 4));
  const HostMatrix dy = quantize<H, T>(random_matrix(n, d_out, seed + 5));
  const HostMatrix dx0 = quantize<H, T>(random_matrix(n, d_in, seed + 6));
  const HostMatrix gates = quantize<H, Acc>(random_matrix(n, k, seed + 7, 0.0, 2.0));
  // Any units per token, a repeat within token 2 and token 5.
  const std::vector<std::int32_t> units = {0, 5, 7, 3, 1, 6, 4, 2, 4,
                                           7, 6, 5, 1, 0, 2, 3, 3, 3};
  const double s = 1.75;
  const auto dxm = to_device<H, T>(ctx, x);
  const auto dam = to_device<H, T>(ctx, a);
  const auto dbtm = to_device<H, T>(ctx, transpose(b));
  const auto dgm = to_device<H, Acc>(ctx, gates);
  const auto dum = upload_raw<H, std::int32_t>(ctx, units, n, k);
  const auto ddy = to_device<H, T>(ctx, dy);
  const rankwise::UnitRouting<Acc> routing{dum.cview(), dgm.cview()};
  const RankUnitExpected e = expect_rank_units(s, x, a, b, units, gates, y0, dy, dx0);
  for (const RankUnitPath path : {RankUnitPath::kSparse, RankUnitPath::kDense}) {
    INFO("path " << path_name(path));
    Workspace<H> fws(rankwise::rank_units_forward_workspace_bytes<T>(n, k, r));
    auto y = to_device<H, T>(ctx, y0);
    rankwise::rank_units_forward<Backend, T>(ctx, s, dxm.cview(), dam.cview(), dbtm.cview(),
                                             routing, y.view(), path, fws.data(), fws.bytes);
    RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, y), e.y, SmoraTolerance<T>::kForward);
    for (const bool caller_dgates : {true, false}) {
      INFO("caller dgates " << caller_dgates);
      Workspace<H> bws(rankwise::rank_units_backward_workspace_bytes<T>(n, k, r));
      auto dx = to_device<H, T>(ctx, dx0);
      DeviceMatrix<H, T> da(r, d_in), dbt(r, d_out);
      DeviceMatrix<H, Acc> dg(n, k);
      rankwise::rank_units_backward<Backend, T>(
          ctx, s, dxm.cview(), dam.cview(), dbtm.cview(), routing, ddy.cview(), dx.view(),
          da.view(), dbt.view(), caller_dgates ? dg.view() : MatrixView<Acc>(), false, path,
          bws.data(), bws.bytes);
      RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, da), e.da, SmoraTolerance<T>::kBackward);
      RWTEST_CHECK_NORMWISE(transpose(to_host<H, T>(ctx, dbt)), e.db, SmoraTolerance<T>::kBackward);
      RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, dx), e.dx, SmoraTolerance<T>::kBackward);
      if (caller_dgates) {
        RWTEST_CHECK_NORMWISE(to_host<H, Acc>(ctx, dg), e.dgates, SmoraTolerance<T>::kBackward);
      }
    }
    Workspace<H> tiny(rankwise::kWorkspaceAlignment);  // one block; both paths take two
    auto y2 = to_device<H, T>(ctx, y0);
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "rank_units_forward: workspace of",
                       rankwise::rank_units_forward<Backend, T>(
                           ctx, s, dxm.cview(), dam.cview(), dbtm.cview(), routing, y2.view(),
                           path, tiny.data(), tiny.bytes));
  }
  {
    INFO("k > r, and one routing row broadcast to every token (ld = 0)");
    const std::int64_t kw = r + 2;
    std::vector<std::int32_t> row(static_cast<std::size_t>(kw));
    for (std::int64_t j = 0; j < kw; ++j) row[j] = static_cast<std::int32_t>((5 * j + 3) % r);
    const HostMatrix gate_row = quantize<H, Acc>(random_matrix(1, kw, seed + 8, -1.0, 1.0));
    std::vector<std::int32_t> all_units;
    HostMatrix all_gates(n, kw);
    for (std::int64_t t = 0; t < n; ++t) {
      all_units.insert(all_units.end(), row.begin(), row.end());
      for (std::int64_t j = 0; j < kw; ++j) all_gates(t, j) = gate_row(0, j);
    }
    const RankUnitExpected ew = expect_rank_units(s, x, a, b, all_units, all_gates, y0, dy, dx0);
    const auto du = upload_raw<H, std::int32_t>(ctx, row, 1, kw);
    const auto dg = to_device<H, Acc>(ctx, gate_row);
    const rankwise::UnitRouting<Acc> broadcast{
        MatrixView<const std::int32_t>(du.cview().data, n, kw, H::Backend::kMemorySpace, 0),
        MatrixView<const Acc>(dg.cview().data, n, kw, H::Backend::kMemorySpace, 0)};
    for (const RankUnitPath path : {RankUnitPath::kSparse, RankUnitPath::kDense}) {
      INFO("path " << path_name(path));
      Workspace<H> fws(rankwise::rank_units_forward_workspace_bytes<T>(n, kw, r));
      auto y = to_device<H, T>(ctx, y0);
      rankwise::rank_units_forward<Backend, T>(ctx, s, dxm.cview(), dam.cview(), dbtm.cview(),
                                               broadcast, y.view(), path, fws.data(), fws.bytes);
      RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, y), ew.y, SmoraTolerance<T>::kForward);
      Workspace<H> bws(rankwise::rank_units_backward_workspace_bytes<T>(n, kw, r));
      auto dx = to_device<H, T>(ctx, dx0);
      DeviceMatrix<H, T> da(r, d_in), dbt(r, d_out);
      DeviceMatrix<H, Acc> dgates(n, kw);
      rankwise::rank_units_backward<Backend, T>(ctx, s, dxm.cview(), dam.cview(), dbtm.cview(),
                                                broadcast, ddy.cview(), dx.view(), da.view(),
                                                dbt.view(), dgates.view(), false, path, bws.data(),
                                                bws.bytes);
      RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, da), ew.da, SmoraTolerance<T>::kBackward);
      RWTEST_CHECK_NORMWISE(transpose(to_host<H, T>(ctx, dbt)), ew.db,
                            SmoraTolerance<T>::kBackward);
      RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, dx), ew.dx, SmoraTolerance<T>::kBackward);
      RWTEST_CHECK_NORMWISE(to_host<H, Acc>(ctx, dgates), ew.dgates, SmoraTolerance<T>::kBackward);
    }
  }
  {
    INFO("routing shapes");
    Workspace<H> fws(rankwise::rank_units_forward_workspace_bytes<T>(n, k, r));
    auto y = to_device<H, T>(ctx, y0);
    const RawMatrix<H, std::int32_t> no_units(n, 0);
    const DeviceMatrix<H, Acc> no_gates(n, 0);
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "units must have at least one column",
                       rankwise::rank_units_forward<Backend, T>(
                           ctx, s, dxm.cview(), dam.cview(), dbtm.cview(),
                           rankwise::UnitRouting<Acc>{no_units.cview(), no_gates.cview()}, y.view(),
                           RankUnitPath::kSparse, fws.data(), fws.bytes));
    DeviceMatrix<H, Acc> short_gates(n, k - 1);
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "gates (n x k)",
                       rankwise::rank_units_forward<Backend, T>(
                           ctx, s, dxm.cview(), dam.cview(), dbtm.cview(),
                           rankwise::UnitRouting<Acc>{dum.cview(), short_gates.cview()}, y.view(),
                           RankUnitPath::kSparse, fws.data(), fws.bytes));
  }
}

}  // namespace smora_cases
}  // namespace rwtest

/// Instantiates every router and SMoRA case for HARNESS and the storage types
/// that follow, tagged TAG (e.g. "[cpu]"): the same bodies on every backend.
#define RWTEST_SMORA_TEST_CASES(HARNESS, TAG, ...)                                                \
  TEMPLATE_TEST_CASE("router: forward matches the double reference", "[smora][router]" TAG,      \
                     __VA_ARGS__) {                                                               \
    ::rwtest::smora_cases::router_matches_reference<HARNESS, TestType>();                         \
  }                                                                                               \
  TEMPLATE_TEST_CASE("router: ties go to the lower index", "[smora][router][ties]" TAG,          \
                     __VA_ARGS__) {                                                               \
    ::rwtest::smora_cases::router_ties_go_to_the_lower_index<HARNESS, TestType>();                \
  }                                                                                               \
  TEMPLATE_TEST_CASE("router: backward matches the double reference", "[smora][router]" TAG,     \
                     __VA_ARGS__) {                                                               \
    ::rwtest::smora_cases::router_backward_matches_reference<HARNESS, TestType>();                \
  }                                                                                               \
  TEMPLATE_TEST_CASE("router: Switch aux loss gradient", "[smora][router][aux]" TAG,             \
                     __VA_ARGS__) {                                                               \
    ::rwtest::smora_cases::aux_loss_gradient<HARNESS, TestType>();                                \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: deterministic", "[smora][determinism]" TAG, __VA_ARGS__) {          \
    ::rwtest::smora_cases::deterministic<HARNESS, TestType>();                                    \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: forward and backward match the double reference", "[smora]" TAG,   \
                     __VA_ARGS__) {                                                               \
    ::rwtest::smora_cases::layer_matches_reference<HARNESS, TestType>();                          \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: backward after a training forward", "[smora][balance]" TAG, \
                     __VA_ARGS__) {                                                               \
    ::rwtest::smora_cases::backward_after_training_forward<HARNESS, TestType>();                  \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: zero tokens", "[smora]" TAG, __VA_ARGS__) {                         \
    ::rwtest::smora_cases::zero_tokens<HARNESS, TestType>();                                      \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: W_r = 0, b = 0, k = r is LoRA", "[smora][identity]" TAG,            \
                     __VA_ARGS__) {                                                               \
    ::rwtest::smora_cases::identity_lora<HARNESS, TestType>();                                    \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: g > 1 is a mixture of rank-g LoRAs", "[smora][identity]" TAG,       \
                     __VA_ARGS__) {                                                               \
    ::rwtest::smora_cases::identity_mixture_of_loras<HARNESS, TestType>();                        \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: sparse and dense paths agree", "[smora][paths]" TAG, __VA_ARGS__) { \
    ::rwtest::smora_cases::sparse_and_dense_agree<HARNESS, TestType>();                           \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: loss-free balancing", "[smora][balance]" TAG, __VA_ARGS__) {        \
    ::rwtest::smora_cases::balancing<HARNESS, TestType>();                                        \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: state round trip", "[smora][state]" TAG, __VA_ARGS__) {             \
    ::rwtest::smora_cases::state_round_trip<HARNESS, TestType>();                                 \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: init", "[smora][init]" TAG, __VA_ARGS__) {                          \
    ::rwtest::smora_cases::init_contract<HARNESS, TestType>();                                    \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: parameters and accessors", "[smora]" TAG, __VA_ARGS__) {            \
    ::rwtest::smora_cases::parameters_and_accessors<HARNESS, TestType>();                         \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: rejects bad input", "[smora][errors]" TAG, __VA_ARGS__) {           \
    ::rwtest::smora_cases::rejects_bad_input<HARNESS, TestType>();                                \
  }                                                                                               \
  TEMPLATE_TEST_CASE("router: a non-finite token writes nowhere else",                           \
                     "[smora][router][errors]" TAG, __VA_ARGS__) {                      \
    ::rwtest::smora_cases::non_finite_token_writes_nowhere_else<HARNESS, TestType>();             \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: forward with a user routing", "[smora][low-level]" TAG,            \
                     __VA_ARGS__) {                                                               \
    ::rwtest::smora_cases::user_routing_forward<HARNESS, TestType>();                             \
  }                                                                                               \
  TEMPLATE_TEST_CASE("rank units: backward without a dgates fits its workspace",                \
                     "[smora][low-level]" TAG, __VA_ARGS__) {                           \
    ::rwtest::smora_cases::rank_units_backward_without_dgates<HARNESS, TestType>();               \
  }                                                                                               \
  TEMPLATE_TEST_CASE("rank units: low-level API with a user routing", "[smora][low-level]" TAG,  \
                     __VA_ARGS__) {                                                               \
    ::rwtest::smora_cases::low_level_rank_units<HARNESS, TestType>();                             \
  }
