// Overflow-checked size arithmetic: every element count, byte count and
// workspace size in rankwise goes through these, so a size that does not fit
// in int64 throws instead of wrapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#include "rankwise/core/config.hpp"
#include "rankwise/core/error.hpp"

namespace rankwise {

/// The largest size (elements or bytes) rankwise accepts: int64's maximum, so
/// that every count also fits in std::ptrdiff_t and in a signed loop index.
inline constexpr std::int64_t kMaxSize = std::numeric_limits<std::int64_t>::max();
// Namespace constants, not numeric_limits calls, so device code may use them.
inline constexpr std::int64_t kMinInt64 = std::numeric_limits<std::int64_t>::min();

/// Whether a * b fits in int64, for non-negative a and b.
RANKWISE_HOST_DEVICE constexpr bool mul_fits(std::int64_t a, std::int64_t b) {
  return a == 0 || b <= kMaxSize / a;
}

/// a * b for sizes a, b >= 0. Throws rankwise::error naming `what`, a and b
/// when either is negative or the product exceeds int64.
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, const char* what) {
  RANKWISE_CHECK(a >= 0 && b >= 0, what, ": sizes must be non-negative, got ", a, " and ", b);
  RANKWISE_CHECK(mul_fits(a, b), what, ": ", a, " * ", b, " overflows int64 (max ", kMaxSize, ")");
  return a * b;
}

/// a + b for sizes a, b >= 0, checked as checked_mul.
inline std::int64_t checked_add(std::int64_t a, std::int64_t b, const char* what) {
  RANKWISE_CHECK(a >= 0 && b >= 0, what, ": sizes must be non-negative, got ", a, " and ", b);
  RANKWISE_CHECK(a <= kMaxSize - b, what, ": ", a, " + ", b, " overflows int64 (max ", kMaxSize,
                 ")");
  return a + b;
}

/// a + b clamped to int64's range: for messages that print a sum which may overflow.
RANKWISE_HOST_DEVICE constexpr std::int64_t saturating_add(std::int64_t a, std::int64_t b) {
  if (b > 0 && a > kMaxSize - b) return kMaxSize;
  if (b < 0 && a < kMinInt64 - b) return kMinInt64;
  return a + b;
}

/// Elements of a rows x cols matrix. Throws naming `what` and the shape when
/// either extent is negative or the count exceeds int64.
inline std::int64_t checked_elements(std::int64_t rows, std::int64_t cols, const char* what) {
  RANKWISE_CHECK(rows >= 0 && cols >= 0, what, ": shape (", rows, " x ", cols,
                 ") has a negative extent");
  RANKWISE_CHECK(mul_fits(rows, cols), what, ": shape (", rows, " x ", cols,
                 ") has more elements than int64 holds (max ", kMaxSize, ")");
  return rows * cols;
}

/// Bytes of `elements` values of `element_size` bytes each, at most kMaxSize.
inline std::size_t checked_bytes(std::int64_t elements, std::size_t element_size,
                                 const char* what) {
  RANKWISE_CHECK(elements >= 0, what, ": element count must be non-negative, got ", elements);
  const auto size = static_cast<std::int64_t>(element_size);
  RANKWISE_CHECK(mul_fits(elements, size), what, ": ", elements, " elements of ", element_size,
                 " bytes overflow int64 bytes (max ", kMaxSize, ")");
  return static_cast<std::size_t>(elements * size);
}

/// a + b bytes, at most kMaxSize.
inline std::size_t checked_add_bytes(std::size_t a, std::size_t b, const char* what) {
  constexpr auto max = static_cast<std::size_t>(kMaxSize);
  RANKWISE_CHECK(a <= max && b <= max - a, what, ": ", a, " + ", b, " bytes overflow int64 (max ",
                 kMaxSize, ")");
  return a + b;
}

/// `bytes` rounded up to a multiple of `alignment` (a power of two), at most kMaxSize.
inline std::size_t checked_align_up(std::size_t bytes, std::size_t alignment, const char* what) {
  constexpr auto max = static_cast<std::size_t>(kMaxSize);
  RANKWISE_CHECK(bytes <= max - (alignment - 1), what, ": ", bytes, " bytes rounded up to ",
                 alignment, " overflow int64 (max ", kMaxSize, ")");
  return (bytes + alignment - 1) & ~(alignment - 1);
}

}  // namespace rankwise
