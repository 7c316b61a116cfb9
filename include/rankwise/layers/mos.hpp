// MoS: a LoRA layer whose A and B are assembled from shards of pools shared
// across layers (Wang et al., "Mixture of Shards", arXiv 2410.00938).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/parameter.hpp"
#include "rankwise/core/shard_config.hpp"
#include "rankwise/core/shard_indices.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/detail/owned_workspace.hpp"
#include "rankwise/layers/layer.hpp"
#include "rankwise/layers/mos_ops.hpp"
#include "rankwise/layers/shard_pool.hpp"

namespace rankwise {

/// Layer `layer` of L: y += (alpha / r) · B A x, where unit j's a_j is the
/// concatenation of the l shards A_pool[I_a[j·l + s]] (b_j likewise from
/// B_pool with I_b). Gradients are added into the pool's gradients. The pool
/// must outlive the layer. The algorithm is mos_forward / mos_backward
/// (layers/mos_ops.hpp); the layer owns the index tables and a workspace.
/// Follows the layer concept (layers/layer.hpp) with kOwnsParameters = false:
/// the trainable tensors are the pool's (ShardPool::parameters(), zero_grad()),
/// and the layer's state is its index lists.
template <class T, class Backend>
class Mos {
 public:
  using value_type = T;
  using backend_type = Backend;
  using Kernels = rankwise::Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  static constexpr bool kOwnsParameters = false;

  /// Index lists drawn from (config.seed, layer) as MoS does.
  Mos(ShardPool<T, Backend>& pool, std::int64_t layer, const MosConfig& config,
      ShardPath path = ShardPath::kAuto)
      : Mos(pool, layer, config, draw_shard_indices(pool.config(), config, layer), path) {}

  /// Index lists supplied by the caller, checked for length and range.
  Mos(ShardPool<T, Backend>& pool, std::int64_t layer, const MosConfig& config,
      ShardIndices indices, ShardPath path = ShardPath::kAuto)
      : pool_(&pool),
        ctx_(&pool.context()),
        layer_(layer),
        config_(validated(pool.config(), layer, config)),
        path_(path),
        indices_(std::move(indices)),
        tables_(pool.context(), pool.config(), config_, indices_) {}

  const MosConfig& config() const { return config_; }
  const ShardIndices& indices() const { return indices_; }
  std::int64_t layer() const { return layer_; }
  double scale() const { return config_.scale(); }

  /// Which path a call with n tokens takes.
  ShardPath path_for(std::int64_t n) const { return resolve_shard_path<Backend, T>(path_, n); }

  /// y (n x d_out) += (alpha / r) · B A x for x (n x d_in). Both modes
  /// compute the same: backward needs only x.
  void forward(MatrixView<const T> x, MatrixView<T> y, Mode = Mode::kInference) {
    const ShardPoolConfig& pc = pool_->config();
    workspace_.reserve(mos_forward_workspace_bytes<Backend, T>(pc, config_, rows_of(x), path_));
    mos_forward<Backend, T>(*ctx_, pc, config_, pool_->a(), pool_->b(), tables_.tables(), x, y,
                            path_, workspace_.data(), workspace_.bytes());
  }

  /// Adds this layer's gradients into the pool's grad_a() / grad_b() and,
  /// when dx (n x d_in) is given, dx += ∂L/∂x. dy is (n x d_out). Always
  /// accumulating, whatever `accumulate` says: the shards are shared by every
  /// layer of the pool, so overwriting would drop the others' gradients; the
  /// pool's zero_grad() starts a step.
  void backward(MatrixView<const T> x, MatrixView<const T> dy, MatrixView<T> dx = {},
                [[maybe_unused]] bool accumulate = true) {
    const ShardPoolConfig& pc = pool_->config();
    workspace_.reserve(mos_backward_workspace_bytes<Backend, T>(pc, config_, rows_of(x), path_));
    mos_backward<Backend, T>(*ctx_, pc, config_, pool_->a(), pool_->b(), tables_.tables(), x, dy,
                             dx, pool_->grad_a(), pool_->grad_b(), path_, workspace_.data(),
                             workspace_.bytes());
  }

  /// The layer's A (r x d_in) and B (d_out x r) in PEFT layout, assembled
  /// from the pool: what a plain LoRA export of this layer holds.
  void get_a(MatrixView<T> a_out) { assemble(a_out, {}); }
  void get_b(MatrixView<T> b_out) { assemble({}, b_out); }

  /// None of its own: the pool's are listed, counted and zeroed once, by the
  /// pool, for all its layers.
  std::vector<ParameterRef<T>> parameters() { return {}; }
  std::int64_t num_parameters() const { return 0; }
  void zero_grad() {}

  /// State: the index lists "mos_indices_A" and "mos_indices_B" (r · l each),
  /// the keys (after the module name) of the MoS adapter files (io/mos_adapter.hpp).
  TensorMap state() const {
    TensorMap out;
    out["mos_indices_A"] = index_tensor(indices_.a);
    out["mos_indices_B"] = index_tensor(indices_.b);
    return out;
  }

  /// Loads what state() saved: every entry an integer in the pool's [0, M);
  /// throws naming the key and entry, and leaves the layer as it was.
  void load_state(const TensorMap& map) {
    const std::int64_t length =
        checked_mul(config_.rank, pool_->config().shards_per_vector, "Mos: index lists r · l");
    ShardIndices in;
    in.a = index_list(require_tensor(map, "mos_indices_A", {length}), "mos_indices_A");
    in.b = index_list(require_tensor(map, "mos_indices_B", {length}), "mos_indices_B");
    MosTableBuffers<Backend> tables(*ctx_, pool_->config(), config_, in);  // checks the range
    tables_ = std::move(tables);
    indices_ = std::move(in);
  }

 private:
  static const MosConfig& validated(const ShardPoolConfig& pc, std::int64_t layer,
                                    const MosConfig& config) {
    RANKWISE_CHECK(layer >= 0 && layer < pc.num_layers, "Mos: layer ", layer,
                   " is outside [0, L = ", pc.num_layers, ")");
    config.validate(pc);
    // Every size the layer allocates later, checked once here: the index
    // lists (r · l) and the assembled A (r x d_in) and B (d_out x r).
    checked_mul(config.rank, pc.shards_per_vector, "Mos: index lists r · l");
    checked_elements(config.rank, pc.d_in, "Mos: assembled A (r x d_in)");
    checked_elements(config.rank, pc.d_out, "Mos: assembled B (d_out x r)");
    return config;
  }

  // Tokens to size the workspace for; a negative count is left for the op's
  // view check to refuse, naming x.
  static std::int64_t rows_of(const MatrixView<const T>& x) {
    return std::max<std::int64_t>(x.rows, 0);
  }

  static HostTensor index_tensor(const std::vector<std::int32_t>& list) {
    return {{static_cast<std::int64_t>(list.size())},
            std::vector<double>(list.begin(), list.end())};
  }

  // Integers only; the range is the tables' check.
  static std::vector<std::int32_t> index_list(const HostTensor& t, const char* key) {
    std::vector<std::int32_t> out(t.values.size());
    for (std::size_t i = 0; i < out.size(); ++i) {
      const double v = t.values[i];
      RANKWISE_CHECK(std::isfinite(v) && v == std::floor(v) && std::abs(v) < 2147483648.0,
                     "Mos::load_state: \"", key, "\"[", i, "] = ", v,
                     " is not an int32 shard index");
      out[i] = static_cast<std::int32_t>(v);
    }
    return out;
  }

  void assemble(MatrixView<T> a_out, MatrixView<T> b_out) {
    const ShardPoolConfig& pc = pool_->config();
    workspace_.reserve(mos_assemble_workspace_bytes<Backend, T>(pc, config_));
    mos_assemble<Backend, T>(*ctx_, pc, config_, pool_->a(), pool_->b(), tables_.tables(), a_out,
                             b_out, workspace_.data(), workspace_.bytes());
  }

  ShardPool<T, Backend>* pool_;
  Context<Backend>* ctx_;
  std::int64_t layer_;
  MosConfig config_;
  ShardPath path_;
  ShardIndices indices_;  // host copy, saved with the adapter
  MosTableBuffers<Backend> tables_;
  detail::OwnedWorkspace<Backend> workspace_;
};

}  // namespace rankwise
