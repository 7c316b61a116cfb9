// The rank-expert router and SMoRA on the CUDA backend (float, __half,
// __nv_bfloat16): the same cases as the CPU (cases/smora_cases.hpp), plus
// what compares the GPU with the CPU backend: routing of the same float
// logits and the bits of Smora::init. Exits 77 (CTest: skipped) when no CUDA
// device is usable.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cases/smora_cases.hpp"
#include "support/catch_session.hpp"
#include "support/harness_cuda.cuh"
#include "support/smora_io_cuda.cuh"

RWTEST_SMORA_TEST_CASES(rwtest::CudaHarness, "[cuda]", float, __half, __nv_bfloat16)

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
      INFO("shape " << sh << ", options " << opt << ", seed " << seed);
      const rankwise::RouterConfig cfg = rwtest::smora_cases::router_config(sh, opt);
      const std::int64_t E = cfg.num_experts(), ke = cfg.experts_per_token();
      const std::vector<double> bias =
          rwtest::quantize<CudaHarness, float>(rwtest::random_matrix(1, E, seed, -0.05, 0.05)).v;
      const HostMatrix logits = rwtest::smora_cases::well_separated_logits<CudaHarness, float>(
          cfg, sh.n, bias, rwtest::SmoraTolerance<float>::kMargin, seed);

      // Host: the CPU backend's loop.
      const rankwise::RoutingRule rule = rankwise::RoutingRule::from(cfg);
      const std::vector<float> bias_f(bias.begin(), bias.end());
      std::vector<float> scores(static_cast<std::size_t>(sh.n * E)), gates(static_cast<std::size_t>(sh.n * sh.k));
      std::vector<int> experts(static_cast<std::size_t>(sh.n * ke)), units(static_cast<std::size_t>(sh.n * sh.k));
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
      RWTEST_SMORA_CLOSE(got.scores, host_scores, rwtest::SmoraTolerance<float>::kRouter);
      RWTEST_SMORA_CLOSE(got.gates, host_gates, rwtest::SmoraTolerance<float>::kRouter);
    }
  }
}

TEST_CASE("cuda: Smora::init float bits equal the CPU backend's", "[cuda][smora][init]") {
  // The CPU backend stores static_cast<float>(uniform(...)) at element
  // i * cols + j of substream(seed, 0) for A and substream(seed, 2) for W_r;
  // computed here on the host. The shapes need many blocks of the fill.
  rankwise::CudaContext ctx;
  for (const std::uint64_t seed : {0ull, 7ull, 0xFFFFFFFFFFFFFFFFull}) {
    rankwise::SmoraConfig cfg = rwtest::smora_cases::smora_config(SmoraShape{1, 4099, 17, 64, 8, 2});
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

int main(int argc, char** argv) {
  // Listing runs nothing, so it works without a device too.
  bool listing = false;
  for (int i = 1; i < argc; ++i) listing = listing || std::strncmp(argv[i], "--list", 6) == 0;
  if (!listing && rankwise::cuda_device_count() == 0) {
    std::printf("no CUDA device: skipping\n");
    return 77;
  }
  return rwtest::run_catch(argc, argv);
}
