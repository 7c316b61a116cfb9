// The multi-adapter benchmark bodies (UnitPool), written once for both
// backends: bench_multi.cpp instantiates them with CpuBackend, bench_multi_cuda.cu
// with CudaBackend. Include <rankwise/rankwise.hpp> and support/cpu_backend.hpp,
// or <rankwise/cuda.cuh> and support/cuda_backend.cuh, first; no Eigen or CUDA
// is named here. Everything is timed through BenchBackend<Backend>.
//
// RowOps is the engine's own row movement of the per-adapter loop (what an
// engine writes today without a pool, so not a library call; each backend's
// main writes it):
//   gather_rows(ctx, x, rows, xs)        xs[j] = x[rows[j]]
//   scatter_add_rows(ctx, ys, rows, y)   y[rows[j]] += ys[j] (rows distinct)
//
// Every timed call of a case (N, T) is one batch of its rotation
// (multi/sizes.hpp: make_batches) on one copy of the layers, the copies
// standing for the layers of a model: one plan per batch, made before the
// timed loop, serves every copy of a pool. A benchmark iteration batch is the
// whole rotation, so every variant is timed over the same batches and copies.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "multi/sizes.hpp"
#include "support/backend.hpp"

namespace rankwise {
namespace bench {
namespace multi {

/// Token indices of one adapter's rows, on the host and in backend memory.
struct RowList {
  const std::int32_t* host = nullptr;
  const std::int32_t* device = nullptr;
  std::int64_t count = 0;
};

template <class Backend, class RowOps>
class Suite {
 public:
  using T = float;
  using Ctx = Context<Backend>;
  using K = Kernels<Backend, T>;
  using LoraLayer = Lora<T, Backend>;
  using SmoraLayer = Smora<T, Backend>;
  using Pool = UnitPool<T, Backend>;
  using Plan = PoolPlan<Backend>;
  using Bench = BenchBackend<Backend>;

  /// `backend`: the result-name prefix. The rotations defeat
  /// Bench::cache_bytes() (the CPU's last-level cache, the GPU's L2).
  Suite(Ctx& ctx, std::string backend, bool quick)
      : ctx_(&ctx),
        backend_(std::move(backend)),
        cache_bytes_(Bench::cache_bytes()),
        quick_(quick) {}

  const std::string& backend() const { return backend_; }

  /// Copies of every layer the small batches rotate over (1 in quick mode:
  /// a smoke run checks the code paths, not the numbers).
  std::int64_t copies() const { return quick_ ? 1 : rotation_copies(pool_bytes(), cache_bytes_); }
  std::int64_t copies_for(std::int64_t n) const { return n <= kRotateMaxTokens ? copies() : 1; }
  std::int64_t read_slabs() const {
    return quick_ ? 2 : rotation_copies(kReadSlabBytes, cache_bytes_);
  }
  /// Bytes of the plain adapters' units (A and Bᵀ) in one pool.
  static std::size_t pool_bytes() {
    return static_cast<std::size_t>(total_units() * 2 * kDim) * sizeof(T);
  }
  static std::size_t padded_bytes() {
    return static_cast<std::size_t>(kAdapters * kPaddedRank * 2 * kDim) * sizeof(T);
  }
  double min_time() const { return quick_ ? 0.01 : 0.3; }

  // ---- registration ---------------------------------------------------------------

  /// Registers every case; after the standard variants of each (N, T),
  /// `also(n, t)` may register more (the CPU bench: the OpenBLAS loop), so
  /// they run next to each other.
  void register_all(const std::function<void(std::int64_t, std::int64_t)>& also = {}) {
    reg(read_key(backend_), 1, [this](benchmark::State& s) { run_read(s); });
    for (std::int64_t n : token_counts(quick_)) {
      for (std::int64_t t : distinct_counts(n)) {
        for (const char* what : {"pool", "plan", "loop"}) {
          const std::string name = case_key(backend_, what, n, t);
          const std::string w = what;
          reg(name, n, [this, name, w, n, t](benchmark::State& s) { run_case(s, name, w, n, t); });
        }
        if (also) also(n, t);
        std::vector<const char*> more{"padded"};
        if (t == 1) more.push_back("direct");
        for (const char* what : more) {
          const std::string name = case_key(backend_, what, n, t);
          const std::string w = what;
          reg(name, n, [this, name, w, n, t](benchmark::State& s) { run_case(s, name, w, n, t); });
        }
      }
    }
    for (std::int64_t n : mixed_token_counts(quick_)) {
      for (const char* what : {"together", "separate"}) {
        const std::string name = mixed_key(backend_, what, n);
        const std::string w = what;
        reg(name, n, [this, name, w, n](benchmark::State& s) { run_mixed(s, name, w, n); });
      }
    }
  }

  /// Registers body(state) as `name` at N = n, guarded (a throw marks it
  /// failed; the run goes on).
  template <class F>
  void reg(const std::string& name, std::int64_t n, F body) const {
    auto* b = benchmark::RegisterBenchmark(
        name.c_str(), [body](benchmark::State& s) { guarded(s, [&] { body(s); }); });
    configure<Backend>(b, min_time(), n);
  }

  // ---- the layers -----------------------------------------------------------------

  struct Model {
    std::vector<std::vector<std::unique_ptr<LoraLayer>>> lora;    // [copy][adapter]
    std::vector<std::unique_ptr<Pool>> pool, padded, smora_pool;  // [copy]
    std::vector<std::vector<AdapterId>> pool_ids, padded_ids;     // [copy][adapter]
    std::vector<AdapterId> smora_in_pool, smora_alone;            // [copy]
    std::unique_ptr<SmoraLayer> smora;
    Buffer<Backend, T> x, y, xs, ys;  // max N x d each; xs, ys: the loop's gathered rows
    Buffer<Backend, T> slabs;         // read_slabs() x kReadSlabBytes
  };

  /// Builds every layer on first use: the adapters' own LoRA layers (copies
  /// hold the same values in their own memory), the pools holding them, the
  /// padded pools and the SMoRA adapter.
  Model& model() {
    if (model_) return *model_;
    auto m = std::make_unique<Model>();
    const auto& ranks = adapter_ranks();
    const std::int64_t c_count = copies();
    m->lora.resize(static_cast<std::size_t>(c_count));
    for (std::int64_t c = 0; c < c_count; ++c) {
      for (std::int64_t a = 0; a < kAdapters; ++a) {
        LoraConfig cfg;
        cfg.d_in = kDim;
        cfg.d_out = kDim;
        cfg.rank = ranks[static_cast<std::size_t>(a)];
        cfg.alpha = kAlpha;
        auto layer = std::make_unique<LoraLayer>(*ctx_, cfg);
        if (c == 0) {
          layer->init_peft(100 + static_cast<std::uint64_t>(a));
          K::fill_uniform(*ctx_, layer->bt(), -0.01, 0.01, 200 + static_cast<std::uint64_t>(a));
        } else {
          const LoraLayer& first = *m->lora[0][static_cast<std::size_t>(a)];
          K::copy(*ctx_, first.a(), Op::kNoTrans, layer->a());
          K::copy(*ctx_, first.bt(), Op::kNoTrans, layer->bt());
        }
        m->lora[static_cast<std::size_t>(c)].push_back(std::move(layer));
      }
    }

    SmoraConfig sc;
    sc.d_in = kDim;
    sc.d_out = kDim;
    sc.router.num_units = kSmoraRank;
    sc.router.group_size = 1;
    sc.router.top_k = kSmoraTopK;
    sc.alpha = kSmoraAlpha;
    sc.check_finite = Bench::kCheckFinite;
    m->smora = std::make_unique<SmoraLayer>(*ctx_, sc);
    m->smora->init(31);
    K::fill_uniform(*ctx_, m->smora->bt(), -0.01, 0.01, 32);

    Buffer<Backend, T> pa(kPaddedRank * kDim), pbt(kPaddedRank * kDim);
    for (std::int64_t c = 0; c < c_count; ++c) {
      UnitPoolConfig pc;
      pc.d_in = kDim;
      pc.d_out = kDim;
      pc.capacity_units = total_units() + kSmoraRank;
      m->pool.push_back(std::make_unique<Pool>(*ctx_, pc));
      pc.capacity_units = kAdapters * kPaddedRank;
      m->padded.push_back(std::make_unique<Pool>(*ctx_, pc));
      pc.capacity_units = kSmoraRank;
      m->smora_pool.push_back(std::make_unique<Pool>(*ctx_, pc));
      std::vector<AdapterId> ids, padded_ids;
      for (std::int64_t a = 0; a < kAdapters; ++a) {
        const LoraLayer& l = *m->lora[static_cast<std::size_t>(c)][static_cast<std::size_t>(a)];
        ids.push_back(m->pool.back()->add(l));
        // Zero units above the adapter's rank: the flat layout's padding.
        const std::int64_t r = l.config().rank;
        const MatrixView<T> a64(pa.data(), kPaddedRank, kDim, Backend::kMemorySpace);
        const MatrixView<T> bt64(pbt.data(), kPaddedRank, kDim, Backend::kMemorySpace);
        K::fill(*ctx_, a64, 0.0);
        K::fill(*ctx_, bt64, 0.0);
        K::copy(*ctx_, l.a(), Op::kNoTrans, a64.row_block(0, r));
        K::copy(*ctx_, l.bt(), Op::kNoTrans, bt64.row_block(0, r));
        padded_ids.push_back(m->padded.back()->add_lora(MatrixView<const T>(a64),
                                                        MatrixView<const T>(bt64), l.scale()));
      }
      m->pool_ids.push_back(std::move(ids));
      m->padded_ids.push_back(std::move(padded_ids));
      m->smora_in_pool.push_back(m->pool.back()->add(*m->smora));
      m->smora_alone.push_back(m->smora_pool.back()->add(*m->smora));
      // Plans made on copy 0 serve every copy: the ids must agree (the pools
      // check units, ranks and scales themselves on every call).
      RANKWISE_CHECK(m->pool_ids.back() == m->pool_ids.front() &&
                         m->padded_ids.back() == m->padded_ids.front() &&
                         m->smora_in_pool.back() == m->smora_in_pool.front() &&
                         m->smora_alone.back() == m->smora_alone.front(),
                     "bench_multi: copy ", c, " of the pools got other adapter ids than copy 0");
    }

    std::int64_t most = 1;
    for (std::int64_t n : token_counts(quick_)) most = std::max(most, n);
    for (std::int64_t n : mixed_token_counts(quick_)) most = std::max(most, n);
    auto make = [&](Buffer<Backend, T>& b, std::int64_t elements, double lo, double hi,
                    std::uint64_t seed) {
      b.resize(elements);
      K::fill_uniform(*ctx_, b.view(elements, 1), lo, hi, seed);
    };
    make(m->x, most * kDim, -1.0, 1.0, 11);
    make(m->y, most * kDim, 0.0, 0.0, 12);
    make(m->xs, most * kDim, 0.0, 0.0, 13);
    make(m->ys, most * kDim, 0.0, 0.0, 14);
    const std::int64_t slab = static_cast<std::int64_t>(kReadSlabBytes / sizeof(T));
    make(m->slabs, read_slabs() * slab, -1.0, 1.0, 15);
    K::synchronize(*ctx_);
    model_ = std::move(m);
    return *model_;
  }

  // ---- the cases ----------------------------------------------------------------------

  /// One adapter's tokens in a batch, for the per-adapter loop.
  struct Group {
    std::int32_t adapter = 0;
    std::int64_t begin = 0, count = 0;  // into LoopBatch::rows
  };
  /// A batch as an engine's per-adapter loop holds it: the tokens grouped by
  /// adapter, on the host and uploaded (made before the timed loop, as the
  /// pool's plan is).
  struct LoopBatch {
    std::vector<Group> groups;
    std::vector<std::int32_t> rows;
    Buffer<Backend, std::int32_t> device_rows;
    RowList rows_of(const Group& g) const {
      return {rows.data() + g.begin, device_rows.data() + g.begin, g.count};
    }
  };

  struct Case {
    std::int64_t n = 0, t = 0, copies = 1;
    std::vector<Batch> batches;
    std::vector<LoopBatch> loop;                       // [batch]
    std::vector<std::vector<std::int32_t>> ids;        // [batch]: each token's id in the pools
    std::vector<std::unique_ptr<Plan>> plans, padded;  // [batch], for every copy of the pool
    std::int64_t batch_count() const { return static_cast<std::int64_t>(batches.size()); }
  };

  // The copies of a pool are filled in the same order, so they hold the same
  // ids on the same units, and one plan serves them all (each pool checks
  // that on every call), as one plan serves every layer of a model.
  Case& case_of(std::int64_t n, std::int64_t t) {
    auto it = cases_.find({n, t});
    if (it != cases_.end()) return *it->second;
    Model& m = model();
    auto cs = std::make_unique<Case>();
    cs->n = n;
    cs->t = t;
    cs->copies = copies_for(n);
    cs->batches = make_batches(n, t);
    for (const Batch& b : cs->batches) {
      cs->loop.push_back(loop_batch(b));
      std::vector<std::int32_t> ids(b.adapter.size()), padded(b.adapter.size());
      for (std::size_t i = 0; i < ids.size(); ++i) {
        ids[i] = m.pool_ids[0][static_cast<std::size_t>(b.adapter[i])];
        padded[i] = m.padded_ids[0][static_cast<std::size_t>(b.adapter[i])];
      }
      cs->plans.push_back(make_plan(*m.pool[0], ids));
      cs->padded.push_back(make_plan(*m.padded[0], padded));
      cs->ids.push_back(std::move(ids));
    }
    return *cases_.emplace(std::make_pair(n, t), std::move(cs)).first->second;
  }

  struct MixedCase {
    std::int64_t n = 0, copies = 1;
    std::vector<Batch> batches;
    // [batch]: one plan of the whole batch (the pool holding both kinds); the
    // plain half alone in the same pool; the SMoRA half alone in a pool of its own.
    std::vector<std::unique_ptr<Plan>> together, lora_only, smora_only;
    std::int64_t batch_count() const { return static_cast<std::int64_t>(batches.size()); }
  };

  MixedCase& mixed_of(std::int64_t n) {
    auto it = mixed_.find(n);
    if (it != mixed_.end()) return *it->second;
    Model& m = model();
    auto mc = std::make_unique<MixedCase>();
    mc->n = n;
    mc->copies = copies_for(n);
    mc->batches = make_mixed_batches(n);
    for (const Batch& b : mc->batches) {
      std::vector<std::int32_t> all(b.adapter.size()), plain(all.size()), routed(all.size());
      for (std::size_t i = 0; i < all.size(); ++i) {
        const bool smora = b.adapter[i] == kSmoraToken;
        all[i] = smora ? m.smora_in_pool[0] : m.pool_ids[0][static_cast<std::size_t>(b.adapter[i])];
        plain[i] = smora ? kNoAdapter : all[i];
        routed[i] = smora ? m.smora_alone[0] : kNoAdapter;
      }
      mc->together.push_back(make_plan(*m.pool[0], all));
      mc->lora_only.push_back(make_plan(*m.pool[0], plain));
      mc->smora_only.push_back(make_plan(*m.smora_pool[0], routed));
    }
    return *mixed_.emplace(n, std::move(mc)).first->second;
  }

  MatrixView<const T> x(std::int64_t n) {
    return MatrixView<const T>(model().x.data(), n, kDim, Backend::kMemorySpace);
  }
  MatrixView<T> y(std::int64_t n) {
    return MatrixView<T>(model().y.data(), n, kDim, Backend::kMemorySpace);
  }
  LoraLayer& lora(std::int64_t copy, std::int32_t adapter) {
    return *model().lora[static_cast<std::size_t>(copy)][static_cast<std::size_t>(adapter)];
  }

  /// The per-adapter loop an engine writes today, over batch b on copy c:
  /// per adapter, gather its tokens' rows of x into a contiguous buffer, zero
  /// the output rows, body(layer, xs, ys) (ys += the adapter's delta), and add
  /// ys back into y's rows. The buffers are allocated once, up front.
  template <class Body>
  void per_adapter_loop(Case& cs, std::int64_t b, std::int64_t c, Body body) {
    Model& m = model();
    const LoopBatch& lb = cs.loop[static_cast<std::size_t>(b)];
    const MatrixView<const T> xall = x(cs.n);
    const MatrixView<T> yall = y(cs.n);
    for (const Group& g : lb.groups) {
      const RowList rows = lb.rows_of(g);
      const MatrixView<T> xs(m.xs.data(), g.count, kDim, Backend::kMemorySpace);
      const MatrixView<T> ys(m.ys.data(), g.count, kDim, Backend::kMemorySpace);
      RowOps::gather_rows(*ctx_, xall, rows, xs);
      K::fill(*ctx_, ys, 0.0);
      body(lora(c, g.adapter), MatrixView<const T>(xs), ys);
      RowOps::scatter_add_rows(*ctx_, MatrixView<const T>(ys), rows, yall);
    }
  }

  /// Times call(b, c) over the rotation: every batch on copy 0, then on copy
  /// 1, ...; the first run of `name` first runs the rotation once untimed
  /// (workspaces grow, on the GPU the kernels load).
  template <class Call>
  void time_rotation(benchmark::State& state, const std::string& name, std::int64_t batches,
                     std::int64_t copies, bool host_clock, Call call) {
    const std::int64_t cycle = batches * copies;
    auto at = [&](std::int64_t i) { call(i % batches, i / batches); };
    if (warmed_.insert(name).second) {
      for (std::int64_t i = 0; i < cycle; ++i) at(i);
      K::synchronize(*ctx_);
    }
    const Rotation rotation{cycle, cycle};  // a sample is the whole rotation
    if (host_clock) {
      Bench::run_host(state, *ctx_, rotation, at);
    } else {
      Bench::run(state, *ctx_, rotation, at);
    }
    state.counters["batches"] = static_cast<double>(batches);
    state.counters["copies"] = static_cast<double>(copies);
  }

  // ---- agreement ------------------------------------------------------------------------

  /// The pool and the padded pool (their last copies, with the plans made on
  /// the first) and the per-adapter loop on the first batch of (N = 16,
  /// T = 4), and the mixed batch at N = 16 in one plan and in two, each from
  /// y = 0: the largest difference relative to the largest |y|.
  /// A benchmark of something that computes another result would mean nothing.
  struct Agreement {
    double padded = 0, loop = 0, mixed = 0;
  };
  Agreement agreement() {
    constexpr std::int64_t n = 16;
    Case& cs = case_of(n, 4);
    MixedCase& mc = mixed_of(n);
    Model& m = model();
    auto result = [&](auto fill_y) {
      K::fill(*ctx_, y(n), 0.0);
      fill_y();
      std::vector<T> host(static_cast<std::size_t>(n * kDim));
      K::download(*ctx_, MatrixView<const T>(y(n)), host.data());
      return host;
    };
    auto rel = [](const std::vector<T>& a, const std::vector<T>& b) {
      double diff = 0, scale = 0;
      for (std::size_t i = 0; i < a.size(); ++i) {
        diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - b[i]));
        scale = std::max(scale, std::fabs(static_cast<double>(a[i])));
      }
      return scale > 0 ? diff / scale : (diff > 0 ? 1.0 : 0.0);
    };
    const auto pool = result([&] { m.pool.back()->forward(*cs.plans[0], x(n), y(n)); });
    const auto padded = result([&] { m.padded.back()->forward(*cs.padded[0], x(n), y(n)); });
    const auto loop = result([&] {
      per_adapter_loop(cs, 0, 0, [](LoraLayer& l, MatrixView<const T> xs, MatrixView<T> ys) {
        l.forward(xs, ys);
      });
    });
    const auto together = result([&] { m.pool[0]->forward(*mc.together[0], x(n), y(n)); });
    const auto separate = result([&] {
      m.pool[0]->forward(*mc.lora_only[0], x(n), y(n));
      m.smora_pool[0]->forward(*mc.smora_only[0], x(n), y(n));
    });
    return {rel(pool, padded), rel(pool, loop), rel(together, separate)};
  }

 private:
  std::unique_ptr<Plan> make_plan(const Pool& pool, const std::vector<std::int32_t>& ids) const {
    auto plan = std::make_unique<Plan>();
    pool.plan(ids_view(ids), *plan);
    return plan;
  }
  static MatrixView<const std::int32_t> ids_view(const std::vector<std::int32_t>& ids) {
    return MatrixView<const std::int32_t>(ids.data(), static_cast<std::int64_t>(ids.size()), 1,
                                          MemorySpace::kHost);
  }

  LoopBatch loop_batch(const Batch& b) {
    LoopBatch lb;
    std::map<std::int32_t, std::vector<std::int32_t>> by_adapter;
    for (std::size_t i = 0; i < b.adapter.size(); ++i) {
      by_adapter[b.adapter[i]].push_back(static_cast<std::int32_t>(i));
    }
    for (const auto& kv : by_adapter) {
      lb.groups.push_back({kv.first, static_cast<std::int64_t>(lb.rows.size()),
                           static_cast<std::int64_t>(kv.second.size())});
      lb.rows.insert(lb.rows.end(), kv.second.begin(), kv.second.end());
    }
    const auto count = static_cast<std::int64_t>(lb.rows.size());
    lb.device_rows.resize(count);
    Kernels<Backend, T>::upload_indices(*ctx_, lb.rows.data(), lb.device_rows.view(count, 1));
    return lb;
  }

  void run_read(benchmark::State& state) {
    Model& m = model();
    const std::int64_t slab = static_cast<std::int64_t>(kReadSlabBytes / sizeof(T));
    const T* base = m.slabs.data();
    time_rotation(state, read_key(backend_), read_slabs(), 1, false,
                  [&](std::int64_t i, std::int64_t) {
                    Bench::read(*ctx_, Span{base + i * slab, kReadSlabBytes});
                  });
    state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(kReadSlabBytes));
  }

  void run_case(benchmark::State& state, const std::string& name, const std::string& what,
                std::int64_t n, std::int64_t t) {
    Case& cs = case_of(n, t);
    Model& m = model();
    const std::int64_t batches = cs.batch_count();
    const auto at = [](std::int64_t b) { return static_cast<std::size_t>(b); };
    if (what == "pool") {
      time_rotation(state, name, batches, cs.copies, false, [&](std::int64_t b, std::int64_t c) {
        m.pool[static_cast<std::size_t>(c)]->forward(*cs.plans[at(b)], x(n), y(n));
      });
    } else if (what == "padded") {
      time_rotation(state, name, batches, cs.copies, false, [&](std::int64_t b, std::int64_t c) {
        m.padded[static_cast<std::size_t>(c)]->forward(*cs.padded[at(b)], x(n), y(n));
      });
    } else if (what == "loop") {
      time_rotation(state, name, batches, cs.copies, false, [&](std::int64_t b, std::int64_t c) {
        per_adapter_loop(cs, b, c, [](LoraLayer& l, MatrixView<const T> xs, MatrixView<T> ys) {
          l.forward(xs, ys);
        });
      });
    } else if (what == "direct") {
      // T = 1: the batch's one adapter's own layer on all N rows.
      time_rotation(state, name, batches, cs.copies, false, [&](std::int64_t b, std::int64_t c) {
        lora(c, cs.batches[at(b)].adapter[0]).forward(x(n), y(n));
      });
    } else if (what == "plan") {
      // Host work plus the upload of the token order, into a plan of its own.
      time_rotation(state, name, batches, 1, true, [&](std::int64_t b, std::int64_t) {
        m.pool[0]->plan(ids_view(cs.ids[at(b)]), scratch_plan_);
      });
    }
    state.counters["units"] = mean_units(t);
  }

  void run_mixed(benchmark::State& state, const std::string& name, const std::string& what,
                 std::int64_t n) {
    MixedCase& mc = mixed_of(n);
    Model& m = model();
    const std::int64_t batches = mc.batch_count();
    const bool together = what == "together";
    time_rotation(state, name, batches, mc.copies, false, [&](std::int64_t b, std::int64_t c) {
      const auto cc = static_cast<std::size_t>(c);
      const auto bb = static_cast<std::size_t>(b);
      if (together) {
        m.pool[cc]->forward(*mc.together[bb], x(n), y(n));
      } else {
        m.pool[cc]->forward(*mc.lora_only[bb], x(n), y(n));
        m.smora_pool[cc]->forward(*mc.smora_only[bb], x(n), y(n));
      }
    });
  }

  Ctx* ctx_;
  std::string backend_;
  std::size_t cache_bytes_;
  bool quick_;
  std::unique_ptr<Model> model_;
  std::map<std::pair<std::int64_t, std::int64_t>, std::unique_ptr<Case>> cases_;
  std::map<std::int64_t, std::unique_ptr<MixedCase>> mixed_;
  std::set<std::string> warmed_;
  Plan scratch_plan_;
};

}  // namespace multi
}  // namespace bench
}  // namespace rankwise
