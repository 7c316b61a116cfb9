// CPU benchmark of the LoRA delta (rankwise::Lora<float, CpuBackend>) next to
// the baselines it should be judged against, measured in the same run:
//
//   delta_fwd   Lora::forward(x, y): y += s x Aᵀ Bᵀ
//   delta_bwd   Lora::backward(x, dy, dx): dA, dB, dx +=
//   blas_fwd    the two cblas_sgemm calls a C++ user writes for the forward
//               (OpenBLAS: H = X Aᵀ; Y += s H Bt, Bt = Bᵀ stored r x d_out as
//               rankwise stores it), on the same layers' memory
//   blas_bwd    the five cblas_sgemm calls of the backward, likewise
//   blas_sgemm  a 2048³ sgemm: OpenBLAS's own large-GEMM rate, for the floor
//   read        reading A and B once from memory (a vectorised sum): the byte bound
//   gemm_fwd    the two GEMMs as raw Eigen expressions on plain Eigen maps of
//               the same memory
//   gemm_bwd    the five Eigen GEMMs of the backward, likewise
//   base        the frozen base product Y = X W0ᵀ (d x d), Eigen
//   naive       ΔW = s B A materialised (d x d) every call, then Y += X ΔWᵀ, Eigen
//
// The delta, OpenBLAS, read and blas_sgemm run at 1 and 2 threads (rankwise:
// CpuContext(t), whose pool the layers built with it use; OpenBLAS:
// openblas_set_num_threads(t)); the Eigen baselines run on one thread.
//
// For N <= 16 every variant rotates over copies of the layer (3x the L3 in
// all), so A and B come from DRAM as they would in a model with many layers;
// that is where the floor, max(bytes of A and B at the read rate, FLOPs at
// OpenBLAS's large-sgemm rate), each rate the best measured in this run at up
// to t threads, is a target.
//
// After the run it prints the Eigen ratio table (support/report.hpp, 1
// thread), then per thread count the delta against OpenBLAS and the floor and
// the 1 -> 2 thread speed-up (support/thread_report.hpp), with PASS/MISS
// against the targets, on wall-clock time; the Eigen table again on
// CPU time when the machine was busy enough to deschedule the benchmark.
// Informational: it exits 0 either way. By default each benchmark runs 3
// repetitions, randomly interleaved, and the tables use medians (override with
// the usual --benchmark_repetitions / --benchmark_enable_random_interleaving).
//
// Flags: everything Google Benchmark takes (--benchmark_filter=...,
// --benchmark_format=json: the JSON alone on stdout, the tables on stderr),
// plus --quick (or RANKWISE_BENCH_QUICK=1): r = 8, N in {1, 16}, short
// minimum time.
//
// Build flags: the build type's (Release: -O3 -DNDEBUG) and, when rankwise is
// the top-level project, -march=native (off with -DRANKWISE_NATIVE=OFF). The
// delta and the Eigen baselines are compiled by the same compiler with the
// same flags into this one binary, so their ratios compare like with like;
// OpenBLAS picks its kernels for the CPU at run time whatever the flags.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <rankwise/rankwise.hpp>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "support/cpu_matrix.hpp"
#include "support/openblas_baseline.hpp"
#include "support/report.hpp"
#include "support/sizes.hpp"
#include "support/thread_report.hpp"

namespace {

namespace rb = rankwise::bench;
using rankwise::CpuBackend;
using rankwise::CpuContext;
using rankwise::host_view;
using T = float;
using Mat = rb::RowMajorMatrix<T>;
using Layer = rankwise::Lora<T, CpuBackend>;
using Kern = rankwise::Kernels<CpuBackend, T>;

const std::string kBackend = "cpu_f32";
constexpr std::int64_t kD = rb::kDim;

// Result-name prefix at `threads` threads ("cpu_f32/t:2"); the Eigen baselines use 1.
std::string prefix(int threads) { return rb::thread_prefix(kBackend, threads); }

// ---- inputs -----------------------------------------------------------------

using rb::random_matrix;  // deterministic U(lo, hi) values (support/cpu_matrix.hpp)

// Activations and upstream gradients per token count, and the base weight,
// built once and shared by every benchmark that needs them.
const Mat& tokens_input(std::int64_t n) {
  static std::map<std::int64_t, Mat> cache;
  auto it = cache.find(n);
  if (it == cache.end()) it = cache.emplace(n, random_matrix(n, kD, 11, -1.0, 1.0)).first;
  return it->second;
}
const Mat& upstream_grad(std::int64_t n) {
  static std::map<std::int64_t, Mat> cache;
  auto it = cache.find(n);
  if (it == cache.end()) it = cache.emplace(n, random_matrix(n, kD, 12, -1.0, 1.0)).first;
  return it->second;
}
const Mat& base_weight() {
  static const Mat w0 = random_matrix(kD, kD, 13, -1.0 / 64, 1.0 / 64);  // (d_out x d_in)
  return w0;
}

// Largest cache Google Benchmark reports (the L3); 32 MiB if it reports none.
std::size_t largest_cache_bytes() {
  std::size_t biggest = 0;
  for (const auto& c : benchmark::CPUInfo::Get().caches) {
    if (c.size > 0 && static_cast<std::size_t>(c.size) > biggest) biggest = c.size;
  }
  return biggest > 0 ? biggest : std::size_t(32) << 20;
}

std::size_t factor_bytes(std::int64_t rank) { return 2 * sizeof(T) * rank * kD; }  // A and Bᵀ

// Rotation up to N = 16, where the floor of bytes from DRAM is a target.
std::int64_t copies_for(std::int64_t rank, std::int64_t n) {
  return rb::rotates(n, rb::kFloorMaxTokens)
             ? rb::rotation_copies(factor_bytes(rank), largest_cache_bytes())
             : 1;
}

double scale_for(std::int64_t rank) { return rb::kAlpha / static_cast<double>(rank); }

// ---- contexts and rotation pools ------------------------------------------------
// One context per thread count; the layers keep a pointer to theirs.
CpuContext& context(int threads) {
  static std::map<int, std::unique_ptr<CpuContext>> contexts;
  auto& ctx = contexts[threads];
  if (!ctx) ctx = std::make_unique<CpuContext>(threads);
  return *ctx;
}

// `copies` rankwise layers with PEFT-initialised A and a nonzero B, built
// with the context of `threads`. The raw Eigen and OpenBLAS baselines use the
// same layers' A, Bᵀ and gradients (plain contiguous memory, no stride), so
// delta and baselines read the very same bytes at the very same addresses: at
// small N, where the time is the memory traffic, a different layout of the
// copies would otherwise show up in the ratio. Built on first use and kept
// (about 0.6 GiB per thread count), since random interleaving runs the
// repetitions of all benchmarks in a shuffled order.
std::vector<std::unique_ptr<Layer>>& layer_pool(int threads, std::int64_t rank,
                                                std::int64_t copies) {
  static std::map<std::tuple<int, std::int64_t, std::int64_t>, std::vector<std::unique_ptr<Layer>>>
      pools;
  auto& pool = pools[{threads, rank, copies}];
  if (pool.empty()) {
    CpuContext& ctx = context(threads);
    rankwise::LoraConfig cfg;
    cfg.d_in = kD;
    cfg.d_out = kD;
    cfg.rank = rank;
    cfg.alpha = rb::kAlpha;
    for (std::int64_t i = 0; i < copies; ++i) {
      pool.push_back(std::make_unique<Layer>(ctx, cfg));
      pool.back()->init_peft(100 + i);
      Kern::fill_uniform(ctx, pool.back()->bt(), -0.01, 0.01, 200 + i);
    }
  }
  return pool;
}

using ConstMap = Eigen::Map<const Mat>;
using MutMap = Eigen::Map<Mat>;
template <class V>
ConstMap cmap(const V& v) {
  return ConstMap(v.data, v.rows, v.cols);
}
template <class V>
MutMap mut_map(const V& v) {
  return MutMap(v.data, v.rows, v.cols);
}

void gemm_counter(benchmark::State& state, double flops) {
  state.counters["FLOP/s"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

// Counters of a LoRA delta run (rankwise, Eigen or OpenBLAS) over `copies` layers.
void delta_counters(benchmark::State& state, bool backward, std::int64_t rank, std::int64_t n,
                    std::int64_t copies) {
  gemm_counter(state, rb::delta_flops(backward, rank, n));
  if (!backward) state.SetBytesProcessed(state.iterations() * factor_bytes(rank));
  state.counters["copies"] = static_cast<double>(copies);
}

// ---- rankwise ---------------------------------------------------------------

void BM_DeltaForward(benchmark::State& state, int threads, std::int64_t rank, std::int64_t n) {
  const std::int64_t copies = copies_for(rank, n);
  auto& layers = layer_pool(threads, rank, copies);
  const Mat& x = tokens_input(n);
  Mat y = Mat::Zero(n, kD);
  const auto xv = host_view(x.data(), n, kD);
  const auto yv = host_view(y.data(), n, kD);
  for (auto& layer : layers) layer->forward(xv, yv);  // allocates each workspace once
  rb::wait_for_openblas_idle();
#if defined(RANKWISE_USE_CBLAS)
  rb::use_openblas_threads(1);  // rankwise's products on OpenBLAS: the context brings the threads
#endif
  std::int64_t i = 0;
  for (auto _ : state) {
    layers[i]->forward(xv, yv);
    benchmark::ClobberMemory();
    if (++i == copies) i = 0;
  }
  delta_counters(state, false, rank, n, copies);
}

void BM_DeltaBackward(benchmark::State& state, int threads, std::int64_t rank, std::int64_t n) {
  const std::int64_t copies = copies_for(rank, n);
  auto& layers = layer_pool(threads, rank, copies);
  const Mat& x = tokens_input(n);
  const Mat& dy = upstream_grad(n);
  Mat dx = Mat::Zero(n, kD);
  const auto xv = host_view(x.data(), n, kD);
  const auto dyv = host_view(dy.data(), n, kD);
  const auto dxv = host_view(dx.data(), n, kD);
  for (auto& layer : layers) layer->backward(xv, dyv, dxv);
  rb::wait_for_openblas_idle();
#if defined(RANKWISE_USE_CBLAS)
  rb::use_openblas_threads(1);  // rankwise's products on OpenBLAS: the context brings the threads
#endif
  std::int64_t i = 0;
  for (auto _ : state) {
    layers[i]->backward(xv, dyv, dxv);
    benchmark::ClobberMemory();
    if (++i == copies) i = 0;
  }
  delta_counters(state, true, rank, n, copies);
}

// The byte bound: read A and Bᵀ of the next rotated copy once, as a sum
// (Eigen's vectorised reduction: of the sums and copies tried it reached the
// highest bandwidth here, ~30-37 GB/s from DRAM on one core), split over the
// context's threads: on several cores DRAM gives more than on one.
void BM_Read(benchmark::State& state, int threads, std::int64_t rank) {
  const std::int64_t copies = copies_for(rank, 1);
  auto& layers = layer_pool(threads, rank, copies);
  CpuContext& ctx = context(threads);
  using Flat = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
  const std::int64_t elements = rank * kD;  // of A, and of Bᵀ
  std::vector<T> sums(static_cast<std::size_t>(threads));
  rb::wait_for_openblas_idle();
  std::int64_t i = 0;
  for (auto _ : state) {
    const T* a = layers[i]->a().data;
    const T* bt = layers[i]->bt().data;
    ctx.parallel_for(threads, [&](std::int64_t task) {
      const std::int64_t begin = elements * task / threads;
      const std::int64_t count = elements * (task + 1) / threads - begin;
      sums[task] = Flat(a + begin, count).sum() + Flat(bt + begin, count).sum();
    });
    benchmark::DoNotOptimize(sums.data());
    benchmark::ClobberMemory();
    if (++i == copies) i = 0;
  }
  state.SetBytesProcessed(state.iterations() * factor_bytes(rank));
  state.counters["copies"] = static_cast<double>(copies);
}

// ---- OpenBLAS baselines ----------------------------------------------------------

#if RANKWISE_BENCH_OPENBLAS
void BM_Blas(benchmark::State& state, bool backward, int threads, std::int64_t rank,
             std::int64_t n) {
  const std::int64_t copies = copies_for(rank, n);
  const Mat& x = tokens_input(n);
  const Mat& dy = upstream_grad(n);
  Mat y = Mat::Zero(n, kD), dx = Mat::Zero(n, kD);
  rb::time_blas_lora(state, layer_pool(threads, rank, copies), threads, backward, n, x.data(),
                     dy.data(), y.data(), dx.data());
  delta_counters(state, backward, rank, n, copies);
}
void BM_BlasForward(benchmark::State& state, int threads, std::int64_t rank, std::int64_t n) {
  BM_Blas(state, false, threads, rank, n);
}
void BM_BlasBackward(benchmark::State& state, int threads, std::int64_t rank, std::int64_t n) {
  BM_Blas(state, true, threads, rank, n);
}

// C = A B, all kPeakGemmDim² (row-major): the large-sgemm rate of the floor.
void BM_BlasSgemm(benchmark::State& state, int threads) {
  const int dim = static_cast<int>(rb::kPeakGemmDim);
  const Mat a = random_matrix(dim, dim, 31, -1.0, 1.0), b = random_matrix(dim, dim, 32, -1.0, 1.0);
  Mat c(dim, dim);
  rb::use_openblas_threads(threads);
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, dim, dim, dim, 1.0f, a.data(), dim,
                b.data(), dim, 0.0f, c.data(), dim);
    benchmark::ClobberMemory();
  }
  rb::openblas_done(threads);
  gemm_counter(state, rb::peak_gemm_flops());
}
#endif

// ---- raw Eigen baselines (one thread) ----------------------------------------------

void BM_GemmForward(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  const std::int64_t copies = copies_for(rank, n);
  auto& layers = layer_pool(1, rank, copies);
  const Mat& x = tokens_input(n);
  Mat y = Mat::Zero(n, kD);
  Mat h(n, rank);
  const T s = static_cast<T>(scale_for(rank));
  rb::wait_for_openblas_idle();
  std::int64_t i = 0;
  for (auto _ : state) {
    const Layer& layer = *layers[i];
    const ConstMap a = cmap(layer.a()), bt = cmap(layer.bt());
    h.noalias() = x * a.transpose();
    y.noalias() += s * h * bt;
    benchmark::ClobberMemory();
    if (++i == copies) i = 0;
  }
  delta_counters(state, false, rank, n, copies);
}

void BM_GemmBackward(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  const std::int64_t copies = copies_for(rank, n);
  auto& layers = layer_pool(1, rank, copies);
  const Mat& x = tokens_input(n);
  const Mat& dy = upstream_grad(n);
  Mat dx = Mat::Zero(n, kD);
  Mat h(n, rank), dh(n, rank);
  const T s = static_cast<T>(scale_for(rank));
  rb::wait_for_openblas_idle();
  std::int64_t i = 0;
  for (auto _ : state) {
    Layer& layer = *layers[i];
    const ConstMap a = cmap(layer.a()), bt = cmap(layer.bt());
    MutMap da = mut_map(layer.grad_a()), dbt = mut_map(layer.grad_bt());
    h.noalias() = x * a.transpose();
    dh.noalias() = s * dy * bt.transpose();
    dbt.noalias() = s * h.transpose() * dy;
    da.noalias() = dh.transpose() * x;
    dx.noalias() += dh * a;
    benchmark::ClobberMemory();
    if (++i == copies) i = 0;
  }
  delta_counters(state, true, rank, n, copies);
}

void BM_Base(benchmark::State& state, std::int64_t n) {
  const Mat& x = tokens_input(n);
  const Mat& w0 = base_weight();
  Mat y(n, kD);
  rb::wait_for_openblas_idle();
  for (auto _ : state) {
    y.noalias() = x * w0.transpose();
    benchmark::ClobberMemory();
  }
  gemm_counter(state, 2.0 * n * kD * kD);
}

void BM_Naive(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  const Layer& layer = *layer_pool(1, rank, copies_for(rank, n))[0];
  const ConstMap a = cmap(layer.a()), bt = cmap(layer.bt());  // ΔW (64 MiB) is never cached
  const Mat& x = tokens_input(n);
  Mat y = Mat::Zero(n, kD);
  Mat dw(kD, kD);  // (d_out x d_in), allocated once: the naive cost is the compute
  const T s = static_cast<T>(scale_for(rank));
  rb::wait_for_openblas_idle();
  for (auto _ : state) {
    dw.noalias() = s * bt.transpose() * a;
    y.noalias() += x * dw.transpose();
    benchmark::ClobberMemory();
  }
  gemm_counter(state, 2.0 * kD * kD * rank + 2.0 * n * kD * kD);
}

// ---- registration -------------------------------------------------------------

void register_all(bool quick) {
  // Cheap cases repeat until min_time; expensive ones (the d x d products at
  // large N, a second or more each on one core) stop after one iteration,
  // which is long enough to time.
  const double min_time = quick ? 0.01 : 0.2;
  auto configure = [&](benchmark::internal::Benchmark* b, std::int64_t n) {
    b->MinTime(min_time)->UseRealTime()->Unit(n >= 256 ? benchmark::kMillisecond
                                                       : benchmark::kMicrosecond);
  };
  using DeltaFn = void (*)(benchmark::State&, int, std::int64_t, std::int64_t);
  using EigenFn = void (*)(benchmark::State&, std::int64_t, std::int64_t);
  auto reg_threads = [&](const char* what, DeltaFn fn, int t, std::int64_t r, std::int64_t n) {
    configure(benchmark::RegisterBenchmark(rb::key(prefix(t), what, r, n).c_str(), fn, t, r, n), n);
  };
  auto reg_eigen = [&](const char* what, EigenFn fn, std::int64_t r, std::int64_t n) {
    configure(benchmark::RegisterBenchmark(rb::key(prefix(1), what, r, n).c_str(), fn, r, n), n);
  };

#if RANKWISE_BENCH_OPENBLAS
  for (int t : rb::thread_counts()) {
    configure(benchmark::RegisterBenchmark(
                  rb::key(prefix(t), "blas_sgemm", 0, rb::kPeakGemmDim).c_str(), BM_BlasSgemm, t),
              rb::kPeakGemmDim);
  }
#endif
  for (std::int64_t n : rb::token_counts(quick)) {
    configure(benchmark::RegisterBenchmark(rb::key(prefix(1), "base", 0, n).c_str(), BM_Base, n),
              n);
  }
  // Grouped by (r, N): without random interleaving each delta runs right
  // next to its baselines (similar machine load for the ratio).
  for (std::int64_t r : rb::ranks(quick)) {
    for (std::int64_t n : rb::token_counts(quick)) {
      for (int t : rb::thread_counts()) {
        reg_threads("delta_fwd", BM_DeltaForward, t, r, n);
#if RANKWISE_BENCH_OPENBLAS
        reg_threads("blas_fwd", BM_BlasForward, t, r, n);
#endif
        if (n == 1) {
          configure(
              benchmark::RegisterBenchmark(rb::key(prefix(t), "read", r, 0).c_str(), BM_Read, t, r),
              n);
        }
      }
      reg_eigen("gemm_fwd", BM_GemmForward, r, n);
      for (int t : rb::thread_counts()) {
        reg_threads("delta_bwd", BM_DeltaBackward, t, r, n);
#if RANKWISE_BENCH_OPENBLAS
        reg_threads("blas_bwd", BM_BlasBackward, t, r, n);
#endif
      }
      reg_eigen("gemm_bwd", BM_GemmBackward, r, n);
      reg_eigen("naive", BM_Naive, r, n);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  rb::RecordingReporter rec(argc, argv);  // before anything prints: it may move the text to stderr
  std::vector<char*> args;
  const auto arg_storage = rb::with_default_flags(argc, argv, quick, &args);
  int nargs = static_cast<int>(args.size()) - 1;
  register_all(quick);
  benchmark::Initialize(&nargs, args.data());
  if (benchmark::ReportUnrecognizedArguments(nargs, args.data())) return 1;

  std::string threads;
  for (int t : rb::thread_counts()) threads += (threads.empty() ? "" : ", ") + std::to_string(t);
  std::printf(
      "rankwise CPU LoRA benchmark%s: Eigen %d.%d.%d, SIMD: %s, threads: %s (rankwise "
      "CpuContext and OpenBLAS; the Eigen baselines 1), hardware threads: %u\n",
      quick ? " (quick)" : "", EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION,
      rb::eigen_simd().c_str(), threads.c_str(), std::thread::hardware_concurrency());
  std::printf("%s\n", rb::openblas_note().c_str());
#if defined(RANKWISE_USE_CBLAS)
  std::printf("rankwise's large products: OpenBLAS (rankwise::openblas), small batches: "
              "rankwise's kernels\n");
#else
  std::printf("rankwise's large products: Eigen, small batches: rankwise's kernels\n");
#endif
  std::printf(
      "N <= %lld rows rotate over copies of A and B totalling %zux the largest cache "
      "(%zu KiB), so every call reads them from DRAM; the delta, its baselines and the "
      "read bound (a vectorised sum over A and B) all rotate alike.\n\n",
      static_cast<long long>(rb::kFloorMaxTokens), rb::kRotationCacheMultiple,
      largest_cache_bytes() >> 10);
  std::fflush(stdout);

  benchmark::RunSpecifiedBenchmarks(&rec);
  std::fflush(stdout);

  const std::string eigen_title = "CPU (Eigen, float), 1 thread";
  rb::Tally tally = rb::print_ratio_table(rec, prefix(1), eigen_title, quick);
  // The Eigen table's runs are single-threaded, so thread CPU time is the
  // work's own time. When the machine was busy enough to deschedule one of
  // them, that table on CPU time follows: the steadier view of the same run.
  // The thread tables stay on wall-clock time (CPU time counts one thread).
  const auto busy = rec.preempted(0.9, prefix(1) + "/");
  rb::Tally cpu_tally;
  if (!busy.empty()) {
    std::printf(
        "\nnote: %zu single-threaded benchmark(s) got under 90%% of a core (machine "
        "busy), e.g. %s: wall-clock ratios are noisy; the Eigen table on CPU time:\n",
        busy.size(), busy.front().c_str());
    rec.use_cpu_time(true);
    cpu_tally = rb::print_ratio_table(rec, prefix(1), eigen_title, quick);
    rec.use_cpu_time(false);
  }
  tally += rb::print_thread_tables(rec, kBackend, quick, rb::kOpenBlas);
  rb::print_summary(rec, tally, busy.empty() ? "" : " (wall-clock)");
  if (!busy.empty()) {
    std::printf("targets (Eigen table on CPU time): %d PASS, %d MISS\n", cpu_tally.pass,
                cpu_tally.miss);
  }
  benchmark::Shutdown();
  return 0;
}
