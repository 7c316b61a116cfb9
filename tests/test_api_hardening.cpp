// Sizes, views, indices, allocations and overlaps at the API boundary (issue
// 13, items 9-13): each bad input throws rankwise::error naming it, before any
// work and without touching memory it does not own.
#include <catch2/catch.hpp>
#include <cstdint>
#include <limits>
#include <vector>

#include "rankwise/merge/baselines.hpp"
#include "support/harness_cpu.hpp"

using Catch::Matchers::Contains;
using rankwise::CpuBackend;
using rankwise::ErrorCode;
using rankwise::host_view;
using rankwise::MatrixView;
using rankwise::MemorySpace;

namespace {

constexpr std::int64_t kTwo24 = std::int64_t(1) << 24;
constexpr std::int64_t kTwo32 = std::int64_t(1) << 32;
constexpr std::int64_t kTwo40 = std::int64_t(1) << 40;
constexpr std::int64_t kInt64Max = std::numeric_limits<std::int64_t>::max();

// The code of the rankwise::error `f` throws (or rwtest's "none" value).
template <class F>
ErrorCode code_of(F&& f) {
  return rwtest::error_code_of(f);
}

// A view of `rows` x `cols` over `storage`, for calls that must throw before
// they read a single element: the pointer is real, the extent is not.
template <class T>
MatrixView<T> claimed_view(std::vector<T>& storage, std::int64_t rows, std::int64_t cols) {
  return MatrixView<T>(storage.data(), rows, cols, MemorySpace::kHost);
}

rankwise::RouterConfig router_config(std::int64_t r, std::int64_t k) {
  rankwise::RouterConfig cfg;
  cfg.num_units = r;
  cfg.top_k = k;
  cfg.group_size = 1;
  return cfg;
}

// Owned routing outputs for n tokens under cfg.
struct Routing {
  std::vector<float> scores, gates;
  std::vector<std::int32_t> experts, units, counts;
  Routing(std::int64_t n, const rankwise::RouterConfig& cfg)
      : scores(static_cast<std::size_t>(n * cfg.num_experts())),
        gates(static_cast<std::size_t>(n * cfg.top_k)),
        experts(static_cast<std::size_t>(n * cfg.choices_per_token())),
        units(static_cast<std::size_t>(n * cfg.top_k)),
        counts(static_cast<std::size_t>(cfg.num_choices())) {}
  rankwise::RoutingBuffers<float> buffers(std::int64_t n, const rankwise::RouterConfig& cfg) {
    return {host_view(scores.data(), n, cfg.num_experts()),
            host_view(experts.data(), n, cfg.choices_per_token()),
            host_view(units.data(), n, cfg.top_k), host_view(gates.data(), n, cfg.top_k),
            host_view(counts.data(), 1, cfg.num_choices())};
  }
};

std::vector<float> ramp(std::int64_t size, float step = 0.01f) {
  std::vector<float> v(static_cast<std::size_t>(size));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = step * static_cast<float>(i % 17) - 0.05f;
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------
// 9. Size products are overflow-checked
// ---------------------------------------------------------------------------

TEST_CASE("checked size helpers throw naming the sizes", "[hardening][sizes]") {
  CHECK(rankwise::checked_mul(3, 5, "m") == 15);
  CHECK(rankwise::checked_elements(0, kInt64Max, "e") == 0);
  CHECK(rankwise::checked_bytes(10, 8, "b") == 80u);
  CHECK(rankwise::checked_align_up(257, 256, "a") == 512u);
  REQUIRE_THROWS_WITH(rankwise::checked_mul(kTwo32, kTwo32, "rank * d_in"),
                      Contains("rank * d_in: 4294967296 * 4294967296 overflows int64"));
  REQUIRE_THROWS_WITH(rankwise::checked_mul(-2, 3, "m"),
                      Contains("m: sizes must be non-negative, got -2 and 3"));
  REQUIRE_THROWS_WITH(rankwise::checked_add(kInt64Max, 1, "sum"),
                      Contains("sum: 9223372036854775807 + 1 overflows int64"));
  REQUIRE_THROWS_WITH(rankwise::checked_elements(kTwo40, kTwo24, "H (n x r)"),
                      Contains("H (n x r): shape (1099511627776 x 16777216) has more elements"));
  REQUIRE_THROWS_WITH(rankwise::checked_bytes(std::int64_t(1) << 61, 8, "buf"),
                      Contains("buf: 2305843009213693952 elements of 8 bytes overflow"));
  REQUIRE_THROWS_WITH(rankwise::checked_align_up(std::size_t(kInt64Max), 256, "ws"),
                      Contains("ws: 9223372036854775807 bytes rounded up to 256 overflow"));
  CHECK(code_of([] { rankwise::checked_mul(kTwo32, kTwo32, "x"); }) == ErrorCode::kInvalidArgument);
}

TEST_CASE("workspace sizes overflow into an error, not into 0", "[hardening][sizes]") {
  const rankwise::RouterConfig cfg = router_config(64, 8);
  // n = 2^40 tokens at rank 2^24: n · r = 2^64 wrapped to a 0-byte workspace.
  REQUIRE_THROWS_WITH(rankwise::lora_forward_workspace_bytes<float>(kTwo40, kTwo24),
                      Contains("lora_forward workspace H (n x r): shape (1099511627776 x "
                               "16777216) has more elements than int64 holds"));
  REQUIRE_THROWS_WITH(rankwise::lora_backward_workspace_bytes<float>(kTwo40, kTwo24),
                      Contains("(1099511627776 x 16777216)"));
  // Each block fits, their sum does not.
  REQUIRE_THROWS_WITH(
      rankwise::lora_backward_workspace_bytes<double>(std::int64_t(1) << 29, std::int64_t(1) << 30),
      Contains("lora_backward workspace H, dH (n x r)") && Contains("overflow"));
  REQUIRE_THROWS_WITH(rankwise::rank_units_forward_workspace_bytes<float>(kTwo40, 8, kTwo24),
                      Contains("rank_units_forward workspace (n x r): shape (1099511627776 x "
                               "16777216)"));
  REQUIRE_THROWS_WITH(rankwise::rank_units_backward_workspace_bytes<float>(kTwo40, kTwo24, 64),
                      Contains("rank_units_backward workspace (n x k): shape (1099511627776 x "
                               "16777216)"));
  REQUIRE_THROWS_WITH(rankwise::router_forward_workspace_bytes<float>(kInt64Max / 2, cfg),
                      Contains("router_forward workspace logits (n x E)"));
  REQUIRE_THROWS_WITH(rankwise::router_backward_workspace_bytes<float>(kInt64Max / 2, cfg),
                      Contains("router_backward workspace (n x E)"));
  REQUIRE_THROWS_WITH(rankwise::workspace_block_bytes<float>(-1, 4),
                      Contains("workspace block: shape (-1 x 4) has a negative extent"));
  // Sizes that fit are unchanged.
  CHECK(rankwise::lora_forward_workspace_bytes<float>(3, 5) == 256u);
  CHECK(rankwise::lora_backward_workspace_bytes<float>(3, 5) == 512u);
}

TEST_CASE("lora_forward with n = 2^40, r = 2^24 refuses its workspace", "[hardening][sizes]") {
  rankwise::CpuContext ctx;
  // d_out = 0 keeps y empty, so the claimed extents of x and a (never read)
  // meet no overlap check and the workspace size is what fails.
  std::vector<float> storage(64);
  auto claimed = [&](std::int64_t rows, std::int64_t cols) {
    return MatrixView<float>(storage.data(), rows, cols, MemorySpace::kHost);
  };
  alignas(256) unsigned char workspace[256];
  REQUIRE_THROWS_WITH(
      (rankwise::lora_forward<CpuBackend, float>(ctx, 1.0, claimed(kTwo40, 1), claimed(kTwo24, 1),
                                                 claimed(kTwo24, 0), claimed(kTwo40, 0), workspace,
                                                 sizeof workspace)),
      Contains("lora_forward: shape (1099511627776 x 16777216) has more elements than int64"));
  for (float v : storage) CHECK(v == 0.0f);
}

TEST_CASE("layer and buffer sizes overflow into an error", "[hardening][sizes]") {
  rankwise::CpuContext ctx;
  // rank = d_in = d_out = 2^32: every buffer size wrapped to 0.
  const rankwise::LoraConfig huge{kTwo32, kTwo32, kTwo32, 8.0};
  REQUIRE_THROWS_WITH((rankwise::Lora<float, CpuBackend>(ctx, huge)),
                      Contains("Lora: A (r x d_in): shape (4294967296 x 4294967296) has more "
                               "elements than int64 holds"));
  rankwise::SmoraConfig sc;
  sc.d_in = std::int64_t(1) << 60;
  sc.d_out = 16;
  REQUIRE_THROWS_WITH((rankwise::Smora<float, CpuBackend>(ctx, sc)),
                      Contains("Smora: A (r x d_in): shape (64 x 1152921504606846976)"));
  REQUIRE_THROWS_WITH((rankwise::Lego<float, CpuBackend>(ctx, kTwo40, 4, kTwo24)),
                      Contains("Lego: A (k x d_in): shape (16777216 x 1099511627776)"));
  REQUIRE_THROWS_WITH((rankwise::Lego<float, CpuBackend>(ctx, 4, 4, kTwo32)),
                      Contains("Lego: rank 4294967296 exceeds the int32 unit indices"));
  rankwise::ShardPoolConfig pc;
  pc.d_in = pc.d_out = 4;
  pc.num_layers = kTwo32;
  pc.equivalent_rank = kTwo32;
  pc.shards_per_vector = 2;
  REQUIRE_THROWS_WITH((rankwise::ShardPool<float, CpuBackend>(ctx, pc)),
                      Contains("ShardPoolConfig: v · L: 4294967296 * 4294967296 overflows"));
  {
    rankwise::ShardPoolConfig small;
    small.d_in = small.d_out = 4;
    rankwise::MosConfig mc;
    mc.rank = std::int64_t(1) << 62;
    REQUIRE_THROWS_WITH(mc.validate(small), Contains("MosConfig: index list length r · l: "
                                                     "4611686018427387904 * 2 overflows"));
  }
  pc.num_layers = kTwo24;
  pc.equivalent_rank = 1024;
  REQUIRE_THROWS_WITH((rankwise::ShardPool<float, CpuBackend>(ctx, pc)),
                      Contains("shards exceeds the int32 shard indices"));
  REQUIRE_THROWS_WITH((rankwise::Buffer<CpuBackend, double>(std::int64_t(1) << 61)),
                      Contains("Buffer: 2305843009213693952 elements of 8 bytes overflow"));
  rankwise::Buffer<CpuBackend, float> small(12);
  REQUIRE_THROWS_WITH(small.view(kTwo32, kTwo32), Contains("Buffer::view: shape (4294967296 x "
                                                           "4294967296) has more elements"));
}

// ---------------------------------------------------------------------------
// 10. Negative extents and leading dimensions
// ---------------------------------------------------------------------------

TEST_CASE("check_view refuses negative extents and leading dimensions", "[hardening][views]") {
  std::vector<float> storage(64);
  REQUIRE_THROWS_WITH(rankwise::check_view(host_view(storage.data(), -3, 4), "x (n x d_in)", -3, 4,
                                           MemorySpace::kHost),
                      Contains("x (n x d_in): shape (-3 x 4) has a negative extent"));
  REQUIRE_THROWS_WITH(
      rankwise::check_view(host_view(storage.data(), 2, -4), "w", 2, -4, MemorySpace::kHost),
      Contains("w: shape (2 x -4) has a negative extent"));
  // ld = -5 was taken as "contiguous"; only the default -1 means that.
  const MatrixView<float> negative_ld = host_view(storage.data(), 4, 3, -5);
  CHECK(negative_ld.ld == -5);
  CHECK(host_view(storage.data(), 4, 3).ld == 3);
  REQUIRE_THROWS_WITH(rankwise::check_view(negative_ld, "x (n x d_in)", 4, 3, MemorySpace::kHost),
                      Contains("x (n x d_in): leading dimension -5 is negative"));
  REQUIRE_THROWS_WITH(
      rankwise::check_view(host_view(storage.data(), 1, 3, -5), "row", 1, 3, MemorySpace::kHost),
      Contains("row: leading dimension -5 is negative"));
  // ld = 0 is only for the broadcast routing views, not for a matrix argument.
  REQUIRE_THROWS_WITH(
      rankwise::check_view(host_view(storage.data(), 4, 3, 0), "y", 4, 3, MemorySpace::kHost),
      Contains("y: leading dimension 0 is smaller than its 3 columns"));
  // A view no pointer can address.
  REQUIRE_THROWS_WITH(rankwise::check_view(claimed_view(storage, kTwo40, kTwo32), "x", kTwo40,
                                           kTwo32, MemorySpace::kHost),
                      Contains("x: shape (1099511627776 x 4294967296) with leading dimension "
                               "4294967296 spans more than int64 bytes"));
  CHECK_NOTHROW(
      rankwise::check_view(host_view(storage.data(), 4, 3, 5), "ok", 4, 3, MemorySpace::kHost));
  // row_block with a count whose end overflows.
  REQUIRE_THROWS_WITH(host_view(storage.data(), 4, 3).row_block(1, kInt64Max),
                      Contains("row_block: rows [1, 9223372036854775807) out of range"));
}

TEST_CASE("Lora, Mos and Lego refuse negative rows and ld", "[hardening][views]") {
  rankwise::CpuContext ctx;
  rankwise::Lora<float, CpuBackend> lora(ctx, {4, 3, 2, 2.0});
  std::vector<float> x(64), y(64);
  REQUIRE_THROWS_WITH(
      lora.forward(host_view<const float>(x.data(), -2, 4), host_view(y.data(), -2, 3)),
      Contains("x (n x d_in): shape (-2 x 4) has a negative extent"));
  REQUIRE_THROWS_WITH(
      lora.forward(host_view<const float>(x.data(), 3, 4, -5), host_view(y.data(), 3, 3)),
      Contains("x (n x d_in): leading dimension -5 is negative"));
  REQUIRE_THROWS_WITH(
      lora.backward(host_view<const float>(x.data(), 3, 4), host_view<const float>(y.data(), 3, 3),
                    host_view(x.data() + 32, -3, 4)),
      Contains("dx (n x d_in): shape (-3 x 4) has a negative extent"));

  rankwise::Lego<float, CpuBackend> lego(ctx, 4, 3, 2);
  REQUIRE_THROWS_WITH(
      lego.forward(host_view<const float>(x.data(), -1, 4), host_view(y.data(), -1, 3)),
      Contains("x (n x d_in): shape (-1 x 4) has a negative extent"));

  rankwise::ShardPoolConfig pc;
  pc.d_in = 4;
  pc.d_out = 4;
  pc.num_layers = 2;
  pc.equivalent_rank = 2;
  pc.private_rank = 1;
  pc.shards_per_vector = 2;
  rankwise::ShardPool<float, CpuBackend> pool(ctx, pc);
  rankwise::MosConfig mc;
  mc.rank = 2;
  rankwise::Mos<float, CpuBackend> mos(pool, 0, mc);
  REQUIRE_THROWS_WITH(
      mos.forward(host_view<const float>(x.data(), -4, 4), host_view(y.data(), -4, 4)),
      Contains("x (n x d_in): shape (-4 x 4) has a negative extent"));
  REQUIRE_THROWS_WITH(
      mos.forward(host_view<const float>(x.data(), 3, 4), host_view(y.data(), 3, 4, -5)),
      Contains("y (n x d_out): leading dimension -5 is negative"));
}

// ---------------------------------------------------------------------------
// 11. Unit and expert indices
// ---------------------------------------------------------------------------

TEST_CASE("rank_units_forward / backward refuse unit indices outside [0, r)",
          "[hardening][indices]") {
  rankwise::CpuContext ctx;
  const std::int64_t n = 6, d_in = 5, d_out = 4, r = 8, k = 3;
  const std::vector<float> x = ramp(n * d_in), a = ramp(r * d_in), bt = ramp(r * d_out),
                           dy = ramp(n * d_out), gates = ramp(n * k, 0.1f);
  const std::vector<float> y0 = ramp(n * d_out, 0.02f);
  std::vector<std::int32_t> units(static_cast<std::size_t>(n * k));
  for (std::size_t i = 0; i < units.size(); ++i) units[i] = static_cast<std::int32_t>(i % r);
  for (const std::int32_t bad : {std::int32_t(r), std::int32_t(1000000), std::int32_t(-1)}) {
    for (const auto path : {rankwise::RankUnitPath::kSparse, rankwise::RankUnitPath::kDense}) {
      CAPTURE(bad, path == rankwise::RankUnitPath::kSparse);
      std::vector<std::int32_t> u = units;
      u[5] = bad;  // token 1, slot 2
      const rankwise::UnitRouting<float> routing{host_view<const std::int32_t>(u.data(), n, k),
                                                 host_view<const float>(gates.data(), n, k)};
      rankwise::Buffer<CpuBackend, unsigned char> ws(
          static_cast<std::int64_t>(rankwise::rank_units_backward_workspace_bytes<float>(n, k, r)));
      std::vector<float> y = y0;
      const std::string expected =
          "routing: 1 of 18 unit indices in units (6 x 3) are outside "
          "[0, r = 8); the first is units[1][2] = " +
          std::to_string(bad);
      REQUIRE_THROWS_WITH(
          (rankwise::rank_units_forward<CpuBackend, float>(
              ctx, 1.0, host_view(x.data(), n, d_in), host_view(a.data(), r, d_in),
              host_view(bt.data(), r, d_out), routing, host_view(y.data(), n, d_out), path,
              ws.data(), static_cast<std::size_t>(ws.size()))),
          Contains("rank_units_forward: " + expected));
      CHECK(y == y0);  // nothing written
      std::vector<float> dx(static_cast<std::size_t>(n * d_in), 0.5f), da(r * d_in, 0.5f),
          dbt(r * d_out, 0.5f);
      REQUIRE_THROWS_WITH(
          (rankwise::rank_units_backward<CpuBackend, float>(
              ctx, 1.0, host_view(x.data(), n, d_in), host_view(a.data(), r, d_in),
              host_view(bt.data(), r, d_out), routing, host_view(dy.data(), n, d_out),
              host_view(dx.data(), n, d_in), host_view(da.data(), r, d_in),
              host_view(dbt.data(), r, d_out), MatrixView<float>(), false, path, ws.data(),
              static_cast<std::size_t>(ws.size()))),
          Contains("rank_units_backward: " + expected));
      for (float v : da) CHECK(v == 0.5f);
    }
  }
  // A broadcast row (ld = 0) is scanned as the one row it is.
  std::vector<std::int32_t> row = {0, 9, 2};
  const rankwise::UnitRouting<float> broadcast{
      MatrixView<const std::int32_t>(row.data(), n, k, MemorySpace::kHost, 0),
      MatrixView<const float>(gates.data(), n, k, MemorySpace::kHost, 0)};
  rankwise::Buffer<CpuBackend, unsigned char> ws(
      static_cast<std::int64_t>(rankwise::rank_units_forward_workspace_bytes<float>(n, k, r)));
  std::vector<float> y = y0;
  REQUIRE_THROWS_WITH(
      (rankwise::rank_units_forward<CpuBackend, float>(
          ctx, 1.0, host_view(x.data(), n, d_in), host_view(a.data(), r, d_in),
          host_view(bt.data(), r, d_out), broadcast, host_view(y.data(), n, d_out),
          rankwise::RankUnitPath::kSparse, ws.data(), static_cast<std::size_t>(ws.size()))),
      Contains("1 of 3 unit indices in units (6 x 3) are outside [0, r = 8); the "
               "first is units[0][1] = 9"));
  // Valid indices, k > r included (repeats add up), still run.
  std::vector<std::int32_t> many(static_cast<std::size_t>(n * (r + 2)));
  for (std::size_t i = 0; i < many.size(); ++i) many[i] = static_cast<std::int32_t>(i % r);
  const std::vector<float> many_gates = ramp(n * (r + 2), 0.1f);
  rankwise::Buffer<CpuBackend, unsigned char> wide(
      static_cast<std::int64_t>(rankwise::rank_units_forward_workspace_bytes<float>(n, r + 2, r)));
  CHECK_NOTHROW(rankwise::rank_units_forward<CpuBackend, float>(
      ctx, 1.0, host_view(x.data(), n, d_in), host_view(a.data(), r, d_in),
      host_view(bt.data(), r, d_out),
      {host_view<const std::int32_t>(many.data(), n, r + 2),
       host_view<const float>(many_gates.data(), n, r + 2)},
      host_view(y.data(), n, d_out), rankwise::RankUnitPath::kAuto, wide.data(),
      static_cast<std::size_t>(wide.size())));
}

TEST_CASE("k > r is refused for the router", "[hardening][indices]") {
  rankwise::CpuContext ctx;
  rankwise::SmoraConfig sc;
  sc.d_in = 4;
  sc.d_out = 4;
  sc.router = router_config(8, 9);
  REQUIRE_THROWS_WITH((rankwise::Smora<float, CpuBackend>(ctx, sc)),
                      Contains("RouterConfig.top_k (k) = 9 must be in [1, r = 8]"));
  const std::vector<float> x = ramp(12), wr = ramp(32);
  Routing out(3, router_config(8, 2));
  rankwise::Buffer<CpuBackend, unsigned char> ws(4096);
  REQUIRE_THROWS_WITH(
      (rankwise::router_forward<CpuBackend, float>(
          ctx, router_config(8, 9), host_view(x.data(), 3, 4), host_view(wr.data(), 8, 4), {}, {},
          out.buffers(3, router_config(8, 2)), true, ws.data(), 4096)),
      Contains("top_k (k) = 9 must be in [1, r = 8]"));
}

TEST_CASE("router_backward refuses expert indices outside [0, E)", "[hardening][indices]") {
  rankwise::CpuContext ctx;
  const std::int64_t n = 4, d_in = 5;
  const rankwise::RouterConfig cfg = router_config(8, 2);
  const std::vector<float> x = ramp(n * d_in), wr = ramp(8 * d_in), dgates = ramp(n * 2, 0.1f);
  Routing out(n, cfg);
  rankwise::Buffer<CpuBackend, unsigned char> ws(static_cast<std::int64_t>(
      std::max(rankwise::router_forward_workspace_bytes<float>(n, cfg),
               rankwise::router_backward_workspace_bytes<float>(n, cfg))));
  const auto wsb = static_cast<std::size_t>(ws.size());
  REQUIRE_NOTHROW(rankwise::router_forward<CpuBackend, float>(
      ctx, cfg, host_view(x.data(), n, d_in), host_view(wr.data(), 8, d_in), {}, {},
      out.buffers(n, cfg), true, ws.data(), wsb));
  std::vector<float> dx(static_cast<std::size_t>(n * d_in), 0.25f), dwr(8 * d_in, 0.25f);
  auto backward = [&] {
    rankwise::router_backward<CpuBackend, float>(
        ctx, cfg, host_view(x.data(), n, d_in), host_view(wr.data(), 8, d_in), {}, {},
        out.buffers(n, cfg), host_view(dgates.data(), n, 2), 0.0, host_view(dx.data(), n, d_in),
        host_view(dwr.data(), 8, d_in), false, ws.data(), wsb);
  };
  REQUIRE_NOTHROW(backward());
  for (const std::int32_t bad : {std::int32_t(8), std::int32_t(1000000), std::int32_t(-1)}) {
    CAPTURE(bad);
    const std::int32_t kept = out.experts[7];
    out.experts[7] = bad;  // token 3, slot 1
    std::fill(dwr.begin(), dwr.end(), 0.25f);
    REQUIRE_THROWS_WITH(backward(), Contains("router_backward: routing: 1 of 8 choice indices in "
                                             "routing.experts (4 x 2) are outside [0, E = 8); the "
                                             "first is routing.experts[3][1] = " +
                                             std::to_string(bad)));
    for (float v : dwr) CHECK(v == 0.25f);
    out.experts[7] = kept;
  }
}

TEST_CASE("Smora::backward refuses a routing corrupted after the forward", "[hardening][indices]") {
  rankwise::CpuContext ctx;
  rankwise::SmoraConfig sc;
  sc.d_in = 6;
  sc.d_out = 5;
  sc.router = router_config(8, 2);
  rankwise::Smora<float, CpuBackend> layer(ctx, sc);
  layer.init(3);
  const std::int64_t n = 3;
  const std::vector<float> x = ramp(n * 6), dy = ramp(n * 5);
  std::vector<float> y(static_cast<std::size_t>(n * 5));
  layer.forward(host_view(x.data(), n, 6), host_view(y.data(), n, 5), rankwise::Mode::kTraining);
  layer.routing().units.data[1] = -1;
  REQUIRE_THROWS_WITH(layer.backward(host_view(x.data(), n, 6), host_view(dy.data(), n, 5)),
                      Contains("rank_units_backward: routing: 1 of 6 unit indices in units (3 x 2) "
                               "are outside [0, r = 8); the first is units[0][1] = -1"));
}

// ---------------------------------------------------------------------------
// 12. Allocation failures
// ---------------------------------------------------------------------------

TEST_CASE("merge_svd / merge_ties refuse a rank no module can need", "[hardening][alloc]") {
  rankwise::merge::MergeInput in;
  for (int t = 0; t < 2; ++t) {
    rankwise::merge::LoraFactors f;
    f.a = Eigen::MatrixXd::Constant(3, 12, 0.1 * (t + 1));
    f.b = Eigen::MatrixXd::Constant(10, 3, 0.2);
    in.sources.push_back(f);
  }
  REQUIRE_THROWS_WITH(rankwise::merge::merge_svd(in, 1000000000, "q_proj"),
                      Contains("svd merge of module 'q_proj': rank k = 1000000000 exceeds "
                               "max(d_in, d_out) = 12 (d_out x d_in = 10 x 12); the sources' "
                               "total rank is 6"));
  REQUIRE_THROWS_WITH(rankwise::merge::merge_ties(in, 1000000000, {}, "q_proj"),
                      Contains("ties merge of module 'q_proj': rank k = 1000000000 exceeds "
                               "max(d_in, d_out) = 12"));
  CHECK(rankwise::merge::merge_svd(in, 12, "q_proj").rank() == 12);  // zero padding still allowed
  CHECK(rankwise::merge::merge_ties(in, 4, {}, "q_proj").rank() == 4);
}

TEST_CASE("a failed allocation is out-of-memory naming the bytes", "[hardening][alloc]") {
  // 2^60 bytes: beyond any address space, so the allocation fails everywhere.
  const std::int64_t elements = std::int64_t(1) << 58;
  auto allocate = [&] { rankwise::Buffer<CpuBackend, float> b(elements); };
  REQUIRE_THROWS_WITH(allocate(), Contains("Buffer: out of memory allocating 1152921504606846976 "
                                           "bytes (288230376151711744 elements of 4 bytes)"));
  CHECK(code_of(allocate) == ErrorCode::kOutOfMemory);

  // A 2^52-token forward: the shapes are valid, the workspace (n x r floats,
  // 2^60 bytes) cannot be had; reported before x is read.
  rankwise::CpuContext ctx;
  rankwise::Lora<float, CpuBackend> lora(ctx, {4, 4, 64, 8.0});
  std::vector<float> x(16), y(16);
  const std::int64_t n = std::int64_t(1) << 52;
  auto forward = [&] { lora.forward(claimed_view(x, n, 4), claimed_view(y, n, 4)); };
  REQUIRE_THROWS_WITH(forward(), Contains("out of memory allocating 1152921504606846976 bytes"));
  CHECK(code_of(forward) == ErrorCode::kOutOfMemory);
  // The layer still works afterwards.
  CHECK_NOTHROW(lora.forward(host_view<const float>(x.data(), 4, 4), host_view(y.data(), 4, 4)));
}

// ---------------------------------------------------------------------------
// 13. Overlaps
// ---------------------------------------------------------------------------

TEST_CASE("outputs overlapping the workspace or their operands are refused",
          "[hardening][overlap]") {
  rankwise::CpuContext ctx;
  const std::int64_t n = 2, d = 3, r = 2;
  std::vector<float> x = ramp(n * d), a = ramp(r * d), bt = ramp(r * d);
  rankwise::Buffer<CpuBackend, float> ws(256);
  const auto bytes = static_cast<std::size_t>(ws.size()) * sizeof(float);
  auto xv = host_view<const float>(x.data(), n, d);
  auto av = host_view<const float>(a.data(), r, d);
  auto btv = host_view<const float>(bt.data(), r, d);
  // y inside the workspace block H that lora_forward carves.
  REQUIRE_THROWS_WITH((rankwise::lora_forward<CpuBackend, float>(
                          ctx, 1.0, xv, av, btv, host_view(ws.data() + 1, n, d), ws.data(), bytes)),
                      Contains("lora_forward: y (n x d_out) (2 x 3) overlaps the 256 workspace "
                               "bytes in use"));
  // y past the carved block is fine: the rest of the workspace is the caller's.
  CHECK_NOTHROW(rankwise::lora_forward<CpuBackend, float>(
      ctx, 1.0, xv, av, btv, host_view(ws.data() + 128, n, d), ws.data(), bytes));
  // y over bt.
  REQUIRE_THROWS_WITH(
      (rankwise::lora_forward<CpuBackend, float>(ctx, 1.0, xv, av, btv, host_view(bt.data(), n, d),
                                                 ws.data(), bytes)),
      Contains("lora_forward: y (n x d_out) (2 x 3) overlaps bt (r x d_out) (2 x 3) in memory"));
  // y = x in place is allowed: x is read before y is written.
  CHECK_NOTHROW(rankwise::lora_forward<CpuBackend, float>(
      ctx, 1.0, xv, av, btv, host_view(x.data(), n, d), ws.data(), bytes));
  // lora_backward: da over x.
  std::vector<float> dy = ramp(n * d), dbt(r * d);
  std::vector<float> xa = ramp(n * d);  // x and da share it (r == n)
  REQUIRE_THROWS_WITH(
      (rankwise::lora_backward<CpuBackend, float>(
          ctx, 1.0, host_view<const float>(xa.data(), n, d), av, btv,
          host_view<const float>(dy.data(), n, d), MatrixView<float>(), host_view(xa.data(), r, d),
          host_view(dbt.data(), r, d), false, ws.data(), bytes)),
      Contains("lora_backward: da (r x d_in) (2 x 3) overlaps x (n x d_in)"));

  // rank_units_forward: y over a.
  std::vector<std::int32_t> units = {0, 1, 1, 0};
  std::vector<float> gates = {1.0f, 0.5f, 0.25f, 2.0f};
  REQUIRE_THROWS_WITH(
      (rankwise::rank_units_forward<CpuBackend, float>(
          ctx, 1.0, xv, av, btv,
          {host_view<const std::int32_t>(units.data(), n, 2),
           host_view<const float>(gates.data(), n, 2)},
          host_view(a.data(), n, d), rankwise::RankUnitPath::kSparse, ws.data(), bytes)),
      Contains("rank_units_forward: y (n x d_out) (2 x 3) overlaps a (r x d_in)"));
  // ... and y inside the workspace on the dense path.
  REQUIRE_THROWS_WITH(
      (rankwise::rank_units_forward<CpuBackend, float>(
          ctx, 1.0, xv, av, btv,
          {host_view<const std::int32_t>(units.data(), n, 2),
           host_view<const float>(gates.data(), n, 2)},
          host_view(ws.data() + 70, n, d), rankwise::RankUnitPath::kDense, ws.data(), bytes)),
      Contains("rank_units_forward: y (n x d_out) (2 x 3) overlaps the 512 "
               "workspace bytes in use"));
}

TEST_CASE("router outputs overlapping x are refused", "[hardening][overlap]") {
  rankwise::CpuContext ctx;
  const std::int64_t n = 4, d_in = 8;
  const rankwise::RouterConfig cfg = router_config(8, 2);
  std::vector<float> x = ramp(n * d_in);
  const std::vector<float> wr = ramp(8 * d_in);
  Routing out(n, cfg);
  rankwise::Buffer<CpuBackend, unsigned char> ws(
      static_cast<std::int64_t>(rankwise::router_forward_workspace_bytes<float>(n, cfg)));
  rankwise::RoutingBuffers<float> buffers = out.buffers(n, cfg);
  buffers.scores = host_view(x.data(), n, 8);  // (n x E) over x (n x d_in)
  REQUIRE_THROWS_WITH(
      (rankwise::router_forward<CpuBackend, float>(
          ctx, cfg, host_view<const float>(x.data(), n, d_in), host_view(wr.data(), 8, d_in), {},
          {}, buffers, true, ws.data(), static_cast<std::size_t>(ws.size()))),
      Contains("router_forward: routing.scores (4 x 8) overlaps x (n x d_in) "
               "(4 x 8) in memory"));
  // Two outputs sharing memory.
  buffers = out.buffers(n, cfg);
  buffers.units = buffers.experts;
  REQUIRE_THROWS_WITH(
      (rankwise::router_forward<CpuBackend, float>(
          ctx, cfg, host_view<const float>(x.data(), n, d_in), host_view(wr.data(), 8, d_in), {},
          {}, buffers, true, ws.data(), static_cast<std::size_t>(ws.size()))),
      Contains("routing.experts (4 x 2) overlaps routing.units (4 x 2)"));
  CHECK_NOTHROW(rankwise::router_forward<CpuBackend, float>(
      ctx, cfg, host_view<const float>(x.data(), n, d_in), host_view(wr.data(), 8, d_in), {}, {},
      out.buffers(n, cfg), true, ws.data(), static_cast<std::size_t>(ws.size())));
}
