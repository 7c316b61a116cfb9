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
#include <type_traits>
#include <vector>

#include "rankwise/backend/cuda/blas_state.hpp"
#include "rankwise/backend/cuda/buffer.hpp"
#include "rankwise/backend/cuda/check.hpp"
#include "rankwise/backend/cuda/context.hpp"
#include "rankwise/backend/cuda/memory.hpp"
#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/random.hpp"
#include "rankwise/core/tiling.hpp"
#include "rankwise/detail/cuda/element.cuh"
#include "rankwise/detail/cuda/rank_unit_kernels.cuh"
#include "rankwise/detail/cuda/segment_kernels.cuh"

namespace rankwise {
namespace detail {
namespace cuda {

template <class T>
__global__ void fill_kernel(T* data, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                            float value) {
  const T v = Element<T>::from_float(value);
  for (std::int64_t e = thread_start(); e < rows * cols; e += thread_step()) {
    data[(e / cols) * ld + e % cols] = v;
  }
}

// Element (i, j) = uniform(seed, i * cols + j): the CPU backend's exact bits.
template <class T>
__global__ void fill_uniform_kernel(T* data, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                                    double lo, double hi, std::uint64_t seed) {
  for (std::int64_t e = thread_start(); e < rows * cols; e += thread_step()) {
    const float v = static_cast<float>(uniform(seed, static_cast<std::uint64_t>(e), lo, hi));
    data[(e / cols) * ld + e % cols] = Element<T>::from_float(v);
  }
}

template <class T>
__global__ void scale_kernel(T* data, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                             float beta) {
  for (std::int64_t e = thread_start(); e < rows * cols; e += thread_step()) {
    T& x = data[(e / cols) * ld + e % cols];
    x = Element<T>::from_float(beta * Element<T>::to_float(x));
  }
}

// dst (rows x cols) = srcᵀ through a shared-memory tile, so both the read and
// the write are coalesced. The tile index arithmetic is TransposeTiling's; the
// grid strides over tiles in both directions.
template <class T>
__global__ void transpose_kernel(const T* src, std::int64_t src_ld, T* dst, std::int64_t rows,
                                 std::int64_t cols, std::int64_t dst_ld) {
  __shared__ T tile[TransposeTiling::kTile][TransposeTiling::kTile + 1];
  static_assert(sizeof(tile) <= LaunchLimits::kMaxStaticSharedBytes,
                "the transpose tile fits in static shared memory");
  const TransposeTiling tiling{rows, cols};
  for (std::int64_t by = blockIdx.y; by < tiling.tiles_down(); by += gridDim.y) {
    const std::int64_t tile_row = tiling.tile_row(by);
    for (std::int64_t bx = blockIdx.x; bx < tiling.tiles_across(); bx += gridDim.x) {
      const std::int64_t tile_col = tiling.tile_col(bx);
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
      __syncthreads();  // the tile is reused by the next tile
    }
  }
}

// A grid computed in int64 (core/tiling.hpp) becomes a dim3 only once it is
// known to be within CUDA's limits, so no size wraps when narrowed.
inline dim3 to_dim3(const GridSize& g, const char* kernel) {
  RANKWISE_CHECK(g.within_limits(), kernel, ": grid (", g.x, ", ", g.y, ", ", g.z,
                 ") is outside CUDA's limits (x <= 2^31 - 1, y, z <= 65535)");
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
}

// Blocks for a grid-stride kernel over `items` (StrideLoop: capped at 65535).
inline dim3 stride_grid(std::int64_t items, std::int64_t per_block, const char* kernel) {
  return to_dim3(StrideLoop{items, per_block}.grid(), kernel);
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
  // gets B first. Accumulates in fp32 (CUBLAS_COMPUTE_32F, with the handle's
  // math mode held at the default for the call: no TF32 for float).
  static void gemm(Ctx& ctx, Acc alpha, MatrixView<const T> a, Op op_a, MatrixView<const T> b,
                   Op op_b, Acc beta, MatrixView<T> c) {
    if (c.empty()) return;
    const std::int64_t inner = op_a == Op::kNoTrans ? a.cols : a.rows;
    if (inner == 0 || alpha == 0.0f) {
      if (beta != 1.0f) scale(ctx, c, beta);
      return;
    }
    blas_gemm(ctx, alpha, a.data, Elem::kDataType, a.ld, a.cols, op_a, b.data, Elem::kDataType,
              b.ld, b.cols, op_b, beta, c.data, Elem::kDataType, c.ld, c.rows, c.cols, inner);
  }

  static void fill(Ctx& ctx, MatrixView<T> m, double value) {
    if (m.empty()) return;
    detail::cuda::fill_kernel<T>
        <<<detail::cuda::stride_grid(m.size(), kBlock, "fill"), kBlock, 0, ctx.stream()>>>(
            m.data, m.rows, m.cols, m.ld, static_cast<float>(value));
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void fill_uniform(Ctx& ctx, MatrixView<T> m, double lo, double hi, std::uint64_t seed) {
    if (m.empty()) return;
    detail::cuda::fill_uniform_kernel<T>
        <<<detail::cuda::stride_grid(m.size(), kBlock, "fill_uniform"), kBlock, 0, ctx.stream()>>>(
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
        <<<detail::cuda::stride_grid(m.size(), kBlock, "scale"), kBlock, 0, ctx.stream()>>>(
            m.data, m.rows, m.cols, m.ld, beta);
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
    // Both grid dimensions are capped; the kernel strides over further tiles.
    const dim3 grid = detail::cuda::to_dim3(TransposeTiling{dst.rows, dst.cols}.grid(), "copy");
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
    blas_gemm(ctx, alpha, a.data, Elem::kDataType, a.ld, a.cols, op_a, b.data, Elem::kDataType,
              b.ld, b.cols, op_b, beta, c.data, CUDA_R_32F, c.ld, c.rows, c.cols, inner);
  }

  /// c = alpha op(a) op(b) + beta c with a in fp32. cuBLAS has no GEMM whose
  /// operands differ in type (cublasGemmEx pairs 16F with 16F, 32F with 32F,
  /// and 32F inputs only with a 32F output), so for T narrower than float the
  /// columns of c go in panels of kGemmMixedPanel: that panel of op(b) and of
  /// c are widened into scratch (exactly), one fp32 GEMM runs, and the panel
  /// of c is rounded back to T once. a is never rounded to T.
  static void gemm_mixed(Ctx& ctx, Acc alpha, MatrixView<const Acc> a, Op op_a,
                         MatrixView<const T> b, Op op_b, Acc beta, MatrixView<T> c,
                         MatrixView<Acc> scratch) {
    if constexpr (std::is_same<T, Acc>::value) {
      gemm(ctx, alpha, a, op_a, b, op_b, beta, c);
    } else {
      if (c.empty()) return;
      const std::int64_t inner = op_a == Op::kNoTrans ? a.cols : a.rows;
      if (inner == 0 || alpha == 0.0f) {
        if (beta != 1.0f) scale(ctx, c, beta);
        return;
      }
      const std::int64_t need = gemm_mixed_scratch<T>(c.rows, inner);
      RANKWISE_CHECK(scratch.size() >= need && scratch.data != nullptr,
                     "gemm_mixed: scratch holds ", scratch.size(), " elements, needs ", need,
                     " (gemm_mixed_scratch)");
      constexpr std::int64_t kPanel = kGemmMixedPanel;
      Acc* b_panel = scratch.data;                   // op(b) columns: (inner x w) or (w x inner)
      Acc* c_panel = scratch.data + inner * kPanel;  // (c.rows x w), 256-byte aligned
      for (std::int64_t j0 = 0; j0 < c.cols; j0 += kPanel) {
        const std::int64_t w = std::min(kPanel, c.cols - j0);
        // op(b)'s columns j0.. are b's columns (kNoTrans) or b's rows (kTrans).
        const bool by_cols = op_b == Op::kNoTrans;
        const std::int64_t b_rows = by_cols ? inner : w, b_cols = by_cols ? w : inner;
        const T* b_src = by_cols ? b.data + j0 : b.data + j0 * b.ld;
        convert(ctx, b_src, b.ld, b_rows, b_cols, b_panel, b_cols);
        if (beta != 0.0f) convert(ctx, c.data + j0, c.ld, c.rows, w, c_panel, w);
        blas_gemm(ctx, alpha, a.data, CUDA_R_32F, a.ld, a.cols, op_a, b_panel, CUDA_R_32F, b_cols,
                  b_cols, op_b, beta, c_panel, CUDA_R_32F, w, c.rows, w, inner);
        convert(ctx, static_cast<const Acc*>(c_panel), w, c.rows, w, c.data + j0, c.ld);
      }
    }
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
                             MatrixView<T> dlogits, MatrixView<Acc> dbias = {}) {
    const std::int64_t n = scores.rows;
    if (n == 0) return;
    detail::cuda::route_backward_kernel<T><<<blocks(n), kBlock, 0, ctx.stream()>>>(
        rule, n, scores.data, scores.ld, bias.empty() ? nullptr : bias.data, experts.data,
        experts.ld, dgates.data, dgates.ld, extra.empty() ? nullptr : extra.data,
        mask.empty() ? nullptr : mask.data, scratch.data, scratch.ld, dlogits.data, dlogits.ld,
        dbias.empty() ? nullptr : dbias.data, dbias.ld, ctx.device_errors());
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void sum_rows(Ctx& ctx, MatrixView<const Acc> m, Acc beta, MatrixView<Acc> out) {
    if (out.cols == 0) return;
    detail::cuda::sum_rows_kernel<<<blocks(out.cols), kBlock, 0, ctx.stream()>>>(
        m.rows, m.cols, m.data, m.ld, beta, out.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void count_experts(Ctx& ctx, MatrixView<const std::int32_t> experts,
                            MatrixView<const std::uint8_t> mask, MatrixView<std::int32_t> counts) {
    RANKWISE_CUDA_CHECK(
        cudaMemsetAsync(counts.data, 0, sizeof(std::int32_t) * counts.cols, ctx.stream()));
    if (experts.empty()) return;
    detail::cuda::count_experts_kernel<<<blocks(experts.size()), kBlock, 0, ctx.stream()>>>(
        experts.rows, static_cast<int>(experts.cols), experts.data, experts.ld,
        mask.empty() ? nullptr : mask.data, counts.data, counts.cols, ctx.device_errors());
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void update_bias(Ctx& ctx, MatrixView<const std::int32_t> counts, float rate,
                          MatrixView<Acc> bias) {
    if (counts.empty()) return;  // a grid of no blocks is a launch error
    detail::cuda::update_bias_kernel<<<blocks(counts.cols), kBlock, 0, ctx.stream()>>>(
        counts.data, static_cast<int>(counts.cols), rate, bias.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void aux_loss_grad(Ctx& ctx, MatrixView<const std::int32_t> counts, int experts_per_token,
                            Acc coefficient, MatrixView<Acc> extra) {
    if (counts.empty()) return;
    detail::cuda::aux_loss_grad_kernel<<<
        detail::cuda::stride_grid(counts.cols, kBlock, "aux_loss_grad"), kBlock, 0, ctx.stream()>>>(
        counts.data, static_cast<int>(counts.cols), experts_per_token, coefficient, extra.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void check_units(Ctx& ctx, MatrixView<const std::int32_t> units, std::int64_t num_units,
                          MatrixView<std::int32_t> bad) {
    RANKWISE_CUDA_CHECK(cudaMemsetAsync(bad.data, 0, sizeof(std::int32_t), ctx.stream()));
    if (units.empty()) return;
    detail::cuda::check_units_kernel<<<
        detail::cuda::stride_grid(units.size(), kBlock, "check_units"), kBlock, 0, ctx.stream()>>>(
        units.rows, units.cols, units.data, units.ld, num_units, bad.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void gather_dot(Ctx& ctx, Acc alpha, MatrixView<const T> x, MatrixView<const T> w,
                         MatrixView<const std::int32_t> units, MatrixView<Acc> out,
                         Acc beta = 0.0f) {
    if (units.empty()) return;
    // One warp per (token, slot), warps striding over the pairs.
    detail::cuda::gather_dot_kernel<T>
        <<<detail::cuda::stride_grid(units.size(), kBlock / detail::cuda::kWarp, "gather_dot"),
           kBlock, 0, ctx.stream()>>>(alpha, units.rows, units.cols, x.cols, x.data, x.ld, w.data,
                                      w.ld, w.rows, units.data, units.ld, out.data, out.ld, beta,
                                      ctx.device_errors());
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void gather_axpy(Ctx& ctx, Acc alpha, MatrixView<const Acc> coef, MatrixView<const T> w,
                          MatrixView<const std::int32_t> units, MatrixView<T> y) {
    if (units.empty() || y.empty()) return;
    // One block per token, blocks striding over the tokens.
    detail::cuda::gather_axpy_kernel<T>
        <<<detail::cuda::stride_grid(units.rows, 1, "gather_axpy"), kBlock, 0, ctx.stream()>>>(
            alpha, units.rows, units.cols, y.cols, coef.data, coef.ld, w.data, w.ld, w.rows,
            units.data, units.ld, y.data, y.ld, ctx.device_errors());
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void scatter_axpy(Ctx& ctx, Acc alpha, MatrixView<const Acc> coef, MatrixView<const T> src,
                           MatrixView<const std::int32_t> units, Acc beta, MatrixView<T> out) {
    if (out.empty()) return;
    if (units.ld == 0 && units.rows > 1) {
      if (beta != 1.0f) scale(ctx, out, beta);
      if (units.cols == 0) return;  // nothing to add; no grid of zero rows
      // Rows of the grid are the k slots; RowTileGrid caps them at 65535.
      const dim3 grid =
          detail::cuda::to_dim3(RowTileGrid{units.cols, out.cols, kBlock}.grid(), "scatter_axpy");
      detail::cuda::scatter_axpy_broadcast_kernel<T><<<grid, kBlock, 0, ctx.stream()>>>(
          alpha, units.rows, units.cols, out.cols, coef.data, coef.ld, src.data, src.ld, units.data,
          out.data, out.ld, out.rows, ctx.device_errors());
      RANKWISE_CUDA_LAUNCH_CHECK();
      return;
    }
    // Rows of the grid are out's rows (a MoS pool may have more than 65535).
    const dim3 grid =
        detail::cuda::to_dim3(RowTileGrid{out.rows, out.cols, kBlock}.grid(), "scatter_axpy");
    detail::cuda::scatter_axpy_kernel<T><<<grid, kBlock, 0, ctx.stream()>>>(
        alpha, units.rows, units.cols, out.cols, coef.data, coef.ld, src.data, src.ld, units.data,
        units.ld, beta, out.data, out.ld, out.rows, ctx.device_errors());
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void hadamard(Ctx& ctx, MatrixView<const Acc> a, MatrixView<const Acc> b,
                       MatrixView<Acc> out) {
    if (out.empty()) return;
    detail::cuda::hadamard_kernel<<<detail::cuda::stride_grid(out.size(), kBlock, "hadamard"),
                                    kBlock, 0, ctx.stream()>>>(out.rows, out.cols, a.data, a.ld,
                                                               b.data, b.ld, out.data, out.ld);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void densify(Ctx& ctx, MatrixView<const std::int32_t> units, MatrixView<const Acc> values,
                      MatrixView<Acc> dense) {
    if (dense.empty()) return;
    Kernels<CudaBackend, float>::fill(ctx, dense, 0.0);
    if (units.empty()) return;
    detail::cuda::densify_kernel<<<detail::cuda::stride_grid(units.rows, kBlock, "densify"), kBlock,
                                   0, ctx.stream()>>>(units.rows, units.cols, units.data, units.ld,
                                                      values.data, values.ld, dense.data, dense.ld,
                                                      dense.cols, ctx.device_errors());
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void gather_cols(Ctx& ctx, MatrixView<const T> dense, MatrixView<const std::int32_t> units,
                          MatrixView<Acc> out) {
    if (units.empty()) return;
    detail::cuda::gather_cols_kernel<T>
        <<<detail::cuda::stride_grid(units.size(), kBlock, "gather_cols"), kBlock, 0,
           ctx.stream()>>>(units.rows, units.cols, dense.data, dense.ld, dense.cols, units.data,
                           units.ld, out.data, out.ld, ctx.device_errors());
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void take_rows(Ctx& ctx, MatrixView<const T> src, MatrixView<const std::int32_t> rows,
                        MatrixView<T> dst) {
    if (dst.empty()) return;
    detail::cuda::take_rows_kernel<T>
        <<<detail::cuda::stride_grid(dst.size(), kBlock, "take_rows"), kBlock, 0, ctx.stream()>>>(
            dst.rows, dst.cols, src.data, src.ld, src.rows, rows.data, rows.ld, dst.data, dst.ld,
            ctx.device_errors());
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void add_rows(Ctx& ctx, MatrixView<const T> src, MatrixView<const std::int32_t> rows,
                       MatrixView<T> dst) {
    if (src.empty()) return;
    detail::cuda::add_rows_kernel<T>
        <<<detail::cuda::stride_grid(src.size(), kBlock, "add_rows"), kBlock, 0, ctx.stream()>>>(
            src.rows, src.cols, src.data, src.ld, rows.data, rows.ld, dst.data, dst.ld, dst.rows,
            ctx.device_errors());
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void remap_units(Ctx& ctx, MatrixView<const std::int32_t> table,
                          MatrixView<const std::int32_t> units, MatrixView<std::int32_t> out) {
    if (units.empty()) return;
    detail::cuda::remap_units_kernel<<<detail::cuda::stride_grid(units.size(), kBlock,
                                                                 "remap_units"),
                                       kBlock, 0, ctx.stream()>>>(
        units.rows, units.cols, table.data, table.cols, units.data, units.ld, out.data, out.ld,
        ctx.device_errors());
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void scale_by(Ctx& ctx, MatrixView<const Acc> factors, MatrixView<T> m) {
    if (m.empty()) return;
    detail::cuda::scale_by_kernel<T>
        <<<detail::cuda::stride_grid(m.size(), kBlock, "scale_by"), kBlock, 0, ctx.stream()>>>(
            m.rows, m.cols, factors.data, factors.ld, m.data, m.ld);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void sum_squares(Ctx& ctx, MatrixView<const T> m, MatrixView<Acc> out) {
    if (m.empty()) return;
    // One block (a fixed reduction order); 1024 threads, 4 KB of static shared memory.
    detail::cuda::sum_squares_kernel<T><<<1, detail::cuda::kSumSquaresThreads, 0, ctx.stream()>>>(
        m.rows, m.cols, m.data, m.ld, out.data);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  static void adam(Ctx& ctx, const AdamStep& step, MatrixView<T> param, MatrixView<const T> grad,
                   MatrixView<Acc> m, MatrixView<Acc> v, MatrixView<const Acc> norm_sq) {
    if (param.empty()) return;
    detail::cuda::adam_kernel<T>
        <<<detail::cuda::stride_grid(param.size(), kBlock, "adam"), kBlock, 0, ctx.stream()>>>(
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

  // A multi-adapter batch in two launches (BGMV-style): per-adapter GEMMs
  // would cost launches in proportion to the adapters in the batch. Which
  // adapters take them: TuningPolicy<CudaBackend>::prefer_segmented.
  static constexpr bool kSegmentedLora = true;

  static void segment_lora_forward(Ctx& ctx, const SegmentTable& table, MatrixView<const T> x,
                                   MatrixView<const T> a, MatrixView<const T> bt, MatrixView<T> y,
                                   float* h) {
    detail::cuda::segment_shrink<T>(ctx.stream(), table, x.data, x.ld, a.data, a.ld, a.cols, h,
                                    a.rows, ctx.device_errors());
    detail::cuda::segment_expand<T>(ctx.stream(), table, h, bt.data, bt.ld, bt.cols, y.data, y.ld,
                                    bt.rows, ctx.device_errors());
  }

 private:
  // One thread per item, no stride loop (the routing kernels): the grid must
  // hold every item; ItemGrid says whether it can (core/tiling.hpp).
  static unsigned blocks(std::int64_t threads) {
    const ItemGrid g{threads, kBlock};
    RANKWISE_CHECK(g.fits(), "CUDA launch over ", threads, " items needs ", g.blocks(),
                   " blocks, more than the grid's 2^31 - 1");
    return static_cast<unsigned>(g.blocks());
  }

  // dst (rows x cols) = src element by element, between T and float.
  template <class From, class To>
  static void convert(Ctx& ctx, const From* src, std::int64_t src_ld, std::int64_t rows,
                      std::int64_t cols, To* dst, std::int64_t dst_ld) {
    if (rows * cols == 0) return;
    detail::cuda::convert_kernel<From, To>
        <<<detail::cuda::stride_grid(rows * cols, kBlock, "convert"), kBlock, 0, ctx.stream()>>>(
            rows, cols, src, src_ld, dst, dst_ld);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }

  // One cuBLAS GEMM of row-major views (pointer, type, ld, cols): c (m x n) =
  // alpha op(a) op(b) + beta c, inner dimension k. The handle's settings are
  // held at what rankwise needs for the call and restored after it.
  static void blas_gemm(Ctx& ctx, float alpha, const void* a, cudaDataType_t a_type,
                        std::int64_t a_ld, std::int64_t a_cols, Op op_a, const void* b,
                        cudaDataType_t b_type, std::int64_t b_ld, std::int64_t b_cols, Op op_b,
                        float beta, void* c, cudaDataType_t c_type, std::int64_t c_ld,
                        std::int64_t m, std::int64_t n, std::int64_t k) {
    using detail::cuda::blas_ld;
    const detail::cuda::ScopedCublasSettings settings(
        ctx.handle(), detail::cuda::rankwise_blas_settings(ctx.stream()));
    RANKWISE_CUBLAS_CHECK(
        cublasGemmEx_64(ctx.handle(), op_b == Op::kNoTrans ? CUBLAS_OP_N : CUBLAS_OP_T,
                        op_a == Op::kNoTrans ? CUBLAS_OP_N : CUBLAS_OP_T, n, m, k, &alpha, b,
                        b_type, blas_ld(b_ld, b_cols), a, a_type, blas_ld(a_ld, a_cols), &beta, c,
                        c_type, blas_ld(c_ld, n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
};

}  // namespace rankwise
