// The CUDA backend's host-side arithmetic and logic, tested without a device:
// the launch geometry and index maps of every kernel (core/tiling.hpp) at
// CUDA's grid limits, and the guard that holds a borrowed cuBLAS handle's
// settings for one call (backend/cuda/blas_state.hpp). Small sizes are
// enumerated; large ones are checked arithmetically.
#include <catch2/catch.hpp>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "rankwise/backend/cuda/blas_state.hpp"
#include "rankwise/core/tiling.hpp"

using rankwise::GridSize;
using rankwise::ItemGrid;
using rankwise::LaunchLimits;
using rankwise::RowTileGrid;
using rankwise::StrideLoop;
using rankwise::TransposeTiling;

namespace {

constexpr std::int64_t kTwo31 = std::int64_t(1) << 31;

// Every (pass, block, lane) of a launch of `loop` enumerated: each item must be
// handled exactly once.
void check_stride_loop_enumerated(const StrideLoop& loop) {
  const std::int64_t grid = loop.blocks();
  std::vector<int> hits(static_cast<std::size_t>(loop.items), 0);
  std::int64_t out_of_range = 0, passes = 0, wrong_passes = 0;
  for (std::int64_t b = 0; b < grid; ++b) {
    for (std::int64_t lane = 0; lane < loop.per_block; ++lane) {
      std::int64_t mine = 0;
      for (std::int64_t i = StrideLoop::start(b, loop.per_block, lane); i < loop.items;
           i += StrideLoop::step(grid, loop.per_block)) {
        if (i < 0)
          ++out_of_range;
        else
          ++hits[static_cast<std::size_t>(i)];
        ++mine;
      }
      wrong_passes += mine == loop.passes(grid, b, lane) ? 0 : 1;
      passes += mine;
    }
  }
  CHECK(out_of_range == 0);
  CHECK(wrong_passes == 0);
  std::int64_t wrong = 0;
  for (int h : hits) wrong += h == 1 ? 0 : 1;
  CHECK(wrong == 0);
  CHECK(passes == loop.items);
}

// The same without enumerating: (block, lane) -> start is a bijection onto
// [0, L) with L = grid * per_block and step = L, so item i belongs to lane
// i mod L at pass i div L and to no other. What remains to check is that the
// grid launches, that the map is that bijection, and that the last item is
// reached without overflow.
void check_stride_loop_arithmetic(const StrideLoop& loop) {
  const std::int64_t grid = loop.blocks();
  REQUIRE(grid >= 1);
  CHECK(grid <= LaunchLimits::kStrideBlocks);
  CHECK(loop.grid().within_limits());
  const std::int64_t lanes = grid * loop.per_block;
  CHECK(StrideLoop::step(grid, loop.per_block) == lanes);
  CHECK(StrideLoop::start(0, loop.per_block, 0) == 0);
  CHECK(StrideLoop::start(grid - 1, loop.per_block, loop.per_block - 1) == lanes - 1);
  for (std::int64_t b : {std::int64_t(0), grid / 2, grid - 2}) {
    if (b < 0 || b + 1 >= grid) continue;
    CHECK(StrideLoop::start(b, loop.per_block, loop.per_block - 1) + 1 ==
          StrideLoop::start(b + 1, loop.per_block, 0));
  }
  // Lanes below r = items mod L make q + 1 passes, the others q: r (q + 1) +
  // (L - r) q = items.
  const std::int64_t q = loop.items / lanes, r = loop.items % lanes;
  auto passes_of = [&](std::int64_t lane_index) {
    return loop.passes(grid, lane_index / loop.per_block, lane_index % loop.per_block);
  };
  CHECK(passes_of(0) == (r > 0 ? q + 1 : q));
  CHECK(passes_of(lanes - 1) == q);
  if (r > 0) {
    CHECK(passes_of(r - 1) == q + 1);
    if (r < lanes) CHECK(passes_of(r) == q);
  }
  CHECK(r * (q + 1) + (lanes - r) * q == loop.items);
  const std::int64_t last = loop.items - 1;
  CHECK(passes_of(last % lanes) == last / lanes + 1);
  // The loop variable's last value (one step past the end) stays far from overflow.
  CHECK(last + lanes < (std::int64_t(1) << 62));
}

}  // namespace

TEST_CASE("GridSize: CUDA's grid limits", "[tiling]") {
  CHECK(GridSize{1, 1, 1}.within_limits());
  CHECK(GridSize{LaunchLimits::kMaxGridX, 65535, 65535}.within_limits());
  CHECK_FALSE(GridSize{LaunchLimits::kMaxGridX + 1, 1, 1}.within_limits());
  CHECK_FALSE(GridSize{1, 65536, 1}.within_limits());  // scatter_axpy's old grid.y = out.rows
  CHECK_FALSE(GridSize{1, 1, 65536}.within_limits());
  CHECK_FALSE(GridSize{0, 1, 1}.within_limits());  // an empty launch is an error
  CHECK_FALSE(GridSize{std::int64_t(1) << 32, 1, 1}.within_limits());  // would wrap to 0
}

TEST_CASE("StrideLoop: every item exactly once, enumerated", "[tiling]") {
  // per_block 256: one thread per item; 8: one warp per item (gather_dot); 1:
  // one block per item (gather_axpy's tokens).
  for (const std::int64_t per_block : {256, 8, 1}) {
    for (const std::int64_t items :
         {std::int64_t(1), std::int64_t(7), std::int64_t(255), std::int64_t(256), std::int64_t(257),
          std::int64_t(65535), std::int64_t(65536), std::int64_t(70001), 65535 * per_block,
          65535 * per_block + 1, 3 * 65535 * per_block + 17}) {
      INFO("items " << items << ", per block " << per_block);
      const StrideLoop loop{items, per_block};
      CHECK(loop.blocks() == std::min<std::int64_t>((items + per_block - 1) / per_block, 65535));
      check_stride_loop_enumerated(loop);
    }
  }
  CHECK(StrideLoop{0, 256}.blocks() == 0);
}

TEST_CASE("StrideLoop: coverage at and beyond the grid limits, arithmetically", "[tiling]") {
  // 10^7 rows; n · k near 2^31 (65536 tokens x 32768 slots = 2^31, and either
  // side of it); a gather_dot over 2^31 pairs with a warp each; elements of a
  // 10^5 x 10^5 fill; 10^12.
  const std::vector<std::int64_t> sizes = {65535,
                                           65536,
                                           10000000,
                                           kTwo31 - 1,
                                           kTwo31,
                                           kTwo31 + 1,
                                           65536 * std::int64_t(32768),
                                           std::int64_t(100000) * 100000,
                                           std::int64_t(1000000000000)};
  for (const std::int64_t per_block : {256, 8, 1}) {
    for (const std::int64_t items : sizes) {
      INFO("items " << items << ", per block " << per_block);
      check_stride_loop_arithmetic(StrideLoop{items, per_block});
    }
  }
  // Narrowing the block count never wraps: 2^32 blocks' worth of items still
  // launches 65535 blocks.
  CHECK(StrideLoop{(std::int64_t(1) << 32) * 256, 256}.blocks() == 65535);
}

TEST_CASE("ItemGrid: one thread per item fits while the grid can hold it", "[tiling]") {
  CHECK(ItemGrid{10000000, 256}.blocks() == 39063);
  CHECK(ItemGrid{10000000, 256}.fits());
  CHECK(ItemGrid{10000000, 256}.grid().within_limits());
  CHECK(ItemGrid{1, 256}.blocks() == 1);
  CHECK(ItemGrid{0, 256}.blocks() == 0);
  const std::int64_t most = LaunchLimits::kMaxGridX * 256;
  CHECK(ItemGrid{most, 256}.fits());
  CHECK(ItemGrid{most, 256}.blocks() == LaunchLimits::kMaxGridX);
  CHECK_FALSE(ItemGrid{most + 1, 256}.fits());
  CHECK_FALSE(ItemGrid{most + 1, 256}.grid().within_limits());
  // One thread per item covers items [0, blocks * 256) and each thread past
  // the end returns: the last item's thread exists, no thread is missing.
  for (const std::int64_t items : {std::int64_t(1), std::int64_t(256), std::int64_t(257), kTwo31}) {
    const ItemGrid g{items, 256};
    CHECK(g.blocks() * 256 >= items);
    CHECK((g.blocks() - 1) * 256 < items);
  }
}

TEST_CASE("RowTileGrid: scatter_axpy's rows and column tiles, each once", "[tiling]") {
  // Enumerated: a grid of (tiles x min(rows, 65535)) blocks, each striding
  // over rows by grid.y and tiles by grid.x, threads over tile columns.
  for (const std::int64_t rows : {std::int64_t(1), std::int64_t(3), std::int64_t(65535),
                                  std::int64_t(65536), std::int64_t(65537), std::int64_t(140000)}) {
    for (const std::int64_t cols : {std::int64_t(1), std::int64_t(255), std::int64_t(256),
                                    std::int64_t(257), std::int64_t(600)}) {
      INFO("rows " << rows << ", cols " << cols);
      const RowTileGrid g{rows, cols, 256};
      const GridSize grid = g.grid();
      REQUIRE(grid.within_limits());
      CHECK(grid.y == std::min<std::int64_t>(rows, 65535));
      // Rows: each row by exactly one block row (the tiling of columns within
      // a row is the same for every row, checked below).
      std::vector<int> row_hits(static_cast<std::size_t>(rows), 0);
      for (std::int64_t by = 0; by < grid.y; ++by) {
        for (std::int64_t row = StrideLoop::start(by, 1, 0); row < rows;
             row += StrideLoop::step(grid.y, 1)) {
          ++row_hits[static_cast<std::size_t>(row)];
        }
      }
      std::int64_t wrong = 0;
      for (int h : row_hits) wrong += h == 1 ? 0 : 1;
      CHECK(wrong == 0);
      std::vector<int> col_hits(static_cast<std::size_t>(cols), 0);
      for (std::int64_t bx = 0; bx < grid.x; ++bx) {
        for (std::int64_t tile = StrideLoop::start(bx, 1, 0); tile < g.tiles();
             tile += StrideLoop::step(grid.x, 1)) {
          for (std::int64_t lane = 0; lane < 256; ++lane) {
            const std::int64_t c = g.col(tile, lane);
            if (c < cols) ++col_hits[static_cast<std::size_t>(c)];
          }
        }
      }
      wrong = 0;
      for (int h : col_hits) wrong += h == 1 ? 0 : 1;
      CHECK(wrong == 0);
    }
  }
  // Arithmetically, at sizes too large to enumerate: rows and tiles are each a
  // StrideLoop with one item per block.
  for (const std::int64_t rows : {std::int64_t(65536), std::int64_t(10000000), kTwo31}) {
    for (const std::int64_t cols : {std::int64_t(1), std::int64_t(4096), std::int64_t(100000000)}) {
      INFO("rows " << rows << ", cols " << cols);
      const RowTileGrid g{rows, cols, 256};
      REQUIRE(g.grid().within_limits());
      CHECK(g.grid().y == 65535);
      CHECK(g.grid().x == std::min<std::int64_t>(g.tiles(), 65535));
      CHECK(g.tiles() * 256 >= cols);
      CHECK((g.tiles() - 1) * 256 < cols);
      CHECK(g.col(g.tiles() - 1, 255) >= cols - 1);
      check_stride_loop_arithmetic(StrideLoop{rows, 1});
      check_stride_loop_arithmetic(StrideLoop{g.tiles(), 1});
    }
  }
}

TEST_CASE("TransposeTiling: the grid stays within the limits for any shape", "[tiling]") {
  for (const std::int64_t rows : {std::int64_t(1), std::int64_t(65535) * 32,
                                  std::int64_t(65536) * 32, std::int64_t(10000000)}) {
    for (const std::int64_t cols : {std::int64_t(1), std::int64_t(4096), std::int64_t(10000000)}) {
      INFO("rows " << rows << ", cols " << cols);
      const TransposeTiling t{rows, cols};
      const GridSize g = t.grid();
      CHECK(g.within_limits());
      CHECK(g.y == std::min<std::int64_t>(t.tiles_down(), 65535));
      CHECK(g.x == std::min<std::int64_t>(t.tiles_across(), 65535));
      check_stride_loop_arithmetic(StrideLoop{t.tiles_down(), 1});
      check_stride_loop_arithmetic(StrideLoop{t.tiles_across(), 1});
    }
  }
}

// ---------------------------------------------------------------------------
// ScopedBlasSettings over a recording fake of the cuBLAS calls.
// ---------------------------------------------------------------------------

namespace {

struct FakeHandle {
  int stream = 0;
  int pointer_mode = 0;
  int math_mode = 0;
  int atomics_mode = 0;
  std::vector<std::string> calls;
  std::string fail_on;  // a setter that throws, as a failing cuBLAS call does
};

struct FakeApi {
  using Handle = FakeHandle*;
  using Settings = rankwise::detail::BlasSettings<int, int, int, int>;
  static Settings get(Handle h) {
    return {h->stream, h->pointer_mode, h->math_mode, h->atomics_mode};
  }
  static void set(Handle h, const char* name, int& field, int value) {
    h->calls.push_back(std::string(name) + "=" + std::to_string(value));
    if (h->fail_on == name) throw std::runtime_error(std::string(name) + " failed");
    field = value;
  }
  static void set_stream(Handle h, int v) { set(h, "stream", h->stream, v); }
  static void set_pointer_mode(Handle h, int v) { set(h, "pointer", h->pointer_mode, v); }
  static void set_math_mode(Handle h, int v) { set(h, "math", h->math_mode, v); }
  static void set_atomics_mode(Handle h, int v) { set(h, "atomics", h->atomics_mode, v); }
};

using Guard = rankwise::detail::ScopedBlasSettings<FakeApi>;

}  // namespace

TEST_CASE("ScopedBlasSettings: a handle already as needed is not touched", "[cuda-host][blas]") {
  FakeHandle h{7, 0, 0, 0, {}, {}};
  {
    const Guard g(&h, {7, 0, 0, 0});
    CHECK(g.saved().stream == 7);
  }
  CHECK(h.calls.empty());  // in particular no set_stream, which drops a cuBLAS workspace
}

TEST_CASE("ScopedBlasSettings: changes what differs, restores it after", "[cuda-host][blas]") {
  // An engine's handle: its own stream (3), device pointer mode (1), TF32 math (3).
  FakeHandle h{3, 1, 3, 0, {}, {}};
  {
    const Guard g(&h, {9, 0, 0, 0});
    CHECK(h.stream == 9);
    CHECK(h.pointer_mode == 0);
    CHECK(h.math_mode == 0);
    CHECK(h.atomics_mode == 0);
  }
  CHECK(h.stream == 3);
  CHECK(h.pointer_mode == 1);
  CHECK(h.math_mode == 3);
  CHECK(h.atomics_mode == 0);
  CHECK(h.calls == std::vector<std::string>{"stream=9", "pointer=0", "math=0", "stream=3",
                                            "pointer=1", "math=3"});
}

TEST_CASE("ScopedBlasSettings: restores on an exception inside the scope", "[cuda-host][blas]") {
  FakeHandle h{3, 1, 3, 1, {}, {}};
  try {
    const Guard g(&h, {9, 0, 0, 0});
    throw std::runtime_error("the GEMM failed");
  } catch (const std::runtime_error&) {
  }
  CHECK(h.stream == 3);
  CHECK(h.pointer_mode == 1);
  CHECK(h.math_mode == 3);
  CHECK(h.atomics_mode == 1);
}

TEST_CASE("ScopedBlasSettings: a setter failing part-way undoes the earlier ones",
          "[cuda-host][blas]") {
  FakeHandle h{3, 1, 3, 0, {}, "math"};
  CHECK_THROWS_WITH(Guard(&h, {9, 0, 0, 0}), "math failed");
  CHECK(h.stream == 3);
  CHECK(h.pointer_mode == 1);
  CHECK(h.math_mode == 3);
}

TEST_CASE("ScopedBlasSettings: a failing restore does not throw or skip the rest",
          "[cuda-host][blas]") {
  FakeHandle h{3, 1, 3, 1, {}, {}};
  {
    const Guard g(&h, {9, 0, 0, 0});
    h.fail_on = "stream";  // restoring the stream fails; the modes must still come back
  }
  CHECK(h.stream == 9);
  CHECK(h.pointer_mode == 1);
  CHECK(h.math_mode == 3);
  CHECK(h.atomics_mode == 1);
}
