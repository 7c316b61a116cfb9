// When to take which of two equivalent code paths, per backend: the kernel
// contract (kernels_decl.hpp) says what a backend computes, a tuning policy
// which path a kAuto call takes. The crossovers live here, apart from the
// kernels, so that a user can replace them without touching a backend.
#pragma once

#include <cstdint>

#include "rankwise/backend/tags.hpp"

namespace rankwise {

/// rankwise's measured (or, where no device was available, guessed)
/// crossovers. Every policy provides:
///   prefer_dense(n, k, r)          rank units: the dense path (two GEMMs over
///                                  all r units, gates as a mask) for n tokens
///                                  routed to k of r units (RankUnitPath::kAuto)
///   prefer_assembled_shards(n)     MoS: assemble A and B first, then GEMMs
///                                  (ShardPath::kAuto)
///   prefer_segmented(tokens)       unit pool: an adapter with this many tokens
///                                  in the batch goes through the backend's
///                                  segment kernels (where it has them)
template <class Backend>
struct DefaultTuning;

template <>
struct DefaultTuning<CpuBackend> {
  /// The dense path does r / k times the arithmetic of the gathers at about
  /// 2.4x their rate, so it wins when every unit is used (k >= r), at any
  /// token count. Fitted with bench_smora --crossover over k/r in {4..64}/64,
  /// 8/16, 16/16 and N in 1..2048 (bench/results/cpu-2026-11-26-smora-crossover.md):
  /// on the default build 1.001x the best path on average, 1.17x at worst.
  static bool prefer_dense(std::int64_t n, std::int64_t k, std::int64_t r) {
    return n >= kDenseMinTokens && k * kDenseRatio >= r;
  }
  static constexpr std::int64_t kDenseMinTokens = 1;
  static constexpr std::int64_t kDenseRatio = 1;

  /// The direct path's gathers run as GEMMs over the shared shard rows
  /// (broadcast units), so reading shards in place is never slower than
  /// assembling A and B first (bench_mos, bench/results/cpu-2026-11-26-mos.md).
  static bool prefer_assembled_shards(std::int64_t /*n*/) { return false; }

  /// The CPU has no segment kernels: each adapter's tokens go through gemm,
  /// which reads its units once for all of its tokens.
  static bool prefer_segmented(std::int64_t /*tokens*/) { return false; }
};

template <>
struct DefaultTuning<CudaBackend> {
  /// The gathers are bound by the bytes of the k selected rows, cuBLAS by all
  /// r; dense pays off once many tokens share the weights. Not yet measured on
  /// a GPU (no device in the sessions so far): a conservative guess.
  static bool prefer_dense(std::int64_t n, std::int64_t k, std::int64_t r) {
    return n >= 256 && k * 8 >= r;
  }

  /// Assemble A and B (then cuBLAS) once tokens are many; a guess as above.
  static bool prefer_assembled_shards(std::int64_t n) { return n >= 64; }

  /// Few tokens: the segment kernels (each token reads its units, from L2
  /// after the first); more, and one GEMM per adapter that reads them once
  /// pays for its launches. Not measured yet.
  static bool prefer_segmented(std::int64_t tokens) { return tokens <= 32; }
};

/// The policy the layers consult. To override, specialise it before the first
/// use of a layer in the translation unit (and the same way in every one):
///
///   namespace rankwise {
///   template <>
///   struct TuningPolicy<CpuBackend> : DefaultTuning<CpuBackend> {
///     static bool prefer_dense(std::int64_t n, std::int64_t k, std::int64_t r) { ... }
///   };
///   }
template <class Backend>
struct TuningPolicy : DefaultTuning<Backend> {};

}  // namespace rankwise
