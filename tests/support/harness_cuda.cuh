// Test harness for the CUDA backend: storage types float, __half and
// __nv_bfloat16. No Eigen: only <rankwise/cuda.cuh> and the Eigen-free
// support headers.
#pragma once

#include "rankwise/cuda.cuh"
#include "support/compare.hpp"
#include "support/harness_common.hpp"
#include "support/reference.hpp"
#include "support/tolerance.hpp"

namespace rwtest {

struct CudaHarness {
  using Backend = rankwise::CudaBackend;
  using Ctx = rankwise::Context<Backend>;
  static constexpr const char* kName = "cuda";

  /// Through float, as the backend converts (fill_uniform rounds its double
  /// to float, then to T): the values a test expects are the backend's.
  template <class T>
  static T from_double(double v) {
    return rankwise::detail::cuda::Element<T>::from_float(static_cast<float>(v));
  }
  template <class T>
  static double to_double(T v) {
    return static_cast<double>(rankwise::detail::cuda::Element<T>::to_float(v));
  }
  template <class T>
  static const char* type_name() {
    return Tolerance<T>::kName;
  }
};

}  // namespace rwtest
