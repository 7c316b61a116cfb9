// CUDA specialisation of the backend primitives: cuBLAS for products, small
// kernels for fills and copies; everything queued on the context's stream.
#pragma once

#if !defined(__CUDACC__)
#error \
    "rankwise/backend/cuda/kernels.cuh holds device code: include it from a .cu file compiled by nvcc"
#endif

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "rankwise/backend/cuda/buffer.hpp"
#include "rankwise/backend/cuda/check.hpp"
#include "rankwise/backend/cuda/context.hpp"
#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/random.hpp"
#include "rankwise/core/tiling.hpp"
#include "rankwise/detail/cuda/element.cuh"
#include "rankwise/detail/cuda/rank_unit_kernels.cuh"

namespace rankwise {
namespace detail {
namespace cuda {

template <class T>
__global__ void fill_kernel(T* data, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                            float value) {
  const T v = Element<T>::from_float(value);
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < rows * cols;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    data[(e / cols) * ld + e % cols] = v;
  }
}

// Element (i, j) = uniform(seed, i * cols + j): the CPU backend's exact bits.
template <class T>
__global__ void fill_uniform_kernel(T* data, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                                    double lo, double hi, std::uint64_t seed) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < rows * cols;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    const float v = static_cast<float>(uniform(seed, static_cast<std::uint64_t>(e), lo, hi));
    data[(e / cols) * ld + e % cols] = Element<T>::from_float(v);
  }
}

template <class T>
__global__ void scale_kernel(T* data, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                             float beta) {
  for (std::int64_t e = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; e < rows * cols;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    T& x = data[(e / cols) * ld + e % cols];
    x = Element<T>::from_float(beta * Element<T>::to_float(x));
  }
}

// dst (rows x cols) = srcᵀ through a shared-memory tile, so both the read and
// the write are coalesced. The tile index arithmetic is TransposeTiling's.
template <class T>
__global__ void transpose_kernel(const T* src, std::int64_t src_ld, T* dst, std::int64_t rows,
                                 std::int64_t cols, std::int64_t dst_ld) {
  __shared__ T tile[TransposeTiling::kTile][TransposeTiling::kTile + 1];
  const TransposeTiling tiling{rows, cols};
  const std::int64_t tile_col = tiling.tile_col(blockIdx.x);
  for (std::int64_t by = blockIdx.y; by < tiling.tiles_down(); by += gridDim.y) {
    const std::int64_t tile_row = tiling.tile_row(by);
    // Read: src is (cols x rows); thread (x, y) reads src[tile_col + y][tile_row + x].
    for (int y = threadIdx.y; y < TransposeTiling::kTile; y += blockDim.y) {
      const std::int64_t r = tile_col + y, c = tile_row + threadIdx.x;
      if (r < cols && c < rows) tile[y][threadIdx.x] = src[r * src_ld + c];
    }
    __syncthreads();
    for (int y = threadIdx.y; y < TransposeTiling::kTile; y += blockDim.y) {
      const std::int64_t r = tile_row + y, c = tile_col + threadIdx.x;
      if (r < rows && c < cols) dst[r * dst_ld + c] = tile[threadIdx.x][y];
    }
    __syncthreads();  // the tile is reused by the next tile row
  }
}

inline unsigned grid_for(std::int64_t elements, int block) {
  // Grid-stride loops cover the rest; 65535 keeps the grid within every limit.
  return static_cast<unsigned>(std::min<std::int64_t>(ceil_div(elements, block), 65535));
}

// cuBLAS requires ld >= max(1, rows of its column-major matrix) even for a
// single-row view, whose ld rankwise leaves free.
inline std::int64_t blas_ld(std::int64_t ld, std::int64_t cols) {
  return std::max<std::int64_t>({ld, cols, 1});
}

}  // namespace cuda
}  // namespace detail

template <class T>
struct Kernels<CudaBackend, T> {
  using Acc = float;
  using Ctx = Context<CudaBackend>;
  using Elem = detail::cuda::Element<T>;
  static constexpr int kBlock = 256;

  // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ, so cuBLAS
  // gets B first. Accumulates in fp32 (CUBLAS_COMPUTE_32F: no TF32 for float).
  static void gemm(Ctx& ctx, Acc alpha, MatrixView<const T> a, Op op_a, MatrixView<const T> b,
                   Op op_b, Acc beta, MatrixView<T> c) {
    if (c.empty()) return;
    const std::int64_t inner = op_a == Op::kNoTrans ? a.cols : a.rows;
    if (inner == 0 || alpha == 0.0f) {
      if (beta != 1.0f) scale(ctx, c, beta);
      return;
    }
    using detail::cuda::blas_ld;
    RANKWISE_CUBLAS_CHECK(
        cublasGemmEx_64(ctx.handle(), op_b == Op::kNoTrans ? CUBLAS_OP_N : CUBLAS_OP_T,
                        op_a == Op::kNoTrans ? CUBLAS_OP_N : CUBLAS_OP_T, c.cols, c.rows, inner,
                        &alpha, b.data, Elem::kDataType, blas_ld(b.ld, b.cols), a.data,
                        Elem::kDataType, blas_ld(a.ld, a.cols), &beta, c.data, Elem::kDataType,
                        blas_ld(c.ld, c.cols), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  static void fill(Ctx& ctx, MatrixView<T> m, double value) {
    if (m.empty()) return;
    detail::cuda::fill_kernel<T>
        <<<detail::cuda::grid_for(m.size(), kBlock), kBlock, 0, ctx.stream()>>>(
            m.data, m.rows, m.cols, m.ld, static_cast<float>(value));
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void fill_uniform(Ctx& ctx, MatrixView<T> m, double lo, double hi, std::uint64_t seed) {
    if (m.empty()) return;
    detail::cuda::fill_uniform_kernel<T>
        <<<detail::cuda::grid_for(m.size(), kBlock), kBlock, 0, ctx.stream()>>>(
            m.data, m.rows, m.cols, m.ld, lo, hi, seed);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void scale(Ctx& ctx, MatrixView<T> m, float beta) {
    if (m.empty()) return;
    if (beta == 0.0f) {
      fill(ctx, m, 0.0);
      return;
    }
    detail::cuda::scale_kernel<T>
        <<<detail::cuda::grid_for(m.size(), kBlock), kBlock, 0, ctx.stream()>>>(m.data, m.rows,
                                                                                m.cols, m.ld, beta);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void copy(Ctx& ctx, MatrixView<const T> src, Op op, MatrixView<T> dst) {
    if (dst.empty()) return;
    if (op == Op::kNoTrans) {
      RANKWISE_CUDA_CHECK(cudaMemcpy2DAsync(
          dst.data, detail::cuda::blas_ld(dst.ld, dst.cols) * sizeof(T), src.data,
          detail::cuda::blas_ld(src.ld, src.cols) * sizeof(T), dst.cols * sizeof(T), dst.rows,
          cudaMemcpyDeviceToDevice, ctx.stream()));
      return;
    }
    const TransposeTiling tiling{dst.rows, dst.cols};
    // Grid y is capped at 65535; the kernel strides over further tile rows.
    const dim3 grid(static_cast<unsigned>(tiling.tiles_across()),
                    static_cast<unsigned>(std::min<std::int64_t>(tiling.tiles_down(), 65535)));
    const dim3 block(TransposeTiling::kTile, TransposeTiling::kRowsPerPass);
    detail::cuda::transpose_kernel<T>
        <<<grid, block, 0, ctx.stream()>>>(src.data, src.ld, dst.data, dst.rows, dst.cols, dst.ld);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  // Host transfers sit at the API boundary only (loading weights, reading
  // results); they synchronise so the host array may be reused on return.
  static void upload(Ctx& ctx, const T* host, MatrixView<T> dst) {
    if (dst.empty()) return;
    RANKWISE_CUDA_CHECK(cudaMemcpy2DAsync(
        dst.data, detail::cuda::blas_ld(dst.ld, dst.cols) * sizeof(T), host, dst.cols * sizeof(T),
        dst.cols * sizeof(T), dst.rows, cudaMemcpyHostToDevice, ctx.stream()));
    ctx.synchronize();
  }

  static void download(Ctx& ctx, MatrixView<const T> src, T* host) {
    if (src.empty()) return;
    RANKWISE_CUDA_CHECK(cudaMemcpy2DAsync(
        host, src.cols * sizeof(T), src.data, detail::cuda::blas_ld(src.ld, src.cols) * sizeof(T),
        src.cols * sizeof(T), src.rows, cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
  }

  static void synchronize(Ctx& ctx) { ctx.synchronize(); }

  static void upload_indices(Ctx& ctx, const std::int32_t* host, MatrixView<std::int32_t> dst) {
    if (dst.empty()) return;
    RANKWISE_CUDA_CHECK(
        cudaMemcpy2DAsync(dst.data, detail::cuda::blas_ld(dst.ld, dst.cols) * sizeof(std::int32_t),
                          host, dst.cols * sizeof(std::int32_t), dst.cols * sizeof(std::int32_t),
                          dst.rows, cudaMemcpyHostToDevice, ctx.stream()));
    ctx.synchronize();
  }

  // ---- rank-unit primitives ----

  static void gemm_acc(Ctx& ctx, Acc alpha, MatrixView<const T> a, Op op_a, MatrixView<const T> b,
                       Op op_b, Acc beta, MatrixView<Acc> c) {
    if (c.empty()) return;
    const std::int64_t inner = op_a == Op::kNoTrans ? a.cols : a.rows;
    if (inner == 0 || alpha == 0.0f) {
      Kernels<CudaBackend, float>::scale(ctx, c, beta);
      return;
    }
    using detail::cuda::blas_ld;
    RANKWISE_CUBLAS_CHECK(cublasGemmEx_64(
        ctx.handle(), op_b == Op::kNoTrans ? CUBLAS_OP_N : CUBLAS_OP_T,
        op_a == Op::kNoTrans ? CUBLAS_OP_N : CUBLAS_OP_T, c.cols, c.rows, inner, &alpha, b.data,
        Elem::kDataType, blas_ld(b.ld, b.cols), a.data, Elem::kDataType, blas_ld(a.ld, a.cols),
        &beta, c.data, CUDA_R_32F, blas_ld(c.ld, c.cols), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  static void route(Ctx& ctx, const RoutingRule& rule, MatrixView<const Acc> logits,
                    MatrixView<const Acc> bias, MatrixView<Acc> scores,
                    MatrixView<std::int32_t> experts, MatrixView<std::int32_t> units,
                    MatrixView<Acc> gates, MatrixView<std::int32_t> bad) {
    RANKWISE_CUDA_CHECK(cudaMemsetAsync(bad.data, 0, sizeof(std::int32_t), ctx.stream()));
    const std::int64_t n = logits.rows;
    if (n == 0) return;
    detail::cuda::route_kernel<<<blocks(n), kBlock, 0, ctx.stream()>>>(
        rule, n, logits.data, logits.ld, bias.empty() ? nullptr : bias.data, scores.data, scores.ld,
        experts.data, experts.ld, units.data, units.ld, gates.data, gates.ld, bad.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void route_backward(Ctx& ctx, const RoutingRule& rule, MatrixView<const Acc> scores,
                             MatrixView<const Acc> bias, MatrixView<const std::int32_t> experts,
                             MatrixView<const Acc> dgates, MatrixView<const Acc> extra,
                             MatrixView<const std::uint8_t> mask, MatrixView<Acc> scratch,
                             MatrixView<T> dlogits) {
    const std::int64_t n = scores.rows;
    if (n == 0) return;
    detail::cuda::route_backward_kernel<T><<<blocks(n), kBlock, 0, ctx.stream()>>>(
        rule, n, scores.data, scores.ld, bias.empty() ? nullptr : bias.data, experts.data,
        experts.ld, dgates.data, dgates.ld, extra.empty() ? nullptr : extra.data,
        mask.empty() ? nullptr : mask.data, scratch.data, scratch.ld, dlogits.data, dlogits.ld);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void count_experts(Ctx& ctx, MatrixView<const std::int32_t> experts,
                            MatrixView<const std::uint8_t> mask, MatrixView<std::int32_t> counts) {
    RANKWISE_CUDA_CHECK(
        cudaMemsetAsync(counts.data, 0, sizeof(std::int32_t) * counts.cols, ctx.stream()));
    if (experts.empty()) return;
    detail::cuda::count_experts_kernel<<<blocks(experts.size()), kBlock, 0, ctx.stream()>>>(
        experts.rows, static_cast<int>(experts.cols), experts.data, experts.ld,
        mask.empty() ? nullptr : mask.data, counts.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void update_bias(Ctx& ctx, MatrixView<const std::int32_t> counts, float rate,
                          MatrixView<Acc> bias) {
    detail::cuda::update_bias_kernel<<<blocks(counts.cols), kBlock, 0, ctx.stream()>>>(
        counts.data, static_cast<int>(counts.cols), rate, bias.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void aux_loss_grad(Ctx& ctx, MatrixView<const std::int32_t> counts, int experts_per_token,
                            Acc coefficient, MatrixView<Acc> extra) {
    detail::cuda::aux_loss_grad_kernel<<<blocks(counts.cols), kBlock, 0, ctx.stream()>>>(
        counts.data, static_cast<int>(counts.cols), experts_per_token, coefficient, extra.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void check_units(Ctx& ctx, MatrixView<const std::int32_t> units, std::int64_t num_units,
                          MatrixView<std::int32_t> bad) {
    RANKWISE_CUDA_CHECK(cudaMemsetAsync(bad.data, 0, sizeof(std::int32_t), ctx.stream()));
    if (units.empty()) return;
    detail::cuda::check_units_kernel<<<blocks(units.size()), kBlock, 0, ctx.stream()>>>(
        units.rows, units.cols, units.data, units.ld, num_units, bad.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void gather_dot(Ctx& ctx, Acc alpha, MatrixView<const T> x, MatrixView<const T> w,
                         MatrixView<const std::int32_t> units, MatrixView<Acc> out,
                         Acc beta = 0.0f) {
    if (units.empty()) return;
    const std::int64_t threads = units.size() * detail::cuda::kWarp;
    detail::cuda::gather_dot_kernel<T><<<blocks(threads), kBlock, 0, ctx.stream()>>>(
        alpha, units.rows, units.cols, x.cols, x.data, x.ld, w.data, w.ld, units.data, units.ld,
        out.data, out.ld, beta);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void gather_axpy(Ctx& ctx, Acc alpha, MatrixView<const Acc> coef, MatrixView<const T> w,
                          MatrixView<const std::int32_t> units, MatrixView<T> y) {
    if (units.empty() || y.empty()) return;
    detail::cuda::gather_axpy_kernel<T>
        <<<static_cast<unsigned>(units.rows), kBlock, 0, ctx.stream()>>>(
            alpha, units.cols, y.cols, coef.data, coef.ld, w.data, w.ld, units.data, units.ld,
            y.data, y.ld);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void scatter_axpy(Ctx& ctx, Acc alpha, MatrixView<const Acc> coef, MatrixView<const T> src,
                           MatrixView<const std::int32_t> units, Acc beta, MatrixView<T> out) {
    if (out.empty()) return;
    if (units.ld == 0 && units.rows > 1) {
      if (beta != 1.0f) scale(ctx, out, beta);
      const dim3 grid(static_cast<unsigned>(ceil_div(out.cols, kBlock)),
                      static_cast<unsigned>(units.cols));
      detail::cuda::scatter_axpy_broadcast_kernel<T><<<grid, kBlock, 0, ctx.stream()>>>(
          alpha, units.rows, units.cols, out.cols, coef.data, coef.ld, src.data, src.ld, units.data,
          out.data, out.ld);
      RANKWISE_CUDA_LAUNCH_CHECK();
      return;
    }
    const dim3 grid(static_cast<unsigned>(ceil_div(out.cols, kBlock)),
                    static_cast<unsigned>(out.rows));
    detail::cuda::scatter_axpy_kernel<T><<<grid, kBlock, 0, ctx.stream()>>>(
        alpha, units.rows, units.cols, out.cols, coef.data, coef.ld, src.data, src.ld, units.data,
        units.ld, beta, out.data, out.ld);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void hadamard(Ctx& ctx, MatrixView<const Acc> a, MatrixView<const Acc> b,
                       MatrixView<Acc> out) {
    if (out.empty()) return;
    detail::cuda::hadamard_kernel<<<blocks(out.size()), kBlock, 0, ctx.stream()>>>(
        out.rows, out.cols, a.data, a.ld, b.data, b.ld, out.data, out.ld);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void densify(Ctx& ctx, MatrixView<const std::int32_t> units, MatrixView<const Acc> values,
                      MatrixView<Acc> dense) {
    if (dense.empty()) return;
    Kernels<CudaBackend, float>::fill(ctx, dense, 0.0);
    detail::cuda::densify_kernel<<<blocks(units.rows), kBlock, 0, ctx.stream()>>>(
        units.rows, units.cols, units.data, units.ld, values.data, values.ld, dense.data, dense.ld);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void gather_cols(Ctx& ctx, MatrixView<const T> dense, MatrixView<const std::int32_t> units,
                          MatrixView<Acc> out) {
    if (units.empty()) return;
    detail::cuda::gather_cols_kernel<T><<<blocks(units.size()), kBlock, 0, ctx.stream()>>>(
        units.rows, units.cols, dense.data, dense.ld, units.data, units.ld, out.data, out.ld);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void scale_by(Ctx& ctx, MatrixView<const Acc> factors, MatrixView<T> m) {
    if (m.empty()) return;
    detail::cuda::scale_by_kernel<T><<<blocks(m.size()), kBlock, 0, ctx.stream()>>>(
        m.rows, m.cols, factors.data, factors.ld, m.data, m.ld);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void sum_squares(Ctx& ctx, MatrixView<const T> m, MatrixView<Acc> out) {
    if (m.empty()) return;
    detail::cuda::sum_squares_kernel<T>
        <<<1, 1024, 0, ctx.stream()>>>(m.rows, m.cols, m.data, m.ld, out.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void adam(Ctx& ctx, const AdamStep& step, MatrixView<T> param, MatrixView<const T> grad,
                   MatrixView<Acc> m, MatrixView<Acc> v, MatrixView<const Acc> norm_sq) {
    if (param.empty()) return;
    detail::cuda::adam_kernel<T><<<blocks(param.size()), kBlock, 0, ctx.stream()>>>(
        step, param.rows, param.cols, param.data, param.ld, grad.data, grad.ld, m.data, m.ld,
        v.data, v.ld, norm_sq.empty() ? nullptr : norm_sq.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static std::int32_t read_int(Ctx& ctx, MatrixView<const std::int32_t> v) {
    std::int32_t host = 0;
    RANKWISE_CUDA_CHECK(
        cudaMemcpyAsync(&host, v.data, sizeof(host), cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
    return host;
  }

  // Conversion happens on the host (double -> float -> T), then one transfer.
  static void upload_doubles(Ctx& ctx, const double* host, MatrixView<T> dst) {
    std::vector<T> staged(static_cast<std::size_t>(dst.size()));
    for (std::size_t i = 0; i < staged.size(); ++i) {
      staged[i] = Elem::from_float(static_cast<float>(host[i]));
    }
    upload(ctx, staged.data(), dst);
  }

  static void download_doubles(Ctx& ctx, MatrixView<const T> src, double* host) {
    std::vector<T> staged(static_cast<std::size_t>(src.size()));
    download(ctx, src, staged.data());
    for (std::size_t i = 0; i < staged.size(); ++i) {
      host[i] = static_cast<double>(Elem::to_float(staged[i]));
    }
  }

  /// Crossover of the rank-unit paths on the GPU: the gathers are bound by
  /// the bytes of the k selected rows, cuBLAS by all r; dense pays off once
  /// many tokens share the weights. Not yet measured on a GPU (no device in
  /// the sessions so far): a conservative guess, overridable per layer.
  static bool prefer_dense(std::int64_t n, std::int64_t k, std::int64_t r) {
    return n >= 256 && k * 8 >= r;
  }

  /// MoS: assemble A and B (then cuBLAS) once tokens are many; a guess as
  /// above, not yet measured on a GPU.
  static bool prefer_assembled_shards(std::int64_t n) { return n >= 64; }

 private:
  static unsigned blocks(std::int64_t threads) {
    return static_cast<unsigned>(ceil_div(threads, kBlock));
  }
};

}  // namespace rankwise
