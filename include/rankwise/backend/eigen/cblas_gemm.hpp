// The CPU backend's large products through CBLAS (OpenBLAS), used when a
// build links rankwise::openblas, which defines RANKWISE_USE_CBLAS. Measured
// at d = 4096 on AVX2 + FMA, one thread: OpenBLAS 0.3.21 sgemm takes 0.7-0.9x
// the time of Eigen 3.4's products from 64 tokens on, and 0.25-0.55x for the
// gradient products whose summed dimension is the tokens (dBᵀ = s Hᵀ dY).
//
// rankwise splits a product over its own threads and calls CBLAS once per
// part: give OpenBLAS one thread (OPENBLAS_NUM_THREADS=1 or
// openblas_set_num_threads(1)), or its threads multiply rankwise's.
#pragma once

#include <cblas.h>

#include <cstdint>
#include <limits>

#include "rankwise/core/matrix_view.hpp"

namespace rankwise {
namespace detail {

inline void cblas_gemm_call(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k,
                            float alpha, const float* a, int lda, const float* b, int ldb,
                            float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void cblas_gemm_call(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k,
                            double alpha, const double* a, int lda, const double* b, int ldb,
                            double beta, double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

/// c = alpha op(a) op(b) + beta c through CBLAS; false (nothing done) when a
/// size or leading dimension does not fit CBLAS's int, for Eigen to take.
template <class T>
bool cblas_gemm(T alpha, const MatrixView<const T>& a, bool trans_a, const MatrixView<const T>& b,
                bool trans_b, T beta, const MatrixView<T>& c) {
  // A one-row view may carry any ld; CBLAS wants at least the row length.
  auto ld = [](auto& v) { return v.rows <= 1 ? v.cols : v.ld; };
  const std::int64_t k = trans_a ? a.rows : a.cols;
  constexpr std::int64_t kMax = std::numeric_limits<int>::max();
  for (const std::int64_t v : {c.rows, c.cols, k, ld(a), ld(b), ld(c)}) {
    if (v > kMax) return false;
  }
  cblas_gemm_call(trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                  static_cast<int>(c.rows), static_cast<int>(c.cols), static_cast<int>(k), alpha,
                  a.data, static_cast<int>(ld(a)), b.data, static_cast<int>(ld(b)), beta, c.data,
                  static_cast<int>(ld(c)));
  return true;
}

}  // namespace detail
}  // namespace rankwise
