// Test harness for the CPU (Eigen) backend: storage types float and double.
#pragma once

#include "rankwise/rankwise.hpp"
#include "support/compare.hpp"
#include "support/harness_common.hpp"
#include "support/reference.hpp"
#include "support/tolerance.hpp"

namespace rwtest {

struct CpuHarness {
  using Backend = rankwise::CpuBackend;
  using Ctx = rankwise::Context<Backend>;
  static constexpr const char* kName = "cpu";

  template <class T>
  static T from_double(double v) {
    return static_cast<T>(v);
  }
  template <class T>
  static double to_double(T v) {
    return static_cast<double>(v);
  }
  template <class T>
  static const char* type_name() {
    return Tolerance<T>::kName;
  }
};

}  // namespace rwtest
