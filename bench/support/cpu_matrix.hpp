// Row-major matrices for the CPU benchmarks, filled with rankwise's
// counter-based generator (deterministic for a seed). CPU only: Eigen and
// <rankwise/rankwise.hpp>.
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <rankwise/rankwise.hpp>

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

}  // namespace bench
}  // namespace rankwise
