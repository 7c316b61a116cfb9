// The LoRA benchmark bodies, written once over Backend and T and timed only
// through BenchBackend<Backend> (support/backend.hpp):
//
//   delta_fwd   Lora::forward(x, y): y += s x Aᵀ Bᵀ
//   delta_bwd   Lora::backward(x, dy, dx): dA, dB, dx +=
//   gemm_fwd    the two GEMMs of the forward on the same layer's memory (no
//               layer, no checks, no workspace): Platform::raw_gemm
//   gemm_bwd    the five GEMMs of the backward, likewise
//   base        the frozen base product Y = X W0ᵀ (d x d), one GEMM
//   naive       ΔW = s B A materialised (d x d) every call, then Y += X ΔWᵀ
//   read        BenchBackend::read over A and Bᵀ: the byte bound
//
// Up to N = Platform::kRotateMaxTokens every variant rotates over copies of
// the layer, kRotationCacheMultiple times the cache in all, so A and B come
// from memory as they would in a model with many layers; the baselines and
// the read bound use the very layers the delta uses (same bytes, same
// addresses). Layers are built on first use and kept: random interleaving
// runs the repetitions of all benchmarks in a shuffled order.
//
// What differs between the backends is in Platform<Backend>, specialised by
// the target's source (bench_lora.cpp, bench_lora_cuda.cu):
//
//   context(threads)        the context of that many threads (the GPU has one)
//   thread_counts()         the delta and read run at each
//   prefix<T>(threads)      result-name prefix ("cpu_f32/t:1", "cuda_f16")
//   kRotateMaxTokens        rotate for N up to this
//   kBatch                  calls per timed sample
//   kWarmUpBaselines        warm every variant up before timing, not only the delta
//   kReadPerThread          read listed with the delta at each thread count,
//                           else once after gemm_fwd (the registration order)
//   min_time(quick)
//   before_delta()          just before the delta's timed loop
//   raw_gemm<T>(ctx, alpha, a, op_a, b, op_b, beta, c)   the raw baseline GEMM
//
// Include it after the backend's rankwise header (<rankwise/rankwise.hpp>,
// <rankwise/cuda.cuh>): it names rankwise's types, not one backend.
#pragma once

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "lora/sizes.hpp"
#include "support/backend.hpp"

namespace rankwise {
namespace bench {
namespace lora {

template <class Backend>
struct Platform;

template <class Backend, class T>
using Layer = rankwise::Lora<T, Backend>;
template <class Backend, class T>
using Kern = rankwise::Kernels<Backend, T>;

template <class T>
std::size_t factor_bytes(std::int64_t rank) {  // A or Bᵀ
  return sizeof(T) * static_cast<std::size_t>(rank * kDim);
}

template <class Backend, class T>
std::int64_t copies_for(std::int64_t rank, std::int64_t n) {
  return n <= Platform<Backend>::kRotateMaxTokens
             ? rotation_copies(2 * factor_bytes<T>(rank), BenchBackend<Backend>::cache_bytes())
             : 1;
}

inline float scale_for(std::int64_t rank) { return static_cast<float>(kAlpha / rank); }

// A (rows x cols) matrix of U(lo, hi) values, built once per (rows, cols,
// seed) and shared by every benchmark that needs it.
template <class Backend, class T>
MatrixView<const T> random_input(std::int64_t rows, std::int64_t cols, std::uint64_t seed,
                                 double lo, double hi) {
  static std::map<std::tuple<std::int64_t, std::int64_t, std::uint64_t>,
                  std::unique_ptr<Buffer<Backend, T>>>
      cache;
  auto& slot = cache[std::make_tuple(rows, cols, seed)];
  if (!slot) {
    slot = std::make_unique<Buffer<Backend, T>>(rows * cols);
    Kern<Backend, T>::fill_uniform(Platform<Backend>::context(1), slot->view(rows, cols), lo, hi,
                                   seed);
  }
  return slot->view(rows, cols);
}
template <class Backend, class T>
MatrixView<const T> tokens_input(std::int64_t n) {
  return random_input<Backend, T>(n, kDim, 11, -1.0, 1.0);
}
template <class Backend, class T>
MatrixView<const T> upstream_grad(std::int64_t n) {
  return random_input<Backend, T>(n, kDim, 12, -1.0, 1.0);
}
template <class Backend, class T>
MatrixView<const T> base_weight() {  // (d_out x d_in)
  return random_input<Backend, T>(kDim, kDim, 13, -1.0 / 64, 1.0 / 64);
}

// A zeroed (rows x cols) matrix owned by the benchmark that asks.
template <class Backend, class T>
struct Scratch {
  Buffer<Backend, T> buffer;
  MatrixView<T> view;
  Scratch(std::int64_t rows, std::int64_t cols) : buffer(rows * cols) {
    view = buffer.view(rows, cols);
    Kern<Backend, T>::fill(Platform<Backend>::context(1), view, 0.0);
  }
};

// `copies` layers with PEFT-initialised A and a nonzero B, built with the
// context of `threads` (the layers keep a pointer to it).
template <class Backend, class T>
std::vector<std::unique_ptr<Layer<Backend, T>>>& layer_pool(int threads, std::int64_t rank,
                                                            std::int64_t copies) {
  static std::map<std::tuple<int, std::int64_t, std::int64_t>,
                  std::vector<std::unique_ptr<Layer<Backend, T>>>>
      pools;
  auto& pool = pools[{threads, rank, copies}];
  if (pool.empty()) {
    auto& ctx = Platform<Backend>::context(threads);
    LoraConfig cfg;
    cfg.d_in = kDim;
    cfg.d_out = kDim;
    cfg.rank = rank;
    cfg.alpha = kAlpha;
    for (std::int64_t i = 0; i < copies; ++i) {
      pool.push_back(std::make_unique<Layer<Backend, T>>(ctx, cfg));
      pool.back()->init_peft(100 + i);
      Kern<Backend, T>::fill_uniform(ctx, pool.back()->bt(), -0.01, 0.01, 200 + i);
    }
    Kern<Backend, T>::synchronize(ctx);
  }
  return pool;
}

// The raw baseline GEMM, c = alpha op(a) op(b) + beta c: Platform's.
template <class Backend, class T>
void raw_gemm(Context<Backend>& ctx, float alpha, MatrixView<const T> a, Op op_a,
              MatrixView<const T> b, Op op_b, float beta, MatrixView<T> c) {
  Platform<Backend>::template raw_gemm<T>(ctx, alpha, a, op_a, b, op_b, beta, c);
}

// Times call(i) over `copies` rotated copies; `warm_up` runs each copy once
// first (workspaces, library heuristics).
template <class Backend, class T, class Call>
void time_calls(benchmark::State& state, int threads, std::int64_t copies, bool warm_up,
                Call call) {
  auto& ctx = Platform<Backend>::context(threads);
  if (warm_up) {
    for (std::int64_t i = 0; i < copies; ++i) call(i);
    Kern<Backend, T>::synchronize(ctx);
  }
  BenchBackend<Backend>::run(state, ctx, Rotation{copies, Platform<Backend>::kBatch}, call);
}

// FLOP/s (flops per call), bytes/s when `bytes` (per call) > 0, and the copies.
inline void set_counters(benchmark::State& state, double flops, std::size_t bytes,
                         std::int64_t copies) {
  if (flops > 0) {
    state.counters["FLOP/s"] =
        benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  }
  if (bytes > 0) state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(bytes));
  state.counters["copies"] = static_cast<double>(copies);
}

template <class Backend, class T>
void bm_delta(benchmark::State& state, bool backward, int threads, std::int64_t rank,
              std::int64_t n) {
  guarded(state, [&] {
    const std::int64_t copies = copies_for<Backend, T>(rank, n);
    auto& layers = layer_pool<Backend, T>(threads, rank, copies);
    const auto x = tokens_input<Backend, T>(n);
    const auto dy = upstream_grad<Backend, T>(n);
    Scratch<Backend, T> out(n, kDim);  // y of the forward, dx of the backward
    auto call = [&](std::int64_t i) {
      if (backward)
        layers[i]->backward(x, dy, out.view);
      else
        layers[i]->forward(x, out.view);
    };
    auto& ctx = Platform<Backend>::context(threads);
    for (std::int64_t i = 0; i < copies; ++i) call(i);  // allocates each workspace once
    Kern<Backend, T>::synchronize(ctx);
    Platform<Backend>::before_delta();
    BenchBackend<Backend>::run(state, ctx, Rotation{copies, Platform<Backend>::kBatch}, call);
    set_counters(state, delta_flops(backward, rank, n), backward ? 0 : 2 * factor_bytes<T>(rank),
                 copies);
  });
}

template <class Backend, class T>
void bm_gemm(benchmark::State& state, bool backward, std::int64_t rank, std::int64_t n) {
  using P = Platform<Backend>;
  guarded(state, [&] {
    const std::int64_t copies = copies_for<Backend, T>(rank, n);
    auto& layers = layer_pool<Backend, T>(1, rank, copies);
    const auto x = tokens_input<Backend, T>(n);
    const auto dy = upstream_grad<Backend, T>(n);
    Scratch<Backend, T> out(n, kDim), h(n, rank), dh(n, rank);
    const float s = scale_for(rank);
    auto& ctx = P::context(1);
    auto call = [&](std::int64_t i) {
      auto& layer = *layers[i];
      const MatrixView<const T> a = layer.a(), bt = layer.bt();
      raw_gemm<Backend, T>(ctx, 1.0f, x, Op::kNoTrans, a, Op::kTrans, 0.0f, h.view);
      if (!backward) {
        raw_gemm<Backend, T>(ctx, s, h.view, Op::kNoTrans, bt, Op::kNoTrans, 1.0f, out.view);
        return;
      }
      raw_gemm<Backend, T>(ctx, s, dy, Op::kNoTrans, bt, Op::kTrans, 0.0f, dh.view);
      raw_gemm<Backend, T>(ctx, s, h.view, Op::kTrans, dy, Op::kNoTrans, 0.0f, layer.grad_bt());
      raw_gemm<Backend, T>(ctx, 1.0f, dh.view, Op::kTrans, x, Op::kNoTrans, 0.0f, layer.grad_a());
      raw_gemm<Backend, T>(ctx, 1.0f, dh.view, Op::kNoTrans, a, Op::kNoTrans, 1.0f, out.view);
    };
    time_calls<Backend, T>(state, 1, copies, P::kWarmUpBaselines, call);
    set_counters(state, delta_flops(backward, rank, n), backward ? 0 : 2 * factor_bytes<T>(rank),
                 copies);
  });
}

template <class Backend, class T>
void bm_base(benchmark::State& state, std::int64_t n) {
  using P = Platform<Backend>;
  guarded(state, [&] {
    const auto x = tokens_input<Backend, T>(n);
    // W0 is 64 MiB in float but 32 MiB in 16-bit types, which can stay in a
    // 50 MiB L2 across back-to-back calls at small N: base is then warm.
    const auto w0 = base_weight<Backend, T>();
    Scratch<Backend, T> y(n, kDim);
    auto& ctx = P::context(1);
    time_calls<Backend, T>(state, 1, 1, P::kWarmUpBaselines, [&](std::int64_t) {
      raw_gemm<Backend, T>(ctx, 1.0f, x, Op::kNoTrans, w0, Op::kTrans, 0.0f, y.view);
    });
    set_counters(state, 2.0 * n * kDim * kDim, 0, 1);
  });
}

template <class Backend, class T>
void bm_naive(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  using P = Platform<Backend>;
  guarded(state, [&] {
    // ΔW (64 MiB in float) is never cached: one layer, no rotation.
    const auto& layer = *layer_pool<Backend, T>(1, rank, copies_for<Backend, T>(rank, n))[0];
    const auto x = tokens_input<Backend, T>(n);
    Scratch<Backend, T> y(n, kDim), dw(kDim, kDim);  // ΔW (d_out x d_in), allocated once
    const float s = scale_for(rank);
    auto& ctx = P::context(1);
    time_calls<Backend, T>(state, 1, 1, P::kWarmUpBaselines, [&](std::int64_t) {
      raw_gemm<Backend, T>(ctx, s, layer.bt(), Op::kTrans, layer.a(), Op::kNoTrans, 0.0f, dw.view);
      raw_gemm<Backend, T>(ctx, 1.0f, x, Op::kNoTrans, dw.view, Op::kTrans, 1.0f, y.view);
    });
    set_counters(state, 2.0 * kDim * kDim * rank + 2.0 * n * kDim * kDim, 0, 1);
  });
}

template <class Backend, class T>
void bm_read(benchmark::State& state, int threads, std::int64_t rank) {
  guarded(state, [&] {
    const std::int64_t copies = copies_for<Backend, T>(rank, 1);
    auto& layers = layer_pool<Backend, T>(threads, rank, copies);
    auto& ctx = Platform<Backend>::context(threads);
    const std::size_t bytes = factor_bytes<T>(rank);
    time_calls<Backend, T>(state, threads, copies, Platform<Backend>::kWarmUpBaselines,
                           [&](std::int64_t i) {
                             BenchBackend<Backend>::read(ctx, Span{layers[i]->a().data, bytes},
                                                         Span{layers[i]->bt().data, bytes});
                           });
    set_counters(state, 0, 2 * bytes, copies);
  });
}

/// Registers the suite for T. Grouped by (r, N), so that without random
/// interleaving each delta runs right next to its baselines (similar machine
/// load for the ratio). `after_delta(what, threads, r, n)` registers what
/// the backend adds next to each delta ("delta_fwd", "delta_bwd"), e.g. the
/// OpenBLAS baselines.
template <class Backend, class T, class AfterDelta>
void register_suite(bool quick, AfterDelta after_delta) {
  using P = Platform<Backend>;
  const double min_time = P::min_time(quick);
  auto reg = [&](const std::string& name, std::int64_t n, auto body) {
    configure<Backend>(benchmark::RegisterBenchmark(name.c_str(), body), min_time, n, true);
  };
  const std::string p1 = P::template prefix<T>(1);
  for (std::int64_t n : token_counts(quick)) {
    reg(key(p1, "base", 0, n), n, [n](benchmark::State& s) { bm_base<Backend, T>(s, n); });
  }
  for (std::int64_t r : ranks(quick)) {
    for (std::int64_t n : token_counts(quick)) {
      auto reg_read = [&](int t) {
        reg(key(P::template prefix<T>(t), "read", r, 0), 1,
            [t, r](benchmark::State& s) { bm_read<Backend, T>(s, t, r); });
      };
      for (bool backward : {false, true}) {
        const char* what = backward ? "delta_bwd" : "delta_fwd";
        for (int t : P::thread_counts()) {
          reg(key(P::template prefix<T>(t), what, r, n), n,
              [=](benchmark::State& s) { bm_delta<Backend, T>(s, backward, t, r, n); });
          after_delta(what, t, r, n);
          if (!backward && n == 1 && P::kReadPerThread) reg_read(t);
        }
        reg(key(p1, backward ? "gemm_bwd" : "gemm_fwd", r, n), n,
            [=](benchmark::State& s) { bm_gemm<Backend, T>(s, backward, r, n); });
        if (!backward && n == 1 && !P::kReadPerThread) reg_read(1);
      }
      reg(key(p1, "naive", r, n), n, [=](benchmark::State& s) { bm_naive<Backend, T>(s, r, n); });
    }
  }
}

}  // namespace lora
}  // namespace bench
}  // namespace rankwise
