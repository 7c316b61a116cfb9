// The contract between layers and backends: the primitives every backend
// implements. Layers call these in order and never name a backend.
#pragma once

#include <cstdint>

#include "rankwise/backend/tags.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/numeric.hpp"

namespace rankwise {
namespace detail {
template <class...>
struct dependent_false {
  static constexpr bool value = false;
};
}  // namespace detail

/// Kernels<Backend, T> is specialised once per backend:
///   rankwise/backend/eigen/kernels.hpp   CpuBackend,  T = float, double
///   rankwise/backend/cuda/kernels.cuh    CudaBackend, T = float, __half, __nv_bfloat16
///
/// Every specialisation provides, with Acc = accumulator_t<T> and all views in
/// the backend's memory space (checked by the caller, not here):
///
///   gemm(ctx, alpha, a, op_a, b, op_b, beta, c)
///       c = alpha * op(a) * op(b) + beta * c, accumulating in Acc. beta == 0
///       ignores the old contents of c (NaN there does not propagate).
///   fill(ctx, m, value)                      every element of m = value
///   fill_uniform(ctx, m, lo, hi, seed)       m[i][j] = uniform(seed, i*cols+j, lo, hi)
///                                            (rankwise/core/random.hpp): same bits
///                                            on every backend
///   copy(ctx, src, op, dst)                  dst = op(src)
///   upload(ctx, host, dst)                   dst = contiguous row-major host array
///   download(ctx, src, host)                 contiguous row-major host array = src
///   synchronize(ctx)                         waits for queued work
///
/// Empty operands are legal and do nothing (except gemm with an empty inner
/// dimension, which scales c by beta).
template <class Backend, class T>
struct Kernels {
  static_assert(detail::dependent_false<Backend, T>::value,
                "rankwise::Kernels<Backend, T> has no specialisation for this pair. For "
                "CpuBackend include <rankwise/rankwise.hpp> (T = float or double); for "
                "CudaBackend include <rankwise/cuda.cuh> from a .cu file (T = float, "
                "__half or __nv_bfloat16).");
};

}  // namespace rankwise
