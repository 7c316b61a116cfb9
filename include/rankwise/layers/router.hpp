// Low-level rank-expert router: logits → scores → top-k experts → unit
// indices and gates, its backward, and loss-free load balancing. Shared by
// every routed layer; the per-token rule is rankwise/core/routing.hpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/checked_size.hpp"
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
  MatrixView<std::int32_t> experts;  ///< (n x k/g) selected choices, best first (experts;
                                     ///<           ranks, n x k, with a per-rank bias)
  MatrixView<std::int32_t> units;    ///< (n x k)   selected rank units
  MatrixView<Acc> gates;             ///< (n x k)   their gates
  MatrixView<std::int32_t> counts;   ///< (1 x C)   assignments per choice (masked tokens excluded)

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
  check_view(out.experts,
             cfg.bias_per_rank ? "routing.experts (n x k)" : "routing.experts (n x k/g)", n,
             cfg.choices_per_token(), space);
  check_view(out.units, "routing.units (n x k)", n, cfg.top_k, space);
  check_view(out.gates, "routing.gates (n x k)", n, cfg.top_k, space);
  check_view(out.counts, cfg.bias_per_rank ? "routing.counts (1 x r)" : "routing.counts (1 x E)", 1,
             cfg.num_choices(), space);
}

template <class Backend>
void check_mask(const TokenMask& mask, std::int64_t n) {
  if (!mask.empty() || mask.data != nullptr) {
    check_view(mask, "mask (1 x n)", 1, n, Backend::kMemorySpace);
  }
}

// The router writes its five outputs while it reads its inputs: no output may
// share memory with an input or with another output.
template <class Acc, class In>
void check_routing_disjoint(const char* fn, const RoutingBuffers<Acc>& out,
                            const MatrixView<In>& in, const char* in_name) {
  check_no_overlap(fn, out.scores, "routing.scores", in, in_name);
  check_no_overlap(fn, out.experts, "routing.experts", in, in_name);
  check_no_overlap(fn, out.units, "routing.units", in, in_name);
  check_no_overlap(fn, out.gates, "routing.gates", in, in_name);
  check_no_overlap(fn, out.counts, "routing.counts", in, in_name);
}

template <class Acc>
void check_routing_outputs_disjoint(const char* fn, const RoutingBuffers<Acc>& out) {
  check_no_overlap(fn, out.scores, "routing.scores", out.experts, "routing.experts");
  check_no_overlap(fn, out.scores, "routing.scores", out.units, "routing.units");
  check_no_overlap(fn, out.scores, "routing.scores", out.gates, "routing.gates");
  check_no_overlap(fn, out.scores, "routing.scores", out.counts, "routing.counts");
  check_no_overlap(fn, out.experts, "routing.experts", out.units, "routing.units");
  check_no_overlap(fn, out.experts, "routing.experts", out.gates, "routing.gates");
  check_no_overlap(fn, out.experts, "routing.experts", out.counts, "routing.counts");
  check_no_overlap(fn, out.units, "routing.units", out.gates, "routing.gates");
  check_no_overlap(fn, out.units, "routing.units", out.counts, "routing.counts");
  check_no_overlap(fn, out.gates, "routing.gates", out.counts, "routing.counts");
}

// dwr and dbias are written while the inputs are still to be read; dx is
// written last, after x is consumed, so only it may alias x.
template <class T, class Acc>
void check_router_gradient_overlaps(const char* fn, const MatrixView<const T>& x,
                                    const MatrixView<const T>& wr,
                                    const MatrixView<const Acc>& bias,
                                    const RoutingBuffers<Acc>& routing,
                                    const MatrixView<const Acc>& dgates, const MatrixView<T>& dx,
                                    const MatrixView<T>& dwr, const MatrixView<Acc>& dbias) {
  auto against_inputs = [&](const auto& out, const char* name) {
    check_no_overlap(fn, out, name, wr, "router weight wr (E x d_in)");
    check_no_overlap(fn, out, name, bias, "bias");
    check_no_overlap(fn, out, name, routing.scores, "routing.scores");
    check_no_overlap(fn, out, name, routing.experts, "routing.experts");
    check_no_overlap(fn, out, name, routing.counts, "routing.counts");
    check_no_overlap(fn, out, name, dgates, "dgates (n x k)");
  };
  against_inputs(dx, "dx (n x d_in)");
  against_inputs(dwr, "dwr (E x d_in)");
  against_inputs(dbias, "dbias");
  check_no_overlap(fn, dwr, "dwr (E x d_in)", x, "x (n x d_in)");
  check_no_overlap(fn, dbias, "dbias", x, "x (n x d_in)");
  check_no_overlap(fn, dwr, "dwr (E x d_in)", dx, "dx (n x d_in)");
  check_no_overlap(fn, dbias, "dbias", dx, "dx (n x d_in)");
  check_no_overlap(fn, dwr, "dwr (E x d_in)", dbias, "dbias");
}

}  // namespace detail

namespace detail {
// gemm_mixed scratch of router_backward: dwr has E rows over an inner n, dx
// n rows over an inner E; one block serves both.
template <class T>
std::int64_t router_mixed_scratch(std::int64_t n, std::int64_t num_experts) {
  const std::int64_t dwr = gemm_mixed_scratch<T>(num_experts, n);
  const std::int64_t dx = gemm_mixed_scratch<T>(n, num_experts);
  return dwr > dx ? dwr : dx;
}

// The workspaces of router_forward (and router_forward_from_logits, which
// router_forward calls on the same workspace, so both carve this one layout)
// and router_backward; *_workspace_bytes counts the same plans.
template <class T>
struct RouterBlocks {
  using Acc = accumulator_t<T>;
  MatrixView<Acc> logits;        // forward: x wrᵀ (n x E)
  MatrixView<std::int32_t> bad;  // forward: tokens with non-finite logits (1 x 1)
  MatrixView<Acc> dlogits, scratch, extra, dbias_tokens, mixed;  // backward
};

template <class T>
RouterBlocks<T> plan_router_forward(WorkspaceCarver& carve, std::int64_t n,
                                    const RouterConfig& cfg) {
  RouterBlocks<T> b;
  b.logits =
      carve.take<accumulator_t<T>>(n, cfg.num_experts(), "router_forward workspace logits (n x E)");
  b.bad = carve.take<std::int32_t>(1, 1, "router_forward_workspace_bytes");
  return b;
}

template <class T>
RouterBlocks<T> plan_router_backward(WorkspaceCarver& carve, std::int64_t n,
                                     const RouterConfig& cfg) {
  using Acc = accumulator_t<T>;
  const char* what = "router_backward_workspace_bytes";
  const char* per_token = "router_backward workspace (n x E)";
  RouterBlocks<T> b;
  // dlogits stays in Acc up to dwr and dx: in half it would underflow below 6e-8.
  b.dlogits = carve.take<Acc>(n, cfg.num_experts(), per_token);
  b.scratch = carve.take<Acc>(n, cfg.num_experts(), per_token);
  b.extra = carve.take<Acc>(1, cfg.num_experts(), what);
  b.dbias_tokens = carve.take<Acc>(n, cfg.num_choices(), "router_backward workspace dbias (n x C)");
  b.mixed = carve.take<Acc>(1, router_mixed_scratch<T>(n, cfg.num_experts()), what);
  return b;
}
}  // namespace detail

/// Workspace bytes for router_forward / router_forward_from_logits.
template <class T>
std::size_t router_forward_workspace_bytes(std::int64_t n, const RouterConfig& cfg) {
  return planned_workspace_bytes("router_forward_workspace_bytes", [&](WorkspaceCarver& c) {
    detail::plan_router_forward<T>(c, n, cfg);
  });
}

/// Workspace bytes for router_backward (with or without dbias).
template <class T>
std::size_t router_backward_workspace_bytes(std::int64_t n, const RouterConfig& cfg) {
  return planned_workspace_bytes("router_backward_workspace_bytes", [&](WorkspaceCarver& c) {
    detail::plan_router_backward<T>(c, n, cfg);
  });
}

/// Routes n tokens from given logits (n x E, Acc). bias: (1 x C) Acc or empty,
/// C = cfg.num_choices() (E, or r with a per-rank bias).
/// With check_finite, a non-finite logit or bias throws rankwise::error
/// naming how many tokens were affected; on the GPU that check reads one int
/// back from the device (a stream synchronisation), so engines that trust
/// their inputs turn it off. Unchecked, such a token gets zero gates.
/// No output may overlap another output, logits, bias, mask or the workspace
/// (checked on address ranges, throws before any work).
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
    check_view(bias, cfg.bias_per_rank ? "bias (1 x r)" : "bias (1 x E)", 1, cfg.num_choices(),
               space);
  }
  detail::check_mask<Backend>(mask, n);
  detail::check_routing_buffers<Backend>(out, cfg, n);
  constexpr const char* fn = "router_forward";
  detail::check_routing_outputs_disjoint(fn, out);
  detail::check_routing_disjoint(fn, out, logits, "logits (n x E)");
  detail::check_routing_disjoint(fn, out, bias, "bias");
  detail::check_routing_disjoint(fn, out, mask, "mask (1 x n)");
  WorkspaceCarver carve(workspace, workspace_bytes, space, "router_forward");
  // router_forward's layout: its logits (which may be `logits` here) stay untouched.
  const MatrixView<std::int32_t> bad = detail::plan_router_forward<T>(carve, n, cfg).bad;
  carve.check_disjoint(out.scores, "routing.scores");
  carve.check_disjoint(out.experts, "routing.experts");
  carve.check_disjoint(out.units, "routing.units");
  carve.check_disjoint(out.gates, "routing.gates");
  carve.check_disjoint(out.counts, "routing.counts");
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
  detail::check_routing_buffers<Backend>(out, cfg, x.rows);
  detail::check_routing_outputs_disjoint("router_forward", out);
  detail::check_routing_disjoint("router_forward", out, x, "x (n x d_in)");
  detail::check_routing_disjoint("router_forward", out, wr, "router weight wr (E x d_in)");
  WorkspaceCarver carve(workspace, workspace_bytes, space, "router_forward");
  const MatrixView<Acc> logits = detail::plan_router_forward<T>(carve, x.rows, cfg).logits;
  carve.check_disjoint(x, "x (n x d_in)");
  carve.check_disjoint(wr, "router weight wr (E x d_in)");
  Kernels<Backend, T>::gemm_acc(ctx, Acc(1), x, Op::kNoTrans, wr, Op::kTrans, Acc(0), logits);
  router_forward_from_logits<Backend, T>(ctx, cfg, logits, bias, mask, out, check_finite, workspace,
                                         workspace_bytes);
}

/// Backward of router_forward given ∂L/∂gates (n x k, Acc):
///   dwr (E x d_in) = dlogitsᵀ x   (overwritten, or added to with accumulate)
///   dx  (n x d_in) += dlogits wr   (skipped when dx is empty)
///   dbias (1 x C)  = Σ_n ∂L/∂bias (overwritten, or added to; skipped when
///                    empty): for a trained balance bias, nonzero only with
///                    gate_uses_bias (the selection has no gradient)
/// aux_loss_coef > 0 adds the gradient of the Switch auxiliary loss
/// (rankwise/core/routing.hpp, switch_aux_dscore) for the unmasked tokens.
/// The top-k choice itself has no gradient.
/// routing.experts indices outside [0, C): on the CPU a host scan before any
/// work throws naming the first (O(n · k/g)); on the GPU the kernels skip such
/// an index and count it in a device-side flag, with no host synchronisation.
/// dwr and dbias must not overlap x, dx, each other, the routing, dgates, wr,
/// bias or the workspace; dx the same except x (checked, throws).
template <class Backend, class T>
void router_backward(Context<Backend>& ctx, const RouterConfig& cfg, MatrixView<const T> x,
                     MatrixView<const T> wr, MatrixView<const accumulator_t<T>> bias,
                     TokenMask mask, const RoutingBuffers<accumulator_t<T>>& routing,
                     MatrixView<const accumulator_t<T>> dgates, double aux_loss_coef,
                     MatrixView<T> dx, MatrixView<T> dwr, MatrixView<accumulator_t<T>> dbias,
                     bool accumulate, void* workspace, std::size_t workspace_bytes) {
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
  const bool want_dbias = !dbias.empty() || dbias.data != nullptr;
  if (want_dbias)
    check_view(dbias, cfg.bias_per_rank ? "dbias (1 x r)" : "dbias (1 x E)", 1, cfg.num_choices(),
               space);
  RANKWISE_CHECK(std::isfinite(aux_loss_coef) && aux_loss_coef >= 0.0,
                 "router_backward: aux_loss_coef must be finite and >= 0, got ", aux_loss_coef);
  RANKWISE_CHECK(aux_loss_coef == 0.0 || !cfg.bias_per_rank,
                 "router_backward: the Switch auxiliary loss (aux_loss_coef = ", aux_loss_coef,
                 ") is defined over experts; it cannot be combined with a per-rank bias");
  // The choice indices may come from anywhere the caller kept the routing.
  detail::check_indices_on_host<Backend>("router_backward", "choice indices in", "routing.experts",
                                         routing.experts, cfg.num_choices(),
                                         cfg.bias_per_rank ? "r" : "E");
  detail::check_router_gradient_overlaps("router_backward", x, wr, bias, routing, dgates, dx, dwr,
                                         dbias);
  if (n == 0) {
    if (!accumulate) K::fill(ctx, dwr, 0.0);
    if (want_dbias && !accumulate) Kernels<Backend, Acc>::fill(ctx, dbias, 0.0);
    return;
  }
  WorkspaceCarver carve(workspace, workspace_bytes, space, "router_backward");
  const detail::RouterBlocks<T> blocks = detail::plan_router_backward<T>(carve, n, cfg);
  const MatrixView<Acc> dlogits = blocks.dlogits, scratch = blocks.scratch, extra = blocks.extra;
  const MatrixView<Acc> dbias_tokens = blocks.dbias_tokens, mixed = blocks.mixed;
  carve.check_disjoint(dx, "dx (n x d_in)");
  carve.check_disjoint(dwr, "dwr (E x d_in)");
  carve.check_disjoint(dbias, "dbias");
  carve.check_disjoint(x, "x (n x d_in)");
  carve.check_disjoint(wr, "router weight wr (E x d_in)");
  carve.check_disjoint(routing.scores, "routing.scores");
  carve.check_disjoint(routing.experts, "routing.experts");
  carve.check_disjoint(dgates, "dgates (n x k)");
  if (aux_loss_coef > 0.0) {
    K::aux_loss_grad(ctx, routing.counts, rule.choices_per_token, static_cast<Acc>(aux_loss_coef),
                     extra);
  }
  Kernels<Backend, Acc>::route_backward(
      ctx, rule, routing.scores, bias, routing.experts, dgates,
      aux_loss_coef > 0.0 ? MatrixView<const Acc>(extra) : MatrixView<const Acc>(), mask, scratch,
      dlogits, want_dbias ? dbias_tokens : MatrixView<Acc>());
  if (want_dbias) K::sum_rows(ctx, dbias_tokens, accumulate ? Acc(1) : Acc(0), dbias);
  K::gemm_mixed(ctx, Acc(1), dlogits, Op::kTrans, x, Op::kNoTrans, accumulate ? Acc(1) : Acc(0),
                dwr, mixed);
  if (!dx.empty()) {
    K::gemm_mixed(ctx, Acc(1), dlogits, Op::kNoTrans, wr, Op::kNoTrans, Acc(1), dx, mixed);
  }
}

/// router_backward without a bias gradient.
template <class Backend, class T>
void router_backward(Context<Backend>& ctx, const RouterConfig& cfg, MatrixView<const T> x,
                     MatrixView<const T> wr, MatrixView<const accumulator_t<T>> bias,
                     TokenMask mask, const RoutingBuffers<accumulator_t<T>>& routing,
                     MatrixView<const accumulator_t<T>> dgates, double aux_loss_coef,
                     MatrixView<T> dx, MatrixView<T> dwr, bool accumulate, void* workspace,
                     std::size_t workspace_bytes) {
  router_backward<Backend, T>(ctx, cfg, x, wr, bias, mask, routing, dgates, aux_loss_coef, dx, dwr,
                              MatrixView<accumulator_t<T>>(), accumulate, workspace,
                              workspace_bytes);
}

/// Loss-free balancing after a training forward: bias_c += u · sign(mean(counts) − c_c),
/// per choice (expert, or rank with a per-rank bias).
template <class Backend, class T>
void router_update_bias(Context<Backend>& ctx, const RouterConfig& cfg,
                        MatrixView<const std::int32_t> counts, MatrixView<accumulator_t<T>> bias) {
  cfg.validate();
  constexpr MemorySpace space = Backend::kMemorySpace;
  check_view(counts, cfg.bias_per_rank ? "counts (1 x r)" : "counts (1 x E)", 1, cfg.num_choices(),
             space);
  check_view(bias, cfg.bias_per_rank ? "bias (1 x r)" : "bias (1 x E)", 1, cfg.num_choices(),
             space);
  Kernels<Backend, T>::update_bias(ctx, counts, cfg.bias_update_rate, bias);
}

}  // namespace rankwise
