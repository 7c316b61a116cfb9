// The segment table of a multi-adapter batch and the launch geometry of the
// two kernels that serve it (detail/cuda/segment_kernels.cuh): one shrink
// and one expand launch per forward, whatever the adapters and their ranks
// (BGMV-style, no padding to a common rank). The index arithmetic is here, in
// host/device functions, so CPU tests drive the same maps the kernels use.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "rankwise/core/config.hpp"
#include "rankwise/core/error.hpp"
#include "rankwise/core/numeric.hpp"
#include "rankwise/core/tiling.hpp"

namespace rankwise {

/// One forward's routing: M positions, each a token row of x / y and the
/// rank units of that token's adapter. Every pointer is in backend (device)
/// memory; the scalars are read on the host to size the launches, so the
/// table is built (and uploaded) once per plan and a forward only launches.
/// Tokens of positions with a rank must be distinct: each row of y is then
/// written by one position, with no atomics and the same bits on every run.
/// A position of rank 0 reads and writes nothing in either kernel.
struct SegmentTable {
  std::int64_t positions = 0;                  // M routed tokens
  std::int64_t max_rank = 0;                   // largest rank among them
  const std::int32_t* token = nullptr;         // (M) row of x / y of position p
  const std::int32_t* rank = nullptr;          // (M) rank r_p of position p's adapter
  const std::int32_t* unit_offset = nullptr;   // (M) where its adapter's unit list starts in `units`
  const std::int32_t* units = nullptr;         // flat lists of pool unit indices (row of a / bt)
  const float* scale = nullptr;                // (M) its adapter's scale
  const std::int64_t* h_offset = nullptr;      // (M) start of position p's r_p values in h
  std::int64_t h_size = 0;                     // Σ r_p
};

/// Where entry j of position p's unit list is in table.units.
RANKWISE_HOST_DEVICE inline std::int64_t segment_unit_slot(const SegmentTable& t, std::int64_t p,
                                                           std::int64_t j) {
  return std::int64_t(t.unit_offset[p]) + j;
}

/// Where position p's j-th shrink result is in h.
RANKWISE_HOST_DEVICE inline std::int64_t segment_h_index(const SegmentTable& t, std::int64_t p,
                                                         std::int64_t j) {
  return t.h_offset[p] + j;
}

/// Both kernels' blocks stride over positions in x (one position per block
/// while M <= 2^31 - 1) and over their chunks or column tiles in y (capped at
/// 65535): a bijection for any grid, as StrideLoop with one item per block.
struct SegmentStride {
  RANKWISE_HOST_DEVICE static constexpr std::int64_t first(std::int64_t block) {
    return StrideLoop::start(block, 1, 0);
  }
  RANKWISE_HOST_DEVICE static constexpr std::int64_t step(std::int64_t grid) {
    return StrideLoop::step(grid, 1);
  }
};

/// Shrink, h[h_offset[p] + j] = a[unit_j] · x[token[p]]: block (x, y)
/// handles chunk y of position x's units, one unit row per warp, so each
/// warp reads its row of a with consecutive lanes on consecutive columns. The
/// token's x row is staged in shared memory as float, kXTile columns per
/// pass, and read by every warp of the block. The grid's y is sized by
/// max_rank; a position of smaller rank leaves its blocks beyond its own
/// chunks idle (no padding of a or h), and one of larger rank is still
/// covered by the y stride.
struct SegmentShrinkTiling {
  static constexpr int kWarpSize = 32;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr std::int64_t kUnitsPerChunk = kWarps;
  static constexpr std::int64_t kXTile = 1024;

  std::int64_t positions = 0;
  std::int64_t max_rank = 0;
  std::int64_t d_in = 0;

  /// Nothing to compute: the launcher skips the launch (a zero grid is an error).
  RANKWISE_HOST_DEVICE constexpr bool empty() const { return positions <= 0 || max_rank <= 0; }
  RANKWISE_HOST_DEVICE static constexpr std::int64_t chunks(std::int64_t rank) {
    return rank <= 0 ? 0 : ceil_div(rank, kUnitsPerChunk);
  }
  RANKWISE_HOST_DEVICE constexpr GridSize grid() const {
    return {min_i64(positions, LaunchLimits::kMaxGridX),
            min_i64(chunks(max_rank), LaunchLimits::kMaxGridYZ), 1};
  }
  /// The entry of the position's unit list that warp `warp` handles in `chunk`.
  RANKWISE_HOST_DEVICE static constexpr std::int64_t unit(std::int64_t chunk, std::int64_t warp) {
    return chunk * kUnitsPerChunk + warp;
  }
  RANKWISE_HOST_DEVICE constexpr std::int64_t x_tiles() const {
    return d_in <= 0 ? 0 : ceil_div(d_in, kXTile);
  }
  RANKWISE_HOST_DEVICE static constexpr std::int64_t tile_begin(std::int64_t tile) {
    return tile * kXTile;
  }
  RANKWISE_HOST_DEVICE constexpr std::int64_t tile_length(std::int64_t tile) const {
    return min_i64(kXTile, d_in - tile_begin(tile));
  }
  /// Dynamic shared memory per block: one x tile of floats.
  RANKWISE_HOST_DEVICE constexpr std::int64_t shared_bytes() const {
    return (d_in <= 0 ? 0 : min_i64(d_in, kXTile)) * std::int64_t(sizeof(float));
  }
};

/// Expand, y[token[p]][c] += scale[p] Σ_j h[h_offset[p] + j] bt[unit_j][c]:
/// block (x, y) handles column tile y of position x's row, one column per
/// thread, so each row of bt is read with consecutive threads on consecutive
/// columns. The position's h values and unit indices are staged in shared
/// memory, stage_units() at a time (all of them when max_rank <= kStageUnits),
/// so the inner loop reads no index from global memory. Each (position,
/// column) is written by one thread: no atomics.
struct SegmentExpandTiling {
  static constexpr int kThreads = 256;
  static constexpr std::int64_t kTileCols = kThreads;
  static constexpr std::int64_t kStageUnits = 1024;

  std::int64_t positions = 0;
  std::int64_t max_rank = 0;
  std::int64_t d_out = 0;

  RANKWISE_HOST_DEVICE constexpr bool empty() const {
    return positions <= 0 || max_rank <= 0 || d_out <= 0;
  }
  RANKWISE_HOST_DEVICE constexpr std::int64_t tiles() const {
    return d_out <= 0 ? 0 : ceil_div(d_out, kTileCols);
  }
  RANKWISE_HOST_DEVICE constexpr GridSize grid() const {
    return {min_i64(positions, LaunchLimits::kMaxGridX), min_i64(tiles(), LaunchLimits::kMaxGridYZ),
            1};
  }
  RANKWISE_HOST_DEVICE static constexpr std::int64_t col(std::int64_t tile, std::int64_t thread) {
    return tile * kTileCols + thread;
  }
  /// Units staged per pass: at least one, so a table whose max_rank
  /// understates a rank still makes progress.
  RANKWISE_HOST_DEVICE constexpr std::int64_t stage_units() const {
    return max_rank <= 1 ? 1 : min_i64(max_rank, kStageUnits);
  }
  /// Units in the pass starting at `base` of a position of rank `rank`.
  RANKWISE_HOST_DEVICE static constexpr std::int64_t stage_length(std::int64_t base,
                                                                  std::int64_t rank,
                                                                  std::int64_t stage) {
    return min_i64(stage, rank - base);
  }
  /// An invalid unit is counted by the block on the position's first column
  /// tile only: once per (position, entry), whatever the grid.
  RANKWISE_HOST_DEVICE static constexpr bool counts_invalid(std::int64_t tile) { return tile == 0; }
  /// Dynamic shared memory per block: stage_units() h values and unit indices.
  RANKWISE_HOST_DEVICE constexpr std::int64_t shared_bytes() const {
    return stage_units() * std::int64_t(sizeof(float) + sizeof(std::int32_t));
  }
};

static_assert(SegmentShrinkTiling::kXTile * std::int64_t(sizeof(float)) <=
                  LaunchLimits::kMaxStaticSharedBytes,
              "the shrink's x tile needs no opt-in for dynamic shared memory");
static_assert(SegmentExpandTiling::kStageUnits * std::int64_t(sizeof(float) + sizeof(std::int32_t)) <=
                  LaunchLimits::kMaxStaticSharedBytes,
              "the expand's stage needs no opt-in for dynamic shared memory");

/// One routed token, as a plan knows it: its row, its adapter's rank, which
/// of the unit lists is its adapter's, and the adapter's scale.
struct SegmentPosition {
  std::int32_t token = 0;
  std::int32_t rank = 0;
  std::int32_t list = 0;
  float scale = 1.0f;
};

/// The host arrays of a SegmentTable. Uploading each array and pointing a
/// SegmentTable (with the same scalars) at the copies gives the device table.
struct SegmentTableHost {
  std::int64_t positions = 0;
  std::int64_t max_rank = 0;
  std::int64_t h_size = 0;
  std::vector<std::int32_t> token, rank, unit_offset, units;
  std::vector<float> scale;
  std::vector<std::int64_t> h_offset;

  /// The table over these host arrays, for CPU emulation of the kernels.
  SegmentTable host_view() const {
    SegmentTable t;
    t.positions = positions;
    t.max_rank = max_rank;
    t.token = token.data();
    t.rank = rank.data();
    t.unit_offset = unit_offset.data();
    t.units = units.data();
    t.scale = scale.data();
    t.h_offset = h_offset.data();
    t.h_size = h_size;
    return t;
  }
};

/// Builds the host arrays from the adapters' unit lists (pool unit indices,
/// stored once each, in order) and the positions. A position's rank is at
/// most its list's length (it uses the first `rank` entries). Unit values are
/// not checked here: the kernels skip and count those outside the pool.
inline SegmentTableHost build_segment_table(const std::vector<std::vector<std::int32_t>>& lists,
                                            const std::vector<SegmentPosition>& positions) {
  constexpr const char* fn = "build_segment_table";
  SegmentTableHost out;
  std::vector<std::int32_t> list_offset(lists.size());
  std::size_t total = 0;
  for (std::size_t l = 0; l < lists.size(); ++l) {
    RANKWISE_CHECK(total + lists[l].size() <=
                       static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()),
                   fn, ": the unit lists hold more than 2^31 - 1 entries (int32 offsets)");
    list_offset[l] = static_cast<std::int32_t>(total);
    total += lists[l].size();
  }
  out.units.reserve(total);
  for (const std::vector<std::int32_t>& list : lists) {
    out.units.insert(out.units.end(), list.begin(), list.end());
  }
  const std::size_t m = positions.size();
  out.token.resize(m);
  out.rank.resize(m);
  out.unit_offset.resize(m);
  out.scale.resize(m);
  out.h_offset.resize(m);
  for (std::size_t p = 0; p < m; ++p) {
    const SegmentPosition& pos = positions[p];
    RANKWISE_CHECK(pos.token >= 0, fn, ": position ", p, " has token ", pos.token);
    RANKWISE_CHECK(pos.list >= 0 && static_cast<std::size_t>(pos.list) < lists.size(), fn,
                   ": position ", p, " names unit list ", pos.list, " of ", lists.size());
    const std::size_t length = lists[static_cast<std::size_t>(pos.list)].size();
    RANKWISE_CHECK(pos.rank >= 0 && static_cast<std::size_t>(pos.rank) <= length, fn,
                   ": position ", p, " has rank ", pos.rank, " but its unit list holds ", length);
    out.token[p] = pos.token;
    out.rank[p] = pos.rank;
    out.unit_offset[p] = list_offset[static_cast<std::size_t>(pos.list)];
    out.scale[p] = pos.scale;
    out.h_offset[p] = out.h_size;
    out.h_size += pos.rank;
    out.max_rank = std::max<std::int64_t>(out.max_rank, pos.rank);
  }
  // Distinct tokens are what lets the expand write rows without atomics. A
  // position of rank 0 writes nothing, so it may repeat a token: padding a
  // table to a fixed size (for a captured graph) needs no spare rows.
  std::vector<std::int32_t> sorted;
  for (std::size_t p = 0; p < m; ++p) {
    if (out.rank[p] > 0) sorted.push_back(out.token[p]);
  }
  std::sort(sorted.begin(), sorted.end());
  const auto twice = std::adjacent_find(sorted.begin(), sorted.end());
  RANKWISE_CHECK(twice == sorted.end(), fn, ": token ", twice == sorted.end() ? 0 : *twice,
                 " appears at more than one position");
  out.positions = static_cast<std::int64_t>(m);
  return out;
}

}  // namespace rankwise
