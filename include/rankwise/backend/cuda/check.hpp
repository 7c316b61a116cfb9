// Status checks for CUDA runtime and cuBLAS calls, reporting file and line.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "rankwise/core/error.hpp"

namespace rankwise {
namespace detail {
namespace cuda {

inline void check_cuda(cudaError_t status, const char* call, const char* file, int line) {
  if (status != cudaSuccess) {
    // A failed allocation is reported as such, so callers can tell it apart.
    throw_error(
        status == cudaErrorMemoryAllocation ? ErrorCode::kOutOfMemory : ErrorCode::kCuda, file, line,
        concat(call, " failed: ", cudaGetErrorName(status), ": ", cudaGetErrorString(status)));
  }
}

inline void check_cublas(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw_error(ErrorCode::kCublas, file, line,
                concat(call, " failed: ", cublasGetStatusName(status), ": ",
                       cublasGetStatusString(status)));
  }
}

}  // namespace cuda
}  // namespace detail
}  // namespace rankwise

/// Throws rankwise::error(kCuda) with the call, the status string, file and line.
#define RANKWISE_CUDA_CHECK(call) \
  ::rankwise::detail::cuda::check_cuda((call), #call, __FILE__, __LINE__)

/// Throws rankwise::error(kCublas) with the call, the status string, file and line.
#define RANKWISE_CUBLAS_CHECK(call) \
  ::rankwise::detail::cuda::check_cublas((call), #call, __FILE__, __LINE__)

/// After a kernel launch: reports launch errors; with RANKWISE_CUDA_DEBUG_SYNC
/// defined it also synchronises, so an asynchronous fault surfaces at the
/// launch that caused it rather than at a later call.
#if defined(RANKWISE_CUDA_DEBUG_SYNC)
#define RANKWISE_CUDA_LAUNCH_CHECK()              \
  do {                                            \
    RANKWISE_CUDA_CHECK(cudaGetLastError());      \
    RANKWISE_CUDA_CHECK(cudaDeviceSynchronize()); \
  } while (false)
#else
#define RANKWISE_CUDA_LAUNCH_CHECK() RANKWISE_CUDA_CHECK(cudaGetLastError())
#endif
