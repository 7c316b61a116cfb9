// LoRA-LEGO's distance computations on the GPU: the units' Gram matrix by
// cuBLAS in double, so the clustering sees the CPU's numbers up to rounding.
#pragma once

#if !defined(__CUDACC__)
#error "rankwise/merge/cuda_gram.cuh uses CUDA: include it from a .cu file compiled by nvcc"
#endif

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <mutex>

#include "rankwise/backend/cuda/buffer.hpp"
#include "rankwise/backend/cuda/check.hpp"
#include "rankwise/backend/cuda/context.hpp"
#include "rankwise/merge/gram.hpp"

namespace rankwise {
namespace merge {

/// A GramFunction that computes U Uᵀ on the device of `ctx` (which must
/// outlive it): the units go up once, one DSYRK, the n x n result comes back.
/// No kernel of rankwise's own: the launch geometry is cuBLAS's; the handle's
/// settings are held for the call as for every rankwise cuBLAS call.
/// Host transfers are inherent here: clustering runs on the host. Calls from
/// several merge threads are serialised on the context's stream.
inline GramFunction cuda_gram(CudaContext& ctx) {
  auto lock = std::make_shared<std::mutex>();
  return [&ctx, lock](const double* units, std::int64_t n, std::int64_t d, double* gram) {
    if (n == 0) return;
    std::lock_guard<std::mutex> guard(*lock);
    Buffer<CudaBackend, double> u(n * d), g(n * n);
    RANKWISE_CUDA_CHECK(cudaMemcpyAsync(u.data(), units, sizeof(double) * n * d,
                                        cudaMemcpyHostToDevice, ctx.stream()));
    // Row-major U (n x d) is column-major Uᵀ (d x n), and G = (Uᵀ)ᵀ Uᵀ. DSYRK
    // fills G's column-major upper triangle, which read row-major is the lower.
    const double one = 1.0, zero = 0.0;
    const detail::cuda::ScopedCublasSettings settings(
        ctx.handle(), detail::cuda::rankwise_blas_settings(ctx.stream()));
    RANKWISE_CUBLAS_CHECK(cublasDsyrk_64(ctx.handle(), CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_T, n, d,
                                         &one, u.data(), d, &zero, g.data(), n));
    RANKWISE_CUDA_CHECK(cudaMemcpyAsync(gram, g.data(), sizeof(double) * n * n,
                                        cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
    // Mirror the row-major lower triangle into the upper one (n² / 2 copies).
    for (std::int64_t i = 0; i < n; ++i) {
      for (std::int64_t j = i + 1; j < n; ++j) gram[i * n + j] = gram[j * n + i];
    }
  };
}

}  // namespace merge
}  // namespace rankwise
