// DeviceOps for the CPU backend: the study's elementwise GELU and squared
// error, as plain loops on host memory. Include after <rankwise/rankwise.hpp>
// and before instantiating anything from trainer.hpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <rankwise/rankwise.hpp>

#include "trainer.hpp"

namespace multitask {

template <>
struct DeviceOps<rankwise::CpuBackend> {
  using Ctx = rankwise::Context<rankwise::CpuBackend>;
  static constexpr bool kCheckRouterFinite = true;  // free on the host

  template <class T>
  static void gelu_forward(Ctx&, MatrixView<const T> z, MatrixView<T> h) {
    check(z, "gelu_forward");
    const T c = static_cast<T>(0.7978845608028654);
    for (std::int64_t i = 0; i < z.size(); ++i) {
      const T v = z.data[i];
      h.data[i] = T(0.5) * v * (T(1) + std::tanh(c * (v + T(0.044715) * v * v * v)));
    }
  }

  template <class T>
  static void gelu_backward(Ctx&, MatrixView<const T> z, MatrixView<const T> dh, MatrixView<T> dz) {
    check(z, "gelu_backward");
    const T c = static_cast<T>(0.7978845608028654);
    for (std::int64_t i = 0; i < z.size(); ++i) {
      const T v = z.data[i];
      const T th = std::tanh(c * (v + T(0.044715) * v * v * v));
      const T grad = T(0.5) * (T(1) + th) +
                     T(0.5) * v * (T(1) - th * th) * c * (T(1) + T(3 * 0.044715) * v * v);
      dz.data[i] = dh.data[i] * grad;
    }
  }

  template <class T>
  static void squared_error(Ctx&, MatrixView<const T> y, MatrixView<const T> target,
                            MatrixView<T> dy, double grad_scale, double* acc) {
    check(y, "squared_error");
    double sum = 0;
    const T s = static_cast<T>(grad_scale);
    for (std::int64_t i = 0; i < y.size(); ++i) {
      const T e = y.data[i] - target.data[i];
      sum += static_cast<double>(e) * static_cast<double>(e);
      if (!dy.empty()) dy.data[i] = s * e;
    }
    *acc += sum;
  }

  static void zero(Ctx&, double* acc, std::int64_t n) {
    std::memset(acc, 0, sizeof(double) * static_cast<std::size_t>(n));
  }
  static void read(Ctx&, const double* acc, std::int64_t n, double* host) {
    std::memcpy(host, acc, sizeof(double) * static_cast<std::size_t>(n));
  }

 private:
  template <class T>
  static void check(const MatrixView<T>& m, const char* what) {
    RANKWISE_CHECK(m.contiguous(), what, ": views must be contiguous");
  }
};

}  // namespace multitask
