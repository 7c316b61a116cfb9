// Problem sizes and targets shared by the CPU and the GPU LoRA benchmarks, so
// both backends measure exactly the same shapes. Plain C++17: no Eigen, no
// CUDA, no Google Benchmark.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace rankwise {
namespace bench {

/// d_in = d_out of every benchmarked layer.
inline constexpr std::int64_t kDim = 4096;
/// LoRA alpha; the scale is alpha / r. Its value does not affect timings.
inline constexpr double kAlpha = 16.0;

/// Ranks r and token counts N of the full run.
inline const std::vector<std::int64_t>& ranks(bool quick) {
  static const std::vector<std::int64_t> full{8, 16, 64};
  static const std::vector<std::int64_t> small{8};
  return quick ? small : full;
}
inline const std::vector<std::int64_t>& token_counts(bool quick) {
  static const std::vector<std::int64_t> full{1, 4, 16, 64, 256, 2048};
  static const std::vector<std::int64_t> small{1, 16};
  return quick ? small : full;
}

/// Targets from the issue (stated for the CPU backend):
///  * N >= kGemmTargetMinTokens: delta <= kGemmTarget x the GEMMs it consists of;
///  * N == 1: delta <= kReadTarget x the time to read A and B once from memory.
inline constexpr std::int64_t kGemmTargetMinTokens = 256;
inline constexpr double kGemmTarget = 1.1;
inline constexpr double kReadTarget = 1.5;

/// At N = 1 the delta is a pair of matrix-vector products whose cost is
/// reading A and B. A and B (at most 2 MiB in fp32) fit in the last-level
/// cache, so each timed call uses the next of `rotation_copies` copies of
/// them, enough that the copies together are kRotationCacheMultiple times the
/// largest cache: every call then reads its A and B from DRAM (HBM on the GPU).
/// The read bound and the two-GEMM baseline rotate over the same copies.
inline constexpr std::size_t kRotationCacheMultiple = 3;
inline std::int64_t rotation_copies(std::size_t bytes_per_copy, std::size_t cache_bytes) {
  const std::size_t want = kRotationCacheMultiple * cache_bytes;
  const std::size_t copies = (want + bytes_per_copy - 1) / bytes_per_copy;
  return static_cast<std::int64_t>(copies < 2 ? 2 : copies);
}
/// Copies only where they matter: N = 1 (see above), or up to `max_tokens`
/// (the CPU bench: N <= 16, where its floor of bytes read from DRAM is a
/// target). For larger N the GEMMs reuse A and B across tokens and one copy is
/// used, like a real layer.
inline bool rotates(std::int64_t tokens, std::int64_t max_tokens = 1) {
  return tokens <= max_tokens;
}

/// Quick mode (smoke runs, CI): `--quick` on the command line (removed from
/// argv so Google Benchmark does not see it) or RANKWISE_BENCH_QUICK=1.
/// Restricts to ranks(true) x token_counts(true) and short minimum times.
inline bool take_quick_flag(int* argc, char** argv) {
  bool quick = false;
  int out = 1;
  for (int i = 1; i < *argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      argv[out++] = argv[i];
    }
  }
  *argc = out;
  if (const char* env = std::getenv("RANKWISE_BENCH_QUICK")) {
    if (env[0] != '\0' && std::strcmp(env, "0") != 0) quick = true;
  }
  return quick;
}

/// Google Benchmark flags this project's benchmarks default to, each added
/// only when the command line does not set that flag itself: repetitions with
/// random interleaving, so that a burst of load on a shared machine spreads
/// over the delta and its baselines alike, and medians in the table. The
/// returned vector owns the strings `argv_out` points into.
inline std::vector<std::string> with_default_flags(int argc, char** argv, bool quick,
                                                   std::vector<char*>* argv_out) {
  const std::vector<std::string> defaults =
      quick ? std::vector<std::string>{}
            : std::vector<std::string>{"--benchmark_repetitions=3",
                                       "--benchmark_enable_random_interleaving=true",
                                       "--benchmark_display_aggregates_only=true"};
  std::vector<std::string> args{argv[0]};
  for (const std::string& d : defaults) {
    const std::string flag = d.substr(0, d.find('=') + 1);
    bool given = false;
    for (int i = 1; i < argc; ++i) given = given || std::strncmp(argv[i], flag.c_str(), flag.size()) == 0;
    if (!given) args.push_back(d);
  }
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
  argv_out->clear();
  for (std::string& a : args) argv_out->push_back(&a[0]);
  argv_out->push_back(nullptr);
  return args;
}

/// Names of the measurements; the ratio tables look results up by these.
/// The CPU bench puts the thread count into the backend part, e.g.
/// "cpu_f32/t:2" (thread_report.hpp: thread_prefix).
///   <backend>/delta_fwd/r:<r>/N:<N>   rankwise forward, y += s x Aᵀ Bᵀ
///   <backend>/delta_bwd/r:<r>/N:<N>   rankwise backward (dA, dB and dx)
///   <backend>/gemm_fwd/r:<r>/N:<N>    the two raw GEMMs of the forward
///   <backend>/gemm_bwd/r:<r>/N:<N>    the five raw GEMMs of the backward
///   <backend>/blas_fwd/r:<r>/N:<N>    the same two as cblas_sgemm calls (OpenBLAS, CPU)
///   <backend>/blas_bwd/r:<r>/N:<N>    the same five as cblas_sgemm calls
///   <backend>/blas_sgemm/N:<n>        an n x n x n sgemm: OpenBLAS's large-GEMM rate
///   <backend>/naive/r:<r>/N:<N>       ΔW = s B A materialised, then y += x ΔWᵀ
///   <backend>/base/N:<N>              y = x W0ᵀ (d x d)
///   <backend>/read/r:<r>              read A and B once (N = 1 bound)
inline std::string key(const std::string& backend, const char* what, std::int64_t rank,
                       std::int64_t tokens) {
  std::string k = backend + "/" + what;
  if (rank > 0) k += "/r:" + std::to_string(rank);
  if (tokens > 0) k += "/N:" + std::to_string(tokens);
  return k;
}

}  // namespace bench
}  // namespace rankwise
