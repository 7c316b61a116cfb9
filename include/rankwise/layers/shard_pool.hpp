// MoS shard pools: the A and B shards one projection type shares across layers.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/parameter.hpp"
#include "rankwise/core/random.hpp"
#include "rankwise/core/shard_config.hpp"

namespace rankwise {

/// A pool (M x d_in / l) and B pool (M x d_out / l), rows are shards, with
/// their gradients. Layers (Mos) read shards through their index lists and
/// add their gradients into grad_a() / grad_b(), so a shard used by several
/// layers receives the sum; call zero_grad() once per step.
template <class T, class Backend>
class ShardPool {
 public:
  using Kernels = rankwise::Kernels<Backend, T>;

  ShardPool(Context<Backend>& ctx, const ShardPoolConfig& config)
      : ctx_(&ctx),
        config_(validated(config)),
        a_(checked_elements(config.num_shards(), config.shard_in(),
                            "ShardPool: A shards (M x d_in/l)")),
        b_(checked_elements(config.num_shards(), config.shard_out(),
                            "ShardPool: B shards (M x d_out/l)")),
        grad_a_(a_.size()),
        grad_b_(b_.size()) {
    Kernels::fill(ctx, a(), 0.0);
    Kernels::fill(ctx, b(), 0.0);
    zero_grad();
  }

  const ShardPoolConfig& config() const { return config_; }
  Context<Backend>& context() { return *ctx_; }

  /// A shards ~ U(±1/sqrt(d_in)) (the bound of the assembled A), B shards = 0.
  void init(std::uint64_t seed) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(config_.d_in));
    Kernels::fill_uniform(*ctx_, a(), -bound, bound, substream(seed, 0));
    Kernels::fill(*ctx_, b(), 0.0);
  }

  void zero_grad() {
    Kernels::fill(*ctx_, grad_a(), 0.0);
    Kernels::fill(*ctx_, grad_b(), 0.0);
  }

  MatrixView<T> a() { return a_.view(config_.num_shards(), config_.shard_in()); }
  MatrixView<T> b() { return b_.view(config_.num_shards(), config_.shard_out()); }
  MatrixView<T> grad_a() { return grad_a_.view(config_.num_shards(), config_.shard_in()); }
  MatrixView<T> grad_b() { return grad_b_.view(config_.num_shards(), config_.shard_out()); }

  /// Trainable tensors: "shards_A" (M x d_in/l) and "shards_B" (M x d_out/l).
  std::vector<ParameterRef<T>> parameters() {
    return {{"shards_A", a(), grad_a()}, {"shards_B", b(), grad_b()}};
  }
  std::int64_t num_parameters() const { return config_.trainable_parameters(); }
  /// The dense LoRA rank with the same trainable parameters per layer: v.
  std::int64_t equivalent_rank() const { return config_.equivalent_rank; }

 private:
  // Validates c and its shard count M = v · L · l, which must fit the int32
  // shard indices, before num_shards() is used in any size.
  static const ShardPoolConfig& validated(const ShardPoolConfig& c) {
    c.validate();
    const std::int64_t shards =
        checked_mul(checked_mul(c.equivalent_rank, c.num_layers, "ShardPool: M = v · L · l"),
                    c.shards_per_vector, "ShardPool: M = v · L · l");
    RANKWISE_CHECK(shards <= std::numeric_limits<std::int32_t>::max(),
                   "ShardPool: M = v · L · l = ", c.equivalent_rank, " · ", c.num_layers, " · ",
                   c.shards_per_vector, " = ", shards,
                   " shards exceeds the int32 shard indices (max ",
                   std::numeric_limits<std::int32_t>::max(), ")");
    return c;
  }

  Context<Backend>* ctx_;
  ShardPoolConfig config_;
  Buffer<Backend, T> a_;       // (M, d_in / l)
  Buffer<Backend, T> b_;       // (M, d_out / l)
  Buffer<Backend, T> grad_a_;  // (M, d_in / l)
  Buffer<Backend, T> grad_b_;  // (M, d_out / l)
};

}  // namespace rankwise
