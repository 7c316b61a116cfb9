// AdamW with global-norm gradient clipping over any layers' parameters, on
// either backend; the clipping norm stays in backend memory (no host round trip).
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/adam_rule.hpp"
#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/error.hpp"
#include "rankwise/core/parameter.hpp"

namespace rankwise {
namespace optim {

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;   // decoupled (AdamW)
  double max_grad_norm = 0.0;  // clip the global gradient norm to this; 0 = off

  void validate() const {
    RANKWISE_CHECK(std::isfinite(lr) && lr >= 0, "AdamOptions.lr must be finite and >= 0, got ",
                   lr);
    RANKWISE_CHECK(beta1 >= 0 && beta1 < 1, "AdamOptions.beta1 must be in [0, 1), got ", beta1);
    RANKWISE_CHECK(beta2 >= 0 && beta2 < 1, "AdamOptions.beta2 must be in [0, 1), got ", beta2);
    RANKWISE_CHECK(eps > 0 && std::isfinite(eps), "AdamOptions.eps must be positive, got ", eps);
    RANKWISE_CHECK(weight_decay >= 0 && std::isfinite(weight_decay),
                   "AdamOptions.weight_decay must be finite and >= 0, got ", weight_decay);
    RANKWISE_CHECK(max_grad_norm >= 0 && std::isfinite(max_grad_norm),
                   "AdamOptions.max_grad_norm must be finite and >= 0, got ", max_grad_norm);
  }
};

/// Optimises the given parameters (their value and grad views, e.g. from
/// layer.parameters()); the layers must outlive the optimiser. Moments are
/// kept in the accumulator type (float for half / bfloat16 parameters).
template <class T, class Backend>
class Adam {
 public:
  using Acc = accumulator_t<T>;

  Adam(Context<Backend>& ctx, std::vector<ParameterRef<T>> params, const AdamOptions& options)
      : ctx_(&ctx), params_(std::move(params)), options_(options), norm_sq_(1) {
    options_.validate();
    for (const auto& p : params_) {
      check_view(p.value, "parameter value", p.value.rows, p.value.cols, Backend::kMemorySpace);
      check_view(p.grad, "parameter grad", p.value.rows, p.value.cols, Backend::kMemorySpace);
      moments_.push_back(std::make_unique<Moments>(
          checked_elements(p.value.rows, p.value.cols, "Adam: moments of a parameter")));
      AccKernels::fill(ctx, moments_.back()->m.view(p.value.rows, p.value.cols), 0.0);
      AccKernels::fill(ctx, moments_.back()->v.view(p.value.rows, p.value.cols), 0.0);
    }
  }

  /// One step on the current gradients.
  void step() {
    ++t_;
    AdamStep s;
    s.lr = options_.lr;
    s.beta1 = options_.beta1;
    s.beta2 = options_.beta2;
    s.eps = options_.eps;
    s.weight_decay = options_.weight_decay;
    s.max_grad_norm = options_.max_grad_norm;
    s.correction1 = 1.0 - std::pow(options_.beta1, static_cast<double>(t_));
    s.correction2 = 1.0 - std::pow(options_.beta2, static_cast<double>(t_));
    MatrixView<Acc> norm_sq = norm_sq_.view(1, 1);
    const bool clip = options_.max_grad_norm > 0;
    if (clip) {
      AccKernels::fill(*ctx_, norm_sq, 0.0);
      for (const auto& p : params_) Kernels<Backend, T>::sum_squares(*ctx_, p.grad, norm_sq);
    }
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      Kernels<Backend, T>::adam(*ctx_, s, p.value, p.grad,
                                moments_[i]->m.view(p.value.rows, p.value.cols),
                                moments_[i]->v.view(p.value.rows, p.value.cols),
                                clip ? MatrixView<const Acc>(norm_sq) : MatrixView<const Acc>());
    }
  }

  /// Sets every gradient to zero.
  void zero_grad() {
    for (const auto& p : params_) Kernels<Backend, T>::fill(*ctx_, p.grad, 0.0);
  }

  /// The squared global gradient norm of the last clipped step (reads one
  /// value back: for logging, not for the hot path).
  double last_grad_norm_sq() {
    Acc host = 0;
    AccKernels::download(*ctx_, norm_sq_.view(1, 1), &host);
    return static_cast<double>(host);
  }

  std::int64_t steps() const { return t_; }
  AdamOptions& options() { return options_; }

 private:
  using AccKernels = Kernels<Backend, Acc>;
  struct Moments {
    explicit Moments(std::int64_t n) : m(n), v(n) {}
    Buffer<Backend, Acc> m, v;
  };

  Context<Backend>* ctx_;
  std::vector<ParameterRef<T>> params_;
  AdamOptions options_;
  std::vector<std::unique_ptr<Moments>> moments_;
  Buffer<Backend, Acc> norm_sq_;
  std::int64_t t_ = 0;
};

}  // namespace optim
}  // namespace rankwise
