// Ground truth for the tests: plain loops accumulating in double, written
// independently of every backend (no Eigen, no CUDA), so a backend bug cannot
// hide behind the reference.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <random>
#include <vector>

#include "rankwise/core/lora_config.hpp"
#include "rankwise/core/matrix_view.hpp"

namespace rwtest {

using rankwise::Op;
using rankwise::WeightLayout;

/// A dense row-major matrix of doubles on the host: inputs, references and
/// downloaded results all travel as HostMatrix.
struct HostMatrix {
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::vector<double> v;  // (rows, cols)

  HostMatrix() = default;
  HostMatrix(std::int64_t rows_, std::int64_t cols_, double fill = 0.0)
      : rows(rows_), cols(cols_), v(static_cast<std::size_t>(rows_ * cols_), fill) {}

  double& operator()(std::int64_t i, std::int64_t j) {
    return v[static_cast<std::size_t>(i * cols + j)];
  }
  double operator()(std::int64_t i, std::int64_t j) const {
    return v[static_cast<std::size_t>(i * cols + j)];
  }
  std::int64_t size() const { return rows * cols; }
};

inline std::ostream& operator<<(std::ostream& out, const HostMatrix& m) {
  return out << "(" << m.rows << " x " << m.cols << ")";
}

/// Uniform [lo, hi) test data from std::mt19937_64, whose output sequence the
/// standard fixes; the double is built from the top 53 bits by hand because
/// std::uniform_real_distribution differs between standard libraries.
inline HostMatrix random_matrix(std::int64_t rows, std::int64_t cols, std::uint64_t seed,
                                double lo = -1.0, double hi = 1.0) {
  HostMatrix m(rows, cols);
  std::mt19937_64 gen(seed);
  for (double& x : m.v) x = lo + (hi - lo) * (static_cast<double>(gen() >> 11) * 0x1.0p-53);
  return m;
}

inline HostMatrix transpose(const HostMatrix& m) {
  HostMatrix t(m.cols, m.rows);
  for (std::int64_t i = 0; i < m.rows; ++i)
    for (std::int64_t j = 0; j < m.cols; ++j) t(j, i) = m(i, j);
  return t;
}

/// op(m)(i, j).
inline double op_at(const HostMatrix& m, Op op, std::int64_t i, std::int64_t j) {
  return op == Op::kNoTrans ? m(i, j) : m(j, i);
}

/// c = alpha * op(a) op(b) + beta * c. beta == 0 ignores c's old contents (BLAS
/// semantics: a NaN there does not propagate).
inline HostMatrix ref_gemm(double alpha, const HostMatrix& a, Op op_a, const HostMatrix& b, Op op_b,
                           double beta, const HostMatrix& c) {
  const std::int64_t m = op_a == Op::kNoTrans ? a.rows : a.cols;
  const std::int64_t k = op_a == Op::kNoTrans ? a.cols : a.rows;
  HostMatrix out(c.rows, c.cols);
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < c.cols; ++j) {
      double acc = 0.0;
      for (std::int64_t p = 0; p < k; ++p) acc += op_at(a, op_a, i, p) * op_at(b, op_b, p, j);
      out(i, j) = alpha * acc + (beta == 0.0 ? 0.0 : beta * c(i, j));
    }
  }
  return out;
}

/// y + s * B A x for every row x of `x`, in PEFT layout:
///   x (n x d_in), a (r x d_in), b (d_out x r), y (n x d_out).
inline HostMatrix ref_lora_forward(double s, const HostMatrix& x, const HostMatrix& a,
                                   const HostMatrix& b, const HostMatrix& y) {
  HostMatrix out = y;
  for (std::int64_t n = 0; n < x.rows; ++n) {
    for (std::int64_t j = 0; j < b.rows; ++j) {
      double acc = 0.0;
      for (std::int64_t k = 0; k < a.rows; ++k) {
        double h = 0.0;  // (A x)_k
        for (std::int64_t i = 0; i < a.cols; ++i) h += a(k, i) * x(n, i);
        acc += b(j, k) * h;
      }
      out(n, j) += s * acc;
    }
  }
  return out;
}

/// Gradients of L with ∂L/∂y = dy through y += s * B A x, PEFT layout.
struct LoraGrads {
  HostMatrix da;  // (r, d_in)
  HostMatrix db;  // (d_out, r)
  HostMatrix dx;  // (n, d_in): the adapter's part only
};

inline LoraGrads ref_lora_backward(double s, const HostMatrix& x, const HostMatrix& a,
                                   const HostMatrix& b, const HostMatrix& dy) {
  const std::int64_t n_tok = x.rows, d_in = a.cols, d_out = b.rows, r = a.rows;
  HostMatrix h(n_tok, r), dh(n_tok, r);  // h = x Aᵀ, dh = s dy B
  for (std::int64_t n = 0; n < n_tok; ++n) {
    for (std::int64_t k = 0; k < r; ++k) {
      double acc_h = 0.0, acc_dh = 0.0;
      for (std::int64_t i = 0; i < d_in; ++i) acc_h += x(n, i) * a(k, i);
      for (std::int64_t j = 0; j < d_out; ++j) acc_dh += dy(n, j) * b(j, k);
      h(n, k) = acc_h;
      dh(n, k) = s * acc_dh;
    }
  }
  LoraGrads g{HostMatrix(r, d_in), HostMatrix(d_out, r), HostMatrix(n_tok, d_in)};
  for (std::int64_t k = 0; k < r; ++k)
    for (std::int64_t i = 0; i < d_in; ++i) {
      double acc = 0.0;
      for (std::int64_t n = 0; n < n_tok; ++n) acc += dh(n, k) * x(n, i);
      g.da(k, i) = acc;
    }
  for (std::int64_t j = 0; j < d_out; ++j)
    for (std::int64_t k = 0; k < r; ++k) {
      double acc = 0.0;
      for (std::int64_t n = 0; n < n_tok; ++n) acc += dy(n, j) * h(n, k);
      g.db(j, k) = s * acc;
    }
  for (std::int64_t n = 0; n < n_tok; ++n)
    for (std::int64_t i = 0; i < d_in; ++i) {
      double acc = 0.0;
      for (std::int64_t k = 0; k < r; ++k) acc += dh(n, k) * a(k, i);
      g.dx(n, i) = acc;
    }
  return g;
}

/// w0 + sign * s * B A, with w0 (d_out x d_in) for kOutIn or (d_in x d_out) for kInOut.
inline HostMatrix ref_merge(const HostMatrix& w0, WeightLayout layout, const HostMatrix& a,
                            const HostMatrix& b, double s, double sign = 1.0) {
  HostMatrix w = w0;
  for (std::int64_t o = 0; o < b.rows; ++o) {
    for (std::int64_t i = 0; i < a.cols; ++i) {
      double ba = 0.0;
      for (std::int64_t k = 0; k < a.rows; ++k) ba += b(o, k) * a(k, i);
      double& dst = layout == WeightLayout::kOutIn ? w(o, i) : w(i, o);
      dst += sign * s * ba;
    }
  }
  return w;
}

/// x W0ᵀ (kOutIn, w0 is d_out x d_in) or x W0 (kInOut, w0 is d_in x d_out).
inline HostMatrix ref_base_forward(const HostMatrix& x, const HostMatrix& w0, WeightLayout layout) {
  const bool out_in = layout == WeightLayout::kOutIn;
  const std::int64_t d_out = out_in ? w0.rows : w0.cols;
  HostMatrix y(x.rows, d_out);
  for (std::int64_t n = 0; n < x.rows; ++n)
    for (std::int64_t o = 0; o < d_out; ++o) {
      double acc = 0.0;
      for (std::int64_t i = 0; i < x.cols; ++i) acc += x(n, i) * (out_in ? w0(o, i) : w0(i, o));
      y(n, o) = acc;
    }
  return y;
}

/// Σ w ⊙ y, the scalar loss of the finite-difference checks (∂L/∂y = w).
inline double ref_weighted_sum(const HostMatrix& w, const HostMatrix& y) {
  double acc = 0.0;
  for (std::size_t i = 0; i < y.v.size(); ++i) acc += w.v[i] * y.v[i];
  return acc;
}

/// Element-wise |m|. Running a reference on |inputs| gives, element by
/// element, the sum of the magnitudes of every term that went into the result:
/// the yardstick rounding errors are measured against (support/compare.hpp).
inline HostMatrix abs_of(const HostMatrix& m) {
  HostMatrix a = m;
  for (double& x : a.v) x = std::abs(x);
  return a;
}

/// Element-wise a + b (same shapes).
inline HostMatrix add(const HostMatrix& a, const HostMatrix& b) {
  HostMatrix c = a;
  for (std::size_t i = 0; i < c.v.size(); ++i) c.v[i] += b.v[i];
  return c;
}

}  // namespace rwtest
