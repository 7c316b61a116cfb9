// The rank-expert router and SMoRA on the CPU backend (float, double): the
// shared cases of cases/smora_cases.hpp, plus central finite differences in
// double of the layer's gradients and of the Switch aux-loss term.
#include <catch2/catch.hpp>

#include <cstdint>
#include <vector>

#include "cases/smora_cases.hpp"
#include "cases/smora_option_cases.hpp"
#include "support/finite_difference.hpp"
#include "support/harness_cpu.hpp"

RWTEST_SMORA_TEST_CASES(rwtest::CpuHarness, "[cpu]", float, double)
RWTEST_SMORA_OPTION_CASES(rwtest::CpuHarness, "[cpu]", float, double)

namespace {

using rwtest::HostMatrix;
using rwtest::SmoraTolerance;
using rwtest::smora_cases::RouterOptions;
using rwtest::smora_cases::SmoraProblem;
using rwtest::smora_cases::SmoraShape;
using H = rwtest::CpuHarness;
using T = double;
using Layer = rankwise::Smora<T, H::Backend>;

/// Central step. The loss is smooth where the selection does not change and
/// every test input keeps its top-k decisions kMargin = 2e-4 apart, far more
/// than a 1e-6 step can move a score; each evaluation checks that anyway.
constexpr double kStep = 1e-6;

/// L = Σ w ⊙ y from the layer's own forward (inference: the bias stays), and
/// the units it selected.
double loss(H::Ctx& ctx, Layer& layer, const SmoraProblem& p, const HostMatrix& w,
            std::vector<std::int32_t>* units) {
  rwtest::smora_cases::load<H, T>(ctx, layer, p);
  const auto x = rwtest::to_device<H, T>(ctx, p.x);
  auto y = rwtest::to_device<H, T>(ctx, p.y0);
  layer.forward(x.cview(), y.view());
  *units = rwtest::smora_cases::fetch_routing<H, T>(ctx, layer.routing()).units;
  return rwtest::ref_weighted_sum(w, rwtest::to_host<H, T>(ctx, y));
}

/// Central differences of `evaluate` over every element of `base`; counts the
/// evaluations whose selection differs from `units0`.
template <class Evaluate>
HostMatrix central(const HostMatrix& base, Evaluate evaluate, int* reroutes) {
  return rwtest::central_difference(base, kStep, [&](const HostMatrix& m) {
    bool same = true;
    const double l = evaluate(m, &same);
    *reroutes += same ? 0 : 1;
    return l;
  });
}

}  // namespace

TEST_CASE("smora: gradients match central finite differences (double)", "[smora][cpu][fd]") {
  H::Ctx ctx;
  struct Case {
    SmoraShape shape;
    RouterOptions options;
  };
  using rankwise::GateNormalization;
  using rankwise::ScoreFunction;
  const Case cases[] = {
      {{6, 7, 5, 8, 3, 1}, {ScoreFunction::kSigmoid, GateNormalization::kSumToK, true}},
      {{5, 6, 4, 16, 4, 2}, {ScoreFunction::kSoftmax, GateNormalization::kSumToOne, true}},
      {{4, 5, 6, 12, 6, 3}, {ScoreFunction::kSigmoid, GateNormalization::kNone, false}},
      {{3, 4, 3, 6, 2, 1}, {ScoreFunction::kSoftmax, GateNormalization::kSumToK, false}},
      {{4, 9, 2, 12, 4, 2}, {ScoreFunction::kSigmoid, GateNormalization::kSumToOne, false}},
  };
  std::uint64_t seed = 8000;
  for (const Case& c : cases) {
    for (const rankwise::RankUnitPath path :
         {rankwise::RankUnitPath::kSparse, rankwise::RankUnitPath::kDense}) {
      ++seed;
      RWTEST_CONTEXT(H, T,
                     "shape " << c.shape << ", options " << c.options << ", path "
                              << rwtest::smora_cases::path_name(path),
                     seed);
      const rankwise::SmoraConfig cfg = rwtest::smora_cases::smora_config(c.shape, c.options, path);
      const SmoraProblem p = rwtest::smora_cases::make_problem<H, T>(c.shape, cfg.router, seed);
      const HostMatrix w = rwtest::random_matrix(c.shape.n, c.shape.d_out, seed + 1);
      Layer layer(ctx, cfg);

      // Analytic: backward with dy = ∂L/∂y = w and dx from 0.
      SmoraProblem q = p;
      q.dy = w;
      q.dx0 = HostMatrix(c.shape.n, c.shape.d_in);
      rwtest::smora_cases::load<H, T>(ctx, layer, q);
      const rwtest::DeviceMask<H> no_mask(ctx, q.mask);
      const auto got = rwtest::smora_cases::run_layer<H, T>(ctx, layer, q, no_mask);
      const std::vector<std::int32_t> units0 = got.routing.units;

      int reroutes = 0;
      auto with = [&](auto set) {
        return [&, set](const HostMatrix& m, bool* same) {
          SmoraProblem r = p;
          set(r, m);
          std::vector<std::int32_t> units;
          const double l = loss(ctx, layer, r, w, &units);
          *same = units == units0;
          return l;
        };
      };
      const HostMatrix fd_a = central(p.a, with([](SmoraProblem& r, const HostMatrix& m) { r.a = m; }), &reroutes);
      const HostMatrix fd_b = central(p.b, with([](SmoraProblem& r, const HostMatrix& m) { r.b = m; }), &reroutes);
      const HostMatrix fd_wr = central(p.wr, with([](SmoraProblem& r, const HostMatrix& m) { r.wr = m; }), &reroutes);
      const HostMatrix fd_x = central(p.x, with([](SmoraProblem& r, const HostMatrix& m) { r.x = m; }), &reroutes);
      REQUIRE(reroutes == 0);
      RWTEST_CHECK_FINITE_DIFFERENCE(got.da, fd_a, SmoraTolerance<T>::kFiniteDifference);
      RWTEST_CHECK_FINITE_DIFFERENCE(got.db, fd_b, SmoraTolerance<T>::kFiniteDifference);
      RWTEST_CHECK_FINITE_DIFFERENCE(got.dwr, fd_wr, SmoraTolerance<T>::kFiniteDifference);
      RWTEST_CHECK_FINITE_DIFFERENCE(got.dx, fd_x, SmoraTolerance<T>::kFiniteDifference);
    }
  }
}

TEST_CASE("router: Switch aux loss gradient matches finite differences (double)",
          "[smora][router][aux][cpu][fd]") {
  // L_aux = coef · E · Σ_e f_e P_e with the shares f_e held at this batch's
  // counts (piecewise constant; checked unchanged): router_backward with
  // dgates = 0 must give ∂L_aux/∂W_r and ∂L_aux/∂x.
  H::Ctx ctx;
  using Backend = H::Backend;
  using rankwise::ScoreFunction;
  std::uint64_t seed = 8500;
  for (const ScoreFunction score : {ScoreFunction::kSigmoid, ScoreFunction::kSoftmax}) {
    for (const bool masked : {false, true}) {
      ++seed;
      const SmoraShape sh{9, 6, 0, 12, 4, 2};
      RWTEST_CONTEXT(H, T,
                     "shape " << sh << ", softmax " << (score == ScoreFunction::kSoftmax)
                              << ", masked " << masked,
                     seed);
      RouterOptions opt;
      opt.score = score;
      const rankwise::RouterConfig cfg = rwtest::smora_cases::router_config(sh, opt);
      const double coef = 0.6;
      const SmoraProblem p = rwtest::smora_cases::make_problem<H, T>(sh, cfg, seed, masked);
      const rwtest::RefRouting base = rwtest::ref_route(cfg, p.x, p.wr, p.bias, p.mask);

      const auto x = rwtest::to_device<H, T>(ctx, p.x);
      const auto wr = rwtest::to_device<H, T>(ctx, p.wr);
      const auto bias = rwtest::to_device<H, T>(ctx, rwtest::row_of(p.bias));
      const auto dg = rwtest::to_device<H, T>(ctx, HostMatrix(sh.n, sh.k));
      const rwtest::DeviceMask<H> mask(ctx, p.mask);
      rwtest::smora_cases::RoutingOut<H, T> out(ctx, sh.n, cfg);
      rwtest::smora_cases::Workspace<H> fws(rankwise::router_forward_workspace_bytes<T>(sh.n, cfg));
      rankwise::router_forward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(),
                                           mask.view(), out.buffers(), true, fws.data(), fws.bytes);
      auto dx = rwtest::to_device<H, T>(ctx, HostMatrix(sh.n, sh.d_in));
      auto dwr = rwtest::to_device<H, T>(ctx, HostMatrix(cfg.num_experts(), sh.d_in));
      rwtest::smora_cases::Workspace<H> bws(rankwise::router_backward_workspace_bytes<T>(sh.n, cfg));
      rankwise::router_backward<Backend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(),
                                            mask.view(), out.buffers(), dg.cview(), coef, dx.view(),
                                            dwr.view(), false, bws.data(), bws.bytes);

      int recounts = 0;
      auto aux = [&](const HostMatrix& xx, const HostMatrix& ww, bool* same) {
        const rwtest::RefRouting r = rwtest::ref_route(cfg, xx, ww, p.bias, p.mask);
        *same = r.counts == base.counts;
        return rwtest::ref_aux_loss(cfg, base, r, p.mask, coef);
      };
      const HostMatrix fd_wr = central(
          p.wr, [&](const HostMatrix& m, bool* same) { return aux(p.x, m, same); }, &recounts);
      const HostMatrix fd_x = central(
          p.x, [&](const HostMatrix& m, bool* same) { return aux(m, p.wr, same); }, &recounts);
      REQUIRE(recounts == 0);
      RWTEST_CHECK_FINITE_DIFFERENCE(rwtest::to_host<H, T>(ctx, dwr), fd_wr,
                                     SmoraTolerance<T>::kFiniteDifference);
      RWTEST_CHECK_FINITE_DIFFERENCE(rwtest::to_host<H, T>(ctx, dx), fd_x,
                                     SmoraTolerance<T>::kFiniteDifference);
    }
  }
}

TEST_CASE("smora: per-rank, trained and negative biases match central finite differences (double)",
          "[smora][cpu][fd][options]") {
  // The options' gradients, the bias's included, against central differences
  // of the layer's own forward. The last case pushes every bias below -1, so
  // every selected sum is negative (the sign-keeping normaliser).
  H::Ctx ctx;
  struct Case {
    SmoraShape shape;
    bool per_rank;
    double bias_shift;
  };
  const Case cases[] = {
      {{6, 7, 5, 8, 4, 2}, true, 0.0},
      {{4, 5, 6, 12, 6, 3}, true, 0.0},
      {{5, 6, 4, 8, 3, 1}, false, -1.5},
      {{5, 6, 4, 8, 4, 2}, true, -1.5},
  };
  std::uint64_t seed = 8700;
  for (const Case& c : cases) {
    ++seed;
    RWTEST_CONTEXT(H, T,
                   "shape " << c.shape << ", bias_per_rank " << c.per_rank << ", bias shift "
                            << c.bias_shift,
                   seed);
    rankwise::SmoraConfig cfg = rwtest::smora_cases::smora_config(c.shape);
    cfg.router.bias_per_rank = c.per_rank;
    cfg.train_bias = true;
    SmoraProblem p = rwtest::smora_cases::make_problem<H, T>(c.shape, cfg.router, seed, false, 0.2);
    for (double& b : p.bias) b += c.bias_shift;
    p.x = rwtest::smora_cases::well_separated_x<H, T>(cfg.router, c.shape.n, c.shape.d_in, p.wr,
                                                       p.bias, SmoraTolerance<T>::kMargin, seed);
    const HostMatrix w = rwtest::random_matrix(c.shape.n, c.shape.d_out, seed + 1);
    Layer layer(ctx, cfg);
    SmoraProblem q = p;
    q.dy = w;
    q.dx0 = HostMatrix(c.shape.n, c.shape.d_in);
    rwtest::smora_cases::load<H, T>(ctx, layer, q);
    const rwtest::DeviceMask<H> no_mask(ctx, q.mask);
    const auto got = rwtest::smora_cases::run_layer<H, T>(ctx, layer, q, no_mask);
    const HostMatrix dbias = rwtest::to_host<H, T>(ctx, rankwise::MatrixView<const T>(layer.grad_bias()));
    const std::vector<std::int32_t> units0 = got.routing.units;

    int reroutes = 0;
    auto with = [&](auto set) {
      return [&, set](const HostMatrix& m, bool* same) {
        SmoraProblem r = p;
        set(r, m);
        std::vector<std::int32_t> units;
        const double l = loss(ctx, layer, r, w, &units);
        *same = units == units0;
        return l;
      };
    };
    const HostMatrix fd_a = central(p.a, with([](SmoraProblem& r, const HostMatrix& m) { r.a = m; }), &reroutes);
    const HostMatrix fd_wr = central(p.wr, with([](SmoraProblem& r, const HostMatrix& m) { r.wr = m; }), &reroutes);
    const HostMatrix fd_x = central(p.x, with([](SmoraProblem& r, const HostMatrix& m) { r.x = m; }), &reroutes);
    const HostMatrix fd_bias = central(
        rwtest::row_of(p.bias),
        with([](SmoraProblem& r, const HostMatrix& m) { r.bias = m.v; }), &reroutes);
    REQUIRE(reroutes == 0);
    RWTEST_CHECK_FINITE_DIFFERENCE(got.da, fd_a, SmoraTolerance<T>::kFiniteDifference);
    RWTEST_CHECK_FINITE_DIFFERENCE(got.dwr, fd_wr, SmoraTolerance<T>::kFiniteDifference);
    RWTEST_CHECK_FINITE_DIFFERENCE(got.dx, fd_x, SmoraTolerance<T>::kFiniteDifference);
    RWTEST_CHECK_FINITE_DIFFERENCE(dbias, fd_bias, SmoraTolerance<T>::kFiniteDifference);
  }
}
