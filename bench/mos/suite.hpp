// The MoS benchmark's bodies, written once over Backend and the storage type
// T: the model (one projection type at width d: the dense LoRA stack, the
// shard pool and a Mos stack per path), the activations, one pass over a
// stack, and the registration of every benchmark in the order both binaries
// list them. Timed only through BenchBackend<Backend>. Include after the
// backend (support/cpu_backend.hpp or support/cuda_backend.cuh).
#pragma once

#include <benchmark/benchmark.h>

#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "mos/sizes.hpp"
#include "support/backend.hpp"

namespace rankwise {
namespace bench {
namespace mos {

/// What one binary's runs of a (T, Backend) do differently.
struct Flavor {
  std::string backend;  // the result names' prefix: cpu_f32, cuda_f32, cuda_f16
  // Zero y and dx before every timed pass (off the clock): each pass adds
  // into them, and over many passes __half outputs run to infinity.
  bool zero_outputs = false;
  // One untimed pass before the timed ones (the GPU's first launches load
  // kernels and set up cuBLAS).
  bool warm_up_pass = false;
  // From this N on, exactly one iteration and one repetition: a CPU pass at
  // N = 2048 takes seconds.
  std::int64_t single_run_from = std::numeric_limits<std::int64_t>::max();
};

template <class T, class Backend>
struct Model {
  using Kern = Kernels<Backend, T>;
  using LoraLayer = Lora<T, Backend>;
  using MosLayer = Mos<T, Backend>;

  explicit Model(std::int64_t d_) : d(d_), pool(ctx, pool_config(d_)) {
    pool.init(1);
    Kern::fill_uniform(ctx, pool.b(), -0.01, 0.01, 2);  // nonzero B: real arithmetic
    for (std::int64_t i = 0; i < kLayers; ++i) {
      lora.push_back(std::make_unique<LoraLayer>(ctx, lora_config(d)));
      lora.back()->init_peft(100 + i);
      Kern::fill_uniform(ctx, lora.back()->bt(), -0.01, 0.01, 200 + i);
    }
    warm_up(lora);
  }

  /// The stack of one path, built on first use (all on the same pool and the
  /// same index lists; only the stack being timed touches its buffers).
  std::vector<std::unique_ptr<MosLayer>>& mos(ShardPath path) {
    auto& layers = mos_[path];
    if (layers.empty()) {
      for (std::int64_t i = 0; i < kLayers; ++i) {
        layers.push_back(std::make_unique<MosLayer>(pool, i, mos_config(), path));
      }
      warm_up(layers);
    }
    return layers;
  }

  /// One N = 1 and one N = 64 step: allocates every per-layer buffer (and, on
  /// the GPU, loads the kernels) outside the timed loops.
  template <class Layers>
  void warm_up(Layers& layers) {
    for (std::int64_t n : {1, 64}) {
      Buffer<Backend, T> x(n * d), y(n * d), dx(n * d);
      Kern::fill(ctx, x.view(n, d), 0.0);
      Kern::fill(ctx, y.view(n, d), 0.0);
      Kern::fill(ctx, dx.view(n, d), 0.0);
      for (auto& l : layers) {
        l->forward(x.view(n, d), y.view(n, d));
        l->backward(x.view(n, d), y.view(n, d), dx.view(n, d));
      }
      ctx.synchronize();
    }
    pool.zero_grad();
    ctx.synchronize();
  }

  std::int64_t d;
  Context<Backend> ctx;
  ShardPool<T, Backend> pool;
  std::vector<std::unique_ptr<LoraLayer>> lora;

 private:
  std::map<ShardPath, std::vector<std::unique_ptr<MosLayer>>> mos_;
};

/// The model at width d, built once.
template <class T, class Backend>
Model<T, Backend>& model(std::int64_t d) {
  static std::map<std::int64_t, std::unique_ptr<Model<T, Backend>>> models;
  auto& m = models[d];
  if (!m) m = std::make_unique<Model<T, Backend>>(d);
  return *m;
}

/// Activations x and upstream gradients dy (U(-1, 1)), outputs y and dx (zero).
template <class T, class Backend>
struct Io {
  std::int64_t n = 0, d = 0;
  Buffer<Backend, T> x, dy, y, dx;
};

/// The buffers of (N, d), built once on the model's context (~0.2 GiB in all):
/// the CPU's runs are interleaved.
template <class T, class Backend>
Io<T, Backend>& io(Context<Backend>& ctx, std::int64_t n, std::int64_t d) {
  using Kern = Kernels<Backend, T>;
  static std::map<std::pair<std::int64_t, std::int64_t>, std::unique_ptr<Io<T, Backend>>> cache;
  auto& slot = cache[{n, d}];
  if (!slot) {
    slot = std::make_unique<Io<T, Backend>>();
    slot->n = n;
    slot->d = d;
    for (auto* buffer : {&slot->x, &slot->dy, &slot->y, &slot->dx}) buffer->resize(n * d);
    Kern::fill_uniform(ctx, slot->x.view(n, d), -1.0, 1.0, 11);
    Kern::fill_uniform(ctx, slot->dy.view(n, d), -1.0, 1.0, 12);
    Kern::fill(ctx, slot->y.view(n, d), 0.0);
    Kern::fill(ctx, slot->dx.view(n, d), 0.0);
    ctx.synchronize();
  }
  return *slot;
}

/// One pass of `mode` over a stack: forward 0..L-1, backward L-1..0.
template <class T, class Backend, class Layers>
void pass(Layers& layers, Mode mode, Io<T, Backend>& b) {
  const MatrixView<const T> x = b.x.view(b.n, b.d), dy = b.dy.view(b.n, b.d);
  const MatrixView<T> y = b.y.view(b.n, b.d), dx = b.dx.view(b.n, b.d);
  if (mode != Mode::kBwd) {
    for (auto& l : layers) l->forward(x, y);
  }
  if (mode != Mode::kFwd) {
    for (auto it = layers.rbegin(); it != layers.rend(); ++it) (*it)->backward(x, dy, dx);
  }
}

/// Times `call` through BenchBackend, after the flavor's untimed pass.
template <class Backend, class Call, class Need = Never, class Prep = NoPrep>
void time_calls(benchmark::State& state, const Flavor& flavor, Context<Backend>& ctx, Call call,
                Need need = {}, Prep prep = {}) {
  if (flavor.warm_up_pass) {
    call(0);
    ctx.synchronize();
  }
  BenchBackend<Backend>::run(state, ctx, Rotation{}, call, need, prep);
}

/// Passes of `mode` over `layers` at N = n. `pool_layers`: the layers add
/// into the model's shared pool gradients, so a step starts with the pool's
/// zero_grad() (LoRA layers overwrite their own).
template <class T, class Backend, class Layers>
void time_passes(benchmark::State& state, const Flavor& flavor, Model<T, Backend>& m,
                 Layers& layers, bool pool_layers, Mode mode, std::int64_t n) {
  Io<T, Backend>& b = io<T, Backend>(m.ctx, n, m.d);
  auto call = [&](std::int64_t) {
    if (pool_layers && mode == Mode::kStep) m.pool.zero_grad();
    pass(layers, mode, b);
  };
  auto zero_outputs = [&](std::int64_t) {
    Kernels<Backend, T>::fill(m.ctx, b.y.view(n, m.d), 0.0);
    Kernels<Backend, T>::fill(m.ctx, b.dx.view(n, m.d), 0.0);
  };
  if (flavor.zero_outputs)
    time_calls<Backend>(state, flavor, m.ctx, call, Always{}, zero_outputs);
  else
    time_calls<Backend>(state, flavor, m.ctx, call);
  state.counters["layers"] = static_cast<double>(kLayers);
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
}

/// Registers each benchmark once (the sweep repeats some of the main table's
/// runs), on the backend's clock, in milliseconds.
template <class Backend>
class Registrar {
 public:
  Registrar(Flavor flavor, bool quick)
      : flavor_(std::move(flavor)), min_time_(quick ? 0.005 : 0.1) {}

  const Flavor& flavor() const { return flavor_; }

  /// `body(state)` as `name`, at N = n.
  template <class Body>
  void add(const std::string& name, std::int64_t n, Body body) {
    if (!seen_.insert(name).second) return;
    auto* b = benchmark::RegisterBenchmark(
        name.c_str(), [body](benchmark::State& state) { guarded(state, [&] { body(state); }); });
    b->Unit(benchmark::kMillisecond);
    if (BenchBackend<Backend>::kManualTime)
      b->UseManualTime();
    else
      b->UseRealTime();
    if (n >= flavor_.single_run_from)
      b->Iterations(1)->Repetitions(1);
    else
      b->MinTime(min_time_);
  }
  /// The same, named key(backend, impl, mode, d, n).
  template <class Body>
  void add(const std::string& impl, Mode mode, std::int64_t d, std::int64_t n, Body body) {
    add(key(flavor_.backend, impl, mode, d, n), n, std::move(body));
  }

 private:
  Flavor flavor_;
  double min_time_;
  std::set<std::string> seen_;
};

/// No implementations beyond the library's.
struct NoExtra {
  template <class Reg>
  void operator()(Reg&, Mode, std::int64_t, std::int64_t) const {}
};

/// Every benchmark of (T, Backend): the pool's zero_grad(); the main table
/// grouped by N, LoRA next to the MoS paths (similar machine load); the
/// direct / assembled crossover sweep. `extra(reg, mode, d, n)` registers a
/// binary's own implementations: in the main table after mos_auto, in the
/// sweep after mos_assembled.
template <class T, class Backend, class Extra = NoExtra>
void register_suite(const Flavor& flavor, bool quick, Extra extra = {}) {
  Registrar<Backend> reg(flavor, quick);
  const Flavor& f = reg.flavor();
  auto lora = [f](Mode mode, std::int64_t d, std::int64_t n) {
    return [f, mode, d, n](benchmark::State& state) {
      Model<T, Backend>& m = model<T, Backend>(d);
      time_passes(state, f, m, m.lora, false, mode, n);
    };
  };
  auto mos = [f](ShardPath path, Mode mode, std::int64_t d, std::int64_t n) {
    return [f, path, mode, d, n](benchmark::State& state) {
      Model<T, Backend>& m = model<T, Backend>(d);
      time_passes(state, f, m, m.mos(path), true, mode, n);
    };
  };
  const std::int64_t d = kDim;
  reg.add(zero_grad_key(f.backend, d), 0, [f, d](benchmark::State& state) {
    Model<T, Backend>& m = model<T, Backend>(d);
    time_calls<Backend>(state, f, m.ctx, [&m](std::int64_t) { m.pool.zero_grad(); });
  });
  for (std::int64_t n : token_counts(quick)) {
    for (Mode mode : {Mode::kFwd, Mode::kStep}) {
      reg.add("lora", mode, d, n, lora(mode, d, n));
      for (ShardPath p : {ShardPath::kDirect, ShardPath::kAssembled, ShardPath::kAuto}) {
        reg.add(path_name(p), mode, d, n, mos(p, mode, d, n));
      }
      extra(reg, mode, d, n);
    }
  }
  for (std::int64_t sd : sweep_dims(quick)) {
    for (std::int64_t n : sweep_counts(quick)) {
      for (Mode mode : {Mode::kFwd, Mode::kBwd}) {
        for (ShardPath p : {ShardPath::kDirect, ShardPath::kAssembled}) {
          reg.add(path_name(p), mode, sd, n, mos(p, mode, sd, n));
        }
        extra(reg, mode, sd, n);
        reg.add("lora", mode, sd, n, lora(mode, sd, n));
      }
    }
  }
}

}  // namespace mos
}  // namespace bench
}  // namespace rankwise
