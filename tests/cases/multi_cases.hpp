// Multi-adapter unit pool test bodies, written once over a harness H
// (support/harness_*.hpp) and a storage type T, instantiated for every backend
// by RWTEST_MULTI_TEST_CASES. A pool holding LoRA adapters of ranks
// {1, 3, 8, 16, 64} (α/r and rsLoRA scales), a SMoRA and a block MoE-LoRA
// adapter and a MoS adapter serves batches of unsorted ids with "no adapter"
// tokens. The expected result is each adapter applied alone: the plain-loop
// double reference (support/reference.hpp) for LoRA and MoS, the adapter's own
// Smora layer on the same backend for SMoRA (that layer is checked against its
// double reference in smora_cases.hpp; routing is a discontinuous function,
// so the pool must reproduce the layer's routing of the same rows exactly).
// Tolerances: tolerance<T>(4, d_in + d_out + r) normwise (four roundings to T
// of H, y and the gathers; accumulations over d_in, r and the tokens).
#pragma once

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "rankwise/core/lora_config.hpp"
#include "rankwise/core/numeric.hpp"
#include "rankwise/core/shard_config.hpp"
#include "rankwise/layers/lora.hpp"
#include "rankwise/layers/mos.hpp"
#include "rankwise/layers/shard_pool.hpp"
#include "rankwise/layers/smora.hpp"
#include "rankwise/layers/unit_pool.hpp"
#include "support/compare.hpp"
#include "support/harness_common.hpp"
#include "support/reference.hpp"
#include "support/tolerance.hpp"

namespace rwtest {
namespace multi_cases {

using rankwise::AdapterId;
using rankwise::AdapterKind;
using rankwise::ErrorCode;
using rankwise::kNoAdapter;
using rankwise::MatrixView;
using rankwise::Mode;

inline constexpr std::int64_t kDin = 24, kDout = 20;

/// One adapter of the pool, with the layer it was built from: the reference.
template <class H, class T>
struct Entry {
  using Backend = typename H::Backend;
  AdapterKind kind = AdapterKind::kLora;
  AdapterId id = kNoAdapter;
  std::int64_t rank = 0;
  double scale = 0.0;
  HostMatrix a, b;  // plain kinds: the stored A (r x d_in), B (d_out x r)
  std::unique_ptr<rankwise::Lora<T, Backend>> lora;
  std::unique_ptr<rankwise::Smora<T, Backend>> smora;
  std::unique_ptr<rankwise::Mos<T, Backend>> mos;
};

template <class H, class T>
struct Fixture {
  using Backend = typename H::Backend;
  using K = rankwise::Kernels<Backend, T>;
  using Pool = rankwise::UnitPool<T, Backend>;

  typename H::Ctx ctx;
  rankwise::ShardPool<T, Backend> shards;
  Pool pool;
  std::vector<Entry<H, T>> entries;

  /// ctx_args construct the context (a thread count on the CPU).
  template <class... CtxArgs>
  explicit Fixture(std::int64_t capacity = 160, CtxArgs&&... ctx_args)
      : ctx(std::forward<CtxArgs>(ctx_args)...),
        shards(ctx, shard_config()),
        pool(ctx, pool_config(capacity)) {
    shards.init(11);
    K::fill_uniform(ctx, shards.b(), -0.5, 0.5, 12);
  }

  static rankwise::UnitPoolConfig pool_config(std::int64_t capacity) {
    rankwise::UnitPoolConfig c;
    c.d_in = kDin;
    c.d_out = kDout;
    c.capacity_units = capacity;
    c.page_units = 8;
    c.max_adapters = 16;
    return c;
  }
  static rankwise::ShardPoolConfig shard_config() {
    rankwise::ShardPoolConfig c;
    c.d_in = kDin;
    c.d_out = kDout;
    c.num_layers = 2;
    c.equivalent_rank = 8;
    c.private_rank = 1;
    c.shards_per_vector = 2;
    return c;
  }

  Entry<H, T>& add_lora(std::int64_t rank, double alpha, bool rslora, std::uint64_t seed) {
    rankwise::LoraConfig c;
    c.d_in = kDin;
    c.d_out = kDout;
    c.rank = rank;
    c.alpha = alpha;
    c.scale_rule =
        rslora ? rankwise::ScaleRule::kAlphaOverSqrtRank : rankwise::ScaleRule::kAlphaOverRank;
    Entry<H, T> e;
    e.kind = AdapterKind::kLora;
    e.lora = std::make_unique<rankwise::Lora<T, Backend>>(ctx, c);
    K::fill_uniform(ctx, e.lora->a(), -0.5, 0.5, seed);
    K::fill_uniform(ctx, e.lora->bt(), -0.5, 0.5, seed + 1);
    e.a = to_host<H, T>(ctx, MatrixView<const T>(e.lora->a()));
    e.b = transpose(to_host<H, T>(ctx, MatrixView<const T>(e.lora->bt())));
    e.rank = rank;
    e.scale = e.lora->scale();
    e.id = pool.add(*e.lora);
    entries.push_back(std::move(e));
    return entries.back();
  }

  Entry<H, T>& add_smora(std::int64_t rank, std::int64_t k, std::int64_t g, std::uint64_t seed,
                         bool step_every_forward = true) {
    rankwise::SmoraConfig c;
    c.d_in = kDin;
    c.d_out = kDout;
    c.router.num_units = rank;
    c.router.top_k = k;
    c.router.group_size = g;
    c.router.bias_update_rate = 1e-2f;
    c.update_bias_every_forward = step_every_forward;
    Entry<H, T> e;
    e.kind = AdapterKind::kSmora;
    e.smora = std::make_unique<rankwise::Smora<T, Backend>>(ctx, c);
    e.smora->init(seed);
    K::fill_uniform(ctx, e.smora->bt(), -0.5, 0.5, seed + 1);
    rankwise::Kernels<Backend, rankwise::accumulator_t<T>>::fill_uniform(ctx, e.smora->bias(),
                                                                         -0.05, 0.05, seed + 2);
    e.rank = rank;
    e.scale = e.smora->scale();
    e.id = pool.add(*e.smora);
    entries.push_back(std::move(e));
    return entries.back();
  }

  Entry<H, T>& add_mos(std::int64_t rank, std::int64_t layer) {
    rankwise::MosConfig c;
    c.rank = rank;
    c.alpha = 8.0;
    c.seed = 5;
    Entry<H, T> e;
    e.kind = AdapterKind::kMos;
    e.mos = std::make_unique<rankwise::Mos<T, Backend>>(shards, layer, c);
    DeviceMatrix<H, T> a(rank, kDin), b(kDout, rank);
    e.mos->get_a(a.view());
    e.mos->get_b(b.view());
    e.a = to_host<H, T>(ctx, a.cview());
    e.b = to_host<H, T>(ctx, b.cview());
    e.rank = rank;
    e.scale = e.mos->scale();
    e.id = pool.add(*e.mos);
    entries.push_back(std::move(e));
    return entries.back();
  }

  /// The mix every case serves.
  void add_mix() {
    add_lora(1, 2.0, false, 100);
    add_lora(3, 6.0, false, 110);
    add_lora(8, 16.0, true, 120);
    add_smora(16, 4, 1, 130);
    add_lora(16, 8.0, false, 140);
    add_smora(16, 8, 4, 150);  // block MoE-LoRA: 4 experts of 4 ranks, top 2
    add_lora(64, 32.0, true, 160);
    add_mos(6, 1);
  }

  void plan(const std::vector<std::int32_t>& ids, rankwise::PoolPlan<Backend>& p) {
    pool.plan(rankwise::host_view<const std::int32_t>(ids.data(),
                                                      static_cast<std::int64_t>(ids.size()), 1),
              p);
  }
};

/// Random ids over the fixture's adapters, about one token in six without one.
inline std::vector<std::int32_t> random_ids(const std::vector<AdapterId>& ids, std::int64_t n,
                                            std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<std::int32_t> out(static_cast<std::size_t>(n));
  for (auto& id : out) {
    const std::uint64_t pick = gen() % (ids.size() + 1);
    id = pick == ids.size() ? kNoAdapter : ids[pick];
  }
  return out;
}

template <class H, class T>
std::vector<AdapterId> ids_of(const Fixture<H, T>& f) {
  std::vector<AdapterId> out;
  for (const auto& e : f.entries) out.push_back(e.id);
  return out;
}

inline std::vector<std::int64_t> tokens_of(const std::vector<std::int32_t>& ids, AdapterId id) {
  std::vector<std::int64_t> out;
  for (std::size_t t = 0; t < ids.size(); ++t) {
    if (ids[t] == id) out.push_back(static_cast<std::int64_t>(t));
  }
  return out;
}

inline HostMatrix rows_of(const HostMatrix& m, const std::vector<std::int64_t>& rows) {
  HostMatrix out(static_cast<std::int64_t>(rows.size()), m.cols);
  for (std::size_t i = 0; i < rows.size(); ++i)
    for (std::int64_t j = 0; j < m.cols; ++j) out(static_cast<std::int64_t>(i), j) = m(rows[i], j);
  return out;
}

inline void add_rows(HostMatrix& m, const std::vector<std::int64_t>& rows, const HostMatrix& d) {
  for (std::size_t i = 0; i < rows.size(); ++i)
    for (std::int64_t j = 0; j < m.cols; ++j) m(rows[i], j) += d(static_cast<std::int64_t>(i), j);
}

/// What each adapter gives alone, for a forward and a backward of one batch.
struct Expected {
  HostMatrix y, dx;
  std::vector<HostMatrix> da, dbt, dwr;   // per entry (empty where it has no tokens)
  std::vector<std::vector<double>> bias;  // per SMoRA entry after the training forward
};

/// Runs every adapter's own layer (SMoRA) or the double reference (LoRA, MoS)
/// on its tokens. mode as the pool's forward.
template <class H, class T>
Expected expect(Fixture<H, T>& f, const std::vector<std::int32_t>& ids, const HostMatrix& x,
                const HostMatrix& y0, const HostMatrix& dy, const HostMatrix& dx0, Mode mode) {
  using Acc = rankwise::accumulator_t<T>;
  Expected ex{y0, dx0, {}, {}, {}, {}};
  for (auto& e : f.entries) {
    const std::vector<std::int64_t> tokens = tokens_of(ids, e.id);
    ex.da.emplace_back();
    ex.dbt.emplace_back();
    ex.dwr.emplace_back();
    ex.bias.emplace_back();
    if (tokens.empty()) continue;
    const HostMatrix xs = rows_of(x, tokens), dys = rows_of(dy, tokens);
    const auto m = static_cast<std::int64_t>(tokens.size());
    if (e.kind != AdapterKind::kSmora) {
      add_rows(ex.y, tokens, ref_lora_forward(e.scale, xs, e.a, e.b, HostMatrix(m, kDout)));
      const LoraGrads g = ref_lora_backward(e.scale, xs, e.a, e.b, dys);
      add_rows(ex.dx, tokens, g.dx);
      ex.da.back() = g.da;
      ex.dbt.back() = transpose(g.db);
      continue;
    }
    auto xd = to_device<H, T>(f.ctx, xs);
    auto yd = to_device<H, T>(f.ctx, HostMatrix(m, kDout));
    e.smora->forward(xd.cview(), yd.view(), mode);
    add_rows(ex.y, tokens, to_host<H, T>(f.ctx, yd.cview()));
    if (mode == Mode::kTraining) {
      auto dyd = to_device<H, T>(f.ctx, dys);
      auto dxd = to_device<H, T>(f.ctx, HostMatrix(m, kDin));
      e.smora->backward(xd.cview(), dyd.cview(), dxd.view());
      add_rows(ex.dx, tokens, to_host<H, T>(f.ctx, dxd.cview()));
      ex.da.back() = to_host<H, T>(f.ctx, MatrixView<const T>(e.smora->grad_a()));
      ex.dbt.back() = to_host<H, T>(f.ctx, MatrixView<const T>(e.smora->grad_bt()));
      ex.dwr.back() = to_host<H, T>(f.ctx, MatrixView<const T>(e.smora->grad_wr()));
      ex.bias.back() = to_host<H, Acc>(f.ctx, MatrixView<const Acc>(e.smora->bias())).v;
    }
  }
  return ex;
}

template <class T>
rwtest::Bound multi_tolerance(std::int64_t r) {
  return tolerance<T>(4, kDin + kDout + r);
}

/// A mixed batch, forward (inference, then training) and backward, against
/// each adapter alone; tokens without an adapter keep y (and dx) bit for bit.
template <class H, class T>
void mixed_batch_matches_each_adapter_alone() {
  for (const std::int64_t n : {0, 1, 7, 41}) {
    const std::uint64_t seed = 1000 + static_cast<std::uint64_t>(n);
    RWTEST_CONTEXT(H, T, "n " << n, seed);
    Fixture<H, T> f;
    f.add_mix();
    const std::vector<std::int32_t> ids = random_ids(ids_of(f), n, seed);
    const HostMatrix x = quantize<H, T>(random_matrix(n, kDin, seed + 1));
    const HostMatrix y0 = quantize<H, T>(random_matrix(n, kDout, seed + 2));
    const HostMatrix dy = quantize<H, T>(random_matrix(n, kDout, seed + 3));
    const HostMatrix dx0 = quantize<H, T>(random_matrix(n, kDin, seed + 4));
    auto xd = to_device<H, T>(f.ctx, x);
    rankwise::PoolPlan<typename H::Backend> plan;
    f.plan(ids, plan);
    CHECK(plan.tokens() == n);

    // Inference first: the layers' biases do not move.
    {
      auto yd = to_device<H, T>(f.ctx, y0);
      f.pool.forward(plan, xd.cview(), yd.view());
      const Expected ex = expect(f, ids, x, y0, dy, dx0, Mode::kInference);
      const HostMatrix got = to_host<H, T>(f.ctx, yd.cview());
      RWTEST_CHECK_CLOSE(got, ex.y, normwise_magnitude(ex.y), multi_tolerance<T>(64));
      for (std::int64_t t = 0; t < n; ++t) {
        if (ids[static_cast<std::size_t>(t)] != kNoAdapter) continue;
        for (std::int64_t j = 0; j < kDout; ++j) CHECK(got(t, j) == y0(t, j));
      }
    }
    // Training: forward, backward, balance step.
    auto yd = to_device<H, T>(f.ctx, y0);
    auto dyd = to_device<H, T>(f.ctx, dy);
    auto dxd = to_device<H, T>(f.ctx, dx0);
    f.pool.forward(plan, xd.cview(), yd.view(), Mode::kTraining);
    f.pool.backward(plan, xd.cview(), dyd.cview(), dxd.view());
    const Expected ex = expect(f, ids, x, y0, dy, dx0, Mode::kTraining);
    RWTEST_CHECK_CLOSE(to_host<H, T>(f.ctx, yd.cview()), ex.y, normwise_magnitude(ex.y),
                       multi_tolerance<T>(64));
    const HostMatrix dx = to_host<H, T>(f.ctx, dxd.cview());
    RWTEST_CHECK_CLOSE(dx, ex.dx, normwise_magnitude(ex.dx), multi_tolerance<T>(64 + n));
    for (std::size_t i = 0; i < f.entries.size(); ++i) {
      auto& e = f.entries[i];
      INFO("adapter " << i << " (" << rankwise::to_string(e.kind) << ", rank " << e.rank << ")");
      if (ex.da[i].rows == 0) continue;  // not in the batch
      DeviceMatrix<H, T> ga(e.rank, kDin), gbt(e.rank, kDout);
      f.pool.get_grad_a(e.id, ga.view());
      f.pool.get_grad_bt(e.id, gbt.view());
      const Bound tol = multi_tolerance<T>(e.rank + n);
      RWTEST_CHECK_CLOSE(to_host<H, T>(f.ctx, ga.cview()), ex.da[i], normwise_magnitude(ex.da[i]),
                         tol);
      RWTEST_CHECK_CLOSE(to_host<H, T>(f.ctx, gbt.cview()), ex.dbt[i],
                         normwise_magnitude(ex.dbt[i]), tol);
      if (e.kind == AdapterKind::kSmora) {
        using Acc = rankwise::accumulator_t<T>;
        RWTEST_CHECK_CLOSE(
            to_host<H, T>(f.ctx, MatrixView<const T>(f.pool.grad_router_weight(e.id))), ex.dwr[i],
            normwise_magnitude(ex.dwr[i]), tol);
        CHECK(to_host<H, Acc>(f.ctx, MatrixView<const Acc>(f.pool.balance_bias(e.id))).v ==
              ex.bias[i]);
      }
    }
    for (std::int64_t t = 0; t < n; ++t) {
      if (ids[static_cast<std::size_t>(t)] != kNoAdapter) continue;
      for (std::int64_t j = 0; j < kDin; ++j) CHECK(dx(t, j) == dx0(t, j));
    }
  }
}

/// The units are copied in exactly, and an adapter added where another was
/// removed takes the freed pages (its units then split into runs) and serves
/// like any other, routed adapters included (their routing is mapped to the
/// pool's units).
template <class H, class T>
void reused_units_after_removal() {
  Fixture<H, T> f(96);
  f.add_lora(8, 8.0, false, 200);
  f.add_lora(16, 8.0, false, 210);
  f.add_lora(8, 8.0, false, 220);
  f.add_lora(32, 8.0, false, 230);
  const AdapterId removed = f.entries[1].id;
  const std::int64_t free_before = f.pool.free_units();
  f.pool.remove(removed);
  f.entries.erase(f.entries.begin() + 1);
  CHECK(f.pool.free_units() == free_before + 16);
  CHECK(!f.pool.contains(removed));
  // 24 units: the two freed pages (8..23) and the first never-used one (64..71).
  Entry<H, T>& routed = f.add_smora(24, 4, 1, 240);
  const std::vector<rankwise::UnitRun> runs = f.pool.runs(routed.id);
  REQUIRE(runs.size() == 2);
  CHECK(runs[0].pool == 8);
  CHECK(runs[0].length == 16);
  CHECK(runs[1].pool == 64);
  CHECK(runs[1].local == 16);
  CHECK(routed.id != removed);
  for (auto& e : f.entries) {
    if (e.kind == AdapterKind::kSmora) continue;
    DeviceMatrix<H, T> a(e.rank, kDin);
    f.pool.get_a(e.id, a.view());
    CHECK(to_host<H, T>(f.ctx, a.cview()).v == e.a.v);
  }
  const std::int64_t n = 33;
  const std::vector<std::int32_t> ids = random_ids(ids_of(f), n, 77);
  const HostMatrix x = quantize<H, T>(random_matrix(n, kDin, 78));
  const HostMatrix y0 = quantize<H, T>(random_matrix(n, kDout, 79));
  const HostMatrix dy = quantize<H, T>(random_matrix(n, kDout, 80));
  auto xd = to_device<H, T>(f.ctx, x);
  auto yd = to_device<H, T>(f.ctx, y0);
  auto dyd = to_device<H, T>(f.ctx, dy);
  rankwise::PoolPlan<typename H::Backend> plan;
  f.plan(ids, plan);
  f.pool.forward(plan, xd.cview(), yd.view(), Mode::kTraining);
  f.pool.backward(plan, xd.cview(), dyd.cview());
  const Expected ex = expect(f, ids, x, y0, dy, HostMatrix(n, kDin), Mode::kTraining);
  RWTEST_CHECK_CLOSE(to_host<H, T>(f.ctx, yd.cview()), ex.y, normwise_magnitude(ex.y),
                     multi_tolerance<T>(32));
  const std::size_t last = f.entries.size() - 1;
  REQUIRE(ex.da[last].rows == 24);
  DeviceMatrix<H, T> ga(24, kDin), gbt(24, kDout);
  f.pool.get_grad_a(routed.id, ga.view());
  f.pool.get_grad_bt(routed.id, gbt.view());
  RWTEST_CHECK_CLOSE(to_host<H, T>(f.ctx, ga.cview()), ex.da[last], normwise_magnitude(ex.da[last]),
                     multi_tolerance<T>(24 + n));
  RWTEST_CHECK_CLOSE(to_host<H, T>(f.ctx, gbt.cview()), ex.dbt[last],
                     normwise_magnitude(ex.dbt[last]), multi_tolerance<T>(24 + n));
  // The removed adapter's id is refused, not served with the new one's units.
  std::vector<std::int32_t> stale = ids;
  stale[3] = removed;
  RWTEST_CHECK_ERROR(
      ErrorCode::kInvalidArgument,
      "ids[3] = " + std::to_string(removed) + " names an adapter that was removed from this pool",
      f.plan(stale, plan));
}

/// Every token on one plain LoRA: the same bits as Lora::forward / backward.
/// Tokens sorted by adapter: each adapter's rows the same bits as its layer.
template <class H, class T>
void one_adapter_equals_its_layer_bit_for_bit() {
  Fixture<H, T> f;
  f.add_lora(8, 16.0, false, 300);
  f.add_lora(16, 8.0, true, 310);
  const std::int64_t n = 37;
  const HostMatrix x = quantize<H, T>(random_matrix(n, kDin, 301));
  const HostMatrix y0 = quantize<H, T>(random_matrix(n, kDout, 302));
  const HostMatrix dy = quantize<H, T>(random_matrix(n, kDout, 303));
  auto xd = to_device<H, T>(f.ctx, x);
  auto dyd = to_device<H, T>(f.ctx, dy);
  for (std::size_t which = 0; which < 2; ++which) {
    INFO("adapter " << which);
    Entry<H, T>& e = f.entries[which];
    auto y_pool = to_device<H, T>(f.ctx, y0);
    auto y_layer = to_device<H, T>(f.ctx, y0);
    f.pool.forward(rankwise::host_view<const std::int32_t>(
                       std::vector<std::int32_t>(static_cast<std::size_t>(n), e.id).data(), n, 1),
                   xd.cview(), y_pool.view());
    e.lora->forward(xd.cview(), y_layer.view());
    CHECK(to_host_raw<H, T>(f.ctx, y_pool.cview()) == to_host_raw<H, T>(f.ctx, y_layer.cview()));
    rankwise::PoolPlan<typename H::Backend> plan;
    f.plan(std::vector<std::int32_t>(static_cast<std::size_t>(n), e.id), plan);
    auto dx_pool = to_device<H, T>(f.ctx, HostMatrix(n, kDin));
    auto dx_layer = to_device<H, T>(f.ctx, HostMatrix(n, kDin));
    f.pool.backward(plan, xd.cview(), dyd.cview(), dx_pool.view());
    e.lora->backward(xd.cview(), dyd.cview(), dx_layer.view());
    CHECK(to_host_raw<H, T>(f.ctx, dx_pool.cview()) == to_host_raw<H, T>(f.ctx, dx_layer.cview()));
    DeviceMatrix<H, T> ga(e.rank, kDin);
    f.pool.get_grad_a(e.id, ga.view());
    CHECK(to_host_raw<H, T>(f.ctx, ga.cview()) ==
          to_host_raw<H, T>(f.ctx, MatrixView<const T>(e.lora->grad_a())));
  }
  // Sorted: rows [0, 20) on adapter 0, [20, 37) on adapter 1. A backend that
  // serves small batches with its segment kernels (CUDA) computes another way:
  // there the rows agree within rounding.
  std::vector<std::int32_t> ids(static_cast<std::size_t>(n), f.entries[1].id);
  std::fill(ids.begin(), ids.begin() + 20, f.entries[0].id);
  auto y_pool = to_device<H, T>(f.ctx, y0);
  rankwise::PoolPlan<typename H::Backend> plan;
  f.plan(ids, plan);
  CHECK(plan.adapters() == 2);
  f.pool.forward(plan, xd.cview(), y_pool.view());
  auto y_layers = to_device<H, T>(f.ctx, y0);
  f.entries[0].lora->forward(xd.cview().row_block(0, 20), y_layers.view().row_block(0, 20));
  f.entries[1].lora->forward(xd.cview().row_block(20, 17), y_layers.view().row_block(20, 17));
  using K = rankwise::Kernels<typename H::Backend, T>;
  if (!K::kSegmentedLora || !rankwise::TuningPolicy<typename H::Backend>::prefer_segmented(20)) {
    CHECK(to_host_raw<H, T>(f.ctx, y_pool.cview()) == to_host_raw<H, T>(f.ctx, y_layers.cview()));
  } else {
    const HostMatrix expected = to_host<H, T>(f.ctx, y_layers.cview());
    RWTEST_CHECK_CLOSE(to_host<H, T>(f.ctx, y_pool.cview()), expected, normwise_magnitude(expected),
                       multi_tolerance<T>(16));
  }
}

/// One plan serves the pools of every layer that hold the same adapters in the
/// same places (one pool per module, filled in the same order): each layer's
/// pool applies its own adapters' weights, and SMoRA keeps its own routing.
template <class H, class T>
void one_plan_serves_every_layer() {
  Fixture<H, T> first, second;
  first.add_mix();
  second.add_lora(1, 2.0, false, 101);  // the same shapes as add_mix, other weights
  second.add_lora(3, 6.0, false, 111);
  second.add_lora(8, 16.0, true, 121);
  second.add_smora(16, 4, 1, 131);
  second.add_lora(16, 8.0, false, 141);
  second.add_smora(16, 8, 4, 151);
  second.add_lora(64, 32.0, true, 161);
  second.add_mos(6, 0);
  const std::int64_t n = 23;
  const std::vector<std::int32_t> ids = random_ids(ids_of(first), n, 950);
  REQUIRE(ids_of(first) == ids_of(second));
  const HostMatrix x = quantize<H, T>(random_matrix(n, kDin, 951));
  const HostMatrix y0 = quantize<H, T>(random_matrix(n, kDout, 952));
  const HostMatrix dy = quantize<H, T>(random_matrix(n, kDout, 953));
  rankwise::PoolPlan<typename H::Backend> plan;
  first.plan(ids, plan);
  auto xd = to_device<H, T>(first.ctx, x);
  auto dyd = to_device<H, T>(first.ctx, dy);
  // Both layers' training forwards before either backward, as a model runs.
  auto y1 = to_device<H, T>(first.ctx, y0);
  auto y2 = to_device<H, T>(second.ctx, y0);
  first.pool.forward(plan, xd.cview(), y1.view(), Mode::kTraining);
  second.pool.forward(plan, xd.cview(), y2.view(), Mode::kTraining);
  second.pool.backward(plan, xd.cview(), dyd.cview());
  first.pool.backward(plan, xd.cview(), dyd.cview());
  for (Fixture<H, T>* f : {&first, &second}) {
    INFO((f == &first ? "first" : "second") << " layer's pool");
    const Expected ex = expect(*f, ids, x, y0, dy, HostMatrix(n, kDin), Mode::kTraining);
    RWTEST_CHECK_CLOSE(to_host<H, T>(f->ctx, (f == &first ? y1 : y2).cview()), ex.y,
                       normwise_magnitude(ex.y), multi_tolerance<T>(64));
    for (std::size_t i = 0; i < f->entries.size(); ++i) {
      if (ex.da[i].rows == 0) continue;
      const auto& e = f->entries[i];
      DeviceMatrix<H, T> ga(e.rank, kDin);
      f->pool.get_grad_a(e.id, ga.view());
      RWTEST_CHECK_CLOSE(to_host<H, T>(f->ctx, ga.cview()), ex.da[i], normwise_magnitude(ex.da[i]),
                         multi_tolerance<T>(e.rank + n));
    }
  }
}

/// The same inputs give the same bits, call after call and pool after pool.
template <class H, class T>
void deterministic() {
  const std::int64_t n = 29;
  std::vector<std::vector<T>> ys, dxs, das;
  for (int run = 0; run < 2; ++run) {
    Fixture<H, T> f;
    f.add_mix();
    const std::vector<std::int32_t> ids = random_ids(ids_of(f), n, 400);
    auto xd = to_device<H, T>(f.ctx, random_matrix(n, kDin, 401));
    auto dyd = to_device<H, T>(f.ctx, random_matrix(n, kDout, 402));
    for (int call = 0; call < 2; ++call) {
      auto yd = to_device<H, T>(f.ctx, HostMatrix(n, kDout));
      auto dxd = to_device<H, T>(f.ctx, HostMatrix(n, kDin));
      rankwise::PoolPlan<typename H::Backend> plan;
      f.plan(ids, plan);
      f.pool.forward(plan, xd.cview(), yd.view(), Mode::kTraining);
      f.pool.backward(plan, xd.cview(), dyd.cview(), dxd.view());
      ys.push_back(to_host_raw<H, T>(f.ctx, yd.cview()));
      dxs.push_back(to_host_raw<H, T>(f.ctx, dxd.cview()));
      DeviceMatrix<H, T> ga(64, kDin);
      f.pool.get_grad_a(f.entries[6].id, ga.view());
      das.push_back(to_host_raw<H, T>(f.ctx, ga.cview()));
    }
  }
  // Within a pool the balance bias moves between calls (training mode), so
  // compare call c of both pools.
  for (std::size_t c = 0; c < 2; ++c) {
    CHECK(first_bit_difference(ys[c], ys[c + 2]) == -1);
    CHECK(first_bit_difference(dxs[c], dxs[c + 2]) == -1);
    CHECK(first_bit_difference(das[c], das[c + 2]) == -1);
  }
}

/// Bad input: a clear error naming what is wrong, and the pool unchanged.
template <class H, class T>
void bad_input_is_refused() {
  using Backend = typename H::Backend;
  Fixture<H, T> f(48);
  f.add_lora(16, 8.0, false, 500);
  f.add_smora(16, 4, 1, 510);
  const std::int64_t free_before = f.pool.free_units();
  const std::int64_t adapters_before = f.pool.adapters();

  // Capacity: 16 units free, rank 24 needs 3 pages.
  rankwise::LoraConfig big;
  big.d_in = kDin;
  big.d_out = kDout;
  big.rank = 24;
  rankwise::Lora<T, Backend> too_big(f.ctx, big);
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "capacity exhausted: rank 24 needs 3 pages of 8 units but 2 of 6 are free",
                     f.pool.add(too_big));
  // Shape.
  rankwise::LoraConfig wide = big;
  wide.rank = 4;
  wide.d_in = kDin + 1;
  rankwise::Lora<T, Backend> wrong_shape(f.ctx, wide);
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "a (r x d_in) is (4 x 25) but the pool's d_in is 24", f.pool.add(wrong_shape));
  CHECK(f.pool.free_units() == free_before);
  CHECK(f.pool.adapters() == adapters_before);

  // Ids: unknown, removed, negative; a stale plan; a plan of another pool.
  rankwise::PoolPlan<Backend> plan;
  const AdapterId lora = f.entries[0].id, smora = f.entries[1].id;
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "ids[1] = 9 names no adapter in this pool (never added)",
                     f.plan({lora, 9}, plan));
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "ids[0] = -7 is negative and not kNoAdapter",
                     f.plan({-7}, plan));
  f.plan({lora, smora, kNoAdapter}, plan);
  auto x = to_device<H, T>(f.ctx, random_matrix(3, kDin, 1));
  auto y = to_device<H, T>(f.ctx, HostMatrix(3, kDout));
  auto x4 = to_device<H, T>(f.ctx, random_matrix(4, kDin, 2));
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "x (n x d_in)",
                     f.pool.forward(plan, x4.cview(), y.view()));
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "adapter " + std::to_string(smora) + " (smora) needs the training forward",
                     f.pool.backward(plan, x.cview(), MatrixView<const T>(y.view())));
  rankwise::PoolPlan<Backend> never_planned;
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "the plan is empty: make it with plan() first",
                     f.pool.forward(never_planned, x.cview(), y.view()));
  // Another pool: its adapter under the plan's id has another rank.
  Fixture<H, T> other(48);
  other.add_lora(8, 8.0, false, 530);
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "adapter " + std::to_string(lora) +
                         " has other units, rank or scale in this pool than in the one that made "
                         "the plan (rank 8 here, 16 there)",
                     other.pool.forward(plan, x.cview(), y.view()));
  f.pool.remove(lora);
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "adapter " + std::to_string(lora) +
                         " of the plan names an adapter that was removed from this pool; plan the "
                         "batch again",
                     f.pool.forward(plan, x.cview(), y.view()));
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument,
                     "adapter id " + std::to_string(lora) + " names an adapter that was removed",
                     f.pool.remove(lora));
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "is lora, not smora: it has no router",
                     f.pool.router_weight(f.add_lora(8, 8.0, false, 520).id));

  // Slots: max_adapters = 16, the removed one's slot reused with a new id.
  Fixture<H, T> many(16 * 8);
  for (int i = 0; i < 16; ++i) many.add_lora(1, 1.0, false, 600 + i);
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "all 16 adapter slots are in use",
                     many.add_lora(1, 1.0, false, 700));
  const AdapterId first = many.entries[0].id;
  many.pool.remove(first);
  const AdapterId again = many.add_lora(1, 1.0, false, 701).id;
  CHECK(again != first);
  CHECK(again % 16 == first % 16);
}

}  // namespace multi_cases
}  // namespace rwtest

#define RWTEST_MULTI_TEST_CASES(HARNESS, TAG, ...)                                        \
  TEMPLATE_TEST_CASE("multi: a mixed batch matches each adapter alone", "[multi]" TAG,    \
                     __VA_ARGS__) {                                                       \
    rwtest::multi_cases::mixed_batch_matches_each_adapter_alone<HARNESS, TestType>();     \
  }                                                                                       \
  TEMPLATE_TEST_CASE("multi: units reused after a removal", "[multi]" TAG, __VA_ARGS__) { \
    rwtest::multi_cases::reused_units_after_removal<HARNESS, TestType>();                 \
  }                                                                                       \
  TEMPLATE_TEST_CASE("multi: one adapter equals its layer bit for bit", "[multi]" TAG,    \
                     __VA_ARGS__) {                                                       \
    rwtest::multi_cases::one_adapter_equals_its_layer_bit_for_bit<HARNESS, TestType>();   \
  }                                                                                       \
  TEMPLATE_TEST_CASE("multi: one plan serves every layer", "[multi]" TAG, __VA_ARGS__) {  \
    rwtest::multi_cases::one_plan_serves_every_layer<HARNESS, TestType>();                \
  }                                                                                       \
  TEMPLATE_TEST_CASE("multi: deterministic", "[multi][determinism]" TAG, __VA_ARGS__) {   \
    rwtest::multi_cases::deterministic<HARNESS, TestType>();                              \
  }                                                                                       \
  TEMPLATE_TEST_CASE("multi: bad input is refused", "[multi][errors]" TAG, __VA_ARGS__) { \
    rwtest::multi_cases::bad_input_is_refused<HARNESS, TestType>();                       \
  }
