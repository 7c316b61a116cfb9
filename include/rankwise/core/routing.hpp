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
/// copyable, passed by value to kernels). Top-k selects "choices": experts
/// of g units (default) or single ranks (RouterConfig::bias_per_rank).
struct RoutingRule {
  int num_experts;         // E: scores per token
  int group_size;          // g
  int num_choices;         // C: E, or r with a per-rank bias
  int choices_per_token;   // k/g, or k with a per-rank bias
  int units_per_choice;    // g, or 1 with a per-rank bias
  int choices_per_expert;  // 1, or g with a per-rank bias
  ScoreFunction score;
  GateNormalization normalization;
  bool gate_uses_bias;
  float epsilon;

  static RoutingRule from(const RouterConfig& c) {
    c.validate();
    return {static_cast<int>(c.num_experts()),
            static_cast<int>(c.group_size),
            static_cast<int>(c.num_choices()),
            static_cast<int>(c.choices_per_token()),
            static_cast<int>(c.units_per_choice()),
            static_cast<int>(c.bias_per_rank ? c.group_size : 1),
            c.score,
            c.normalization,
            c.gate_uses_bias,
            c.epsilon};
  }
  RANKWISE_HOST_DEVICE int units_per_token() const { return choices_per_token * units_per_choice; }
  /// The expert whose score choice c carries.
  RANKWISE_HOST_DEVICE int expert_of(int c) const { return c / choices_per_expert; }
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

// The normaliser S = Σ v with its magnitude clamped to at least ε and its
// sign kept: a selected sum at or below zero (a balance bias drifted
// negative) must not turn gates into c·v / ε with the sign flipped.
template <class Real>
RANKWISE_HOST_DEVICE inline Real clamped_normaliser(Real norm, float epsilon) {
  const Real eps = static_cast<Real>(epsilon);
  if (norm >= Real(0)) return norm > eps ? norm : eps;
  return norm < -eps ? norm : -eps;
}

// Whether clamped_normaliser replaced norm: the normaliser is then a
// constant, so the backward pass drops its derivative.
template <class Real>
RANKWISE_HOST_DEVICE inline bool normaliser_is_clamped(Real norm, float epsilon) {
  const Real eps = static_cast<Real>(epsilon);
  return norm >= Real(0) ? !(norm > eps) : !(norm < -eps);
}

}  // namespace detail

/// Routes one token.
///   logits  (E)      router logits
///   bias    (C)      balance bias per choice, or null for none
///   scores  (E)      out: s0, kept for the backward pass
///   choices (k/g|k)  out: selected choices (experts, or ranks with a per-rank
///                    bias), best first; ties go to the lower index
///   units   (k)      out: unit indices, choice t's units at [t*u, (t+1)*u)
///   gates   (k)      out: the gate of each unit
/// Returns false when a logit or bias is not finite; the token then gets the
/// first choices with zero gates (it contributes nothing).
template <class Real>
RANKWISE_HOST_DEVICE inline bool route_token(const RoutingRule& rule, const Real* logits,
                                             const Real* bias, Real* scores, int* choices,
                                             int* units, Real* gates) {
  const int num_experts = rule.num_experts;
  const int num_choices = rule.num_choices;
  const int per_choice = rule.units_per_choice;
  Real max_logit = logits[0];
  bool finite = true;
  for (int e = 0; e < num_experts; ++e) {
    finite = finite && detail::is_finite(logits[e]);
    max_logit = logits[e] > max_logit ? logits[e] : max_logit;
  }
  for (int c = 0; bias != nullptr && c < num_choices; ++c) {
    finite = finite && detail::is_finite(bias[c]);
  }
  if (!finite) {
    // A safe routing (valid indices, zero gates) so that nothing downstream
    // reads or writes out of bounds, whether or not the caller checks.
    for (int e = 0; e < num_experts; ++e) scores[e] = Real(0);
    for (int t = 0; t < rule.choices_per_token; ++t) {
      choices[t] = t;
      for (int q = 0; q < per_choice; ++q) {
        units[t * per_choice + q] = t * per_choice + q;
        gates[t * per_choice + q] = Real(0);
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
  // Selection by z = s0 + b without marking: the t-th pick is the best choice
  // ordered strictly after pick t-1 in (z descending, index ascending).
  Real prev_z = Real(0);
  int prev_c = -1;
  Real norm = Real(0);
  for (int t = 0; t < rule.choices_per_token; ++t) {
    int best = -1;
    Real best_z = Real(0);
    for (int c = 0; c < num_choices; ++c) {
      const Real z = scores[rule.expert_of(c)] + (bias != nullptr ? bias[c] : Real(0));
      const bool after_prev = prev_c < 0 || z < prev_z || (z == prev_z && c > prev_c);
      if (after_prev && (best < 0 || z > best_z)) {
        best = c;
        best_z = z;
      }
    }
    choices[t] = best;
    prev_z = best_z;
    prev_c = best;
    const Real v = rule.gate_uses_bias ? best_z : scores[rule.expert_of(best)];
    gates[t * per_choice] = v;  // provisional: the unnormalised value
    norm += v * static_cast<Real>(per_choice);
  }
  const bool normalise = rule.normalization != GateNormalization::kNone;
  const Real scale =
      normalise ? detail::gate_numerator<Real>(rule) / detail::clamped_normaliser(norm, rule.epsilon)
                : Real(1);
  for (int t = 0; t < rule.choices_per_token; ++t) {
    const Real gate = gates[t * per_choice] * scale;
    for (int q = 0; q < per_choice; ++q) {
      units[t * per_choice + q] = choices[t] * per_choice + q;
      gates[t * per_choice + q] = gate;
    }
  }
  return true;
}

/// Backward of route_token for one token: from ∂L/∂gate of its k units to
/// ∂L/∂logit of all E experts (zero where the expert was not selected, except
/// through the softmax). `extra_dscore` (E, or null) is added to ∂L/∂s0 first:
/// the auxiliary load-balancing loss uses it. `dlogits` (E) is overwritten.
/// `dbias` (C, or null) is overwritten with ∂L/∂bias of this token: nonzero
/// only for selected choices, and only when the gates use the bias (the
/// selection itself has no gradient).
template <class Real>
RANKWISE_HOST_DEVICE inline void route_token_backward(const RoutingRule& rule, const Real* scores,
                                                      const Real* bias, const int* choices,
                                                      const Real* dgates, const Real* extra_dscore,
                                                      Real* dlogits, Real* dbias = nullptr) {
  const int kc = rule.choices_per_token;
  const int u = rule.units_per_choice;
  // ∂L/∂v_t for the selected choices, v = z (gate_uses_bias) or s0. With
  // G = c v / S and S = u Σ_t v_t: ∂L/∂v_t = (c/S)(D_t − u Σ_w D_w v_w / S),
  // D_t = Σ of ∂L/∂gate over choice t's u units. A clamped S is a constant.
  Real norm = Real(0);
  Real weighted = Real(0);
  for (int t = 0; t < kc; ++t) {
    const int ch = choices[t];
    const Real v = scores[rule.expert_of(ch)] +
                   (rule.gate_uses_bias && bias != nullptr ? bias[ch] : Real(0));
    Real d = Real(0);
    for (int q = 0; q < u; ++q) d += dgates[t * u + q];
    norm += v * static_cast<Real>(u);
    weighted += d * v;
  }
  for (int e = 0; e < rule.num_experts; ++e) {
    dlogits[e] = extra_dscore != nullptr ? extra_dscore[e] : Real(0);  // ∂L/∂s0 for now
  }
  if (dbias != nullptr) {
    for (int ch = 0; ch < rule.num_choices; ++ch) dbias[ch] = Real(0);
  }
  const bool normalise = rule.normalization != GateNormalization::kNone;
  const Real s = detail::clamped_normaliser(norm, rule.epsilon);
  const bool clamped = detail::normaliser_is_clamped(norm, rule.epsilon);
  const Real c = detail::gate_numerator<Real>(rule);
  for (int t = 0; t < kc; ++t) {
    Real d = Real(0);
    for (int q = 0; q < u; ++q) d += dgates[t * u + q];
    Real dv = d;
    if (normalise) {
      dv = clamped ? c / s * d : c / s * (d - static_cast<Real>(u) * weighted / s);
    }
    dlogits[rule.expert_of(choices[t])] += dv;
    if (dbias != nullptr && rule.gate_uses_bias) dbias[choices[t]] += dv;
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

/// Loss-free balancing step for choice e (an expert, or a rank with a per-rank
/// bias): u * sign(mean(c) − c_e), with the counts c of one batch. Integer comparison keeps it exact.
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
