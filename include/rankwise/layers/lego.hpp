// The LoRA-LEGO merged adapter as a layer: its k rank units (cluster
// centroids) with a gate each from the reweightings, applied to every token
// through the shared rank-unit kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/parameter.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/detail/owned_workspace.hpp"
#include "rankwise/detail/peft_state.hpp"
#include "rankwise/layers/layer.hpp"
#include "rankwise/layers/rank_units.hpp"

namespace rankwise {

/// y += Σ_j gate_j · b_j (a_j · x) over the k merged units (scale 1).
/// State: "lora_A" (k x d_in), "lora_B" (d_out x k), "gates" (k), as written
/// by merge::LegoResult::to_tensors(). Trainable: A and B (fine-tuning the
/// merge); the gates are state. Follows the layer concept (layers/layer.hpp).
template <class T, class Backend>
class Lego {
 public:
  using value_type = T;
  using backend_type = Backend;
  using Kernels = rankwise::Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  static constexpr bool kOwnsParameters = true;

  Lego(Context<Backend>& ctx, std::int64_t d_in, std::int64_t d_out, std::int64_t rank,
       RankUnitPath path = RankUnitPath::kAuto)
      : ctx_(&ctx), d_in_(d_in), d_out_(d_out), rank_(rank), path_(path) {
    RANKWISE_CHECK(d_in > 0 && d_out > 0 && rank > 0,
                   "Lego: d_in, d_out and rank must be positive, got ", d_in, ", ", d_out, ", ",
                   rank);
    RANKWISE_CHECK(rank <= std::numeric_limits<std::int32_t>::max(), "Lego: rank ", rank,
                   " exceeds the int32 unit indices (max ",
                   std::numeric_limits<std::int32_t>::max(), ")");
    a_.resize(checked_elements(rank, d_in, "Lego: A (k x d_in)"));
    bt_.resize(checked_elements(rank, d_out, "Lego: B (d_out x k)"));
    grad_a_.resize(a_.size());
    grad_bt_.resize(bt_.size());
    gates_.resize(rank);
    units_.resize(rank);
    std::vector<std::int32_t> all(static_cast<std::size_t>(rank));
    for (std::int64_t j = 0; j < rank; ++j) all[j] = static_cast<std::int32_t>(j);
    Kernels::upload_indices(ctx, all.data(), units_.view(1, rank));
    Kernels::fill(ctx, a(), 0.0);
    Kernels::fill(ctx, bt(), 0.0);
    rankwise::Kernels<Backend, Acc>::fill(ctx, gates_.view(1, rank), 1.0);
    zero_grad();
  }

  std::int64_t rank() const { return rank_; }
  /// Chooses the rank-unit path for later calls (kAuto: the backend's crossover).
  void set_path(RankUnitPath path) { path_ = path; }

  /// State: "lora_A" (k x d_in), "lora_B" (d_out x k), "gates" (k).
  TensorMap state() {
    TensorMap out;
    detail::save_lora_factors<Backend, T>(*ctx_, a(), bt(), out);
    out["gates"] = detail::download_state<Backend, Acc>(*ctx_, gates(), {rank_});
    return out;
  }

  /// Loads "lora_A", "lora_B" and "gates"; throws naming a missing key or shape.
  void load_state(const TensorMap& map) {
    const detail::LoraFactorState factors(map, rank_, d_in_, d_out_);
    const HostTensor& g_in = require_tensor(map, "gates", {rank_});
    factors.load<Backend, T>(*ctx_, a(), bt());
    detail::upload_state<Backend, Acc>(*ctx_, g_in, gates());
  }

  /// y (n x d_out) += Σ_j gate_j b_j (a_j · x) for x (n x d_in). Both modes
  /// compute the same: backward needs only x.
  void forward(MatrixView<const T> x, MatrixView<T> y, Mode = Mode::kInference) {
    // Shapes first, so a bad x or y throws before the workspace grows for it.
    check_view(x, "x (n x d_in)", x.rows, d_in_, Backend::kMemorySpace);
    check_view(y, "y (n x d_out)", x.rows, d_out_, Backend::kMemorySpace);
    workspace_.reserve(rank_units_forward_workspace_bytes<T>(x.rows, rank_, rank_));
    rank_units_forward<Backend, T>(*ctx_, 1.0, x, a(), bt(), routing(x.rows), y, path_,
                                   workspace_.data(), workspace_.bytes());
  }

  /// Gradients wrt the merged units (grad_a(), grad_bt(): overwritten, or
  /// added to with accumulate) and, when dx is given, dx += ∂L/∂x.
  void backward(MatrixView<const T> x, MatrixView<const T> dy, MatrixView<T> dx = {},
                bool accumulate = false) {
    check_view(x, "x (n x d_in)", x.rows, d_in_, Backend::kMemorySpace);
    check_view(dy, "dy (n x d_out)", x.rows, d_out_, Backend::kMemorySpace);
    workspace_.reserve(rank_units_backward_workspace_bytes<T>(x.rows, rank_, rank_));
    rank_units_backward<Backend, T>(*ctx_, 1.0, x, a(), bt(), routing(x.rows), dy, dx, grad_a(),
                                    grad_bt(), MatrixView<Acc>(), accumulate, path_,
                                    workspace_.data(), workspace_.bytes());
  }

  void zero_grad() {
    Kernels::fill(*ctx_, grad_a(), 0.0);
    Kernels::fill(*ctx_, grad_bt(), 0.0);
  }

  /// Trainable tensors for an optimiser: "lora_A" and "lora_B_t".
  std::vector<ParameterRef<T>> parameters() {
    return {{"lora_A", a(), grad_a()}, {"lora_B_t", bt(), grad_bt()}};
  }
  std::int64_t num_parameters() const {
    return checked_mul(rank_, checked_add(d_in_, d_out_, "Lego parameters"), "Lego parameters");
  }

  /// Internal-layout views: A (k x d_in), Bᵀ (k x d_out), the gates (1 x k) and the gradients.
  MatrixView<T> a() { return a_.view(rank_, d_in_); }
  MatrixView<T> bt() { return bt_.view(rank_, d_out_); }
  MatrixView<Acc> gates() { return gates_.view(1, rank_); }
  MatrixView<T> grad_a() { return grad_a_.view(rank_, d_in_); }
  MatrixView<T> grad_bt() { return grad_bt_.view(rank_, d_out_); }

 private:
  // Every token uses all k units: one row of indices and gates, broadcast.
  UnitRouting<Acc> routing(std::int64_t n) const {
    return {MatrixView<const std::int32_t>(units_.data(), n, rank_, Backend::kMemorySpace, 0),
            MatrixView<const Acc>(gates_.data(), n, rank_, Backend::kMemorySpace, 0)};
  }

  Context<Backend>* ctx_;
  std::int64_t d_in_, d_out_, rank_;
  RankUnitPath path_;
  Buffer<Backend, T> a_;                 // (k, d_in)
  Buffer<Backend, T> bt_;                // (k, d_out)
  Buffer<Backend, T> grad_a_;            // (k, d_in)
  Buffer<Backend, T> grad_bt_;           // (k, d_out)
  Buffer<Backend, Acc> gates_;           // (k)
  Buffer<Backend, std::int32_t> units_;  // (k): 0..k-1
  detail::OwnedWorkspace<Backend> workspace_;
};

}  // namespace rankwise
