// Backend tags and the per-backend types a layer is written against.
#pragma once

#include "rankwise/core/matrix_view.hpp"

namespace rankwise {

/// CPU backend: Eigen kernels on host memory.
struct CpuBackend {
  static constexpr MemorySpace kMemorySpace = MemorySpace::kHost;
  static constexpr const char* kName = "cpu";
};

/// GPU backend: CUDA kernels and cuBLAS on device memory. Its definitions come
/// from <rankwise/cuda.cuh>, included from a .cu file.
struct CudaBackend {
  static constexpr MemorySpace kMemorySpace = MemorySpace::kDevice;
  static constexpr const char* kName = "cuda";
};

/// Execution context of a backend. CPU: nothing to hold. CUDA: a stream and a
/// cuBLAS handle (rankwise/backend/cuda/context.hpp). Layers borrow one.
template <class Backend>
class Context;

/// Owning, uninitialised storage for `size` elements of T in the backend's
/// memory space (rankwise/backend/eigen/buffer.hpp, rankwise/backend/cuda/buffer.hpp).
template <class Backend, class T>
class Buffer;

}  // namespace rankwise
