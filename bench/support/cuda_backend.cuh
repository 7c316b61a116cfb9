// BenchBackend<CudaBackend> (the contract: backend.hpp): each sample is
// bracketed by a pair of CUDA events on the context's stream and reported as
// manual time; preparation runs before the first event. No Eigen here:
// <rankwise/cuda.cuh> only.
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <rankwise/cuda.cuh>
#include <string>

#include "support/backend.hpp"

namespace rankwise {
namespace bench {

namespace detail {

// Reads spans once with 16-byte loads. The XOR of everything read is stored
// only if it equals a value it practically never takes, which keeps every
// load without writing anything.
__global__ void read_kernel(const uint4* a, std::int64_t a_count, const uint4* b,
                            std::int64_t b_count, unsigned* sink) {
  unsigned acc = 0;
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  const std::int64_t first = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x;
  for (std::int64_t i = first; i < a_count; i += stride) {
    const uint4 v = a[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  for (std::int64_t i = first; i < b_count; i += stride) {
    const uint4 v = b[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

// The start and stop events of every sample, created once.
struct Events {
  Events() {
    RANKWISE_CUDA_CHECK(cudaEventCreate(&start));
    RANKWISE_CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~Events() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
  cudaEvent_t start = nullptr, stop = nullptr;
};

inline int device_attribute(cudaDeviceAttr what) {
  int device = 0, value = 0;
  RANKWISE_CUDA_CHECK(cudaGetDevice(&device));
  RANKWISE_CUDA_CHECK(cudaDeviceGetAttribute(&value, what, device));
  return value;
}

}  // namespace detail

template <>
struct BenchBackend<CudaBackend> {
  static constexpr bool kManualTime = true;
  static constexpr bool kCheckFinite = false;

  template <class Call, class Need = Never, class Prep = NoPrep>
  static void run(benchmark::State& state, CudaContext& ctx, Rotation rot, Call call,
                  Need need = {}, Prep prep = {}) {
    static detail::Events ev;
    std::int64_t i = 0;
    while (state.KeepRunningBatch(rot.batch)) {
      bool prepared = false;
      for (std::int64_t k = 0, j = i; k < rot.batch; ++k, j = (j + 1) % rot.copies) {
        if (need(j)) {
          prep(j);
          prepared = true;
        }
      }
      if (prepared) ctx.synchronize();
      RANKWISE_CUDA_CHECK(cudaEventRecord(ev.start, ctx.stream()));
      for (std::int64_t k = 0; k < rot.batch; ++k) {
        call(i);
        if (++i == rot.copies) i = 0;
      }
      RANKWISE_CUDA_CHECK(cudaEventRecord(ev.stop, ctx.stream()));
      RANKWISE_CUDA_CHECK(cudaEventSynchronize(ev.stop));
      float ms = 0.0f;
      RANKWISE_CUDA_CHECK(cudaEventElapsedTime(&ms, ev.start, ev.stop));
      state.SetIterationTime(static_cast<double>(ms) * 1e-3);
    }
  }

  template <class Call>
  static void run_host(benchmark::State& state, CudaContext& ctx, Rotation rot, Call call) {
    std::int64_t i = 0;
    while (state.KeepRunningBatch(rot.batch)) {
      const auto t0 = std::chrono::steady_clock::now();
      for (std::int64_t k = 0; k < rot.batch; ++k) {
        call(i);
        if (++i == rot.copies) i = 0;
      }
      ctx.synchronize();
      const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
      state.SetIterationTime(dt.count());
    }
  }

  /// Reads a and b once with 16-byte loads (whole 16-byte words of each;
  /// the data must be 16-byte aligned, as cudaMalloc's is).
  static void read(CudaContext& ctx, Span a, Span b = {}) {
    static Buffer<CudaBackend, unsigned> sink(1);
    constexpr int kBlock = 256;
    const auto a_count = static_cast<std::int64_t>(a.bytes / 16);
    const auto b_count = static_cast<std::int64_t>(b.bytes / 16);
    const std::int64_t sms = std::max(detail::device_attribute(cudaDevAttrMultiProcessorCount), 1);
    const auto blocks = static_cast<unsigned>(
        std::max<std::int64_t>(1, std::min(ceil_div(std::max(a_count, b_count), kBlock), 8 * sms)));
    detail::read_kernel<<<blocks, kBlock, 0, ctx.stream()>>>(
        static_cast<const uint4*>(a.data), a_count, static_cast<const uint4*>(b.data), b_count,
        sink.data());
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static std::size_t cache_bytes() {
    const int l2 = detail::device_attribute(cudaDevAttrL2CacheSize);
    return l2 > 0 ? static_cast<std::size_t>(l2) : std::size_t(50) << 20;
  }

  static std::string describe() {
    int device = 0;
    RANKWISE_CUDA_CHECK(cudaGetDevice(&device));
    cudaDeviceProp prop{};
    RANKWISE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    return std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
           std::to_string(prop.minor) + "), L2 " + std::to_string(cache_bytes() >> 10) + " KiB, " +
           std::to_string(prop.totalGlobalMem >> 20) + " MiB memory, " +
           std::to_string(prop.multiProcessorCount) + " SMs; timed by CUDA events (manual time)";
  }
};

}  // namespace bench
}  // namespace rankwise
