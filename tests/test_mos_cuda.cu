// MoS on the CUDA backend (float, __half, __nv_bfloat16): the same cases as
// the CPU (cases/mos_cases.hpp), plus bit equality of the pool init with the
// CPU backend's float pool on a pool large enough for many blocks. Exits 77
// (CTest: skipped) when no CUDA device is usable. No Eigen.
#include <catch2/catch.hpp>

#include <cmath>
#include <vector>

#include "cases/mos_cases.hpp"
#include "support/cuda_session.cuh"
#include "support/harness_cuda.cuh"
#include "support/mos_reference.hpp"

RWTEST_MOS_TEST_CASES(rwtest::CudaHarness, "[cuda]", float, __half, __nv_bfloat16)

namespace {

using rankwise::CudaBackend;
using rankwise::MatrixView;
using rwtest::CudaHarness;

/// The CPU backend's float pool holds static_cast<float>(uniform(...)) at
/// element i of stream substream(seed, 0) (computed here on the host, without
/// the CPU backend: no Eigen in a .cu file); the GPU must hold those bits for
/// float and those values rounded to T otherwise.
template <class T>
void pool_init_matches_cpu_float_bits() {
  rankwise::CudaContext ctx;
  // M = 8 · 4 · 2 = 64 shards of 2050 values: 512+ blocks of the fill.
  const rwtest::MosShape sh{4100, 34, 4, 8, 2, 2, 8};
  for (const std::uint64_t seed : {0ull, 42ull, 0xFFFFFFFFFFFFFFFFull}) {
    RWTEST_CONTEXT(CudaHarness, T, "shape " << sh, seed);
    rankwise::ShardPool<T, CudaBackend> pool(ctx, sh.pool_config());
    pool.init(seed);
    const std::vector<T> got =
        rwtest::to_host_raw<CudaHarness, T>(ctx, MatrixView<const T>(pool.a()));
    std::vector<T> want(got.size());
    for (std::size_t e = 0; e < want.size(); ++e) {
      const float cpu = static_cast<float>(
          rwtest::expected_pool_init_a(sh, seed, static_cast<std::int64_t>(e)));
      want[e] = rankwise::detail::cuda::Element<T>::from_float(cpu);
    }
    CHECK(rwtest::first_bit_difference(got, want) == -1);
    const std::vector<T> b = rwtest::to_host_raw<CudaHarness, T>(ctx, MatrixView<const T>(pool.b()));
    bool b_zero = true;
    for (const T& v : b) b_zero = b_zero && CudaHarness::to_double(v) == 0.0;
    CHECK(b_zero);
  }
}

}  // namespace

TEST_CASE("cuda mos: pool init bits equal the CPU float pool's", "[cuda][mos][init]") {
  pool_init_matches_cpu_float_bits<float>();
  pool_init_matches_cpu_float_bits<__half>();
  pool_init_matches_cpu_float_bits<__nv_bfloat16>();
}

int main(int argc, char** argv) { return rwtest::run_catch_on_device(argc, argv); }
