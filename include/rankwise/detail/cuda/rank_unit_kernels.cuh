// CUDA kernels behind the routing and rank-unit primitives. The routing rule
// itself is rankwise/core/routing.hpp, called by one thread per token.
#pragma once

#include <cstdint>

#include "rankwise/core/adam_rule.hpp"
#include "rankwise/core/routing.hpp"
#include "rankwise/core/tiling.hpp"
#include "rankwise/core/unit_index.hpp"
#include "rankwise/detail/cuda/element.cuh"

namespace rankwise {
namespace detail {
namespace cuda {

constexpr int kWarp = 32;

// The grid-stride loops of every kernel below: StrideLoop's start and step
// over x (core/tiling.hpp), per thread or per warp.
__device__ inline std::int64_t thread_start() {
  return StrideLoop::start(blockIdx.x, blockDim.x, threadIdx.x);
}
__device__ inline std::int64_t thread_step() { return StrideLoop::step(gridDim.x, blockDim.x); }
__device__ inline std::int64_t warp_start() {
  return StrideLoop::start(blockIdx.x, blockDim.x / kWarp, threadIdx.x / kWarp);
}
__device__ inline std::int64_t warp_step() {
  return StrideLoop::step(gridDim.x, blockDim.x / kWarp);
}

// An index outside [0, count) is skipped and counted here; the context reads
// the count back at its next synchronisation and throws (backend/cuda/context.hpp).
__device__ inline bool checked_index(std::int64_t i, std::int64_t count,
                                     unsigned long long* invalid) {
  if (valid_unit_index(i, count)) return true;
  atomicAdd(invalid, 1ull);
  return false;
}

__device__ inline float warp_sum(float v) {
  // Fixed butterfly order: the same bits on every run.
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

static __global__ void route_kernel(RoutingRule rule, std::int64_t n, const float* logits,
                                    std::int64_t logits_ld, const float* bias, float* scores,
                                    std::int64_t scores_ld, std::int32_t* experts,
                                    std::int64_t experts_ld, std::int32_t* units,
                                    std::int64_t units_ld, float* gates, std::int64_t gates_ld,
                                    std::int32_t* bad) {
  const std::int64_t t = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x;
  if (t >= n) return;
  const bool ok = route_token(rule, logits + t * logits_ld, bias, scores + t * scores_ld,
                              experts + t * experts_ld, units + t * units_ld, gates + t * gates_ld);
  if (!ok) atomicAdd(bad, 1);
}

// dlogits_acc is the float scratch route_token_backward writes; the row is
// then stored in T. dbias (n x C, or null) receives each token's ∂L/∂bias.
template <class T>
__global__ void route_backward_kernel(RoutingRule rule, std::int64_t n, const float* scores,
                                      std::int64_t scores_ld, const float* bias,
                                      const std::int32_t* experts, std::int64_t experts_ld,
                                      const float* dgates, std::int64_t dgates_ld,
                                      const float* extra, const std::uint8_t* mask,
                                      float* dlogits_acc, std::int64_t acc_ld, T* dlogits,
                                      std::int64_t dlogits_ld, float* dbias,
                                      std::int64_t dbias_ld, unsigned long long* invalid) {
  const std::int64_t t = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x;
  if (t >= n) return;
  const float* x = (mask != nullptr && mask[t] == 0) ? nullptr : extra;
  float* row = dlogits_acc + t * acc_ld;
  float* dbias_row = dbias != nullptr ? dbias + t * dbias_ld : nullptr;
  // A caller's routing with a choice out of range: the token contributes no
  // gradient and the context reports it at its next synchronisation.
  bool valid = true;
  for (int c = 0; c < rule.choices_per_token; ++c) {
    valid = checked_index(experts[t * experts_ld + c], rule.num_choices, invalid) && valid;
  }
  if (valid) {
    route_token_backward(rule, scores + t * scores_ld, bias, experts + t * experts_ld,
                         dgates + t * dgates_ld, x, row, dbias_row);
  } else {
    for (int e = 0; e < rule.num_experts; ++e) row[e] = 0.0f;
    for (int c = 0; dbias_row != nullptr && c < rule.num_choices; ++c) dbias_row[c] = 0.0f;
  }
  for (int e = 0; e < rule.num_experts; ++e) {
    dlogits[t * dlogits_ld + e] = Element<T>::from_float(row[e]);
  }
}

// One thread per column, rows summed in order: the same bits on every run.
static __global__ void sum_rows_kernel(std::int64_t rows, std::int64_t cols, const float* m,
                                       std::int64_t ld, float beta, float* out) {
  const std::int64_t j = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x;
  if (j >= cols) return;
  float acc = 0.0f;
  for (std::int64_t i = 0; i < rows; ++i) acc += m[i * ld + j];
  out[j] = beta == 0.0f ? acc : beta * out[j] + acc;
}

// Integer atomics: the counts are exact, so the order does not matter.
static __global__ void count_experts_kernel(std::int64_t n, int per_token,
                                            const std::int32_t* experts, std::int64_t ld,
                                            const std::uint8_t* mask, std::int32_t* counts,
                                            std::int64_t num_counts,
                                            unsigned long long* invalid) {
  const std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x;
  if (i >= n * per_token) return;
  const std::int64_t t = i / per_token;
  if (mask != nullptr && mask[t] == 0) return;
  const std::int32_t e = experts[t * ld + i % per_token];
  if (checked_index(e, num_counts, invalid)) atomicAdd(counts + e, 1);
}

static __global__ void update_bias_kernel(const std::int32_t* counts, int num_experts, float rate,
                                          float* bias) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e < num_experts) bias[e] += balance_bias_step(counts, num_experts, e, rate);
}

static __global__ void aux_loss_grad_kernel(const std::int32_t* counts, int num_experts,
                                            int per_token, float coef, float* extra) {
  for (std::int64_t e = thread_start(); e < num_experts; e += thread_step()) {
    extra[e] = static_cast<float>(
        switch_aux_dscore(counts, num_experts, static_cast<int>(e), per_token, coef));
  }
}

static __global__ void check_units_kernel(std::int64_t n, std::int64_t k, const std::int32_t* units,
                                          std::int64_t ld, std::int64_t num_units,
                                          std::int32_t* bad) {
  for (std::int64_t i = thread_start(); i < n * k; i += thread_step()) {
    if (!valid_unit_index(units[(i / k) * ld + i % k], num_units)) atomicAdd(bad, 1);
  }
}

// One warp per (token, slot): out = alpha * w[unit] · x[token] + beta * out.
// The pair loop is warp-uniform, so every lane takes part in warp_sum. A unit
// outside w's rows contributes nothing (and is counted).
template <class T>
__global__ void gather_dot_kernel(float alpha, std::int64_t n, std::int64_t k, std::int64_t d,
                                  const T* x, std::int64_t x_ld, const T* w, std::int64_t w_ld,
                                  std::int64_t w_rows, const std::int32_t* units,
                                  std::int64_t units_ld, float* out, std::int64_t out_ld,
                                  float beta, unsigned long long* invalid) {
  const int lane = threadIdx.x % kWarp;
  for (std::int64_t pair = warp_start(); pair < n * k; pair += warp_step()) {
    const std::int64_t t = pair / k, j = pair % k;
    const std::int64_t u = units[t * units_ld + j];
    const bool ok = valid_unit_index(u, w_rows);
    if (!ok && lane == 0) atomicAdd(invalid, 1ull);
    const T* xr = x + t * x_ld;
    const T* wr = w + (ok ? u : 0) * w_ld;
    float acc = 0.0f;
    for (std::int64_t c = lane; ok && c < d; c += kWarp) {
      acc += Element<T>::to_float(wr[c]) * Element<T>::to_float(xr[c]);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      float& o = out[t * out_ld + j];
      o = beta == 0.0f ? alpha * acc : alpha * acc + beta * o;
    }
  }
}

// Blocks stride over tokens, threads across columns: y[t] += alpha Σ_j
// coef[t][j] w[unit_j]. A unit outside w's rows is skipped (and counted once,
// by the block's first thread).
template <class T>
__global__ void gather_axpy_kernel(float alpha, std::int64_t n, std::int64_t k, std::int64_t d,
                                   const float* coef, std::int64_t coef_ld, const T* w,
                                   std::int64_t w_ld, std::int64_t w_rows,
                                   const std::int32_t* units, std::int64_t units_ld, T* y,
                                   std::int64_t y_ld, unsigned long long* invalid) {
  for (std::int64_t t = StrideLoop::start(blockIdx.x, 1, 0); t < n;
       t += StrideLoop::step(gridDim.x, 1)) {
    if (threadIdx.x == 0) {
      for (std::int64_t j = 0; j < k; ++j) checked_index(units[t * units_ld + j], w_rows, invalid);
    }
    for (std::int64_t c = StrideLoop::start(0, blockDim.x, threadIdx.x); c < d;
         c += StrideLoop::step(1, blockDim.x)) {
      float acc = 0.0f;
      for (std::int64_t j = 0; j < k; ++j) {
        const std::int64_t u = units[t * units_ld + j];
        if (!valid_unit_index(u, w_rows)) continue;
        acc += coef[t * coef_ld + j] * Element<T>::to_float(w[u * w_ld + c]);
      }
      T& out = y[t * y_ld + c];
      out = Element<T>::from_float(Element<T>::to_float(out) + alpha * acc);
    }
  }
}

// Block (column tile, unit): sums the (token, slot) pairs that chose the unit
// in token order, so the result does not depend on scheduling. Indices are
// staged through shared memory a tile at a time. The grid strides over units
// (y) and column tiles (x), RowTileGrid's map, so any number of output rows
// launches. Units outside [0, rows) match no block; block (0, 0) counts them
// on its first row and tile.
template <class T>
__global__ void scatter_axpy_kernel(float alpha, std::int64_t n, std::int64_t k, std::int64_t d,
                                    const float* coef, std::int64_t coef_ld, const T* src,
                                    std::int64_t src_ld, const std::int32_t* units,
                                    std::int64_t units_ld, float beta, T* out, std::int64_t out_ld,
                                    std::int64_t rows, unsigned long long* invalid) {
  constexpr int kStage = 256;
  __shared__ std::int32_t stage_unit[kStage];
  __shared__ float stage_coef[kStage];
  const RowTileGrid grid{rows, d, blockDim.x};
  const std::int64_t first_unit = blockIdx.y, first_tile = blockIdx.x;
  const bool counts_invalid = first_unit == 0 && first_tile == 0;
  for (std::int64_t unit = StrideLoop::start(blockIdx.y, 1, 0); unit < rows;
       unit += StrideLoop::step(gridDim.y, 1)) {
    for (std::int64_t tile = StrideLoop::start(blockIdx.x, 1, 0); tile < grid.tiles();
         tile += StrideLoop::step(gridDim.x, 1)) {
      const std::int64_t c = grid.col(tile, threadIdx.x);
      const bool count_now = counts_invalid && unit == first_unit && tile == first_tile;
      float acc = 0.0f;
      for (std::int64_t base = 0; base < n * k; base += kStage) {
        __syncthreads();
        for (int s = threadIdx.x; s < kStage; s += blockDim.x) {
          const std::int64_t i = base + s;
          const bool valid = i < n * k;
          stage_unit[s] = valid ? units[(i / k) * units_ld + i % k] : -1;
          stage_coef[s] = valid ? coef[(i / k) * coef_ld + i % k] : 0.0f;
          if (valid && count_now) checked_index(stage_unit[s], rows, invalid);
        }
        __syncthreads();
        if (c < d) {
          for (int s = 0; s < kStage; ++s) {
            if (stage_unit[s] == unit) {
              const std::int64_t t = (base + s) / k;
              acc += stage_coef[s] * Element<T>::to_float(src[t * src_ld + c]);
            }
          }
        }
      }
      if (c < d) {
        T& o = out[unit * out_ld + c];
        const float old = beta == 0.0f ? 0.0f : beta * Element<T>::to_float(o);
        o = Element<T>::from_float(old + alpha * acc);
      }
    }
  }
}

// Broadcast units (every token uses the same k units, ld = 0): block
// (column tile, slot j) owns unit units[j] if j is its first slot, and sums
// coef[n][j'] * src[n] over all tokens n and every slot j' of that unit, in
// order: each output row is written by one block, deterministically. The grid
// strides over slots (y) and column tiles (x) as RowTileGrid maps them; a
// unit outside [0, rows) is skipped and counted by its owning slot's block.
template <class T>
__global__ void scatter_axpy_broadcast_kernel(float alpha, std::int64_t n, std::int64_t k,
                                              std::int64_t d, const float* coef,
                                              std::int64_t coef_ld, const T* src,
                                              std::int64_t src_ld, const std::int32_t* units,
                                              T* out, std::int64_t out_ld, std::int64_t rows,
                                              unsigned long long* invalid) {
  const RowTileGrid grid{k, d, blockDim.x};
  for (std::int64_t j = StrideLoop::start(blockIdx.y, 1, 0); j < k;
       j += StrideLoop::step(gridDim.y, 1)) {
    const std::int32_t unit = units[j];
    bool owner = true;
    for (std::int64_t prev = 0; prev < j && owner; ++prev) owner = units[prev] != unit;
    if (!owner) continue;  // an earlier slot's block owns this row
    if (blockIdx.x == 0 && threadIdx.x == 0) checked_index(unit, rows, invalid);
    if (!valid_unit_index(unit, rows)) continue;
    for (std::int64_t tile = StrideLoop::start(blockIdx.x, 1, 0); tile < grid.tiles();
         tile += StrideLoop::step(gridDim.x, 1)) {
      const std::int64_t c = grid.col(tile, threadIdx.x);
      if (c >= d) continue;
      float acc = 0.0f;
      for (std::int64_t slot = j; slot < k; ++slot) {
        if (units[slot] != unit) continue;
        for (std::int64_t t = 0; t < n; ++t) {
          acc += coef[t * coef_ld + slot] * Element<T>::to_float(src[t * src_ld + c]);
        }
      }
      T& o = out[std::int64_t(unit) * out_ld + c];
      o = Element<T>::from_float(Element<T>::to_float(o) + alpha * acc);
    }
  }
}

static __global__ void hadamard_kernel(std::int64_t rows, std::int64_t cols, const float* a,
                                       std::int64_t a_ld, const float* b, std::int64_t b_ld,
                                       float* out, std::int64_t out_ld) {
  for (std::int64_t i = thread_start(); i < rows * cols; i += thread_step()) {
    const std::int64_t r = i / cols, c = i % cols;
    out[r * out_ld + c] = a[r * a_ld + c] * b[r * b_ld + c];
  }
}

// One thread per token, slots in order: duplicate units in a user routing add
// up, as they do on the sparse path. A unit outside [0, r) is skipped and counted.
static __global__ void densify_kernel(std::int64_t n, std::int64_t k, const std::int32_t* units,
                                      std::int64_t units_ld, const float* values,
                                      std::int64_t values_ld, float* dense, std::int64_t dense_ld,
                                      std::int64_t r, unsigned long long* invalid) {
  for (std::int64_t t = thread_start(); t < n; t += thread_step()) {
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int64_t u = units[t * units_ld + j];
      if (checked_index(u, r, invalid)) dense[t * dense_ld + u] += values[t * values_ld + j];
    }
  }
}

// out[t][j] = dense[t][units[t][j]]; a unit outside [0, r) reads 0 (and is counted).
template <class T>
__global__ void gather_cols_kernel(std::int64_t n, std::int64_t k, const T* dense,
                                   std::int64_t dense_ld, std::int64_t r, const std::int32_t* units,
                                   std::int64_t units_ld, float* out, std::int64_t out_ld,
                                   unsigned long long* invalid) {
  for (std::int64_t i = thread_start(); i < n * k; i += thread_step()) {
    const std::int64_t t = i / k, j = i % k;
    const std::int64_t u = units[t * units_ld + j];
    out[t * out_ld + j] =
        checked_index(u, r, invalid) ? Element<T>::to_float(dense[t * dense_ld + u]) : 0.0f;
  }
}

// dst[i][c] = src[rows[i]][c]; a row outside [0, src_rows) gives 0 (and is counted).
template <class T>
__global__ void take_rows_kernel(std::int64_t m, std::int64_t cols, const T* src,
                                 std::int64_t src_ld, std::int64_t src_rows,
                                 const std::int32_t* rows, std::int64_t rows_ld, T* dst,
                                 std::int64_t dst_ld, unsigned long long* invalid) {
  for (std::int64_t e = thread_start(); e < m * cols; e += thread_step()) {
    const std::int64_t i = e / cols, c = e % cols;
    const std::int64_t r = rows[i * rows_ld];
    const bool ok = c == 0 ? checked_index(r, src_rows, invalid) : valid_unit_index(r, src_rows);
    dst[i * dst_ld + c] = ok ? src[r * src_ld + c] : Element<T>::from_float(0.0f);
  }
}

// dst[rows[i]][c] += src[i][c]: the rows are distinct, so no two threads write
// one element. A row outside [0, dst_rows) is skipped (and counted).
template <class T>
__global__ void add_rows_kernel(std::int64_t m, std::int64_t cols, const T* src,
                                std::int64_t src_ld, const std::int32_t* rows,
                                std::int64_t rows_ld, T* dst, std::int64_t dst_ld,
                                std::int64_t dst_rows, unsigned long long* invalid) {
  for (std::int64_t e = thread_start(); e < m * cols; e += thread_step()) {
    const std::int64_t i = e / cols, c = e % cols;
    const std::int64_t r = rows[i * rows_ld];
    const bool ok = c == 0 ? checked_index(r, dst_rows, invalid) : valid_unit_index(r, dst_rows);
    if (!ok) continue;
    T& d = dst[r * dst_ld + c];
    d = Element<T>::from_float(Element<T>::to_float(d) + Element<T>::to_float(src[i * src_ld + c]));
  }
}

// out[t][j] = table[units[t][j]]; a unit outside [0, t) gives -1 (and is counted),
// which the rank-unit kernels skip in turn.
static __global__ void remap_units_kernel(std::int64_t n, std::int64_t k,
                                          const std::int32_t* table, std::int64_t table_size,
                                          const std::int32_t* units, std::int64_t units_ld,
                                          std::int32_t* out, std::int64_t out_ld,
                                          unsigned long long* invalid) {
  for (std::int64_t i = thread_start(); i < n * k; i += thread_step()) {
    const std::int64_t t = i / k, j = i % k;
    const std::int64_t u = units[t * units_ld + j];
    out[t * out_ld + j] = checked_index(u, table_size, invalid) ? table[u] : -1;
  }
}

template <class T>
__global__ void scale_by_kernel(std::int64_t rows, std::int64_t cols, const float* factors,
                                std::int64_t f_ld, T* m, std::int64_t m_ld) {
  for (std::int64_t i = thread_start(); i < rows * cols; i += thread_step()) {
    const std::int64_t r = i / cols, c = i % cols;
    T& v = m[r * m_ld + c];
    v = Element<T>::from_float(Element<T>::to_float(v) * factors[r * f_ld + c]);
  }
}

// dst (rows x cols, To) = src converted element by element (exact from a
// narrower type to float; rounded to nearest the other way).
template <class From, class To>
__global__ void convert_kernel(std::int64_t rows, std::int64_t cols, const From* src,
                               std::int64_t src_ld, To* dst, std::int64_t dst_ld) {
  for (std::int64_t i = thread_start(); i < rows * cols; i += thread_step()) {
    const std::int64_t r = i / cols, c = i % cols;
    dst[r * dst_ld + c] = Element<To>::from_float(Element<From>::to_float(src[r * src_ld + c]));
  }
}

// One block, a fixed stride per thread and a fixed reduction tree: the same
// bits on every run (atomics would not be).
constexpr int kSumSquaresThreads = 1024;
static_assert(kSumSquaresThreads * sizeof(float) <= LaunchLimits::kMaxStaticSharedBytes,
              "sum_squares_kernel's partial sums fit in static shared memory");
template <class T>
__global__ void sum_squares_kernel(std::int64_t rows, std::int64_t cols, const T* m,
                                   std::int64_t ld, float* out) {
  __shared__ float partial[kSumSquaresThreads];
  float acc = 0.0f;
  for (std::int64_t e = StrideLoop::start(0, blockDim.x, threadIdx.x); e < rows * cols;
       e += StrideLoop::step(1, blockDim.x)) {
    const float v = Element<T>::to_float(m[(e / cols) * ld + e % cols]);
    acc += v * v;
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] += partial[0];
}

template <class T>
__global__ void adam_kernel(AdamStep step, std::int64_t rows, std::int64_t cols, T* param,
                            std::int64_t p_ld, const T* grad, std::int64_t g_ld, float* m,
                            std::int64_t m_ld, float* v, std::int64_t v_ld, const float* norm_sq) {
  const float clip = norm_sq == nullptr ? 1.0f : clip_factor<float>(step, norm_sq[0]);
  for (std::int64_t e = thread_start(); e < rows * cols; e += thread_step()) {
    const std::int64_t r = e / cols, c = e % cols;
    float p = Element<T>::to_float(param[r * p_ld + c]);
    adam_update<float>(step, clip, Element<T>::to_float(grad[r * g_ld + c]), p, m[r * m_ld + c],
                       v[r * v_ld + c]);
    param[r * p_ld + c] = Element<T>::from_float(p);
  }
}

}  // namespace cuda
}  // namespace detail
}  // namespace rankwise
