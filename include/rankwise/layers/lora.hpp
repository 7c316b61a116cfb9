// High-level LoRA layer: owns A, B, their gradients and its workspace.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/lora_config.hpp"
#include "rankwise/core/parameter.hpp"
#include "rankwise/core/random.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/detail/owned_workspace.hpp"
#include "rankwise/detail/peft_state.hpp"
#include "rankwise/layers/layer.hpp"
#include "rankwise/layers/lora_ops.hpp"

namespace rankwise {

/// y += s * B A x for every token x, s = alpha / r (or alpha / sqrt(r), rsLoRA).
///
/// T is the storage type (CPU: float, double; CUDA: float, __half,
/// __nv_bfloat16, accumulating in float). Backend is CpuBackend or CudaBackend;
/// every view passed in must live in that backend's memory space. At the API
/// boundary A is (r x d_in) and B is (d_out x r), PEFT's convention; inside, B
/// is stored transposed (see lora_ops.hpp). Not thread-safe: one layer, one
/// stream of calls. Follows the layer concept (layers/layer.hpp).
template <class T, class Backend>
class Lora {
 public:
  using value_type = T;
  using backend_type = Backend;
  using Kernels = rankwise::Kernels<Backend, T>;
  static constexpr bool kOwnsParameters = true;

  /// Allocates A and B (zero) and their gradients. Throws on an invalid
  /// config, on sizes that overflow int64 (naming them) and, with
  /// ErrorCode::kOutOfMemory, when an allocation fails.
  Lora(Context<Backend>& ctx, const LoraConfig& config)
      : ctx_(&ctx),
        config_(config),
        scale_(config.scale()),  // validates config before any size is computed
        a_(checked_elements(config.rank, config.d_in, "Lora: A (r x d_in)")),
        bt_(checked_elements(config.rank, config.d_out, "Lora: B (d_out x r)")),
        grad_a_(a_.size()),
        grad_bt_(bt_.size()) {
    Kernels::fill(ctx, a(), 0.0);
    Kernels::fill(ctx, bt(), 0.0);
    zero_grad();
  }

  const LoraConfig& config() const { return config_; }
  double scale() const { return scale_; }

  /// PEFT initialisation: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (kaiming-uniform,
  /// a = sqrt(5)), B = 0. Same seed, same bits, on every backend.
  void init_peft(std::uint64_t seed) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(config_.d_in));
    Kernels::fill_uniform(*ctx_, a(), -bound, bound, substream(seed, 0));
    Kernels::fill(*ctx_, bt(), 0.0);
  }

  /// Copies A (r x d_in) in.
  void set_a(MatrixView<const T> a_in) {
    check_view(a_in, "A (r x d_in)", config_.rank, config_.d_in, Backend::kMemorySpace);
    Kernels::copy(*ctx_, a_in, Op::kNoTrans, a());
  }
  /// Copies B (d_out x r, PEFT layout) in.
  void set_b(MatrixView<const T> b_in) {
    check_view(b_in, "B (d_out x r)", config_.d_out, config_.rank, Backend::kMemorySpace);
    Kernels::copy(*ctx_, b_in, Op::kTrans, bt());
  }
  /// Copies A (r x d_in) out.
  void get_a(MatrixView<T> a_out) const {
    check_view(a_out, "A (r x d_in)", config_.rank, config_.d_in, Backend::kMemorySpace);
    Kernels::copy(*ctx_, a(), Op::kNoTrans, a_out);
  }
  /// Copies B (d_out x r, PEFT layout) out.
  void get_b(MatrixView<T> b_out) const {
    check_view(b_out, "B (d_out x r)", config_.d_out, config_.rank, Backend::kMemorySpace);
    Kernels::copy(*ctx_, bt(), Op::kTrans, b_out);
  }

  /// y += s * B A x for the n rows of x (n x d_in); y is (n x d_out). Both
  /// modes compute the same: backward needs only x.
  void forward(MatrixView<const T> x, MatrixView<T> y, Mode = Mode::kInference) {
    // Shapes first, so a bad x or y throws before the workspace grows for it.
    check_view(x, "x (n x d_in)", x.rows, config_.d_in, Backend::kMemorySpace);
    check_view(y, "y (n x d_out)", x.rows, config_.d_out, Backend::kMemorySpace);
    workspace_.reserve(lora_forward_workspace_bytes<T>(x.rows, config_.rank));
    lora_forward<Backend, T>(*ctx_, scale_, x, a(), bt(), y, workspace_.data(), workspace_.bytes());
  }

  /// y = x W0ᵀ + s * B A x: the base product and the adapter in one call.
  void forward(MatrixView<const T> x, MatrixView<const T> w0, WeightLayout layout,
               MatrixView<T> y) {
    check_base(w0, layout);
    base_forward<Backend, T>(*ctx_, x, w0, layout, y);
    forward(x, y);
  }

  /// Gradients for the forward on x with upstream gradient dy (n x d_out):
  /// grad_a() and grad_b() are overwritten (or added to, with accumulate), and
  /// dx (n x d_in), when given, receives += the adapter's part of ∂L/∂x.
  void backward(MatrixView<const T> x, MatrixView<const T> dy, MatrixView<T> dx = {},
                bool accumulate = false) {
    check_view(x, "x (n x d_in)", x.rows, config_.d_in, Backend::kMemorySpace);
    check_view(dy, "dy (n x d_out)", x.rows, config_.d_out, Backend::kMemorySpace);
    workspace_.reserve(lora_backward_workspace_bytes<T>(x.rows, config_.rank));
    lora_backward<Backend, T>(*ctx_, scale_, x, a(), bt(), dy, dx, grad_a(), grad_bt(), accumulate,
                              workspace_.data(), workspace_.bytes());
  }

  /// W0 += s B A (merge) and W0 -= s B A (unmerge), W0 stored as `layout` says.
  void merge(MatrixView<T> w0, WeightLayout layout) const {
    lora_merge<Backend, T>(*ctx_, scale_, a(), bt(), w0, layout, +1.0);
  }
  void unmerge(MatrixView<T> w0, WeightLayout layout) const {
    lora_merge<Backend, T>(*ctx_, scale_, a(), bt(), w0, layout, -1.0);
  }

  void zero_grad() {
    Kernels::fill(*ctx_, grad_a(), 0.0);
    Kernels::fill(*ctx_, grad_bt(), 0.0);
  }

  /// Internal-layout views: A (r x d_in), Bᵀ (r x d_out) and their gradients.
  MatrixView<T> a() { return a_.view(config_.rank, config_.d_in); }
  MatrixView<const T> a() const { return a_.view(config_.rank, config_.d_in); }
  MatrixView<T> bt() { return bt_.view(config_.rank, config_.d_out); }
  MatrixView<const T> bt() const { return bt_.view(config_.rank, config_.d_out); }
  MatrixView<T> grad_a() { return grad_a_.view(config_.rank, config_.d_in); }
  MatrixView<T> grad_bt() { return grad_bt_.view(config_.rank, config_.d_out); }
  /// Copies ∂L/∂B out in PEFT layout (d_out x r).
  void get_grad_b(MatrixView<T> db_out) const {
    check_view(db_out, "dB (d_out x r)", config_.d_out, config_.rank, Backend::kMemorySpace);
    Kernels::copy(*ctx_, grad_bt_.view(config_.rank, config_.d_out), Op::kTrans, db_out);
  }

  /// Trainable tensors for an optimiser: "lora_A" and "lora_B_t".
  std::vector<ParameterRef<T>> parameters() {
    return {{"lora_A", a(), grad_a()}, {"lora_B_t", bt(), grad_bt()}};
  }

  std::int64_t num_parameters() const {
    return checked_mul(config_.rank, checked_add(config_.d_in, config_.d_out, "Lora parameters"),
                       "Lora parameters");
  }

  /// State in PEFT layout: "lora_A" (r x d_in), "lora_B" (d_out x r).
  TensorMap state() const {
    TensorMap out;
    detail::save_lora_factors<Backend, T>(*ctx_, a(), bt(), out);
    return out;
  }

  /// Loads what state() saved; throws naming a missing key or a wrong shape.
  void load_state(const TensorMap& map) {
    detail::LoraFactorState(map, config_.rank, config_.d_in, config_.d_out)
        .load<Backend, T>(*ctx_, a(), bt());
  }

 private:
  void check_base(const MatrixView<const T>& w0, WeightLayout layout) const {
    if (layout == WeightLayout::kOutIn) {
      check_view(w0, "w0 (d_out x d_in)", config_.d_out, config_.d_in, Backend::kMemorySpace);
    } else {
      check_view(w0, "w0 (d_in x d_out), fan_in_fan_out", config_.d_in, config_.d_out,
                 Backend::kMemorySpace);
    }
  }

  Context<Backend>* ctx_;
  LoraConfig config_;
  double scale_;
  Buffer<Backend, T> a_;        // (r, d_in)
  Buffer<Backend, T> bt_;       // (r, d_out)
  Buffer<Backend, T> grad_a_;   // (r, d_in)
  Buffer<Backend, T> grad_bt_;  // (r, d_out)
  detail::OwnedWorkspace<Backend> workspace_;
};

}  // namespace rankwise
