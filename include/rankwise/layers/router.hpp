// Low-level rank-expert router: logits → scores → top-k experts → unit
// indices and gates, its backward, and loss-free load balancing. Shared by
// every routed layer; the per-token rule is rankwise/core/routing.hpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/router_config.hpp"
#include "rankwise/core/routing.hpp"
#include "rankwise/core/workspace.hpp"
#include "rankwise/layers/rank_units.hpp"

namespace rankwise {

/// Where a routing pass writes its results (backend memory, caller-owned).
template <class Acc>
struct RoutingBuffers {
  MatrixView<Acc> scores;            ///< (n x E)   s0, needed by the backward pass
  MatrixView<std::int32_t> experts;  ///< (n x k/g) selected experts, best first
  MatrixView<std::int32_t> units;    ///< (n x k)   selected rank units
  MatrixView<Acc> gates;             ///< (n x k)   their gates
  MatrixView<std::int32_t> counts;   ///< (1 x E)   assignments per expert (masked tokens excluded)

  UnitRouting<Acc> unit_routing() const { return {units, gates}; }
};

/// A token mask in backend memory: (1 x n) uint8, nonzero = real token. An
/// empty view means every token is real.
using TokenMask = MatrixView<const std::uint8_t>;

namespace detail {

template <class Backend, class Acc>
void check_routing_buffers(const RoutingBuffers<Acc>& out, const RouterConfig& cfg,
                           std::int64_t n) {
  constexpr MemorySpace space = Backend::kMemorySpace;
  check_view(out.scores, "routing.scores (n x E)", n, cfg.num_experts(), space);
  check_view(out.experts, "routing.experts (n x k/g)", n, cfg.experts_per_token(), space);
  check_view(out.units, "routing.units (n x k)", n, cfg.top_k, space);
  check_view(out.gates, "routing.gates (n x k)", n, cfg.top_k, space);
  check_view(out.counts, "routing.counts (1 x E)", 1, cfg.num_experts(), space);
}

template <class Backend>
void check_mask(const TokenMask& mask, std::int64_t n) {
  if (!mask.empty() || mask.data != nullptr) {
    check_view(mask, "mask (1 x n)", 1, n, Backend::kMemorySpace);
  }
}

}  // namespace detail

/// Workspace bytes for router_forward / router_forward_from_logits.
template <class T>
std::size_t router_forward_workspace_bytes(std::int64_t n, const RouterConfig& cfg) {
  return workspace_block_bytes<accumulator_t<T>>(n, cfg.num_experts()) +
         workspace_block_bytes<std::int32_t>(1, 1);
}

/// Workspace bytes for router_backward.
template <class T>
std::size_t router_backward_workspace_bytes(std::int64_t n, const RouterConfig& cfg) {
  return workspace_block_bytes<T>(n, cfg.num_experts()) +
         workspace_block_bytes<accumulator_t<T>>(n, cfg.num_experts()) +
         workspace_block_bytes<accumulator_t<T>>(1, cfg.num_experts());
}

/// Routes n tokens from given logits (n x E, Acc). bias: (1 x E) Acc or empty.
/// With check_finite, a non-finite logit or bias throws rankwise::error
/// naming how many tokens were affected; on the GPU that check reads one int
/// back from the device (a stream synchronisation), so engines that trust
/// their inputs turn it off. Unchecked, such a token gets zero gates.
template <class Backend, class T>
void router_forward_from_logits(Context<Backend>& ctx, const RouterConfig& cfg,
                                MatrixView<const accumulator_t<T>> logits,
                                MatrixView<const accumulator_t<T>> bias, TokenMask mask,
                                const RoutingBuffers<accumulator_t<T>>& out, bool check_finite,
                                void* workspace, std::size_t workspace_bytes) {
  using K = Kernels<Backend, T>;
  constexpr MemorySpace space = Backend::kMemorySpace;
  const RoutingRule rule = RoutingRule::from(cfg);
  const std::int64_t n = logits.rows;
  check_view(logits, "logits (n x E)", n, cfg.num_experts(), space);
  if (!bias.empty() || bias.data != nullptr) {
    check_view(bias, "bias (1 x E)", 1, cfg.num_experts(), space);
  }
  detail::check_mask<Backend>(mask, n);
  detail::check_routing_buffers<Backend>(out, cfg, n);
  WorkspaceCarver carve(workspace, workspace_bytes, space, "router_forward");
  carve.take<accumulator_t<T>>(n, cfg.num_experts());  // keeps the layout of router_forward
  MatrixView<std::int32_t> bad = carve.take<std::int32_t>(1, 1);
  if (n > 0) K::route(ctx, rule, logits, bias, out.scores, out.experts, out.units, out.gates, bad);
  if (check_finite && n > 0) {
    const std::int32_t bad_tokens = K::read_int(ctx, bad);
    RANKWISE_CHECK(bad_tokens == 0, "router: ", bad_tokens, " of ", n,
                   " tokens have non-finite logits or bias (NaN or infinity)");
  }
  K::count_experts(ctx, out.experts, mask, out.counts);
}

/// Routes n tokens of x (n x d_in) with router weights wr (E x d_in):
/// logits = x wrᵀ, accumulated in Acc, then as router_forward_from_logits.
template <class Backend, class T>
void router_forward(Context<Backend>& ctx, const RouterConfig& cfg, MatrixView<const T> x,
                    MatrixView<const T> wr, MatrixView<const accumulator_t<T>> bias, TokenMask mask,
                    const RoutingBuffers<accumulator_t<T>>& out, bool check_finite, void* workspace,
                    std::size_t workspace_bytes) {
  using Acc = accumulator_t<T>;
  constexpr MemorySpace space = Backend::kMemorySpace;
  cfg.validate();
  check_view(wr, "router weight wr (E x d_in)", cfg.num_experts(), wr.cols, space);
  check_view(x, "x (n x d_in)", x.rows, wr.cols, space);
  WorkspaceCarver carve(workspace, workspace_bytes, space, "router_forward");
  MatrixView<Acc> logits = carve.take<Acc>(x.rows, cfg.num_experts());
  Kernels<Backend, T>::gemm_acc(ctx, Acc(1), x, Op::kNoTrans, wr, Op::kTrans, Acc(0), logits);
  router_forward_from_logits<Backend, T>(ctx, cfg, logits, bias, mask, out, check_finite, workspace,
                                         workspace_bytes);
}

/// Backward of router_forward given ∂L/∂gates (n x k, Acc):
///   dwr (E x d_in) = dlogitsᵀ x   (overwritten, or added to with accumulate)
///   dx  (n x d_in) += dlogits wr   (skipped when dx is empty)
/// aux_loss_coef > 0 adds the gradient of the Switch auxiliary loss
/// (rankwise/core/routing.hpp, switch_aux_dscore) for the unmasked tokens.
/// The top-k choice itself has no gradient.
template <class Backend, class T>
void router_backward(Context<Backend>& ctx, const RouterConfig& cfg, MatrixView<const T> x,
                     MatrixView<const T> wr, MatrixView<const accumulator_t<T>> bias,
                     TokenMask mask, const RoutingBuffers<accumulator_t<T>>& routing,
                     MatrixView<const accumulator_t<T>> dgates, double aux_loss_coef,
                     MatrixView<T> dx, MatrixView<T> dwr, bool accumulate, void* workspace,
                     std::size_t workspace_bytes) {
  using K = Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  constexpr MemorySpace space = Backend::kMemorySpace;
  const RoutingRule rule = RoutingRule::from(cfg);
  const std::int64_t n = x.rows, num_experts = cfg.num_experts();
  check_view(wr, "router weight wr (E x d_in)", num_experts, wr.cols, space);
  check_view(x, "x (n x d_in)", n, wr.cols, space);
  detail::check_mask<Backend>(mask, n);
  detail::check_routing_buffers<Backend>(routing, cfg, n);
  check_view(dgates, "dgates (n x k)", n, cfg.top_k, space);
  check_view(dwr, "dwr (E x d_in)", num_experts, wr.cols, space);
  if (!dx.empty() || dx.data != nullptr) check_view(dx, "dx (n x d_in)", n, wr.cols, space);
  RANKWISE_CHECK(std::isfinite(aux_loss_coef) && aux_loss_coef >= 0.0,
                 "router_backward: aux_loss_coef must be finite and >= 0, got ", aux_loss_coef);
  if (n == 0) {
    if (!accumulate) K::fill(ctx, dwr, 0.0);
    return;
  }
  WorkspaceCarver carve(workspace, workspace_bytes, space, "router_backward");
  MatrixView<T> dlogits = carve.take<T>(n, num_experts);
  MatrixView<Acc> scratch = carve.take<Acc>(n, num_experts);
  MatrixView<Acc> extra = carve.take<Acc>(1, num_experts);
  if (aux_loss_coef > 0.0) {
    K::aux_loss_grad(ctx, routing.counts, rule.experts_per_token, static_cast<Acc>(aux_loss_coef),
                     extra);
  }
  K::route_backward(ctx, rule, routing.scores, bias, routing.experts, dgates,
                    aux_loss_coef > 0.0 ? MatrixView<const Acc>(extra) : MatrixView<const Acc>(),
                    mask, scratch, dlogits);
  K::gemm(ctx, Acc(1), dlogits, Op::kTrans, x, Op::kNoTrans, accumulate ? Acc(1) : Acc(0), dwr);
  if (!dx.empty()) K::gemm(ctx, Acc(1), dlogits, Op::kNoTrans, wr, Op::kNoTrans, Acc(1), dx);
}

/// Loss-free balancing after a training forward: bias_e += u · sign(mean(c) − c_e).
template <class Backend, class T>
void router_update_bias(Context<Backend>& ctx, const RouterConfig& cfg,
                        MatrixView<const std::int32_t> counts, MatrixView<accumulator_t<T>> bias) {
  cfg.validate();
  check_view(counts, "counts (1 x E)", 1, cfg.num_experts(), Backend::kMemorySpace);
  check_view(bias, "bias (1 x E)", 1, cfg.num_experts(), Backend::kMemorySpace);
  Kernels<Backend, T>::update_bias(ctx, counts, cfg.bias_update_rate, bias);
}

}  // namespace rankwise
