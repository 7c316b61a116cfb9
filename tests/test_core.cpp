// Core types (views, errors, workspace, tiling, random numbers, LoraConfig)
// and the CPU backend's primitives against the plain-loop reference.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "cases/kernel_cases.hpp"
#include "cases/unit_kernel_cases.hpp"
#include "support/harness_cpu.hpp"

using rankwise::ErrorCode;
using rankwise::MatrixView;
using rankwise::MemorySpace;

// ---------------------------------------------------------------------------
// MatrixView
// ---------------------------------------------------------------------------

TEST_CASE("MatrixView: shape, stride and space", "[core][view]") {
  std::vector<float> storage(40);
  const auto v = rankwise::host_view(storage.data(), 4, 6);
  CHECK(v.ld == 6);
  CHECK(v.size() == 24);
  CHECK_FALSE(v.empty());
  CHECK(v.contiguous());
  CHECK(v.space == MemorySpace::kHost);

  const auto strided = rankwise::host_view(storage.data(), 4, 6, 10);
  CHECK(strided.ld == 10);
  CHECK_FALSE(strided.contiguous());
  CHECK(rankwise::host_view(storage.data(), 1, 6, 10).contiguous());  // one row: ld is free

  const auto d = rankwise::device_view(storage.data(), 3, 0);
  CHECK(d.space == MemorySpace::kDevice);
  CHECK(d.empty());
  CHECK(MatrixView<float>(nullptr, 0, 5, MemorySpace::kHost).empty());
  CHECK(MatrixView<float>().empty());

  CHECK(std::string(rankwise::to_string(MemorySpace::kHost)) == "host");
  CHECK(std::string(rankwise::to_string(MemorySpace::kDevice)) == "device");
  std::ostringstream shape;
  shape << rankwise::shape_of(strided);
  CHECK(shape.str() == "(4 x 6)");
}

TEST_CASE("MatrixView: row_block", "[core][view]") {
  std::vector<double> storage(50);
  const auto v = rankwise::device_view(storage.data(), 5, 7, 9);
  const auto blk = v.row_block(2, 3);
  CHECK(blk.data == storage.data() + 2 * 9);
  CHECK(blk.rows == 3);
  CHECK(blk.cols == 7);
  CHECK(blk.ld == 9);
  CHECK(blk.space == MemorySpace::kDevice);

  const auto none = v.row_block(5, 0);  // empty block at the end is legal
  CHECK(none.rows == 0);
  CHECK(none.empty());
  CHECK(v.row_block(0, 5).data == v.data);

  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "row_block: rows [3, 6) out of range for a view with 5 rows",
                     v.row_block(3, 3));
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "row_block: rows [-1, 0)", v.row_block(-1, 1));
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "row_block: rows [2, 1)", v.row_block(2, -1));
}

TEST_CASE("MatrixView: converts to const, never back", "[core][view]") {
  static_assert(std::is_convertible<MatrixView<float>, MatrixView<const float>>::value, "");
  static_assert(!std::is_constructible<MatrixView<float>, MatrixView<const float>>::value, "");
  static_assert(!std::is_constructible<MatrixView<double>, MatrixView<float>>::value, "");
  static_assert(!std::is_constructible<MatrixView<const double>, MatrixView<float>>::value, "");
  std::vector<float> storage(12);
  const MatrixView<float> v = rankwise::device_view(storage.data(), 2, 5, 6);
  const MatrixView<const float> c = v;
  CHECK(c.data == v.data);
  CHECK(c.rows == 2);
  CHECK(c.cols == 5);
  CHECK(c.ld == 6);
  CHECK(c.space == MemorySpace::kDevice);
}

TEST_CASE("check_view: each failure names the argument, its shapes and a code", "[core][view]") {
  std::vector<float> storage(24);
  const auto ok = rankwise::host_view(storage.data(), 2, 3);
  CHECK_NOTHROW(rankwise::check_view(ok, "w", 2, 3, MemorySpace::kHost));
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "w: expected shape (3 x 2), got (2 x 3)",
                     rankwise::check_view(ok, "w", 3, 2, MemorySpace::kHost));
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "w: leading dimension 2 is smaller than its 3 columns",
                     rankwise::check_view(rankwise::host_view(storage.data(), 2, 3, 2), "w", 2, 3,
                                          MemorySpace::kHost));
  // A single row's ld is never used.
  CHECK_NOTHROW(rankwise::check_view(rankwise::host_view(storage.data(), 1, 3, 1), "w", 1, 3,
                                     MemorySpace::kHost));
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "w: null data for a non-empty (2 x 3) matrix",
                     rankwise::check_view(rankwise::host_view<float>(nullptr, 2, 3), "w", 2, 3,
                                          MemorySpace::kHost));
  CHECK_NOTHROW(rankwise::check_view(rankwise::host_view<float>(nullptr, 0, 3), "w", 0, 3,
                                     MemorySpace::kDevice));  // empty: no pointer, any space
  RWTEST_CHECK_ERROR(ErrorCode::kMemorySpace, "w: expected device memory, got host",
                     rankwise::check_view(ok, "w", 2, 3, MemorySpace::kDevice));
  RWTEST_CHECK_ERROR(ErrorCode::kMemorySpace, "w: expected host memory, got device",
                     rankwise::check_view(rankwise::device_view(storage.data(), 2, 3), "w", 2, 3,
                                          MemorySpace::kHost));
}

// ---------------------------------------------------------------------------
// Errors and LoraConfig
// ---------------------------------------------------------------------------

TEST_CASE("rankwise::error: code, prefix, location", "[core][error]") {
  const int check_line = __LINE__ + 2;
  try {
    RANKWISE_CHECK(1 + 1 == 3, "the sum of ", 1, " and ", 1.5, " is ", "wrong");
    FAIL("RANKWISE_CHECK did not throw");
  } catch (const rankwise::error& e) {
    const std::string msg = e.what();
    CHECK(e.code() == ErrorCode::kInvalidArgument);
    CHECK(msg.rfind("rankwise: the sum of 1 and 1.5 is wrong [", 0) == 0);
    CHECK_THAT(msg, Catch::Contains("test_core.cpp:" + std::to_string(check_line) + "]"));
    const std::runtime_error& base = e;  // catchable as std::runtime_error
    CHECK(std::string(base.what()) == msg);
  }
  RWTEST_CHECK_ERROR(ErrorCode::kIo, "file x is short",
                     RANKWISE_CHECK_CODE(false, ErrorCode::kIo, "file ", "x", " is short"));
  RWTEST_CHECK_ERROR(ErrorCode::kCublas, "status 7",
                     throw rankwise::error(ErrorCode::kCublas, "status 7"));

  // The condition is evaluated once; the message only when it fails.
  int evaluated = 0, formatted = 0;
  auto count = [&formatted] { return ++formatted; };
  RANKWISE_CHECK(++evaluated > 0, "never built ", count());
  CHECK(evaluated == 1);
  CHECK(formatted == 0);
}

TEST_CASE("LoraConfig: validation and scale rules", "[core][lora]") {
  rankwise::LoraConfig c;
  c.d_in = 10;
  c.d_out = 6;
  CHECK(c.rank == 8);
  CHECK(c.alpha == 8.0);
  CHECK(c.scale() == 1.0);
  c.rank = 4;
  c.alpha = 32.0;
  CHECK(c.scale() == 8.0);
  c.scale_rule = rankwise::ScaleRule::kAlphaOverSqrtRank;
  CHECK(c.scale() == 16.0);
  c.rank = 3;
  CHECK(c.scale() == Approx(32.0 / std::sqrt(3.0)).epsilon(1e-15));
  CHECK_NOTHROW(c.validate());

  auto broken = c;
  broken.d_in = 0;
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "LoraConfig.d_in must be positive, got 0",
                     broken.validate());
  broken = c;
  broken.d_out = -1;
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "LoraConfig.d_out must be positive, got -1",
                     broken.validate());
  broken = c;
  broken.rank = 0;
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "LoraConfig.rank must be positive, got 0",
                     (void)broken.scale());
  broken = c;
  broken.alpha = std::nan("");
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "LoraConfig.alpha must be finite, got nan",
                     (void)broken.scale());
  broken.alpha = -HUGE_VAL;
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "LoraConfig.alpha must be finite, got -inf",
                     broken.validate());
}

// ---------------------------------------------------------------------------
// numeric.hpp, workspace.hpp
// ---------------------------------------------------------------------------

TEST_CASE("ceil_div, align_up, accumulator types", "[core][numeric]") {
  static_assert(rankwise::ceil_div(0, 4) == 0, "");
  static_assert(rankwise::ceil_div(1, 4) == 1, "");
  static_assert(rankwise::ceil_div(4, 4) == 1, "");
  static_assert(rankwise::ceil_div(5, 4) == 2, "");
  static_assert(rankwise::ceil_div(std::int64_t(1) << 40, 3) == ((std::int64_t(1) << 40) + 2) / 3,
                "");
  static_assert(rankwise::align_up(0, 256) == 0, "");
  static_assert(rankwise::align_up(1, 256) == 256, "");
  static_assert(rankwise::align_up(256, 256) == 256, "");
  static_assert(rankwise::align_up(257, 256) == 512, "");
  static_assert(rankwise::align_up(7, 1) == 7, "");
  static_assert(std::is_same<rankwise::accumulator_t<float>, float>::value, "");
  static_assert(std::is_same<rankwise::accumulator_t<double>, double>::value, "");
  for (std::int64_t b : {1, 3, 8, 32, 256}) {
    for (std::int64_t a = 0; a < 600; ++a) {
      const std::int64_t q = rankwise::ceil_div(a, b);
      INFO("a " << a << ", b " << b);
      REQUIRE(q * b >= a);
      REQUIRE((q - 1) * b < a);
      if ((b & (b - 1)) == 0) {
        const auto up =
            rankwise::align_up(static_cast<std::size_t>(a), static_cast<std::size_t>(b));
        REQUIRE(up == static_cast<std::size_t>(q * b));
      }
    }
  }
}

TEST_CASE("WorkspaceCarver: aligned consecutive blocks, overrun named", "[core][workspace]") {
  struct alignas(256) Storage {
    unsigned char bytes[4096];
  };
  Storage storage;
  unsigned char* base = storage.bytes;
  CHECK(rankwise::workspace_block_bytes<float>(3, 5) == 256);
  CHECK(rankwise::workspace_block_bytes<double>(10, 30) == 2560);
  CHECK(rankwise::workspace_block_bytes<double>(0, 100) == 0);

  rankwise::WorkspaceCarver carve(base, sizeof(storage), MemorySpace::kDevice, "my_op");
  const auto a = carve.take<float>(3, 5);
  const auto b = carve.take<double>(10, 30);
  const auto none = carve.take<float>(0, 7);
  const auto c = carve.take<float>(1, 320);  // fills the last 1280 bytes exactly
  CHECK(static_cast<void*>(a.data) == base);
  CHECK(static_cast<void*>(b.data) == base + 256);
  CHECK(static_cast<void*>(none.data) == base + 2816);
  CHECK(static_cast<void*>(c.data) == base + 2816);
  CHECK(a.rows == 3);
  CHECK(a.cols == 5);
  CHECK(a.ld == 5);
  CHECK(b.space == MemorySpace::kDevice);
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "my_op: workspace of 4096 bytes is too small, need at least 4352",
                     carve.take<float>(1, 1));

  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "my_op: workspace must be 256-byte aligned",
                     (void)rankwise::WorkspaceCarver(base + 64, 1024, MemorySpace::kHost, "my_op"));

  rankwise::WorkspaceCarver empty(nullptr, 0, MemorySpace::kHost, "empty_op");
  CHECK(empty.take<float>(0, 3).empty());
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "empty_op: workspace of 0 bytes is too small, need at least 256",
                     empty.take<float>(1, 1));
  rankwise::WorkspaceCarver null_ws(nullptr, 1024, MemorySpace::kHost, "null_op");
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "null_op: workspace is null",
                     null_ws.take<float>(1, 1));
}

// ---------------------------------------------------------------------------
// TransposeTiling: the GPU transpose kernel's loops, replayed on the host
// ---------------------------------------------------------------------------

TEST_CASE("TransposeTiling: every destination element written once, from the right source",
          "[core][tiling]") {
  using rankwise::TransposeTiling;
  constexpr int kTile = TransposeTiling::kTile;
  constexpr int kPass = TransposeTiling::kRowsPerPass;
  static_assert(kTile % kPass == 0, "each thread row covers kTile / kRowsPerPass tile rows");
  const std::vector<std::pair<std::int64_t, std::int64_t>> shapes = {
      {1, 1}, {1, 70}, {70, 1}, {31, 33}, {32, 32}, {33, 31}, {64, 96}, {65, 97}, {100, 3}};
  for (const auto& shape : shapes) {
    const std::int64_t rows = shape.first, cols = shape.second;  // destination
    const std::int64_t src_ld = rows + 3;                        // source is (cols x rows)
    INFO("destination " << rows << " x " << cols);
    const TransposeTiling t{rows, cols};
    CHECK(t.tiles_down() * kTile >= rows);
    CHECK((t.tiles_down() - 1) * kTile < rows);
    CHECK(t.tiles_across() * kTile >= cols);
    CHECK((t.tiles_across() - 1) * kTile < cols);
    std::vector<std::int64_t> src(static_cast<std::size_t>(cols * src_ld), -1);
    for (std::int64_t r = 0; r < cols; ++r)
      for (std::int64_t c = 0; c < rows; ++c)
        src[static_cast<std::size_t>(r * src_ld + c)] = r * rows + c;
    std::vector<int> hits(static_cast<std::size_t>(rows * cols), 0);
    std::vector<std::int64_t> dst(static_cast<std::size_t>(rows * cols), -1);
    bool reads_in_bounds = true, reads_written_tile = true;
    for (std::int64_t by = 0; by < t.tiles_down(); ++by) {
      for (std::int64_t bx = 0; bx < t.tiles_across(); ++bx) {
        std::int64_t tile[kTile][kTile + 1];
        bool filled[kTile][kTile + 1] = {};
        const std::int64_t tile_row = t.tile_row(by), tile_col = t.tile_col(bx);
        for (int ty = 0; ty < kPass; ++ty)
          for (int tx = 0; tx < kTile; ++tx)
            for (int y = ty; y < kTile; y += kPass) {
              const std::int64_t r = tile_col + y, c = tile_row + tx;
              if (r < cols && c < rows) {
                reads_in_bounds = reads_in_bounds && c < src_ld;
                tile[y][tx] = src[static_cast<std::size_t>(r * src_ld + c)];
                filled[y][tx] = true;
              }
            }
        for (int ty = 0; ty < kPass; ++ty)
          for (int tx = 0; tx < kTile; ++tx)
            for (int y = ty; y < kTile; y += kPass) {
              const std::int64_t r = tile_row + y, c = tile_col + tx;
              if (r < rows && c < cols) {
                reads_written_tile = reads_written_tile && filled[tx][y];
                dst[static_cast<std::size_t>(r * cols + c)] = tile[tx][y];
                ++hits[static_cast<std::size_t>(r * cols + c)];
              }
            }
      }
    }
    CHECK(reads_in_bounds);
    CHECK(reads_written_tile);
    std::int64_t wrong_hits = 0, wrong_values = 0;
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < cols; ++c) {
        wrong_hits += hits[static_cast<std::size_t>(r * cols + c)] != 1;
        wrong_values += dst[static_cast<std::size_t>(r * cols + c)] != c * rows + r;  // src[c][r]
      }
    CHECK(wrong_hits == 0);
    CHECK(wrong_values == 0);
  }
}

// ---------------------------------------------------------------------------
// random.hpp
// ---------------------------------------------------------------------------

TEST_CASE("random: SplitMix64 known answers", "[core][random]") {
  // The first outputs of the SplitMix64 reference generator seeded with 0
  // (state advanced by the golden-ratio increment, then the finaliser).
  CHECK(rankwise::mix64(0x9e3779b97f4a7c15ULL) == 0xe220a8397b1dcdafULL);
  CHECK(rankwise::mix64(2 * 0x9e3779b97f4a7c15ULL) == 0x6e789e6aa1b965f4ULL);
  CHECK(rankwise::mix64(3 * 0x9e3779b97f4a7c15ULL) == 0x06c45d188009454fULL);
}

TEST_CASE("random: deterministic, in range, 53-bit, streams differ",
          "[core][random][determinism]") {
  const std::uint64_t seed = 20240601;
  INFO("seed " << seed);
  for (std::uint64_t i = 0; i < 1000; ++i) {
    const double u = rankwise::uniform01(seed, i);
    REQUIRE(u == rankwise::uniform01(seed, i));
    REQUIRE(u >= 0.0);
    REQUIRE(u < 1.0);
    const double scaled = std::ldexp(u, 53);
    REQUIRE(scaled == std::floor(scaled));  // a multiple of 2^-53
    const double v = rankwise::uniform(seed, i, -0.5, 0.25);
    REQUIRE(v >= -0.5);
    REQUIRE(v < 0.25);
  }
  // The device computes lo + (hi - lo) u as one correctly rounded FMA
  // (__fma_rn); the host must give the same bits whatever the compiler's
  // contraction flags, so it is held to std::fma, draw by draw. PEFT's
  // symmetric bound makes the sum cancel, so a separately rounded product
  // would show in about half of these draws.
  const double b = 1.0 / std::sqrt(37.0);
  int differ = 0;
  for (std::uint64_t i = 0; i < 20000; ++i) {
    differ += rankwise::uniform(seed, i, -b, b) != std::fma(2 * b, rankwise::uniform01(seed, i), -b);
  }
  CHECK(differ == 0);
  int same_index = 0, other_seed_equal = 0;
  for (std::uint64_t i = 0; i < 1000; ++i) {
    same_index += rankwise::uniform01(seed, i) == rankwise::uniform01(seed, i + 1);
    other_seed_equal += rankwise::uniform01(seed, i) == rankwise::uniform01(seed + 1, i);
  }
  CHECK(same_index == 0);
  CHECK(other_seed_equal == 0);
  CHECK(rankwise::substream(seed, 0) == rankwise::substream(seed, 0));
  CHECK(rankwise::substream(seed, 0) != rankwise::substream(seed, 1));
  CHECK(rankwise::substream(seed, 0) != rankwise::substream(seed + 1, 0));
  CHECK(rankwise::substream(seed, 0) != seed);
}

TEST_CASE("random: roughly uniform", "[core][random]") {
  const std::uint64_t seed = 7;
  const int n = 100000, bins = 16;
  INFO("seed " << seed << ", " << n << " draws");
  double sum = 0.0, sum_sq = 0.0, lag = 0.0, prev = 0.0;
  std::vector<int> hist(bins, 0);
  for (int i = 0; i < n; ++i) {
    const double u = rankwise::uniform01(seed, static_cast<std::uint64_t>(i));
    sum += u;
    sum_sq += u * u;
    if (i > 0) lag += (u - 0.5) * (prev - 0.5);
    prev = u;
    ++hist[static_cast<std::size_t>(u * bins)];
  }
  const double mean = sum / n;
  const double var = sum_sq / n - mean * mean;
  const double corr = lag / (n - 1) / (1.0 / 12.0);
  double chi2 = 0.0;
  for (int h : hist) chi2 += (h - n / double(bins)) * (h - n / double(bins)) / (n / double(bins));
  CAPTURE(mean, var, corr, chi2);
  // Five standard errors: sd(mean) = sqrt(1/12 / n) = 9.1e-4, sd(var) =
  // sqrt((1/80 - 1/144) / n) = 2.4e-4, sd(corr) = 1/sqrt(n) = 3.2e-3; chi2
  // with 15 degrees of freedom exceeds 45 with probability 1e-4.
  CHECK(std::abs(mean - 0.5) < 5 * 9.1e-4);
  CHECK(std::abs(var - 1.0 / 12.0) < 5 * 2.4e-4);
  CHECK(std::abs(corr) < 5 * 3.2e-3);
  CHECK(chi2 < 45.0);
}

// ---------------------------------------------------------------------------
// CPU buffer and the backend primitives
// ---------------------------------------------------------------------------

TEST_CASE("Buffer<CpuBackend>: alignment, views, sizes", "[cpu][buffer]") {
  rankwise::Buffer<rankwise::CpuBackend, float> buf(15);
  CHECK(buf.size() == 15);
  CHECK(reinterpret_cast<std::uintptr_t>(buf.data()) % 64 == 0);
  const auto v = buf.view(3, 5);
  CHECK(v.data == buf.data());
  CHECK(v.space == MemorySpace::kHost);
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "Buffer::view: shape (4 x 4) does not match 15 elements", buf.view(4, 4));
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "Buffer: size must be non-negative, got -2",
                     buf.resize(-2));
  buf.resize(0);
  CHECK(buf.size() == 0);
  CHECK(buf.data() == nullptr);
  rankwise::Buffer<rankwise::CpuBackend, double> empty(0);
  CHECK(empty.view(0, 9).empty());
}

RWTEST_KERNEL_TEST_CASES(rwtest::CpuHarness, "[cpu]", float, double)
RWTEST_UNIT_KERNEL_TEST_CASES(rwtest::CpuHarness, "[cpu]", float, double)
