// The rank-expert router and SMoRA on the CUDA backend (float, __half,
// __nv_bfloat16): the same cases as the CPU (cases/smora_cases.hpp), plus
// what compares the GPU with the CPU backend: routing of the same float
// logits and the bits of Smora::init. Exits 77 (CTest: skipped) when no CUDA
// device is usable.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cases/smora_cases.hpp"
#include "cases/smora_option_cases.hpp"
#include "support/cuda_session.cuh"
#include "support/harness_cuda.cuh"
#include "support/smora_io.hpp"

RWTEST_SMORA_TEST_CASES(rwtest::CudaHarness, "[cuda]", float, __half, __nv_bfloat16)
RWTEST_SMORA_OPTION_CASES(rwtest::CudaHarness, "[cuda]", float, __half, __nv_bfloat16)

namespace {

using rankwise::CudaBackend;
using rankwise::MatrixView;
using rwtest::CudaHarness;
using rwtest::HostMatrix;
using rwtest::smora_cases::RouterOptions;
using rwtest::smora_cases::SmoraShape;

}  // namespace

TEST_CASE("cuda: routing of float logits equals the CPU backend's", "[cuda][smora][router]") {
  // The CPU backend routes every token with route_token (rankwise/core/
  // routing.hpp) on the host; the same function runs here on the host over
  // the same float logits and bias (no CPU backend in a .cu file). The GPU
  // must select the same experts and units; scores and gates agree within
  // float rounding (expf on the device, std::exp on the host).
  rankwise::CudaContext ctx;
  std::uint64_t seed = 9000;
  for (const SmoraShape& sh : rwtest::smora_cases::router_shapes()) {
    for (const RouterOptions& opt : rwtest::smora_cases::all_router_options()) {
      ++seed;
      RWTEST_CONTEXT(CudaHarness, float, "shape " << sh << ", options " << opt, seed);
      const rankwise::RouterConfig cfg = rwtest::smora_cases::router_config(sh, opt);
      const std::int64_t E = cfg.num_experts(), ke = cfg.experts_per_token();
      const std::vector<double> bias =
          rwtest::quantize<CudaHarness, float>(rwtest::random_matrix(1, E, seed, -0.05, 0.05)).v;
      const HostMatrix logits = rwtest::smora_cases::well_separated_logits<CudaHarness, float>(
          cfg, sh.n, bias, rwtest::SmoraTolerance<float>::kMargin, seed);

      // Host: the CPU backend's loop.
      const rankwise::RoutingRule rule = rankwise::RoutingRule::from(cfg);
      const std::vector<float> bias_f(bias.begin(), bias.end());
      std::vector<float> scores(static_cast<std::size_t>(sh.n * E)),
          gates(static_cast<std::size_t>(sh.n * sh.k));
      std::vector<int> experts(static_cast<std::size_t>(sh.n * ke)),
          units(static_cast<std::size_t>(sh.n * sh.k));
      for (std::int64_t t = 0; t < sh.n; ++t) {
        std::vector<float> row(static_cast<std::size_t>(E));
        for (std::int64_t e = 0; e < E; ++e) row[e] = static_cast<float>(logits(t, e));
        REQUIRE(rankwise::route_token(rule, row.data(), bias_f.data(), &scores[t * E],
                                      &experts[t * ke], &units[t * sh.k], &gates[t * sh.k]));
      }
      // Device.
      const auto dl = rwtest::to_device<CudaHarness, float>(ctx, logits);
      const auto db = rwtest::to_device<CudaHarness, float>(ctx, rwtest::row_of(bias));
      rwtest::smora_cases::RoutingOut<CudaHarness, float> out(ctx, sh.n, cfg);
      rwtest::smora_cases::Workspace<CudaHarness> ws(
          rankwise::router_forward_workspace_bytes<float>(sh.n, cfg));
      rankwise::router_forward_from_logits<CudaBackend, float>(
          ctx, cfg, dl.cview(), db.cview(), {}, out.buffers(), true, ws.data(), ws.bytes);
      const rwtest::smora_cases::GotRouting got =
          rwtest::smora_cases::fetch_routing<CudaHarness, float>(ctx, out.buffers());
      CHECK(got.experts == std::vector<std::int32_t>(experts.begin(), experts.end()));
      CHECK(got.units == std::vector<std::int32_t>(units.begin(), units.end()));
      HostMatrix host_scores(sh.n, E), host_gates(sh.n, sh.k);
      for (std::size_t i = 0; i < scores.size(); ++i) host_scores.v[i] = scores[i];
      for (std::size_t i = 0; i < gates.size(); ++i) host_gates.v[i] = gates[i];
      RWTEST_CHECK_NORMWISE(got.scores, host_scores, rwtest::SmoraTolerance<float>::kRouter);
      RWTEST_CHECK_NORMWISE(got.gates, host_gates, rwtest::SmoraTolerance<float>::kRouter);
    }
  }
}

TEST_CASE("cuda: Smora::init float bits equal the CPU backend's", "[cuda][smora][init]") {
  // The CPU backend stores static_cast<float>(uniform(...)) at element
  // i * cols + j of substream(seed, 0) for A and substream(seed, 2) for W_r;
  // computed here on the host. The shapes need many blocks of the fill.
  rankwise::CudaContext ctx;
  for (const std::uint64_t seed : {0ull, 7ull, 0xFFFFFFFFFFFFFFFFull}) {
    rankwise::SmoraConfig cfg =
        rwtest::smora_cases::smora_config(SmoraShape{1, 4099, 17, 64, 8, 2});
    INFO("seed " << seed << ", d_in " << cfg.d_in);
    rankwise::Smora<float, CudaBackend> layer(ctx, cfg);
    layer.init(seed);
    const double bound = 1.0 / std::sqrt(static_cast<double>(cfg.d_in));
    auto want = [&](std::uint64_t which, std::int64_t rows) {
      std::vector<float> w(static_cast<std::size_t>(rows * cfg.d_in));
      const std::uint64_t stream = rankwise::substream(seed, which);
      for (std::size_t e = 0; e < w.size(); ++e)
        w[e] = static_cast<float>(rankwise::uniform(stream, e, -bound, bound));
      return w;
    };
    CHECK(rwtest::first_bit_difference(
              rwtest::to_host_raw<CudaHarness, float>(ctx, MatrixView<const float>(layer.a())),
              want(0, layer.rank())) == -1);
    CHECK(rwtest::first_bit_difference(
              rwtest::to_host_raw<CudaHarness, float>(ctx, MatrixView<const float>(layer.wr())),
              want(2, layer.experts())) == -1);
  }
}

namespace {

// Ref scaled by `factor`, rounded to T: a problem moved to another magnitude.
template <class T>
HostMatrix scaled(const HostMatrix& m, double factor) {
  HostMatrix out = m;
  for (double& v : out.v) v *= factor;
  return rwtest::quantize<CudaHarness, T>(out);
}

double max_abs(const HostMatrix& m) {
  double most = 0.0;
  for (double v : m.v) most = std::max(most, std::abs(v));
  return most;
}

}  // namespace

TEST_CASE("cuda: half router backward keeps dlogits below 6e-8 in fp32", "[cuda][smora][fp16]") {
  // dlogits of about 1e-8 round to 0 (or to one subnormal step, 6e-8) in
  // half; kept in fp32 up to dW_r = dlogitsᵀ X, summed over 2048 tokens with
  // |x| ~ 1000, they give a dW_r well inside half's normal range. x is scaled
  // up and W_r down by the same factor, so the routing is the usual one.
  using T = __half;
  rankwise::CudaContext ctx;
  const SmoraShape sh{2048, 16, 0, 8, 2, 1};
  const std::uint64_t seed = 7100;
  RWTEST_CONTEXT(CudaHarness, T, "shape " << sh, seed);
  const rankwise::RouterConfig cfg = rwtest::smora_cases::router_config(sh);
  rwtest::smora_cases::SmoraProblem p =
      rwtest::smora_cases::make_problem<CudaHarness, T>(sh, cfg, seed);
  p.x = scaled<T>(p.x, 1000.0);
  p.wr = scaled<T>(p.wr, 1e-3);
  const HostMatrix dgates = rwtest::quantize<CudaHarness, float>(
      rwtest::random_matrix(sh.n, sh.k, seed + 1, -1e-7, 1e-7));
  const auto x = rwtest::to_device<CudaHarness, T>(ctx, p.x);
  const auto wr = rwtest::to_device<CudaHarness, T>(ctx, p.wr);
  const auto bias = rwtest::to_device<CudaHarness, float>(ctx, rwtest::row_of(p.bias));
  const auto dg = rwtest::to_device<CudaHarness, float>(ctx, dgates);
  rwtest::smora_cases::RoutingOut<CudaHarness, T> out(ctx, sh.n, cfg);
  rwtest::smora_cases::Workspace<CudaHarness> fws(
      rankwise::router_forward_workspace_bytes<T>(sh.n, cfg));
  rankwise::router_forward<CudaBackend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(), {},
                                           out.buffers(), true, fws.data(), fws.bytes);
  auto dwr = rwtest::to_device<CudaHarness, T>(ctx, HostMatrix(cfg.num_experts(), sh.d_in));
  rwtest::smora_cases::Workspace<CudaHarness> bws(
      rankwise::router_backward_workspace_bytes<T>(sh.n, cfg));
  rankwise::router_backward<CudaBackend, T>(ctx, cfg, x.cview(), wr.cview(), bias.cview(), {},
                                            out.buffers(), dg.cview(), 0.0, MatrixView<T>(),
                                            dwr.view(), false, bws.data(), bws.bytes);
  const auto ref = rwtest::ref_route(cfg, p.x, p.wr, p.bias);
  const auto e =
      rwtest::expect_router_backward(cfg, ref, p.x, p.wr, {dgates, rwtest::abs_of(dgates)},
                                     HostMatrix(1, cfg.num_experts()), HostMatrix(sh.n, sh.d_in));
  // The regime: every dlogit below half's smallest subnormal step, dW_r normal.
  REQUIRE(max_abs(e.dlogits.ref) < 6e-8);
  REQUIRE(max_abs(e.dwr.ref) > 1e-3);
  const rwtest::Comparison c = rwtest::compare(rwtest::to_host<CudaHarness, T>(ctx, dwr), e.dwr.ref,
                                               rwtest::normwise_magnitude(e.dwr.ref), "dwr");
  INFO(c);
  CHECK(c.normwise < 4e-3);  // half's rounding of dW_r itself, and fp32 sums
}

TEST_CASE("cuda: half dense rank units with gates x H beyond half's range", "[cuda][smora][fp16]") {
  // |gate · H| reaches about 1.5e5, beyond half's 65504: stored in half it
  // would be infinite. In fp32 up to the products, y, dBt, dA and dx (scaled
  // by s = 1e-3) are ordinary half values.
  using T = __half;
  rankwise::CudaContext ctx;
  const std::int64_t n = 64, d_in = 64, d_out = 32, r = 16, k = 16;
  const double s = 1e-3;
  const std::uint64_t seed = 7200;
  INFO("n " << n << ", d_in " << d_in << ", d_out " << d_out << ", r = k = " << r << ", seed "
            << seed);
  const HostMatrix xh =
      rwtest::quantize<CudaHarness, T>(rwtest::random_matrix(n, d_in, seed, -16, 16));
  const HostMatrix ah = rwtest::quantize<CudaHarness, T>(rwtest::random_matrix(r, d_in, seed + 1));
  const HostMatrix bh =
      rwtest::quantize<CudaHarness, T>(rwtest::random_matrix(d_out, r, seed + 2, -0.25, 0.25));
  const HostMatrix dyh =
      rwtest::quantize<CudaHarness, T>(rwtest::random_matrix(n, d_out, seed + 3));
  const HostMatrix gates =
      rwtest::quantize<CudaHarness, float>(rwtest::random_matrix(n, k, seed + 4, 1000.0, 4000.0));
  std::vector<std::int32_t> units(static_cast<std::size_t>(n * k));
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t j = 0; j < k; ++j) units[t * k + j] = static_cast<std::int32_t>((j + t) % r);
  double most = 0.0;
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t j = 0; j < k; ++j) {
      double h = 0.0;
      for (std::int64_t i = 0; i < d_in; ++i) h += ah(units[t * k + j], i) * xh(t, i);
      most = std::max(most, std::abs(gates(t, j) * h));
    }
  REQUIRE(most > 65504.0 * 1.5);

  const auto x = rwtest::to_device<CudaHarness, T>(ctx, xh);
  const auto a = rwtest::to_device<CudaHarness, T>(ctx, ah);
  const auto bt = rwtest::to_device<CudaHarness, T>(ctx, rwtest::transpose(bh));
  const auto dy = rwtest::to_device<CudaHarness, T>(ctx, dyh);
  const auto du = rwtest::upload_raw<CudaHarness, std::int32_t>(ctx, units, n, k);
  const auto dg = rwtest::to_device<CudaHarness, float>(ctx, gates);
  const rankwise::UnitRouting<float> routing{du.cview(), dg.cview()};
  auto y = rwtest::to_device<CudaHarness, T>(ctx, HostMatrix(n, d_out));
  rwtest::smora_cases::Workspace<CudaHarness> fws(
      rankwise::rank_units_forward_workspace_bytes<T>(n, k, r));
  rankwise::rank_units_forward<CudaBackend, T>(ctx, s, x.cview(), a.cview(), bt.cview(), routing,
                                               y.view(), rankwise::RankUnitPath::kDense, fws.data(),
                                               fws.bytes);
  auto dx = rwtest::to_device<CudaHarness, T>(ctx, HostMatrix(n, d_in));
  auto da = rwtest::to_device<CudaHarness, T>(ctx, HostMatrix(r, d_in));
  auto dbt = rwtest::to_device<CudaHarness, T>(ctx, HostMatrix(r, d_out));
  rwtest::smora_cases::Workspace<CudaHarness> bws(
      rankwise::rank_units_backward_workspace_bytes<T>(n, k, r));
  rankwise::rank_units_backward<CudaBackend, T>(
      ctx, s, x.cview(), a.cview(), bt.cview(), routing, dy.cview(), dx.view(), da.view(),
      dbt.view(), MatrixView<float>(), false, rankwise::RankUnitPath::kDense, bws.data(),
      bws.bytes);

  const HostMatrix y_ref =
      rwtest::ref_rank_units_forward(s, xh, ah, bh, units, gates, HostMatrix(n, d_out));
  const rwtest::RankUnitGrads g = rwtest::ref_rank_units_backward(s, xh, ah, bh, units, gates, dyh);
  const struct {
    const char* what;
    HostMatrix got, ref;
  } outputs[] = {{"y", rwtest::to_host<CudaHarness, T>(ctx, y), y_ref},
                 {"dbt", rwtest::to_host<CudaHarness, T>(ctx, dbt), rwtest::transpose(g.db)},
                 {"da", rwtest::to_host<CudaHarness, T>(ctx, da), g.da},
                 {"dx", rwtest::to_host<CudaHarness, T>(ctx, dx), g.dx}};
  for (const auto& o : outputs) {
    const rwtest::Comparison c =
        rwtest::compare(o.got, o.ref, rwtest::normwise_magnitude(o.ref), o.what);
    INFO(c);
    CHECK(max_abs(o.ref) < 65504.0);  // representable: only the intermediates were not
    CHECK(c.normwise < 4e-3);
  }
}

int main(int argc, char** argv) { return rwtest::run_catch_on_device(argc, argv); }
