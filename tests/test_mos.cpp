// MoS on the CPU backend (float, double): the shared cases of
// cases/mos_cases.hpp, the index lists (host code, drawn the same for every
// backend), and finite-difference gradients in double.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <set>
#include <vector>

#include "cases/mos_cases.hpp"
#include "support/finite_difference.hpp"
#include "support/harness_cpu.hpp"
#include "support/mos_reference.hpp"
#include "support/mos_tolerance.hpp"

RWTEST_MOS_TEST_CASES(rwtest::CpuHarness, "[cpu]", float, double)

namespace {

using rankwise::MosConfig;
using rankwise::ShardIndices;
using rankwise::ShardPath;
using rwtest::HostMatrix;
using rwtest::MosShape;
using rwtest::ShardList;
using rwtest::mos_cases::list_str;

// ---------------------------------------------------------------------------
// Index lists.

/// The structure the method prescribes for layer `layer`'s list: r · l
/// entries; the first (r − p) · l public (in [0, P0), no repeats; the prefix
/// 0, 1, ... when subset selection is off); then the layer's private block
/// P0 + layer · p · l, ... in order.
void check_list_structure(const MosShape& s, std::int64_t layer, const ShardList& list,
                          bool subset_selection) {
  INFO("list " << list_str(list));
  REQUIRE(static_cast<std::int64_t>(list.size()) == s.r * s.l);
  const std::int64_t pub = (s.r - s.p) * s.l, p0 = (s.v - s.p) * s.num_layers * s.l;
  std::set<std::int32_t> seen;
  for (std::int64_t k = 0; k < pub; ++k) {
    const std::int32_t e = list[static_cast<std::size_t>(k)];
    CAPTURE(k, e);
    CHECK(e >= 0);
    CHECK(e < p0);
    CHECK(seen.insert(e).second);  // without replacement
    if (!subset_selection) CHECK(e == k);
  }
  for (std::int64_t k = 0; k < s.p * s.l; ++k) {
    const std::int32_t e = list[static_cast<std::size_t>(pub + k)];
    CAPTURE(k, e);
    CHECK(e == p0 + layer * s.p * s.l + k);
  }
}

const std::vector<MosShape>& index_shapes() {
  //                                       {d_in, d_out, L, v, p, l, r}
  static const std::vector<MosShape> shapes = {
      {8, 8, 3, 4, 0, 1, 4},  {8, 8, 3, 4, 1, 2, 3},  {8, 8, 2, 3, 1, 4, 4},
      {8, 8, 4, 2, 0, 2, 5},  {8, 8, 5, 2, 1, 1, 3},  {8, 8, 2, 2, 2, 2, 2},
      {8, 8, 4, 4, 1, 2, 6},  {8, 8, 2, 2, 0, 4, 4},  {8, 8, 6, 8, 2, 2, 8},
  };
  return shapes;
}

TEST_CASE("mos indices: drawn lists have the method's structure", "[mos][indices][cpu]") {
  for (const MosShape& s : index_shapes()) {
    for (const bool subset : {true, false}) {
      for (const bool pair : {true, false}) {
        for (const std::uint64_t seed : {0ull, 1ull, 977ull}) {
          for (std::int64_t layer = 0; layer < s.num_layers; ++layer) {
            INFO("shape " << s << ", layer " << layer << ", seed " << seed << ", subset_selection "
                          << subset << ", pair_dissociation " << pair);
            const MosConfig cfg = rwtest::mos_cases::config_for(s, seed, subset, pair);
            const ShardIndices ix = rankwise::draw_shard_indices(s.pool_config(), cfg, layer);
            check_list_structure(s, layer, ix.a, subset);
            check_list_structure(s, layer, ix.b, subset);
            if (!pair) CHECK(ix.b == ix.a);  // no pair dissociation: B uses A's list
            CHECK_NOTHROW(rankwise::check_shard_indices(s.pool_config(), cfg, ix));
          }
        }
      }
    }
  }
}

TEST_CASE("mos indices: seeded, per layer, per list", "[mos][indices][cpu]") {
  const MosShape s{8, 8, 4, 4, 1, 2, 6};  // P0 = 24, 10 public shards per list
  const auto pc = s.pool_config();
  const MosConfig cfg = rwtest::mos_cases::config_for(s, 42);
  // Same (config, layer): same lists, every time.
  for (std::int64_t layer = 0; layer < s.num_layers; ++layer) {
    const ShardIndices first = rankwise::draw_shard_indices(pc, cfg, layer);
    const ShardIndices again = rankwise::draw_shard_indices(pc, cfg, layer);
    CHECK(first.a == again.a);
    CHECK(first.b == again.b);
    // Pair dissociation: I_b is its own draw, not A's.
    INFO("layer " << layer << ": I_a " << list_str(first.a) << ", I_b " << list_str(first.b));
    CHECK(first.a != first.b);
  }
  // Different layers draw different public shards.
  std::set<ShardList> per_layer;
  for (std::int64_t layer = 0; layer < s.num_layers; ++layer) {
    const ShardIndices ix = rankwise::draw_shard_indices(pc, cfg, layer);
    per_layer.insert(ShardList(ix.a.begin(), ix.a.begin() + 10));
    per_layer.insert(ShardList(ix.b.begin(), ix.b.begin() + 10));
  }
  CHECK(per_layer.size() == 2 * static_cast<std::size_t>(s.num_layers));
  // Different seeds draw different lists.
  std::set<ShardList> per_seed;
  for (std::uint64_t seed = 0; seed < 16; ++seed) {
    per_seed.insert(rankwise::draw_shard_indices(pc, rwtest::mos_cases::config_for(s, seed), 1).a);
  }
  CHECK(per_seed.size() == 16u);
  // The seed is MosConfig's: the layer draws from (config.seed, layer).
  rankwise::Context<rankwise::CpuBackend> ctx;
  rankwise::ShardPool<float, rankwise::CpuBackend> pool(ctx, pc);
  for (std::int64_t layer = 0; layer < s.num_layers; ++layer) {
    rankwise::Mos<float, rankwise::CpuBackend> mos(pool, layer, cfg);
    const ShardIndices ix = rankwise::draw_shard_indices(pc, cfg, layer);
    CHECK(mos.indices().a == ix.a);
    CHECK(mos.indices().b == ix.b);
  }
}

TEST_CASE("mos indices: subset selection draws every public shard uniformly",
          "[mos][indices][cpu]") {
  // P0 = 16 public shards, 4 drawn per list: each is drawn with probability
  // 1/4, i.e. 500 times in 2000 draws (sd ≈ 19). A draw from a smaller
  // range, with repeats or with a bias of 20% would leave the ±100 band.
  const MosShape u{8, 8, 4, 4, 2, 2, 4};  // P0 = (4 − 2) · 4 · 2 = 16, (4 − 2) · 2 = 4 drawn
  std::vector<int> count(16, 0), first(16, 0);
  const int draws = 2000;
  for (int seed = 0; seed < draws; ++seed) {
    const ShardIndices ix = rankwise::draw_shard_indices(
        u.pool_config(), rwtest::mos_cases::config_for(u, static_cast<std::uint64_t>(seed)),
        seed % 4);
    for (int k = 0; k < 4; ++k) ++count[static_cast<std::size_t>(ix.a[static_cast<std::size_t>(k)])];
    ++first[static_cast<std::size_t>(ix.b[0])];
  }
  for (int e = 0; e < 16; ++e) {
    CAPTURE(e, count[static_cast<std::size_t>(e)], first[static_cast<std::size_t>(e)]);
    CHECK(std::abs(count[static_cast<std::size_t>(e)] - 500) < 100);
    // The first position alone is uniform too: 2000 / 16 = 125 (sd ≈ 11).
    CHECK(std::abs(first[static_cast<std::size_t>(e)] - 125) < 55);
  }
}

TEST_CASE("mos indices: check_shard_indices and draw_shard_indices reject bad input",
          "[mos][indices][errors][cpu]") {
  const MosShape s{8, 8, 3, 3, 1, 2, 3};  // M = 18
  const auto pc = s.pool_config();
  const MosConfig cfg = rwtest::mos_cases::config_for(s, 5);
  const auto inv = rankwise::ErrorCode::kInvalidArgument;
  RWTEST_CHECK_ERROR(inv, "draw_shard_indices: layer 3 is outside [0, L = 3)",
                     rankwise::draw_shard_indices(pc, cfg, 3));
  ShardIndices ix = rankwise::draw_shard_indices(pc, cfg, 2);
  CHECK_NOTHROW(rankwise::check_shard_indices(pc, cfg, ix));
  ix.b[3] = 18;
  RWTEST_CHECK_ERROR(inv, "I_b[3] = 18 is outside the pool's [0, M = 18)",
                     rankwise::check_shard_indices(pc, cfg, ix));
  ix.b[3] = 17;  // any shard of the pool is allowed, even another layer's
  CHECK_NOTHROW(rankwise::check_shard_indices(pc, cfg, ix));
  ix.a.resize(7);
  RWTEST_CHECK_ERROR(inv, "entries, got 7", rankwise::check_shard_indices(pc, cfg, ix));
  MosConfig big = cfg;
  big.rank = 8;
  RWTEST_CHECK_ERROR(inv, "public shards, but the pool has only P0 = (v − p) · L · l = 12",
                     rankwise::draw_shard_indices(pc, big, 0));
}

// ---------------------------------------------------------------------------
// Finite differences (double).

using H = rwtest::CpuHarness;
using T = double;
using Pool = rankwise::ShardPool<T, H::Backend>;
using Layer = rankwise::Mos<T, H::Backend>;

/// Σ_k Σ w_k ⊙ (y0_k + layer_k(x_k)) with the pool holding (a, b), evaluated
/// by the layers' own forward.
double loss(H::Ctx& ctx, Pool& pool, std::vector<Layer*>& layers, const HostMatrix& a,
            const HostMatrix& b, const std::vector<HostMatrix>& xs,
            const std::vector<rwtest::mos_cases::Batch>& batches, const std::vector<HostMatrix>& ws) {
  rwtest::mos_cases::load_pool<H, T>(ctx, pool, {a, b});
  double total = 0.0;
  for (std::size_t k = 0; k < layers.size(); ++k) {
    const auto x = rwtest::to_device<H, T>(ctx, xs[k]);
    auto y = rwtest::to_device<H, T>(ctx, batches[k].y0);
    layers[k]->forward(x.cview(), y.view());
    total += rwtest::ref_weighted_sum(ws[k], rwtest::to_host<H, T>(ctx, y));
  }
  return total;
}

template <class F>
HostMatrix central_difference(const HostMatrix& base, F evaluate) {
  return rwtest::central_difference(base, rwtest::kLinearStep, evaluate);
}

/// Analytic gradients of the summed loss (pool gradients added over the
/// layers, dx per layer) against central differences in A_pool, B_pool and
/// every layer's x.
void check_against_finite_differences(const MosShape& sh, std::vector<std::int64_t> layer_ids,
                                      ShardPath path, std::uint64_t seed) {
  H::Ctx ctx;
  RWTEST_CONTEXT(H, T, "shape " << sh << ", path " << rwtest::mos_cases::path_name(path), seed);
  Pool pool(ctx, sh.pool_config());
  const rwtest::mos_cases::PoolData d = rwtest::mos_cases::make_pool_data<H, T>(sh, seed);
  const MosConfig cfg = rwtest::mos_cases::config_for(sh, seed);
  std::vector<Layer> owned;
  owned.reserve(layer_ids.size());
  std::vector<Layer*> layers;
  std::vector<rwtest::mos_cases::Batch> batches;
  std::vector<HostMatrix> xs, ws, dxs;
  for (std::size_t k = 0; k < layer_ids.size(); ++k) {
    owned.emplace_back(pool, layer_ids[k], cfg, path);
    batches.push_back(rwtest::mos_cases::make_batch<H, T>(sh, 4, seed * 3 + k));
    xs.push_back(batches.back().x);
    ws.push_back(rwtest::random_matrix(4, sh.d_out, seed * 3 + k + 100));
    INFO("layer " << layer_ids[k] << ": I_a " << list_str(owned.back().indices().a) << ", I_b "
                  << list_str(owned.back().indices().b));
  }
  for (auto& l : owned) layers.push_back(&l);

  // Analytic: backward with dy = ∂L/∂y = w, dx from 0, pool gradients summed.
  rwtest::mos_cases::load_pool<H, T>(ctx, pool, d);
  pool.zero_grad();
  for (std::size_t k = 0; k < layers.size(); ++k) {
    const auto x = rwtest::to_device<H, T>(ctx, xs[k]);
    const auto dw = rwtest::to_device<H, T>(ctx, ws[k]);
    auto dx = rwtest::to_device<H, T>(ctx, HostMatrix(xs[k].rows, sh.d_in));
    layers[k]->backward(x.cview(), dw.cview(), dx.view());
    dxs.push_back(rwtest::to_host<H, T>(ctx, dx));
  }
  const HostMatrix ga = rwtest::mos_cases::host_of<H, T>(ctx, pool.grad_a());
  const HostMatrix gb = rwtest::mos_cases::host_of<H, T>(ctx, pool.grad_b());

  const HostMatrix fd_a = central_difference(
      d.a, [&](const HostMatrix& a) { return loss(ctx, pool, layers, a, d.b, xs, batches, ws); });
  const HostMatrix fd_b = central_difference(
      d.b, [&](const HostMatrix& b) { return loss(ctx, pool, layers, d.a, b, xs, batches, ws); });
  const double tol = rwtest::kMosFiniteDifference;
  RWTEST_CHECK_FINITE_DIFFERENCE(ga, fd_a, tol);
  RWTEST_CHECK_FINITE_DIFFERENCE(gb, fd_b, tol);
  for (std::size_t k = 0; k < layers.size(); ++k) {
    INFO("dx of layer " << layer_ids[k]);
    const HostMatrix fd_x = central_difference(xs[k], [&](const HostMatrix& xk) {
      std::vector<HostMatrix> xs2 = xs;
      xs2[k] = xk;
      return loss(ctx, pool, layers, d.a, d.b, xs2, batches, ws);
    });
    RWTEST_CHECK_FINITE_DIFFERENCE(dxs[k], fd_x, tol);
  }
}

}  // namespace

TEST_CASE("mos: gradients match central finite differences (double)", "[mos][cpu][fd]") {
  // l = 2, p = 1, shard widths 5 and 3: both paths, one layer.
  const MosShape sh{10, 6, 3, 2, 1, 2, 3};
  for (const ShardPath path : {ShardPath::kDirect, ShardPath::kAssembled}) {
    check_against_finite_differences(sh, {2}, path, 31337);
  }
  // l = 4 and a shard list using every public shard.
  check_against_finite_differences({12, 8, 2, 2, 0, 4, 4}, {1}, ShardPath::kDirect, 4242);
}

TEST_CASE("mos: shared-pool gradients match finite differences of the summed loss (double)",
          "[mos][cpu][fd]") {
  // Three layers over one pool (P0 = 6, 4 public shards per list, so the
  // layers overlap): ∂(L_0 + L_1 + L_2)/∂pool is what the three backward
  // calls leave in the pool's gradients.
  const MosShape sh{10, 6, 3, 2, 1, 2, 3};
  check_against_finite_differences(sh, {0, 1, 2}, ShardPath::kDirect, 777);
  check_against_finite_differences(sh, {0, 1, 2}, ShardPath::kAssembled, 778);
}
