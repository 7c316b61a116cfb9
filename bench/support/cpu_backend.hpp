// BenchBackend<CpuBackend> (the contract: backend.hpp): Google Benchmark times
// the loop, wall and CPU time alike; preparation is paused out. CPU only:
// Eigen and <rankwise/rankwise.hpp>.
#pragma once

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <rankwise/rankwise.hpp>
#include <string>
#include <thread>

#include "support/backend.hpp"
#include "support/main.hpp"

#if RANKWISE_BENCH_OPENBLAS
#include <cblas.h>
#endif

namespace rankwise {
namespace bench {

#if RANKWISE_BENCH_OPENBLAS
inline constexpr bool kOpenBlas = true;
#else
inline constexpr bool kOpenBlas = false;
#endif

/// Which OpenBLAS the baseline uses, or that there is none (describe() names
/// it in the builds that have it).
inline std::string openblas_note() {
#if RANKWISE_BENCH_OPENBLAS
  return std::string("OpenBLAS baseline: ") + openblas_get_config();
#else
  return "OpenBLAS baseline: not built (install libopenblas-dev)";
#endif
}

// After a call on several threads, OpenBLAS's workers spin for about 0.1 s
// (2^28 cycles, OPENBLAS_THREAD_TIMEOUT) before they sleep: measured 110 ms
// here. A benchmark timed in that window shares its cores with them, so every
// benchmark except a threaded OpenBLAS one waits it out first.
inline std::chrono::steady_clock::time_point& last_threaded_openblas_call() {
  static std::chrono::steady_clock::time_point t{};
  return t;
}
inline void wait_for_openblas_idle() {
  constexpr auto kSpinWindow = std::chrono::milliseconds(250);
  std::this_thread::sleep_until(last_threaded_openblas_call() + kSpinWindow);
}

/// The last-level data cache of cpu0 and where its size came from.
struct CacheSize {
  std::size_t bytes = 0;
  std::string source;
};

/// RANKWISE_BENCH_LLC_BYTES when set; else the kernel's view of cpu0's
/// highest data cache (sysfs: on some AMD parts under a hypervisor, glibc's
/// sysconf reports the whole package's L3 rather than the slice this core
/// can use); else sysconf, Google Benchmark's CPUInfo, or 32 MiB.
inline CacheSize detect_last_level_cache() {
  if (const std::size_t env = env_bytes("RANKWISE_BENCH_LLC_BYTES"); env > 0) {
    return {env, "RANKWISE_BENCH_LLC_BYTES"};
  }
  std::size_t sysfs = 0;
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
    if (type == "Instruction" || level < best_level) continue;
    best_level = level;
    sysfs = std::strtoull(size.c_str(), nullptr, 10);
    const std::size_t unit = size.find_first_of("KMG");
    if (unit != std::string::npos) sysfs <<= size[unit] == 'K' ? 10 : size[unit] == 'M' ? 20 : 30;
  }
  if (sysfs > 0) return {sysfs, "sysfs L" + std::to_string(best_level)};
#if defined(_SC_LEVEL3_CACHE_SIZE)
  if (const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE); l3 > 0) {
    return {static_cast<std::size_t>(l3), "sysconf(_SC_LEVEL3_CACHE_SIZE)"};
  }
#endif
  std::size_t largest = 0;
  for (const auto& cache : benchmark::CPUInfo::Get().caches) {
    largest = std::max(largest, static_cast<std::size_t>(std::max(cache.size, 0)));
  }
  if (largest > 0) return {largest, "Google Benchmark CPUInfo"};
  return {std::size_t(32) << 20, "default (nothing detected)"};
}

/// Eigen::SimdInstructionSetsInUse(), plus AVX2 and FMA when Eigen uses them:
/// Eigen 3.4 says only "AVX" for an AVX2/FMA build.
inline std::string eigen_simd() {
  std::string s = Eigen::SimdInstructionSetsInUse();
  std::string more;
#if defined(EIGEN_VECTORIZE_AVX2)
  if (s.find("AVX2") == std::string::npos) more += "AVX2";
#endif
#if defined(EIGEN_VECTORIZE_FMA)
  if (s.find("FMA") == std::string::npos) more += more.empty() ? "FMA" : ", FMA";
#endif
  return more.empty() ? s : s + "; " + more;
}

template <>
struct BenchBackend<CpuBackend> {
  static constexpr bool kManualTime = false;
  static constexpr bool kCheckFinite = true;  // free on the CPU: no synchronisation

  template <class Call, class Need = Never, class Prep = NoPrep>
  static void run(benchmark::State& state, CpuContext&, Rotation rot, Call call, Need need = {},
                  Prep prep = {}) {
    wait_for_openblas_idle();
    std::int64_t i = 0;
    while (state.KeepRunningBatch(rot.batch)) {
      bool paused = false;
      for (std::int64_t k = 0, j = i; k < rot.batch; ++k, j = (j + 1) % rot.copies) {
        if (!need(j)) continue;
        if (!paused) state.PauseTiming();
        paused = true;
        prep(j);
      }
      if (paused) state.ResumeTiming();
      for (std::int64_t k = 0; k < rot.batch; ++k) {
        call(i);
        if (++i == rot.copies) i = 0;
      }
      benchmark::ClobberMemory();
    }
  }
  template <class Call>
  static void run_host(benchmark::State& state, CpuContext& ctx, Rotation rot, Call call) {
    run(state, ctx, rot, call);
  }

  /// A vectorised sum over a and b (as floats; the fastest way to read here),
  /// split over the context's threads: on several cores DRAM gives more than
  /// on one.
  static void read(CpuContext& ctx, Span a, Span b = {}) {
    using Flat = Eigen::Map<const Eigen::Array<float, Eigen::Dynamic, 1>>;
    float sums[64] = {};
    const std::int64_t tasks = std::min(ctx.num_threads(), 64);
    ctx.parallel_for(tasks, [&](std::int64_t task) {
      for (const Span& s : {a, b}) {
        const auto count = static_cast<std::int64_t>(s.bytes / sizeof(float));
        const std::int64_t begin = count * task / tasks;
        sums[task] +=
            Flat(static_cast<const float*>(s.data) + begin, count * (task + 1) / tasks - begin)
                .sum();
      }
    });
    benchmark::DoNotOptimize(sums);
  }

  static std::size_t cache_bytes() {
    static const CacheSize llc = detect_last_level_cache();
    return llc.bytes;
  }

  static std::string describe() {
    static const CacheSize llc = detect_last_level_cache();
    return "Eigen " + std::to_string(EIGEN_WORLD_VERSION) + "." +
           std::to_string(EIGEN_MAJOR_VERSION) + "." + std::to_string(EIGEN_MINOR_VERSION) +
           ", SIMD: " + eigen_simd() +
           ", hardware threads: " + std::to_string(std::thread::hardware_concurrency()) +
           ", last-level cache " + std::to_string(llc.bytes >> 10) + " KiB (" + llc.source + ")" +
           (kOpenBlas ? "; " + openblas_note() : std::string()) +
           "; timed by Google Benchmark (wall and CPU time)";
  }
};

}  // namespace bench
}  // namespace rankwise
