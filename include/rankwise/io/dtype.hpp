// The element types of safetensors tensors: their header spellings, widths and the
// order safetensors' writer sorts them by.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "rankwise/core/error.hpp"

namespace rankwise {
namespace io {

/// The element type of a safetensors tensor. The first four are the ones whose
/// values rankwise converts (to and from double); the others are known so that
/// a file holding them is still validated and can be copied unchanged.
enum class DType : std::uint8_t {
  kF32,
  kF16,
  kBF16,
  kF64,
  kBool,
  kU8,
  kI8,
  kI16,
  kU16,
  kI32,
  kU32,
  kI64,
  kU64,
  kF8E5M2,
  kF8E4M3,
  kF8E8M0,
  kF8E4M3Fnuz,
  kF8E5M2Fnuz,
  kF4,
  kF6E2M3,
  kF6E3M2,
  kC64,
};

namespace detail {

struct DTypeInfo {
  DType dtype;
  const char* name;  // as spelled in a safetensors header
  int bits;          // bits per element (F4 and F6 are sub-byte)
  int order;         // position in safetensors' own Dtype enum, which its writer sorts by
};

// `order` mirrors the declaration order of the reference implementation's
// Dtype enum (increasing alignment); the writer sorts by it, descending, so
// that every tensor's data starts aligned to its element size, as safetensors does.
inline const DTypeInfo* dtype_table(std::size_t& count) {
  static const DTypeInfo table[] = {
      {DType::kBool, "BOOL", 8, 0},
      {DType::kF4, "F4", 4, 1},
      {DType::kF6E2M3, "F6_E2M3", 6, 2},
      {DType::kF6E3M2, "F6_E3M2", 6, 3},
      {DType::kU8, "U8", 8, 4},
      {DType::kI8, "I8", 8, 5},
      {DType::kF8E5M2, "F8_E5M2", 8, 6},
      {DType::kF8E4M3, "F8_E4M3", 8, 7},
      {DType::kF8E8M0, "F8_E8M0", 8, 8},
      {DType::kF8E4M3Fnuz, "F8_E4M3FNUZ", 8, 9},
      {DType::kF8E5M2Fnuz, "F8_E5M2FNUZ", 8, 10},
      {DType::kI16, "I16", 16, 11},
      {DType::kU16, "U16", 16, 12},
      {DType::kF16, "F16", 16, 13},
      {DType::kBF16, "BF16", 16, 14},
      {DType::kI32, "I32", 32, 15},
      {DType::kU32, "U32", 32, 16},
      {DType::kF32, "F32", 32, 17},
      {DType::kC64, "C64", 64, 18},
      {DType::kF64, "F64", 64, 19},
      {DType::kI64, "I64", 64, 20},
      {DType::kU64, "U64", 64, 21},
  };
  count = sizeof(table) / sizeof(table[0]);
  return table;
}

inline const DTypeInfo& dtype_info(DType dtype) {
  std::size_t count = 0;
  const DTypeInfo* table = dtype_table(count);
  for (std::size_t i = 0; i < count; ++i) {
    if (table[i].dtype == dtype) return table[i];
  }
  RANKWISE_CHECK(false, "safetensors: DType value ", static_cast<int>(dtype),
                 " is not a known dtype");
  return table[0];  // unreachable
}

}  // namespace detail

/// The header spelling of `dtype` ("F32", "BF16", ...).
inline const char* dtype_name(DType dtype) { return detail::dtype_info(dtype).name; }

/// The dtype spelled `name` in a safetensors header, or nullopt when unknown.
inline std::optional<DType> parse_dtype(const std::string& name) {
  std::size_t count = 0;
  const detail::DTypeInfo* table = detail::dtype_table(count);
  for (std::size_t i = 0; i < count; ++i) {
    if (name == table[i].name) return table[i].dtype;
  }
  return std::nullopt;
}

/// Bits per element of `dtype` (4 and 6 for the sub-byte float formats).
inline int dtype_bits(DType dtype) { return detail::dtype_info(dtype).bits; }

/// True for the dtypes whose values rankwise converts to and from double:
/// F32, F16, BF16 and F64.
inline bool dtype_has_values(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16 ||
         dtype == DType::kF64;
}

}  // namespace io
}  // namespace rankwise
