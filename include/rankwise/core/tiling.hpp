// Tile arithmetic for GPU kernels, kept in host/device functions so CPU tests
// check the index maps the kernels use.
#pragma once

#include <cstdint>

#include "rankwise/core/config.hpp"
#include "rankwise/core/numeric.hpp"

namespace rankwise {

/// Square tiles over a (rows x cols) destination for an out-of-place transpose.
/// Block (bx, by) covers rows [tile_row(by), +kTile) and cols [tile_col(bx), +kTile).
struct TransposeTiling {
  static constexpr int kTile = 32;
  static constexpr int kRowsPerPass = 8;  // threads per block: kTile x kRowsPerPass
  std::int64_t rows;
  std::int64_t cols;

  RANKWISE_HOST_DEVICE std::int64_t tiles_down() const { return ceil_div(rows, kTile); }
  RANKWISE_HOST_DEVICE std::int64_t tiles_across() const { return ceil_div(cols, kTile); }
  RANKWISE_HOST_DEVICE std::int64_t tile_row(std::int64_t by) const { return by * kTile; }
  RANKWISE_HOST_DEVICE std::int64_t tile_col(std::int64_t bx) const { return bx * kTile; }
};

}  // namespace rankwise
