// The one timer policy per backend, and what the benchmark bodies share
// around it. A body is written once, over Backend, and times its calls with
// BenchBackend<Backend> (cpu_backend.hpp: Google Benchmark's clock;
// cuda_backend.cuh: CUDA events on the context's stream, manual time):
//
//   kManualTime                          register with UseManualTime()
//   kCheckFinite                         the layers' check_finite (off on the GPU:
//                                        it reads a flag back, a synchronisation)
//   run(state, ctx, rotation, call, need, prep)
//       per sample of rotation.batch calls: first prep(i) for every call i of
//       the sample with need(i), off the clock; then call(i) on the clock. i
//       walks 0 .. rotation.copies - 1 and wraps. Times are per call.
//   run_host(state, ctx, rotation, call)  run() on the host's clock (host work
//                                         with uploads, e.g. a plan)
//   read(ctx, a, b)                      reads spans a and b once: the read rate
//                                        of the floors
//   cache_bytes()                        the cache a rotation must defeat (the
//                                        CPU's last level, the GPU's L2)
//   describe()                           one line on the machine and how it is timed
//
// No Eigen, no CUDA here.
#pragma once

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <exception>

namespace rankwise {
namespace bench {

template <class Backend>
struct BenchBackend;  // cpu_backend.hpp, cuda_backend.cuh

/// Which copy of a rotation each call uses, and how many calls a sample holds.
struct Rotation {
  std::int64_t copies = 1;  // call(i) for i = 0 .. copies - 1, then from 0 again
  std::int64_t batch = 1;   // calls per timed sample (on the GPU, per pair of events)
};

/// Nothing to prepare: run()'s default need.
struct Never {
  bool operator()(std::int64_t) const { return false; }
};
struct Always {
  bool operator()(std::int64_t) const { return true; }
};
struct NoPrep {
  void operator()(std::int64_t) const {}
};

/// Bytes for BenchBackend::read.
struct Span {
  const void* data = nullptr;
  std::size_t bytes = 0;
};

/// Small working sets (weights of a few MiB) fit in the last-level cache;
/// a benchmark that must read them from memory rotates over
/// rotation_copies(bytes, cache) copies of them, enough that the copies
/// together are kRotationCacheMultiple times the cache.
inline constexpr std::size_t kRotationCacheMultiple = 3;
inline std::int64_t rotation_copies(std::size_t bytes_per_copy, std::size_t cache_bytes) {
  const std::size_t want = kRotationCacheMultiple * cache_bytes;
  const std::size_t copies = (want + bytes_per_copy - 1) / bytes_per_copy;
  return static_cast<std::int64_t>(copies < 2 ? 2 : copies);
}

/// MinTime, a unit that suits n tokens, and manual time where the backend
/// times with events. On the CPU, `real_time` makes wall time pick the
/// iteration count (UseRealTime; Google Benchmark then appends "/real_time"
/// to the name, so a benchmark keeps whichever its recorded names have).
template <class Backend>
benchmark::internal::Benchmark* configure(benchmark::internal::Benchmark* b, double min_time,
                                          std::int64_t n, bool real_time = false) {
  b->MinTime(min_time)->Unit(n >= 256 ? benchmark::kMillisecond : benchmark::kMicrosecond);
  if (BenchBackend<Backend>::kManualTime) b->UseManualTime();
  else if (real_time) b->UseRealTime();
  return b;
}

/// Runs `body`; a rankwise::error or CUDA failure marks the benchmark failed
/// (its cells show "-", the summary prints it as "benchmark error:") and the
/// run goes on.
template <class F>
void guarded(benchmark::State& state, F&& body) {
  try {
    body();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

}  // namespace bench
}  // namespace rankwise
