// Backend-generic test plumbing over a harness H (harness_cpu.hpp,
// harness_cuda.cuh): owning matrices in the backend's memory, upload from and
// download to double host matrices, rounding of test data to a storage type.
// No Eigen, no CUDA: every backend call goes through Kernels<H::Backend, T>.
#pragma once

#include <cstdint>
#include <vector>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/backend/tags.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "support/reference.hpp"

namespace rwtest {

/// A rows x cols matrix of T in H's memory space with leading dimension ld
/// (ld > cols leaves padding between rows, to test strided views).
template <class H, class T>
struct DeviceMatrix {
  using Backend = typename H::Backend;
  std::int64_t rows = 0, cols = 0, ld = 0;
  rankwise::Buffer<Backend, T> buf;

  DeviceMatrix(std::int64_t rows_, std::int64_t cols_, std::int64_t ld_ = -1)
      : rows(rows_), cols(cols_), ld(ld_ < 0 ? cols_ : ld_), buf(rows_ * (ld_ < 0 ? cols_ : ld_)) {}

  rankwise::MatrixView<T> view() {
    return rankwise::MatrixView<T>(buf.data(), rows, cols, Backend::kMemorySpace, ld);
  }
  rankwise::MatrixView<const T> cview() const {
    return rankwise::MatrixView<const T>(buf.data(), rows, cols, Backend::kMemorySpace, ld);
  }
  /// The whole allocation, padding included, as a contiguous rows x ld matrix.
  rankwise::MatrixView<const T> padded_view() const {
    return rankwise::MatrixView<const T>(buf.data(), rows, ld, Backend::kMemorySpace);
  }
};

/// `m` rounded to T and back: the values a test feeds the backend, so the
/// reference sees exactly what the kernels see.
template <class H, class T>
HostMatrix quantize(const HostMatrix& m) {
  HostMatrix q = m;
  for (double& x : q.v) x = H::to_double(H::template from_double<T>(x));
  return q;
}

/// Uploads `m` (rounded to T) into a new DeviceMatrix; padding holds `pad`.
template <class H, class T>
DeviceMatrix<H, T> to_device(typename H::Ctx& ctx, const HostMatrix& m, std::int64_t ld = -1,
                             double pad = 0.0) {
  DeviceMatrix<H, T> d(m.rows, m.cols, ld);
  std::vector<T> host(static_cast<std::size_t>(d.rows * d.ld), H::template from_double<T>(pad));
  for (std::int64_t i = 0; i < m.rows; ++i)
    for (std::int64_t j = 0; j < m.cols; ++j)
      host[static_cast<std::size_t>(i * d.ld + j)] = H::template from_double<T>(m(i, j));
  if (d.rows * d.ld > 0) {
    rankwise::Kernels<typename H::Backend, T>::upload(
        ctx, host.data(),
        rankwise::MatrixView<T>(d.buf.data(), d.rows, d.ld, H::Backend::kMemorySpace));
  }
  return d;
}

/// The raw elements of `v`, row-major and contiguous, on the host.
template <class H, class T>
std::vector<T> to_host_raw(typename H::Ctx& ctx, rankwise::MatrixView<const T> v) {
  std::vector<T> host(static_cast<std::size_t>(v.rows * v.cols));
  if (!v.empty()) rankwise::Kernels<typename H::Backend, T>::download(ctx, v, host.data());
  return host;
}

/// `v` downloaded and widened to double.
template <class H, class T>
HostMatrix to_host(typename H::Ctx& ctx, rankwise::MatrixView<const T> v) {
  const std::vector<T> raw = to_host_raw<H, T>(ctx, v);
  HostMatrix m(v.rows, v.cols);
  for (std::size_t i = 0; i < raw.size(); ++i) m.v[i] = H::to_double(raw[i]);
  return m;
}

template <class H, class T>
HostMatrix to_host(typename H::Ctx& ctx, const DeviceMatrix<H, T>& d) {
  return to_host<H, T>(ctx, d.cview());
}

/// True when every padding element (columns cols..ld-1) of `d` still holds `pad`.
template <class H, class T>
bool padding_intact(typename H::Ctx& ctx, const DeviceMatrix<H, T>& d, double pad) {
  const HostMatrix all = to_host<H, T>(ctx, d.padded_view());
  const double expected = H::to_double(H::template from_double<T>(pad));
  for (std::int64_t i = 0; i < d.rows; ++i)
    for (std::int64_t j = d.cols; j < d.ld; ++j)
      if (!(all(i, j) == expected)) return false;
  return true;
}

/// The opposite of the backend's memory space, for wrong-space checks.
template <class H>
constexpr rankwise::MemorySpace foreign_space() {
  return H::Backend::kMemorySpace == rankwise::MemorySpace::kHost ? rankwise::MemorySpace::kDevice
                                                                  : rankwise::MemorySpace::kHost;
}

}  // namespace rwtest
