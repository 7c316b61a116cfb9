// CPU benchmark of many LoRA adapters in one batch (rankwise::UnitPool<float,
// CpuBackend>) next to what an engine does without it, measured in the same run:
//
//   multi_pool     UnitPool::forward: 64 adapters (ranks from {8, 16, 32, 64},
//                  fixed seed) in one pool, d = 4096, each token to its own
//                  adapter, with a plan made before the timed loop
//   multi_plan     UnitPool::plan alone
//   multi_loop     the per-adapter loop: gather each adapter's rows, its own
//                  Lora::forward, scatter the rows back
//   multi_blas     the same loop with two cblas_sgemm per adapter (OpenBLAS)
//   multi_padded   a second pool of the adapters padded to rank 64 (zero units)
//   multi_direct   T = 1: Lora::forward on the whole batch
//   mixed_*        half plain-LoRA, half SMoRA tokens: one plan vs the halves
//                  served separately
//   read           8 MiB slabs read from memory: the floor's read rate
//
// at N in {1, 16, 64, 256, 2048} tokens over T in {1, 4, 16, min(N, 64)}
// distinct adapters, assigned at random. Each call takes the next batch of a
// rotation whose batches partition the 64 adapters, and for N <= 64 the next
// copy of every layer (copies totalling >= 3x the last-level cache), so the
// units come from DRAM as in a model of many layers; every variant rotates
// alike. Then the ratio tables, with PASS/MISS against the targets
// (support/multi_report.hpp); informational: exits 0 whatever the verdicts.
//
// --quick (or RANKWISE_BENCH_QUICK=1): N in {1, 16}, one copy, short minimum
// times: a smoke run. --threads=N (or RANKWISE_BENCH_THREADS): rankwise's
// CpuContext and OpenBLAS on N threads (default 1; the ratios then use wall
// time instead of CPU time). Full runs: 3 repetitions, randomly interleaved,
// medians (override with the usual --benchmark_* flags).
// RANKWISE_BENCH_LLC_BYTES overrides the detected last-level cache size.
//
// Flags: the build type's (Release: -O3) and, when rankwise is the top-level
// project, -march=native; the pool and its baselines share the binary and the flags.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <functional>
#include <rankwise/rankwise.hpp>
#include <string>
#include <thread>
#include <vector>

#include "support/cpu_matrix.hpp"
#include "support/multi_bench.hpp"
#include "support/multi_report.hpp"
#include "support/multi_sizes.hpp"
#include "support/openblas_baseline.hpp"
#include "support/report.hpp"
#include "support/thread_report.hpp"

namespace {

namespace rb = rankwise::bench;
namespace mt = rankwise::bench::multi;
using rankwise::CpuBackend;
using rankwise::CpuContext;
using rankwise::MatrixView;
using T = float;

/// The CPU's side of the suite: Google Benchmark times the loop (CPU and
/// wall time); the engine's gather and scatter are row copies and adds,
/// split over the context's threads.
struct CpuOps {
  static constexpr bool kManualTime = false;
  static constexpr bool kCheckFinite = true;  // free on the CPU: no synchronisation

  template <class Call>
  static void run(benchmark::State& state, CpuContext&, std::int64_t cycle, Call call) {
    rb::wait_for_openblas_idle();
    while (state.KeepRunningBatch(cycle)) {
      for (std::int64_t i = 0; i < cycle; ++i) call(i);
      benchmark::ClobberMemory();
    }
  }
  template <class Call>
  static void run_host(benchmark::State& state, CpuContext& ctx, std::int64_t cycle, Call call) {
    run(state, ctx, cycle, call);
  }

  template <class F>
  static void split_rows(CpuContext& ctx, std::int64_t rows, F f) {
    const std::int64_t tasks = std::min<std::int64_t>(ctx.num_threads(), rows);
    ctx.parallel_for(tasks, [&](std::int64_t task) {
      for (std::int64_t j = rows * task / tasks; j < rows * (task + 1) / tasks; ++j) f(j);
    });
  }
  static void gather_rows(CpuContext& ctx, MatrixView<const T> x, const mt::RowList& rows,
                          MatrixView<T> xs) {
    const std::size_t bytes = sizeof(T) * static_cast<std::size_t>(x.cols);
    split_rows(ctx, rows.count, [&](std::int64_t j) {
      std::memcpy(xs.data + j * xs.ld, x.data + std::int64_t(rows.host[j]) * x.ld, bytes);
    });
  }
  static void scatter_add_rows(CpuContext& ctx, MatrixView<const T> ys, const mt::RowList& rows,
                               MatrixView<T> y) {
    using Row = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
    using ConstRow = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
    split_rows(ctx, rows.count, [&](std::int64_t j) {
      Row(y.data + std::int64_t(rows.host[j]) * y.ld, y.cols) +=
          ConstRow(ys.data + j * ys.ld, y.cols);
    });
  }
  // A vectorised sum (as bench_lora's read bound), split over the threads.
  static void read(CpuContext& ctx, const T* data, std::int64_t count) {
    using Flat = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
    const int threads = ctx.num_threads();
    T sums[64] = {};
    const std::int64_t tasks = std::min(threads, 64);
    ctx.parallel_for(tasks, [&](std::int64_t task) {
      const std::int64_t begin = count * task / tasks;
      sums[task] = Flat(data + begin, count * (task + 1) / tasks - begin).sum();
    });
    benchmark::DoNotOptimize(sums);
  }
};

using Suite = mt::Suite<CpuBackend, CpuOps>;

// The last-level cache the rotation must defeat: RANKWISE_BENCH_LLC_BYTES, else
// the kernel's view of cpu0's highest data cache (sysfs: on some AMD parts
// under a hypervisor CPUID reports the package's L3, not this core's slice),
// else Google Benchmark's largest cache, else 32 MiB.
std::size_t last_level_cache(std::string* source) {
  if (const char* v = std::getenv("RANKWISE_BENCH_LLC_BYTES")) {
    if (v[0] != '\0') {
      *source = "RANKWISE_BENCH_LLC_BYTES";
      return static_cast<std::size_t>(std::strtoull(v, nullptr, 10));
    }
  }
  std::size_t best = 0;
  int best_level = 0;
  for (int index = 0; index < 8; ++index) {
    const std::string dir =
        "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size"), type_file(dir + "type");
    if (!level_file || !size_file) break;
    int level = 0;
    std::string size, type;
    level_file >> level;
    size_file >> size;
    type_file >> type;
    if (type == "Instruction" || level < best_level || size.empty()) continue;
    std::size_t bytes = std::strtoull(size.c_str(), nullptr, 10);
    if (size.back() == 'K') bytes <<= 10;
    if (size.back() == 'M') bytes <<= 20;
    best_level = level;
    best = bytes;
  }
  if (best > 0) {
    *source = "sysfs L" + std::to_string(best_level);
    return best;
  }
  for (const auto& c : benchmark::CPUInfo::Get().caches) {
    if (c.size > 0 && static_cast<std::size_t>(c.size) > best)
      best = static_cast<std::size_t>(c.size);
  }
  *source = best > 0 ? "Google Benchmark CPUInfo" : "default (nothing detected)";
  return best > 0 ? best : std::size_t(32) << 20;
}

#if RANKWISE_BENCH_OPENBLAS
// The per-adapter loop with the two sgemm of each adapter's LoRA (on its own
// layer's memory) in place of Lora::forward.
void time_blas(benchmark::State& state, Suite& suite, int threads, const std::string& name,
               std::int64_t n, std::int64_t t) {
  Suite::Case& cs = suite.case_of(n, t);
  std::vector<T> h(static_cast<std::size_t>(n * mt::kPaddedRank));  // H = X A^T, per adapter
  auto forward = [&](Suite::LoraLayer& l, MatrixView<const T> xs, MatrixView<T> ys) {
    rb::blas_lora_forward(rb::blas_lora(l), static_cast<int>(xs.rows), xs.data, h.data(), ys.data);
  };
  rb::use_openblas_threads(threads);
  suite.time_rotation(state, name, cs.batch_count(), cs.copies, false,
                      [&](std::int64_t batch, std::int64_t copy) {
                        suite.per_adapter_loop(cs, batch, copy, forward);
                      });
  rb::openblas_done(threads);
  state.counters["units"] = mt::mean_units(t);
}

void register_blas(Suite& suite, int threads, std::int64_t n, std::int64_t t) {
  const std::string name = mt::case_key(suite.backend(), "blas", n, t);
  auto* b = benchmark::RegisterBenchmark(
      name.c_str(), [&suite, threads, name, n, t](benchmark::State& state) {
        Suite::guarded(state, [&] { time_blas(state, suite, threads, name, n, t); });
      });
  suite.configure(b, n);
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  const int threads = mt::take_threads_flag(&argc, argv);
  rb::RecordingReporter rec(argc, argv);  // before anything prints: it may move the text to stderr
  std::vector<char*> args;
  const auto arg_storage = rb::with_default_flags(argc, argv, quick, &args);
  int nargs = static_cast<int>(args.size()) - 1;
  benchmark::Initialize(&nargs, args.data());
  if (benchmark::ReportUnrecognizedArguments(nargs, args.data())) return 1;

  std::string llc_source;
  const std::size_t llc = last_level_cache(&llc_source);
  CpuContext ctx(threads);
  Suite suite(ctx, rb::thread_prefix("cpu_f32", threads), llc, quick);
  std::function<void(std::int64_t, std::int64_t)> also;
#if RANKWISE_BENCH_OPENBLAS
  also = [&](std::int64_t n, std::int64_t t) { register_blas(suite, threads, n, t); };
#endif
  suite.register_all(also);

  std::printf(
      "rankwise CPU multi-adapter (UnitPool) benchmark%s: Eigen %d.%d.%d, SIMD: %s, threads: %d "
      "(rankwise CpuContext, OpenBLAS; --threads=N), hardware threads: %u\n",
      quick ? " (quick)" : "", EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION,
      rb::eigen_simd().c_str(), threads, std::thread::hardware_concurrency());
  std::printf("%s\n", rb::openblas_note().c_str());
  std::printf(
      "last-level cache: %zu KiB (%s); one pool's units %.1f MiB, padded pool %.1f MiB; "
      "batches with N <= %lld rotate over %lld cop%s of every layer\n",
      llc >> 10, llc_source.c_str(), Suite::pool_bytes() / 1048576.0,
      Suite::padded_bytes() / 1048576.0, static_cast<long long>(mt::kRotateMaxTokens),
      static_cast<long long>(suite.copies()), suite.copies() == 1 ? "y" : "ies");
  Suite::Agreement agree;
  try {
    agree = suite.agreement();  // builds every layer
  } catch (const std::exception& e) {
    std::printf("benchmark error: building the layers failed: %s\n", e.what());
    return 1;
  }
  mt::print_agreement(agree);

  benchmark::RunSpecifiedBenchmarks(&rec);
  std::fflush(stdout);

  mt::ReportOptions opt;
  opt.backend = suite.backend();
  opt.title =
      "CPU (Eigen, float), " + std::to_string(threads) + (threads == 1 ? " thread" : " threads");
  opt.quick = quick;
  opt.cpu_time = threads == 1;  // one thread: its CPU time, which a busy machine inflates less
  opt.blas = rb::kOpenBlas;
  opt.copies = suite.copies();
  rb::Tally tally = mt::print_multi_tables(rec, opt);
  mt::report_disagreement(agree);
  if (threads == 1) {
    const auto busy = rec.preempted(0.9, suite.backend() + "/");
    if (!busy.empty()) {
      std::printf(
          "\nnote: %zu benchmark(s) got under 90%% of a core (machine busy), e.g. %s: "
          "the ratios use CPU time, which this inflates less than wall time\n",
          busy.size(), busy.front().c_str());
    }
  }
  rb::print_summary(rec, tally);
  benchmark::Shutdown();
  return 0;
}
