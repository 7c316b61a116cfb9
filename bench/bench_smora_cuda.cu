// GPU benchmark of SMoRA (rankwise::Smora<T, CudaBackend>, T = float and
// __half, r = 64, k = 8, g in {1, 8}) next to LoRA at rank 64 and rank 8: the
// same sizes, names and tables as bench_smora.cpp (support/smora_*.hpp), with
// each call timed by CUDA events on the layer's stream (UseManualTime).
//
//   cached     one layer, called again and again: its weights stay in L2
//   uncached   a rotation of identical layers whose touched weights total
//              3x the L2 (cudaDevAttrL2CacheSize): weights come from HBM
//
// --crossover (or RANKWISE_BENCH_CROSSOVER=1): rank_units_forward/backward,
// kSparse vs kDense, over the crossover grid, and the fitted prefer_dense rule.
// --quick (or RANKWISE_BENCH_QUICK=1): a smoke run.
//
// SmoraConfig::check_finite is off here: on the GPU it reads a flag back
// (a stream synchronisation per forward), which engines that trust their
// inputs turn off. Without a CUDA device this prints "no CUDA device:
// skipping" and exits 0. Informational: exits 0 whatever the verdicts.
#include <benchmark/benchmark.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include <rankwise/cuda.cuh>

#include "support/report.hpp"
#include "support/smora_bench.hpp"
#include "support/smora_report.hpp"
#include "support/smora_sizes.hpp"

namespace {

namespace rb = rankwise::bench;
namespace sm = rankwise::bench::smora;
using rankwise::CudaBackend;
using rankwise::CudaContext;

/// Times each call with a pair of CUDA events around it on the context's
/// stream; preparation (first use of a layer) happens outside them.
struct CudaTimer {
  static constexpr bool kManualTime = true;
  static constexpr bool kCheckFinite = false;

  template <class Need, class Prep, class Call>
  static void run(benchmark::State& state, CudaContext& ctx, std::int64_t copies, Need need,
                  Prep prep, Call call) {
    cudaEvent_t start = nullptr, stop = nullptr;
    RANKWISE_CUDA_CHECK(cudaEventCreate(&start));
    RANKWISE_CUDA_CHECK(cudaEventCreate(&stop));
    std::int64_t i = 0;
    for (auto _ : state) {
      if (need(i)) {
        prep(i);
        ctx.synchronize();
      }
      RANKWISE_CUDA_CHECK(cudaEventRecord(start, ctx.stream()));
      call(i);
      RANKWISE_CUDA_CHECK(cudaEventRecord(stop, ctx.stream()));
      RANKWISE_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.0f;
      RANKWISE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      state.SetIterationTime(static_cast<double>(ms) * 1e-3);
      if (++i == copies) i = 0;
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }

  static void upload_units(CudaContext& ctx, const std::int32_t* host, std::int64_t n,
                           std::int64_t k, rankwise::Buffer<CudaBackend, std::int32_t>& dst) {
    RANKWISE_CUDA_CHECK(cudaMemcpyAsync(dst.data(), host,
                                        sizeof(std::int32_t) * static_cast<std::size_t>(n * k),
                                        cudaMemcpyHostToDevice, ctx.stream()));
    ctx.synchronize();
  }
};

template <class T>
sm::ReportOptions options(const std::string& backend, const char* title, bool quick,
                          std::size_t l2) {
  sm::ReportOptions o;
  o.backend = backend;
  o.title = title;
  o.quick = quick;
  o.clock = sm::Clock::kReal;  // the CUDA-event time
  o.element_bytes = sizeof(T);
  o.prefer_dense = [](std::int64_t n, std::int64_t k, std::int64_t r) {
    return rankwise::TuningPolicy<CudaBackend>::prefer_dense(n, k, r);
  };
  char note[256];
  std::snprintf(note, sizeof note,
                "cached: one layer called repeatedly, its weights stay in L2 (%zu KiB)", l2 >> 10);
  o.cached_note = note;
  std::snprintf(note, sizeof note,
                "uncached: each call uses the next of many identical layers; what they read "
                "totals >= %zux the %zu KiB L2, so weights come from HBM",
                rb::kRotationCacheMultiple, l2 >> 10);
  o.uncached_note = note;
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  const bool crossover = sm::take_flag(&argc, argv, "--crossover", "RANKWISE_BENCH_CROSSOVER");
  if (rankwise::cuda_device_count() == 0) {
    std::printf("no CUDA device: skipping\n");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  int device = 0;
  RANKWISE_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  RANKWISE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  const std::size_t l2 = prop.l2CacheSize > 0 ? static_cast<std::size_t>(prop.l2CacheSize)
                                              : (std::size_t(50) << 20);

  CudaContext ctx;
  sm::Suite<CudaBackend, float, CudaTimer> f32(ctx, "cuda_f32", l2, quick);
  sm::Suite<CudaBackend, __half, CudaTimer> f16(ctx, "cuda_f16", l2, quick);
  if (crossover) {
    f32.register_crossover();
    f16.register_crossover();
  } else {
    f32.register_table();
    f16.register_table();
  }

  std::printf("rankwise GPU SMoRA benchmark%s%s: %s (sm_%d%d), L2 %zu KiB, %zu MiB memory\n",
              crossover ? " (crossover)" : "", quick ? " (quick)" : "", prop.name, prop.major,
              prop.minor, l2 >> 10, static_cast<std::size_t>(prop.totalGlobalMem >> 20));
  if (!crossover) {
    std::printf("uncached runs rotate over identical layers (float): SMoRA g=1 %lld, g=8 %lld, "
                "LoRA r=64 %lld, r=8 %lld; check_finite off\n",
                static_cast<long long>(f32.copies(sm::Model{true, 64, 1, {}}, true)),
                static_cast<long long>(f32.copies(sm::Model{true, 64, 8, {}}, true)),
                static_cast<long long>(f32.copies(sm::Model{false, 64, 1, {}}, true)),
                static_cast<long long>(f32.copies(sm::Model{false, 8, 1, {}}, true)));
  }
  std::printf("\n");
  std::fflush(stdout);

  rb::RecordingReporter rec(rb::console_options(argc, argv));
  benchmark::RunSpecifiedBenchmarks(&rec);
  std::fflush(stdout);

  const sm::ReportOptions o32 = options<float>("cuda_f32", "GPU (CUDA, float)", quick, l2);
  const sm::ReportOptions o16 = options<__half>("cuda_f16", "GPU (CUDA, half)", quick, l2);
  if (crossover) {
    sm::print_crossover(rec, o32);
    sm::print_crossover(rec, o16);
    for (const std::string& e : rec.errors()) std::printf("benchmark error: %s\n", e.c_str());
    std::printf("\ncrossover done (informational: exits 0)\n");
  } else {
    sm::SmoraTally tally = sm::print_layer_table(rec, o32);
    const sm::SmoraTally t16 = sm::print_layer_table(rec, o16);
    tally.cached.pass += t16.cached.pass;
    tally.cached.miss += t16.cached.miss;
    tally.uncached.pass += t16.uncached.pass;
    tally.uncached.miss += t16.uncached.miss;
    std::printf("\n(the targets are stated for the CPU; on the GPU they are shown for comparison)\n");
    sm::print_smora_summary(rec, tally);
  }
  benchmark::Shutdown();
  return 0;
}
