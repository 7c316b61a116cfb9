// The frozen index lists of a MoS layer: which pool shards build its A and B.
#pragma once

#include <cstdint>
#include <vector>

#include "rankwise/core/error.hpp"
#include "rankwise/core/random.hpp"
#include "rankwise/core/shard_config.hpp"

namespace rankwise {

/// I_a and I_b, each r · l shard indices: unit j's vector is the concatenation
/// of shards list[j · l + s], s = 0..l−1.
struct ShardIndices {
  std::vector<std::int32_t> a;
  std::vector<std::int32_t> b;
};

namespace detail {

// The first `count` entries of a seeded Fisher–Yates shuffle of [0, range):
// a draw without replacement.
inline std::vector<std::int32_t> draw_without_replacement(std::int64_t range, std::int64_t count,
                                                          std::uint64_t seed) {
  std::vector<std::int32_t> pool(static_cast<std::size_t>(range));
  for (std::int64_t i = 0; i < range; ++i) pool[i] = static_cast<std::int32_t>(i);
  for (std::int64_t i = 0; i < count; ++i) {
    const auto span = static_cast<double>(range - i);
    auto pick =
        i + static_cast<std::int64_t>(uniform01(seed, static_cast<std::uint64_t>(i)) * span);
    if (pick >= range) pick = range - 1;  // guards the rounding of u * span up to span
    std::swap(pool[i], pool[pick]);
  }
  pool.resize(static_cast<std::size_t>(count));
  return pool;
}

}  // namespace detail

/// Draws layer `layer`'s lists as MoS does: (r − p) · l public shards without
/// replacement, then the layer's private block; I_b independently (pair
/// dissociation) or equal to I_a. Same (config, layer) → same lists.
inline ShardIndices draw_shard_indices(const ShardPoolConfig& pool, const MosConfig& config,
                                       std::int64_t layer) {
  config.validate(pool);
  RANKWISE_CHECK(layer >= 0 && layer < pool.num_layers, "draw_shard_indices: layer ", layer,
                 " is outside [0, L = ", pool.num_layers, ")");
  const std::int64_t l = pool.shards_per_vector;
  const std::int64_t public_count = (config.rank - pool.private_rank) * l;
  auto draw = [&](std::uint64_t which) {
    std::vector<std::int32_t> list;
    if (config.subset_selection) {
      list = detail::draw_without_replacement(
          pool.public_shards(), public_count,
          substream(config.seed, static_cast<std::uint64_t>(layer) * 2 + which));
    } else {
      for (std::int64_t i = 0; i < public_count; ++i) list.push_back(static_cast<std::int32_t>(i));
    }
    for (std::int64_t i = 0; i < pool.private_rank * l; ++i) {
      list.push_back(static_cast<std::int32_t>(pool.private_begin(layer) + i));
    }
    return list;
  };
  ShardIndices out;
  out.a = draw(0);
  out.b = config.pair_dissociation ? draw(1) : out.a;
  return out;
}

/// Checks user-supplied lists: each of length r · l with every index in [0, M).
/// Throws rankwise::error naming the list, the position and the bound.
inline void check_shard_indices(const ShardPoolConfig& pool, const MosConfig& config,
                                const ShardIndices& indices) {
  config.validate(pool);
  const std::int64_t length = config.rank * pool.shards_per_vector;
  const std::int64_t shards = pool.num_shards();
  auto check = [&](const std::vector<std::int32_t>& list, const char* name) {
    RANKWISE_CHECK(static_cast<std::int64_t>(list.size()) == length, "shard indices ", name,
                   ": expected r · l = ", config.rank, " · ", pool.shards_per_vector, " = ", length,
                   " entries, got ", list.size());
    for (std::size_t i = 0; i < list.size(); ++i) {
      RANKWISE_CHECK(list[i] >= 0 && list[i] < shards, "shard indices ", name, "[", i,
                     "] = ", list[i], " is outside the pool's [0, M = ", shards, ")");
    }
  };
  check(indices.a, "I_a");
  check(indices.b, "I_b");
}

}  // namespace rankwise
