// Non-owning view of a row-major matrix in host or device memory.
#pragma once

#include <cstdint>
#include <ostream>
#include <type_traits>

#include "rankwise/core/checked_size.hpp"
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
/// An empty view (rows or cols 0) may have a null `data`. Constructed with
/// ld = -1 (the default, kContiguousLd) the rows are packed (ld = cols); any
/// other negative ld is kept as given, so that check_view refuses it.
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
      : data(data_), rows(rows_), cols(cols_), ld(ld_ == -1 ? cols_ : ld_), space(space_) {}

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
    // count <= rows - first, not first + count <= rows: the sum may overflow.
    RANKWISE_CHECK(first >= 0 && count >= 0 && first <= rows && count <= rows - first,
                   "row_block: rows [", first, ", ", saturating_add(first, count),
                   ") out of range for a view with ", rows, " rows");
    return MatrixView(count == 0 ? data : data + first * ld, count, cols, space, ld);
  }
};

/// The `ld` that asks MatrixView, host_view and device_view for packed rows.
inline constexpr std::int64_t kContiguousLd = -1;

/// View over host memory. ld: elements between row starts, at least cols
/// (kContiguousLd: packed); 0 only for the broadcast routing views that
/// rank_units.hpp documents. check_view refuses any other value.
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

namespace detail {

// Elements from the first to one past the last element a view can touch:
// (rows - 1) * ld + cols, or 0 for an empty view. False when that, in bytes of
// T, does not fit in int64 (no pointer could address it).
template <class T>
bool view_span(const MatrixView<T>& v, std::int64_t& span) {
  span = 0;
  if (v.empty()) return true;
  const std::int64_t ld = v.rows <= 1 ? v.cols : v.ld;
  if (!mul_fits(v.rows - 1, ld)) return false;
  const std::int64_t last_row = (v.rows - 1) * ld;
  if (last_row > kMaxSize - v.cols) return false;
  span = last_row + v.cols;
  return mul_fits(span, static_cast<std::int64_t>(sizeof(T)));
}

}  // namespace detail

/// Validates a view argument: its shape, memory space, stride and pointer.
/// Throws rankwise::error naming `name` and both shapes on any mismatch, on a
/// negative extent or leading dimension, and on a view too large to address
/// (its bytes overflow int64).
template <class T>
void check_view(const MatrixView<T>& v, const char* name, std::int64_t rows, std::int64_t cols,
                MemorySpace space) {
  RANKWISE_CHECK(v.rows >= 0 && v.cols >= 0, name, ": shape ", shape_of(v),
                 " has a negative extent");
  RANKWISE_CHECK(v.rows == rows && v.cols == cols, name, ": expected shape ", ShapeOf{rows, cols},
                 ", got ", shape_of(v));
  RANKWISE_CHECK(v.ld >= 0, name, ": leading dimension ", v.ld, " is negative");
  RANKWISE_CHECK(v.ld >= v.cols || v.rows <= 1, name, ": leading dimension ", v.ld,
                 " is smaller than its ", v.cols, " columns");
  std::int64_t span = 0;
  RANKWISE_CHECK(detail::view_span(v, span), name, ": shape ", shape_of(v),
                 " with leading dimension ", v.ld, " spans more than int64 bytes of ", sizeof(T),
                 "-byte elements");
  RANKWISE_CHECK(v.empty() || v.data != nullptr, name, ": null data for a non-empty ", shape_of(v),
                 " matrix");
  RANKWISE_CHECK_CODE(v.empty() || v.space == space, ErrorCode::kMemorySpace, name, ": expected ",
                      to_string(space), " memory, got ", to_string(v.space));
}

/// The addresses [begin, end) a view can touch; begin == end for an empty view.
struct ByteRange {
  std::uintptr_t begin = 0;
  std::uintptr_t end = 0;
};

/// The bytes behind a view; empty for an empty view or one check_view refuses.
template <class T>
ByteRange byte_range(const MatrixView<T>& v) {
  std::int64_t span = 0;
  if (v.data == nullptr || v.rows < 0 || v.cols < 0 || v.ld < 0 || !detail::view_span(v, span) ||
      span == 0) {
    return {};
  }
  const auto begin = reinterpret_cast<std::uintptr_t>(v.data);
  return {begin, begin + static_cast<std::uintptr_t>(span) * sizeof(T)};
}

/// Whether two non-empty address ranges share a byte.
inline bool overlaps(ByteRange a, ByteRange b) {
  return a.begin < a.end && b.begin < b.end && a.begin < b.end && b.begin < a.end;
}

/// Throws rankwise::error when the output view `out` shares memory with
/// `other` (an operand it is computed from, or another output). The test is
/// on address ranges, so it costs two comparisons but also refuses a strided
/// view whose padding holds `other`. Views in different memory spaces are not
/// compared (a host and a device pointer may alias under unified memory; that
/// is not detected).
template <class A, class B>
void check_no_overlap(const char* fn, const MatrixView<A>& out, const char* out_name,
                      const MatrixView<B>& other, const char* other_name) {
  RANKWISE_CHECK(out.space != other.space || !overlaps(byte_range(out), byte_range(other)), fn,
                 ": ", out_name, " ", shape_of(out), " overlaps ", other_name, " ", shape_of(other),
                 " in memory; an output must not share memory with ", "what it is computed from");
}

}  // namespace rankwise
