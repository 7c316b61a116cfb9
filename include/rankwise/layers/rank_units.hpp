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
#include "rankwise/core/matrix_view.hpp"
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

template <class Backend, class T, class Acc>
void check_unit_routing(const char* fn, const UnitRouting<Acc>& routing, std::int64_t n,
                        std::int64_t rank) {
  constexpr MemorySpace space = Backend::kMemorySpace;
  RANKWISE_CHECK(routing.units.cols > 0, fn, ": units must have at least one column, got ",
                 shape_of(routing.units));
  check_broadcastable(routing.units, "units (n x k)", n, routing.units.cols, space);
  check_broadcastable(routing.gates, "gates (n x k)", n, routing.units.cols, space);
  (void)rank;
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

/// Workspace bytes for rank_units_forward with n tokens, k units per token, rank r.
template <class T>
std::size_t rank_units_forward_workspace_bytes(std::int64_t n, std::int64_t k, std::int64_t r) {
  using Acc = accumulator_t<T>;
  const std::size_t sparse = 2 * workspace_block_bytes<Acc>(n, k);
  const std::size_t dense = workspace_block_bytes<T>(n, r) + workspace_block_bytes<Acc>(n, r);
  return sparse > dense ? sparse : dense;
}

/// Workspace bytes for rank_units_backward.
template <class T>
std::size_t rank_units_backward_workspace_bytes(std::int64_t n, std::int64_t k, std::int64_t r) {
  using Acc = accumulator_t<T>;
  const std::size_t sparse = 4 * workspace_block_bytes<Acc>(n, k);
  // Both paths may also carve dgates (n x k) when the caller passes none.
  const std::size_t dense = 2 * workspace_block_bytes<T>(n, r) + workspace_block_bytes<Acc>(n, r) +
                            3 * workspace_block_bytes<Acc>(n, k);
  return sparse > dense ? sparse : dense;
}

/// y += scale · Σ_j gates[n][j] · bt[u] (a[u] · x[n]), u = units[n][j].
///   x (n x d_in), a (r x d_in), bt (r x d_out), y (n x d_out): backend memory.
/// Unit indices are trusted here (the router produces valid ones; layers that
/// accept user routings check them first with Kernels::check_units).
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
  const std::int64_t n = x.rows, k = routing.units.cols, r = a.rows;
  if (n == 0) return;
  WorkspaceCarver carve(workspace, workspace_bytes, space, "rank_units_forward");
  const auto s = static_cast<Acc>(scale);
  if (detail::resolve_path<Backend, T>(path, n, k, r) == RankUnitPath::kSparse) {
    MatrixView<Acc> h = carve.take<Acc>(n, k);     // a_u · x_n
    MatrixView<Acc> coef = carve.take<Acc>(n, k);  // gate · h
    K::gather_dot(ctx, Acc(1), x, a, routing.units, h);
    K::hadamard(ctx, h, routing.gates, coef);
    K::gather_axpy(ctx, s, coef, bt, routing.units, y);
    return;
  }
  MatrixView<T> h = carve.take<T>(n, r);         // X Aᵀ, then masked by the gates
  MatrixView<Acc> gate = carve.take<Acc>(n, r);  // dense gates, 0 off the selection
  K::gemm(ctx, Acc(1), x, Op::kNoTrans, a, Op::kTrans, Acc(0), h);
  K::densify(ctx, routing.units, routing.gates, gate);
  K::scale_by(ctx, gate, h);
  K::gemm(ctx, s, h, Op::kNoTrans, bt, Op::kNoTrans, Acc(1), y);
}

/// Gradients of rank_units_forward given dy (n x d_out):
///   dgates (n x k, Acc) = scale · (bt[u] · dy[n]) · (a[u] · x[n])     overwritten
///   da  (r x d_in)  = Σ dH ⊗ x,   dbt (r x d_out) = scale · Σ gate·h ⊗ dy
///                     (overwritten, or added to with accumulate)
///   dx  (n x d_in) += Σ_j dH[n][j] a[u], skipped when dx is empty
/// dH = scale · gate · (bt[u] · dy[n]). Deterministic on every backend.
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
  const std::int64_t n = x.rows, k = routing.units.cols, r = a.rows;
  const Acc beta = accumulate ? Acc(1) : Acc(0);
  if (n == 0) {
    if (!accumulate) {
      K::fill(ctx, da, 0.0);
      K::fill(ctx, dbt, 0.0);
    }
    return;
  }
  WorkspaceCarver carve(workspace, workspace_bytes, space, "rank_units_backward");
  const auto s = static_cast<Acc>(scale);
  MatrixView<Acc> dg = dgates.empty() ? carve.take<Acc>(n, k) : dgates;
  if (detail::resolve_path<Backend, T>(path, n, k, r) == RankUnitPath::kSparse) {
    MatrixView<Acc> h = carve.take<Acc>(n, k);   // a_u · x_n
    MatrixView<Acc> dp = carve.take<Acc>(n, k);  // scale · bt_u · dy_n
    MatrixView<Acc> tmp = carve.take<Acc>(n, k);
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
  MatrixView<T> h = carve.take<T>(n, r);         // X Aᵀ, then P = gate ⊙ H
  MatrixView<T> dp = carve.take<T>(n, r);        // scale · dY Bt ᵀ, then dH
  MatrixView<Acc> gate = carve.take<Acc>(n, r);  // dense gates
  MatrixView<Acc> hsel = carve.take<Acc>(n, k);
  MatrixView<Acc> dpsel = carve.take<Acc>(n, k);
  K::gemm(ctx, Acc(1), x, Op::kNoTrans, a, Op::kTrans, Acc(0), h);
  K::gemm(ctx, s, dy, Op::kNoTrans, bt, Op::kTrans, Acc(0), dp);
  K::gather_cols(ctx, h, routing.units, hsel);
  K::gather_cols(ctx, dp, routing.units, dpsel);
  K::hadamard(ctx, dpsel, hsel, dg);
  K::densify(ctx, routing.units, routing.gates, gate);
  K::scale_by(ctx, gate, h);
  K::scale_by(ctx, gate, dp);
  K::gemm(ctx, s, h, Op::kTrans, dy, Op::kNoTrans, beta, dbt);
  K::gemm(ctx, Acc(1), dp, Op::kTrans, x, Op::kNoTrans, beta, da);
  if (!dx.empty()) K::gemm(ctx, Acc(1), dp, Op::kNoTrans, a, Op::kNoTrans, Acc(1), dx);
}

}  // namespace rankwise
