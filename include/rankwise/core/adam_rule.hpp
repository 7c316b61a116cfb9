// The AdamW update of one parameter element, written once for every backend.
#pragma once

#include <cmath>

#include "rankwise/core/config.hpp"

namespace rankwise {

// sqrt found by argument type: std::sqrt on the host, CUDA's overloads on the device.
using std::sqrt;

/// Hyper-parameters of one AdamW step (decoupled weight decay, Loshchilov &
/// Hutter 2019), with the bias corrections of step t precomputed.
struct AdamStep {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double correction1 = 1.0;    // 1 − beta1^t
  double correction2 = 1.0;    // 1 − beta2^t
  double max_grad_norm = 0.0;  // 0: no clipping
};

/// Clip factor min(1, max_norm / (‖g‖ + 1e-6)) from the squared global norm.
template <class Real>
RANKWISE_HOST_DEVICE inline Real clip_factor(const AdamStep& s, Real global_norm_sq) {
  if (s.max_grad_norm <= 0.0) return Real(1);
  const Real norm = sqrt(global_norm_sq);
  const Real f = static_cast<Real>(s.max_grad_norm) / (norm + Real(1e-6));
  return f < Real(1) ? f : Real(1);
}

/// Updates one element in place: param, first and second moments.
/// Real is the accumulator type (float, or double for double parameters).
template <class Real>
RANKWISE_HOST_DEVICE inline void adam_update(const AdamStep& s, Real clip, Real grad, Real& param,
                                             Real& m, Real& v) {
  const Real b1 = static_cast<Real>(s.beta1), b2 = static_cast<Real>(s.beta2);
  const Real g = grad * clip;
  m = b1 * m + (Real(1) - b1) * g;
  v = b2 * v + (Real(1) - b2) * g * g;
  const Real m_hat = m / static_cast<Real>(s.correction1);
  const Real v_hat = v / static_cast<Real>(s.correction2);
  const Real denom = sqrt(v_hat) + static_cast<Real>(s.eps);
  param -= static_cast<Real>(s.lr) * (m_hat / denom + static_cast<Real>(s.weight_decay) * param);
}

}  // namespace rankwise
