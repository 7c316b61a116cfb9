// Shapes, targets and result names of the LoRA benchmarks (bench_lora,
// bench_lora_cuda), so both backends measure exactly the same cases. Plain
// C++17: no Eigen, no CUDA, no Google Benchmark.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rankwise {
namespace bench {
namespace lora {

/// d_in = d_out of every benchmarked layer.
inline constexpr std::int64_t kDim = 4096;
/// LoRA alpha; the scale is alpha / r. Its value does not affect timings.
inline constexpr double kAlpha = 16.0;

/// Ranks r and token counts N; --quick keeps r = 8, N in {1, 16}.
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

/// Thread counts of the CPU runs: the delta, its OpenBLAS baseline, the read
/// bound and the large sgemm run at each (rankwise through CpuContext(t),
/// OpenBLAS through openblas_set_num_threads(t)); the other baselines on one.
inline const std::vector<int>& cpu_thread_counts() {
  static const std::vector<int> t{1, 2};
  return t;
}

/// Targets of the ratio table (stated for the CPU; the GPU shows the same checks):
///  * N >= kGemmTargetMinTokens: delta <= kGemmTarget x the GEMMs it consists of;
///  * N == 1: delta forward <= kReadTarget x the time to read A and B once.
inline constexpr std::int64_t kGemmTargetMinTokens = 256;
inline constexpr double kGemmTarget = 1.1;
inline constexpr double kReadTarget = 1.5;

/// Targets of the CPU thread tables (d = 4096, fp32), at every thread count:
///  * forward <= kBlasForwardTarget x the two cblas_sgemm, at every N;
///  * forward <= kFloorTarget x the floor for N <= kFloorMaxTokens;
///  * backward <= kBlasBackwardTarget x the five cblas_sgemm for N >= kBlasBackwardMinTokens;
///  * 2 threads >= kScalingTarget x the 1-thread speed for N >= kScalingMinTokens.
inline constexpr double kBlasForwardTarget = 1.0;
inline constexpr double kFloorTarget = 1.3;
inline constexpr std::int64_t kFloorMaxTokens = 16;
inline constexpr double kBlasBackwardTarget = 1.0;
inline constexpr std::int64_t kBlasBackwardMinTokens = 64;
inline constexpr double kScalingTarget = 1.8;
inline constexpr std::int64_t kScalingMinTokens = 64;

/// The floor's FLOP rate is OpenBLAS's on a square sgemm of this size,
/// measured in the same run.
inline constexpr std::int64_t kPeakGemmDim = 2048;
inline double peak_gemm_flops() {
  return 2.0 * static_cast<double>(kPeakGemmDim) * kPeakGemmDim * kPeakGemmDim;
}

/// FLOPs of the LoRA delta at n tokens: 2 GEMMs forward (4 n r d), 5 backward (10 n r d).
inline double delta_flops(bool backward, std::int64_t rank, std::int64_t n) {
  return (backward ? 10.0 : 4.0) * static_cast<double>(n) * rank * kDim;
}

/// Result-name prefix of the CPU runs at `threads` threads, e.g. "cpu_f32/t:2";
/// the GPU's prefix is the type alone ("cuda_f16").
inline std::string thread_prefix(const std::string& backend, int threads) {
  return backend + "/t:" + std::to_string(threads);
}

/// Names of the measurements; the tables and --benchmark_filter use them.
///   <prefix>/delta_fwd/r:<r>/N:<N>   rankwise forward, y += s x Aᵀ Bᵀ
///   <prefix>/delta_bwd/r:<r>/N:<N>   rankwise backward (dA, dB and dx)
///   <prefix>/gemm_fwd/r:<r>/N:<N>    the two raw GEMMs of the forward
///   <prefix>/gemm_bwd/r:<r>/N:<N>    the five raw GEMMs of the backward
///   <prefix>/blas_fwd/r:<r>/N:<N>    the same two as cblas_sgemm calls (OpenBLAS, CPU)
///   <prefix>/blas_bwd/r:<r>/N:<N>    the same five as cblas_sgemm calls
///   <prefix>/blas_sgemm/N:<n>        an n x n x n sgemm: OpenBLAS's large-GEMM rate
///   <prefix>/naive/r:<r>/N:<N>       ΔW = s B A materialised, then y += x ΔWᵀ
///   <prefix>/base/N:<N>              y = x W0ᵀ (d x d)
///   <prefix>/read/r:<r>              read A and B once (N = 1 bound)
inline std::string key(const std::string& prefix, const char* what, std::int64_t rank,
                       std::int64_t tokens) {
  std::string k = prefix + "/" + what;
  if (rank > 0) k += "/r:" + std::to_string(rank);
  if (tokens > 0) k += "/N:" + std::to_string(tokens);
  return k;
}

}  // namespace lora
}  // namespace bench
}  // namespace rankwise
