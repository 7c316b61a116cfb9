// The segment kernels' host-side arithmetic, without a device: the grids and
// index maps of segment_shrink / segment_expand (core/segment_table.hpp) at
// CUDA's grid limits, the host table builder, and a CPU emulation of both
// kernels (the same loops over the same functions) against a plain double
// loop for adapters of heterogeneous ranks in one batch.
#include <catch2/catch.hpp>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "rankwise/core/segment_table.hpp"
#include "rankwise/core/tiling.hpp"
#include "rankwise/core/unit_index.hpp"

using rankwise::build_segment_table;
using rankwise::GridSize;
using rankwise::LaunchLimits;
using rankwise::segment_h_index;
using rankwise::segment_unit_slot;
using rankwise::SegmentExpandTiling;
using rankwise::SegmentPosition;
using rankwise::SegmentShrinkTiling;
using rankwise::SegmentStride;
using rankwise::SegmentTable;
using rankwise::SegmentTableHost;
using rankwise::valid_unit_index;

namespace {

constexpr std::int64_t kTwo31 = std::int64_t(1) << 31;
constexpr int kWarpSize = SegmentShrinkTiling::kWarpSize;

std::size_t at(std::int64_t i) { return static_cast<std::size_t>(i); }

std::int64_t wrong_counts(const std::vector<int>& hits) {
  std::int64_t wrong = 0;
  for (int h : hits) wrong += h == 1 ? 0 : 1;
  return wrong;
}

// A table of the given ranks over one list long enough for the largest, with
// tokens 0..M-1 in reverse (so token and position differ).
SegmentTableHost table_of_ranks(const std::vector<std::int32_t>& ranks) {
  const std::int32_t most = ranks.empty() ? 0 : *std::max_element(ranks.begin(), ranks.end());
  std::vector<std::int32_t> list(at(most));
  std::iota(list.begin(), list.end(), 0);
  std::vector<SegmentPosition> positions;
  for (std::size_t p = 0; p < ranks.size(); ++p) {
    positions.push_back({static_cast<std::int32_t>(ranks.size() - 1 - p), ranks[p], 0, 1.0f});
  }
  return build_segment_table({list}, positions);
}

// Every (block, position pass, chunk pass, warp) of a shrink launch over
// `grid`: how often each h entry and each (position, chunk) is handled.
struct ShrinkCoverage {
  std::vector<int> h_hits;
  std::vector<std::vector<int>> chunk_hits;  // [p][chunk]
};

ShrinkCoverage shrink_coverage(const SegmentTable& t, const GridSize& grid) {
  ShrinkCoverage cov;
  cov.h_hits.assign(at(t.h_size), 0);
  cov.chunk_hits.resize(at(t.positions));
  for (std::int64_t p = 0; p < t.positions; ++p) {
    cov.chunk_hits[at(p)].assign(at(SegmentShrinkTiling::chunks(t.rank[p])), 0);
  }
  for (std::int64_t bx = 0; bx < grid.x; ++bx) {
    for (std::int64_t by = 0; by < grid.y; ++by) {
      for (std::int64_t p = SegmentStride::first(bx); p < t.positions;
           p += SegmentStride::step(grid.x)) {
        const std::int64_t rank = t.rank[p];
        for (std::int64_t chunk = SegmentStride::first(by);
             chunk < SegmentShrinkTiling::chunks(rank); chunk += SegmentStride::step(grid.y)) {
          ++cov.chunk_hits[at(p)][at(chunk)];
          for (std::int64_t w = 0; w < SegmentShrinkTiling::kWarps; ++w) {
            const std::int64_t j = SegmentShrinkTiling::unit(chunk, w);
            if (j < rank) ++cov.h_hits[at(segment_h_index(t, p, j))];
          }
        }
      }
    }
  }
  return cov;
}

// Every (block, position pass, tile pass, thread) of an expand launch over
// `grid`: how often each (position, column) is written.
std::vector<int> expand_coverage(const SegmentTable& t, std::int64_t d_out, const GridSize& grid) {
  const SegmentExpandTiling tiling{t.positions, t.max_rank, d_out};
  std::vector<int> hits(at(t.positions * d_out), 0);
  for (std::int64_t bx = 0; bx < grid.x; ++bx) {
    for (std::int64_t by = 0; by < grid.y; ++by) {
      for (std::int64_t p = SegmentStride::first(bx); p < t.positions;
           p += SegmentStride::step(grid.x)) {
        if (t.rank[p] <= 0) continue;
        for (std::int64_t tile = SegmentStride::first(by); tile < tiling.tiles();
             tile += SegmentStride::step(grid.y)) {
          for (std::int64_t thread = 0; thread < SegmentExpandTiling::kThreads; ++thread) {
            const std::int64_t c = SegmentExpandTiling::col(tile, thread);
            if (c < d_out) ++hits[at(p * d_out + c)];
          }
        }
      }
    }
  }
  return hits;
}

// Position p of M, in a grid of gx blocks, is handled by block p mod gx at
// pass p div gx: checked for the blocks that hold the remainder's edge and
// the last position, by running their stride loops (few passes each).
void check_position_stride(std::int64_t m, std::int64_t gx) {
  INFO("positions " << m << ", grid.x " << gx);
  const std::int64_t q = m / gx, r = m % gx;
  auto passes = [&](std::int64_t block) {
    std::int64_t n = 0, last = -1;
    for (std::int64_t p = SegmentStride::first(block); p < m; p += SegmentStride::step(gx)) {
      CHECK(p % gx == block);
      CHECK(p > last);
      last = p;
      ++n;
    }
    return n;
  };
  for (std::int64_t b : {std::int64_t(0), r - 1, r, gx - 1, (m - 1) % gx}) {
    if (b < 0 || b >= gx) continue;
    CHECK(passes(b) == (b < r ? q + 1 : q));
  }
  CHECK(r * (q + 1) + (gx - r) * q == m);
  // The loop variable's last value, one step past the end, does not overflow.
  CHECK(m - 1 + gx < (std::int64_t(1) << 62));
}

// The butterfly of warp_sum: each step adds the lane's own value and its
// partner's, in that order; lane 0's result.
float butterfly_sum(std::vector<float> v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    std::vector<float> next(v.size());
    for (int lane = 0; lane < kWarpSize; ++lane) next[at(lane)] = v[at(lane)] + v[at(lane ^ offset)];
    v = next;
  }
  return v[0];
}

// segment_shrink_kernel on the CPU for T = float: the same block, position,
// chunk, tile and lane loops, one accumulator per lane.
void emulate_shrink(const SegmentTable& t, const GridSize& grid, const std::vector<float>& x,
                    std::int64_t x_ld, const std::vector<float>& a, std::int64_t a_ld,
                    std::int64_t d_in, std::vector<float>& h, std::int64_t num_units,
                    unsigned long long& invalid) {
  using Tiling = SegmentShrinkTiling;
  const Tiling tiling{t.positions, t.max_rank, d_in};
  std::vector<float> x_tile(at(tiling.shared_bytes() / std::int64_t(sizeof(float))));
  for (std::int64_t bx = 0; bx < grid.x; ++bx) {
    for (std::int64_t by = 0; by < grid.y; ++by) {
      for (std::int64_t p = SegmentStride::first(bx); p < t.positions;
           p += SegmentStride::step(grid.x)) {
        const std::int64_t rank = t.rank[p];
        const std::int64_t xr = std::int64_t(t.token[p]) * x_ld;
        for (std::int64_t chunk = SegmentStride::first(by); chunk < Tiling::chunks(rank);
             chunk += SegmentStride::step(grid.y)) {
          std::vector<std::vector<float>> acc(Tiling::kWarps, std::vector<float>(kWarpSize, 0.0f));
          std::vector<std::int64_t> unit(Tiling::kWarps, -1);
          for (int w = 0; w < Tiling::kWarps; ++w) {
            const std::int64_t j = Tiling::unit(chunk, w);
            if (j >= rank) continue;
            const std::int64_t u = t.units[segment_unit_slot(t, p, j)];
            if (valid_unit_index(u, num_units)) {
              unit[at(w)] = u;
            } else {
              ++invalid;
            }
          }
          for (std::int64_t tile = 0; tile < tiling.x_tiles(); ++tile) {
            const std::int64_t begin = Tiling::tile_begin(tile), length = tiling.tile_length(tile);
            REQUIRE(length <= static_cast<std::int64_t>(x_tile.size()));
            for (std::int64_t i = 0; i < length; ++i) x_tile[at(i)] = x[at(xr + begin + i)];
            for (int w = 0; w < Tiling::kWarps; ++w) {
              if (unit[at(w)] < 0) continue;
              const std::int64_t ar = unit[at(w)] * a_ld;
              for (int lane = 0; lane < kWarpSize; ++lane) {
                for (std::int64_t i = lane; i < length; i += kWarpSize) {
                  acc[at(w)][at(lane)] += a[at(ar + begin + i)] * x_tile[at(i)];
                }
              }
            }
          }
          for (int w = 0; w < Tiling::kWarps; ++w) {
            const std::int64_t j = Tiling::unit(chunk, w);
            if (j < rank) h[at(segment_h_index(t, p, j))] = butterfly_sum(acc[at(w)]);
          }
        }
      }
    }
  }
}

// segment_expand_kernel on the CPU for T = float: the same block, position,
// tile and stage loops, one accumulator per thread.
void emulate_expand(const SegmentTable& t, const GridSize& grid, const std::vector<float>& h,
                    const std::vector<float>& bt, std::int64_t bt_ld, std::int64_t d_out,
                    std::vector<float>& y, std::int64_t y_ld, std::int64_t num_units,
                    unsigned long long& invalid) {
  using Tiling = SegmentExpandTiling;
  const Tiling tiling{t.positions, t.max_rank, d_out};
  const std::int64_t stage = tiling.stage_units();
  REQUIRE(tiling.shared_bytes() == stage * std::int64_t(sizeof(float) + sizeof(std::int32_t)));
  std::vector<float> hs(at(stage));
  std::vector<std::int32_t> us(at(stage));
  for (std::int64_t bx = 0; bx < grid.x; ++bx) {
    for (std::int64_t by = 0; by < grid.y; ++by) {
      for (std::int64_t p = SegmentStride::first(bx); p < t.positions;
           p += SegmentStride::step(grid.x)) {
        const std::int64_t rank = t.rank[p];
        if (rank <= 0) continue;
        const std::int64_t yr = std::int64_t(t.token[p]) * y_ld;
        for (std::int64_t tile = SegmentStride::first(by); tile < tiling.tiles();
             tile += SegmentStride::step(grid.y)) {
          std::vector<float> acc(Tiling::kThreads, 0.0f);
          for (std::int64_t base = 0; base < rank; base += stage) {
            const std::int64_t length = Tiling::stage_length(base, rank, stage);
            for (std::int64_t s = 0; s < length; ++s) {
              const std::int32_t u = t.units[segment_unit_slot(t, p, base + s)];
              const bool ok = valid_unit_index(u, num_units);
              if (!ok && Tiling::counts_invalid(tile)) ++invalid;
              us[at(s)] = ok ? u : -1;
              hs[at(s)] = h[at(segment_h_index(t, p, base + s))];
            }
            for (int thread = 0; thread < Tiling::kThreads; ++thread) {
              const std::int64_t c = Tiling::col(tile, thread);
              if (c >= d_out) continue;
              for (std::int64_t s = 0; s < length; ++s) {
                if (us[at(s)] >= 0) {
                  acc[at(thread)] += hs[at(s)] * bt[at(std::int64_t(us[at(s)]) * bt_ld + c)];
                }
              }
            }
          }
          for (int thread = 0; thread < Tiling::kThreads; ++thread) {
            const std::int64_t c = Tiling::col(tile, thread);
            if (c < d_out) y[at(yr + c)] += t.scale[p] * acc[at(thread)];
          }
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("segment tilings: grids within CUDA's limits at any size", "[segment]") {
  const std::vector<std::int64_t> positions = {1,          7,      65535,         65536,
                                               kTwo31 - 1, kTwo31, kTwo31 + 5,    std::int64_t(1) << 40};
  const std::vector<std::int64_t> ranks = {1, 3, 4, 5, 64, 65535 * 4, 65535 * 4 + 1, kTwo31};
  for (const std::int64_t m : positions) {
    for (const std::int64_t r : ranks) {
      INFO("positions " << m << ", max_rank " << r);
      const SegmentShrinkTiling s{m, r, 4096};
      CHECK_FALSE(s.empty());
      CHECK(s.grid().within_limits());
      CHECK(s.grid().x == std::min(m, LaunchLimits::kMaxGridX));
      CHECK(s.grid().y == std::min<std::int64_t>((r + 3) / 4, 65535));
      CHECK(s.grid().z == 1);
    }
    for (const std::int64_t d_out : {std::int64_t(1), std::int64_t(256), std::int64_t(257),
                                     std::int64_t(65535) * 256, std::int64_t(65535) * 256 + 1,
                                     kTwo31}) {
      INFO("positions " << m << ", d_out " << d_out);
      const SegmentExpandTiling e{m, 16, d_out};
      CHECK_FALSE(e.empty());
      CHECK(e.grid().within_limits());
      CHECK(e.grid().x == std::min(m, LaunchLimits::kMaxGridX));
      CHECK(e.grid().y == std::min<std::int64_t>((d_out + 255) / 256, 65535));
      CHECK(e.tiles() * 256 >= d_out);
      CHECK((e.tiles() - 1) * 256 < d_out);
    }
  }
  // Nothing to do: no launch (a zero grid is a launch error).
  CHECK(SegmentShrinkTiling{0, 16, 64}.empty());
  CHECK(SegmentShrinkTiling{5, 0, 64}.empty());
  CHECK_FALSE(SegmentShrinkTiling{5, 16, 0}.empty());  // h = 0 is still written
  CHECK(SegmentExpandTiling{0, 16, 64}.empty());
  CHECK(SegmentExpandTiling{5, 0, 64}.empty());
  CHECK(SegmentExpandTiling{5, 16, 0}.empty());
}

TEST_CASE("segment tilings: shared memory for a max_rank and a d_in", "[segment]") {
  CHECK(SegmentShrinkTiling{1, 16, 0}.shared_bytes() == 0);
  CHECK(SegmentShrinkTiling{1, 16, 1}.shared_bytes() == 4);
  CHECK(SegmentShrinkTiling{1, 16, 1024}.shared_bytes() == 4096);
  CHECK(SegmentShrinkTiling{1, 16, 1025}.shared_bytes() == 4096);
  CHECK(SegmentShrinkTiling{1, 16, kTwo31}.shared_bytes() == 4096);
  CHECK(SegmentExpandTiling{1, 1, 64}.shared_bytes() == 8);
  CHECK(SegmentExpandTiling{1, 64, 64}.shared_bytes() == 512);
  CHECK(SegmentExpandTiling{1, 1024, 64}.shared_bytes() == 8192);
  CHECK(SegmentExpandTiling{1, 1025, 64}.shared_bytes() == 8192);
  CHECK(SegmentExpandTiling{1, kTwo31, 64}.shared_bytes() == 8192);
  CHECK(SegmentExpandTiling{1, 1025, 64}.stage_units() == 1024);
  for (const std::int64_t r : {std::int64_t(1), std::int64_t(1000), kTwo31}) {
    CHECK(SegmentExpandTiling{1, r, 64}.shared_bytes() <= LaunchLimits::kMaxStaticSharedBytes);
    CHECK(SegmentShrinkTiling{1, r, r}.shared_bytes() <= LaunchLimits::kMaxStaticSharedBytes);
  }
  // The x tiles of a row: every column once, the last tile short.
  for (const std::int64_t d_in : {std::int64_t(1), std::int64_t(1023), std::int64_t(1024),
                                  std::int64_t(1025), std::int64_t(2100), std::int64_t(8192)}) {
    const SegmentShrinkTiling s{1, 1, d_in};
    std::vector<int> hits(at(d_in), 0);
    for (std::int64_t tile = 0; tile < s.x_tiles(); ++tile) {
      CHECK(s.tile_length(tile) >= 1);
      CHECK(s.tile_length(tile) <= s.shared_bytes() / 4);
      for (std::int64_t i = 0; i < s.tile_length(tile); ++i) {
        ++hits[at(SegmentShrinkTiling::tile_begin(tile) + i)];
      }
    }
    CHECK(wrong_counts(hits) == 0);
  }
}

TEST_CASE("segment shrink: every (position, chunk) and h entry exactly once", "[segment]") {
  const std::vector<std::vector<std::int32_t>> rank_sets = {
      {1}, {64}, {1, 3, 8, 16, 64}, {64, 1, 1, 1, 16, 3, 8, 8, 5, 4, 0, 2}, {7, 7, 7}};
  for (const std::vector<std::int32_t>& ranks : rank_sets) {
    const SegmentTableHost host = table_of_ranks(ranks);
    const SegmentTable t = host.host_view();
    const SegmentShrinkTiling tiling{t.positions, t.max_rank, 100};
    // The launch's own grid, then grids smaller than the work in x, y or
    // both: the strides must cover everything whatever the grid.
    for (const GridSize grid : {tiling.grid(), GridSize{1, 1, 1}, GridSize{2, 3, 1},
                                GridSize{5, 1, 1}, GridSize{1, 2, 1}, GridSize{20, 40, 1}}) {
      INFO("positions " << t.positions << ", grid (" << grid.x << ", " << grid.y << ")");
      const ShrinkCoverage cov = shrink_coverage(t, grid);
      CHECK(wrong_counts(cov.h_hits) == 0);
      for (const std::vector<int>& chunks : cov.chunk_hits) CHECK(wrong_counts(chunks) == 0);
    }
  }
  // A rank whose chunks exceed grid.y's 65535: the y stride takes the rest.
  for (const std::int32_t rank : {65535 * 4, 65535 * 4 + 1, 65536 * 4 + 3}) {
    const SegmentTableHost host = table_of_ranks({rank, 2});
    const SegmentTable t = host.host_view();
    const SegmentShrinkTiling tiling{t.positions, t.max_rank, 100};
    REQUIRE(tiling.grid().y == std::min<std::int64_t>(SegmentShrinkTiling::chunks(rank), 65535));
    const ShrinkCoverage cov = shrink_coverage(t, tiling.grid());
    CHECK(wrong_counts(cov.h_hits) == 0);
    for (const std::vector<int>& chunks : cov.chunk_hits) CHECK(wrong_counts(chunks) == 0);
  }
  // A max_rank that understates a rank: the y stride still covers it.
  SegmentTableHost host = table_of_ranks({64, 3});
  host.max_rank = 3;
  const SegmentTable t = host.host_view();
  const ShrinkCoverage cov = shrink_coverage(t, SegmentShrinkTiling{2, 3, 10}.grid());
  CHECK(wrong_counts(cov.h_hits) == 0);
}

TEST_CASE("segment expand: every (position, column) exactly once, each unit staged once",
          "[segment]") {
  const SegmentTableHost host = table_of_ranks({1, 3, 8, 16, 64, 0, 2});
  const SegmentTable t = host.host_view();
  for (const std::int64_t d_out : {std::int64_t(1), std::int64_t(255), std::int64_t(256),
                                   std::int64_t(257), std::int64_t(1000)}) {
    const SegmentExpandTiling tiling{t.positions, t.max_rank, d_out};
    for (const GridSize grid : {tiling.grid(), GridSize{1, 1, 1}, GridSize{3, 2, 1}}) {
      INFO("d_out " << d_out << ", grid (" << grid.x << ", " << grid.y << ")");
      const std::vector<int> hits = expand_coverage(t, d_out, grid);
      std::int64_t wrong = 0;
      for (std::int64_t p = 0; p < t.positions; ++p) {
        for (std::int64_t c = 0; c < d_out; ++c) {
          wrong += hits[at(p * d_out + c)] == (t.rank[p] > 0 ? 1 : 0) ? 0 : 1;
        }
      }
      CHECK(wrong == 0);
    }
  }
  // Column tiles beyond grid.y's 65535: one position, 65536 tiles and a bit.
  {
    const SegmentTableHost one = table_of_ranks({2});
    const std::int64_t d_out = std::int64_t(65536) * 256 + 7;
    const SegmentExpandTiling tiling{1, 2, d_out};
    REQUIRE(tiling.grid().y == 65535);
    CHECK(wrong_counts(expand_coverage(one.host_view(), d_out, tiling.grid())) == 0);
  }
  // The stages of a rank: every entry staged once per tile and counted (when
  // invalid) on tile 0 only, whether max_rank fits one stage, needs several,
  // or understates the rank.
  for (const std::int64_t max_rank : {std::int64_t(1), std::int64_t(64), std::int64_t(1024),
                                      std::int64_t(5000)}) {
    for (const std::int64_t rank : {std::int64_t(1), std::int64_t(63), std::int64_t(1023),
                                    std::int64_t(1024), std::int64_t(1025), std::int64_t(5000)}) {
      INFO("max_rank " << max_rank << ", rank " << rank);
      const SegmentExpandTiling tiling{1, max_rank, 600};
      const std::int64_t stage = tiling.stage_units();
      std::vector<int> counted(at(rank), 0);
      for (std::int64_t tile = 0; tile < tiling.tiles(); ++tile) {
        std::vector<int> staged(at(rank), 0);
        for (std::int64_t base = 0; base < rank; base += stage) {
          const std::int64_t length = SegmentExpandTiling::stage_length(base, rank, stage);
          CHECK(length >= 1);
          CHECK(length <= stage);
          for (std::int64_t s = 0; s < length; ++s) {
            ++staged[at(base + s)];
            if (SegmentExpandTiling::counts_invalid(tile)) ++counted[at(base + s)];
          }
        }
        CHECK(wrong_counts(staged) == 0);
      }
      CHECK(wrong_counts(counted) == 0);
    }
  }
}

TEST_CASE("segment tilings: positions beyond 2^31 - 1 blocks, by the x stride", "[segment]") {
  for (const std::int64_t m : {kTwo31 - 1, kTwo31, kTwo31 + 5, std::int64_t(1) << 40}) {
    const std::int64_t gx = SegmentShrinkTiling{m, 16, 4096}.grid().x;
    CHECK(gx == std::min(m, LaunchLimits::kMaxGridX));
    CHECK(SegmentExpandTiling{m, 16, 4096}.grid().x == gx);
    check_position_stride(m, gx);
  }
  // Enumerated at small sizes, for grids smaller than, equal to and larger than M.
  for (const std::int64_t m : {1, 2, 7, 100}) {
    for (const std::int64_t gx : {1, 3, 7, 100, 101}) {
      std::vector<int> hits(at(m), 0);
      for (std::int64_t b = 0; b < gx; ++b) {
        for (std::int64_t p = SegmentStride::first(b); p < m; p += SegmentStride::step(gx)) {
          ++hits[at(p)];
        }
      }
      CHECK(wrong_counts(hits) == 0);
      check_position_stride(m, gx);
    }
  }
}

TEST_CASE("build_segment_table: offsets, ranks and rejected inputs", "[segment]") {
  const std::vector<std::vector<std::int32_t>> lists = {{10, 11, 12}, {40}, {5, 6, 7, 8, 9, 30}};
  const SegmentTableHost t = build_segment_table(
      lists, {{4, 3, 0, 0.5f}, {0, 1, 1, 2.0f}, {9, 4, 2, -1.0f}, {2, 0, 2, 1.0f}});
  CHECK(t.positions == 4);
  CHECK(t.max_rank == 4);
  CHECK(t.h_size == 8);
  CHECK(t.units == std::vector<std::int32_t>{10, 11, 12, 40, 5, 6, 7, 8, 9, 30});
  CHECK(t.unit_offset == std::vector<std::int32_t>{0, 3, 4, 4});
  CHECK(t.h_offset == std::vector<std::int64_t>{0, 3, 4, 8});
  CHECK(t.token == std::vector<std::int32_t>{4, 0, 9, 2});
  CHECK(t.rank == std::vector<std::int32_t>{3, 1, 4, 0});
  CHECK(t.scale == std::vector<float>{0.5f, 2.0f, -1.0f, 1.0f});
  const SegmentTable v = t.host_view();
  CHECK(v.units[segment_unit_slot(v, 2, 3)] == 8);
  CHECK(segment_h_index(v, 2, 3) == 7);

  const SegmentTableHost empty = build_segment_table(lists, {});
  CHECK(empty.positions == 0);
  CHECK(empty.h_size == 0);
  CHECK(SegmentShrinkTiling{empty.positions, empty.max_rank, 8}.empty());

  CHECK_THROWS_WITH(build_segment_table(lists, {{0, 4, 0, 1.0f}}),
                    Catch::Contains("rank 4 but its unit list holds 3"));
  CHECK_THROWS_WITH(build_segment_table(lists, {{0, -1, 0, 1.0f}}), Catch::Contains("rank -1"));
  CHECK_THROWS_WITH(build_segment_table(lists, {{0, 1, 3, 1.0f}}),
                    Catch::Contains("names unit list 3 of 3"));
  CHECK_THROWS_WITH(build_segment_table(lists, {{-2, 1, 0, 1.0f}}), Catch::Contains("token -2"));
  CHECK_THROWS_WITH(build_segment_table(lists, {{3, 1, 0, 1.0f}, {3, 1, 1, 1.0f}}),
                    Catch::Contains("token 3 appears at more than one position"));
  // Rank-0 positions write nothing, so they may repeat a token (padding).
  const SegmentTableHost padded =
      build_segment_table(lists, {{3, 1, 0, 1.0f}, {3, 0, 1, 1.0f}, {3, 0, 2, 1.0f}});
  CHECK(padded.positions == 3);
  CHECK(padded.h_size == 1);
}

TEST_CASE("segment kernels, emulated: heterogeneous ranks against a double loop", "[segment]") {
  std::mt19937 rng(20240611u);
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  const std::int64_t n = 150, d_in = 2100, d_out = 530, num_units = 512;
  const std::int64_t x_ld = d_in + 3, a_ld = d_in + 1, bt_ld = d_out + 5, y_ld = d_out + 2;
  const std::vector<std::int32_t> rank_choices = {1, 3, 8, 16, 64};

  // Adapters: disjoint, scattered unit lists in one pool, as pages give them;
  // one list longer than its rank, and (second section) one with units
  // outside the pool.
  std::vector<std::int32_t> pool(at(num_units));
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  std::vector<std::vector<std::int32_t>> lists;
  std::vector<std::int32_t> adapter_rank;
  std::vector<float> adapter_scale;
  std::size_t next = 0;
  for (int l = 0; l < 10; ++l) {
    const std::int32_t r = rank_choices[at(l % 5)];
    const std::size_t length = at(l == 3 ? r + 5 : r);
    lists.emplace_back(pool.begin() + static_cast<std::ptrdiff_t>(next),
                       pool.begin() + static_cast<std::ptrdiff_t>(next + length));
    next += length;
    adapter_rank.push_back(r);
    adapter_scale.push_back(0.25f * static_cast<float>(l + 1) * (l % 2 == 0 ? 1.0f : -1.0f));
  }
  std::vector<std::int32_t> tokens(at(n));
  std::iota(tokens.begin(), tokens.end(), 0);
  std::shuffle(tokens.begin(), tokens.end(), rng);

  std::vector<float> x(at(n * x_ld)), a(at(num_units * a_ld)), bt(at(num_units * bt_ld)),
      y0(at(n * y_ld));
  for (float& v : x) v = value(rng);
  for (float& v : a) v = value(rng);
  for (float& v : bt) v = value(rng);
  for (float& v : y0) v = value(rng);

  auto run = [&](const std::vector<std::vector<std::int32_t>>& unit_lists) {
    // 100 of the 150 tokens, adapters mixed in any order (BGMV needs no grouping).
    std::vector<SegmentPosition> positions;
    std::uniform_int_distribution<int> pick(0, static_cast<int>(unit_lists.size()) - 1);
    for (std::int64_t p = 0; p < 100; ++p) {
      const int l = pick(rng);
      positions.push_back({tokens[at(p)], adapter_rank[at(l)], l, adapter_scale[at(l)]});
    }
    const SegmentTableHost host = build_segment_table(unit_lists, positions);
    const SegmentTable t = host.host_view();
    REQUIRE(t.max_rank == 64);

    // The reference: plain double loops; units outside the pool add nothing.
    std::vector<double> h_ref(at(t.h_size)), h_bound(at(t.h_size));
    std::vector<double> y_ref(y0.begin(), y0.end()), y_bound(y0.size());
    for (std::size_t i = 0; i < y0.size(); ++i) y_bound[i] = std::fabs(y0[i]);
    unsigned long long invalid_ref = 0;
    for (std::int64_t p = 0; p < t.positions; ++p) {
      const std::int64_t tok = t.token[p];
      for (std::int64_t j = 0; j < t.rank[p]; ++j) {
        const std::int64_t u = t.units[segment_unit_slot(t, p, j)];
        const std::size_t hi = at(segment_h_index(t, p, j));
        if (!valid_unit_index(u, num_units)) {
          ++invalid_ref;
          continue;
        }
        for (std::int64_t i = 0; i < d_in; ++i) {
          const double term = double(a[at(u * a_ld + i)]) * double(x[at(tok * x_ld + i)]);
          h_ref[hi] += term;
          h_bound[hi] += std::fabs(term);
        }
        for (std::int64_t c = 0; c < d_out; ++c) {
          const double b = bt[at(u * bt_ld + c)];
          y_ref[at(tok * y_ld + c)] += double(t.scale[p]) * h_ref[hi] * b;
          y_bound[at(tok * y_ld + c)] += std::fabs(double(t.scale[p]) * b) * h_bound[hi];
        }
      }
    }

    // The emulated kernels over the launch's own grid, then over small grids
    // that make every block stride: the same bits, whatever the grid.
    const GridSize shrink_grid = SegmentShrinkTiling{t.positions, t.max_rank, d_in}.grid();
    const GridSize expand_grid = SegmentExpandTiling{t.positions, t.max_rank, d_out}.grid();
    REQUIRE(shrink_grid.within_limits());
    REQUIRE(expand_grid.within_limits());
    std::vector<float> h_first, y_first;
    for (int g = 0; g < 3; ++g) {
      const GridSize sg = g == 0 ? shrink_grid : g == 1 ? GridSize{1, 1, 1} : GridSize{7, 3, 1};
      const GridSize eg = g == 0 ? expand_grid : g == 1 ? GridSize{1, 1, 1} : GridSize{9, 2, 1};
      INFO("grid variant " << g);
      std::vector<float> h(at(t.h_size), std::nanf(""));
      std::vector<float> y = y0;
      unsigned long long shrink_invalid = 0, expand_invalid = 0;
      emulate_shrink(t, sg, x, x_ld, a, a_ld, d_in, h, num_units, shrink_invalid);
      emulate_expand(t, eg, h, bt, bt_ld, d_out, y, y_ld, num_units, expand_invalid);
      CHECK(shrink_invalid == invalid_ref);
      CHECK(expand_invalid == invalid_ref);
      std::int64_t h_wrong = 0, y_wrong = 0;
      for (std::size_t i = 0; i < h.size(); ++i) {
        // Written everywhere (no NaN left), within float's error of the sum.
        h_wrong += std::fabs(double(h[i]) - h_ref[i]) <= 2e-5 * h_bound[i] ? 0 : 1;
      }
      for (std::size_t i = 0; i < y.size(); ++i) {
        y_wrong += std::fabs(double(y[i]) - y_ref[i]) <= 4e-5 * y_bound[i] ? 0 : 1;
      }
      CHECK(h_wrong == 0);
      CHECK(y_wrong == 0);
      if (g == 0) {
        h_first = h;
        y_first = y;
      } else {
        CHECK(h == h_first);
        CHECK(y == y_first);
      }
    }
    // Rows of tokens no position names are untouched.
    std::vector<bool> routed(at(n), false);
    for (std::int64_t p = 0; p < t.positions; ++p) routed[at(t.token[p])] = true;
    std::int64_t touched = 0;
    for (std::int64_t tok = 0; tok < n; ++tok) {
      if (routed[at(tok)]) continue;
      for (std::int64_t c = 0; c < y_ld; ++c) {
        touched += y_first[at(tok * y_ld + c)] == y0[at(tok * y_ld + c)] ? 0 : 1;
      }
    }
    CHECK(touched == 0);
    return invalid_ref;
  };

  SECTION("valid units") { CHECK(run(lists) == 0); }
  SECTION("units outside the pool are skipped and counted") {
    std::vector<std::vector<std::int32_t>> bad = lists;
    bad[2][1] = -1;                                          // rank 8
    bad[4][0] = static_cast<std::int32_t>(num_units);        // rank 64
    bad[4][63] = static_cast<std::int32_t>(num_units + 77);  // rank 64, last entry
    bad[0].push_back(-5);                                    // past rank 1: never read
    CHECK(run(bad) > 0);
  }
}
