// MoS (Mixture of Shards) benchmark on the GPU (CUDA + cuBLAS), float and
// __half: the same model-like stack as bench_mos.cpp (L = 32 layers of one
// projection type, d = 4096, one shard pool with v = 8, l = 2, p = 1, rank 16
// per layer) against 32 dense Lora layers of rank 16, forward and forward +
// backward for N in {1, 16, 256, 2048} on each ShardPath, then the ratio
// table, the parameter bytes and the direct / assembled crossover.
//
// Each timed pass is bracketed by cudaEvents on the context's stream and
// reported as manual time, so host-side launch overhead counts only where it
// leaves the GPU idle (as it would in a model). Without a GPU it prints
// "no CUDA device: skipping" and exits 0.
//
//   bench_mos_cuda            full run
//   bench_mos_cuda --quick    smoke run (also RANKWISE_BENCH_QUICK=1)
#include <benchmark/benchmark.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <rankwise/cuda.cuh>
#include <set>
#include <string>
#include <vector>

#include "support/mos_model.hpp"
#include "support/mos_report.hpp"
#include "support/mos_sizes.hpp"
#include "support/report.hpp"
#include "support/sizes.hpp"

namespace {

namespace rb = rankwise::bench;
namespace rm = rankwise::bench::mos;
using rankwise::CudaBackend;
using rankwise::CudaContext;
using rankwise::MatrixView;
using rankwise::ShardPath;
using rm::Mode;

template <class T>
struct TypeInfo;
template <>
struct TypeInfo<float> {
  static constexpr const char* kBackend = "cuda_f32";
  static constexpr const char* kName = "float";
};
template <>
struct TypeInfo<__half> {
  static constexpr const char* kBackend = "cuda_f16";
  static constexpr const char* kName = "__half";
};

// Start and stop events of every timed pass, created once.
struct Events {
  Events() {
    RANKWISE_CUDA_CHECK(cudaEventCreate(&start));
    RANKWISE_CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~Events() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  cudaEvent_t start = nullptr, stop = nullptr;
};
Events& events() {
  static Events e;
  return e;
}

// One projection type at width d for storage type T: the dense LoRA stack,
// the pool and the Mos stacks (one per path, same pool, same index lists).
template <class T>
using Model = rm::Model<T, CudaBackend>;

template <class T>
Model<T>& model(std::int64_t d) {
  static std::map<std::int64_t, std::unique_ptr<Model<T>>> models;
  auto& m = models[d];
  if (!m) m = std::make_unique<Model<T>>(d);
  return *m;
}

// x and dy ~ U(-1, 1); y and dx are zeroed before each timed pass (outside
// the events), so __half outputs never run to infinity over many passes.
template <class T>
struct Io {
  std::int64_t n = -1, d = -1;
  rankwise::Buffer<CudaBackend, T> x, dy, y, dx;
};
template <class T>
Io<T>& io(CudaContext& ctx, std::int64_t n, std::int64_t d) {
  using Kern = rankwise::Kernels<CudaBackend, T>;
  static Io<T> slot;
  if (slot.n != n || slot.d != d) {
    for (auto* b : {&slot.x, &slot.dy, &slot.y, &slot.dx}) b->resize(n * d);
    Kern::fill_uniform(ctx, slot.x.view(n, d), -1.0, 1.0, 11);
    Kern::fill_uniform(ctx, slot.dy.view(n, d), -1.0, 1.0, 12);
    Kern::fill(ctx, slot.y.view(n, d), 0.0);
    Kern::fill(ctx, slot.dx.view(n, d), 0.0);
    slot.n = n;
    slot.d = d;
  }
  return slot;
}

template <class T, class Layers>
void pass(Layers& layers, Mode mode, Io<T>& b) {
  const MatrixView<const T> x = b.x.view(b.n, b.d), dy = b.dy.view(b.n, b.d);
  if (mode != Mode::kBwd) {
    for (auto& l : layers) l->forward(x, b.y.view(b.n, b.d));
  }
  if (mode != Mode::kFwd) {
    for (auto it = layers.rbegin(); it != layers.rend(); ++it) {
      (*it)->backward(x, dy, b.dx.view(b.n, b.d));
    }
  }
}

// Times `body` (queued on ctx's stream) once per iteration with events; one
// untimed call first.
template <class T, class Body>
void timed(benchmark::State& state, CudaContext& ctx, Io<T>& b, Body&& body) {
  body();
  ctx.synchronize();
  Events& ev = events();
  for (auto _ : state) {
    RANKWISE_CUDA_CHECK(cudaMemsetAsync(b.y.data(), 0, sizeof(T) * b.y.size(), ctx.stream()));
    RANKWISE_CUDA_CHECK(cudaMemsetAsync(b.dx.data(), 0, sizeof(T) * b.dx.size(), ctx.stream()));
    RANKWISE_CUDA_CHECK(cudaEventRecord(ev.start, ctx.stream()));
    body();
    RANKWISE_CUDA_CHECK(cudaEventRecord(ev.stop, ctx.stream()));
    RANKWISE_CUDA_CHECK(cudaEventSynchronize(ev.stop));
    float ms = 0;
    RANKWISE_CUDA_CHECK(cudaEventElapsedTime(&ms, ev.start, ev.stop));
    state.SetIterationTime(static_cast<double>(ms) * 1e-3);
  }
  state.counters["layers"] = static_cast<double>(rm::kLayers);
}

template <class T>
void BM_Lora(benchmark::State& state, Mode mode, std::int64_t d, std::int64_t n) {
  Model<T>& m = model<T>(d);
  Io<T>& b = io<T>(m.ctx, n, d);
  timed(state, m.ctx, b, [&] { pass(m.lora, mode, b); });
}

template <class T>
void BM_Mos(benchmark::State& state, ShardPath path, Mode mode, std::int64_t d, std::int64_t n) {
  Model<T>& m = model<T>(d);
  auto& layers = m.mos(path);
  Io<T>& b = io<T>(m.ctx, n, d);
  timed(state, m.ctx, b, [&] {
    if (mode == Mode::kStep) m.pool.zero_grad();
    pass(layers, mode, b);
  });
}

template <class T>
void BM_ZeroGrad(benchmark::State& state, std::int64_t d) {
  Model<T>& m = model<T>(d);
  Io<T>& b = io<T>(m.ctx, 1, d);
  timed(state, m.ctx, b, [&] { m.pool.zero_grad(); });
}

template <class T>
void register_type(bool quick) {
  const std::string be = TypeInfo<T>::kBackend;
  const double min_time = quick ? 0.005 : 0.1;
  std::set<std::string> seen;  // the sweep repeats some of the main table's runs
  auto reg = [&](const std::string& name, auto fn, auto... args) {
    if (!seen.insert(name).second) return;
    benchmark::RegisterBenchmark(name.c_str(), fn, args...)
        ->MinTime(min_time)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
  };
  const std::int64_t d = rm::kDim;
  reg(rm::zero_grad_key(be, d), BM_ZeroGrad<T>, d);
  for (std::int64_t n : rm::token_counts(quick)) {
    for (Mode mode : {Mode::kFwd, Mode::kStep}) {
      reg(rm::key(be, "lora", mode, d, n), BM_Lora<T>, mode, d, n);
      for (ShardPath p : {ShardPath::kDirect, ShardPath::kAssembled, ShardPath::kAuto}) {
        reg(rm::key(be, rm::path_name(p), mode, d, n), BM_Mos<T>, p, mode, d, n);
      }
    }
  }
  for (std::int64_t sd : rm::sweep_dims(quick)) {
    for (std::int64_t n : rm::sweep_counts(quick)) {
      for (Mode mode : {Mode::kFwd, Mode::kBwd}) {
        for (ShardPath p : {ShardPath::kDirect, ShardPath::kAssembled}) {
          reg(rm::key(be, rm::path_name(p), mode, sd, n), BM_Mos<T>, p, mode, sd, n);
        }
        reg(rm::key(be, "lora", mode, sd, n), BM_Lora<T>, mode, sd, n);
      }
    }
  }
}

template <class T>
rb::Tally print_type(rm::Times& times, bool quick) {
  const std::string be = TypeInfo<T>::kBackend;
  const std::string title = std::string("GPU (CUDA, ") + TypeInfo<T>::kName + ")";
  rm::print_parameter_bytes(rm::kDim, sizeof(T), TypeInfo<T>::kName);
  const rm::PathOf auto_path = rm::auto_path<CudaBackend, T>;
  const rb::Tally tally = rm::print_stack_table(times, be, title, rm::kDim, quick, auto_path);
  for (std::int64_t d : rm::sweep_dims(quick)) {
    rm::print_crossover_table(times, be, title, d, quick, auto_path, {"lora"});
  }
  return tally;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  const auto console = rb::console_options(argc, argv);
  if (rankwise::cuda_device_count() == 0) {
    std::printf("no CUDA device: skipping\n");
    return 0;
  }
  register_type<float>(quick);
  register_type<__half>(quick);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  cudaDeviceProp prop{};
  RANKWISE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("rankwise GPU MoS benchmark%s: %s (sm_%d%d, %.0f GiB)\n", quick ? " (quick)" : "",
              prop.name, prop.major, prop.minor,
              static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  std::fflush(stdout);

  rb::RecordingReporter rec(console);
  benchmark::RunSpecifiedBenchmarks(&rec);
  std::fflush(stdout);

  rm::Times times(rec, /*cpu_time=*/false);  // the events' times (manual time)
  rb::Tally tally = print_type<float>(times, quick);
  const rb::Tally half = print_type<__half>(times, quick);
  tally.pass += half.pass;
  tally.miss += half.miss;
  rb::print_summary(rec, tally);
  benchmark::Shutdown();
  return 0;
}
