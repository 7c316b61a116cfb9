// The CUDA backend (float, __half, __nv_bfloat16): the same LoRA and primitive
// cases as the CPU, plus what only the GPU has (a borrowed stream and cuBLAS
// handle, device buffers, bit equality of init with the CPU backend). Exits 77
// (CTest: skipped) when no CUDA device is usable.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "cases/backend_conformance.hpp"
#include "cases/kernel_cases.hpp"
#include "cases/lora_cases.hpp"
#include "cases/unit_kernel_cases.hpp"
#include "support/cuda_session.cuh"
#include "support/harness_cuda.cuh"
#include "support/smora_io.hpp"

static_assert(rwtest::conformance::provides_every_primitive<rankwise::CudaBackend, float>());
static_assert(rwtest::conformance::provides_every_primitive<rankwise::CudaBackend, __half>());
static_assert(
    rwtest::conformance::provides_every_primitive<rankwise::CudaBackend, __nv_bfloat16>());

RWTEST_KERNEL_TEST_CASES(rwtest::CudaHarness, "[cuda]", float, __half, __nv_bfloat16)
RWTEST_UNIT_KERNEL_TEST_CASES(rwtest::CudaHarness, "[cuda]", float, __half, __nv_bfloat16)
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
  // The engine's handle is bound to another stream, with device pointer mode
  // and TF32 math: rankwise must compute in full fp32 on its own stream
  // anyway, and hand the handle back exactly as it found it.
  cudaStream_t stream = nullptr, engine_stream = nullptr;
  cublasHandle_t handle = nullptr;
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  REQUIRE(cudaStreamCreate(&engine_stream) == cudaSuccess);
  REQUIRE(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasSetStream(handle, engine_stream) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_DEVICE) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasSetMathMode(handle, CUBLAS_TF32_TENSOR_OP_MATH) == CUBLAS_STATUS_SUCCESS);
  // d_in large enough that TF32's 10-bit mantissa would miss the fp32 tolerance.
  const rwtest::lora_cases::LoraShape sh{33, 1024, 96, 8};
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
    // Between calls the handle is the engine's again.
    cudaStream_t bound = nullptr;
    CHECK(cublasGetStream(handle, &bound) == CUBLAS_STATUS_SUCCESS);
    CHECK(bound == engine_stream);
  }
  // The context borrowed them: both still work after it is gone, unchanged.
  CHECK(cudaStreamSynchronize(stream) == cudaSuccess);
  cudaStream_t bound = nullptr;
  cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
  cublasMath_t math_mode = CUBLAS_DEFAULT_MATH;
  CHECK(cublasGetStream(handle, &bound) == CUBLAS_STATUS_SUCCESS);
  CHECK(cublasGetPointerMode(handle, &pointer_mode) == CUBLAS_STATUS_SUCCESS);
  CHECK(cublasGetMathMode(handle, &math_mode) == CUBLAS_STATUS_SUCCESS);
  CHECK(bound == engine_stream);
  CHECK(pointer_mode == CUBLAS_POINTER_MODE_DEVICE);
  CHECK(math_mode == CUBLAS_TF32_TENSOR_OP_MATH);
  CHECK(cublasDestroy(handle) == CUBLAS_STATUS_SUCCESS);
  CHECK(cudaStreamDestroy(stream) == cudaSuccess);
  CHECK(cudaStreamDestroy(engine_stream) == cudaSuccess);

  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "Context<CudaBackend>: cuBLAS handle is null",
                     rankwise::CudaContext(nullptr, nullptr));
}

TEST_CASE("cuda: invalid unit indices are skipped, counted and reported once", "[cuda][indices]") {
  using K = rankwise::Kernels<CudaBackend, float>;
  rankwise::CudaContext ctx;
  const std::int64_t n = 3, k = 2, d = 40, r = 4;
  const HostMatrix xh = rwtest::random_matrix(n, d, 11);
  const HostMatrix wh = rwtest::random_matrix(r, d, 12);
  const auto x = rwtest::to_device<CudaHarness, float>(ctx, xh);
  const auto w = rwtest::to_device<CudaHarness, float>(ctx, wh);
  const std::vector<std::int32_t> units = {0, -1, 3, 4, 2, 1};  // -1 and 4 are outside [0, 4)
  const auto du = rwtest::upload_raw<CudaHarness, std::int32_t>(ctx, units, n, k);
  auto out = rwtest::to_device<CudaHarness, float>(ctx, HostMatrix(n, k, 5.0));
  K::gather_dot(ctx, 1.0f, x.cview(), w.cview(), du.cview(), out.view());
  // Every kernel that follows indices counts into the same flag.
  auto dense = rwtest::to_device<CudaHarness, float>(ctx, HostMatrix(n, r));
  K::densify(ctx, du.cview(), out.cview(), dense.view());
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "CUDA kernels skipped 4 unit or expert indices outside their range",
                     ctx.check_device_errors());
  ctx.check_device_errors();  // reset: nothing new since
  const HostMatrix got = rwtest::to_host<CudaHarness, float>(ctx, out);
  for (std::int64_t t = 0; t < n; ++t) {
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t u = units[t * k + j];
      double want = 0.0;  // an invalid unit contributes nothing
      if (u >= 0 && u < r)
        for (std::int64_t c = 0; c < d; ++c) want += wh(u, c) * xh(t, c);
      INFO("token " << t << ", slot " << j << ", unit " << u);
      CHECK(std::abs(got(t, j) - want) <= 1e-5 * (1.0 + std::abs(want)));
    }
  }
}

TEST_CASE("cuda: scatter_axpy into more than 65535 rows", "[cuda][limits]") {
  // A MoS pool gradient with v · L · l > 65535 rows: grid.y was out.rows.
  using K = rankwise::Kernels<CudaBackend, float>;
  rankwise::CudaContext ctx;
  const std::int64_t rows = 70000, d = 3, n = 4, k = 2;
  const std::vector<std::int32_t> units = {0, 69999, 65535, 65536, 12, 69999, 65534, 1};
  const HostMatrix coef = rwtest::random_matrix(n, k, 21);
  const HostMatrix src = rwtest::random_matrix(n, d, 22);
  const auto du = rwtest::upload_raw<CudaHarness, std::int32_t>(ctx, units, n, k);
  const auto dc = rwtest::to_device<CudaHarness, float>(ctx, coef);
  const auto ds = rwtest::to_device<CudaHarness, float>(ctx, src);
  auto out = rwtest::to_device<CudaHarness, float>(ctx, HostMatrix(rows, d, 1.0));
  K::scatter_axpy(ctx, 2.0f, dc.cview(), ds.cview(), du.cview(), 0.5f, out.view());
  HostMatrix want(rows, d, 0.5);
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t j = 0; j < k; ++j)
      for (std::int64_t c = 0; c < d; ++c)
        want(units[t * k + j], c) += 2.0 * coef(t, j) * src(t, c);
  const HostMatrix got = rwtest::to_host<CudaHarness, float>(ctx, out);
  const rwtest::Comparison cmp =
      rwtest::compare(got, want, rwtest::normwise_magnitude(want), "out");
  INFO(cmp);
  CHECK(cmp.normwise < 1e-6);
  ctx.check_device_errors();
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

int main(int argc, char** argv) { return rwtest::run_catch_on_device(argc, argv); }
