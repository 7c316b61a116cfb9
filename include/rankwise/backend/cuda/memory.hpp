// The CUDA backend's untyped memory moves (backend/memory_decl.hpp), on the
// context's stream. Host transfers sit at the API boundary only and
// synchronise, so the host side may be reused (or read) on return.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "rankwise/backend/cuda/check.hpp"
#include "rankwise/backend/cuda/context.hpp"
#include "rankwise/backend/memory_decl.hpp"

namespace rankwise {

template <>
struct Memory<CudaBackend> {
  using Ctx = Context<CudaBackend>;

  static void copy(Ctx& ctx, void* dst, const void* src, std::size_t bytes) {
    if (bytes == 0) return;
    RANKWISE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, ctx.stream()));
  }
  static void fill(Ctx& ctx, void* dst, unsigned char byte, std::size_t bytes) {
    if (bytes == 0) return;
    RANKWISE_CUDA_CHECK(cudaMemsetAsync(dst, byte, bytes, ctx.stream()));
  }
  static void upload(Ctx& ctx, void* dst, const void* host, std::size_t bytes) {
    if (bytes == 0) return;
    RANKWISE_CUDA_CHECK(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, ctx.stream()));
    ctx.synchronize();
  }
  static void download(Ctx& ctx, void* host, const void* src, std::size_t bytes) {
    if (bytes == 0) return;
    RANKWISE_CUDA_CHECK(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
  }
};

}  // namespace rankwise
