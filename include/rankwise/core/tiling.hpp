// Launch geometry and index arithmetic of the GPU kernels, kept in host/device
// functions so CPU tests check the grids and index maps the kernels use at the
// hardware limits.
#pragma once

#include <cstdint>

#include "rankwise/core/config.hpp"
#include "rankwise/core/numeric.hpp"

namespace rankwise {

/// CUDA's launch limits (every compute capability from 3.0 through 9.x).
struct LaunchLimits {
  static constexpr std::int64_t kMaxGridX = 2147483647;  // 2^31 - 1 blocks
  static constexpr std::int64_t kMaxGridYZ = 65535;
  static constexpr std::int64_t kMaxBlockThreads = 1024;
  /// Static __shared__ per block; more needs an opt-in dynamic allocation.
  static constexpr std::int64_t kMaxStaticSharedBytes = 48 * 1024;
  /// Cap of every grid dimension that a kernel strides over: within every
  /// limit, and 65535 blocks of 256 threads still fill any current GPU.
  static constexpr std::int64_t kStrideBlocks = 65535;
};

RANKWISE_HOST_DEVICE constexpr std::int64_t min_i64(std::int64_t a, std::int64_t b) {
  return a < b ? a : b;
}

/// A grid's size, computed in int64 so that nothing wraps before it is checked
/// and narrowed to a dim3.
struct GridSize {
  std::int64_t x = 1;
  std::int64_t y = 1;
  std::int64_t z = 1;

  RANKWISE_HOST_DEVICE constexpr bool within_limits() const {
    return x >= 1 && x <= LaunchLimits::kMaxGridX && y >= 1 && y <= LaunchLimits::kMaxGridYZ &&
           z >= 1 && z <= LaunchLimits::kMaxGridYZ;
  }
};

/// A grid-stride loop over `items` work items, `per_block` of them per block
/// per pass (threads, or warps for one-warp-per-item kernels). Lane `lane` of
/// block `block` in a grid of `grid` blocks handles items start(), start() +
/// step(), ...: a bijection between (pass, block, lane) and items, so every
/// item is handled exactly once whatever the grid.
struct StrideLoop {
  std::int64_t items;
  std::int64_t per_block;

  /// Blocks to launch: one item per lane while that fits under the cap, then
  /// several passes. 0 when there is nothing to do (callers skip the launch).
  RANKWISE_HOST_DEVICE constexpr std::int64_t blocks() const {
    return items <= 0 ? 0 : min_i64(ceil_div(items, per_block), LaunchLimits::kStrideBlocks);
  }
  RANKWISE_HOST_DEVICE constexpr GridSize grid() const { return {blocks(), 1, 1}; }

  RANKWISE_HOST_DEVICE static constexpr std::int64_t start(std::int64_t block,
                                                           std::int64_t per_block,
                                                           std::int64_t lane) {
    return block * per_block + lane;
  }
  RANKWISE_HOST_DEVICE static constexpr std::int64_t step(std::int64_t grid,
                                                          std::int64_t per_block) {
    return grid * per_block;
  }
  /// Passes lane (block, lane) makes: how many of start, start + step, ... are < items.
  RANKWISE_HOST_DEVICE constexpr std::int64_t passes(std::int64_t grid, std::int64_t block,
                                                     std::int64_t lane) const {
    const std::int64_t first = start(block, per_block, lane);
    return first >= items ? 0 : ceil_div(items - first, step(grid, per_block));
  }
};

/// One thread per item with no stride loop (each thread returns past the
/// end): the grid must hold every item in x. fits() is false beyond
/// 2^31 - 1 blocks (5.5e11 items at 256 threads, more indices than any
/// device's memory holds); the host checks it before launching.
struct ItemGrid {
  std::int64_t items;
  std::int64_t per_block;

  RANKWISE_HOST_DEVICE constexpr std::int64_t blocks() const {
    return items <= 0 ? 0 : ceil_div(items, per_block);
  }
  RANKWISE_HOST_DEVICE constexpr bool fits() const { return blocks() <= LaunchLimits::kMaxGridX; }
  RANKWISE_HOST_DEVICE constexpr GridSize grid() const { return {blocks(), 1, 1}; }
};

/// Rows by column tiles (scatter_axpy): block (bx, by) handles rows by,
/// by + grid.y, ... and, in each, column tiles bx, bx + grid.x, ...; tile t
/// covers columns [t * tile_cols, +tile_cols), one per thread. Both
/// dimensions are capped, so any number of rows and columns launches.
struct RowTileGrid {
  std::int64_t rows;
  std::int64_t cols;
  std::int64_t tile_cols;  // threads per block

  RANKWISE_HOST_DEVICE constexpr std::int64_t tiles() const { return ceil_div(cols, tile_cols); }
  RANKWISE_HOST_DEVICE constexpr GridSize grid() const {
    return {min_i64(tiles(), LaunchLimits::kStrideBlocks), min_i64(rows, LaunchLimits::kMaxGridYZ),
            1};
  }
  RANKWISE_HOST_DEVICE constexpr std::int64_t col(std::int64_t tile, std::int64_t lane) const {
    return tile * tile_cols + lane;
  }
};

/// Square tiles over a (rows x cols) destination for an out-of-place transpose.
/// Block (bx, by) covers rows [tile_row(by), +kTile) and cols [tile_col(bx), +kTile),
/// striding by the grid over further tiles in both directions.
struct TransposeTiling {
  static constexpr int kTile = 32;
  static constexpr int kRowsPerPass = 8;  // threads per block: kTile x kRowsPerPass
  std::int64_t rows;
  std::int64_t cols;

  RANKWISE_HOST_DEVICE std::int64_t tiles_down() const { return ceil_div(rows, kTile); }
  RANKWISE_HOST_DEVICE std::int64_t tiles_across() const { return ceil_div(cols, kTile); }
  RANKWISE_HOST_DEVICE std::int64_t tile_row(std::int64_t by) const { return by * kTile; }
  RANKWISE_HOST_DEVICE std::int64_t tile_col(std::int64_t bx) const { return bx * kTile; }
  RANKWISE_HOST_DEVICE GridSize grid() const {
    return {min_i64(tiles_across(), LaunchLimits::kStrideBlocks),
            min_i64(tiles_down(), LaunchLimits::kMaxGridYZ), 1};
  }
};

}  // namespace rankwise
