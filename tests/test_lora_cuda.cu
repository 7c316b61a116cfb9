// The CUDA backend (float, __half, __nv_bfloat16): the same LoRA and primitive
// cases as the CPU, plus what only the GPU has (a borrowed stream and cuBLAS
// handle, device buffers, bit equality of init with the CPU backend). Exits 77
// (CTest: skipped) when no CUDA device is usable.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <utility>
#include <vector>

#include "cases/kernel_cases.hpp"
#include "cases/lora_cases.hpp"
#include "support/catch_session.hpp"
#include "support/harness_cuda.cuh"

RWTEST_KERNEL_TEST_CASES(rwtest::CudaHarness, "[cuda]", float, __half, __nv_bfloat16)
RWTEST_LORA_TEST_CASES(rwtest::CudaHarness, "[cuda]", float, __half, __nv_bfloat16)

namespace {

using rankwise::CudaBackend;
using rankwise::ErrorCode;
using rankwise::MatrixView;
using rwtest::CudaHarness;
using rwtest::HostMatrix;

}  // namespace

TEST_CASE("cuda: init_peft float bits equal the CPU backend's", "[cuda][lora][init]") {
  // The CPU backend stores static_cast<float>(uniform(...)) at element
  // i * cols + j of stream substream(seed, 0); computed here on the host
  // without the CPU backend (no Eigen in a .cu file). The shape needs many
  // blocks of the grid-stride fill.
  rankwise::CudaContext ctx;
  for (const std::uint64_t seed : {0ull, 42ull, 0xFFFFFFFFFFFFFFFFull}) {
    rankwise::LoraConfig cfg;
    cfg.d_in = 4099;
    cfg.d_out = 17;
    cfg.rank = 64;
    INFO("seed " << seed << ", A " << cfg.rank << " x " << cfg.d_in);
    rankwise::Lora<float, CudaBackend> layer(ctx, cfg);
    layer.init_peft(seed);
    const std::vector<float> got =
        rwtest::to_host_raw<CudaHarness, float>(ctx, MatrixView<const float>(layer.a()));
    const double bound = 1.0 / std::sqrt(static_cast<double>(cfg.d_in));
    const std::uint64_t stream = rankwise::substream(seed, 0);
    std::vector<float> want(got.size());
    for (std::size_t e = 0; e < want.size(); ++e)
      want[e] = static_cast<float>(rankwise::uniform(stream, e, -bound, bound));
    CHECK(rwtest::first_bit_difference(got, want) == -1);
  }
}

TEST_CASE("cuda: a borrowed stream and cuBLAS handle", "[cuda][context]") {
  cudaStream_t stream = nullptr;
  cublasHandle_t handle = nullptr;
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  REQUIRE(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS);
  const rwtest::lora_cases::LoraShape sh{9, 21, 14, 3};
  const std::uint64_t seed = 4242;
  INFO("shape " << sh << ", seed " << seed);
  {
    rankwise::CudaContext ctx(stream, handle);
    CHECK(ctx.stream() == stream);
    CHECK(ctx.handle() == handle);
    rankwise::Lora<float, CudaBackend> layer(ctx, rwtest::lora_cases::config_for(sh));
    const auto p = rwtest::lora_cases::make_problem<CudaHarness, float>(sh, seed);
    rwtest::lora_cases::load<CudaHarness, float>(ctx, layer, p.a, p.b);
    const auto x = rwtest::to_device<CudaHarness, float>(ctx, p.x);
    auto y = rwtest::to_device<CudaHarness, float>(ctx, p.y0);
    layer.forward(x.cview(), y.view());
    const auto e = rwtest::lora_cases::expect_forward(layer.scale(), p.x, p.a, p.b, p.y0);
    RWTEST_CHECK_CLOSE(rwtest::to_host<CudaHarness, float>(ctx, y), e.ref, e.mag,
                       rwtest::tolerance<float>(2, rwtest::lora_cases::chain(sh)));
  }
  // The context borrowed them: both still work after it is gone.
  CHECK(cudaStreamSynchronize(stream) == cudaSuccess);
  cudaStream_t bound = nullptr;
  CHECK(cublasGetStream(handle, &bound) == CUBLAS_STATUS_SUCCESS);
  CHECK(bound == stream);
  CHECK(cublasDestroy(handle) == CUBLAS_STATUS_SUCCESS);
  CHECK(cudaStreamDestroy(stream) == cudaSuccess);

  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "Context<CudaBackend>: cuBLAS handle is null",
                     rankwise::CudaContext(nullptr, nullptr));
}

TEST_CASE("cuda: Buffer moves, views and sizes", "[cuda][buffer]") {
  rankwise::Buffer<CudaBackend, __half> a(12);
  __half* const data = a.data();
  CHECK(data != nullptr);
  CHECK(reinterpret_cast<std::uintptr_t>(data) % 256 == 0);
  const auto v = a.view(3, 4);
  CHECK(v.space == rankwise::MemorySpace::kDevice);
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "Buffer::view: shape (5 x 5) does not match 12 elements", a.view(5, 5));
  rankwise::Buffer<CudaBackend, __half> b(std::move(a));
  CHECK(b.data() == data);
  CHECK(b.size() == 12);
  CHECK(a.data() == nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty
  CHECK(a.size() == 0);
  rankwise::Buffer<CudaBackend, __half> c(3);
  c = std::move(b);
  CHECK(c.data() == data);
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "Buffer<CudaBackend>: size must be non-negative, got -1", c.resize(-1));
  c.resize(0);
  CHECK(c.data() == nullptr);
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
