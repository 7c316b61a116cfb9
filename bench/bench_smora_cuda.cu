// GPU benchmark of SMoRA (rankwise::Smora<T, CudaBackend>, T = float and
// __half, r = 64, k = 8, g in {1, 8}) next to LoRA at rank 64 and rank 8: the
// same sizes, names and tables as bench_smora.cpp (bench/smora/), with
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

#include <cstdint>
#include <cstdio>
#include <rankwise/cuda.cuh>
#include <string>

#include "smora/suite.hpp"
#include "smora/tables.hpp"
#include "support/cuda_backend.cuh"
#include "support/main.hpp"

namespace {

namespace rb = rankwise::bench;
namespace sm = rankwise::bench::smora;
using rankwise::CudaBackend;
using rankwise::CudaContext;
using GpuBench = rb::BenchBackend<CudaBackend>;

template <class T>
sm::ReportOptions options(const std::string& backend, const char* title, bool quick,
                          std::size_t l2) {
  sm::ReportOptions o;
  o.backend = backend;
  o.title = title;
  o.quick = quick;
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
  const bool crossover = rb::take_flag(&argc, argv, "--crossover", "RANKWISE_BENCH_CROSSOVER");
  if (rankwise::cuda_device_count() == 0) {
    std::printf("no CUDA device: skipping\n");
    return 0;
  }
  const std::size_t l2 = GpuBench::cache_bytes();
  CudaContext ctx;
  sm::Suite<CudaBackend, float> f32(ctx, "cuda_f32", l2, quick);
  sm::Suite<CudaBackend, __half> f16(ctx, "cuda_f16", l2, quick);

  auto register_all = [&] {
    if (crossover) {
      f32.register_crossover();
      f16.register_crossover();
    } else {
      f32.register_table();
      f16.register_table();
    }
  };
  auto header = [&] {
    std::printf("rankwise GPU SMoRA benchmark%s%s\n%s\n", crossover ? " (crossover)" : "",
                quick ? " (quick)" : "", GpuBench::describe().c_str());
    if (!crossover) {
      std::printf(
          "uncached runs rotate over identical layers (float): SMoRA g=1 %lld, g=8 %lld, "
          "LoRA r=64 %lld, r=8 %lld; check_finite off\n",
          static_cast<long long>(f32.copies(sm::Model{true, 64, 1, {}}, true)),
          static_cast<long long>(f32.copies(sm::Model{true, 64, 8, {}}, true)),
          static_cast<long long>(f32.copies(sm::Model{false, 64, 1, {}}, true)),
          static_cast<long long>(f32.copies(sm::Model{false, 8, 1, {}}, true)));
    }
    std::printf("\n");
  };
  auto tables = [&](rb::RecordingReporter& rec) {
    // The CUDA-event time, reported as manual ("real") time.
    const sm::ReportOptions o32 = options<float>("cuda_f32", "GPU (CUDA, float)", quick, l2);
    const sm::ReportOptions o16 = options<__half>("cuda_f16", "GPU (CUDA, half)", quick, l2);
    if (crossover) {
      sm::print_crossover(rec, o32);
      sm::print_crossover(rec, o16);
      for (const std::string& e : rec.errors()) std::printf("benchmark error: %s\n", e.c_str());
      std::printf("\ncrossover done (informational: exits 0)\n");
      return;
    }
    sm::SmoraTally tally = sm::print_layer_table(rec, o32);
    tally += sm::print_layer_table(rec, o16);
    std::printf(
        "\n(the targets are stated for the CPU; on the GPU they are shown for comparison)\n");
    sm::print_smora_summary(rec, tally);
  };
  return rb::benchmark_main(argc, argv, quick, false, register_all, header, tables);
}
