// CPU benchmark of SMoRA (rankwise::Smora<float, CpuBackend>, r = 64, k = 8,
// g in {1, 8}) next to the dense LoRA it replaces (rank 64) and the LoRA of
// its active rank (rank 8), measured in the same run:
//
//   smora_fwd / smora_bwd   Smora::forward (inference: router + rank units)
//                           and Smora::backward (after a training forward),
//                           with the rank-unit path forced to kSparse, kDense,
//                           and left to kAuto (the layer as shipped)
//   lora_fwd / lora_bwd     Lora::forward / Lora::backward at rank 64 and 8
//
// each at N in {1, 4, 16, 256, 2048} tokens, d = 4096, twice:
//   cached     one layer, called again and again: its weights stay in cache
//   uncached   a rotation of identical layers whose weights together are 3x
//              the last-level cache; each call uses the next one, so its
//              weights come from DRAM (the LoRA baselines rotate alike)
// then prints the ratio table with PASS/MISS against the targets.
//
// --crossover (or RANKWISE_BENCH_CROSSOVER=1) instead measures the crossover
// of the two rank-unit paths, rank_units_forward / rank_units_backward with
// kSparse and kDense alone (no router, cached weights), over
// N in {1, ..., 2048}, k/r in {8/64, 16/64, 4/64, 8/16, 32/64, 16/16, 64/64}
// (k = r: how LoRA-LEGO and MoS use the rank units), d in {4096, 1024}, and
// fits the rule "dense iff n >= N0 and r <= c k" for prefer_dense (a few
// minutes). Build with RANKWISE_BENCH_NATIVE=ON as well: the GEMM gains more
// from AVX-512/FMA than the gathers do, which moves the crossover.
//
// --quick (or RANKWISE_BENCH_QUICK=1): N in {1, 16} (crossover: d = 1024,
// k/r = 8/64, N in {1, 64}) and short minimum times, for smoke tests.
// Everything else goes to Google Benchmark (--benchmark_filter=...).
// RANKWISE_BENCH_LLC_BYTES overrides the detected last-level cache size.
//
// Ratios use CPU time (Eigen is single-threaded here, so it is the wall time
// of an idle machine, and a busy shared machine inflates it less). Flags: the
// build type's (Release: -O3), no -march=native unless RANKWISE_BENCH_NATIVE
// is ON; the layers and their baselines share the binary and the flags.
// Informational: exits 0 whatever the verdicts.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include <rankwise/rankwise.hpp>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "support/report.hpp"
#include "support/smora_bench.hpp"
#include "support/smora_report.hpp"
#include "support/smora_sizes.hpp"

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

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  const bool crossover = sm::take_flag(&argc, argv, "--crossover", "RANKWISE_BENCH_CROSSOVER");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  const CacheSizes caches = detect_caches();
  CpuContext ctx;
  sm::Suite<CpuBackend, T, CpuTimer> suite(ctx, "cpu_f32", caches.used, quick);
  if (crossover) suite.register_crossover();
  else suite.register_table();

  std::printf("rankwise CPU SMoRA benchmark%s%s: Eigen %d.%d.%d, SIMD: %s, Eigen threads: %d\n",
              crossover ? " (crossover)" : "", quick ? " (quick)" : "", EIGEN_WORLD_VERSION,
              EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION, Eigen::SimdInstructionSetsInUse(),
              Eigen::nbThreads());
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

  rb::RecordingReporter rec(rb::console_options(argc, argv));
  benchmark::RunSpecifiedBenchmarks(&rec);
  std::fflush(stdout);

  sm::ReportOptions opt;
  opt.backend = suite.backend();
  opt.title = "CPU (Eigen, float)";
  opt.quick = quick;
  opt.clock = sm::Clock::kCpu;
  opt.prefer_dense = [](std::int64_t n, std::int64_t k, std::int64_t r) {
    return rankwise::Kernels<CpuBackend, T>::prefer_dense(n, k, r);
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
    const sm::SmoraTally tally = sm::print_layer_table(rec, opt);
    const auto busy = rec.preempted(0.9);
    if (!busy.empty()) {
      std::printf("\nnote: %zu benchmark(s) got under 90%% of a core (machine busy), e.g. %s: "
                  "ratios use CPU time, which this inflates less than wall time\n",
                  busy.size(), busy.front().c_str());
    }
    sm::print_smora_summary(rec, tally);
  }
  benchmark::Shutdown();
  return 0;
}
