// Low-level routed rank units: y += s · Σ_j gate[n][j] · b_u (a_u · x_n) over
// the units u = units[n][j] a token selected, forward and backward. Every
// routed layer (SMoRA, block MoE-LoRA, LoRA-LEGO, multi-adapter batches) runs
// through these two functions; they choose between a sparse path (gather the
// k selected units) and a dense path (two GEMMs over all r units with the
// gates as a mask), which give the same numbers up to rounding.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/backend/tuning.hpp"
#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/unit_index.hpp"
#include "rankwise/core/workspace.hpp"

namespace rankwise {

/// Which implementation of the rank-unit products to run.
enum class RankUnitPath {
  kAuto,    ///< the backend's crossover (TuningPolicy<Backend>::prefer_dense)
  kSparse,  ///< gather the k selected units per token
  kDense,   ///< all r units by GEMM, unselected ones masked by a zero gate
};

/// A routing result: per token, k unit indices and their gates, in the
/// backend's memory space. units (n x k) int32 in [0, r); gates (n x k) Acc.
template <class Acc>
struct UnitRouting {
  MatrixView<const std::int32_t> units;
  MatrixView<const Acc> gates;
};

namespace detail {

template <class Backend, class T>
RankUnitPath resolve_path(RankUnitPath path, std::int64_t n, std::int64_t k, std::int64_t r) {
  if (path != RankUnitPath::kAuto) return path;
  return TuningPolicy<Backend>::prefer_dense(n, k, r) ? RankUnitPath::kDense
                                                      : RankUnitPath::kSparse;
}

// A routing view may broadcast one row to every token (ld = 0), as layers
// whose tokens all use the same units do (LoRA-LEGO, MoS); it is then
// checked as the single row it is.
template <class U>
void check_broadcastable(const MatrixView<U>& v, const char* name, std::int64_t rows,
                         std::int64_t cols, MemorySpace space) {
  if (v.ld == 0 && v.rows > 1) {
    RANKWISE_CHECK(v.rows == rows, name, ": expected ", rows, " rows, got ", v.rows);
    check_view(MatrixView<U>(v.data, 1, v.cols, v.space), name, 1, cols, space);
  } else {
    check_view(v, name, rows, cols, space);
  }
}

// The index policy of every op that follows unit or expert indices. CPU
// (host memory): the indices are scanned on the host before any work, O(n · k)
// reads, and one outside [0, count) throws naming the first. GPU: no scan here,
// since reading the result back would synchronise the stream on the hot path;
// the kernels test each index with valid_unit_index, skip a bad one and count
// it in a device-side flag.
template <class Backend>
void check_indices_on_host(const char* fn, const char* what, const char* name,
                           const MatrixView<const std::int32_t>& indices, std::int64_t count,
                           const char* bound) {
  if constexpr (Backend::kMemorySpace == MemorySpace::kHost) {
    const IndexScan scan = scan_unit_indices(indices, count);
    const bool broadcast_row = indices.ld == 0 && indices.rows > 1;
    RANKWISE_CHECK(scan.invalid == 0, fn, ": routing: ", scan.invalid, " of ",
                   broadcast_row ? indices.cols : indices.size(), " ", what, " ", name, " ",
                   shape_of(indices), " are outside [0, ", bound, " = ", count, "); the first is ",
                   name, "[", scan.row, "][", scan.col, "] = ", scan.value);
  }
}

template <class Backend, class T, class Acc>
void check_unit_routing(const char* fn, const UnitRouting<Acc>& routing, std::int64_t n,
                        std::int64_t rank) {
  constexpr MemorySpace space = Backend::kMemorySpace;
  RANKWISE_CHECK(routing.units.cols > 0, fn, ": units must have at least one column, got ",
                 shape_of(routing.units));
  check_broadcastable(routing.units, "units (n x k)", n, routing.units.cols, space);
  check_broadcastable(routing.gates, "gates (n x k)", n, routing.units.cols, space);
  check_indices_on_host<Backend>(fn, "unit indices in", "units", routing.units, rank, "r");
}

// Every operand of a rank-unit op must lie outside the workspace blocks it
// carved: the op writes them while it reads the operands.
template <class T, class Acc>
void check_outside_workspace(const WorkspaceCarver& carve, const MatrixView<const T>& x,
                             const MatrixView<T>& y, const MatrixView<const T>& a,
                             const MatrixView<const T>& bt, const UnitRouting<Acc>& routing) {
  carve.check_disjoint(x, "x (n x d_in)");
  carve.check_disjoint(y, "y (n x d_out)");
  carve.check_disjoint(a, "a (r x d_in)");
  carve.check_disjoint(bt, "bt (r x d_out)");
  carve.check_disjoint(routing.units, "units (n x k)");
  carve.check_disjoint(routing.gates, "gates (n x k)");
}

template <class T, class Acc>
void check_gradients_outside_workspace(const WorkspaceCarver& carve, const MatrixView<const T>& x,
                                       const MatrixView<const T>& a, const MatrixView<const T>& bt,
                                       const UnitRouting<Acc>& routing,
                                       const MatrixView<const T>& dy, const MatrixView<T>& dx,
                                       const MatrixView<T>& da, const MatrixView<T>& dbt,
                                       const MatrixView<Acc>& dgates) {
  carve.check_disjoint(x, "x (n x d_in)");
  carve.check_disjoint(a, "a (r x d_in)");
  carve.check_disjoint(bt, "bt (r x d_out)");
  carve.check_disjoint(routing.units, "units (n x k)");
  carve.check_disjoint(routing.gates, "gates (n x k)");
  carve.check_disjoint(dy, "dy (n x d_out)");
  carve.check_disjoint(dx, "dx (n x d_in)");
  carve.check_disjoint(da, "da (r x d_in)");
  carve.check_disjoint(dbt, "dbt (r x d_out)");
  carve.check_disjoint(dgates, "dgates (n x k)");
}

// da, dbt and dgates are written while every input is still to be read; dx is
// written last, after x and dy are consumed, so only it may alias them.
template <class T, class Acc>
void check_gradient_overlaps(const char* fn, const MatrixView<const T>& x,
                             const MatrixView<const T>& a, const MatrixView<const T>& bt,
                             const UnitRouting<Acc>& routing, const MatrixView<const T>& dy,
                             const MatrixView<T>& dx, const MatrixView<T>& da,
                             const MatrixView<T>& dbt, const MatrixView<Acc>& dgates) {
  auto against_inputs = [&](const auto& out, const char* name) {
    check_no_overlap(fn, out, name, a, "a (r x d_in)");
    check_no_overlap(fn, out, name, bt, "bt (r x d_out)");
    check_no_overlap(fn, out, name, routing.units, "units (n x k)");
    check_no_overlap(fn, out, name, routing.gates, "gates (n x k)");
  };
  against_inputs(dx, "dx (n x d_in)");
  against_inputs(da, "da (r x d_in)");
  against_inputs(dbt, "dbt (r x d_out)");
  against_inputs(dgates, "dgates (n x k)");
  auto against_streams = [&](const auto& out, const char* name) {
    check_no_overlap(fn, out, name, x, "x (n x d_in)");
    check_no_overlap(fn, out, name, dy, "dy (n x d_out)");
    check_no_overlap(fn, out, name, dx, "dx (n x d_in)");
  };
  against_streams(da, "da (r x d_in)");
  against_streams(dbt, "dbt (r x d_out)");
  against_streams(dgates, "dgates (n x k)");
  check_no_overlap(fn, da, "da (r x d_in)", dbt, "dbt (r x d_out)");
  check_no_overlap(fn, da, "da (r x d_in)", dgates, "dgates (n x k)");
  check_no_overlap(fn, dbt, "dbt (r x d_out)", dgates, "dgates (n x k)");
}

}  // namespace detail

/// Workspace bytes for check_unit_routing.
inline std::size_t check_unit_routing_workspace_bytes() {
  return workspace_block_bytes<std::int32_t>(1, 1);
}

/// Validates a routing supplied by the caller for n tokens over r units:
/// shapes, memory space, and every index in [0, r). Throws rankwise::error
/// with the number of bad indices. On the GPU the index check reads one int
/// back (a stream synchronisation).
template <class Backend, class T>
void check_unit_routing(Context<Backend>& ctx, const UnitRouting<accumulator_t<T>>& routing,
                        std::int64_t n, std::int64_t rank, void* workspace,
                        std::size_t workspace_bytes) {
  using K = Kernels<Backend, T>;
  detail::check_unit_routing<Backend, T>("check_unit_routing", routing, n, rank);
  WorkspaceCarver carve(workspace, workspace_bytes, Backend::kMemorySpace, "check_unit_routing");
  MatrixView<std::int32_t> bad = carve.take<std::int32_t>(1, 1);
  K::check_units(ctx, routing.units, rank, bad);
  const std::int32_t out_of_range = K::read_int(ctx, bad);
  RANKWISE_CHECK(out_of_range == 0, "routing: ", out_of_range, " of ", routing.units.size(),
                 " unit indices in units ", shape_of(routing.units), " are outside [0, r = ", rank,
                 ")");
}

namespace detail {
// gemm_mixed scratch of the dense backward: dBt and dA have r rows over an
// inner n, dx has n rows over an inner r.
template <class T>
std::int64_t dense_backward_mixed_scratch(std::int64_t n, std::int64_t r) {
  const std::int64_t by_units = gemm_mixed_scratch<T>(r, n),
                     by_tokens = gemm_mixed_scratch<T>(n, r);
  return by_units > by_tokens ? by_units : by_tokens;
}
}  // namespace detail

namespace detail {

// The workspaces of rank_units_forward / rank_units_backward, one plan per op
// and path: the ops carve them, *_workspace_bytes counts the larger path.
template <class T>
struct RankUnitBlocks {
  using Acc = accumulator_t<T>;
  MatrixView<Acc> dgates;              // backward, when the caller passes none (n x k)
  MatrixView<Acc> h, dp, gate, coef;   // sparse (n x k); dense h, dp, gate (n x r)
  MatrixView<Acc> hsel, dpsel, mixed;  // dense backward (n x k); gemm_mixed scratch
};

template <class T>
RankUnitBlocks<T> plan_rank_units_forward(WorkspaceCarver& carve, RankUnitPath path, std::int64_t n,
                                          std::int64_t k, std::int64_t r) {
  using Acc = accumulator_t<T>;
  RankUnitBlocks<T> b;
  if (path == RankUnitPath::kSparse) {
    const char* nk = "rank_units_forward workspace (n x k)";
    b.h = carve.take<Acc>(n, k, nk);     // a_u · x_n
    b.coef = carve.take<Acc>(n, k, nk);  // gate · h
    return b;
  }
  // Dense: H and the gates (n x r), and gemm_mixed's scratch for y += P Bt.
  const char* nr = "rank_units_forward workspace (n x r)";
  b.h = carve.take<Acc>(n, r, nr);     // X Aᵀ, then masked by the gates
  b.gate = carve.take<Acc>(n, r, nr);  // dense gates, 0 off the selection
  b.mixed = carve.take<Acc>(1, gemm_mixed_scratch<T>(n, r), "rank_units_forward_workspace_bytes");
  return b;
}

template <class T>
RankUnitBlocks<T> plan_rank_units_backward(WorkspaceCarver& carve, RankUnitPath path,
                                           std::int64_t n, std::int64_t k, std::int64_t r,
                                           bool own_dgates) {
  using Acc = accumulator_t<T>;
  const char* nk = "rank_units_backward workspace (n x k)";
  RankUnitBlocks<T> b;
  if (own_dgates) b.dgates = carve.take<Acc>(n, k, nk);
  if (path == RankUnitPath::kSparse) {
    b.h = carve.take<Acc>(n, k, nk);     // a_u · x_n
    b.dp = carve.take<Acc>(n, k, nk);    // scale · bt_u · dy_n
    b.coef = carve.take<Acc>(n, k, nk);  // gate · h, then dH
    return b;
  }
  // Dense: H, dH and the gates (n x r), the selected H and dH (n x k), and
  // gemm_mixed's scratch for dBt, dA (r rows over n) and dx (n rows over r).
  const char* nr = "rank_units_backward workspace (n x r)";
  b.h = carve.take<Acc>(n, r, nr);     // X Aᵀ, then P = gate ⊙ H
  b.dp = carve.take<Acc>(n, r, nr);    // scale · dY Bt ᵀ, then dH
  b.gate = carve.take<Acc>(n, r, nr);  // dense gates
  b.hsel = carve.take<Acc>(n, k, nk);
  b.dpsel = carve.take<Acc>(n, k, nk);
  b.mixed = carve.take<Acc>(1, dense_backward_mixed_scratch<T>(n, r),
                            "rank_units_backward_workspace_bytes");
  return b;
}

}  // namespace detail

/// Workspace bytes for rank_units_forward with n tokens, k units per token,
/// rank r, on either path. Throws rankwise::error naming n, k or r when a
/// size overflows int64.
template <class T>
std::size_t rank_units_forward_workspace_bytes(std::int64_t n, std::int64_t k, std::int64_t r) {
  std::size_t most = 0;
  for (const RankUnitPath path : {RankUnitPath::kSparse, RankUnitPath::kDense}) {
    const std::size_t bytes = planned_workspace_bytes(
        "rank_units_forward_workspace_bytes",
        [&](WorkspaceCarver& c) { detail::plan_rank_units_forward<T>(c, path, n, k, r); });
    most = bytes > most ? bytes : most;
  }
  return most;
}

/// Workspace bytes for rank_units_backward (dgates carved when the caller
/// passes none); throws as the forward's.
template <class T>
std::size_t rank_units_backward_workspace_bytes(std::int64_t n, std::int64_t k, std::int64_t r) {
  std::size_t most = 0;
  for (const RankUnitPath path : {RankUnitPath::kSparse, RankUnitPath::kDense}) {
    const std::size_t bytes = planned_workspace_bytes(
        "rank_units_backward_workspace_bytes",
        [&](WorkspaceCarver& c) { detail::plan_rank_units_backward<T>(c, path, n, k, r, true); });
    most = bytes > most ? bytes : most;
  }
  return most;
}

/// y += scale · Σ_j gates[n][j] · bt[u] (a[u] · x[n]), u = units[n][j].
///   x (n x d_in), a (r x d_in), bt (r x d_out), y (n x d_out): backend memory.
/// Any k >= 1 (repeated units add up). Unit indices outside [0, r): on the
/// CPU a host scan before any work throws naming the first (O(n · k) reads:
/// about 0.02% of this op at d = 4096, r = 64, k = 8, n = 1 to 512); on the
/// GPU nothing synchronises, the
/// kernels skip such an index (its term is dropped) and count it in a
/// device-side flag; check_unit_routing gives a checked result on both.
/// y must not overlap the workspace, a, bt or the routing (checked, throws);
/// y may be x itself (x is read before y is written). Overlaps the cheap
/// address-range test cannot see, such as one allocation mapped at two
/// addresses, are not detected.
template <class Backend, class T>
void rank_units_forward(Context<Backend>& ctx, double scale, MatrixView<const T> x,
                        MatrixView<const T> a, MatrixView<const T> bt,
                        UnitRouting<accumulator_t<T>> routing, MatrixView<T> y, RankUnitPath path,
                        void* workspace, std::size_t workspace_bytes) {
  using K = Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  constexpr MemorySpace space = Backend::kMemorySpace;
  RANKWISE_CHECK(std::isfinite(scale), "rank_units_forward: scale must be finite, got ", scale);
  check_view(a, "a (r x d_in)", a.rows, a.cols, space);
  check_view(bt, "bt (r x d_out)", a.rows, bt.cols, space);
  check_view(x, "x (n x d_in)", x.rows, a.cols, space);
  check_view(y, "y (n x d_out)", x.rows, bt.cols, space);
  detail::check_unit_routing<Backend, T>("rank_units_forward", routing, x.rows, a.rows);
  constexpr const char* fn = "rank_units_forward";
  check_no_overlap(fn, y, "y (n x d_out)", a, "a (r x d_in)");
  check_no_overlap(fn, y, "y (n x d_out)", bt, "bt (r x d_out)");
  check_no_overlap(fn, y, "y (n x d_out)", routing.units, "units (n x k)");
  check_no_overlap(fn, y, "y (n x d_out)", routing.gates, "gates (n x k)");
  const std::int64_t n = x.rows, k = routing.units.cols, r = a.rows;
  if (n == 0) return;
  WorkspaceCarver carve(workspace, workspace_bytes, space, fn);
  const auto s = static_cast<Acc>(scale);
  const RankUnitPath resolved = detail::resolve_path<Backend, T>(path, n, k, r);
  const detail::RankUnitBlocks<T> b = detail::plan_rank_units_forward<T>(carve, resolved, n, k, r);
  detail::check_outside_workspace(carve, x, y, a, bt, routing);
  if (resolved == RankUnitPath::kSparse) {
    K::gather_dot(ctx, Acc(1), x, a, routing.units, b.h);
    K::hadamard(ctx, b.h, routing.gates, b.coef);
    K::gather_axpy(ctx, s, b.coef, bt, routing.units, y);
    return;
  }
  // H and P = gate ⊙ H stay in Acc up to the product with Bt: in half, small
  // gates underflow and large gates x H overflow.
  K::gemm_acc(ctx, Acc(1), x, Op::kNoTrans, a, Op::kTrans, Acc(0), b.h);
  K::densify(ctx, routing.units, routing.gates, b.gate);
  Kernels<Backend, Acc>::scale_by(ctx, b.gate, b.h);
  K::gemm_mixed(ctx, s, b.h, Op::kNoTrans, bt, Op::kNoTrans, Acc(1), y, b.mixed);
}

/// Gradients of rank_units_forward given dy (n x d_out):
///   dgates (n x k, Acc) = scale · (bt[u] · dy[n]) · (a[u] · x[n])     overwritten
///   da  (r x d_in)  = Σ dH ⊗ x,   dbt (r x d_out) = scale · Σ gate·h ⊗ dy
///                     (overwritten, or added to with accumulate)
///   dx  (n x d_in) += Σ_j dH[n][j] a[u], skipped when dx is empty
/// dH = scale · gate · (bt[u] · dy[n]). Deterministic on every backend.
/// Unit indices and k as for rank_units_forward. The outputs da, dbt and
/// dgates must not overlap each other, the workspace or any input, nor dx
/// the workspace, a, bt, the routing or the other outputs (checked, throws);
/// dx may be x or dy.
template <class Backend, class T>
void rank_units_backward(Context<Backend>& ctx, double scale, MatrixView<const T> x,
                         MatrixView<const T> a, MatrixView<const T> bt,
                         UnitRouting<accumulator_t<T>> routing, MatrixView<const T> dy,
                         MatrixView<T> dx, MatrixView<T> da, MatrixView<T> dbt,
                         MatrixView<accumulator_t<T>> dgates, bool accumulate, RankUnitPath path,
                         void* workspace, std::size_t workspace_bytes) {
  using K = Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  constexpr MemorySpace space = Backend::kMemorySpace;
  RANKWISE_CHECK(std::isfinite(scale), "rank_units_backward: scale must be finite, got ", scale);
  check_view(a, "a (r x d_in)", a.rows, a.cols, space);
  check_view(bt, "bt (r x d_out)", a.rows, bt.cols, space);
  check_view(x, "x (n x d_in)", x.rows, a.cols, space);
  check_view(dy, "dy (n x d_out)", x.rows, bt.cols, space);
  detail::check_unit_routing<Backend, T>("rank_units_backward", routing, x.rows, a.rows);
  if (!dx.empty() || dx.data != nullptr) check_view(dx, "dx (n x d_in)", x.rows, a.cols, space);
  check_view(da, "da (r x d_in)", a.rows, a.cols, space);
  check_view(dbt, "dbt (r x d_out)", a.rows, bt.cols, space);
  if (!dgates.empty() || dgates.data != nullptr) {
    check_view(dgates, "dgates (n x k)", x.rows, routing.units.cols, space);
  }
  constexpr const char* fn = "rank_units_backward";
  detail::check_gradient_overlaps(fn, x, a, bt, routing, dy, dx, da, dbt, dgates);
  const std::int64_t n = x.rows, k = routing.units.cols, r = a.rows;
  const Acc beta = accumulate ? Acc(1) : Acc(0);
  if (n == 0) {
    if (!accumulate) {
      K::fill(ctx, da, 0.0);
      K::fill(ctx, dbt, 0.0);
    }
    return;
  }
  WorkspaceCarver carve(workspace, workspace_bytes, space, fn);
  const auto s = static_cast<Acc>(scale);
  const RankUnitPath resolved = detail::resolve_path<Backend, T>(path, n, k, r);
  const detail::RankUnitBlocks<T> b =
      detail::plan_rank_units_backward<T>(carve, resolved, n, k, r, dgates.empty());
  const MatrixView<Acc> dg = dgates.empty() ? b.dgates : dgates;
  detail::check_gradients_outside_workspace(carve, x, a, bt, routing, dy, dx, da, dbt, dgates);
  if (resolved == RankUnitPath::kSparse) {
    K::gather_dot(ctx, Acc(1), x, a, routing.units, b.h);
    K::gather_dot(ctx, s, dy, bt, routing.units, b.dp);
    K::hadamard(ctx, b.dp, b.h, dg);
    K::hadamard(ctx, b.h, routing.gates, b.coef);  // gate · h
    K::scatter_axpy(ctx, s, b.coef, dy, routing.units, beta, dbt);
    K::hadamard(ctx, b.dp, routing.gates, b.coef);  // dH
    K::scatter_axpy(ctx, Acc(1), b.coef, x, routing.units, beta, da);
    if (!dx.empty()) K::gather_axpy(ctx, Acc(1), b.coef, a, routing.units, dx);
    return;
  }
  // H, dH and their gated forms stay in Acc up to the products with dY, X, A.
  using KA = Kernels<Backend, Acc>;
  K::gemm_acc(ctx, Acc(1), x, Op::kNoTrans, a, Op::kTrans, Acc(0), b.h);
  K::gemm_acc(ctx, s, dy, Op::kNoTrans, bt, Op::kTrans, Acc(0), b.dp);
  KA::gather_cols(ctx, b.h, routing.units, b.hsel);
  KA::gather_cols(ctx, b.dp, routing.units, b.dpsel);
  K::hadamard(ctx, b.dpsel, b.hsel, dg);
  K::densify(ctx, routing.units, routing.gates, b.gate);
  KA::scale_by(ctx, b.gate, b.h);
  KA::scale_by(ctx, b.gate, b.dp);
  K::gemm_mixed(ctx, s, b.h, Op::kTrans, dy, Op::kNoTrans, beta, dbt, b.mixed);
  K::gemm_mixed(ctx, Acc(1), b.dp, Op::kTrans, x, Op::kNoTrans, beta, da, b.mixed);
  if (!dx.empty()) {
    K::gemm_mixed(ctx, Acc(1), b.dp, Op::kNoTrans, a, Op::kNoTrans, Acc(1), dx, b.mixed);
  }
}

}  // namespace rankwise
