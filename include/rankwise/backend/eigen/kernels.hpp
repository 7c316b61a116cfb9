// CPU specialisation of the backend primitives, on Eigen maps of row-major views.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>

#include "rankwise/backend/eigen/buffer.hpp"
#include "rankwise/backend/eigen/context.hpp"
#include "rankwise/backend/eigen/memory.hpp"
#include "rankwise/backend/eigen/small_batch.hpp"
#if defined(RANKWISE_USE_CBLAS)
#include "rankwise/backend/eigen/cblas_gemm.hpp"
#endif
#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/adam_rule.hpp"
#include "rankwise/core/random.hpp"
#include "rankwise/core/routing.hpp"
#include "rankwise/core/unit_index.hpp"

namespace rankwise {
namespace detail {

template <class T>
using RowMajorMatrix =
    Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Eigen view of a rankwise view; the outer stride carries `ld`.
template <class T>
auto eigen_map(const MatrixView<T>& v) {
  using Map = Eigen::Map<
      std::conditional_t<std::is_const<T>::value, const RowMajorMatrix<T>, RowMajorMatrix<T>>,
      Eigen::Unaligned, Eigen::OuterStride<>>;
  return Map(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.rows <= 1 ? v.cols : v.ld));
}

}  // namespace detail

template <class T>
struct Kernels<CpuBackend, T> {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "the CPU backend stores float or double");
  using Acc = accumulator_t<T>;
  using Ctx = Context<CpuBackend>;

  /// c = alpha op(a) op(b) + beta c. Token-sized products (one side a few
  /// tokens, kSmallBatch*Tokens) take the small-batch kernels, the rest Eigen's
  /// GEMM (or OpenBLAS, cblas_gemm.hpp); either is split over the context's
  /// threads along c's rows or columns, never along the inner dimension, so
  /// every thread count gives the same bits (tests/test_cpu_threads.cpp checks
  /// it; on the OpenBLAS route, the same bits at each thread count).
  static void gemm(Ctx& ctx, Acc alpha, MatrixView<const T> a, Op op_a, MatrixView<const T> b,
                   Op op_b, Acc beta, MatrixView<T> c) {
    if (c.empty()) return;
    const std::int64_t inner = op_a == Op::kNoTrans ? a.cols : a.rows;
    if (inner == 0 || alpha == Acc(0)) {
      auto cm = detail::eigen_map(c);
      scale_in_place(cm, beta);
      return;
    }
    if (small_batch_product(ctx, alpha, a, op_a, b, op_b, beta, c, inner)) return;
    const std::int64_t tasks = task_count(ctx, c.rows * c.cols, inner);
    if (tasks == 1) {
      large_gemm(alpha, a, op_a, b, op_b, beta, c);
      return;
    }
    // Split the longer side of c in chunks aligned to Eigen's register blocks.
    const bool by_rows = c.rows >= c.cols;
    const std::int64_t extent = by_rows ? c.rows : c.cols;
    ctx.parallel_for(tasks, [&](std::int64_t t) {
      const std::int64_t lo = split_point(extent, tasks, t, kEigenSplitAlign);
      const std::int64_t hi = split_point(extent, tasks, t + 1, kEigenSplitAlign);
      if (lo == hi) return;
      if (by_rows)
        large_gemm(alpha, op_rows(a, op_a, lo, hi), op_a, b, op_b, beta, rows_of(c, lo, hi));
      else
        large_gemm(alpha, a, op_a, op_cols(b, op_b, lo, hi), op_b, beta, cols_of(c, lo, hi));
    });
  }

  /// Token counts up to which the small-batch kernels beat Eigen's packed
  /// GEMM at d = 4096, r in {8, 16, 64}, -march=native (AVX2 + FMA), one
  /// thread, weights in cache: tokens x weight rowsᵀ (0.23-0.9x Eigen's time
  /// from 2 to 24 tokens), tokens x weights (0.43-1.0x up to 16), weightsᵀ x
  /// tokens (0.46-0.87x up to 8). Measured by bench/crossover_small_batch.cpp
  /// (bench/results/cpu-2026-12-01-lora-threads-openblas.md); with weights in DRAM the
  /// streaming kernels gain more.
  static constexpr std::int64_t kSmallBatchDotTokens = 24;
  static constexpr std::int64_t kSmallBatchAxpyTokens = 16;
  static constexpr std::int64_t kSmallBatchGradTokens = 8;

  static void fill(Ctx&, MatrixView<T> m, double value) {
    if (m.empty()) return;
    detail::eigen_map(m).setConstant(static_cast<T>(value));
  }

  static void fill_uniform(Ctx&, MatrixView<T> m, double lo, double hi, std::uint64_t seed) {
    for (std::int64_t i = 0; i < m.rows; ++i) {
      for (std::int64_t j = 0; j < m.cols; ++j) {
        const auto index = static_cast<std::uint64_t>(i * m.cols + j);
        m.data[i * m.ld + j] = static_cast<T>(uniform(seed, index, lo, hi));
      }
    }
  }

  static void copy(Ctx&, MatrixView<const T> src, Op op, MatrixView<T> dst) {
    if (dst.empty()) return;
    if (op == Op::kNoTrans)
      detail::eigen_map(dst) = detail::eigen_map(src);
    else
      detail::eigen_map(dst) = detail::eigen_map(src).transpose();
  }

  static void upload(Ctx&, const T* host, MatrixView<T> dst) {
    for (std::int64_t i = 0; i < dst.rows; ++i) {
      std::memcpy(dst.data + i * dst.ld, host + i * dst.cols, sizeof(T) * dst.cols);
    }
  }

  static void download(Ctx&, MatrixView<const T> src, T* host) {
    for (std::int64_t i = 0; i < src.rows; ++i) {
      std::memcpy(host + i * src.cols, src.data + i * src.ld, sizeof(T) * src.cols);
    }
  }

  static void synchronize(Ctx&) {}

  static void upload_indices(Ctx&, const std::int32_t* host, MatrixView<std::int32_t> dst) {
    for (std::int64_t i = 0; i < dst.rows; ++i) {
      std::memcpy(dst.data + i * dst.ld, host + i * dst.cols, sizeof(std::int32_t) * dst.cols);
    }
  }

  // ---- rank-unit primitives ----

  static void gemm_acc(Ctx& ctx, Acc alpha, MatrixView<const T> a, Op op_a, MatrixView<const T> b,
                       Op op_b, Acc beta, MatrixView<Acc> c) {
    gemm(ctx, alpha, a, op_a, b, op_b, beta, c);  // T is Acc on the CPU
  }

  static void gemm_mixed(Ctx& ctx, Acc alpha, MatrixView<const Acc> a, Op op_a,
                         MatrixView<const T> b, Op op_b, Acc beta, MatrixView<T> c,
                         MatrixView<Acc> /*scratch*/) {
    gemm(ctx, alpha, a, op_a, b, op_b, beta, c);  // T is Acc on the CPU: the plain product
  }

  static void route(Ctx&, const RoutingRule& rule, MatrixView<const Acc> logits,
                    MatrixView<const Acc> bias, MatrixView<Acc> scores,
                    MatrixView<std::int32_t> experts, MatrixView<std::int32_t> units,
                    MatrixView<Acc> gates, MatrixView<std::int32_t> bad) {
    std::int32_t bad_tokens = 0;
    const Acc* b = bias.empty() ? nullptr : bias.data;
    for (std::int64_t n = 0; n < logits.rows; ++n) {
      const bool ok = route_token(rule, logits.data + n * logits.ld, b, scores.data + n * scores.ld,
                                  experts.data + n * experts.ld, units.data + n * units.ld,
                                  gates.data + n * gates.ld);
      bad_tokens += ok ? 0 : 1;
    }
    bad.data[0] = bad_tokens;
  }

  static void route_backward(Ctx&, const RoutingRule& rule, MatrixView<const Acc> scores,
                             MatrixView<const Acc> bias, MatrixView<const std::int32_t> experts,
                             MatrixView<const Acc> dgates, MatrixView<const Acc> extra,
                             MatrixView<const std::uint8_t> mask, MatrixView<Acc> /*scratch*/,
                             MatrixView<T> dlogits, MatrixView<Acc> dbias = {}) {
    const Acc* b = bias.empty() ? nullptr : bias.data;
    for (std::int64_t n = 0; n < scores.rows; ++n) {
      const bool masked_out = !mask.empty() && mask.data[n] == 0;
      const Acc* x = extra.empty() || masked_out ? nullptr : extra.data;
      route_token_backward(rule, scores.data + n * scores.ld, b, experts.data + n * experts.ld,
                           dgates.data + n * dgates.ld, x, dlogits.data + n * dlogits.ld,
                           dbias.empty() ? nullptr : dbias.data + n * dbias.ld);
    }
  }

  static void sum_rows(Ctx&, MatrixView<const Acc> m, Acc beta, MatrixView<Acc> out) {
    for (std::int64_t j = 0; j < out.cols; ++j) {
      Acc acc = Acc(0);
      for (std::int64_t i = 0; i < m.rows; ++i) acc += m.data[i * m.ld + j];
      out.data[j] = beta == Acc(0) ? acc : beta * out.data[j] + acc;
    }
  }

  static void aux_loss_grad(Ctx&, MatrixView<const std::int32_t> counts, int experts_per_token,
                            Acc coefficient, MatrixView<Acc> extra) {
    const int num_experts = static_cast<int>(counts.cols);
    for (int e = 0; e < num_experts; ++e) {
      extra.data[e] = static_cast<Acc>(
          switch_aux_dscore(counts.data, num_experts, e, experts_per_token, coefficient));
    }
  }

  static void check_units(Ctx&, MatrixView<const std::int32_t> units, std::int64_t num_units,
                          MatrixView<std::int32_t> bad) {
    std::int32_t out_of_range = 0;
    for (std::int64_t n = 0; n < units.rows; ++n) {
      for (std::int64_t j = 0; j < units.cols; ++j) {
        const std::int32_t u = units.data[n * units.ld + j];
        out_of_range += valid_unit_index(u, num_units) ? 0 : 1;
      }
    }
    bad.data[0] = out_of_range;
  }

  static void upload_doubles(Ctx&, const double* host, MatrixView<T> dst) {
    for (std::int64_t i = 0; i < dst.rows; ++i) {
      for (std::int64_t j = 0; j < dst.cols; ++j) {
        dst.data[i * dst.ld + j] = static_cast<T>(host[i * dst.cols + j]);
      }
    }
  }

  static void download_doubles(Ctx&, MatrixView<const T> src, double* host) {
    for (std::int64_t i = 0; i < src.rows; ++i) {
      for (std::int64_t j = 0; j < src.cols; ++j) {
        host[i * src.cols + j] = static_cast<double>(src.data[i * src.ld + j]);
      }
    }
  }

  // A multi-adapter batch: each adapter's tokens go through gemm (small-batch
  // kernels or Eigen's), which reads its units once for all of its tokens.
  static constexpr bool kSegmentedLora = false;

  static void count_experts(Ctx&, MatrixView<const std::int32_t> experts,
                            MatrixView<const std::uint8_t> mask, MatrixView<std::int32_t> counts) {
    std::fill(counts.data, counts.data + counts.cols, 0);
    for (std::int64_t n = 0; n < experts.rows; ++n) {
      if (!mask.empty() && mask.data[n] == 0) continue;
      for (std::int64_t t = 0; t < experts.cols; ++t)
        ++counts.data[experts.data[n * experts.ld + t]];
    }
  }

  static void update_bias(Ctx&, MatrixView<const std::int32_t> counts, float rate,
                          MatrixView<Acc> bias) {
    const int num_experts = static_cast<int>(counts.cols);
    for (int e = 0; e < num_experts; ++e) {
      bias.data[e] += static_cast<Acc>(balance_bias_step(counts.data, num_experts, e, rate));
    }
  }

  // The rank-unit primitives split over the context's threads by tokens
  // (gather_dot, gather_axpy: each token's row is its own) or by columns
  // (scatter_axpy: a unit's row sums its tokens in token order in every
  // part), so the bits do not depend on the thread count.
  static void gather_dot(Ctx& ctx, Acc alpha, MatrixView<const T> x, MatrixView<const T> w,
                         MatrixView<const std::int32_t> units, MatrixView<Acc> out,
                         Acc beta = Acc(0)) {
    if (broadcast(units)) {
      gemm(ctx, alpha, x, Op::kNoTrans, gather_rows(ctx, w, units), Op::kTrans, beta, out);
      return;
    }
    const std::int64_t tasks = task_count(ctx, units.rows * units.cols, x.cols);
    ctx.parallel_for(tasks, [&](std::int64_t t) {
      const std::int64_t hi = split_point(units.rows, tasks, t + 1, 1);
      for (std::int64_t n = split_point(units.rows, tasks, t, 1); n < hi; ++n) {
        for_unit_rows(w, units, n, [&](const T* const* rows, std::int64_t j, std::int64_t count) {
          detail::small_batch::gathered_dots<T>(alpha, x.data + n * x.ld, rows, count, x.cols,
                                                beta, out.data + n * out.ld + j, 1);
        });
      }
    });
  }

  static void gather_axpy(Ctx& ctx, Acc alpha, MatrixView<const Acc> coef, MatrixView<const T> w,
                          MatrixView<const std::int32_t> units, MatrixView<T> y) {
    if (broadcast(units)) {
      gemm(ctx, alpha, coef, Op::kNoTrans, gather_rows(ctx, w, units), Op::kNoTrans, Acc(1), y);
      return;
    }
    const std::int64_t tasks = task_count(ctx, units.rows * units.cols, w.cols);
    ctx.parallel_for(tasks, [&](std::int64_t t) {
      const std::int64_t hi = split_point(units.rows, tasks, t + 1, 1);
      for (std::int64_t n = split_point(units.rows, tasks, t, 1); n < hi; ++n) {
        for_unit_rows(w, units, n, [&](const T* const* rows, std::int64_t j, std::int64_t count) {
          T scaled[kUnitBlock];
          for (std::int64_t i = 0; i < count; ++i)
            scaled[i] = alpha * coef.data[n * coef.ld + j + i];
          detail::small_batch::gathered_axpy<T>(scaled, rows, count, w.cols, y.data + n * y.ld);
        });
      }
    });
  }

  static void scatter_axpy(Ctx& ctx, Acc alpha, MatrixView<const Acc> coef,
                           MatrixView<const T> src, MatrixView<const std::int32_t> units, Acc beta,
                           MatrixView<T> out) {
    auto om = detail::eigen_map(out);
    scale_in_place(om, beta);
    if (broadcast(units)) {
      // Σ over tokens first (one GEMM, into the context's scratch), then the
      // k rows in slot order.
      const MatrixView<T> summed(ctx.template scratch<T>(units.cols * src.cols), units.cols,
                                 src.cols, MemorySpace::kHost);
      gemm(ctx, Acc(1), coef, Op::kTrans, src, Op::kNoTrans, Acc(0), summed);
      const auto sm = detail::eigen_map(MatrixView<const T>(summed));
      for (std::int64_t j = 0; j < units.cols; ++j) om.row(units.data[j]) += alpha * sm.row(j);
      return;
    }
    const std::int64_t tasks = task_count(ctx, units.rows * units.cols, src.cols);
    ctx.parallel_for(tasks, [&](std::int64_t t) {
      const std::int64_t lo = split_point(src.cols, tasks, t, kColumnSplitAlign);
      const std::int64_t hi = split_point(src.cols, tasks, t + 1, kColumnSplitAlign);
      for (std::int64_t n = 0; n < units.rows; ++n) {
        for (std::int64_t j = 0; j < units.cols; ++j) {
          detail::small_batch::axpy_span(static_cast<T>(alpha * coef.data[n * coef.ld + j]),
                                         src.data + n * src.ld,
                                         out.data + units.data[n * units.ld + j] * out.ld, lo, hi);
        }
      }
    });
  }

  static void hadamard(Ctx&, MatrixView<const Acc> a, MatrixView<const Acc> b,
                       MatrixView<Acc> out) {
    if (out.empty()) return;
    detail::eigen_map(out) = detail::eigen_map(a).cwiseProduct(detail::eigen_map(b));
  }

  static void densify(Ctx&, MatrixView<const std::int32_t> units, MatrixView<const Acc> values,
                      MatrixView<Acc> dense) {
    if (dense.empty()) return;
    detail::eigen_map(dense).setZero();
    for (std::int64_t n = 0; n < units.rows; ++n) {
      for (std::int64_t j = 0; j < units.cols; ++j) {
        dense.data[n * dense.ld + units.data[n * units.ld + j]] += values.data[n * values.ld + j];
      }
    }
  }

  static void gather_cols(Ctx&, MatrixView<const T> dense, MatrixView<const std::int32_t> units,
                          MatrixView<Acc> out) {
    for (std::int64_t n = 0; n < units.rows; ++n) {
      for (std::int64_t j = 0; j < units.cols; ++j) {
        out.data[n * out.ld + j] = dense.data[n * dense.ld + units.data[n * units.ld + j]];
      }
    }
  }

  static void take_rows(Ctx&, MatrixView<const T> src, MatrixView<const std::int32_t> rows,
                        MatrixView<T> dst) {
    if (dst.empty()) return;
    const auto sm = detail::eigen_map(src);
    auto dm = detail::eigen_map(dst);
    for (std::int64_t i = 0; i < rows.rows; ++i) dm.row(i) = sm.row(rows.data[i * rows.ld]);
  }

  static void add_rows(Ctx&, MatrixView<const T> src, MatrixView<const std::int32_t> rows,
                       MatrixView<T> dst) {
    if (src.empty()) return;
    const auto sm = detail::eigen_map(src);
    auto dm = detail::eigen_map(dst);
    for (std::int64_t i = 0; i < rows.rows; ++i) dm.row(rows.data[i * rows.ld]) += sm.row(i);
  }

  static void remap_units(Ctx&, MatrixView<const std::int32_t> table,
                          MatrixView<const std::int32_t> units, MatrixView<std::int32_t> out) {
    for (std::int64_t n = 0; n < units.rows; ++n) {
      for (std::int64_t j = 0; j < units.cols; ++j) {
        out.data[n * out.ld + j] = table.data[units.data[n * units.ld + j]];
      }
    }
  }

  static void scale_by(Ctx&, MatrixView<const Acc> factors, MatrixView<T> m) {
    if (m.empty()) return;
    detail::eigen_map(m).array() *= detail::eigen_map(factors).array();
  }

  static std::int32_t read_int(Ctx&, MatrixView<const std::int32_t> v) { return v.data[0]; }

  // ---- optimiser primitives ----

  static void sum_squares(Ctx&, MatrixView<const T> m, MatrixView<Acc> out) {
    if (!m.empty()) out.data[0] += detail::eigen_map(m).squaredNorm();
  }

  static void adam(Ctx&, const AdamStep& step, MatrixView<T> param, MatrixView<const T> grad,
                   MatrixView<Acc> m, MatrixView<Acc> v, MatrixView<const Acc> norm_sq) {
    const Acc clip = norm_sq.empty() ? Acc(1) : clip_factor<Acc>(step, norm_sq.data[0]);
    for (std::int64_t i = 0; i < param.rows; ++i) {
      for (std::int64_t j = 0; j < param.cols; ++j) {
        Acc p = param.data[i * param.ld + j];
        adam_update<Acc>(step, clip, grad.data[i * grad.ld + j], p, m.data[i * m.ld + j],
                         v.data[i * v.ld + j]);
        param.data[i * param.ld + j] = static_cast<T>(p);
      }
    }
  }

 private:
  // The small-batch kernels (small_batch.hpp) for the three shapes of a LoRA
  // delta: tokens x weight rowsᵀ (H = X Aᵀ, dH = s dY B), tokens x weights
  // (Y += s H Bᵀ, dX += dH A) and the gradients' tokensᵀ x tokens (dA = dHᵀ X,
  // dBᵀ = s Hᵀ dY), each weight row streamed once for all tokens.
  static bool small_batch_product(Ctx& ctx, Acc alpha, const MatrixView<const T>& a, Op op_a,
                                  const MatrixView<const T>& b, Op op_b, Acc beta,
                                  const MatrixView<T>& c, std::int64_t inner) {
    namespace sb = detail::small_batch;
    const std::int64_t lda = a.rows <= 1 ? a.cols : a.ld;
    const std::int64_t ldb = b.rows <= 1 ? b.cols : b.ld;
    const std::int64_t ldc = c.rows <= 1 ? c.cols : c.ld;
    if (op_a == Op::kNoTrans && op_b == Op::kTrans && c.rows <= kSmallBatchDotTokens) {
      const std::int64_t tasks = task_count(ctx, c.rows * c.cols, inner);
      ctx.parallel_for(tasks, [&](std::int64_t t) {
        sb::rows_dot<T>(alpha, a.data, lda, b.data, ldb, c.rows, inner, beta, c.data, ldc,
                        split_point(c.cols, tasks, t, 2), split_point(c.cols, tasks, t + 1, 2));
      });
      return true;
    }
    if (op_b != Op::kNoTrans) return false;
    const bool tokens_by_weights = op_a == Op::kNoTrans && c.rows <= kSmallBatchAxpyTokens;
    const bool weights_by_tokens =
        op_a == Op::kTrans && inner <= kSmallBatchGradTokens && c.rows <= kSmallBatchMaxRows;
    if (!tokens_by_weights && !weights_by_tokens) return false;
    const std::int64_t coef_row = op_a == Op::kNoTrans ? lda : 1;
    const std::int64_t coef_step = op_a == Op::kNoTrans ? 1 : lda;
    const std::int64_t tasks = task_count(ctx, c.rows * c.cols, inner);
    ctx.parallel_for(tasks, [&](std::int64_t t) {
      const std::int64_t align = sb::kColumnAlign<T>;
      sb::rows_axpy<T>(alpha, a.data, coef_row, coef_step, b.data, ldb, c.rows, inner, beta,
                       c.data, ldc, split_point(c.cols, tasks, t, align),
                       split_point(c.cols, tasks, t + 1, align));
    });
    return true;
  }
  // Rows of c the transposed-coefficient kernel takes (ranks, not d x d merges).
  static constexpr std::int64_t kSmallBatchMaxRows = 1024;

  // A thread's share: at least kMinTaskWork multiply-adds (a microsecond or
  // two of arithmetic; at one token, a quarter MiB of weights to stream, which
  // a second core reads at half again the rate of one).
  static std::int64_t task_count(const Ctx& ctx, std::int64_t outputs, std::int64_t inner) {
    const std::int64_t threads = ctx.num_threads();
    if (threads == 1) return 1;
    const double work = static_cast<double>(outputs) * static_cast<double>(inner);
    const auto by_work = static_cast<std::int64_t>(work / kMinTaskWork);
    return std::max<std::int64_t>(1, std::min<std::int64_t>(threads, by_work));
  }
  static constexpr double kMinTaskWork = 1 << 16;

  // Start of task t of `tasks` over [0, extent), rounded down to `align`.
  static std::int64_t split_point(std::int64_t extent, std::int64_t tasks, std::int64_t t,
                                  std::int64_t align) {
    if (t >= tasks) return extent;
    const std::int64_t units = (extent + align - 1) / align;
    return std::min(extent, units * t / tasks * align);
  }
  // Parts of an Eigen product start on a multiple of its register blocks
  // (3 packets by 4 or 8: 24 for AVX2 floats or doubles, 48 for AVX-512
  // floats): each element then stays in the same kind of block, the tail
  // included, so the split changes no bit (tests/test_cpu_threads.cpp).
  static constexpr std::int64_t kEigenSplitAlign =
      std::lcm(std::int64_t(3) * Eigen::internal::packet_traits<T>::size, std::int64_t(8));
  // Column parts of a row update start on a cache line (and a whole packet).
  static constexpr std::int64_t kColumnSplitAlign = 64 / sizeof(T);

  template <class V>
  static V rows_of(V v, std::int64_t lo, std::int64_t hi) {
    v.data += lo * v.ld;
    v.rows = hi - lo;
    return v;
  }
  template <class V>
  static V cols_of(V v, std::int64_t lo, std::int64_t hi) {
    v.data += lo;
    v.cols = hi - lo;
    return v;
  }
  // Rows [lo, hi) of op(m), or columns [lo, hi) of op(m), as a view of m.
  static MatrixView<const T> op_rows(MatrixView<const T> m, Op op, std::int64_t lo,
                                     std::int64_t hi) {
    return op == Op::kNoTrans ? rows_of(m, lo, hi) : cols_of(m, lo, hi);
  }
  static MatrixView<const T> op_cols(MatrixView<const T> m, Op op, std::int64_t lo,
                                     std::int64_t hi) {
    return op == Op::kNoTrans ? cols_of(m, lo, hi) : rows_of(m, lo, hi);
  }

  // The large products: Eigen's GEMM, or the CBLAS sgemm/dgemm when the build
  // links rankwise::openblas (RANKWISE_USE_CBLAS).
  static void large_gemm(Acc alpha, MatrixView<const T> a, Op op_a, MatrixView<const T> b,
                         Op op_b, Acc beta, MatrixView<T> c) {
#if defined(RANKWISE_USE_CBLAS)
    if (detail::cblas_gemm(alpha, a, op_a == Op::kTrans, b, op_b == Op::kTrans, beta, c)) return;
#endif
    // Four explicit branches keep every product a single Eigen GEMM/GEMV call
    // with no temporaries (noalias) and transposition folded into the kernel.
    auto cm = detail::eigen_map(c);
    const auto am = detail::eigen_map(a);
    const auto bm = detail::eigen_map(b);
    if (beta == Acc(0)) {
      if (op_a == Op::kNoTrans && op_b == Op::kNoTrans)
        cm.noalias() = alpha * (am * bm);
      else if (op_a == Op::kNoTrans)
        cm.noalias() = alpha * (am * bm.transpose());
      else if (op_b == Op::kNoTrans)
        cm.noalias() = alpha * (am.transpose() * bm);
      else
        cm.noalias() = alpha * (am.transpose() * bm.transpose());
      return;
    }
    scale_in_place(cm, beta);
    if (op_a == Op::kNoTrans && op_b == Op::kNoTrans)
      cm.noalias() += alpha * (am * bm);
    else if (op_a == Op::kNoTrans)
      cm.noalias() += alpha * (am * bm.transpose());
    else if (op_b == Op::kNoTrans)
      cm.noalias() += alpha * (am.transpose() * bm);
    else
      cm.noalias() += alpha * (am.transpose() * bm.transpose());
  }

  // Calls f(rows, j, count) for token n's units in blocks of up to
  // kUnitBlock: rows[i] is the row of w of unit j + i.
  static constexpr std::int64_t kUnitBlock = 16;
  template <class F>
  static void for_unit_rows(const MatrixView<const T>& w,
                            const MatrixView<const std::int32_t>& units, std::int64_t n, F&& f) {
    const T* rows[kUnitBlock];
    for (std::int64_t j = 0; j < units.cols; j += kUnitBlock) {
      const std::int64_t count = std::min(kUnitBlock, units.cols - j);
      for (std::int64_t i = 0; i < count; ++i)
        rows[i] = w.data + std::int64_t(units.data[n * units.ld + j + i]) * w.ld;
      f(rows, j, count);
    }
  }

  // Every token uses the same units (ld = 0): from 8 tokens the gathers run
  // as GEMMs over the k selected rows (MoS, LoRA-LEGO); below that the
  // per-token loops are faster (2.2x at N = 2, even at N = 8; bench_mos).
  static bool broadcast(const MatrixView<const std::int32_t>& units) {
    return units.ld == 0 && units.rows >= kBroadcastGemmMinTokens;
  }
  static constexpr std::int64_t kBroadcastGemmMinTokens = 8;
  // The k rows of w the broadcast units name, copied in slot order into the
  // context's scratch (no allocation once it has grown).
  static MatrixView<const T> gather_rows(Ctx& ctx, const MatrixView<const T>& w,
                                         const MatrixView<const std::int32_t>& units) {
    T* selected = ctx.template scratch<T>(units.cols * w.cols);
    for (std::int64_t j = 0; j < units.cols; ++j)
      std::copy_n(w.data + std::int64_t(units.data[j]) * w.ld, w.cols, selected + j * w.cols);
    return MatrixView<const T>(selected, units.cols, w.cols, MemorySpace::kHost);
  }

  template <class MapT>
  static void scale_in_place(MapT& cm, Acc beta) {
    if (beta == Acc(0))
      cm.setZero();
    else if (beta != Acc(1))
      cm *= beta;
  }
};

}  // namespace rankwise
