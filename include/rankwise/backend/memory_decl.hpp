// The untyped part of the backend contract: bytes moved and set in a
// backend's memory, whatever they hold (int32 indices, uint8 masks, float
// accumulators), so no typed primitive has to be instantiated for a type it
// was not written for.
#pragma once

#include "rankwise/backend/kernels_decl.hpp"

namespace rankwise {

/// Memory<Backend> is specialised once per backend:
///   rankwise/backend/eigen/memory.hpp   CpuBackend   (memcpy, memset)
///   rankwise/backend/cuda/memory.hpp    CudaBackend  (on the context's stream)
/// Every specialisation provides, with dst / src in the backend's memory and
/// host in host memory (zero bytes is legal and does nothing):
///   copy(ctx, dst, src, bytes)        backend to backend, queued
///   fill(ctx, dst, byte, bytes)       every byte of dst = byte, queued
///   upload(ctx, dst, host, bytes)     host to backend; host may be reused on return
///   download(ctx, host, src, bytes)   backend to host; host holds the bytes on return
template <class Backend>
struct Memory {
  static_assert(detail::dependent_false<Backend>::value,
                "rankwise::Memory<Backend> has no specialisation for this backend: include "
                "<rankwise/rankwise.hpp> (CPU) or <rankwise/cuda.cuh> (CUDA)");
};

}  // namespace rankwise
