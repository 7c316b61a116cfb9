// The study on the GPU: DeviceOps<CudaBackend> (GELU and squared error as
// small kernels on the context's stream) and the trainer of trainer.hpp
// instantiated for CudaBackend. Only <rankwise/cuda.cuh>: no Eigen.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include <rankwise/cuda.cuh>

#include "study.hpp"
#include "trainer.hpp"

namespace multitask {
namespace {

constexpr int kBlock = 256;

__device__ inline float gelu_f(float z) {
  const float c = 0.7978845608028654f;
  return 0.5f * z * (1.0f + tanhf(c * (z + 0.044715f * z * z * z)));
}

__device__ inline float gelu_grad_f(float z) {
  const float c = 0.7978845608028654f;
  const float th = tanhf(c * (z + 0.044715f * z * z * z));
  return 0.5f * (1.0f + th) + 0.5f * z * (1.0f - th * th) * c * (1.0f + 3.0f * 0.044715f * z * z);
}

__global__ void gelu_forward_kernel(std::int64_t n, const float* z, float* h) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    h[i] = gelu_f(z[i]);
  }
}

__global__ void gelu_backward_kernel(std::int64_t n, const float* z, const float* dh, float* dz) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    dz[i] = dh[i] * gelu_grad_f(z[i]);
  }
}

// One block: each thread sums a strided slice in double, then a fixed tree
// reduction, so the sum has the same bits on every run.
__global__ void squared_error_kernel(std::int64_t n, const float* y, const float* t, float* dy,
                                     float grad_scale, double* acc) {
  __shared__ double partial[kBlock];
  double sum = 0;
  for (std::int64_t i = threadIdx.x; i < n; i += kBlock) {
    const float e = y[i] - t[i];
    sum += static_cast<double>(e) * static_cast<double>(e);
    if (dy != nullptr) dy[i] = grad_scale * e;
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kBlock / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride)
      partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *acc += partial[0];
}

unsigned grid_for(std::int64_t n) {
  const std::int64_t blocks = (n + kBlock - 1) / kBlock;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

template <class T>
void check_contiguous(const MatrixView<T>& m, const char* what) {
  RANKWISE_CHECK(m.contiguous(), what, ": views must be contiguous");
}

}  // namespace

template <>
struct DeviceOps<rankwise::CudaBackend> {
  using Ctx = rankwise::Context<rankwise::CudaBackend>;
  // Smora's finite check reads an int back after every routing: a stream
  // synchronisation per layer and step, so it is off on the GPU.
  static constexpr bool kCheckRouterFinite = false;

  template <class T>
  static void gelu_forward(Ctx& ctx, MatrixView<const T> z, MatrixView<T> h) {
    static_assert(std::is_same<T, float>::value, "the GPU study runs in float");
    check_contiguous(z, "gelu_forward");
    if (z.empty()) return;
    gelu_forward_kernel<<<grid_for(z.size()), kBlock, 0, ctx.stream()>>>(z.size(), z.data, h.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  template <class T>
  static void gelu_backward(Ctx& ctx, MatrixView<const T> z, MatrixView<const T> dh,
                            MatrixView<T> dz) {
    static_assert(std::is_same<T, float>::value, "the GPU study runs in float");
    check_contiguous(z, "gelu_backward");
    if (z.empty()) return;
    gelu_backward_kernel<<<grid_for(z.size()), kBlock, 0, ctx.stream()>>>(z.size(), z.data,
                                                                          dh.data, dz.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  template <class T>
  static void squared_error(Ctx& ctx, MatrixView<const T> y, MatrixView<const T> target,
                            MatrixView<T> dy, double grad_scale, double* acc) {
    static_assert(std::is_same<T, float>::value, "the GPU study runs in float");
    check_contiguous(y, "squared_error");
    if (y.empty()) return;
    squared_error_kernel<<<1, kBlock, 0, ctx.stream()>>>(
        y.size(), y.data, target.data, dy.empty() ? nullptr : dy.data,
        static_cast<float>(grad_scale), acc);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void zero(Ctx& ctx, double* acc, std::int64_t n) {
    RANKWISE_CUDA_CHECK(cudaMemsetAsync(acc, 0, sizeof(double) * static_cast<std::size_t>(n),
                                        ctx.stream()));
  }

  static void read(Ctx& ctx, const double* acc, std::int64_t n, double* host) {
    RANKWISE_CUDA_CHECK(cudaMemcpyAsync(host, acc, sizeof(double) * static_cast<std::size_t>(n),
                                        cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
  }
};

int cuda_devices() { return rankwise::cuda_device_count(); }

StudyResult run_study_cuda(const StudyOptions& options, const std::vector<MethodSpec>& methods) {
  RANKWISE_CUDA_CHECK(cudaSetDevice(0));
  cudaDeviceProp prop{};
  RANKWISE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  rankwise::CudaContext ctx;
  return run_study<float, rankwise::CudaBackend>(ctx, options, methods,
                                                 std::string("GPU: ") + prop.name);
}

}  // namespace multitask
