// Multi-adapter serving kernels over a SegmentTable (core/segment_table.hpp):
// one shrink launch, h = A_p x_p for every routed position, and one expand
// launch, y_p += scale_p B_p h_p, whatever the adapters in the batch and
// their ranks. Each launch only reads the table: no host synchronisation, no
// allocation, so a forward can be captured into a CUDA graph. Storage T is
// float, __half or __nv_bfloat16; products accumulate in fp32, h is fp32, y is
// rounded to T once.
#pragma once

#if !defined(__CUDACC__)
#error \
    "rankwise/detail/cuda/segment_kernels.cuh holds device code: include it from a .cu file compiled by nvcc"
#endif

#include <cuda_runtime.h>

#include <cstdint>

#include "rankwise/backend/cuda/check.hpp"
#include "rankwise/core/error.hpp"
#include "rankwise/core/segment_table.hpp"
#include "rankwise/core/tiling.hpp"
#include "rankwise/core/unit_index.hpp"
#include "rankwise/detail/cuda/element.cuh"
#include "rankwise/detail/cuda/rank_unit_kernels.cuh"

namespace rankwise {
namespace detail {
namespace cuda {

static_assert(SegmentShrinkTiling::kWarpSize == kWarp, "the shrink's warps are hardware warps");

// Block (x, y): position x, chunk y of its units (SegmentShrinkTiling), both
// grid-strided. The chunk loop's bounds depend on the position only, so every
// thread of a block reaches the same __syncthreads; warps whose unit is past
// the position's rank still stage x for the others. A unit outside
// [0, num_units) gives h = 0 and is counted once, by its warp's lane 0.
template <class T>
__global__ void __launch_bounds__(SegmentShrinkTiling::kThreads)
    segment_shrink_kernel(SegmentTable table, const T* x, std::int64_t x_ld, const T* a,
                          std::int64_t a_ld, std::int64_t d_in, float* h, std::int64_t num_units,
                          unsigned long long* invalid) {
  extern __shared__ float segment_x_tile[];
  using Tiling = SegmentShrinkTiling;
  const Tiling tiling{table.positions, table.max_rank, d_in};
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (std::int64_t p = SegmentStride::first(blockIdx.x); p < table.positions;
       p += SegmentStride::step(gridDim.x)) {
    const std::int64_t rank = table.rank[p];
    const T* xr = x + std::int64_t(table.token[p]) * x_ld;
    for (std::int64_t chunk = SegmentStride::first(blockIdx.y); chunk < Tiling::chunks(rank);
         chunk += SegmentStride::step(gridDim.y)) {
      const std::int64_t j = Tiling::unit(chunk, warp);
      const bool mine = j < rank;
      const std::int64_t u = mine ? table.units[segment_unit_slot(table, p, j)] : -1;
      const bool ok = mine && valid_unit_index(u, num_units);
      if (mine && !ok && lane == 0) atomicAdd(invalid, 1ull);
      const T* ar = a + (ok ? u : 0) * a_ld;
      float acc = 0.0f;
      for (std::int64_t t = 0; t < tiling.x_tiles(); ++t) {
        const std::int64_t begin = Tiling::tile_begin(t), length = tiling.tile_length(t);
        __syncthreads();  // the previous tile is no longer read
        for (std::int64_t i = threadIdx.x; i < length; i += blockDim.x) {
          segment_x_tile[i] = Element<T>::to_float(xr[begin + i]);
        }
        __syncthreads();
        if (ok) {
          // Unrolled so several loads of the row are in flight per lane.
#pragma unroll 4
          for (std::int64_t i = lane; i < length; i += kWarp) {
            acc += Element<T>::to_float(ar[begin + i]) * segment_x_tile[i];
          }
        }
      }
      acc = warp_sum(acc);  // every lane of the warp takes part, mine or not
      if (mine && lane == 0) h[segment_h_index(table, p, j)] = acc;
    }
  }
}

// Block (x, y): position x, column tile y of its row (SegmentExpandTiling),
// both grid-strided. The position's h values and checked unit indices go
// through shared memory a stage at a time; an invalid unit is staged as -1,
// skipped (its term is not added, so nothing of another row leaks in), and
// counted by the thread that staged it on column tile 0 only.
template <class T>
__global__ void __launch_bounds__(SegmentExpandTiling::kThreads)
    segment_expand_kernel(SegmentTable table, const float* h, const T* bt, std::int64_t bt_ld,
                          std::int64_t d_out, T* y, std::int64_t y_ld, std::int64_t num_units,
                          unsigned long long* invalid) {
  extern __shared__ float segment_h_stage[];
  using Tiling = SegmentExpandTiling;
  const Tiling tiling{table.positions, table.max_rank, d_out};
  const std::int64_t stage = tiling.stage_units();
  float* hs = segment_h_stage;
  std::int32_t* us = reinterpret_cast<std::int32_t*>(segment_h_stage + stage);
  for (std::int64_t p = SegmentStride::first(blockIdx.x); p < table.positions;
       p += SegmentStride::step(gridDim.x)) {
    const std::int64_t rank = table.rank[p];
    if (rank <= 0) continue;  // block-uniform: nothing to add to the row
    const float scale = table.scale[p];
    T* yr = y + std::int64_t(table.token[p]) * y_ld;
    for (std::int64_t tile = SegmentStride::first(blockIdx.y); tile < tiling.tiles();
         tile += SegmentStride::step(gridDim.y)) {
      const std::int64_t c = Tiling::col(tile, threadIdx.x);
      float acc = 0.0f;
      for (std::int64_t base = 0; base < rank; base += stage) {
        const std::int64_t length = Tiling::stage_length(base, rank, stage);
        __syncthreads();  // the previous stage is no longer read
        int stage_invalid = 0;
        for (std::int64_t s = threadIdx.x; s < length; s += blockDim.x) {
          const std::int32_t u = table.units[segment_unit_slot(table, p, base + s)];
          const bool ok = valid_unit_index(u, num_units);
          if (!ok && Tiling::counts_invalid(tile)) atomicAdd(invalid, 1ull);
          stage_invalid |= ok ? 0 : 1;
          us[s] = ok ? u : -1;
          hs[s] = h[segment_h_index(table, p, base + s)];
        }
        // One flag for the block: the usual all-valid stage takes a loop
        // without a branch per unit, so its unrolled loads stay in flight
        // together. Both loops add the valid units in the same order.
        const bool all_valid = __syncthreads_or(stage_invalid) == 0;
        if (c < d_out && all_valid) {
#pragma unroll 4
          for (std::int64_t s = 0; s < length; ++s) {
            acc += hs[s] * Element<T>::to_float(bt[std::int64_t(us[s]) * bt_ld + c]);
          }
        } else if (c < d_out) {
          for (std::int64_t s = 0; s < length; ++s) {
            const std::int32_t u = us[s];
            if (u >= 0) acc += hs[s] * Element<T>::to_float(bt[std::int64_t(u) * bt_ld + c]);
          }
        }
      }
      if (c < d_out) yr[c] = Element<T>::from_float(Element<T>::to_float(yr[c]) + scale * acc);
    }
  }
}

// A grid computed in int64 becomes a dim3 only once it is within CUDA's limits.
inline dim3 segment_dim3(const GridSize& g, const char* kernel) {
  RANKWISE_CHECK(g.within_limits(), kernel, ": grid (", g.x, ", ", g.y, ", ", g.z,
                 ") is outside CUDA's limits (x <= 2^31 - 1, y, z <= 65535)");
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
}

inline void check_segment_table(const char* fn, const SegmentTable& t) {
  RANKWISE_CHECK(t.token != nullptr && t.rank != nullptr && t.unit_offset != nullptr &&
                     t.units != nullptr && t.scale != nullptr && t.h_offset != nullptr,
                 fn, ": the segment table of ", t.positions, " positions has a null array");
  RANKWISE_CHECK(t.h_size >= 0, fn, ": the segment table's h_size is ", t.h_size);
}

/// h[h_offset[p] + j] = Σ_i a[units[unit_offset[p] + j]][i] x[token[p]][i]
/// for every position p and j < rank[p]: one launch, nothing when the table
/// is empty. h (table.h_size floats) is overwritten. Units outside
/// [0, num_units) give h = 0 and are counted in *invalid (the context's
/// device_errors()). Tokens are rows of x and are not checked.
template <class T>
void segment_shrink(cudaStream_t stream, const SegmentTable& table, const T* x, std::int64_t x_ld,
                    const T* a, std::int64_t a_ld, std::int64_t d_in, float* h,
                    std::int64_t num_units, unsigned long long* invalid) {
  constexpr const char* fn = "segment_shrink";
  const SegmentShrinkTiling tiling{table.positions, table.max_rank, d_in};
  if (tiling.empty()) return;
  check_segment_table(fn, table);
  RANKWISE_CHECK(d_in >= 0 && x_ld >= d_in && a_ld >= d_in, fn, ": d_in ", d_in, ", x_ld ", x_ld,
                 ", a_ld ", a_ld, " (each ld must be at least d_in)");
  RANKWISE_CHECK(d_in == 0 || (x != nullptr && a != nullptr), fn, ": x or a is null");
  RANKWISE_CHECK(h != nullptr && invalid != nullptr && num_units >= 0, fn,
                 ": h or the error counter is null, or num_units (", num_units, ") is negative");
  const dim3 grid = segment_dim3(tiling.grid(), fn);
  segment_shrink_kernel<T>
      <<<grid, SegmentShrinkTiling::kThreads, static_cast<std::size_t>(tiling.shared_bytes()),
         stream>>>(table, x, x_ld, a, a_ld, d_in, h, num_units, invalid);
  RANKWISE_CUDA_LAUNCH_CHECK();
}

/// y[token[p]][c] += scale[p] Σ_j h[h_offset[p] + j] bt[units[unit_offset[p] + j]][c]
/// for c < d_out: one launch, nothing when the table or d_out is empty. Each
/// token's row is written by its one position (tokens are distinct), rounded
/// to T once. Units outside [0, num_units) are skipped and counted in *invalid.
template <class T>
void segment_expand(cudaStream_t stream, const SegmentTable& table, const float* h, const T* bt,
                    std::int64_t bt_ld, std::int64_t d_out, T* y, std::int64_t y_ld,
                    std::int64_t num_units, unsigned long long* invalid) {
  constexpr const char* fn = "segment_expand";
  const SegmentExpandTiling tiling{table.positions, table.max_rank, d_out};
  if (tiling.empty()) return;
  check_segment_table(fn, table);
  RANKWISE_CHECK(bt_ld >= d_out && y_ld >= d_out, fn, ": d_out ", d_out, ", bt_ld ", bt_ld,
                 ", y_ld ", y_ld, " (each ld must be at least d_out)");
  RANKWISE_CHECK(h != nullptr && bt != nullptr && y != nullptr, fn, ": h, bt or y is null");
  RANKWISE_CHECK(invalid != nullptr && num_units >= 0, fn,
                 ": the error counter is null, or num_units (", num_units, ") is negative");
  const dim3 grid = segment_dim3(tiling.grid(), fn);
  segment_expand_kernel<T>
      <<<grid, SegmentExpandTiling::kThreads, static_cast<std::size_t>(tiling.shared_bytes()),
         stream>>>(table, h, bt, bt_ld, d_out, y, y_ld, num_units, invalid);
  RANKWISE_CUDA_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace detail
}  // namespace rankwise
