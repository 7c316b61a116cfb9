// RawCopy for the CUDA backend: byte copies between the host and device
// memory on the context's stream, synchronised so the host side may be reused
// on return (support/smora_io.hpp). Include from a .cu file.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "rankwise/backend/cuda/check.hpp"
#include "rankwise/backend/cuda/context.hpp"
#include "support/smora_io.hpp"

namespace rwtest {

template <>
struct RawCopy<rankwise::CudaBackend> {
  static void to_backend(rankwise::CudaContext& ctx, void* dst, const void* src, std::size_t bytes) {
    if (bytes == 0) return;
    RANKWISE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, ctx.stream()));
    ctx.synchronize();
  }
  static void to_host(rankwise::CudaContext& ctx, void* dst, const void* src, std::size_t bytes) {
    if (bytes == 0) return;
    RANKWISE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
  }
};

}  // namespace rwtest
