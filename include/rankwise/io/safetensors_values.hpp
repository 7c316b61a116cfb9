// Safetensors tensors as values (HostTensor, TensorMap) and back: exact for F32, F16,
// BF16 and F64, refusing the dtypes rankwise does not convert.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "rankwise/core/error.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/io/detail/byte_order.hpp"
#include "rankwise/io/detail/tensor_bytes.hpp"
#include "rankwise/io/dtype.hpp"
#include "rankwise/io/float_bits.hpp"
#include "rankwise/io/safetensors_file.hpp"

namespace rankwise {
namespace io {

/// The values of `tensor` as a HostTensor (exact: every F32, F16, BF16 and F64
/// value is a double). Throws rankwise::error(kInvalidArgument) for a dtype
/// without value conversion (integers, bool, 8-bit and smaller floats,
/// complex) or data of the wrong size; `name` labels the tensor in errors.
inline HostTensor to_host_tensor(const SafetensorsTensor& tensor, const std::string& name = "") {
  RANKWISE_CHECK(dtype_has_values(tensor.dtype), "safetensors: tensor \"", name, "\" has dtype ",
                 dtype_name(tensor.dtype),
                 ", which rankwise does not convert to values (supported: F32, F16, BF16, F64)");
  const auto numel = detail::checked_numel(tensor.shape);
  RANKWISE_CHECK(numel.has_value(), "safetensors: tensor \"", name, "\" has invalid shape ",
                 detail::shape_string(tensor.shape));
  const int width = dtype_bits(tensor.dtype) / 8;
  const auto bytes = detail::checked_bytes(*numel, tensor.dtype);
  RANKWISE_CHECK(bytes.has_value() && tensor.data.size() == *bytes, "safetensors: tensor \"", name,
                 "\" holds ", tensor.data.size(), " bytes for shape ",
                 detail::shape_string(tensor.shape), " in ", dtype_name(tensor.dtype));
  HostTensor out;
  out.shape = tensor.shape;
  out.values.resize(static_cast<std::size_t>(*numel));
  const std::uint8_t* p = tensor.data.data();
  for (std::size_t i = 0; i < out.values.size(); ++i, p += width) {
    const std::uint64_t bits = detail::load_le(p, width);
    switch (tensor.dtype) {
      case DType::kF32:
        out.values[i] = detail::decode_float_bits(bits, 8, 23);
        break;
      case DType::kF16:
        out.values[i] = detail::decode_float_bits(bits, 5, 10);
        break;
      case DType::kBF16:
        out.values[i] = detail::decode_float_bits(bits, 8, 7);
        break;
      default:
        std::memcpy(&out.values[i], &bits, sizeof(double));
        break;  // F64
    }
  }
  return out;
}

/// `host` stored as `dtype` (F32, F16, BF16 or F64), rounded to nearest, ties
/// to even. A finite value too large for `dtype` is an error rather than a
/// silent infinity; NaN and infinities are kept. Throws
/// rankwise::error(kInvalidArgument); `name` labels the tensor in errors.
inline SafetensorsTensor from_host_tensor(const HostTensor& host, DType dtype,
                                          const std::string& name = "") {
  RANKWISE_CHECK(dtype_has_values(dtype), "safetensors: cannot store tensor \"", name, "\" as ",
                 dtype_name(dtype), " (supported: F32, F16, BF16, F64)");
  const auto numel = detail::checked_numel(host.shape);
  RANKWISE_CHECK(numel.has_value(), "safetensors: tensor \"", name, "\" has invalid shape ",
                 detail::shape_string(host.shape));
  RANKWISE_CHECK(host.values.size() == static_cast<std::uint64_t>(*numel), "safetensors: tensor \"",
                 name, "\" holds ", host.values.size(), " values for shape ",
                 detail::shape_string(host.shape));
  SafetensorsTensor out;
  out.dtype = dtype;
  out.shape = host.shape;
  const int width = dtype_bits(dtype) / 8;
  const int exp_bits = dtype == DType::kF16 ? 5 : 8;  // F32 and BF16 share float's exponent
  const int man_bits = width * 8 - 1 - exp_bits;
  const std::uint64_t exp_all = (std::uint64_t{1} << exp_bits) - 1;
  out.data.resize(host.values.size() * static_cast<std::size_t>(width));
  std::uint8_t* p = out.data.data();
  for (std::size_t i = 0; i < host.values.size(); ++i, p += width) {
    const double v = host.values[i];
    std::uint64_t bits = 0;
    if (dtype == DType::kF64) {
      std::memcpy(&bits, &v, sizeof(double));
    } else {
      bits = detail::encode_float_bits(v, exp_bits, man_bits);
      // The exponent field all ones from a finite value means it rounded to infinity.
      RANKWISE_CHECK(!std::isfinite(v) || ((bits >> man_bits) & exp_all) != exp_all,
                     "safetensors: value ", v, " at index ", i, " of tensor \"", name,
                     "\" overflows ", dtype_name(dtype));
    }
    detail::store_le(p, bits, width);
  }
  return out;
}

/// Every tensor of `file` as values (see to_host_tensor).
inline TensorMap to_tensor_map(const SafetensorsFile& file) {
  TensorMap out;
  for (const auto& kv : file.tensors) out.emplace(kv.first, to_host_tensor(kv.second, kv.first));
  return out;
}

/// Every tensor of `map` stored as `dtype` (see from_host_tensor), no metadata.
inline SafetensorsFile from_tensor_map(const TensorMap& map, DType dtype) {
  SafetensorsFile out;
  for (const auto& kv : map)
    out.tensors.emplace(kv.first, from_host_tensor(kv.second, dtype, kv.first));
  return out;
}

}  // namespace io
}  // namespace rankwise
