// CUDA execution context: a stream and a cuBLAS handle bound to it, owned or borrowed.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "rankwise/backend/cuda/check.hpp"
#include "rankwise/backend/tags.hpp"

namespace rankwise {

/// Every rankwise call on the GPU is queued on stream() and uses handle().
/// The default constructor creates both; the borrowing constructor uses an
/// engine's own stream and handle and destroys neither.
template <>
class Context<CudaBackend> {
 public:
  Context() {
    RANKWISE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    try {
      RANKWISE_CUBLAS_CHECK(cublasCreate(&handle_));
      RANKWISE_CUBLAS_CHECK(cublasSetStream(handle_, stream_));
    } catch (...) {
      cudaStreamDestroy(stream_);
      throw;
    }
    owns_ = true;
  }

  /// Borrows a stream and a cuBLAS handle; binds the handle to the stream.
  Context(cudaStream_t stream, cublasHandle_t handle) : stream_(stream), handle_(handle) {
    RANKWISE_CHECK(handle != nullptr, "Context<CudaBackend>: cuBLAS handle is null");
    RANKWISE_CUBLAS_CHECK(cublasSetStream(handle_, stream_));
  }

  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  ~Context() {
    if (owns_) {
      cublasDestroy(handle_);
      cudaStreamDestroy(stream_);
    }
  }

  cudaStream_t stream() const { return stream_; }
  cublasHandle_t handle() const { return handle_; }
  void synchronize() { RANKWISE_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

 private:
  cudaStream_t stream_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  bool owns_ = false;
};

using CudaContext = Context<CudaBackend>;

/// Number of CUDA devices usable here; 0 when there is no device or no driver
/// (never throws, so tests and examples can decide to skip).
inline int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" status
    return 0;
  }
  return count;
}

}  // namespace rankwise
