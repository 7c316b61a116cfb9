// Shapes, batches, targets and result names of the multi-adapter benchmark
// (UnitPool), shared by the CPU (bench_multi.cpp) and the GPU
// (bench_multi_cuda.cu) binary so both serve exactly the same batches. Plain
// C++17: no Eigen, no CUDA, no Google Benchmark, no rankwise.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace rankwise {
namespace bench {
namespace multi {

// ---- the shapes -------------------------------------------------------------

/// d_in = d_out (a 7B-class model's hidden size); one pool holds kAdapters
/// plain LoRA adapters of this module shape, each with alpha = kAlpha.
inline constexpr std::int64_t kDim = 4096;
inline constexpr double kAlpha = 16.0;
inline constexpr std::int64_t kAdapters = 64;
/// The rank every adapter is padded to for the flat (vLLM / Punica) layout.
inline constexpr std::int64_t kPaddedRank = 64;
/// The SMoRA adapter of the mixed batch: r = 64 units, top-8 per token, g = 1.
inline constexpr std::int64_t kSmoraRank = 64;
inline constexpr std::int64_t kSmoraTopK = 8;
inline constexpr double kSmoraAlpha = 16.0;
/// Plain-LoRA adapters in the plain half of a mixed batch.
inline constexpr std::int64_t kMixedLoraAdapters = 4;
/// The read-rate measurement reads this many bytes per call (a slab of a
/// rotation totalling >= 3x the last-level cache, so it comes from memory).
inline constexpr std::size_t kReadSlabBytes = std::size_t(8) << 20;

/// The adapters' ranks, drawn from {8, 16, 32, 64} with a fixed seed. Uses the
/// raw mt19937 output (its sequence is fixed by the standard; the
/// distributions' are not), so every platform draws the same ranks.
inline const std::vector<std::int64_t>& adapter_ranks() {
  static const std::vector<std::int64_t> ranks = [] {
    static const std::int64_t choices[] = {8, 16, 32, 64};
    std::mt19937 rng(20240610u);
    std::vector<std::int64_t> r(static_cast<std::size_t>(kAdapters));
    for (auto& v : r) v = choices[rng() % 4];
    return r;
  }();
  return ranks;
}
inline std::int64_t total_units() {
  std::int64_t s = 0;
  for (std::int64_t r : adapter_ranks()) s += r;
  return s;
}

/// Token counts N; distinct adapters T in a batch of N: {1, 4, 16, min(N, 64)}, T <= N.
inline const std::vector<std::int64_t>& token_counts(bool quick) {
  static const std::vector<std::int64_t> full{1, 16, 64, 256, 2048};
  static const std::vector<std::int64_t> small{1, 16};
  return quick ? small : full;
}
inline std::vector<std::int64_t> distinct_counts(std::int64_t n) {
  std::vector<std::int64_t> out;
  for (std::int64_t t :
       {std::int64_t(1), std::int64_t(4), std::int64_t(16), std::min<std::int64_t>(n, 64)}) {
    if (t <= n && std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
  }
  return out;
}
/// Token counts of the mixed batch (half plain LoRA over kMixedLoraAdapters, half SMoRA).
inline const std::vector<std::int64_t>& mixed_token_counts(bool quick) {
  static const std::vector<std::int64_t> full{16, 64, 256, 2048};
  static const std::vector<std::int64_t> small{16};
  return quick ? small : full;
}

/// Up to this N the timed calls also rotate over copies of every layer (pools
/// and LoRA layers): there the time is the weights' bytes, and the copies
/// together are >= 3x the cache, so they come from memory as they would in a
/// model of many layers. Larger batches reuse each unit over many tokens.
inline constexpr std::int64_t kRotateMaxTokens = 64;

// ---- batches ----------------------------------------------------------------------

/// One batch: each token's adapter (an index into the kAdapters plain
/// adapters, or kSmoraToken for the mixed batch's SMoRA adapter).
inline constexpr std::int32_t kSmoraToken = -2;
struct Batch {
  std::vector<std::int32_t> adapter;  // per token
};

namespace detail {
inline void shuffle(std::vector<std::int32_t>& v, std::mt19937& rng) {
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng() % i]);
}
inline std::vector<std::int32_t> permutation(std::mt19937& rng) {
  std::vector<std::int32_t> p(static_cast<std::size_t>(kAdapters));
  for (std::size_t i = 0; i < p.size(); ++i) p[i] = static_cast<std::int32_t>(i);
  shuffle(p, rng);
  return p;
}
// n tokens over `adapters`, each at least once (n >= their count), the rest
// uniform, in random order.
inline std::vector<std::int32_t> assign(std::int64_t n, const std::vector<std::int32_t>& adapters,
                                        std::mt19937& rng) {
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = i < adapters.size() ? adapters[i] : adapters[rng() % adapters.size()];
  }
  shuffle(tokens, rng);
  return tokens;
}
}  // namespace detail

/// The rotation of a case (N, T): kAdapters / T batches whose adapters
/// partition all kAdapters at random, so one pass over the rotation touches
/// every adapter once (a call never finds the previous calls' units in cache
/// merely because they were its own) and the mean over it is over all ranks.
inline std::vector<Batch> make_batches(std::int64_t n, std::int64_t t) {
  std::mt19937 rng(static_cast<unsigned>(1000003 * n + t));
  const std::vector<std::int32_t> perm = detail::permutation(rng);
  std::vector<Batch> out(static_cast<std::size_t>(kAdapters / t));
  for (std::size_t b = 0; b < out.size(); ++b) {
    const std::vector<std::int32_t> chosen(perm.begin() + static_cast<std::ptrdiff_t>(b * t),
                                           perm.begin() + static_cast<std::ptrdiff_t>((b + 1) * t));
    out[b].adapter = detail::assign(n, chosen, rng);
  }
  return out;
}

/// The mixed batches at N: the first N / 2 tokens' worth over
/// kMixedLoraAdapters plain adapters (the rotation partitions all of them),
/// the other half to the SMoRA adapter, interleaved at random.
inline std::vector<Batch> make_mixed_batches(std::int64_t n) {
  std::mt19937 rng(static_cast<unsigned>(7000003 * n + 17));
  const std::vector<std::int32_t> perm = detail::permutation(rng);
  const std::int64_t t = kMixedLoraAdapters;
  std::vector<Batch> out(static_cast<std::size_t>(kAdapters / t));
  for (std::size_t b = 0; b < out.size(); ++b) {
    const std::vector<std::int32_t> chosen(perm.begin() + static_cast<std::ptrdiff_t>(b * t),
                                           perm.begin() + static_cast<std::ptrdiff_t>((b + 1) * t));
    std::vector<std::int32_t> tokens = detail::assign(n / 2, chosen, rng);
    tokens.resize(static_cast<std::size_t>(n), kSmoraToken);
    detail::shuffle(tokens, rng);
    out[b].adapter = std::move(tokens);
  }
  return out;
}

/// Mean over the rotation of the units (ranks) of the distinct adapters a
/// batch of case (N, T) touches: every adapter once per rotation.
inline double mean_units(std::int64_t t) {
  return static_cast<double>(total_units()) * static_cast<double>(t) / kAdapters;
}

/// The floor's bytes: the touched units' A and Bᵀ rows, r (d_in + d_out)
/// values each, plus x and y once (y is also written; that is left out, so
/// the floor is a lower bound).
inline double floor_bytes(std::int64_t n, std::int64_t t, std::size_t elem) {
  return (mean_units(t) * 2.0 * kDim + 2.0 * static_cast<double>(n) * kDim) *
         static_cast<double>(elem);
}

// ---- targets (stated for the CPU backend) ---------------------------------------------

/// pool <= kLoopTarget x the per-adapter loop for T >= kLoopMinAdapters at
/// every N <= kLoopMaxTokens (">= 2x faster").
inline constexpr double kLoopTarget = 0.5;
inline constexpr std::int64_t kLoopMinAdapters = 4;
inline constexpr std::int64_t kLoopMaxTokens = 256;
/// pool <= kPaddedTarget x the rank-64-padded pool, every case.
inline constexpr double kPaddedTarget = 0.65;
/// pool <= kFloorTarget x the byte floor for N <= kFloorMaxTokens.
inline constexpr double kFloorTarget = 1.5;
inline constexpr std::int64_t kFloorMaxTokens = 64;
/// T = 1: pool <= kDirectTarget x Lora::forward on the whole batch.
inline constexpr double kDirectTarget = 1.1;
/// The mixed batch in one plan <= kMixedTarget x its two halves served separately.
inline constexpr double kMixedTarget = 1.1;

// ---- result names -------------------------------------------------------------------
// The report looks results up by these; they are also the Google Benchmark
// names, so --benchmark_filter works on them:
//   <backend>/multi_<what>/N:<N>/T:<T>   what: pool, plan, loop, blas (CPU), padded,
//                                        direct (T = 1)
//   <backend>/mixed_<what>/N:<N>         what: together, separate
//   <backend>/read                       kReadSlabBytes from memory

inline std::string case_key(const std::string& backend, const char* what, std::int64_t n,
                            std::int64_t t) {
  return backend + "/multi_" + what + "/N:" + std::to_string(n) + "/T:" + std::to_string(t);
}
inline std::string mixed_key(const std::string& backend, const char* what, std::int64_t n) {
  return backend + "/mixed_" + what + "/N:" + std::to_string(n);
}
inline std::string read_key(const std::string& backend) { return backend + "/read"; }

}  // namespace multi
}  // namespace bench
}  // namespace rankwise
