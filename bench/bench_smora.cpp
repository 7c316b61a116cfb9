// CPU benchmark of SMoRA (rankwise::Smora<float, CpuBackend>, r = 64, k = 8,
// g in {1, 8}) next to the dense LoRA it replaces (rank 64), the LoRA of its
// active rank (rank 8) and the dense rank-64 LoRA a user without rankwise
// writes (OpenBLAS), measured in the same run:
//
//   smora_fwd / smora_bwd   Smora::forward (inference: router + rank units)
//                           and Smora::backward (after a training forward),
//                           with the rank-unit path forced to kSparse, kDense,
//                           and left to kAuto (the layer as shipped)
//   lora_fwd / lora_bwd     Lora::forward / Lora::backward at rank 64 and 8
//   blas_fwd / blas_bwd     rank 64 as the 2 / 5 cblas_sgemm calls, on the
//                           rank-64 LoRA layers' memory (support/openblas_baseline.hpp)
//
// each at N in {1, 4, 16, 256, 2048} tokens, d = 4096, twice:
//   cached     one layer, called again and again: its weights stay in cache
//   uncached   a rotation of identical layers whose weights together are 3x
//              the last-level cache; each call uses the next one, so its
//              weights come from DRAM (the baselines rotate alike)
// at 1 thread (all of the above), and at 2 threads (CpuContext(2) and
// openblas_set_num_threads(2): LoRA r = 64, SMoRA kAuto and OpenBLAS only),
// then prints the ratio tables with PASS/MISS against the targets.
//
// --crossover (or RANKWISE_BENCH_CROSSOVER=1) instead measures the crossover
// of the two rank-unit paths, rank_units_forward / rank_units_backward with
// kSparse and kDense alone (no router, cached weights, 1 thread), over
// N in {1, ..., 2048}, k/r in {8/64, 16/64, 4/64, 8/16, 32/64, 16/16, 64/64}
// (k = r: how LoRA-LEGO and MoS use the rank units), d in {4096, 1024}, and
// fits the rule "dense iff n >= N0 and r <= c k" for prefer_dense (a few
// minutes). The instruction set matters: the GEMM gains more from AVX2/FMA
// than the gathers do, which moves the crossover.
//
// --quick (or RANKWISE_BENCH_QUICK=1): N in {1, 16} (crossover: d = 1024,
// k/r = 8/64, N in {1, 64}) and short minimum times, for smoke tests.
// Everything else goes to Google Benchmark (--benchmark_filter=...,
// --benchmark_format=json: the JSON alone on stdout, the tables on stderr).
// RANKWISE_BENCH_LLC_BYTES overrides the detected last-level cache size.
//
// Ratios at 1 thread use CPU time (of the benchmark thread: there it is the
// wall time of an idle machine, and a busy shared machine inflates it less);
// at 2 threads wall-clock time, since CPU time counts one thread. Flags: the
// build type's (Release: -O3) and, when rankwise is the top-level project,
// -march=native (off with -DRANKWISE_NATIVE=OFF); the layers and their Eigen
// baselines share the binary and the flags. Informational: exits 0 whatever
// the verdicts.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <rankwise/rankwise.hpp>
#include <string>

#include "smora/suite.hpp"
#include "smora/tables.hpp"
#include "support/cpu_backend.hpp"
#include "support/main.hpp"
#include "support/openblas_baseline.hpp"

namespace {

namespace rb = rankwise::bench;
namespace sm = rankwise::bench::smora;
using rankwise::CpuBackend;
using rankwise::CpuContext;
using CpuBench = rb::BenchBackend<CpuBackend>;
using CpuSuite = sm::Suite<CpuBackend, float>;

/// The second thread count of the table (LoRA r = 64, SMoRA kAuto, OpenBLAS).
constexpr int kManyThreads = 2;

/// Result-name prefix of the runs at `threads` threads, e.g. "cpu_f32/t:2".
std::string thread_prefix(int threads) { return "cpu_f32/t:" + std::to_string(threads); }

#if RANKWISE_BENCH_OPENBLAS
// The dense rank-64 LoRA as cblas_sgemm calls on `threads` threads, on the
// memory of the suite's rank-64 LoRA layers, registered right after them.
void register_blas(CpuSuite& suite, int threads, std::int64_t n, bool uncached) {
  for (bool backward : {false, true}) {
    auto* b = benchmark::RegisterBenchmark(
        sm::blas_key(suite.backend(), backward, sm::kRank, n, uncached).c_str(),
        [&suite, threads, backward, n, uncached](benchmark::State& state) {
          rb::guarded(state, [&] {
            const auto& layers = suite.lora_layers(sm::kRank, uncached);
            auto& io = suite.activations(n);
            rb::time_blas_lora(state, layers, threads, backward, n, io.x.data(), io.dy.data(),
                               io.y.data(), io.dx.data());
            state.counters["copies"] = static_cast<double>(layers.size());
          });
        });
    CpuSuite::configure(b, n, suite.table_min_time());
  }
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  const bool crossover = rb::take_flag(&argc, argv, "--crossover", "RANKWISE_BENCH_CROSSOVER");
  const std::size_t llc = CpuBench::cache_bytes();
  // One suite per thread count: layers keep the context they were built with.
  CpuContext ctx(1), ctx_many(kManyThreads);
  CpuSuite suite(ctx, thread_prefix(1), llc, quick);
  CpuSuite suite_many(ctx_many, thread_prefix(kManyThreads), llc, quick);

  auto register_all = [&] {
    if (crossover) {
      suite.register_crossover();
      return;
    }
    std::function<void(std::int64_t, bool)> blas_1, blas_many;
#if RANKWISE_BENCH_OPENBLAS
    blas_1 = [&](std::int64_t n, bool uncached) { register_blas(suite, 1, n, uncached); };
    blas_many = [&](std::int64_t n, bool uncached) {
      register_blas(suite_many, kManyThreads, n, uncached);
    };
#endif
    suite.register_table(sm::table_models(), blas_1);
    suite_many.register_table(sm::shipped_models(), blas_many);
  };

  auto header = [&] {
    const std::string threads = crossover ? "1" : "1 and " + std::to_string(kManyThreads);
    std::printf("rankwise CPU SMoRA benchmark%s%s, threads: %s (rankwise CpuContext, OpenBLAS)\n",
                crossover ? " (crossover)" : "", quick ? " (quick)" : "", threads.c_str());
    std::printf("%s\n", CpuBench::describe().c_str());
    if (!crossover) {
      std::printf(
          "uncached runs rotate over identical layers until the weights one forward at "
          "N = 1 touches, summed over the rotation, are >= %zux that: SMoRA g=1 %lld "
          "layers, g=8 %lld, LoRA r=64 %lld, r=8 %lld\n",
          rb::kRotationCacheMultiple,
          static_cast<long long>(suite.copies(sm::Model{true, 64, 1, {}}, true)),
          static_cast<long long>(suite.copies(sm::Model{true, 64, 8, {}}, true)),
          static_cast<long long>(suite.copies(sm::Model{false, 64, 1, {}}, true)),
          static_cast<long long>(suite.copies(sm::Model{false, 8, 1, {}}, true)));
    }
    std::printf("\n");
  };

  auto tables = [&](rb::RecordingReporter& rec) {
    sm::ReportOptions opt;
    opt.backend = suite.backend();
    opt.title = "CPU (Eigen, float), 1 thread";
    opt.quick = quick;
    opt.blas = rb::kOpenBlas;
    opt.prefer_dense = [](std::int64_t n, std::int64_t k, std::int64_t r) {
      return rankwise::TuningPolicy<CpuBackend>::prefer_dense(n, k, r);
    };
    char note[256];
    std::snprintf(note, sizeof note,
                  "cached: one layer called repeatedly, its weights stay in cache (%zu KiB LLC)",
                  llc >> 10);
    opt.cached_note = note;
    std::snprintf(note, sizeof note,
                  "uncached: each call uses the next of many identical layers; what they read "
                  "totals >= %zux the %zu KiB LLC, so weights come from DRAM",
                  rb::kRotationCacheMultiple, llc >> 10);
    opt.uncached_note = note;

    // 1 thread: CPU time (of the benchmark thread; a busy shared machine
    // inflates it less than wall time); more threads: wall time.
    rec.use_cpu_time(true);
    if (crossover) {
      sm::print_crossover(rec, opt);
      for (const std::string& e : rec.errors()) std::printf("benchmark error: %s\n", e.c_str());
      std::printf("\ncrossover done (informational: exits 0)\n");
      return;
    }
    sm::SmoraTally tally = sm::print_layer_table(rec, opt);
    rec.use_cpu_time(false);
    sm::ReportOptions opt_many = opt;
    opt_many.backend = suite_many.backend();
    opt_many.title = "CPU (Eigen, float), " + std::to_string(kManyThreads) + " threads, wall-clock";
    tally += sm::print_layer_table(rec, opt_many);
    if (!rb::kOpenBlas) std::printf("\n%s\n", rb::openblas_note().c_str());
    const auto busy = rec.preempted(0.9, suite.backend() + "/");
    if (!busy.empty()) {
      std::printf(
          "\nnote: %zu single-threaded benchmark(s) got under 90%% of a core (machine "
          "busy), e.g. %s: their ratios use CPU time, which this inflates less than wall "
          "time\n",
          busy.size(), busy.front().c_str());
    }
    sm::print_smora_summary(rec, tally);
  };
  return rb::benchmark_main(argc, argv, quick, false, register_all, header, tables);
}
