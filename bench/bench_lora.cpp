// CPU benchmark of the LoRA delta (rankwise::Lora<float, CpuBackend>) next to
// the baselines it should be judged against, measured in the same run. The
// bodies are bench/lora/suite.hpp's; here only what is the CPU's own:
//
//   gemm_*, base, naive   the raw products as plain Eigen expressions on the
//                         layers' memory (Platform::raw_gemm), one thread
//   blas_fwd, blas_bwd    the two (five) cblas_sgemm calls a C++ user writes,
//                         on the same layers' memory (support/openblas_baseline.hpp)
//   blas_sgemm            a 2048³ sgemm: OpenBLAS's own large-GEMM rate, for the floor
//
// The delta, OpenBLAS, read and blas_sgemm run at 1 and 2 threads (rankwise:
// CpuContext(t), whose pool the layers built with it use; OpenBLAS:
// openblas_set_num_threads(t)). For N <= 16 every variant rotates over copies
// of the layer (3x the last-level cache in all), so A and B come from DRAM;
// that is where the floor, max(bytes of A and B at the read rate, FLOPs at
// OpenBLAS's large-sgemm rate), is a target.
//
// After the run: the ratio table (bench/lora/tables.hpp, 1 thread), then per
// thread count the delta against OpenBLAS and the floor and the 1 -> 2 thread
// speed-up, on wall-clock time; the ratio table again on CPU time when the
// machine was busy enough to deschedule a single-threaded run. Informational:
// it exits 0 either way. By default 3 repetitions, randomly interleaved,
// medians in the tables.
//
// Flags: Google Benchmark's (--benchmark_format=json: the JSON alone on
// stdout, the tables on stderr), plus --quick (or RANKWISE_BENCH_QUICK=1):
// r = 8, N in {1, 16}, short minimum time. The delta and the Eigen baselines
// are compiled with the same flags into this one binary; OpenBLAS picks its
// kernels at run time.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <rankwise/rankwise.hpp>
#include <stdexcept>
#include <string>

#include "lora/suite.hpp"
#include "lora/tables.hpp"
#include "support/cpu_backend.hpp"
#include "support/cpu_matrix.hpp"
#include "support/main.hpp"
#include "support/openblas_baseline.hpp"

namespace rankwise {
namespace bench {
namespace lora {

const std::string kCpuKey = "cpu_f32";

template <>
struct Platform<CpuBackend> {
  static constexpr std::int64_t kRotateMaxTokens = kFloorMaxTokens;
  static constexpr std::int64_t kBatch = 1;
  static constexpr bool kWarmUpBaselines = false;  // a d x d product at N = 2048 takes seconds
  static constexpr bool kReadPerThread = true;

  static CpuContext& context(int threads) {  // the layers keep a pointer to theirs
    static std::map<int, std::unique_ptr<CpuContext>> contexts;
    auto& ctx = contexts[threads];
    if (!ctx) ctx = std::make_unique<CpuContext>(threads);
    return *ctx;
  }
  static const std::vector<int>& thread_counts() { return cpu_thread_counts(); }
  template <class T>
  static std::string prefix(int threads) {
    return thread_prefix(kCpuKey, threads);
  }
  // Cheap cases repeat until min_time; the d x d products at large N (a
  // second or more each on one core) stop after one iteration.
  static double min_time(bool quick) { return quick ? 0.01 : 0.2; }

  static void before_delta() {
#if defined(RANKWISE_USE_CBLAS)
    use_openblas_threads(1);  // rankwise's products on OpenBLAS: the context brings the threads
#endif
  }

  // The GEMM a C++ user writes with Eigen, c (+)= alpha op(a) op(b): not
  // Kernels<CpuBackend>::gemm, whose small-batch kernels (and OpenBLAS in
  // bench_lora_openblas) are what the delta itself runs.
  template <class T>
  static void raw_gemm(CpuContext&, float alpha, MatrixView<const T> a, Op op_a,
                       MatrixView<const T> b, Op op_b, float beta, MatrixView<T> c) {
    using Mat = RowMajorMatrix<T>;
    const Eigen::Map<const Mat> am(a.data, a.rows, a.cols), bm(b.data, b.rows, b.cols);
    Eigen::Map<Mat> cm(c.data, c.rows, c.cols);
    if (beta != 0.0f && beta != 1.0f) throw std::invalid_argument("raw_gemm: beta is 0 or 1");
    auto product = [&](const auto& lhs, const auto& rhs) {
      if (beta == 0.0f)
        cm.noalias() = static_cast<T>(alpha) * lhs * rhs;
      else
        cm.noalias() += static_cast<T>(alpha) * lhs * rhs;
    };
    if (op_a == Op::kNoTrans && op_b == Op::kNoTrans) product(am, bm);
    if (op_a == Op::kNoTrans && op_b == Op::kTrans) product(am, bm.transpose());
    if (op_a == Op::kTrans && op_b == Op::kNoTrans) product(am.transpose(), bm);
    if (op_a == Op::kTrans && op_b == Op::kTrans) product(am.transpose(), bm.transpose());
  }
};

namespace {

using Suite = Platform<CpuBackend>;

#if RANKWISE_BENCH_OPENBLAS
void bm_blas(benchmark::State& state, bool backward, int threads, std::int64_t rank,
             std::int64_t n) {
  const std::int64_t copies = copies_for<CpuBackend, float>(rank, n);
  const auto x = tokens_input<CpuBackend, float>(n);
  const auto dy = upstream_grad<CpuBackend, float>(n);
  Scratch<CpuBackend, float> out(n, kDim);  // y of the forward, dx of the backward
  time_blas_lora(state, layer_pool<CpuBackend, float>(threads, rank, copies), threads, backward, n,
                 x.data, dy.data, out.view.data, out.view.data);
  set_counters(state, delta_flops(backward, rank, n), backward ? 0 : 2 * factor_bytes<float>(rank),
               copies);
}

// C = A B, all kPeakGemmDim² (row-major): the large-sgemm rate of the floor.
void bm_blas_sgemm(benchmark::State& state, int threads) {
  const int dim = static_cast<int>(kPeakGemmDim);
  const auto a = random_matrix(dim, dim, 31, -1.0, 1.0), b = random_matrix(dim, dim, 32, -1.0, 1.0);
  RowMajorMatrix<float> c(dim, dim);
  use_openblas_threads(threads);
  BenchBackend<CpuBackend>::run(state, Suite::context(threads), Rotation{}, [&](std::int64_t) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, dim, dim, dim, 1.0f, a.data(), dim,
                b.data(), dim, 0.0f, c.data(), dim);
  });
  openblas_done(threads);
  set_counters(state, peak_gemm_flops(), 0, 1);
}
#endif

void register_all(bool quick) {
#if RANKWISE_BENCH_OPENBLAS
  for (int t : cpu_thread_counts()) {
    configure<CpuBackend>(benchmark::RegisterBenchmark(
                              key(thread_prefix(kCpuKey, t), "blas_sgemm", 0, kPeakGemmDim).c_str(),
                              [t](benchmark::State& s) { bm_blas_sgemm(s, t); }),
                          Suite::min_time(quick), kPeakGemmDim, true);
  }
#endif
  register_suite<CpuBackend, float>(
      quick, [quick](const char* what, int t, std::int64_t r, std::int64_t n) {
#if RANKWISE_BENCH_OPENBLAS
        const bool backward = std::string(what) == "delta_bwd";
        configure<CpuBackend>(
            benchmark::RegisterBenchmark(
                key(thread_prefix(kCpuKey, t), backward ? "blas_bwd" : "blas_fwd", r, n).c_str(),
                [=](benchmark::State& s) { bm_blas(s, backward, t, r, n); }),
            Suite::min_time(quick), n, true);
#else
        (void)what, (void)t, (void)r, (void)n, (void)quick;
#endif
      });
}

void print_header(bool quick) {
  std::string threads;
  for (int t : cpu_thread_counts()) threads += (threads.empty() ? "" : ", ") + std::to_string(t);
  std::printf(
      "rankwise CPU LoRA benchmark%s, threads: %s (rankwise CpuContext and OpenBLAS; the "
      "Eigen baselines 1)\n%s\n",
      quick ? " (quick)" : "", threads.c_str(), BenchBackend<CpuBackend>::describe().c_str());
#if defined(RANKWISE_USE_CBLAS)
  std::printf(
      "rankwise's large products: OpenBLAS (rankwise::openblas), small batches: "
      "rankwise's kernels\n");
#else
  std::printf("rankwise's large products: Eigen, small batches: rankwise's kernels\n");
#endif
  std::printf(
      "N <= %lld rows rotate over copies of A and B totalling %zux the last-level cache "
      "(%zu KiB), so every call reads them from DRAM; the delta, its baselines and the "
      "read bound (a vectorised sum over A and B) all rotate alike.\n\n",
      static_cast<long long>(kFloorMaxTokens), kRotationCacheMultiple,
      BenchBackend<CpuBackend>::cache_bytes() >> 10);
}

void print_tables(RecordingReporter& rec, bool quick) {
  const std::string title = "CPU (Eigen, float), 1 thread";
  const std::string p1 = thread_prefix(kCpuKey, 1);
  Tally tally = print_ratio_table(rec, p1, title, quick);
  // The ratio table's runs are single-threaded, so thread CPU time is the
  // work's own time: when the machine descheduled one of them, that table on
  // CPU time follows. The thread tables stay on wall-clock time (CPU time
  // counts one thread).
  const auto busy = rec.preempted(0.9, p1 + "/");
  Tally cpu_tally;
  if (!busy.empty()) {
    std::printf(
        "\nnote: %zu single-threaded benchmark(s) got under 90%% of a core (machine "
        "busy), e.g. %s: wall-clock ratios are noisy; the ratio table on CPU time:\n",
        busy.size(), busy.front().c_str());
    rec.use_cpu_time(true);
    cpu_tally = print_ratio_table(rec, p1, title, quick);
    rec.use_cpu_time(false);
  }
  tally += print_thread_tables(rec, kCpuKey, quick, kOpenBlas);
  print_summary(rec, tally, busy.empty() ? "" : " (wall-clock)");
  if (!busy.empty()) {
    std::printf("targets (ratio table on CPU time): %d PASS, %d MISS\n", cpu_tally.pass,
                cpu_tally.miss);
  }
}

}  // namespace
}  // namespace lora
}  // namespace bench
}  // namespace rankwise

int main(int argc, char** argv) {
  namespace lora = rankwise::bench::lora;
  const bool quick = rankwise::bench::take_quick_flag(&argc, argv);
  return rankwise::bench::benchmark_main(
      argc, argv, quick, true, [quick] { lora::register_all(quick); },
      [quick] { lora::print_header(quick); },
      [quick](rankwise::bench::RecordingReporter& rec) { lora::print_tables(rec, quick); });
}
