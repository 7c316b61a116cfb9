// CUDA execution context: a stream and a cuBLAS handle, owned or borrowed,
// and the device-side counter of invalid indices.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "rankwise/backend/cuda/blas_state.hpp"
#include "rankwise/backend/cuda/check.hpp"
#include "rankwise/backend/tags.hpp"
#include "rankwise/core/error.hpp"

namespace rankwise {
namespace detail {
namespace cuda {

/// The cuBLAS side of ScopedBlasSettings.
struct CublasApi {
  using Handle = cublasHandle_t;
  using Settings =
      BlasSettings<cudaStream_t, cublasPointerMode_t, cublasMath_t, cublasAtomicsMode_t>;

  static Settings get(Handle h) {
    Settings s{};
    RANKWISE_CUBLAS_CHECK(cublasGetStream(h, &s.stream));
    RANKWISE_CUBLAS_CHECK(cublasGetPointerMode(h, &s.pointer_mode));
    RANKWISE_CUBLAS_CHECK(cublasGetMathMode(h, &s.math_mode));
    RANKWISE_CUBLAS_CHECK(cublasGetAtomicsMode(h, &s.atomics_mode));
    return s;
  }
  static void set_stream(Handle h, cudaStream_t v) { RANKWISE_CUBLAS_CHECK(cublasSetStream(h, v)); }
  static void set_pointer_mode(Handle h, cublasPointerMode_t v) {
    RANKWISE_CUBLAS_CHECK(cublasSetPointerMode(h, v));
  }
  static void set_math_mode(Handle h, cublasMath_t v) {
    RANKWISE_CUBLAS_CHECK(cublasSetMathMode(h, v));
  }
  static void set_atomics_mode(Handle h, cublasAtomicsMode_t v) {
    RANKWISE_CUBLAS_CHECK(cublasSetAtomicsMode(h, v));
  }
};

/// What every rankwise cuBLAS call assumes: the context's stream, alpha and
/// beta on the host, full fp32 arithmetic (no TF32), no atomics (the same
/// bits on every run).
inline CublasApi::Settings rankwise_blas_settings(cudaStream_t stream) {
  return {stream, CUBLAS_POINTER_MODE_HOST, CUBLAS_DEFAULT_MATH, CUBLAS_ATOMICS_NOT_ALLOWED};
}

using ScopedCublasSettings = ScopedBlasSettings<CublasApi>;

}  // namespace cuda
}  // namespace detail

/// Every rankwise call on the GPU is queued on stream() and uses handle().
/// The default constructor creates both; the borrowing constructor uses an
/// engine's own stream and handle and destroys neither.
///
/// A borrowed handle keeps the engine's settings: each rankwise cuBLAS call
/// sets the stream, host pointer mode, default math (no TF32) and
/// no-atomics mode it needs for its own duration and restores the engine's
/// values afterwards (detail::cuda::ScopedCublasSettings). cublasSetStream
/// also drops a workspace set by cublasSetWorkspace, so an engine that sets
/// one binds the handle to this stream, and rankwise then never rebinds it.
///
/// Kernels that take unit or expert indices skip an invalid one and count it
/// on the device (device_errors()); the count is read back, reset and
/// reported, as rankwise::error, at the next call that synchronises with the
/// host anyway: synchronize(), and with it every download, upload and
/// Kernels::read_int, or an explicit check_device_errors().
template <>
class Context<CudaBackend> {
 public:
  Context() {
    RANKWISE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    try {
      RANKWISE_CUBLAS_CHECK(cublasCreate(&handle_));
      try {
        RANKWISE_CUBLAS_CHECK(cublasSetStream(handle_, stream_));
        allocate_error_counter();
      } catch (...) {
        cublasDestroy(handle_);
        throw;
      }
    } catch (...) {
      cudaStreamDestroy(stream_);
      throw;
    }
    owns_ = true;
  }

  /// Borrows a stream and a cuBLAS handle; changes neither's settings
  /// outside rankwise's own calls.
  Context(cudaStream_t stream, cublasHandle_t handle) : stream_(stream), handle_(handle) {
    RANKWISE_CHECK(handle != nullptr, "Context<CudaBackend>: cuBLAS handle is null");
    allocate_error_counter();
  }

  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  ~Context() {
    cudaFree(errors_);
    if (owns_) {
      cublasDestroy(handle_);
      cudaStreamDestroy(stream_);
    }
  }

  cudaStream_t stream() const { return stream_; }
  cublasHandle_t handle() const { return handle_; }

  /// Device counter (one unsigned long long) that kernels add invalid
  /// indices to. Device memory; for kernels, not for callers.
  unsigned long long* device_errors() const { return errors_; }

  /// Waits for queued work, then reports invalid indices counted since the
  /// last check (see check_device_errors).
  void synchronize() {
    unsigned long long invalid = 0;
    RANKWISE_CUDA_CHECK(
        cudaMemcpyAsync(&invalid, errors_, sizeof(invalid), cudaMemcpyDeviceToHost, stream_));
    RANKWISE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    report(invalid);
  }

  /// Synchronises and throws rankwise::error (kInvalidArgument) naming how
  /// many unit or expert indices kernels skipped as out of range since the
  /// last check; the count is reset first, so the next check starts at 0.
  void check_device_errors() { synchronize(); }

 private:
  void allocate_error_counter() {
    void* p = nullptr;
    RANKWISE_CUDA_CHECK(cudaMalloc(&p, sizeof(unsigned long long)));
    errors_ = static_cast<unsigned long long*>(p);
    // Queued on the stream before any kernel that counts into it.
    const cudaError_t status = cudaMemsetAsync(errors_, 0, sizeof(unsigned long long), stream_);
    if (status != cudaSuccess) {
      cudaFree(errors_);
      errors_ = nullptr;
      RANKWISE_CUDA_CHECK(status);
    }
  }

  void report(unsigned long long invalid) {
    if (invalid == 0) return;
    RANKWISE_CUDA_CHECK(cudaMemsetAsync(errors_, 0, sizeof(unsigned long long), stream_));
    RANKWISE_CHECK(false, "CUDA kernels skipped ", invalid,
                   " unit or expert indices outside their range (a unit index must be in [0, r), "
                   "an expert index in [0, E)); the results of those calls are incomplete");
  }

  cudaStream_t stream_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  unsigned long long* errors_ = nullptr;
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
