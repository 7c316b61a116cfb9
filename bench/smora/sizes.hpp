// Problem sizes, targets and result names of the SMoRA benchmarks, shared by
// the CPU (bench_smora.cpp) and the GPU (bench_smora_cuda.cu) benchmark so
// both measure exactly the same shapes. Plain C++17 plus the backend-neutral
// rankwise headers (and support/backend.hpp): no Eigen, no CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <rankwise/layers/rank_units.hpp>
#include <string>
#include <utility>
#include <vector>

#include "support/backend.hpp"  // rotation_copies

namespace rankwise {
namespace bench {
namespace smora {

// ---- the shapes ---------------------------------------------------------

/// d_in = d_out (as in the LoRA bench), total rank r and top-k of SMoRA.
inline constexpr std::int64_t kDim = 4096;
inline constexpr std::int64_t kRank = 64;
inline constexpr std::int64_t kTopK = 8;
/// SMoRA's alpha (scale alpha / k); LoRA baselines use kAlpha (scale alpha / r).
/// Neither affects the timings.
inline constexpr double kSmoraAlpha = 16.0;
inline constexpr double kAlpha = 16.0;

/// Group sizes g (E = r / g experts) and token counts N of the layer table.
inline const std::vector<std::int64_t>& groups() {
  static const std::vector<std::int64_t> g{1, 8};
  return g;
}
inline const std::vector<std::int64_t>& token_counts(bool quick) {
  static const std::vector<std::int64_t> full{1, 4, 16, 256, 2048};
  static const std::vector<std::int64_t> small{1, 16};
  return quick ? small : full;
}
/// The dense LoRA baselines: rank 64 (same r) and rank 8 (same k).
inline const std::vector<std::int64_t>& lora_ranks() {
  static const std::vector<std::int64_t> r{64, 8};
  return r;
}

inline const std::vector<RankUnitPath>& paths() {
  static const std::vector<RankUnitPath> p{RankUnitPath::kSparse, RankUnitPath::kDense,
                                           RankUnitPath::kAuto};
  return p;
}
inline const char* path_name(RankUnitPath p) {
  switch (p) {
    case RankUnitPath::kSparse:
      return "sparse";
    case RankUnitPath::kDense:
      return "dense";
    default:
      return "auto";
  }
}

// ---- targets (stated for the CPU backend) --------------------------------------------

/// SMoRA (the layer as shipped, path kAuto) <= 1.1x the dense rank-64 LoRA at
/// every N, backward, and forward where forward_target says no less.
inline constexpr double kMaxVsLora64 = 1.1;
/// Forward, SMoRA / the dense rank-64 LoRA: g = 1 <= 0.6x for N <= 4 and
/// <= 0.9x at every larger N; g = 8 (block MoE-LoRA, the k = 8 ranks of 1
/// expert in 8) <= 0.3x for N <= 16.
inline double forward_target(std::int64_t g, std::int64_t n) {
  if (g == 1) return n <= 4 ? 0.6 : 0.9;
  if (g == 8 && n <= 16) return 0.3;
  return kMaxVsLora64;
}
/// The N = 1 byte bound: SMoRA reads the router (E x d) and k rows of A and
/// of Bᵀ; dense rank-r LoRA reads all of A and Bᵀ (2 r d). g = 1: 0.625, g = 8: 0.1875.
inline double n1_byte_bound(std::int64_t g) {
  const double experts = static_cast<double>(kRank / g);
  return (experts + 2.0 * kTopK) / (2.0 * kRank);
}

// ---- the crossover grid (kSparse vs kDense of rank_units_forward/backward) ------------

struct UnitShape {
  std::int64_t k, r;
};
inline const std::vector<std::int64_t>& crossover_dims(bool quick) {
  static const std::vector<std::int64_t> full{4096, 1024};
  static const std::vector<std::int64_t> small{1024};
  return quick ? small : full;
}
inline const std::vector<UnitShape>& crossover_shapes(bool quick) {
  // The four (r / k = 8, 4, 16, 2), then r / k = 2 at r = 64 and
  // k = r: LoRA-LEGO and MoS run the rank units with every unit active and
  // ask prefer_dense(n, r, r).
  static const std::vector<UnitShape> full{{8, 64},  {16, 64}, {4, 64}, {8, 16},
                                           {32, 64}, {16, 16}, {64, 64}};
  static const std::vector<UnitShape> small{{8, 64}};
  return quick ? small : full;
}
inline const std::vector<std::int64_t>& crossover_tokens(bool quick) {
  static const std::vector<std::int64_t> full{1, 4, 16, 32, 64, 128, 256, 512, 2048};
  static const std::vector<std::int64_t> small{1, 64};
  return quick ? small : full;
}

// ---- result names -------------------------------------------------------------------------
// The report looks results up by these; they are also the Google Benchmark names,
// so --benchmark_filter works on them (the CPU bench's <backend> names the
// thread count too, e.g. cpu_f32/t:2):
//   <backend>/smora_<fwd|bwd>/g:<g>/<path>/N:<N>/<cached|uncached>
//   <backend>/lora_<fwd|bwd>/r:<r>/N:<N>/<cached|uncached>
//   <backend>/blas_<fwd|bwd>/r:<r>/N:<N>/<cached|uncached>      (CPU: OpenBLAS)
//   <backend>/units_<fwd|bwd>/d:<d>/k:<k>/r:<r>/<path>/N:<N>      (crossover)

inline const char* cache_name(bool uncached) { return uncached ? "uncached" : "cached"; }
inline const char* dir_name(bool backward) { return backward ? "bwd" : "fwd"; }

inline std::string smora_key(const std::string& backend, bool backward, std::int64_t g,
                             RankUnitPath path, std::int64_t n, bool uncached) {
  return backend + "/smora_" + dir_name(backward) + "/g:" + std::to_string(g) + "/" +
         path_name(path) + "/N:" + std::to_string(n) + "/" + cache_name(uncached);
}
inline std::string lora_key(const std::string& backend, bool backward, std::int64_t r,
                            std::int64_t n, bool uncached) {
  return backend + "/lora_" + dir_name(backward) + "/r:" + std::to_string(r) +
         "/N:" + std::to_string(n) + "/" + cache_name(uncached);
}
/// The dense LoRA-r forward or backward as a user without rankwise writes it:
/// the cblas_sgemm calls (OpenBLAS; CPU only), on the rank-r LoRA's memory.
inline std::string blas_key(const std::string& backend, bool backward, std::int64_t r,
                            std::int64_t n, bool uncached) {
  return backend + "/blas_" + dir_name(backward) + "/r:" + std::to_string(r) +
         "/N:" + std::to_string(n) + "/" + cache_name(uncached);
}
inline std::string units_key(const std::string& backend, bool backward, std::int64_t d, UnitShape s,
                             const std::string& path, std::int64_t n) {
  return backend + "/units_" + dir_name(backward) + "/d:" + std::to_string(d) +
         "/k:" + std::to_string(s.k) + "/r:" + std::to_string(s.r) + "/" + path +
         "/N:" + std::to_string(n);
}

/// Bytes of A and Bᵀ of a rank-r LoRA: all of them are read by every forward.
inline std::size_t lora_weight_bytes(std::int64_t r, std::size_t elem) {
  return static_cast<std::size_t>(2 * r * kDim) * elem;
}

}  // namespace smora
}  // namespace bench
}  // namespace rankwise
