// CPU specialisation of the backend primitives, on Eigen maps of row-major views.
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "rankwise/backend/eigen/buffer.hpp"
#include "rankwise/backend/eigen/context.hpp"
#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/random.hpp"

namespace rankwise {
namespace detail {

template <class T>
using RowMajorMatrix = Eigen::Matrix<std::remove_const_t<T>, Eigen::Dynamic, Eigen::Dynamic,
                                     Eigen::RowMajor>;

// Eigen view of a rankwise view; the outer stride carries `ld`.
template <class T>
auto eigen_map(const MatrixView<T>& v) {
  using Map = Eigen::Map<std::conditional_t<std::is_const<T>::value,
                                            const RowMajorMatrix<T>, RowMajorMatrix<T>>,
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

  static void gemm(Ctx&, Acc alpha, MatrixView<const T> a, Op op_a, MatrixView<const T> b,
                   Op op_b, Acc beta, MatrixView<T> c) {
    if (c.empty()) return;
    auto cm = detail::eigen_map(c);
    const std::int64_t inner = op_a == Op::kNoTrans ? a.cols : a.rows;
    if (inner == 0 || alpha == Acc(0)) {
      scale_in_place(cm, beta);
      return;
    }
    const auto am = detail::eigen_map(a);
    const auto bm = detail::eigen_map(b);
    // Four explicit branches keep every product a single Eigen GEMM/GEMV call
    // with no temporaries (noalias) and transposition folded into the kernel.
    if (beta == Acc(0)) {
      if (op_a == Op::kNoTrans && op_b == Op::kNoTrans) cm.noalias() = alpha * (am * bm);
      else if (op_a == Op::kNoTrans) cm.noalias() = alpha * (am * bm.transpose());
      else if (op_b == Op::kNoTrans) cm.noalias() = alpha * (am.transpose() * bm);
      else cm.noalias() = alpha * (am.transpose() * bm.transpose());
      return;
    }
    scale_in_place(cm, beta);
    if (op_a == Op::kNoTrans && op_b == Op::kNoTrans) cm.noalias() += alpha * (am * bm);
    else if (op_a == Op::kNoTrans) cm.noalias() += alpha * (am * bm.transpose());
    else if (op_b == Op::kNoTrans) cm.noalias() += alpha * (am.transpose() * bm);
    else cm.noalias() += alpha * (am.transpose() * bm.transpose());
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
    if (op == Op::kNoTrans) detail::eigen_map(dst) = detail::eigen_map(src);
    else detail::eigen_map(dst) = detail::eigen_map(src).transpose();
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

 private:
  template <class MapT>
  static void scale_in_place(MapT& cm, Acc beta) {
    if (beta == Acc(0)) cm.setZero();
    else if (beta != Acc(1)) cm *= beta;
  }
};

}  // namespace rankwise
