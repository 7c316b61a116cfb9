// Options of the rank-expert router shared by every routed layer.
#pragma once

#include <cmath>
#include <cstdint>

#include "rankwise/core/error.hpp"

namespace rankwise {

/// How router logits become scores s0.
enum class ScoreFunction { kSigmoid, kSoftmax };

/// How the selected scores become gates.
enum class GateNormalization {
  kSumToK,    ///< the k rank gates of a token sum to k (SMoRA reference code)
  kSumToOne,  ///< they sum to 1
  kNone,      ///< gate = score of the unit's expert
};

/// A rank-expert router over `num_units` rank units grouped into experts of
/// `group_size` consecutive units. Each token activates `top_k` units, i.e.
/// top_k / group_size experts. group_size = 1 is SMoRA; > 1 is block MoE-LoRA.
///
/// With one expert per token (top_k == group_size) and a normalised gate
/// (kSumToK, kSumToOne) every gate is constant, so the router receives no
/// gradient and never learns: top-1 MoE-LoRA wants GateNormalization::kNone
/// (gate = the expert's score, e.g. with ScoreFunction::kSoftmax, as Switch).
struct RouterConfig {
  std::int64_t num_units = 64;  // r
  std::int64_t group_size = 1;  // g
  std::int64_t top_k = 8;       // k, counted in units (ranks)
  ScoreFunction score = ScoreFunction::kSigmoid;
  GateNormalization normalization = GateNormalization::kSumToK;
  /// true: gates from s0 + bias (reference code); false: bias only steers
  /// selection and gates come from s0 (DeepSeek-V3).
  bool gate_uses_bias = true;
  /// Lower bound on the normaliser Σ z before dividing.
  float epsilon = 1e-9f;
  /// Loss-free balancing step u: b_e += u * sign(mean(c) - c_e).
  float bias_update_rate = 1e-5f;

  std::int64_t num_experts() const { return num_units / group_size; }
  std::int64_t experts_per_token() const { return top_k / group_size; }

  /// Throws rankwise::error naming the first inconsistent field.
  void validate() const {
    RANKWISE_CHECK(num_units > 0, "RouterConfig.num_units (r) must be positive, got ", num_units);
    RANKWISE_CHECK(group_size > 0 && num_units % group_size == 0,
                   "RouterConfig.group_size (g) = ", group_size,
                   " must be positive and divide num_units (r) = ", num_units);
    RANKWISE_CHECK(top_k > 0 && top_k <= num_units, "RouterConfig.top_k (k) = ", top_k,
                   " must be in [1, r = ", num_units, "]");
    RANKWISE_CHECK(top_k % group_size == 0, "RouterConfig.top_k (k) = ", top_k,
                   " must be a multiple of group_size (g) = ", group_size);
    RANKWISE_CHECK(std::isfinite(epsilon) && epsilon > 0.0f,
                   "RouterConfig.epsilon must be positive and finite, got ", epsilon);
    RANKWISE_CHECK(std::isfinite(bias_update_rate) && bias_update_rate >= 0.0f,
                   "RouterConfig.bias_update_rate must be finite and >= 0, got ", bias_update_rate);
  }
};

}  // namespace rankwise
