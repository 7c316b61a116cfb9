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

#include <Eigen/Core>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <rankwise/rankwise.hpp>
#include <string>
#include <thread>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "support/cpu_matrix.hpp"
#include "support/openblas_baseline.hpp"
#include "support/report.hpp"
#include "support/smora_bench.hpp"
#include "support/smora_report.hpp"
#include "support/smora_sizes.hpp"
#include "support/thread_report.hpp"

namespace {

namespace rb = rankwise::bench;
namespace sm = rankwise::bench::smora;
using rankwise::CpuBackend;
using rankwise::CpuContext;
using T = float;

/// Lets Google Benchmark time the loop (CPU and real time); preparation of a
/// layer the loop reaches for the first time is paused out.
struct CpuTimer {
  static constexpr bool kManualTime = false;
  static constexpr bool kCheckFinite = true;  // free on the CPU: no synchronisation

  template <class Need, class Prep, class Call>
  static void run(benchmark::State& state, CpuContext&, std::int64_t copies, Need need, Prep prep,
                  Call call) {
    rb::wait_for_openblas_idle();
    std::int64_t i = 0;
    for (auto _ : state) {
      if (need(i)) {
        state.PauseTiming();
        prep(i);
        state.ResumeTiming();
      }
      call(i);
      benchmark::ClobberMemory();
      if (++i == copies) i = 0;
    }
  }

  static void upload_units(CpuContext&, const std::int32_t* host, std::int64_t n, std::int64_t k,
                           rankwise::Buffer<CpuBackend, std::int32_t>& dst) {
    std::memcpy(dst.data(), host, sizeof(std::int32_t) * static_cast<std::size_t>(n * k));
  }
};

// ---- the last-level cache ------------------------------------------------------------

struct CacheSizes {
  std::size_t sysfs = 0;    // /sys/devices/system/cpu/cpu0/cache: the highest level's size
  int sysfs_level = 0;
  std::size_t sysconf = 0;  // sysconf(_SC_LEVEL3_CACHE_SIZE) (glibc)
  std::size_t gbench = 0;   // Google Benchmark's CPUInfo (largest cache)
  std::size_t env = 0;      // RANKWISE_BENCH_LLC_BYTES
  std::size_t used = 0;
  const char* source = "";
};

// "32768K" -> bytes.
std::size_t parse_size(const std::string& s) {
  if (s.empty()) return 0;
  std::size_t v = std::strtoull(s.c_str(), nullptr, 10);
  const char unit = s.find_first_of("KMG") == std::string::npos ? ' ' : s[s.find_first_of("KMG")];
  if (unit == 'K') v <<= 10;
  if (unit == 'M') v <<= 20;
  if (unit == 'G') v <<= 30;
  return v;
}

CacheSizes detect_caches() {
  CacheSizes c;
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size"), type_file(dir + "type");
    if (!level_file || !size_file) break;
    int level = 0;
    std::string size, type;
    level_file >> level;
    size_file >> size;
    type_file >> type;
    if (type == "Instruction") continue;
    if (level >= c.sysfs_level) {
      c.sysfs_level = level;
      c.sysfs = parse_size(size);
    }
  }
#if defined(_SC_LEVEL3_CACHE_SIZE)
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 > 0) c.sysconf = static_cast<std::size_t>(l3);
#endif
  for (const auto& cache : benchmark::CPUInfo::Get().caches) {
    if (cache.size > 0 && static_cast<std::size_t>(cache.size) > c.gbench) c.gbench = cache.size;
  }
  c.env = sm::env_bytes("RANKWISE_BENCH_LLC_BYTES");
  // The kernel's view of this core's cache hierarchy first: glibc's sysconf
  // reads CPUID and, on some AMD parts under a hypervisor, reports the whole
  // package's L3 rather than the slice (CCD) this core can use.
  if (c.env > 0) {
    c.used = c.env;
    c.source = "RANKWISE_BENCH_LLC_BYTES";
  } else if (c.sysfs > 0) {
    c.used = c.sysfs;
    c.source = "sysfs";
  } else if (c.sysconf > 0) {
    c.used = c.sysconf;
    c.source = "sysconf(_SC_LEVEL3_CACHE_SIZE)";
  } else if (c.gbench > 0) {
    c.used = c.gbench;
    c.source = "Google Benchmark CPUInfo";
  } else {
    c.used = std::size_t(32) << 20;
    c.source = "default (nothing detected)";
  }
  return c;
}

using CpuSuite = sm::Suite<CpuBackend, T, CpuTimer>;

#if RANKWISE_BENCH_OPENBLAS
// The dense rank-64 LoRA as cblas_sgemm calls on `threads` threads, on the
// memory of the suite's rank-64 LoRA layers, registered right after them.
void register_blas(CpuSuite& suite, int threads, std::int64_t n, bool uncached) {
  for (bool backward : {false, true}) {
    auto* b = benchmark::RegisterBenchmark(
        sm::blas_key(suite.backend(), backward, sm::kRank, n, uncached).c_str(),
        [&suite, threads, backward, n, uncached](benchmark::State& state) {
          CpuSuite::guarded(state, [&] {
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
  const bool crossover = sm::take_flag(&argc, argv, "--crossover", "RANKWISE_BENCH_CROSSOVER");
  rb::RecordingReporter rec(argc, argv);  // before anything prints: it may move the text to stderr
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  const CacheSizes caches = detect_caches();
  // One suite per thread count: layers keep the context they were built with.
  const int many = rb::thread_counts().back();
  CpuContext ctx(1), ctx_many(many);
  CpuSuite suite(ctx, rb::thread_prefix("cpu_f32", 1), caches.used, quick);
  CpuSuite suite_many(ctx_many, rb::thread_prefix("cpu_f32", many), caches.used, quick);
  if (crossover) {
    suite.register_crossover();
  } else {
    std::function<void(std::int64_t, bool)> blas_1, blas_many;
#if RANKWISE_BENCH_OPENBLAS
    blas_1 = [&](std::int64_t n, bool uncached) { register_blas(suite, 1, n, uncached); };
    blas_many = [&](std::int64_t n, bool uncached) {
      register_blas(suite_many, many, n, uncached);
    };
#endif
    suite.register_table(sm::table_models(), blas_1);
    if (many > 1) suite_many.register_table(sm::shipped_models(), blas_many);
  }

  const std::string threads = crossover || many == 1 ? "1" : "1 and " + std::to_string(many);
  std::printf(
      "rankwise CPU SMoRA benchmark%s%s: Eigen %d.%d.%d, SIMD: %s, threads: %s "
      "(rankwise CpuContext, OpenBLAS), hardware threads: %u\n",
      crossover ? " (crossover)" : "", quick ? " (quick)" : "", EIGEN_WORLD_VERSION,
      EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION, rb::eigen_simd().c_str(), threads.c_str(),
      std::thread::hardware_concurrency());
  std::printf("%s\n", rb::openblas_note().c_str());
  std::printf("last-level cache: %zu KiB used (from %s); sysfs L%d %zu KiB, "
              "sysconf(_SC_LEVEL3_CACHE_SIZE) %zu KiB, Google Benchmark %zu KiB\n",
              caches.used >> 10, caches.source, caches.sysfs_level, caches.sysfs >> 10,
              caches.sysconf >> 10, caches.gbench >> 10);
  if (!crossover) {
    std::printf("uncached runs rotate over identical layers until the weights one forward at "
                "N = 1 touches, summed over the rotation, are >= %zux that: SMoRA g=1 %lld "
                "layers, g=8 %lld, LoRA r=64 %lld, r=8 %lld\n",
                rb::kRotationCacheMultiple,
                static_cast<long long>(suite.copies(sm::Model{true, 64, 1, {}}, true)),
                static_cast<long long>(suite.copies(sm::Model{true, 64, 8, {}}, true)),
                static_cast<long long>(suite.copies(sm::Model{false, 64, 1, {}}, true)),
                static_cast<long long>(suite.copies(sm::Model{false, 8, 1, {}}, true)));
  }
  std::printf("\n");
  std::fflush(stdout);

  benchmark::RunSpecifiedBenchmarks(&rec);
  std::fflush(stdout);

  sm::ReportOptions opt;
  opt.backend = suite.backend();
  opt.title = "CPU (Eigen, float), 1 thread";
  opt.quick = quick;
  opt.clock = sm::Clock::kCpu;
  opt.blas = rb::kOpenBlas;
  opt.prefer_dense = [](std::int64_t n, std::int64_t k, std::int64_t r) {
    return rankwise::TuningPolicy<CpuBackend>::prefer_dense(n, k, r);
  };
  char note[256];
  std::snprintf(note, sizeof note,
                "cached: one layer called repeatedly, its weights stay in cache (%zu KiB LLC)",
                caches.used >> 10);
  opt.cached_note = note;
  std::snprintf(note, sizeof note,
                "uncached: each call uses the next of many identical layers; what they read "
                "totals >= %zux the %zu KiB LLC, so weights come from DRAM",
                rb::kRotationCacheMultiple, caches.used >> 10);
  opt.uncached_note = note;

  if (crossover) {
    sm::print_crossover(rec, opt);
    for (const std::string& e : rec.errors()) std::printf("benchmark error: %s\n", e.c_str());
    std::printf("\ncrossover done (informational: exits 0)\n");
  } else {
    sm::SmoraTally tally = sm::print_layer_table(rec, opt);
    if (many > 1) {
      sm::ReportOptions opt_many = opt;
      opt_many.backend = suite_many.backend();
      opt_many.title = "CPU (Eigen, float), " + std::to_string(many) + " threads, wall-clock";
      opt_many.clock = sm::Clock::kReal;
      tally += sm::print_layer_table(rec, opt_many);
    }
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
  }
  benchmark::Shutdown();
  return 0;
}
