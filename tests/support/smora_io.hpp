// Transfers of the integer tensors the router works with (units, experts,
// counts: int32; the token mask: uint8) and of the layer's parameters, over a
// harness H: the raw bytes go through the backend's untyped Memory<Backend>
// (rankwise/backend/memory_decl.hpp). No Eigen, no CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/backend/memory_decl.hpp"
#include "rankwise/backend/tags.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/numeric.hpp"
#include "support/harness_common.hpp"
#include "support/reference.hpp"

namespace rwtest {

/// An owning rows x cols matrix of a trivially copyable U in H's memory space.
template <class H, class U>
struct RawMatrix {
  using Backend = typename H::Backend;
  std::int64_t rows = 0, cols = 0;
  rankwise::Buffer<Backend, U> buf;

  RawMatrix(std::int64_t rows_, std::int64_t cols_)
      : rows(rows_), cols(cols_), buf(rows_ * cols_) {}
  rankwise::MatrixView<U> view() {
    return rankwise::MatrixView<U>(buf.data(), rows, cols, Backend::kMemorySpace);
  }
  rankwise::MatrixView<const U> cview() const {
    return rankwise::MatrixView<const U>(buf.data(), rows, cols, Backend::kMemorySpace);
  }
};

template <class H, class U>
RawMatrix<H, U> upload_raw(typename H::Ctx& ctx, const std::vector<U>& host, std::int64_t rows,
                           std::int64_t cols) {
  RawMatrix<H, U> m(rows, cols);
  rankwise::Memory<typename H::Backend>::upload(ctx, m.buf.data(), host.data(),
                                                sizeof(U) * static_cast<std::size_t>(rows * cols));
  return m;
}

/// The elements of a contiguous view, on the host.
template <class H, class U>
std::vector<U> download_raw(typename H::Ctx& ctx, rankwise::MatrixView<const U> v) {
  std::vector<U> host(static_cast<std::size_t>(v.rows * v.cols));
  rankwise::Memory<typename H::Backend>::download(ctx, host.data(), v.data,
                                                  sizeof(U) * host.size());
  return host;
}

/// A token mask (1 x n) in backend memory; an empty host mask gives an empty view.
template <class H>
struct DeviceMask {
  RawMatrix<H, std::uint8_t> m;
  bool present;
  DeviceMask(typename H::Ctx& ctx, const std::vector<std::uint8_t>& mask)
      : m(upload_raw<H, std::uint8_t>(ctx, mask, 1, static_cast<std::int64_t>(mask.size()))),
        present(!mask.empty()) {}
  rankwise::MatrixView<const std::uint8_t> view() const {
    return present ? m.cview() : rankwise::MatrixView<const std::uint8_t>();
  }
};

/// Writes a host matrix (rounded to T) into an existing backend view.
template <class H, class T>
void upload_into(typename H::Ctx& ctx, const HostMatrix& m, rankwise::MatrixView<T> dst) {
  std::vector<T> host(static_cast<std::size_t>(m.size()));
  for (std::size_t i = 0; i < host.size(); ++i) host[i] = H::template from_double<T>(m.v[i]);
  if (!host.empty()) rankwise::Kernels<typename H::Backend, T>::upload(ctx, host.data(), dst);
}

/// A host vector as a (1 x size) matrix, and back.
inline HostMatrix row_of(const std::vector<double>& v) {
  HostMatrix m(1, static_cast<std::int64_t>(v.size()));
  m.v = v;
  return m;
}

}  // namespace rwtest
