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
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/detail/owned_workspace.hpp"
#include "rankwise/layers/rank_units.hpp"

namespace rankwise {

/// y += Σ_j gate_j · b_j (a_j · x) over the k merged units (scale 1).
/// State: "lora_A" (k x d_in), "lora_B" (d_out x k), "gates" (k), as written
/// by merge::LegoResult::to_tensors().
template <class T, class Backend>
class Lego {
 public:
  using Kernels = rankwise::Kernels<Backend, T>;
  using Acc = accumulator_t<T>;

  Lego(Context<Backend>& ctx, std::int64_t d_in, std::int64_t d_out, std::int64_t rank)
      : ctx_(&ctx), d_in_(d_in), d_out_(d_out), rank_(rank) {
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
  }

  std::int64_t rank() const { return rank_; }

  /// Loads "lora_A", "lora_B" and "gates"; throws naming a missing key or shape.
  void load_state(const TensorMap& map) {
    const HostTensor& a_in = require_tensor(map, "lora_A", {rank_, d_in_});
    const HostTensor& b_in = require_tensor(map, "lora_B", {d_out_, rank_});
    const HostTensor& g_in = require_tensor(map, "gates", {rank_});
    std::vector<double> bt_values(b_in.values.size());
    for (std::int64_t o = 0; o < d_out_; ++o) {
      for (std::int64_t j = 0; j < rank_; ++j)
        bt_values[j * d_out_ + o] = b_in.values[o * rank_ + j];
    }
    Kernels::upload_doubles(*ctx_, a_in.values.data(), a());
    Kernels::upload_doubles(*ctx_, bt_values.data(), bt());
    rankwise::Kernels<Backend, Acc>::upload_doubles(*ctx_, g_in.values.data(),
                                                    gates_.view(1, rank_));
  }

  /// y (n x d_out) += Σ_j gate_j b_j (a_j · x) for x (n x d_in).
  void forward(MatrixView<const T> x, MatrixView<T> y, RankUnitPath path = RankUnitPath::kAuto) {
    // Shapes first, so a bad x or y throws before the workspace grows for it.
    check_view(x, "x (n x d_in)", x.rows, d_in_, Backend::kMemorySpace);
    check_view(y, "y (n x d_out)", x.rows, d_out_, Backend::kMemorySpace);
    workspace_.reserve(rank_units_forward_workspace_bytes<T>(x.rows, rank_, rank_));
    rank_units_forward<Backend, T>(*ctx_, 1.0, x, a(), bt(), routing(x.rows), y, path,
                                   workspace_.data(), workspace_.bytes());
  }

  /// Gradients wrt the merged units (for fine-tuning the merge) and x.
  void backward(MatrixView<const T> x, MatrixView<const T> dy, MatrixView<T> dx = {},
                RankUnitPath path = RankUnitPath::kAuto) {
    check_view(x, "x (n x d_in)", x.rows, d_in_, Backend::kMemorySpace);
    check_view(dy, "dy (n x d_out)", x.rows, d_out_, Backend::kMemorySpace);
    workspace_.reserve(rank_units_backward_workspace_bytes<T>(x.rows, rank_, rank_));
    rank_units_backward<Backend, T>(*ctx_, 1.0, x, a(), bt(), routing(x.rows), dy, dx, grad_a(),
                                    grad_bt(), MatrixView<Acc>(), false, path, workspace_.data(),
                                    workspace_.bytes());
  }

  MatrixView<T> a() { return a_.view(rank_, d_in_); }
  MatrixView<T> bt() { return bt_.view(rank_, d_out_); }
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
  Buffer<Backend, T> a_;                 // (k, d_in)
  Buffer<Backend, T> bt_;                // (k, d_out)
  Buffer<Backend, T> grad_a_;            // (k, d_in)
  Buffer<Backend, T> grad_bt_;           // (k, d_out)
  Buffer<Backend, Acc> gates_;           // (k)
  Buffer<Backend, std::int32_t> units_;  // (k): 0..k-1
  detail::OwnedWorkspace<Backend> workspace_;
};

}  // namespace rankwise
