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
// (multi/tables.hpp); informational: exits 0 whatever the verdicts. The
// bodies are multi/suite.hpp, shared with bench_multi_cuda.cu; this file adds
// the CPU's row gather/scatter, the OpenBLAS loop and the thread count.
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
#include <functional>
#include <rankwise/rankwise.hpp>
#include <string>
#include <vector>

#include "multi/sizes.hpp"
#include "multi/suite.hpp"
#include "multi/tables.hpp"
#include "support/cpu_backend.hpp"
#include "support/main.hpp"
#include "support/openblas_baseline.hpp"
#include "support/table.hpp"

namespace {

namespace rb = rankwise::bench;
namespace mt = rankwise::bench::multi;
using rankwise::CpuBackend;
using rankwise::CpuContext;
using rankwise::MatrixView;
using T = float;

/// The engine's row gather and scatter on the CPU: row copies and adds,
/// split over the context's threads.
struct CpuRowOps {
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
};

using Suite = mt::Suite<CpuBackend, CpuRowOps>;

/// `--threads=N` (removed from argv) or RANKWISE_BENCH_THREADS; 1 when neither.
int take_threads_flag(int* argc, char** argv) {
  int threads = 0;
  if (const char* env = std::getenv("RANKWISE_BENCH_THREADS")) threads = std::atoi(env);
  const std::string prefix = "--threads=";
  int out = 1;
  for (int i = 1; i < *argc; ++i) {
    if (std::string(argv[i]).rfind(prefix, 0) == 0) {
      threads = std::atoi(argv[i] + prefix.size());
    } else {
      argv[out++] = argv[i];
    }
  }
  *argc = out;
  argv[out] = nullptr;
  return threads > 0 ? threads : 1;
}

/// The result-name prefix of a run on `threads` threads, "cpu_f32/t:1" (as
/// bench_lora's and bench_smora's CPU runs name theirs).
std::string cpu_prefix(int threads) { return "cpu_f32/t:" + std::to_string(threads); }

#if RANKWISE_BENCH_OPENBLAS
// The per-adapter loop with the two sgemm of each adapter's LoRA (on its own
// layer's memory) in place of Lora::forward, next to the case's other variants.
void register_blas(Suite& suite, int threads, std::int64_t n, std::int64_t t) {
  const std::string name = mt::case_key(suite.backend(), "blas", n, t);
  suite.reg(name, n, [&suite, threads, name, n, t](benchmark::State& state) {
    Suite::Case& cs = suite.case_of(n, t);
    std::vector<T> h(static_cast<std::size_t>(n * mt::kPaddedRank));  // H = X Aᵀ, per adapter
    auto forward = [&](Suite::LoraLayer& l, MatrixView<const T> xs, MatrixView<T> ys) {
      rb::blas_lora_forward(rb::blas_lora(l), static_cast<int>(xs.rows), xs.data, h.data(),
                            ys.data);
    };
    rb::use_openblas_threads(threads);
    suite.time_rotation(state, name, cs.batch_count(), cs.copies, false,
                        [&](std::int64_t batch, std::int64_t copy) {
                          suite.per_adapter_loop(cs, batch, copy, forward);
                        });
    rb::openblas_done(threads);
    state.counters["units"] = mt::mean_units(t);
  });
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  const int threads = take_threads_flag(&argc, argv);
  CpuContext ctx(threads);
  Suite suite(ctx, cpu_prefix(threads), quick);

  auto register_all = [&] {
    std::function<void(std::int64_t, std::int64_t)> also;
#if RANKWISE_BENCH_OPENBLAS
    also = [&](std::int64_t n, std::int64_t t) { register_blas(suite, threads, n, t); };
#endif
    suite.register_all(also);
  };

  Suite::Agreement agree;
  bool built = false;
  auto header = [&] {
    std::printf(
        "rankwise CPU multi-adapter (UnitPool) benchmark%s: %s; threads: %d (rankwise "
        "CpuContext, OpenBLAS; --threads=N)\n",
        quick ? " (quick)" : "", rb::BenchBackend<CpuBackend>::describe().c_str(), threads);
    std::printf(
        "one pool's units %.1f MiB, padded pool %.1f MiB; batches with N <= %lld rotate over "
        "%lld cop%s of every layer\n",
        Suite::pool_bytes() / 1048576.0, Suite::padded_bytes() / 1048576.0,
        static_cast<long long>(mt::kRotateMaxTokens), static_cast<long long>(suite.copies()),
        suite.copies() == 1 ? "y" : "ies");
    try {
      agree = suite.agreement();  // builds every layer
      built = true;
      mt::print_agreement(agree);
    } catch (const std::exception& e) {
      // Every benchmark then fails alike (model() throws again) and is listed.
      std::printf("benchmark error: building the layers failed: %s\n", e.what());
    }
  };

  auto tables = [&](rb::RecordingReporter& rec) {
    mt::ReportOptions opt;
    opt.backend = suite.backend();
    opt.title =
        "CPU (Eigen, float), " + std::to_string(threads) + (threads == 1 ? " thread" : " threads");
    opt.quick = quick;
    opt.cpu_time = threads == 1;  // one thread: its CPU time, which a busy machine inflates less
    opt.blas = rb::kOpenBlas;
    opt.copies = suite.copies();
    const rb::Tally tally = mt::print_multi_tables(rec, opt);
    if (built) mt::report_disagreement(agree);
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
    return tally;
  };

  return rb::benchmark_main(argc, argv, quick, /*defaults=*/true, register_all, header, tables);
}
