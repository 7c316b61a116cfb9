// CPU specialisation of the backend primitives, on Eigen maps of row-major views.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "rankwise/backend/eigen/buffer.hpp"
#include "rankwise/backend/eigen/context.hpp"
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

  static void gemm(Ctx&, Acc alpha, MatrixView<const T> a, Op op_a, MatrixView<const T> b, Op op_b,
                   Acc beta, MatrixView<T> c) {
    if (c.empty()) return;
    auto cm = detail::eigen_map(c);
    const std::int64_t inner = op_a == Op::kNoTrans ? a.cols : a.rows;
    if (inner == 0 || alpha == Acc(0)) {
      scale_in_place(cm, beta);
      return;
    }
    const auto am = detail::eigen_map(a);
    const auto bm = detail::eigen_map(b);
    if (one_row_product(alpha, am, op_a, bm, op_b, beta, cm, inner)) return;
    // Four explicit branches keep every product a single Eigen GEMM/GEMV call
    // with no temporaries (noalias) and transposition folded into the kernel.
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

  /// Rank-unit path: the dense path (two GEMMs over all r units, gates as a
  /// mask) does r / k times the arithmetic of the gathers at about 2.4x their
  /// rate, so it wins when every unit is used (k >= r), at any token count.
  /// Fitted with bench_smora --crossover over k/r in {4..64}/64, 8/16, 16/16
  /// and N in 1..2048 (bench/results/cpu-2026-11-26-smora-crossover.md): on
  /// the default build 1.001x the best path on average, 1.17x at worst.
  static bool prefer_dense(std::int64_t n, std::int64_t k, std::int64_t r) {
    return n >= kDenseMinTokens && k * kDenseRatio >= r;
  }
  static constexpr std::int64_t kDenseMinTokens = 1;
  static constexpr std::int64_t kDenseRatio = 1;

  /// MoS: the direct path's gathers run as GEMMs over the shared shard rows
  /// (broadcast units), so reading shards in place is never slower than
  /// assembling A and B first (bench_mos, bench/results/cpu-2026-11-26-mos.md).
  static bool prefer_assembled_shards(std::int64_t /*n*/) { return false; }

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

  static void gather_dot(Ctx&, Acc alpha, MatrixView<const T> x, MatrixView<const T> w,
                         MatrixView<const std::int32_t> units, MatrixView<Acc> out,
                         Acc beta = Acc(0)) {
    const auto xm = detail::eigen_map(x);
    const auto wm = detail::eigen_map(w);
    if (broadcast(units)) {
      const detail::RowMajorMatrix<T> selected = gather_rows(wm, units);
      auto om = detail::eigen_map(out);
      if (beta == Acc(0))
        om.noalias() = alpha * (xm * selected.transpose());
      else
        om = beta * om + alpha * (xm * selected.transpose());
      return;
    }
    for (std::int64_t n = 0; n < units.rows; ++n) {
      for (std::int64_t j = 0; j < units.cols; ++j) {
        Acc& o = out.data[n * out.ld + j];
        const Acc dot = wm.row(units.data[n * units.ld + j]).dot(xm.row(n));
        o = beta == Acc(0) ? alpha * dot : alpha * dot + beta * o;
      }
    }
  }

  static void gather_axpy(Ctx&, Acc alpha, MatrixView<const Acc> coef, MatrixView<const T> w,
                          MatrixView<const std::int32_t> units, MatrixView<T> y) {
    const auto wm = detail::eigen_map(w);
    auto ym = detail::eigen_map(y);
    if (broadcast(units)) {
      ym.noalias() += alpha * (detail::eigen_map(coef) * gather_rows(wm, units));
      return;
    }
    for (std::int64_t n = 0; n < units.rows; ++n) {
      for (std::int64_t j = 0; j < units.cols; ++j) {
        ym.row(n) += (alpha * coef.data[n * coef.ld + j]) * wm.row(units.data[n * units.ld + j]);
      }
    }
  }

  static void scatter_axpy(Ctx&, Acc alpha, MatrixView<const Acc> coef, MatrixView<const T> src,
                           MatrixView<const std::int32_t> units, Acc beta, MatrixView<T> out) {
    auto om = detail::eigen_map(out);
    scale_in_place(om, beta);
    const auto sm = detail::eigen_map(src);
    if (broadcast(units)) {
      // Σ over tokens first (one GEMM), then the k rows in slot order.
      const detail::RowMajorMatrix<T> summed = detail::eigen_map(coef).transpose() * sm;
      for (std::int64_t j = 0; j < units.cols; ++j) om.row(units.data[j]) += alpha * summed.row(j);
      return;
    }
    for (std::int64_t n = 0; n < units.rows; ++n) {
      for (std::int64_t j = 0; j < units.cols; ++j) {
        om.row(units.data[n * units.ld + j]) += (alpha * coef.data[n * coef.ld + j]) * sm.row(n);
      }
    }
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
  // One-token products (N = 1) stream each row of b once, contiguously:
  // Eigen's GEMV for a row vector times a row-major matrix walks b in column
  // panels and reaches about half the memory bandwidth (bench_lora, N = 1).
  //   c (1 x m) = alpha a bᵀ      one dot product per row of b
  //   c (1 x m) += alpha a b      one axpy per row of b, c stays in L1
  //   c = alpha aᵀ b, inner 1     (dBᵀ = s Hᵀ dY, dA = dHᵀ X): row scaling
  template <class MapA, class MapB, class MapC>
  static bool one_row_product(Acc alpha, const MapA& am, Op op_a, const MapB& bm, Op op_b, Acc beta,
                              MapC& cm, std::int64_t inner) {
    if (cm.rows() == 1 && op_a == Op::kNoTrans && op_b == Op::kTrans) {
      for (Eigen::Index j = 0; j < cm.cols(); ++j) {
        const Acc d = alpha * bm.row(j).dot(am.row(0));
        cm(0, j) = beta == Acc(0) ? d : beta * cm(0, j) + d;
      }
      return true;
    }
    if (cm.rows() == 1 && op_a == Op::kNoTrans && op_b == Op::kNoTrans) {
      scale_in_place(cm, beta);
      for (std::int64_t k = 0; k < inner; ++k) cm.row(0) += (alpha * am(0, k)) * bm.row(k);
      return true;
    }
    if (inner == 1 && op_b == Op::kNoTrans) {
      for (Eigen::Index i = 0; i < cm.rows(); ++i) {
        const Acc ai = alpha * (op_a == Op::kNoTrans ? am(i, 0) : am(0, i));
        if (beta == Acc(0))
          cm.row(i) = ai * bm.row(0);
        else
          cm.row(i) = beta * cm.row(i) + ai * bm.row(0);
      }
      return true;
    }
    return false;
  }

  // Every token uses the same units (ld = 0): from 8 tokens the gathers run
  // as GEMMs over the k selected rows (MoS, LoRA-LEGO); below that the
  // per-token loops are faster (2.2x at N = 2, even at N = 8; bench_mos).
  static bool broadcast(const MatrixView<const std::int32_t>& units) {
    return units.ld == 0 && units.rows >= kBroadcastGemmMinTokens;
  }
  static constexpr std::int64_t kBroadcastGemmMinTokens = 8;
  template <class MapT>
  static detail::RowMajorMatrix<T> gather_rows(const MapT& wm,
                                               const MatrixView<const std::int32_t>& units) {
    detail::RowMajorMatrix<T> selected(units.cols, wm.cols());
    for (std::int64_t j = 0; j < units.cols; ++j) selected.row(j) = wm.row(units.data[j]);
    return selected;
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
