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
  /// One balance bias per rank (r of them) instead of one per expert, the
  /// reference code's layout for g > 1: each expert's score is repeated over
  /// its g ranks, z = s0 + b per rank, and top-k picks k ranks, so an
  /// expert's block can be split. The same as the default for g = 1.
  bool bias_per_rank = false;
  /// Lower bound on the magnitude of the normaliser Σ z before dividing; its
  /// sign is kept, so a negative Σ z (a drifted bias) never flips the gates.
  float epsilon = 1e-9f;
  /// Loss-free balancing step u: b_e += u * sign(mean(c) - c_e).
  float bias_update_rate = 1e-5f;

  std::int64_t num_experts() const { return num_units / group_size; }
  std::int64_t experts_per_token() const { return top_k / group_size; }

  /// What top-k selects, a "choice": an expert of g ranks (default), or one
  /// rank with bias_per_rank. The balance bias, the counts and the selected
  /// indices of a routing are per choice.
  std::int64_t num_choices() const { return bias_per_rank ? num_units : num_experts(); }
  std::int64_t choices_per_token() const { return bias_per_rank ? top_k : experts_per_token(); }
  std::int64_t units_per_choice() const { return bias_per_rank ? 1 : group_size; }

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
