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
#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/unit_index.hpp"
#include "rankwise/core/workspace.hpp"

namespace rankwise {

/// Which implementation of the rank-unit products to run.
enum class RankUnitPath {
  kAuto,    ///< the backend's measured crossover (Kernels::prefer_dense)
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
  return Kernels<Backend, T>::prefer_dense(n, k, r) ? RankUnitPath::kDense : RankUnitPath::kSparse;
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

/// Workspace bytes for rank_units_forward with n tokens, k units per token,
/// rank r. Throws rankwise::error naming n, k or r when a size overflows int64.
template <class T>
std::size_t rank_units_forward_workspace_bytes(std::int64_t n, std::int64_t k, std::int64_t r) {
  using Acc = accumulator_t<T>;
  constexpr const char* what = "rank_units_forward_workspace_bytes";
  const std::size_t nk = workspace_block_bytes<Acc>(n, k, "rank_units_forward workspace (n x k)");
  const std::size_t sparse = workspace_blocks_bytes(2, nk, what);
  // Dense: H and the gates (n x r, Acc), and gemm_mixed's scratch for y += P Bt.
  const std::size_t nr = workspace_block_bytes<Acc>(n, r, "rank_units_forward workspace (n x r)");
  const std::size_t dense =
      checked_add_bytes(workspace_blocks_bytes(2, nr, what),
                        workspace_block_bytes<Acc>(1, gemm_mixed_scratch<T>(n, r), what), what);
  return sparse > dense ? sparse : dense;
}

/// Workspace bytes for rank_units_backward; throws as the forward's.
template <class T>
std::size_t rank_units_backward_workspace_bytes(std::int64_t n, std::int64_t k, std::int64_t r) {
  using Acc = accumulator_t<T>;
  constexpr const char* what = "rank_units_backward_workspace_bytes";
  const std::size_t nk = workspace_block_bytes<Acc>(n, k, "rank_units_backward workspace (n x k)");
  const std::size_t sparse = workspace_blocks_bytes(4, nk, what);
  // Both paths may also carve dgates (n x k) when the caller passes none.
  // Dense: H, dH and the gates (n x r, Acc), and gemm_mixed's scratch for
  // dBt, dA (r rows over n) and dx (n rows over r), one block reused.
  const std::size_t nr = workspace_block_bytes<Acc>(n, r, "rank_units_backward workspace (n x r)");
  const std::size_t dense = checked_add_bytes(
      checked_add_bytes(workspace_blocks_bytes(3, nr, what), workspace_blocks_bytes(3, nk, what),
                        what),
      workspace_block_bytes<Acc>(1, detail::dense_backward_mixed_scratch<T>(n, r), what), what);
  return sparse > dense ? sparse : dense;
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
  if (detail::resolve_path<Backend, T>(path, n, k, r) == RankUnitPath::kSparse) {
    MatrixView<Acc> h = carve.take<Acc>(n, k);     // a_u · x_n
    MatrixView<Acc> coef = carve.take<Acc>(n, k);  // gate · h
    detail::check_outside_workspace(carve, x, y, a, bt, routing);
    K::gather_dot(ctx, Acc(1), x, a, routing.units, h);
    K::hadamard(ctx, h, routing.gates, coef);
    K::gather_axpy(ctx, s, coef, bt, routing.units, y);
    return;
  }
  // H and P = gate ⊙ H stay in Acc up to the product with Bt: in half, small
  // gates underflow and large gates x H overflow.
  MatrixView<Acc> h = carve.take<Acc>(n, r);     // X Aᵀ, then masked by the gates
  MatrixView<Acc> gate = carve.take<Acc>(n, r);  // dense gates, 0 off the selection
  MatrixView<Acc> mixed = carve.take<Acc>(1, gemm_mixed_scratch<T>(n, r));
  detail::check_outside_workspace(carve, x, y, a, bt, routing);
  K::gemm_acc(ctx, Acc(1), x, Op::kNoTrans, a, Op::kTrans, Acc(0), h);
  K::densify(ctx, routing.units, routing.gates, gate);
  Kernels<Backend, Acc>::scale_by(ctx, gate, h);
  K::gemm_mixed(ctx, s, h, Op::kNoTrans, bt, Op::kNoTrans, Acc(1), y, mixed);
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
  MatrixView<Acc> dg = dgates.empty() ? carve.take<Acc>(n, k) : dgates;
  if (detail::resolve_path<Backend, T>(path, n, k, r) == RankUnitPath::kSparse) {
    MatrixView<Acc> h = carve.take<Acc>(n, k);   // a_u · x_n
    MatrixView<Acc> dp = carve.take<Acc>(n, k);  // scale · bt_u · dy_n
    MatrixView<Acc> tmp = carve.take<Acc>(n, k);
    detail::check_gradients_outside_workspace(carve, x, a, bt, routing, dy, dx, da, dbt, dgates);
    K::gather_dot(ctx, Acc(1), x, a, routing.units, h);
    K::gather_dot(ctx, s, dy, bt, routing.units, dp);
    K::hadamard(ctx, dp, h, dg);
    K::hadamard(ctx, h, routing.gates, tmp);  // gate · h
    K::scatter_axpy(ctx, s, tmp, dy, routing.units, beta, dbt);
    K::hadamard(ctx, dp, routing.gates, tmp);  // dH
    K::scatter_axpy(ctx, Acc(1), tmp, x, routing.units, beta, da);
    if (!dx.empty()) K::gather_axpy(ctx, Acc(1), tmp, a, routing.units, dx);
    return;
  }
  // H, dH and their gated forms stay in Acc up to the products with dY, X, A.
  using KA = Kernels<Backend, Acc>;
  MatrixView<Acc> h = carve.take<Acc>(n, r);     // X Aᵀ, then P = gate ⊙ H
  MatrixView<Acc> dp = carve.take<Acc>(n, r);    // scale · dY Bt ᵀ, then dH
  MatrixView<Acc> gate = carve.take<Acc>(n, r);  // dense gates
  MatrixView<Acc> hsel = carve.take<Acc>(n, k);
  MatrixView<Acc> dpsel = carve.take<Acc>(n, k);
  MatrixView<Acc> mixed = carve.take<Acc>(1, detail::dense_backward_mixed_scratch<T>(n, r));
  detail::check_gradients_outside_workspace(carve, x, a, bt, routing, dy, dx, da, dbt, dgates);
  K::gemm_acc(ctx, Acc(1), x, Op::kNoTrans, a, Op::kTrans, Acc(0), h);
  K::gemm_acc(ctx, s, dy, Op::kNoTrans, bt, Op::kTrans, Acc(0), dp);
  KA::gather_cols(ctx, h, routing.units, hsel);
  KA::gather_cols(ctx, dp, routing.units, dpsel);
  K::hadamard(ctx, dpsel, hsel, dg);
  K::densify(ctx, routing.units, routing.gates, gate);
  KA::scale_by(ctx, gate, h);
  KA::scale_by(ctx, gate, dp);
  K::gemm_mixed(ctx, s, h, Op::kTrans, dy, Op::kNoTrans, beta, dbt, mixed);
  K::gemm_mixed(ctx, Acc(1), dp, Op::kTrans, x, Op::kNoTrans, beta, da, mixed);
  if (!dx.empty()) K::gemm_mixed(ctx, Acc(1), dp, Op::kNoTrans, a, Op::kNoTrans, Acc(1), dx, mixed);
}

}  // namespace rankwise
