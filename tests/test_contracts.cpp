// The contracts, on the CPU backend (float, double): the layer concept
// (rankwise/layers/layer.hpp): every layer conforms at compile time
// (static_asserts in the cases header) and keeps its promises at run time
// (cases/layer_contract_cases.hpp; the CUDA instantiation is in
// test_multi_cuda.cu); the backend contract: Kernels<CpuBackend, T> provides
// every primitive (cases/backend_conformance.hpp; CUDA: test_lora_cuda.cu);
// and a user's tuning policy (rankwise/backend/tuning.hpp): this binary
// replaces the CPU's, so the cases above run under it too (it answers as the
// default unless forced).
#include <catch2/catch.hpp>
#include <cstdint>
#include <vector>

#include "rankwise/backend/tuning.hpp"

namespace {

enum class Force { kDefault, kYes, kNo };

struct CountingTuning : rankwise::DefaultTuning<rankwise::CpuBackend> {
  using Default = rankwise::DefaultTuning<rankwise::CpuBackend>;
  static inline Force force = Force::kDefault;
  static inline int dense_queries = 0, shard_queries = 0;

  static bool prefer_dense(std::int64_t n, std::int64_t k, std::int64_t r) {
    ++dense_queries;
    return force == Force::kDefault ? Default::prefer_dense(n, k, r) : force == Force::kYes;
  }
  static bool prefer_assembled_shards(std::int64_t n) {
    ++shard_queries;
    return force == Force::kDefault ? Default::prefer_assembled_shards(n) : force == Force::kYes;
  }
};

}  // namespace

// Before any layer is used in this file, as tuning.hpp asks.
namespace rankwise {
template <>
struct TuningPolicy<CpuBackend> : CountingTuning {};
}  // namespace rankwise

#include "cases/backend_conformance.hpp"
#include "cases/layer_contract_cases.hpp"
#include "support/harness_cpu.hpp"

RWTEST_LAYER_CONTRACT_TEST_CASES(rwtest::CpuHarness, "[cpu]", float, double)

static_assert(rwtest::conformance::provides_every_primitive<rankwise::CpuBackend, float>());
static_assert(rwtest::conformance::provides_every_primitive<rankwise::CpuBackend, double>());
// The detectors see a missing primitive: the CPU has no segment kernels.
static_assert(!rwtest::conformance::has_segment_lora_forward<
              rankwise::Kernels<rankwise::CpuBackend, float>, float, float,
              rankwise::Context<rankwise::CpuBackend>>::value);

namespace {

using rankwise::CpuBackend;
using rankwise::RankUnitPath;
using rankwise::ShardPath;
using rwtest::HostMatrix;
using H = rwtest::CpuHarness;
namespace lc = rwtest::layer_contract_cases;

template <class Layer>
std::vector<float> forward_bits(H::Ctx& ctx, Layer& layer,
                                const rwtest::DeviceMatrix<H, float>& x) {
  rwtest::DeviceMatrix<H, float> y =
      rwtest::to_device<H, float>(ctx, HostMatrix(x.rows, layer.config().d_out, 0.25));
  layer.forward(x.cview(), y.view());
  return rwtest::to_host_raw<H, float>(ctx, y.cview());
}

}  // namespace

TEST_CASE("a user's tuning policy decides the kAuto paths", "[tuning][cpu]") {
  H::Ctx ctx;
  const auto x = rwtest::to_device<H, float>(ctx, rwtest::random_matrix(5, lc::kDin, 3));
  lc::SmoraMaker<H, float, 1> smora(ctx);
  auto automatic = smora.make(1);
  for (Force f : {Force::kYes, Force::kNo}) {
    CountingTuning::force = f;
    const int before = CountingTuning::dense_queries;
    const std::vector<float> y_auto = forward_bits(ctx, *automatic, x);
    CHECK(CountingTuning::dense_queries > before);
    auto fixed = smora.make(1);
    fixed->set_path(f == Force::kYes ? RankUnitPath::kDense : RankUnitPath::kSparse);
    const int fixed_before = CountingTuning::dense_queries;
    CHECK(forward_bits(ctx, *fixed, x) == y_auto);
    CHECK(CountingTuning::dense_queries == fixed_before);  // a fixed path asks nobody
  }
  lc::MosMaker<H, float> mos(ctx);
  rankwise::MosConfig c;
  c.rank = lc::kRank;
  c.seed = 4;
  rankwise::Mos<float, CpuBackend> mos_auto(mos.pool, 0, c);
  for (Force f : {Force::kYes, Force::kNo}) {
    CountingTuning::force = f;
    CHECK(mos_auto.path_for(5) == (f == Force::kYes ? ShardPath::kAssembled : ShardPath::kDirect));
  }
  CountingTuning::force = Force::kDefault;
  CHECK(mos_auto.path_for(5) == ShardPath::kDirect);  // the CPU's default never assembles
  CHECK(CountingTuning::shard_queries > 0);
}
