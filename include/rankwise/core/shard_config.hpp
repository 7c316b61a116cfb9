// Sizes of a MoS shard pool and the index lists of the layers that use it
// (Wang et al., "Mixture of Shards", arXiv 2410.00938).
#pragma once

#include <cmath>
#include <cstdint>

#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/error.hpp"

namespace rankwise {

/// One pool of A shards and one of B shards for a projection type (e.g. every
/// q_proj of a model), shared by its L layers.
///   M = v · L · l shards per pool; A shards have d_in / l values, B shards d_out / l.
///   Public shards [0, P0), P0 = (v − p) · L · l; layer i owns the private block
///   [P0 + i · p · l, P0 + (i + 1) · p · l).
/// Trainable parameters equal a rank-v LoRA in every layer: v · L · (d_in + d_out).
struct ShardPoolConfig {
  std::int64_t d_in = 0;
  std::int64_t d_out = 0;
  std::int64_t num_layers = 1;         // L
  std::int64_t equivalent_rank = 8;    // v
  std::int64_t private_rank = 1;       // p, private ranks per layer
  std::int64_t shards_per_vector = 2;  // l

  void validate() const {
    RANKWISE_CHECK(d_in > 0 && d_out > 0, "ShardPoolConfig: d_in and d_out must be positive, got ",
                   d_in, " and ", d_out);
    RANKWISE_CHECK(num_layers > 0, "ShardPoolConfig.num_layers (L) must be positive, got ",
                   num_layers);
    RANKWISE_CHECK(equivalent_rank > 0,
                   "ShardPoolConfig.equivalent_rank (v) must be positive, got ", equivalent_rank);
    RANKWISE_CHECK(private_rank >= 0 && private_rank <= equivalent_rank,
                   "ShardPoolConfig.private_rank (p) = ", private_rank,
                   " must be in [0, v = ", equivalent_rank, "]");
    RANKWISE_CHECK(shards_per_vector > 0,
                   "ShardPoolConfig.shards_per_vector (l) must be positive, got ",
                   shards_per_vector);
    RANKWISE_CHECK(d_in % shards_per_vector == 0 && d_out % shards_per_vector == 0,
                   "ShardPoolConfig: d_in = ", d_in, " and d_out = ", d_out,
                   " must both be divisible by shards_per_vector (l) = ", shards_per_vector);
    // Every count below is a product of these: refuse sizes it cannot hold.
    const std::int64_t shards =
        checked_mul(checked_mul(equivalent_rank, num_layers, "ShardPoolConfig: v · L"),
                    shards_per_vector, "ShardPoolConfig: v · L · l shards");
    checked_mul(shards, checked_add(shard_in(), shard_out(), "ShardPoolConfig: shard widths"),
                "ShardPoolConfig: pool elements");
  }

  std::int64_t num_shards() const { return equivalent_rank * num_layers * shards_per_vector; }
  std::int64_t public_shards() const {
    return (equivalent_rank - private_rank) * num_layers * shards_per_vector;
  }
  std::int64_t private_begin(std::int64_t layer) const {
    return public_shards() + layer * private_rank * shards_per_vector;
  }
  std::int64_t shard_in() const { return d_in / shards_per_vector; }
  std::int64_t shard_out() const { return d_out / shards_per_vector; }
  /// v · L · (d_in + d_out): the trainable parameters of the type.
  std::int64_t trainable_parameters() const { return num_shards() * (shard_in() + shard_out()); }
};

/// How a MoS layer uses its pool. The strategies can be switched off one at a
/// time to measure their effect:
///   subset_selection  on: draw the public shards at random; off: every layer
///                     takes the first (r − p) · l public shards (pure sharing)
///   pair_dissociation on: B's list is an independent draw; off: B uses A's list
///   vector sharding   shards_per_vector > 1 (pool setting)
///   privatization     private_rank > 0 (pool setting)
struct MosConfig {
  std::int64_t rank = 16;  // r, the rank each layer uses
  double alpha = 16.0;     // scale alpha / r
  bool subset_selection = true;
  bool pair_dissociation = true;
  std::uint64_t seed = 0;  // index lists are drawn from (seed, layer)

  double scale() const { return alpha / static_cast<double>(rank); }

  void validate(const ShardPoolConfig& pool) const {
    pool.validate();
    RANKWISE_CHECK(rank > 0, "MosConfig.rank (r) must be positive, got ", rank);
    RANKWISE_CHECK(std::isfinite(alpha), "MosConfig.alpha must be finite, got ", alpha);
    RANKWISE_CHECK(rank >= pool.private_rank, "MosConfig.rank (r) = ", rank,
                   " must be at least the pool's private_rank (p) = ", pool.private_rank);
    checked_mul(rank, pool.shards_per_vector, "MosConfig: index list length r · l");
    const std::int64_t public_needed = (rank - pool.private_rank) * pool.shards_per_vector;
    RANKWISE_CHECK(
        public_needed <= pool.public_shards(), "MosConfig: r − p = ", rank - pool.private_rank,
        " public ranks need ", public_needed,
        " public shards, but the pool has only P0 = (v − p) · L · l = ", pool.public_shards());
  }
};

}  // namespace rankwise
