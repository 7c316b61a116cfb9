// Router and SMoRA options beyond the defaults, written once over a harness H
// and a storage type T like cases/smora_cases.hpp: gates when the selected
// sum is at or below zero, the per-rank balance bias of the reference code
// (RouterConfig::bias_per_rank) and a trained balance bias
// (SmoraConfig::train_bias). Each has a case worked out by hand (numbers in
// the comments) and a sweep against the double reference.
#pragma once

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cases/smora_cases.hpp"

namespace rwtest {
namespace smora_option_cases {

using rankwise::MatrixView;
using rankwise::Mode;
using rankwise::RouterConfig;
using rankwise::SmoraConfig;
using smora_cases::AccOf;
using smora_cases::GotRouting;
using smora_cases::RoutingOut;
using smora_cases::SmoraOf;
using smora_cases::SmoraProblem;
using smora_cases::SmoraShape;
using smora_cases::Workspace;

/// Routes one token through router_forward with x = [1] and W_r = the given
/// logits as a column (so logits = W_r x exactly), then router_backward with
/// the given dgates; returns the routing, dW_r (= dlogits) and dbias.
template <class H, class T>
struct OneToken {
  GotRouting routing;
  HostMatrix dlogits;  // (1, E)
  HostMatrix dbias;    // (1, C)
};

template <class H, class T>
OneToken<H, T> route_one_token(const RouterConfig& cfg, const std::vector<double>& logits,
                               const std::vector<double>& bias, const std::vector<double>& dgates) {
  using Acc = AccOf<T>;
  using Backend = typename H::Backend;
  typename H::Ctx ctx;
  const std::int64_t E = cfg.num_experts(), C = cfg.num_choices();
  HostMatrix wr_host(E, 1);
  for (std::int64_t e = 0; e < E; ++e) wr_host(e, 0) = logits[static_cast<std::size_t>(e)];
  const auto x = to_device<H, T>(ctx, HostMatrix(1, 1, 1.0));
  const auto wr = to_device<H, T>(ctx, wr_host);
  const auto b = to_device<H, Acc>(ctx, row_of(bias));
  RoutingOut<H, T> out(ctx, 1, cfg);
  Workspace<H> fws(rankwise::router_forward_workspace_bytes<T>(1, cfg));
  rankwise::router_forward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), b.cview(), {},
                                       out.buffers(), true, fws.data(), fws.bytes);
  const auto dg = to_device<H, Acc>(ctx, row_of(dgates));
  auto dwr = to_device<H, T>(ctx, HostMatrix(E, 1, 7.0));
  auto dbias = to_device<H, Acc>(ctx, HostMatrix(1, C, 7.0));
  Workspace<H> bws(rankwise::router_backward_workspace_bytes<T>(1, cfg));
  rankwise::router_backward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), b.cview(), {},
                                        out.buffers(), dg.cview(), 0.0, MatrixView<T>(),
                                        dwr.view(), dbias.view(), false, bws.data(), bws.bytes);
  OneToken<H, T> r;
  r.routing = smora_cases::fetch_routing<H, Acc>(ctx, out.buffers());
  r.dlogits = transpose(to_host<H, T>(ctx, dwr));
  r.dbias = to_host<H, Acc>(ctx, dbias);
  return r;
}

inline HostMatrix row(std::vector<double> v) { return row_of(v); }

/// router_forward and router_backward (with dbias) of problem p against the
/// reference: selection exact, gates, dW_r, dx and dbias within tolerance.
template <class H, class T>
void check_router_against_reference(typename H::Ctx& ctx, const RouterConfig& cfg,
                                    const SmoraProblem& p, std::uint64_t seed) {
  using Acc = AccOf<T>;
  using Backend = typename H::Backend;
  const std::int64_t n = p.x.rows;
  const HostMatrix dgates = quantize<H, Acc>(random_matrix(n, cfg.top_k, seed * 3 + 1));
  const auto x = to_device<H, T>(ctx, p.x);
  const auto wr = to_device<H, T>(ctx, p.wr);
  const auto bias = to_device<H, Acc>(ctx, row_of(p.bias));
  const auto dg = to_device<H, Acc>(ctx, dgates);
  RoutingOut<H, T> out(ctx, n, cfg);
  Workspace<H> fws(rankwise::router_forward_workspace_bytes<T>(n, cfg));
  rankwise::router_forward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(), {},
                                       out.buffers(), true, fws.data(), fws.bytes);
  const RefRouting ref = ref_route(cfg, p.x, p.wr, p.bias);
  smora_cases::check_routing(smora_cases::fetch_routing<H, Acc>(ctx, out.buffers()), ref,
                             SmoraTolerance<Acc>::kRouter);
  auto dx = to_device<H, T>(ctx, p.dx0);
  auto dwr = to_device<H, T>(ctx, HostMatrix(cfg.num_experts(), p.x.cols, 123.0));
  auto dbias = to_device<H, Acc>(ctx, HostMatrix(1, cfg.num_choices(), 123.0));
  Workspace<H> bws(rankwise::router_backward_workspace_bytes<T>(n, cfg));
  rankwise::router_backward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(), {},
                                        out.buffers(), dg.cview(), 0.0, dx.view(), dwr.view(),
                                        dbias.view(), false, bws.data(), bws.bytes);
  const RouterExpected e = expect_router_backward(cfg, ref, p.x, p.wr, {dgates, abs_of(dgates)},
                                                  HostMatrix(), p.dx0);
  RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, dwr), e.dwr, SmoraTolerance<T>::kBackward);
  RWTEST_CHECK_NORMWISE(to_host<H, T>(ctx, dx), e.dx, SmoraTolerance<T>::kBackward);
  RWTEST_CHECK_NORMWISE(to_host<H, Acc>(ctx, dbias), e.dbias, SmoraTolerance<Acc>::kBackward);
  // accumulate adds a second pass onto dbias.
  rankwise::router_backward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(), {},
                                        out.buffers(), dg.cview(), 0.0, MatrixView<T>(),
                                        dwr.view(), dbias.view(), true, bws.data(), bws.bytes);
  RWTEST_CHECK_NORMWISE(to_host<H, Acc>(ctx, dbias), twice(e.dbias),
                        SmoraTolerance<Acc>::kBackward);
}

/// Four experts (g = 1), k = 2, sigmoid, sum to k, gates from z = s0 + b.
/// logits 0 give s0 = 0.5; b = (-0.7, -0.8, -0.9, -1.0) gives z = (-0.2,
/// -0.3, -0.4, -0.5): experts 0 and 1, Σ z = -0.5, gates 2 z / Σ = (0.8, 1.2)
/// (they sum to k; clamping Σ to +ε would give -4e8 and -6e8). With dgates
/// (1, 0): ∂L/∂z0 = 2 z1 / Σ² = -2.4, ∂L/∂z1 = -2 z0 / Σ² = 1.6, so dlogits
/// = 0.25 · (-2.4, 1.6, 0, 0) and dbias = (-2.4, 1.6, 0, 0). A sum exactly 0
/// (b = (-0.25, -0.75, ...), z = (0.25, -0.25)) is clamped to +ε: ±5e8.
template <class H, class T>
void negative_selected_sum() {
  using Acc = AccOf<T>;
  RWTEST_CONTEXT_OF(H, T, "fixed inputs");
  RouterConfig cfg;
  cfg.num_units = 4;
  cfg.top_k = 2;
  {
    const OneToken<H, T> got =
        route_one_token<H, T>(cfg, {0, 0, 0, 0}, {-0.7, -0.8, -0.9, -1.0}, {1.0, 0.0});
    CHECK(got.routing.experts == std::vector<std::int32_t>{0, 1});
    CHECK(got.routing.units == std::vector<std::int32_t>{0, 1});
    RWTEST_CHECK_NORMWISE(got.routing.gates, row({0.8, 1.2}), SmoraTolerance<Acc>::kRouter);
    RWTEST_CHECK_NORMWISE(got.dbias, row({-2.4, 1.6, 0, 0}), SmoraTolerance<Acc>::kRouter);
    RWTEST_CHECK_NORMWISE(got.dlogits, row({-0.6, 0.4, 0, 0}), SmoraTolerance<T>::kBackward);
  }
  {
    const OneToken<H, T> got =
        route_one_token<H, T>(cfg, {0, 0, 0, 0}, {-0.25, -0.75, -0.9, -1.0}, {0.0, 0.0});
    const double eps = static_cast<double>(cfg.epsilon);
    CHECK(got.routing.experts == std::vector<std::int32_t>{0, 1});
    RWTEST_CHECK_NORMWISE(got.routing.gates, row({0.5 / eps, -0.5 / eps}),
                          SmoraTolerance<Acc>::kRouter);
  }
  // A sweep with the bias pushed below -1 so every selected sum is negative.
  typename H::Ctx ctx;
  std::uint64_t seed = 9100;
  for (const SmoraShape& sh :
       {SmoraShape{9, 13, 0, 8, 3, 1}, SmoraShape{17, 7, 0, 16, 4, 2}, SmoraShape{6, 10, 0, 12, 6, 3}}) {
    for (const auto& opt : smora_cases::all_router_options()) {
      if (!opt.gate_uses_bias) continue;  // gates from s0 > 0: no negative sums
      ++seed;
      RWTEST_CONTEXT(H, T, "shape " << sh, seed);
      INFO("options " << opt);
      const RouterConfig rc = smora_cases::router_config(sh, opt);
      SmoraProblem p = smora_cases::make_problem<H, T>(sh, rc, seed);
      for (double& b : p.bias) b = double(Acc(b - 1.5));
      p.x = smora_cases::well_separated_x<H, T>(rc, sh.n, sh.d_in, p.wr, p.bias,
                                                SmoraTolerance<T>::kMargin, seed);
      check_router_against_reference<H, T>(ctx, rc, p, seed);
    }
  }
}

/// r = 4 ranks in E = 2 experts of g = 2, k = 2, one bias per rank. logits
/// (0, 1.5) give s0 = (0.5, σ(1.5)), per rank (0.5, 0.5, σ, σ) with σ =
/// 0.817574…; b = (0.4, 0, -0.1, 0) gives z = (0.9, 0.5, σ - 0.1, σ): ranks 0
/// and 3 win — both blocks are split. Gates 2 z / Σ with Σ = 0.9 + σ;
/// counts (1, 0, 0, 1); a balance step moves the bias by (-u, +u, +u, -u).
/// dgates (1, 0): ∂L/∂z0 = 2 σ / Σ², ∂L/∂z3 = -1.8 / Σ²; dlogits = (∂L/∂z0 ·
/// 0.25, ∂L/∂z3 · σ (1 - σ)) and dbias = (∂L/∂z0, 0, 0, ∂L/∂z3).
template <class H, class T>
void per_rank_bias() {
  using Acc = AccOf<T>;
  RWTEST_CONTEXT_OF(H, T, "fixed inputs");
  RouterConfig cfg;
  cfg.num_units = 4;
  cfg.group_size = 2;
  cfg.top_k = 2;
  cfg.bias_per_rank = true;
  {
    const double sg = 1.0 / (1.0 + std::exp(-1.5)), sum = 0.9 + sg;
    const OneToken<H, T> got =
        route_one_token<H, T>(cfg, {0.0, 1.5}, {0.4, 0.0, -0.1, 0.0}, {1.0, 0.0});
    CHECK(got.routing.experts == std::vector<std::int32_t>{0, 3});
    CHECK(got.routing.units == std::vector<std::int32_t>{0, 3});
    CHECK(got.routing.counts == std::vector<std::int32_t>{1, 0, 0, 1});
    RWTEST_CHECK_NORMWISE(got.routing.gates, row({1.8 / sum, 2 * sg / sum}),
                          SmoraTolerance<Acc>::kRouter);
    const double d0 = 2 * sg / (sum * sum), d3 = -1.8 / (sum * sum);
    RWTEST_CHECK_NORMWISE(got.dbias, row({d0, 0, 0, d3}), SmoraTolerance<Acc>::kRouter);
    RWTEST_CHECK_NORMWISE(got.dlogits, row({d0 * 0.25, d3 * sg * (1 - sg)}),
                          SmoraTolerance<T>::kBackward);
  }
  {
    // The balance step per rank through the layer: counts (1, 0, 0, 1).
    typename H::Ctx ctx;
    SmoraConfig sc;
    sc.d_in = 1;
    sc.d_out = 3;
    sc.router = cfg;
    SmoraOf<H, T> layer(ctx, sc);
    REQUIRE(layer.choices() == 4);
    smora_cases::load<H, T>(ctx, layer, HostMatrix(4, 1, 0.5), HostMatrix(3, 4, 0.25),
                            [] {
                              HostMatrix w(2, 1);
                              w(1, 0) = 1.5;
                              return w;
                            }(),
                            {0.4, 0.0, -0.1, 0.0});
    const auto x = to_device<H, T>(ctx, HostMatrix(1, 1, 1.0));
    auto y = to_device<H, T>(ctx, HostMatrix(1, 3));
    layer.forward(x.cview(), y.view(), Mode::kTraining);
    const float u = cfg.bias_update_rate;
    const std::vector<Acc> expected{Acc(Acc(0.4) - Acc(u)), Acc(u), Acc(Acc(-0.1) + Acc(u)),
                                    Acc(-Acc(u))};
    CHECK(smora_cases::bias_of<H, T>(ctx, layer) == expected);
    CHECK(layer.state().at("bias").shape == std::vector<std::int64_t>{4});
  }
  // Sweep against the reference: router and layer, g = 2 and 3, every option.
  typename H::Ctx ctx;
  std::uint64_t seed = 9300;
  for (const SmoraShape& sh :
       {SmoraShape{17, 7, 0, 16, 4, 2}, SmoraShape{6, 10, 0, 12, 6, 3}, SmoraShape{9, 5, 0, 6, 3, 3}}) {
    for (const auto& opt : smora_cases::all_router_options()) {
      ++seed;
      RWTEST_CONTEXT(H, T, "shape " << sh, seed);
      INFO("options " << opt << ", bias_per_rank");
      RouterConfig rc = smora_cases::router_config(sh, opt);
      rc.bias_per_rank = true;
      const SmoraProblem p = smora_cases::make_problem<H, T>(sh, rc, seed, false, 0.2);
      check_router_against_reference<H, T>(ctx, rc, p, seed);
    }
  }
  for (const SmoraShape& sh : {SmoraShape{20, 11, 17, 12, 6, 3}, SmoraShape{33, 19, 21, 16, 4, 2}}) {
    for (const auto path : {rankwise::RankUnitPath::kSparse, rankwise::RankUnitPath::kDense}) {
      ++seed;
      RWTEST_CONTEXT(H, T, "shape " << sh, seed);
      INFO("layer, bias_per_rank, path " << smora_cases::path_name(path));
      SmoraConfig sc = smora_cases::smora_config(sh, {}, path);
      sc.router.bias_per_rank = true;
      const SmoraProblem p = smora_cases::make_problem<H, T>(sh, sc.router, seed, true, 0.2);
      SmoraOf<H, T> layer(ctx, sc);
      smora_cases::load<H, T>(ctx, layer, p);
      const DeviceMask<H> mask(ctx, p.mask);
      const auto got = smora_cases::run_layer<H, T>(ctx, layer, p, mask);
      smora_cases::check_layer_against_reference<H, T>(got, smora_cases::reference_for<H, T>(sc, p));
    }
  }
}

/// train_bias: parameters() holds the bias with its gradient, which matches
/// the reference (zero when the gates do not use the bias), for the per-expert
/// and the per-rank layouts; a half or bfloat16 layer refuses the option.
template <class H, class T>
void trained_bias() {
  using Acc = AccOf<T>;
  typename H::Ctx ctx;
  if constexpr (!std::is_same<T, Acc>::value) {
    SmoraConfig sc = smora_cases::smora_config({1, 4, 4, 8, 2, 1});
    sc.train_bias = true;
    RWTEST_CHECK_ERROR(rankwise::ErrorCode::kInvalidArgument,
                       "train_bias needs float or double storage", SmoraOf<H, T> layer(ctx, sc));
    return;
  }
  std::uint64_t seed = 9500;
  for (const SmoraShape& sh : {SmoraShape{7, 13, 9, 8, 3, 1}, SmoraShape{20, 11, 17, 12, 6, 3}}) {
    for (const bool per_rank : {false, true}) {
      for (const bool uses_bias : {true, false}) {
        ++seed;
        RWTEST_CONTEXT(H, T, "shape " << sh, seed);
        INFO("bias_per_rank " << per_rank << ", gate_uses_bias " << uses_bias);
        smora_cases::RouterOptions opt;
        opt.gate_uses_bias = uses_bias;
        SmoraConfig sc = smora_cases::smora_config(sh, opt);
        sc.router.bias_per_rank = per_rank;
        sc.train_bias = true;
        const SmoraProblem p = smora_cases::make_problem<H, T>(sh, sc.router, seed, false, 0.2);
        SmoraOf<H, T> layer(ctx, sc);
        const std::int64_t C = sc.router.num_choices();
        const auto params = layer.parameters();
        REQUIRE(params.size() == 4);
        CHECK(params[3].name == "bias");
        CHECK(params[3].value.cols == C);
        CHECK(layer.num_parameters() ==
              sh.r * (sh.d_in + sh.d_out) + sc.router.num_experts() * sh.d_in + C);
        smora_cases::load<H, T>(ctx, layer, p);
        const DeviceMask<H> mask(ctx, p.mask);
        const auto got = smora_cases::run_layer<H, T>(ctx, layer, p, mask);
        const SmoraReference ref = smora_cases::reference_for<H, T>(sc, p);
        smora_cases::check_layer_against_reference<H, T>(got, ref);
        const HostMatrix dbias = to_host<H, Acc>(ctx, MatrixView<const Acc>(layer.grad_bias()));
        if (uses_bias) {
          RWTEST_CHECK_NORMWISE(dbias, ref.dbias, SmoraTolerance<T>::kBackward);
        } else {
          CHECK(dbias.v == std::vector<double>(static_cast<std::size_t>(C), 0.0));
        }
        layer.zero_grad();
        CHECK(to_host<H, Acc>(ctx, MatrixView<const Acc>(layer.grad_bias())).v ==
              std::vector<double>(static_cast<std::size_t>(C), 0.0));
      }
    }
  }
}

}  // namespace smora_option_cases
}  // namespace rwtest

/// Instantiates the option cases for HARNESS and the storage types that
/// follow, tagged TAG.
#define RWTEST_SMORA_OPTION_CASES(HARNESS, TAG, ...)                                              \
  TEMPLATE_TEST_CASE("router: a selected sum at or below zero keeps its sign",                    \
                     "[smora][router][options]" TAG, __VA_ARGS__) {                               \
    ::rwtest::smora_option_cases::negative_selected_sum<HARNESS, TestType>();                     \
  }                                                                                               \
  TEMPLATE_TEST_CASE("router: one balance bias per rank", "[smora][router][options]" TAG,         \
                     __VA_ARGS__) {                                                               \
    ::rwtest::smora_option_cases::per_rank_bias<HARNESS, TestType>();                             \
  }                                                                                               \
  TEMPLATE_TEST_CASE("smora: a trained balance bias", "[smora][options]" TAG, __VA_ARGS__) {      \
    ::rwtest::smora_option_cases::trained_bias<HARNESS, TestType>();                              \
  }
