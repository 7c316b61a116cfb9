// The contract between layers and backends: the primitives every backend
// implements. Layers call these in order and never name a backend.
#pragma once

#include <cstdint>
#include <type_traits>

#include "rankwise/backend/tags.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/numeric.hpp"

namespace rankwise {
namespace detail {
template <class...>
struct dependent_false {
  static constexpr bool value = false;
};
}  // namespace detail

/// Kernels<Backend, T> is specialised once per backend:
///   rankwise/backend/eigen/kernels.hpp   CpuBackend,  T = float, double
///   rankwise/backend/cuda/kernels.cuh    CudaBackend, T = float, __half, __nv_bfloat16
///
/// Untyped byte moves are the Memory<Backend> part (backend/memory_decl.hpp);
/// crossovers between paths are tuning policy (backend/tuning.hpp).
///
/// Every specialisation provides, with Acc = accumulator_t<T> and all views in
/// the backend's memory space (checked by the caller, not here):
///
///   gemm(ctx, alpha, a, op_a, b, op_b, beta, c)
///       c = alpha * op(a) * op(b) + beta * c, accumulating in Acc. beta == 0
///       ignores the old contents of c (NaN there does not propagate).
///   fill(ctx, m, value)                      every element of m = value
///   fill_uniform(ctx, m, lo, hi, seed)       m[i][j] = uniform(seed, i*cols+j, lo, hi)
///                                            (rankwise/core/random.hpp): same bits
///                                            on every backend
///   copy(ctx, src, op, dst)                  dst = op(src)
///   upload(ctx, host, dst)                   dst = contiguous row-major host array
///   download(ctx, src, host)                 contiguous row-major host array = src
///   synchronize(ctx)                         waits for queued work
///
/// Rank-unit primitives (the shrink, a_u · x, and expand, y += g h b_u, of every
/// layer). units (n x k, int32) name a rank unit (row of a or bt) per token and
/// slot; coef, gates, h are (n x k) in Acc. Unit views (units, and the index
/// lists of shard layers) may have ld = 0: every token then uses the same row
/// of indices. Routing rules come from rankwise/core/routing.hpp, per token.
///
///   gemm_acc(ctx, alpha, a, op_a, b, op_b, beta, c)   as gemm, c in Acc
///   gemm_mixed(ctx, alpha, a, op_a, b, op_b, beta, c, scratch)
///       as gemm with a in Acc (b and c in T): intermediates kept in Acc (router
///       dlogits, the dense path's H and dH) reach the next product unrounded.
///       scratch (Acc, at least gemm_mixed_scratch<T>(c.rows, inner) elements,
///       256-byte aligned) may be used; where T is Acc it is the plain gemm
///   route(ctx, rule, logits, bias, scores, experts, units, gates, bad)
///       route_token for every row of logits (n x E, Acc); bias (1 x E) or
///       empty; bad (1 x 1, int32) receives the number of tokens whose logits
///       were not finite (the layer reads it when it checks)
///   route_backward(ctx, rule, scores, bias, experts, dgates, extra, mask, scratch, dlogits,
///                  dbias = {})
///       route_token_backward per token; extra (1 x E) or empty, added only
///       for unmasked tokens; scratch (n x E, Acc) may be used; dlogits in T;
///       dbias (n x C, Acc) or empty receives each token's ∂L/∂bias
///   sum_rows(ctx, m, beta, out)              out (1 x C) = Σ_rows m (+ beta · out),
///                                            rows in order: the same bits on every run
///   count_experts(ctx, experts, mask, counts)
///       counts (1 x E, int32) = assignments per expert over tokens whose mask
///       (1 x n, uint8) is nonzero; an empty mask counts every token
///   update_bias(ctx, counts, rate, bias)     bias_e += balance_bias_step(...)
///   gather_dot(ctx, alpha, x, w, units, out, beta = 0)
///       out[n][j] = alpha * (w[units[n][j]] · x[n]) + beta * out[n][j]
///   gather_axpy(ctx, alpha, coef, w, units, y)
///       y[n] += alpha * Σ_j coef[n][j] * w[units[n][j]]
///   scatter_axpy(ctx, alpha, coef, src, units, beta, out)
///       out[i] = beta * out[i] + alpha * Σ_{(n, j): units[n][j] = i} coef[n][j] * src[n],
///       summed in token order: the same bits on every run
///   hadamard(ctx, a, b, out)                 out = a ⊙ b (Acc, same shapes)
///   densify(ctx, units, values, dense)       dense (n x r, Acc) = 0, then
///                                            dense[n][units[n][j]] += values[n][j]
///   gather_cols(ctx, dense, units, out)      out[n][j] = dense[n][units[n][j]], dense in T
///                                            (Kernels<Backend, Acc> for dense in Acc)
///   take_rows(ctx, src, rows, dst)           dst[i] = src[rows[i]] (rows m x 1 int32)
///   add_rows(ctx, src, rows, dst)            dst[rows[i]] += src[i], rounded once; the rows
///                                            must be distinct (a batch's tokens of one adapter)
///   remap_units(ctx, table, units, out)      out[n][j] = table[units[n][j]]: local unit
///                                            indices (table is 1 x t, int32) to pool ones
///   scale_by(ctx, factors, m)                m ⊙= factors (m in T, factors in Acc)
///   read_int(ctx, v)                         the value of a (1 x 1) int32, on the host
///   aux_loss_grad(ctx, counts, k/g, coef, extra)   extra_e = switch_aux_dscore(...)
///   check_units(ctx, units, r, bad)          bad (1 x 1) = number of units outside [0, r)
///   upload_doubles / download_doubles        as upload / download, host side in double
///   upload_indices(ctx, host, dst)           int32 host array into a (rows x cols) int32 view
///   kSegmentedLora                           true where the backend serves a whole
///                                            multi-adapter batch in two launches:
///   segment_lora_forward(ctx, table, x, a, bt, y, h)
///       for every position p of the SegmentTable (core/segment_table.hpp):
///       y[token[p]] += scale[p] Σ_j bt[u_j] (a[u_j] · x[token[p]]), u_j its units,
///       h (table.h_size Acc) scratch; one shrink and one expand launch (CUDA).
///       Backends without it (kSegmentedLora = false) serve each adapter's
///       tokens with gemm. Which adapters take it, and every other choice
///       between equivalent paths, is tuning policy (backend/tuning.hpp),
///       not part of this contract.
///
/// Optimiser primitives (m, v, norm_sq in Acc):
///   sum_squares(ctx, m, out)                 out (1 x 1) += Σ m², in a fixed order
///   adam(ctx, step, param, grad, m, v, norm_sq)
///       adam_update (rankwise/core/adam_rule.hpp) per element; norm_sq (1 x 1)
///       is the squared global gradient norm for clipping, or empty
///
/// Empty operands are legal and do nothing (except gemm with an empty inner
/// dimension, which scales c by beta).
///
/// Index safety: an op that reads or writes through unit or expert indices
/// never touches memory outside its views. The CPU backend's callers scan the
/// indices first (rankwise/core/unit_index.hpp); CUDA kernels skip an invalid
/// index and count it in the context, which throws at its next
/// synchronisation (Context<CudaBackend>::check_device_errors).

/// Columns of c per gemm_mixed panel where T is narrower than Acc.
inline constexpr std::int64_t kGemmMixedPanel = 512;

/// Acc elements of scratch gemm_mixed needs for a c of `rows` rows over an
/// inner dimension `inner`: none where T is Acc (every CPU type, float on the
/// GPU); else a panel of op(b) (inner x 512) and one of c (rows x 512), widened
/// to Acc. The same on every backend, so layers size their workspace from T.
template <class T>
constexpr std::int64_t gemm_mixed_scratch(std::int64_t rows, std::int64_t inner) {
  return std::is_same<T, accumulator_t<T>>::value ? 0 : (inner + rows) * kGemmMixedPanel;
}
template <class Backend, class T>
struct Kernels {
  static_assert(detail::dependent_false<Backend, T>::value,
                "rankwise::Kernels<Backend, T> has no specialisation for this pair. For "
                "CpuBackend include <rankwise/rankwise.hpp> (T = float or double); for "
                "CudaBackend include <rankwise/cuda.cuh> from a .cu file (T = float, "
                "__half or __nv_bfloat16).");
};

}  // namespace rankwise
