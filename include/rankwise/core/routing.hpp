// The rank-expert routing rule, per token, written once for every backend:
// the CPU backend loops over tokens calling these functions and the CUDA
// backend calls them from one thread per token.
#pragma once

#include <cmath>
#include <cstdint>

#include "rankwise/core/config.hpp"
#include "rankwise/core/router_config.hpp"

namespace rankwise {

/// RouterConfig reduced to what the per-token functions read (trivially
/// copyable, passed by value to kernels).
struct RoutingRule {
  int num_experts;        // E
  int group_size;         // g
  int experts_per_token;  // k / g
  ScoreFunction score;
  GateNormalization normalization;
  bool gate_uses_bias;
  float epsilon;

  static RoutingRule from(const RouterConfig& c) {
    c.validate();
    return {static_cast<int>(c.num_experts()),
            static_cast<int>(c.group_size),
            static_cast<int>(c.experts_per_token()),
            c.score,
            c.normalization,
            c.gate_uses_bias,
            c.epsilon};
  }
  RANKWISE_HOST_DEVICE int units_per_token() const { return experts_per_token * group_size; }
};

namespace detail {

template <class Real>
RANKWISE_HOST_DEVICE inline bool is_finite(Real v) {
  return v - v == Real(0);
}

// exp in the precision of Real on either side of the compiler.
RANKWISE_HOST_DEVICE inline float exp_real(float v) {
#if defined(__CUDA_ARCH__)
  return expf(v);
#else
  return std::exp(v);
#endif
}
RANKWISE_HOST_DEVICE inline double exp_real(double v) {
#if defined(__CUDA_ARCH__)
  return ::exp(v);
#else
  return std::exp(v);
#endif
}

// Multiplier c of the gate c * v / max(Σ v, ε) per normalisation.
template <class Real>
RANKWISE_HOST_DEVICE inline Real gate_numerator(const RoutingRule& rule) {
  return rule.normalization == GateNormalization::kSumToK
             ? static_cast<Real>(rule.units_per_token())
             : Real(1);
}

}  // namespace detail

/// Routes one token.
///   logits  (E)      router logits
///   bias    (E)      balance bias, or null for none
///   scores  (E)      out: s0, kept for the backward pass
///   experts (k/g)    out: selected experts, best first; ties go to the lower index
///   units   (k)      out: unit indices, expert t's g units at [t*g, (t+1)*g)
///   gates   (k)      out: the gate of each unit
/// Returns false when a logit or bias is not finite; the token then gets the
/// first k/g experts with zero gates (it contributes nothing).
template <class Real>
RANKWISE_HOST_DEVICE inline bool route_token(const RoutingRule& rule, const Real* logits,
                                             const Real* bias, Real* scores, int* experts,
                                             int* units, Real* gates) {
  const int num_experts = rule.num_experts;
  Real max_logit = logits[0];
  bool finite = true;
  for (int e = 0; e < num_experts; ++e) {
    finite =
        finite && detail::is_finite(logits[e]) && (bias == nullptr || detail::is_finite(bias[e]));
    max_logit = logits[e] > max_logit ? logits[e] : max_logit;
  }
  if (!finite) {
    // A safe routing (valid indices, zero gates) so that nothing downstream
    // reads or writes out of bounds, whether or not the caller checks.
    for (int e = 0; e < num_experts; ++e) scores[e] = Real(0);
    for (int t = 0; t < rule.experts_per_token; ++t) {
      experts[t] = t;
      for (int q = 0; q < rule.group_size; ++q) {
        units[t * rule.group_size + q] = t * rule.group_size + q;
        gates[t * rule.group_size + q] = Real(0);
      }
    }
    return false;
  }
  if (rule.score == ScoreFunction::kSigmoid) {
    for (int e = 0; e < num_experts; ++e)
      scores[e] = Real(1) / (Real(1) + detail::exp_real(-logits[e]));
  } else {
    // Shifted by the max so exp never overflows.
    Real total = Real(0);
    for (int e = 0; e < num_experts; ++e) {
      scores[e] = detail::exp_real(logits[e] - max_logit);
      total += scores[e];
    }
    for (int e = 0; e < num_experts; ++e) scores[e] /= total;
  }
  // Selection by z = s0 + b without marking: the t-th pick is the best expert
  // ordered strictly after pick t-1 in (z descending, index ascending).
  Real prev_z = Real(0);
  int prev_e = -1;
  Real norm = Real(0);
  for (int t = 0; t < rule.experts_per_token; ++t) {
    int best = -1;
    Real best_z = Real(0);
    for (int e = 0; e < num_experts; ++e) {
      const Real z = scores[e] + (bias != nullptr ? bias[e] : Real(0));
      const bool after_prev = prev_e < 0 || z < prev_z || (z == prev_z && e > prev_e);
      if (after_prev && (best < 0 || z > best_z)) {
        best = e;
        best_z = z;
      }
    }
    experts[t] = best;
    prev_z = best_z;
    prev_e = best;
    const Real v = rule.gate_uses_bias ? best_z : scores[best];
    gates[t * rule.group_size] = v;  // provisional: the unnormalised value
    norm += v * static_cast<Real>(rule.group_size);
  }
  const bool normalise = rule.normalization != GateNormalization::kNone;
  const Real scale = normalise ? detail::gate_numerator<Real>(rule) /
                                     (norm > Real(rule.epsilon) ? norm : Real(rule.epsilon))
                               : Real(1);
  for (int t = 0; t < rule.experts_per_token; ++t) {
    const Real gate = gates[t * rule.group_size] * scale;
    for (int q = 0; q < rule.group_size; ++q) {
      units[t * rule.group_size + q] = experts[t] * rule.group_size + q;
      gates[t * rule.group_size + q] = gate;
    }
  }
  return true;
}

/// Backward of route_token for one token: from ∂L/∂gate of its k units to
/// ∂L/∂logit of all E experts (zero where the expert was not selected, except
/// through the softmax). `extra_dscore` (E, or null) is added to ∂L/∂s0 first:
/// the auxiliary load-balancing loss uses it. `dlogits` (E) is overwritten.
template <class Real>
RANKWISE_HOST_DEVICE inline void route_token_backward(const RoutingRule& rule, const Real* scores,
                                                      const Real* bias, const int* experts,
                                                      const Real* dgates, const Real* extra_dscore,
                                                      Real* dlogits) {
  const int ke = rule.experts_per_token;
  const int g = rule.group_size;
  // ∂L/∂v_t for the selected experts, v = z (gate_uses_bias) or s0. With
  // G = c v / S and S = g Σ_t v_t: ∂L/∂v_t = (c/S)(D_t − g Σ_u D_u v_u / S),
  // D_t = Σ of ∂L/∂gate over expert t's g units. A clamped S is a constant.
  Real norm = Real(0);
  Real weighted = Real(0);
  for (int t = 0; t < ke; ++t) {
    const int e = experts[t];
    const Real v = scores[e] + (rule.gate_uses_bias && bias != nullptr ? bias[e] : Real(0));
    Real d = Real(0);
    for (int q = 0; q < g; ++q) d += dgates[t * g + q];
    norm += v * static_cast<Real>(g);
    weighted += d * v;
  }
  for (int e = 0; e < rule.num_experts; ++e) {
    dlogits[e] = extra_dscore != nullptr ? extra_dscore[e] : Real(0);  // ∂L/∂s0 for now
  }
  const bool normalise = rule.normalization != GateNormalization::kNone;
  const bool clamped = norm <= Real(rule.epsilon);
  const Real s = clamped ? Real(rule.epsilon) : norm;
  const Real c = detail::gate_numerator<Real>(rule);
  for (int t = 0; t < ke; ++t) {
    Real d = Real(0);
    for (int q = 0; q < g; ++q) d += dgates[t * g + q];
    Real dv = d;
    if (normalise) {
      dv = clamped ? c / s * d : c / s * (d - static_cast<Real>(g) * weighted / s);
    }
    dlogits[experts[t]] += dv;
  }
  // Through the score function, in place: ∂L/∂logit from ∂L/∂s0.
  if (rule.score == ScoreFunction::kSigmoid) {
    for (int e = 0; e < rule.num_experts; ++e) {
      dlogits[e] *= scores[e] * (Real(1) - scores[e]);
    }
  } else {
    Real dot = Real(0);
    for (int e = 0; e < rule.num_experts; ++e) dot += dlogits[e] * scores[e];
    for (int e = 0; e < rule.num_experts; ++e) dlogits[e] = scores[e] * (dlogits[e] - dot);
  }
}

/// Loss-free balancing step for expert e: u * sign(mean(c) − c_e), with the
/// counts c of one batch. Integer comparison keeps it exact.
RANKWISE_HOST_DEVICE inline float balance_bias_step(const int* counts, int num_experts, int e,
                                                    float rate) {
  long long total = 0;
  for (int i = 0; i < num_experts; ++i) total += counts[i];
  // sign(total / E − c_e) = sign(total − E c_e), in integers.
  const long long diff = total - static_cast<long long>(num_experts) * counts[e];
  return diff > 0 ? rate : (diff < 0 ? -rate : 0.0f);
}

/// Switch-Transformer auxiliary loss, L = coef · E · Σ_e f_e · P_e, with
/// f_e = c_e / (N · k/g) the share of assignments and P_e = mean_n s0[n][e]
/// the mean score. N (valid tokens) is Σ c / (k/g), so both the value and
/// ∂L/∂s0[n][e] = coef · E · f_e / N follow from the counts alone.
RANKWISE_HOST_DEVICE inline double switch_aux_dscore(const int* counts, int num_experts, int e,
                                                     int experts_per_token, double coef) {
  long long total = 0;
  for (int i = 0; i < num_experts; ++i) total += counts[i];
  if (total == 0) return 0.0;
  const double tokens = static_cast<double>(total) / experts_per_token;
  const double share = static_cast<double>(counts[e]) / static_cast<double>(total);
  return coef * num_experts * share / tokens;
}

}  // namespace rankwise
