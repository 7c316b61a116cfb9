// Row-major matrices for the CPU benchmarks, filled with rankwise's
// counter-based generator (deterministic for a seed), and the SIMD line of
// their headers. CPU only: Eigen and <rankwise/rankwise.hpp>.
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <rankwise/rankwise.hpp>
#include <string>

namespace rankwise {
namespace bench {

template <class T>
using RowMajorMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A rows x cols matrix of U(lo, hi) values drawn from `seed`.
template <class T = float>
RowMajorMatrix<T> random_matrix(std::int64_t rows, std::int64_t cols, std::uint64_t seed,
                                double lo, double hi) {
  RowMajorMatrix<T> m(rows, cols);
  CpuContext ctx;
  Kernels<CpuBackend, T>::fill_uniform(ctx, host_view(m.data(), rows, cols), lo, hi, seed);
  return m;
}

/// Eigen::SimdInstructionSetsInUse(), plus AVX2 and FMA when Eigen uses them:
/// Eigen 3.4 says only "AVX" for an AVX2/FMA build.
inline std::string eigen_simd() {
  std::string s = Eigen::SimdInstructionSetsInUse();
  std::string more;
#if defined(EIGEN_VECTORIZE_AVX2)
  if (s.find("AVX2") == std::string::npos) more += "AVX2";
#endif
#if defined(EIGEN_VECTORIZE_FMA)
  if (s.find("FMA") == std::string::npos) more += more.empty() ? "FMA" : ", FMA";
#endif
  return more.empty() ? s : s + "; " + more;
}

}  // namespace bench
}  // namespace rankwise
