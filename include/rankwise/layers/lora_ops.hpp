// Low-level LoRA: stateless forward, backward and merge on caller-owned memory.
//
// Internal layout is rank-major: a (r x d_in) as in PEFT, and bt = Bᵀ (r x d_out),
// so each rank unit's two vectors are contiguous rows (a gather of units is a
// contiguous read on CPU and a coalesced one on GPU). Every pointer lives in the
// backend's memory space; nothing is copied to the host.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/error.hpp"
#include "rankwise/core/lora_config.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/workspace.hpp"

namespace rankwise {

namespace detail {

// The workspace of lora_forward (H = X Aᵀ) and lora_backward (H and dH), each
// n x r: the one layout that the ops carve and *_workspace_bytes counts.
template <class T>
struct LoraBlocks {
  MatrixView<T> h, dh;
};
template <class T>
LoraBlocks<T> plan_lora(WorkspaceCarver& carve, bool backward, std::int64_t n, std::int64_t rank) {
  const char* what =
      backward ? "lora_backward workspace H, dH (n x r)" : "lora_forward workspace H (n x r)";
  LoraBlocks<T> blocks;
  blocks.h = carve.take<T>(n, rank, what);
  if (backward) blocks.dh = carve.take<T>(n, rank, what);
  return blocks;
}

}  // namespace detail

/// Workspace bytes lora_forward needs for n tokens at rank r: H = X Aᵀ (n x r).
/// Throws rankwise::error naming n and r when the size overflows int64.
template <class T>
std::size_t lora_forward_workspace_bytes(std::int64_t n, std::int64_t rank) {
  return planned_workspace_bytes("lora_forward_workspace_bytes", [&](WorkspaceCarver& c) {
    detail::plan_lora<T>(c, false, n, rank);
  });
}

/// Workspace bytes lora_backward needs: H and dH (each n x r); throws as the forward's.
template <class T>
std::size_t lora_backward_workspace_bytes(std::int64_t n, std::int64_t rank) {
  return planned_workspace_bytes("lora_backward_workspace_bytes", [&](WorkspaceCarver& c) {
    detail::plan_lora<T>(c, true, n, rank);
  });
}

namespace detail {

template <class Backend, class T>
void check_lora_factors(const char* fn, double scale, const MatrixView<const T>& a,
                        const MatrixView<const T>& bt) {
  constexpr MemorySpace space = Backend::kMemorySpace;
  RANKWISE_CHECK(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  RANKWISE_CHECK(a.rows > 0, fn, ": a must have at least one rank (row), got ", shape_of(a));
  check_view(a, "a (r x d_in)", a.rows, a.cols, space);
  check_view(bt, "bt (r x d_out)", a.rows, bt.cols, space);
}

// da and dbt are written while x, dy, a and bt are still to be read; dx is
// written last, so only it may alias x or dy.
template <class T>
void check_lora_gradient_overlaps(const char* fn, const MatrixView<const T>& x,
                                  const MatrixView<const T>& a, const MatrixView<const T>& bt,
                                  const MatrixView<const T>& dy, const MatrixView<T>& dx,
                                  const MatrixView<T>& da, const MatrixView<T>& dbt) {
  auto against_inputs = [&](const MatrixView<T>& out, const char* name) {
    check_no_overlap(fn, out, name, a, "a (r x d_in)");
    check_no_overlap(fn, out, name, bt, "bt (r x d_out)");
  };
  against_inputs(dx, "dx (n x d_in)");
  against_inputs(da, "da (r x d_in)");
  against_inputs(dbt, "dbt (r x d_out)");
  auto against_streams = [&](const MatrixView<T>& out, const char* name) {
    check_no_overlap(fn, out, name, x, "x (n x d_in)");
    check_no_overlap(fn, out, name, dy, "dy (n x d_out)");
    check_no_overlap(fn, out, name, dx, "dx (n x d_in)");
  };
  against_streams(da, "da (r x d_in)");
  against_streams(dbt, "dbt (r x d_out)");
  check_no_overlap(fn, da, "da (r x d_in)", dbt, "dbt (r x d_out)");
}

}  // namespace detail

/// y += scale * X Aᵀ B ᵀ for the n rows of x.
///   x  (n x d_in), a (r x d_in), bt (r x d_out), y (n x d_out); all in the
///   backend's memory space. workspace: lora_forward_workspace_bytes<T>(n, r)
///   bytes, 256-byte aligned, same memory space.
/// Throws rankwise::error on mismatched shapes, null data, wrong memory space,
/// a non-finite scale, a short workspace, sizes that overflow int64, or y
/// sharing memory with a, bt or the workspace, before any work is queued. y
/// may be x itself (x is read before y is written).
template <class Backend, class T>
void lora_forward(Context<Backend>& ctx, double scale, MatrixView<const T> x, MatrixView<const T> a,
                  MatrixView<const T> bt, MatrixView<T> y, void* workspace,
                  std::size_t workspace_bytes) {
  using K = Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  constexpr MemorySpace space = Backend::kMemorySpace;
  detail::check_lora_factors<Backend, T>("lora_forward", scale, a, bt);
  check_view(x, "x (n x d_in)", x.rows, a.cols, space);
  check_view(y, "y (n x d_out)", x.rows, bt.cols, space);
  check_no_overlap("lora_forward", y, "y (n x d_out)", a, "a (r x d_in)");
  check_no_overlap("lora_forward", y, "y (n x d_out)", bt, "bt (r x d_out)");
  if (x.rows == 0) return;
  WorkspaceCarver carve(workspace, workspace_bytes, space, "lora_forward");
  const MatrixView<T> h = detail::plan_lora<T>(carve, false, x.rows, a.rows).h;  // (n, r)
  carve.check_disjoint(x, "x (n x d_in)");
  carve.check_disjoint(y, "y (n x d_out)");
  carve.check_disjoint(a, "a (r x d_in)");
  carve.check_disjoint(bt, "bt (r x d_out)");
  K::gemm(ctx, Acc(1), x, Op::kNoTrans, a, Op::kTrans, Acc(0), h);
  K::gemm(ctx, static_cast<Acc>(scale), h, Op::kNoTrans, bt, Op::kNoTrans, Acc(1), y);
}

/// Gradients of y += scale * X Aᵀ Bᵀ given dy = ∂L/∂y:
///   da  = dHᵀ X            (r x d_in),  dH = scale * dy B
///   dbt = scale * Hᵀ dy    (r x d_out), H  = X Aᵀ
///   dx += dH A             (n x d_in), skipped when dx is empty
/// da and dbt are overwritten, or added to when `accumulate` is true (several
/// calls summing into one gradient). workspace: lora_backward_workspace_bytes.
/// da and dbt must not overlap each other, an input, dx or the workspace; dx
/// must not overlap a, bt, da, dbt or the workspace (checked, throws); dx may
/// be x or dy (both are consumed before dx is written).
template <class Backend, class T>
void lora_backward(Context<Backend>& ctx, double scale, MatrixView<const T> x,
                   MatrixView<const T> a, MatrixView<const T> bt, MatrixView<const T> dy,
                   MatrixView<T> dx, MatrixView<T> da, MatrixView<T> dbt, bool accumulate,
                   void* workspace, std::size_t workspace_bytes) {
  using K = Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  constexpr MemorySpace space = Backend::kMemorySpace;
  detail::check_lora_factors<Backend, T>("lora_backward", scale, a, bt);
  check_view(x, "x (n x d_in)", x.rows, a.cols, space);
  check_view(dy, "dy (n x d_out)", x.rows, bt.cols, space);
  if (!dx.empty() || dx.data != nullptr) check_view(dx, "dx (n x d_in)", x.rows, a.cols, space);
  check_view(da, "da (r x d_in)", a.rows, a.cols, space);
  check_view(dbt, "dbt (r x d_out)", a.rows, bt.cols, space);
  detail::check_lora_gradient_overlaps("lora_backward", x, a, bt, dy, dx, da, dbt);
  const Acc beta = accumulate ? Acc(1) : Acc(0);
  if (x.rows == 0) {
    if (!accumulate) {
      K::fill(ctx, da, 0.0);
      K::fill(ctx, dbt, 0.0);
    }
    return;
  }
  WorkspaceCarver carve(workspace, workspace_bytes, space, "lora_backward");
  const detail::LoraBlocks<T> blocks = detail::plan_lora<T>(carve, true, x.rows, a.rows);
  const MatrixView<T> h = blocks.h, dh = blocks.dh;  // (n, r) each
  carve.check_disjoint(x, "x (n x d_in)");
  carve.check_disjoint(a, "a (r x d_in)");
  carve.check_disjoint(bt, "bt (r x d_out)");
  carve.check_disjoint(dy, "dy (n x d_out)");
  carve.check_disjoint(dx, "dx (n x d_in)");
  carve.check_disjoint(da, "da (r x d_in)");
  carve.check_disjoint(dbt, "dbt (r x d_out)");
  const auto s = static_cast<Acc>(scale);
  K::gemm(ctx, Acc(1), x, Op::kNoTrans, a, Op::kTrans, Acc(0), h);
  K::gemm(ctx, s, dy, Op::kNoTrans, bt, Op::kTrans, Acc(0), dh);
  K::gemm(ctx, s, h, Op::kTrans, dy, Op::kNoTrans, beta, dbt);
  K::gemm(ctx, Acc(1), dh, Op::kTrans, x, Op::kNoTrans, beta, da);
  if (!dx.empty()) K::gemm(ctx, Acc(1), dh, Op::kNoTrans, a, Op::kNoTrans, Acc(1), dx);
}

/// w0 += sign * scale * B A, the adapter folded into the base weight.
/// w0 is (d_out x d_in) for WeightLayout::kOutIn or (d_in x d_out) for kInOut.
/// sign = +1 merges, -1 unmerges.
template <class Backend, class T>
void lora_merge(Context<Backend>& ctx, double scale, MatrixView<const T> a, MatrixView<const T> bt,
                MatrixView<T> w0, WeightLayout layout, double sign) {
  using K = Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  detail::check_lora_factors<Backend, T>("lora_merge", scale, a, bt);
  const auto s = static_cast<Acc>(sign * scale);
  if (layout == WeightLayout::kOutIn) {
    check_view(w0, "w0 (d_out x d_in)", bt.cols, a.cols, Backend::kMemorySpace);
  } else {
    check_view(w0, "w0 (d_in x d_out), fan_in_fan_out", a.cols, bt.cols, Backend::kMemorySpace);
  }
  check_no_overlap("lora_merge", w0, "w0", a, "a (r x d_in)");
  check_no_overlap("lora_merge", w0, "w0", bt, "bt (r x d_out)");
  if (layout == WeightLayout::kOutIn) {
    K::gemm(ctx, s, bt, Op::kTrans, a, Op::kNoTrans, Acc(1), w0);
  } else {
    K::gemm(ctx, s, a, Op::kTrans, bt, Op::kNoTrans, Acc(1), w0);
  }
}

/// y = x W0ᵀ (kOutIn) or x W0 (kInOut): the frozen base product.
template <class Backend, class T>
void base_forward(Context<Backend>& ctx, MatrixView<const T> x, MatrixView<const T> w0,
                  WeightLayout layout, MatrixView<T> y) {
  using Acc = accumulator_t<T>;
  constexpr MemorySpace space = Backend::kMemorySpace;
  const bool out_in = layout == WeightLayout::kOutIn;
  const std::int64_t d_in = out_in ? w0.cols : w0.rows;
  const std::int64_t d_out = out_in ? w0.rows : w0.cols;
  check_view(w0, out_in ? "w0 (d_out x d_in)" : "w0 (d_in x d_out), fan_in_fan_out", w0.rows,
             w0.cols, space);
  check_view(x, "x (n x d_in)", x.rows, d_in, space);
  check_view(y, "y (n x d_out)", x.rows, d_out, space);
  check_no_overlap("base_forward", y, "y (n x d_out)", x, "x (n x d_in)");
  check_no_overlap("base_forward", y, "y (n x d_out)", w0, "w0");
  Kernels<Backend, T>::gemm(ctx, Acc(1), x, Op::kNoTrans, w0, out_in ? Op::kTrans : Op::kNoTrans,
                            Acc(0), y);
}

}  // namespace rankwise
