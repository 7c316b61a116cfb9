// lora_demo's GPU part: the CPU part's forward and backward again, on the
// GPU in float and __half, compared with the CPU's numbers. Only
// <rankwise/cuda.cuh>: no Eigen.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <vector>

#include <rankwise/cuda.cuh>

#include "gpu_demo.hpp"

namespace lora_demo {
namespace {

using rankwise::CudaBackend;
using rankwise::CudaContext;

// float <-> storage type on the host.
template <class T>
T from_float(float v);
template <>
float from_float<float>(float v) {
  return v;
}
template <>
__half from_float<__half>(float v) {
  return __float2half_rn(v);
}
float to_float(float v) { return v; }
float to_float(__half v) { return __half2float(v); }

template <class T>
struct TypeName;
template <>
struct TypeName<float> {
  static constexpr const char* kName = "float";
};
template <>
struct TypeName<__half> {
  static constexpr const char* kName = "__half";
};

// A device copy of a host float array, converted to T.
template <class T>
rankwise::Buffer<CudaBackend, T> to_device(CudaContext& ctx, const std::vector<float>& host,
                                           std::int64_t rows, std::int64_t cols) {
  std::vector<T> converted(host.size());
  std::transform(host.begin(), host.end(), converted.begin(), from_float<T>);
  rankwise::Buffer<CudaBackend, T> buffer(rows * cols);
  rankwise::Kernels<CudaBackend, T>::upload(ctx, converted.data(), buffer.view(rows, cols));
  return buffer;
}

template <class T>
std::vector<float> to_host(CudaContext& ctx, rankwise::MatrixView<const T> v) {
  std::vector<T> raw(static_cast<std::size_t>(v.size()));
  rankwise::Kernels<CudaBackend, T>::download(ctx, v, raw.data());
  std::vector<float> out(raw.size());
  for (std::size_t i = 0; i < raw.size(); ++i) out[i] = to_float(raw[i]);
  return out;
}

// max |got - want| / max |want|: the error relative to the result's scale.
double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(got[i]) - want[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

// Forward and backward of in's layer on the GPU in T; returns the number of
// results off by more than `tolerance` (relative to the CPU's).
template <class T>
int run_type(const GpuDemoInput& in, double tolerance) {
  const char* type = TypeName<T>::kName;
  CudaContext ctx;
  rankwise::LoraConfig cfg;
  cfg.d_in = in.d_in;
  cfg.d_out = in.d_out;
  cfg.rank = in.rank;
  cfg.alpha = in.alpha;
  rankwise::Lora<T, CudaBackend> layer(ctx, cfg);
  layer.init_peft(in.seed);

  // init_peft draws the same bits on every backend: compare A with the CPU's A
  // rounded to T, exactly.
  const std::vector<float> a = to_host<T>(ctx, layer.a());
  std::int64_t a_differs = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    a_differs += to_float(from_float<T>(in.a[i])) != a[i] ? 1 : 0;
  }
  std::printf("  [%s] init_peft(%llu) on the GPU: A has %lld of %zu elements different from "
              "the CPU's A%s\n",
              type, static_cast<unsigned long long>(in.seed), static_cast<long long>(a_differs),
              a.size(), a_differs == 0 ? " (bit-identical, as promised)" : "");

  const auto x = to_device<T>(ctx, in.x, in.tokens, in.d_in);
  const auto w0 = to_device<T>(ctx, in.w0, in.d_out, in.d_in);
  const auto b = to_device<T>(ctx, in.b, in.d_out, in.rank);
  const auto dy = to_device<T>(ctx, in.dy, in.tokens, in.d_out);
  rankwise::Buffer<CudaBackend, T> y(in.tokens * in.d_out), dx(in.tokens * in.d_in),
      grad_b(in.d_out * in.rank);
  layer.set_b(b.view(in.d_out, in.rank));
  rankwise::Kernels<CudaBackend, T>::fill(ctx, dx.view(in.tokens, in.d_in), 0.0);

  layer.forward(x.view(in.tokens, in.d_in), w0.view(in.d_out, in.d_in),
                rankwise::WeightLayout::kOutIn, y.view(in.tokens, in.d_out));
  layer.backward(x.view(in.tokens, in.d_in), dy.view(in.tokens, in.d_out),
                 dx.view(in.tokens, in.d_in));
  layer.get_grad_b(grad_b.view(in.d_out, in.rank));
  ctx.synchronize();

  struct Check {
    const char* what;
    std::vector<float> got;
    const std::vector<float>* want;
  };
  const Check checks[] = {
      {"y = x W0^T + s x A^T B^T", to_host<T>(ctx, y.view(in.tokens, in.d_out)), &in.y},
      {"dL/dA", to_host<T>(ctx, layer.grad_a()), &in.grad_a},
      {"dL/dB", to_host<T>(ctx, grad_b.view(in.d_out, in.rank)), &in.grad_b},
      {"dL/dx (adapter part)", to_host<T>(ctx, dx.view(in.tokens, in.d_in)), &in.dx},
  };
  int failures = 0;
  for (const Check& c : checks) {
    const double err = relative_error(c.got, *c.want);
    const bool ok = err <= tolerance;
    failures += ok ? 0 : 1;
    std::printf("  [%s] %-26s max |GPU - CPU| / max |CPU| = %.2e  (tolerance %.0e) %s\n", type,
                c.what, err, tolerance, ok ? "OK" : "FAILED");
  }
  return failures;
}

}  // namespace

int run_gpu_demo(const GpuDemoInput& in) {
  const int devices = rankwise::cuda_device_count();
  if (devices == 0) {
    std::printf("no CUDA device: GPU part skipped\n");
    return 0;
  }
  try {
    int device = 0;
    cudaDeviceProp prop{};
    RANKWISE_CUDA_CHECK(cudaGetDevice(&device));
    RANKWISE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    std::printf("GPU: %s (sm_%d%d): the same layer, inputs and seed on the GPU\n", prop.name,
                prop.major, prop.minor);
    // float: cuBLAS in fp32 (no TF32) against Eigen, only the summation order
    // differs. __half: the inputs themselves are rounded to 11 significant bits.
    int failures = run_type<float>(in, 1e-4);
    failures += run_type<__half>(in, 2e-2);
    std::printf("GPU part: %s\n", failures == 0 ? "all results agree with the CPU" : "MISMATCH");
    return failures == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("GPU part failed: %s\n", e.what());
    return 1;
  }
}

}  // namespace lora_demo
