// SMoRA: every rank of a LoRA is an expert; a router activates the top-k
// ranks per token (Zhao et al., arXiv 2501.15103). group_size g > 1 routes
// blocks of g ranks: block MoE-LoRA, the same layer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/backend/memory_decl.hpp"
#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/parameter.hpp"
#include "rankwise/core/random.hpp"
#include "rankwise/core/router_config.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/detail/owned_workspace.hpp"
#include "rankwise/detail/peft_state.hpp"
#include "rankwise/layers/layer.hpp"
#include "rankwise/layers/rank_units.hpp"
#include "rankwise/layers/router.hpp"

namespace rankwise {

/// Shape and options of a Smora layer. Defaults are the paper's runs:
/// r = 64, k = 8, alpha = 16 (scale alpha / k = 2), g = 1.
struct SmoraConfig {
  std::int64_t d_in = 0;
  std::int64_t d_out = 0;
  RouterConfig router{};  // num_units = r, top_k = k, group_size = g, ...
  double alpha = 16.0;
  RankUnitPath path = RankUnitPath::kAuto;
  /// Throw on non-finite router logits (costs a stream sync on the GPU).
  bool check_finite = true;
  /// Loss-free balancing after every training forward (false: on request,
  /// through update_bias()).
  bool update_bias_every_forward = true;
  /// Weight of the Switch auxiliary loss added in backward (0 = off; SMoRA
  /// balances with the bias instead).
  double aux_loss_coef = 0.0;
  /// Train the balance bias by gradient too (parameters() then holds "bias"),
  /// on top of the sign rule, as the reference code does: PEFT's set_adapter
  /// turns requires_grad on for every adapter tensor, lora_biases included.
  /// The default is the paper's sign rule only. Needs T = accumulator_t<T>
  /// (float or double storage), since the bias is kept in the accumulator type.
  bool train_bias = false;

  std::int64_t rank() const { return router.num_units; }
  double scale() const { return alpha / static_cast<double>(router.top_k); }

  void validate() const {
    RANKWISE_CHECK(d_in > 0, "SmoraConfig.d_in must be positive, got ", d_in);
    RANKWISE_CHECK(d_out > 0, "SmoraConfig.d_out must be positive, got ", d_out);
    router.validate();
    RANKWISE_CHECK(std::isfinite(alpha), "SmoraConfig.alpha must be finite, got ", alpha);
    RANKWISE_CHECK(std::isfinite(aux_loss_coef) && aux_loss_coef >= 0.0,
                   "SmoraConfig.aux_loss_coef must be finite and >= 0, got ", aux_loss_coef);
    RANKWISE_CHECK(aux_loss_coef == 0.0 || !router.bias_per_rank,
                   "SmoraConfig.aux_loss_coef = ", aux_loss_coef,
                   ": the Switch auxiliary loss is defined over experts and cannot be combined "
                   "with router.bias_per_rank");
  }
};

/// y += (alpha / k) · Σ_{i ∈ top-k ranks} gate_i · b_i (a_i · x).
///
/// Parameters: A (r x d_in), B (d_out x r; stored transposed), router W_r
/// (E x d_in), balance bias b (C = E, or r with router.bias_per_rank; trained
/// only with train_bias). T and Backend as for Lora.
/// backward() uses the routing of the last training forward, so call them in
/// pairs on the same x. Follows the layer concept (layers/layer.hpp).
template <class T, class Backend>
class Smora {
 public:
  using value_type = T;
  using backend_type = Backend;
  using Kernels = rankwise::Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  static constexpr bool kOwnsParameters = true;

  Smora(Context<Backend>& ctx, const SmoraConfig& config)
      : ctx_(&ctx),
        config_(validated(config)),
        a_(checked_elements(rank(), config.d_in, "Smora: A (r x d_in)")),
        bt_(checked_elements(rank(), config.d_out, "Smora: B (d_out x r)")),
        wr_(checked_elements(experts(), config.d_in, "Smora: router W_r (E x d_in)")),
        bias_(choices()),
        routed_bias_(choices()),
        grad_a_(a_.size()),
        grad_bt_(bt_.size()),
        grad_wr_(wr_.size()),
        grad_bias_(config.train_bias ? choices() : 0),
        counts_(choices()) {
    RANKWISE_CHECK(!config_.train_bias || (std::is_same<T, Acc>::value),
                   "SmoraConfig.train_bias needs float or double storage: the balance bias is "
                   "kept in the accumulator type and trained as such");
    Kernels::fill(ctx, a(), 0.0);
    Kernels::fill(ctx, bt(), 0.0);
    Kernels::fill(ctx, wr(), 0.0);
    rankwise::Kernels<Backend, Acc>::fill(ctx, bias(), 0.0);
    // Zero counts, so update_bias() before any forward is a no-op.
    Memory<Backend>::fill(ctx, counts_.data(), 0,
                          sizeof(std::int32_t) * static_cast<std::size_t>(choices()));
    zero_grad();
  }

  const SmoraConfig& config() const { return config_; }
  /// Chooses the rank-unit path for later calls (kAuto: the backend's crossover).
  void set_path(RankUnitPath path) { config_.path = path; }
  double scale() const { return config_.scale(); }
  std::int64_t rank() const { return config_.rank(); }
  std::int64_t experts() const { return config_.router.num_experts(); }
  /// What top-k selects: experts (default) or ranks (router.bias_per_rank).
  std::int64_t choices() const { return config_.router.num_choices(); }
  std::int64_t top_k() const { return config_.router.top_k; }

  /// A and W_r ~ U(±1/sqrt(d_in)), B = 0, bias = 0; same seed, same bits on
  /// every backend.
  void init(std::uint64_t seed) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(config_.d_in));
    Kernels::fill_uniform(*ctx_, a(), -bound, bound, substream(seed, 0));
    Kernels::fill_uniform(*ctx_, wr(), -bound, bound, substream(seed, 2));
    Kernels::fill(*ctx_, bt(), 0.0);
    rankwise::Kernels<Backend, Acc>::fill(*ctx_, bias(), 0.0);
  }

  /// y (n x d_out) += the routed delta for x (n x d_in). In training mode the
  /// routing is kept for backward() and, unless disabled, the balance bias is
  /// updated from this batch's counts (tokens with mask 0 do not count).
  void forward(MatrixView<const T> x, MatrixView<T> y, Mode mode = Mode::kInference,
               TokenMask mask = {}) {
    route(x, mask);
    // backward() differentiates the gates this forward computed, so it needs
    // the bias before this forward's balancing step.
    rankwise::Kernels<Backend, Acc>::copy(*ctx_, bias(), Op::kNoTrans, routed_bias());
    workspace_.reserve(rank_units_forward_workspace_bytes<T>(x.rows, top_k(), rank()));
    rank_units_forward<Backend, T>(*ctx_, scale(), x, a(), bt(), routing().unit_routing(), y,
                                   config_.path, workspace_.data(), workspace_.bytes());
    mask_ = mask;
    if (mode == Mode::kTraining && config_.update_bias_every_forward) update_bias();
  }

  /// y += the delta for x under a routing the caller supplies (units and
  /// gates, n x k, backend memory), bypassing the router: for engines that
  /// route once and apply many adapters. Every index is checked to be in [0, r).
  void forward(MatrixView<const T> x, UnitRouting<Acc> routing, MatrixView<T> y) {
    workspace_.reserve(
        std::max(check_unit_routing_workspace_bytes(),
                 rank_units_forward_workspace_bytes<T>(x.rows, routing.units.cols, rank())));
    check_unit_routing<Backend, T>(*ctx_, routing, x.rows, rank(), workspace_.data(),
                                   workspace_.bytes());
    routed_tokens_ = -1;  // nothing here for backward() to differentiate
    rank_units_forward<Backend, T>(*ctx_, scale(), x, a(), bt(), routing, y, config_.path,
                                   workspace_.data(), workspace_.bytes());
  }

  /// Gradients for the last forward on x with upstream dy (n x d_out):
  /// grad_a(), grad_bt(), grad_wr() overwritten (added to with accumulate);
  /// dx (n x d_in), when given, receives += ∂L/∂x through A and the router.
  /// The gates' gradient reaches W_r only through the selected experts.
  void backward(MatrixView<const T> x, MatrixView<const T> dy, MatrixView<T> dx = {},
                bool accumulate = false) {
    RANKWISE_CHECK(routed_tokens_ >= 0,
                   "Smora::backward: no routed forward to differentiate "
                   "(a forward with a user-supplied routing is inference only)");
    RANKWISE_CHECK(x.rows == routed_tokens_, "Smora::backward: x has ", x.rows,
                   " tokens but the last forward routed ", routed_tokens_);
    const std::int64_t n = x.rows;
    detail::grow(dgates_, checked_elements(n, top_k(), "Smora: dgates (n x k)"));
    workspace_.reserve(std::max(rank_units_backward_workspace_bytes<T>(n, top_k(), rank()),
                                router_backward_workspace_bytes<T>(n, config_.router)));
    MatrixView<Acc> dgates = detail::prefix(dgates_, n, top_k());
    rank_units_backward<Backend, T>(*ctx_, scale(), x, a(), bt(), routing().unit_routing(), dy, dx,
                                    grad_a(), grad_bt(), dgates, accumulate, config_.path,
                                    workspace_.data(), workspace_.bytes());
    router_backward<Backend, T>(*ctx_, config_.router, x, wr(), routed_bias(), mask_, routing(),
                                dgates, config_.aux_loss_coef, dx, grad_wr(),
                                config_.train_bias ? grad_bias() : MatrixView<Acc>(), accumulate,
                                workspace_.data(), workspace_.bytes());
  }

  /// Loss-free balancing with the counts of the last forward:
  /// b_c += u · sign(mean(counts) − c_c), per choice.
  void update_bias() {
    router_update_bias<Backend, T>(*ctx_, config_.router, counts_.view(1, choices()), bias());
  }

  /// The routing of the last forward (backend memory). The mask given to a
  /// training forward must stay valid until its backward.
  RoutingBuffers<Acc> routing() { return routing_views(routed_tokens_ < 0 ? 0 : routed_tokens_); }

  void zero_grad() {
    Kernels::fill(*ctx_, grad_a(), 0.0);
    Kernels::fill(*ctx_, grad_bt(), 0.0);
    Kernels::fill(*ctx_, grad_wr(), 0.0);
    if (config_.train_bias) rankwise::Kernels<Backend, Acc>::fill(*ctx_, grad_bias(), 0.0);
  }

  /// Internal-layout views.
  MatrixView<T> a() { return a_.view(rank(), config_.d_in); }
  MatrixView<T> bt() { return bt_.view(rank(), config_.d_out); }
  MatrixView<T> wr() { return wr_.view(experts(), config_.d_in); }
  MatrixView<Acc> bias() { return bias_.view(1, choices()); }
  /// The bias the last forward routed with (before its balancing step).
  MatrixView<Acc> routed_bias() { return routed_bias_.view(1, choices()); }
  /// ∂L/∂bias of the last backward (empty unless train_bias).
  MatrixView<Acc> grad_bias() {
    return config_.train_bias ? grad_bias_.view(1, choices()) : MatrixView<Acc>();
  }
  MatrixView<T> grad_a() { return grad_a_.view(rank(), config_.d_in); }
  MatrixView<T> grad_bt() { return grad_bt_.view(rank(), config_.d_out); }
  MatrixView<T> grad_wr() { return grad_wr_.view(experts(), config_.d_in); }

  /// Trainable tensors: "lora_A", "lora_B_t", "router", and "bias" with
  /// train_bias (otherwise the bias is state, moved by the sign rule only).
  std::vector<ParameterRef<T>> parameters() {
    std::vector<ParameterRef<T>> out{
        {"lora_A", a(), grad_a()}, {"lora_B_t", bt(), grad_bt()}, {"router", wr(), grad_wr()}};
    if constexpr (std::is_same<T, Acc>::value) {
      if (config_.train_bias) out.push_back({"bias", bias(), grad_bias()});
    }
    return out;
  }
  std::int64_t num_parameters() const {
    return rank() * (config_.d_in + config_.d_out) + experts() * config_.d_in +
           (config_.train_bias ? choices() : 0);
  }

  /// State in PEFT layout: "lora_A" (r x d_in), "lora_B" (d_out x r),
  /// "router" (E x d_in), "bias" (C: E, or r with a per-rank bias).
  TensorMap state() {
    TensorMap out;
    detail::save_lora_factors<Backend, T>(*ctx_, a(), bt(), out);
    out["router"] = detail::download_state<Backend, T>(*ctx_, wr(), {experts(), config_.d_in});
    out["bias"] = detail::download_state<Backend, Acc>(*ctx_, bias(), {choices()});
    return out;
  }

  /// Loads what state() saved; throws naming a missing key or a wrong shape.
  void load_state(const TensorMap& map) {
    const detail::LoraFactorState factors(map, rank(), config_.d_in, config_.d_out);
    const HostTensor& wr_in = require_tensor(map, "router", {experts(), config_.d_in});
    const HostTensor& bias_in = require_tensor(map, "bias", {choices()});
    factors.load<Backend, T>(*ctx_, a(), bt());
    detail::upload_state<Backend, T>(*ctx_, wr_in, wr());
    detail::upload_state<Backend, Acc>(*ctx_, bias_in, bias());
  }

 private:
  static const SmoraConfig& validated(const SmoraConfig& c) {
    c.validate();
    return c;
  }

  RoutingBuffers<Acc> routing_views(std::int64_t n) {
    return {detail::prefix(scores_, n, experts()),
            detail::prefix(experts_, n, config_.router.choices_per_token()),
            detail::prefix(units_, n, top_k()), detail::prefix(gates_, n, top_k()),
            counts_.view(1, choices())};
  }

  void route(MatrixView<const T> x, TokenMask mask) {
    // x first, so a bad or huge x throws before any buffer grows for it.
    check_view(x, "x (n x d_in)", x.rows, config_.d_in, Backend::kMemorySpace);
    const std::int64_t n = x.rows;
    detail::grow(scores_, checked_elements(n, experts(), "Smora: routing scores (n x E)"));
    detail::grow(experts_, checked_elements(n, config_.router.choices_per_token(),
                                            "Smora: routing experts (n x k/g)"));
    detail::grow(units_, checked_elements(n, top_k(), "Smora: routing units (n x k)"));
    detail::grow(gates_, checked_elements(n, top_k(), "Smora: routing gates (n x k)"));
    routed_tokens_ = -1;  // set once the routing is complete
    workspace_.reserve(router_forward_workspace_bytes<T>(n, config_.router));
    router_forward<Backend, T>(*ctx_, config_.router, x, wr(), bias(), mask, routing_views(n),
                               config_.check_finite, workspace_.data(), workspace_.bytes());
    routed_tokens_ = n;
  }

  Context<Backend>* ctx_;
  SmoraConfig config_;
  Buffer<Backend, T> a_;                   // (r, d_in)
  Buffer<Backend, T> bt_;                  // (r, d_out)
  Buffer<Backend, T> wr_;                  // (E, d_in)
  Buffer<Backend, Acc> bias_;              // (C)
  Buffer<Backend, Acc> routed_bias_;       // (C) the bias of the last forward
  Buffer<Backend, T> grad_a_;              // (r, d_in)
  Buffer<Backend, T> grad_bt_;             // (r, d_out)
  Buffer<Backend, T> grad_wr_;             // (E, d_in)
  Buffer<Backend, Acc> grad_bias_;         // (C) with train_bias, else empty
  Buffer<Backend, std::int32_t> counts_;   // (C)
  Buffer<Backend, Acc> scores_;            // (n, E)
  Buffer<Backend, std::int32_t> experts_;  // (n, choices per token)
  Buffer<Backend, std::int32_t> units_;    // (n, k)
  Buffer<Backend, Acc> gates_;             // (n, k)
  Buffer<Backend, Acc> dgates_;            // (n, k)
  detail::OwnedWorkspace<Backend> workspace_;
  std::int64_t routed_tokens_ = -1;  // tokens of the last forward; -1 before any
  TokenMask mask_{};
};

}  // namespace rankwise
