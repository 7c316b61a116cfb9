// CPU benchmark of the LoRA delta (rankwise::Lora<float, CpuBackend>) next to
// the baselines it should be judged against, measured in the same run:
//
//   delta_fwd  Lora::forward(x, y): y += s x Aᵀ Bᵀ
//   delta_bwd  Lora::backward(x, dy, dx): dA, dB, dx +=
//   gemm_fwd   the two Eigen GEMMs the forward consists of, as raw Eigen
//              expressions (H = X Aᵀ; Y += s H Bᵀ, Bᵀ stored r x d_out as
//              rankwise stores it) on plain Eigen maps of the same memory
//   gemm_bwd   the five Eigen GEMMs of the backward, likewise
//   base       the frozen base product Y = X W0ᵀ (d x d)
//   naive      ΔW = s B A materialised (d x d) every call, then Y += X ΔWᵀ
//   read       reading A and B once from memory (a vectorised sum): the N = 1 bound
//
// At N = 1 the delta's products are matrix-vector products; the library's
// gemm streams each row of A and Bᵀ once there (Kernels<CpuBackend>::gemm,
// one_row_product), where the raw Eigen baselines use Eigen's GEMV.
//
// At N = 1 every variant rotates over copies of the layer (3x the L3 in all),
// so A and B come from DRAM as they would in a model with many layers.
//
// After the run it prints the ratio table (support/report.hpp) with PASS/MISS
// against the targets, on wall-clock time, and again on CPU time when
// the machine was busy enough to deschedule the benchmark. Informational: it
// exits 0 either way. By default each benchmark runs 3 repetitions, randomly
// interleaved, and the table uses medians (override with the usual
// --benchmark_repetitions / --benchmark_enable_random_interleaving flags).
//
// Flags: everything Google Benchmark takes (--benchmark_filter=...), plus
// --quick (or RANKWISE_BENCH_QUICK=1): r = 8, N in {1, 16}, short minimum time.
//
// Build flags: whatever the build type gives (Release: -O3 -DNDEBUG), with no
// -march=native by default. The delta and every baseline are compiled by the
// same compiler with the same flags into this one binary, so the ratios compare
// like with like; absolute times would be faster with AVX2/FMA enabled.
// Eigen runs single-threaded here (no OpenMP), for the delta and the baselines.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <rankwise/rankwise.hpp>

#include "support/cpu_matrix.hpp"
#include "support/report.hpp"
#include "support/sizes.hpp"

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

std::int64_t copies_for(std::int64_t rank, std::int64_t n) {
  return rb::rotates(n) ? rb::rotation_copies(factor_bytes(rank), largest_cache_bytes()) : 1;
}

double scale_for(std::int64_t rank) { return rb::kAlpha / static_cast<double>(rank); }

// ---- rotation pool ---------------------------------------------------------------
// `copies` rankwise layers with PEFT-initialised A and a nonzero B. The raw
// Eigen baselines map the same layers' A, Bᵀ and gradients (plain contiguous
// Eigen::Map, no stride), so delta and baselines read the very same bytes at
// the very same addresses: at N = 1, where the time is the memory traffic, a
// different layout of the copies would otherwise show up in the ratio.
// Built on first use and kept (under 1 GiB in all), since random interleaving
// runs the repetitions of all benchmarks in a shuffled order.
std::vector<std::unique_ptr<Layer>>& layer_pool(std::int64_t rank, std::int64_t copies) {
  static CpuContext ctx;  // the layers keep a pointer to it
  static std::map<std::pair<std::int64_t, std::int64_t>, std::vector<std::unique_ptr<Layer>>> pools;
  auto& pool = pools[{rank, copies}];
  if (pool.empty()) {
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

// ---- rankwise ---------------------------------------------------------------

void BM_DeltaForward(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  const std::int64_t copies = copies_for(rank, n);
  auto& layers = layer_pool(rank, copies);
  const Mat& x = tokens_input(n);
  Mat y = Mat::Zero(n, kD);
  const auto xv = host_view(x.data(), n, kD);
  const auto yv = host_view(y.data(), n, kD);
  for (auto& layer : layers) layer->forward(xv, yv);  // allocates each workspace once
  std::int64_t i = 0;
  for (auto _ : state) {
    layers[i]->forward(xv, yv);
    benchmark::ClobberMemory();
    if (++i == copies) i = 0;
  }
  gemm_counter(state, 4.0 * n * rank * kD);
  state.SetBytesProcessed(state.iterations() * factor_bytes(rank));
  state.counters["copies"] = static_cast<double>(copies);
}

void BM_DeltaBackward(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  const std::int64_t copies = copies_for(rank, n);
  auto& layers = layer_pool(rank, copies);
  const Mat& x = tokens_input(n);
  const Mat& dy = upstream_grad(n);
  Mat dx = Mat::Zero(n, kD);
  const auto xv = host_view(x.data(), n, kD);
  const auto dyv = host_view(dy.data(), n, kD);
  const auto dxv = host_view(dx.data(), n, kD);
  for (auto& layer : layers) layer->backward(xv, dyv, dxv);
  std::int64_t i = 0;
  for (auto _ : state) {
    layers[i]->backward(xv, dyv, dxv);
    benchmark::ClobberMemory();
    if (++i == copies) i = 0;
  }
  gemm_counter(state, 10.0 * n * rank * kD);
  state.counters["copies"] = static_cast<double>(copies);
}

// ---- raw Eigen baselines ------------------------------------------------------

void BM_GemmForward(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  const std::int64_t copies = copies_for(rank, n);
  auto& layers = layer_pool(rank, copies);
  const Mat& x = tokens_input(n);
  Mat y = Mat::Zero(n, kD);
  Mat h(n, rank);
  const T s = static_cast<T>(scale_for(rank));
  std::int64_t i = 0;
  for (auto _ : state) {
    const Layer& layer = *layers[i];
    const ConstMap a = cmap(layer.a()), bt = cmap(layer.bt());
    h.noalias() = x * a.transpose();
    y.noalias() += s * h * bt;
    benchmark::ClobberMemory();
    if (++i == copies) i = 0;
  }
  gemm_counter(state, 4.0 * n * rank * kD);
  state.SetBytesProcessed(state.iterations() * factor_bytes(rank));
  state.counters["copies"] = static_cast<double>(copies);
}

void BM_GemmBackward(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  const std::int64_t copies = copies_for(rank, n);
  auto& layers = layer_pool(rank, copies);
  const Mat& x = tokens_input(n);
  const Mat& dy = upstream_grad(n);
  Mat dx = Mat::Zero(n, kD);
  Mat h(n, rank), dh(n, rank);
  const T s = static_cast<T>(scale_for(rank));
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
  gemm_counter(state, 10.0 * n * rank * kD);
  state.counters["copies"] = static_cast<double>(copies);
}

void BM_Base(benchmark::State& state, std::int64_t n) {
  const Mat& x = tokens_input(n);
  const Mat& w0 = base_weight();
  Mat y(n, kD);
  for (auto _ : state) {
    y.noalias() = x * w0.transpose();
    benchmark::ClobberMemory();
  }
  gemm_counter(state, 2.0 * n * kD * kD);
}

void BM_Naive(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  const Layer& layer = *layer_pool(rank, copies_for(rank, n))[0];
  const ConstMap a = cmap(layer.a()), bt = cmap(layer.bt());  // ΔW (64 MiB) is never cached
  const Mat& x = tokens_input(n);
  Mat y = Mat::Zero(n, kD);
  Mat dw(kD, kD);  // (d_out x d_in), allocated once: the naive cost is the compute
  const T s = static_cast<T>(scale_for(rank));
  for (auto _ : state) {
    dw.noalias() = s * bt.transpose() * a;
    y.noalias() += x * dw.transpose();
    benchmark::ClobberMemory();
  }
  gemm_counter(state, 2.0 * kD * kD * rank + 2.0 * n * kD * kD);
}

// The N = 1 bound: read A and Bᵀ of the next rotated copy once, as a sum
// (Eigen's vectorised reduction: of the sums and copies tried it reached the
// highest bandwidth here, ~30-37 GB/s from DRAM on one core).
void BM_Read(benchmark::State& state, std::int64_t rank) {
  const std::int64_t copies = copies_for(rank, 1);
  auto& layers = layer_pool(rank, copies);
  using Flat = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
  std::int64_t i = 0;
  for (auto _ : state) {
    const Layer& layer = *layers[i];
    T sum = Flat(layer.a().data, rank * kD).sum() + Flat(layer.bt().data, rank * kD).sum();
    benchmark::DoNotOptimize(sum);
    if (++i == copies) i = 0;
  }
  state.SetBytesProcessed(state.iterations() * factor_bytes(rank));
  state.counters["copies"] = static_cast<double>(copies);
}

// ---- registration -------------------------------------------------------------

void register_all(bool quick) {
  // Cheap cases repeat until min_time; expensive ones (the d x d products at
  // large N, a second or more each on one core) stop after one iteration,
  // which is long enough to time. With the default 3 repetitions the full run
  // takes about two minutes here.
  const double min_time = quick ? 0.01 : 0.2;
  auto configure = [&](benchmark::internal::Benchmark* b, std::int64_t n) {
    b->MinTime(min_time)->UseRealTime()->Unit(n >= 256 ? benchmark::kMillisecond
                                                       : benchmark::kMicrosecond);
  };
  for (std::int64_t n : rb::token_counts(quick)) {
    configure(benchmark::RegisterBenchmark(rb::key(kBackend, "base", 0, n).c_str(), BM_Base, n),
              n);
  }
  // Grouped by (r, N): without random interleaving each delta runs right
  // next to its baselines (similar machine load for the ratio).
  for (std::int64_t r : rb::ranks(quick)) {
    for (std::int64_t n : rb::token_counts(quick)) {
      auto reg = [&](const char* what, void (*fn)(benchmark::State&, std::int64_t, std::int64_t)) {
        configure(benchmark::RegisterBenchmark(rb::key(kBackend, what, r, n).c_str(), fn, r, n),
                  n);
      };
      reg("delta_fwd", BM_DeltaForward);
      reg("gemm_fwd", BM_GemmForward);
      if (n == 1) {
        configure(benchmark::RegisterBenchmark(rb::key(kBackend, "read", r, 0).c_str(), BM_Read, r),
                  n);
      }
      reg("delta_bwd", BM_DeltaBackward);
      reg("gemm_bwd", BM_GemmBackward);
      reg("naive", BM_Naive);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  const auto console = rb::console_options(argc, argv);
  std::vector<char*> args;
  const auto arg_storage = rb::with_default_flags(argc, argv, quick, &args);
  int nargs = static_cast<int>(args.size()) - 1;
  register_all(quick);
  benchmark::Initialize(&nargs, args.data());
  if (benchmark::ReportUnrecognizedArguments(nargs, args.data())) return 1;

  std::printf("rankwise CPU LoRA benchmark%s: Eigen %d.%d.%d, SIMD: %s, Eigen threads: %d\n",
              quick ? " (quick)" : "", EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION,
              EIGEN_MINOR_VERSION, Eigen::SimdInstructionSetsInUse(), Eigen::nbThreads());
  std::printf("N = 1 rows rotate over copies of A and B totalling %zux the largest cache "
              "(%zu KiB), so every call reads them from DRAM; the delta, the 2-GEMM baseline and "
              "the read bound (a vectorised sum over A and B) all rotate alike.\n\n",
              rb::kRotationCacheMultiple, largest_cache_bytes() >> 10);
  std::fflush(stdout);

  rb::RecordingReporter rec(console);
  benchmark::RunSpecifiedBenchmarks(&rec);
  std::fflush(stdout);

  const rb::Tally tally = rb::print_ratio_table(rec, kBackend, "CPU (Eigen, float)", quick);
  // Eigen runs single-threaded here, so thread CPU time is the work's own
  // time. When the machine was busy enough to deschedule the benchmark, the
  // same table on CPU time follows: the steadier view of the same run.
  const auto busy = rec.preempted(0.9);
  rb::Tally cpu_tally;
  if (!busy.empty()) {
    std::printf("\nnote: %zu benchmark(s) got under 90%% of a core (machine busy), e.g. %s: "
                "wall-clock ratios are noisy; the same table on CPU time:\n",
                busy.size(), busy.front().c_str());
    rec.use_cpu_time(true);
    cpu_tally = rb::print_ratio_table(rec, kBackend, "CPU (Eigen, float)", quick);
    rec.use_cpu_time(false);
  }
  rb::print_summary(rec, tally, busy.empty() ? "" : " (wall-clock)");
  if (!busy.empty()) {
    std::printf("targets (CPU time): %d PASS, %d MISS\n", cpu_tally.pass, cpu_tally.miss);
  }
  benchmark::Shutdown();
  return 0;
}
