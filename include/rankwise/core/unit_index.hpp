// Unit and expert indices: the validity rule shared by host checks and device
// kernels, and the host scan the CPU backend runs before any work.
#pragma once

#include <cstdint>

#include "rankwise/core/config.hpp"
#include "rankwise/core/matrix_view.hpp"

namespace rankwise {

/// Whether index i names one of `count` rank units (or experts): 0 <= i < count.
/// The one rule behind every index check. On the CPU, ops scan their indices
/// with it on the host before any work and throw; CUDA kernels test each index
/// with it, skip one it rejects and count it in a device-side flag, so the hot
/// path never synchronises with the host.
RANKWISE_HOST_DEVICE constexpr bool valid_unit_index(std::int64_t i, std::int64_t count) {
  return i >= 0 && i < count;
}

/// The outcome of scanning an index matrix: how many entries fail
/// valid_unit_index, and the first of them (row, column, value).
struct IndexScan {
  std::int64_t invalid = 0;
  std::int64_t row = -1;
  std::int64_t col = -1;
  std::int64_t value = 0;
};

/// Scans a host index view (n x k, int32) against [0, count). A broadcast
/// view (ld = 0) is one row, scanned once. O(n · k), reads only.
inline IndexScan scan_unit_indices(const MatrixView<const std::int32_t>& indices,
                                   std::int64_t count) {
  IndexScan scan;
  const std::int64_t rows = indices.ld == 0 && indices.rows > 1 ? 1 : indices.rows;
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int32_t* row = indices.data + i * indices.ld;
    for (std::int64_t j = 0; j < indices.cols; ++j) {
      if (valid_unit_index(row[j], count)) continue;
      if (scan.invalid++ == 0) {
        scan.row = i;
        scan.col = j;
        scan.value = row[j];
      }
    }
  }
  return scan;
}

}  // namespace rankwise
