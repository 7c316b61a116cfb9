// Per-storage-type facts for CUDA kernels: cuBLAS data type and conversions
// to and from the float the kernels accumulate in.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <library_types.h>

namespace rankwise {
namespace detail {
namespace cuda {

template <class T>
struct Element;

template <>
struct Element<float> {
  static constexpr cudaDataType_t kDataType = CUDA_R_32F;
  static constexpr const char* kName = "float";
  __host__ __device__ static float to_float(float v) { return v; }
  __host__ __device__ static float from_float(float v) { return v; }
};

template <>
struct Element<__half> {
  static constexpr cudaDataType_t kDataType = CUDA_R_16F;
  static constexpr const char* kName = "half";
  __host__ __device__ static float to_float(__half v) { return __half2float(v); }
  __host__ __device__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Element<__nv_bfloat16> {
  static constexpr cudaDataType_t kDataType = CUDA_R_16BF;
  static constexpr const char* kName = "bfloat16";
  __host__ __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __host__ __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace cuda
}  // namespace detail
}  // namespace rankwise
