// The SMoRA benchmark bodies, written once for both backends and timed only
// through BenchBackend<Backend> (support/backend.hpp). Include
// <rankwise/rankwise.hpp> and support/cpu_backend.hpp, or <rankwise/cuda.cuh>
// and support/cuda_backend.cuh, first; no Eigen or CUDA is named here.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "smora/sizes.hpp"
#include "support/backend.hpp"

namespace rankwise {
namespace bench {
namespace smora {

/// One layer configuration of the table: LoRA at `rank`, or SMoRA (r = 64,
/// k = 8) with group size `group` and rank-unit path `path`.
struct Model {
  bool smora = false;
  std::int64_t rank = kRank;
  std::int64_t group = 1;
  RankUnitPath path = RankUnitPath::kAuto;

  std::string key(const std::string& backend, bool backward, std::int64_t n, bool uncached) const {
    return smora ? smora_key(backend, backward, group, path, n, uncached)
                 : lora_key(backend, backward, rank, n, uncached);
  }
  /// Bytes of weights one forward at N = 1 touches: all of A and Bᵀ for LoRA;
  /// the router and k rows of A and of Bᵀ for SMoRA's sparse path (its dense
  /// path reads all of A and Bᵀ, but shares the pool, see Suite::pool). The
  /// uncached rotation sizes itself by these, not by the layers' footprint:
  /// copies that route alike touch the same k rows each, so SMoRA g = 8
  /// needs 256 layers before the rows it reads outgrow a 32 MiB cache.
  std::size_t touched_bytes(std::size_t elem) const {
    if (!smora) return lora_weight_bytes(rank, elem);
    return static_cast<std::size_t>((kRank / group + 2 * kTopK) * kDim) * elem;
  }
  /// The layers of a pool: SMoRA's three paths share the layers of one g
  /// (separate rotations of 256 layers per path would need several GiB);
  /// run_layer switches their path with Smora::set_path before each run.
  std::string pool_id(bool uncached) const {
    return (smora ? "smora/g:" + std::to_string(group) : "lora/r:" + std::to_string(rank)) + "/" +
           cache_name(uncached);
  }
};

/// Every model of the layer table, in the order the benchmarks run.
inline std::vector<Model> table_models() {
  std::vector<Model> out;
  for (std::int64_t r : lora_ranks()) out.push_back(Model{false, r, 1, RankUnitPath::kAuto});
  for (std::int64_t g : groups()) {
    for (RankUnitPath p : paths()) out.push_back(Model{true, kRank, g, p});
  }
  return out;
}
/// What the targets judge: the dense rank-64 LoRA and SMoRA as shipped (kAuto).
inline std::vector<Model> shipped_models() {
  std::vector<Model> out{Model{false, kRank, 1, RankUnitPath::kAuto}};
  for (std::int64_t g : groups()) out.push_back(Model{true, kRank, g, RankUnitPath::kAuto});
  return out;
}

// 256-byte words: workspaces must be 256-byte aligned (WorkspaceCarver).
struct alignas(kWorkspaceAlignment) BenchWord {
  unsigned char bytes[kWorkspaceAlignment];
};

template <class Backend, class T>
class Suite {
 public:
  using Ctx = Context<Backend>;
  using K = Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  using LoraLayer = Lora<T, Backend>;
  using SmoraLayer = Smora<T, Backend>;
  using Bench = BenchBackend<Backend>;

  /// `cache_bytes`: the cache the uncached rotation must defeat (the CPU's
  /// last-level cache, the GPU's L2). `backend`: the result-name prefix.
  Suite(Ctx& ctx, std::string backend, std::size_t cache_bytes, bool quick)
      : ctx_(&ctx), backend_(std::move(backend)), cache_bytes_(cache_bytes), quick_(quick) {}

  const std::string& backend() const { return backend_; }

  /// Layers of `m` in rotation for the uncached runs (1 for the cached runs).
  /// Quick mode cuts the rotation to kQuickCopies layers: a smoke run checks
  /// the code paths, not the numbers, and should not take gigabytes.
  std::int64_t copies(const Model& m, bool uncached) const {
    if (!uncached) return 1;
    const std::int64_t full = rotation_copies(m.touched_bytes(sizeof(T)), cache_bytes_);
    return quick_ ? std::min<std::int64_t>(full, kQuickCopies) : full;
  }
  static constexpr std::int64_t kQuickCopies = 4;

  // ---- the layer table ------------------------------------------------------------

  /// Registers `models` at every N, cached and uncached; after the models of
  /// each (N, cached or not), `also(n, uncached)` may register more (the CPU
  /// bench: its OpenBLAS baseline), so they run next to each other.
  void register_table(const std::vector<Model>& models = table_models(),
                      const std::function<void(std::int64_t, bool)>& also = {}) {
    for (bool uncached : {false, true}) {
      for (std::int64_t n : token_counts(quick_)) {
        for (const Model& m : models) {
          for (bool backward : {false, true}) {
            auto* b = benchmark::RegisterBenchmark(
                m.key(backend_, backward, n, uncached).c_str(),
                [this, m, backward, n, uncached](benchmark::State& state) {
                  guarded(state, [&] { run_layer(state, m, backward, n, uncached); });
                });
            configure(b, n, table_min_time());
          }
        }
        if (also) also(n, uncached);
      }
    }
  }
  double table_min_time() const { return quick_ ? 0.01 : 0.25; }

  /// Inputs and outputs at n tokens (n x d each), shared by every run at n.
  struct Activations {
    Buffer<Backend, T> x, y, dy, dx;
  };
  Activations& activations(std::int64_t n) {
    auto it = acts_.find(n);
    if (it != acts_.end()) return *it->second;
    auto a = std::make_unique<Activations>();
    auto make = [&](Buffer<Backend, T>& b, double lo, double hi, std::uint64_t seed) {
      b.resize(n * kDim);
      K::fill_uniform(*ctx_, b.view(n, kDim), lo, hi, seed);
    };
    make(a->x, -1.0, 1.0, 11);
    make(a->dy, -1.0, 1.0, 12);
    make(a->y, 0.0, 0.0, 13);
    make(a->dx, 0.0, 0.0, 14);
    return *acts_.emplace(n, std::move(a)).first->second;
  }

  /// The rank-`rank` LoRA layers the table's runs rotate over (built on first
  /// use), for a baseline that runs other code on the same memory.
  const std::vector<std::unique_ptr<LoraLayer>>& lora_layers(std::int64_t rank, bool uncached) {
    return pool(Model{false, rank, 1, RankUnitPath::kAuto}, uncached).lora;
  }

  static void configure(benchmark::internal::Benchmark* b, std::int64_t n, double min_time) {
    bench::configure<Backend>(b, min_time, n);
  }

  // ---- the crossover grid: rank_units_forward/backward, kSparse vs kDense ------------

  void register_crossover() {
    const double min_time = quick_ ? 0.01 : 0.1;
    for (std::int64_t d : crossover_dims(quick_)) {
      for (const UnitShape& s : crossover_shapes(quick_)) {
        for (std::int64_t n : crossover_tokens(quick_)) {
          for (bool backward : {false, true}) {
            for (RankUnitPath p : {RankUnitPath::kSparse, RankUnitPath::kDense}) {
              auto* b = benchmark::RegisterBenchmark(
                  units_key(backend_, backward, d, s, path_name(p), n).c_str(),
                  [this, d, s, backward, n, p](benchmark::State& state) {
                    guarded(state, [&] { run_units(state, d, s, backward, n, p); });
                  });
              configure(b, n, min_time);
            }
          }
        }
      }
    }
  }

 private:
  /// Inputs of one crossover case.
  struct UnitCase {
    Buffer<Backend, T> x, a, bt, dy, y, dx, da, dbt;
    Buffer<Backend, std::int32_t> units;
    Buffer<Backend, Acc> gates, dgates;
    Buffer<Backend, BenchWord> workspace;
    std::int64_t n = 0, d = 0, k = 0, r = 0;
    UnitRouting<Acc> routing() {
      return {MatrixView<const std::int32_t>(units.data(), n, k, Backend::kMemorySpace),
              MatrixView<const Acc>(gates.data(), n, k, Backend::kMemorySpace)};
    }
    std::size_t workspace_bytes() const {
      return static_cast<std::size_t>(workspace.size()) * sizeof(BenchWord);
    }
  };

  /// One cached case per shape; built on first use, the previous one freed.
  UnitCase& unit_case(std::int64_t d, UnitShape s, std::int64_t n) {
    const auto want = std::make_tuple(d, s.k, s.r, n);
    if (unit_case_ && unit_key_ == want) return *unit_case_;
    unit_case_.reset();
    auto c = std::make_unique<UnitCase>();
    c->n = n;
    c->d = d;
    c->k = s.k;
    c->r = s.r;
    auto make = [&](Buffer<Backend, T>& b, std::int64_t rows, std::int64_t cols, double lo,
                    double hi, std::uint64_t seed) {
      b.resize(rows * cols);
      K::fill_uniform(*ctx_, b.view(rows, cols), lo, hi, seed);
    };
    const double bound = 1.0 / 64.0;
    make(c->x, n, d, -1.0, 1.0, 1);
    make(c->dy, n, d, -1.0, 1.0, 2);
    make(c->a, s.r, d, -bound, bound, 3);
    make(c->bt, s.r, d, -0.01, 0.01, 4);
    make(c->y, n, d, 0.0, 0.0, 5);
    make(c->dx, n, d, 0.0, 0.0, 6);
    make(c->da, s.r, d, 0.0, 0.0, 7);
    make(c->dbt, s.r, d, 0.0, 0.0, 8);
    // A routing as the router makes one: k distinct units per token, uniform
    // over the r units, gates summing to k.
    std::mt19937 rng(static_cast<unsigned>(1000 + n));
    std::vector<std::int32_t> perm(static_cast<std::size_t>(s.r));
    std::vector<std::int32_t> units(static_cast<std::size_t>(n * s.k));
    std::vector<Acc> gates(units.size());
    std::uniform_real_distribution<float> uni(0.5f, 1.5f);
    for (std::int64_t t = 0; t < n; ++t) {
      for (std::int64_t u = 0; u < s.r; ++u) perm[u] = static_cast<std::int32_t>(u);
      std::shuffle(perm.begin(), perm.end(), rng);
      float total = 0;
      for (std::int64_t j = 0; j < s.k; ++j) {
        units[t * s.k + j] = perm[j];
        gates[t * s.k + j] = uni(rng);
        total += gates[t * s.k + j];
      }
      for (std::int64_t j = 0; j < s.k; ++j) gates[t * s.k + j] *= static_cast<Acc>(s.k) / total;
    }
    c->units.resize(n * s.k);
    Memory<Backend>::upload(*ctx_, c->units.data(), units.data(),
                            sizeof(std::int32_t) * units.size());
    c->gates.resize(n * s.k);
    Kernels<Backend, Acc>::upload(*ctx_, gates.data(), c->gates.view(n, s.k));
    c->dgates.resize(n * s.k);
    const std::size_t ws = std::max(rank_units_forward_workspace_bytes<T>(n, s.k, s.r),
                                    rank_units_backward_workspace_bytes<T>(n, s.k, s.r));
    c->workspace.resize(
        static_cast<std::int64_t>((ws + sizeof(BenchWord) - 1) / sizeof(BenchWord)));
    K::synchronize(*ctx_);
    unit_case_ = std::move(c);
    unit_key_ = want;
    return *unit_case_;
  }

  static std::int64_t flops_units(bool backward, std::int64_t n, std::int64_t d,
                                  std::int64_t rank) {
    return (backward ? 10 : 4) * n * rank * d;
  }

  struct Pool {
    std::vector<std::unique_ptr<LoraLayer>> lora;
    std::vector<std::unique_ptr<SmoraLayer>> smora;
    // Per layer: largest N each direction has run at (workspace grown), and
    // the N of the last forward (Smora::backward needs it to match).
    std::vector<std::int64_t> fwd_n, bwd_n, routed_n;
    std::int64_t size() const {
      return static_cast<std::int64_t>(lora.empty() ? smora.size() : lora.size());
    }
  };

  // Layers of every copy get the same weights (a copy of the first), so they
  // route alike; only their memory differs.
  Pool& pool(const Model& m, bool uncached) {
    const std::string id = m.pool_id(uncached);
    auto it = pools_.find(id);
    if (it != pools_.end()) return *it->second;
    auto p = std::make_unique<Pool>();
    const std::int64_t count = copies(m, uncached);
    for (std::int64_t i = 0; i < count; ++i) {
      if (m.smora) {
        SmoraConfig cfg;
        cfg.d_in = kDim;
        cfg.d_out = kDim;
        cfg.router.num_units = kRank;
        cfg.router.group_size = m.group;
        cfg.router.top_k = kTopK;
        cfg.alpha = kSmoraAlpha;
        cfg.path = RankUnitPath::kAuto;  // set per run: Smora::set_path
        cfg.check_finite = Bench::kCheckFinite;
        auto layer = std::make_unique<SmoraLayer>(*ctx_, cfg);
        if (i == 0) {
          layer->init(21);
          K::fill_uniform(*ctx_, layer->bt(), -0.01, 0.01, 22);
        } else {
          SmoraLayer& first = *p->smora.front();
          K::copy(*ctx_, first.a(), Op::kNoTrans, layer->a());
          K::copy(*ctx_, first.bt(), Op::kNoTrans, layer->bt());
          K::copy(*ctx_, first.wr(), Op::kNoTrans, layer->wr());
        }
        p->smora.push_back(std::move(layer));
      } else {
        LoraConfig cfg;
        cfg.d_in = kDim;
        cfg.d_out = kDim;
        cfg.rank = m.rank;
        cfg.alpha = kAlpha;
        auto layer = std::make_unique<LoraLayer>(*ctx_, cfg);
        if (i == 0) {
          layer->init_peft(21);
          K::fill_uniform(*ctx_, layer->bt(), -0.01, 0.01, 22);
        } else {
          LoraLayer& first = *p->lora.front();
          K::copy(*ctx_, first.a(), Op::kNoTrans, layer->a());
          K::copy(*ctx_, first.bt(), Op::kNoTrans, layer->bt());
        }
        p->lora.push_back(std::move(layer));
      }
    }
    p->fwd_n.assign(count, 0);
    p->bwd_n.assign(count, 0);
    p->routed_n.assign(count, -1);
    K::synchronize(*ctx_);
    return *pools_.emplace(id, std::move(p)).first->second;
  }

  void run_layer(benchmark::State& state, const Model& m, bool backward, std::int64_t n,
                 bool uncached) {
    Pool& p = pool(m, uncached);
    Activations& act = activations(n);
    const auto x = MatrixView<const T>(act.x.data(), n, kDim, Backend::kMemorySpace);
    const auto dy = MatrixView<const T>(act.dy.data(), n, kDim, Backend::kMemorySpace);
    const auto y = act.y.view(n, kDim);
    const auto dx = act.dx.view(n, kDim);
    const std::int64_t count = p.size();

    if (m.smora) {
      for (auto& layer : p.smora) layer->set_path(m.path);
    }
    auto forward = [&](std::int64_t i, Mode mode) {
      if (m.smora) {
        p.smora[i]->forward(x, y, mode);
        p.routed_n[i] = n;
      } else {
        p.lora[i]->forward(x, y);
      }
    };
    auto need = [&](std::int64_t i) {
      if (!backward) return p.fwd_n[i] < n;
      return p.bwd_n[i] < n || (m.smora && p.routed_n[i] != n);
    };
    // Untimed: grows the layer's workspace and, for SMoRA's backward, runs the
    // training forward whose routing the backward uses.
    auto prep = [&](std::int64_t i) {
      if (!backward) {
        forward(i, Mode::kInference);
        p.fwd_n[i] = std::max(p.fwd_n[i], n);
        return;
      }
      if (m.smora) {
        forward(i, Mode::kTraining);
        p.smora[i]->backward(x, dy, dx);
      } else {
        p.lora[i]->backward(x, dy, dx);
      }
      p.bwd_n[i] = std::max(p.bwd_n[i], n);
    };
    auto call = [&](std::int64_t i) {
      if (!backward) {
        forward(i, Mode::kInference);
      } else if (m.smora) {
        p.smora[i]->backward(x, dy, dx);
      } else {
        p.lora[i]->backward(x, dy, dx);
      }
    };
    // Cheap calls: prepare every layer now, so the timed loop never pauses.
    // Expensive ones (N >= 256): only the layers the loop reaches, lazily.
    if (n <= 16) {
      for (std::int64_t i = 0; i < count; ++i) {
        if (need(i)) prep(i);
      }
      K::synchronize(*ctx_);
    }
    Bench::run(state, *ctx_, Rotation{count, 1}, call, need, prep);
    const std::int64_t rank = m.smora ? kTopK : m.rank;
    state.counters["FLOP/s"] =
        benchmark::Counter(static_cast<double>(flops_units(backward, n, kDim, rank)),
                           benchmark::Counter::kIsIterationInvariantRate);
    state.counters["copies"] = static_cast<double>(count);
  }

  void run_units(benchmark::State& state, std::int64_t d, UnitShape s, bool backward,
                 std::int64_t n, RankUnitPath path) {
    UnitCase& c = unit_case(d, s, n);
    const double scale = kSmoraAlpha / static_cast<double>(s.k);
    const auto x = MatrixView<const T>(c.x.data(), n, d, Backend::kMemorySpace);
    const auto dy = MatrixView<const T>(c.dy.data(), n, d, Backend::kMemorySpace);
    const auto a = MatrixView<const T>(c.a.data(), s.r, d, Backend::kMemorySpace);
    const auto bt = MatrixView<const T>(c.bt.data(), s.r, d, Backend::kMemorySpace);
    auto call = [&](std::int64_t) {
      if (!backward) {
        rank_units_forward<Backend, T>(*ctx_, scale, x, a, bt, c.routing(), c.y.view(n, d), path,
                                       c.workspace.data(), c.workspace_bytes());
      } else {
        rank_units_backward<Backend, T>(*ctx_, scale, x, a, bt, c.routing(), dy, c.dx.view(n, d),
                                        c.da.view(s.r, d), c.dbt.view(s.r, d),
                                        c.dgates.view(n, s.k), false, path, c.workspace.data(),
                                        c.workspace_bytes());
      }
    };
    call(0);  // warm
    K::synchronize(*ctx_);
    Bench::run(state, *ctx_, Rotation{1, 1}, call);
    state.counters["FLOP/s(k)"] =
        benchmark::Counter(static_cast<double>(flops_units(backward, n, d, s.k)),
                           benchmark::Counter::kIsIterationInvariantRate);
  }

  Ctx* ctx_;
  std::string backend_;
  std::size_t cache_bytes_;
  bool quick_;
  std::map<std::string, std::unique_ptr<Pool>> pools_;
  std::map<std::int64_t, std::unique_ptr<Activations>> acts_;
  std::unique_ptr<UnitCase> unit_case_;
  std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t> unit_key_{};
};

}  // namespace smora
}  // namespace bench
}  // namespace rankwise
