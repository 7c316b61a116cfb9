// Non-owning view of a row-major matrix in host or device memory.
#pragma once

#include <cstdint>
#include <ostream>
#include <type_traits>

#include "rankwise/core/config.hpp"
#include "rankwise/core/error.hpp"

namespace rankwise {

/// Where the memory behind a view lives.
enum class MemorySpace { kHost, kDevice };

inline const char* to_string(MemorySpace space) {
  return space == MemorySpace::kHost ? "host" : "device";
}

/// Whether an operand is used as stored or transposed.
enum class Op { kNoTrans, kTrans };

/// A row-major matrix: element (i, j) is `data[i * ld + j]`. The view never
/// owns memory; `space` says whether `data` is a host or a device pointer.
/// An empty view (rows or cols 0) may have a null `data`.
template <class T>
struct MatrixView {
  T* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t ld = 0;  // elements between the starts of consecutive rows
  MemorySpace space = MemorySpace::kHost;

  MatrixView() = default;
  MatrixView(T* data_, std::int64_t rows_, std::int64_t cols_, MemorySpace space_,
             std::int64_t ld_ = -1)
      : data(data_), rows(rows_), cols(cols_), ld(ld_ < 0 ? cols_ : ld_), space(space_) {}

  // A view of T converts to a view of const T, never the reverse.
  template <class U,
            class = std::enable_if_t<std::is_same<const U, T>::value && !std::is_same<U, T>::value>>
  MatrixView(const MatrixView<U>& other)  // NOLINT(google-explicit-constructor)
      : data(other.data), rows(other.rows), cols(other.cols), ld(other.ld), space(other.space) {}

  std::int64_t size() const { return rows * cols; }
  bool empty() const { return rows == 0 || cols == 0; }
  bool contiguous() const { return ld == cols || rows <= 1; }

  /// Rows [first, first + count) as a view of the same memory.
  MatrixView row_block(std::int64_t first, std::int64_t count) const {
    RANKWISE_CHECK(first >= 0 && count >= 0 && first + count <= rows, "row_block: rows [", first,
                   ", ", first + count, ") out of range for a view with ", rows, " rows");
    return MatrixView(count == 0 ? data : data + first * ld, count, cols, space, ld);
  }
};

/// View over host memory.
template <class T>
MatrixView<T> host_view(T* data, std::int64_t rows, std::int64_t cols, std::int64_t ld = -1) {
  return MatrixView<T>(data, rows, cols, MemorySpace::kHost, ld);
}

/// View over device memory.
template <class T>
MatrixView<T> device_view(T* data, std::int64_t rows, std::int64_t cols, std::int64_t ld = -1) {
  return MatrixView<T>(data, rows, cols, MemorySpace::kDevice, ld);
}

/// Prints "(rows x cols)" for error messages.
struct ShapeOf {
  std::int64_t rows, cols;
};
inline std::ostream& operator<<(std::ostream& out, ShapeOf s) {
  return out << "(" << s.rows << " x " << s.cols << ")";
}
template <class T>
ShapeOf shape_of(const MatrixView<T>& v) {
  return {v.rows, v.cols};
}

/// Validates a view argument: its shape, memory space, stride and pointer.
/// Throws rankwise::error naming `name` and both shapes on any mismatch.
template <class T>
void check_view(const MatrixView<T>& v, const char* name, std::int64_t rows, std::int64_t cols,
                MemorySpace space) {
  RANKWISE_CHECK(v.rows == rows && v.cols == cols, name, ": expected shape ", ShapeOf{rows, cols},
                 ", got ", shape_of(v));
  RANKWISE_CHECK(v.ld >= v.cols || v.rows <= 1, name, ": leading dimension ", v.ld,
                 " is smaller than its ", v.cols, " columns");
  RANKWISE_CHECK(v.empty() || v.data != nullptr, name, ": null data for a non-empty ", shape_of(v),
                 " matrix");
  RANKWISE_CHECK_CODE(v.empty() || v.space == space, ErrorCode::kMemorySpace, name, ": expected ",
                      to_string(space), " memory, got ", to_string(v.space));
}

}  // namespace rankwise
