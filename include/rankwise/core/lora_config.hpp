// Shape and scale of a LoRA adapter, validated in one place.
#pragma once

#include <cmath>
#include <cstdint>

#include "rankwise/core/error.hpp"

namespace rankwise {

/// How the adapter's output is scaled: PEFT's alpha / r, or rsLoRA's alpha / sqrt(r).
enum class ScaleRule { kAlphaOverRank, kAlphaOverSqrtRank };

/// How a frozen base weight W0 is stored.
enum class WeightLayout {
  kOutIn,  ///< (d_out x d_in), torch.nn.Linear
  kInOut,  ///< (d_in x d_out), GPT-2's Conv1D; PEFT's fan_in_fan_out = true
};

/// d_in, d_out, rank and the scale s of y += s * B A x.
struct LoraConfig {
  std::int64_t d_in = 0;
  std::int64_t d_out = 0;
  std::int64_t rank = 8;
  double alpha = 8.0;
  ScaleRule scale_rule = ScaleRule::kAlphaOverRank;

  /// Throws rankwise::error naming the first field that is out of range.
  void validate() const {
    RANKWISE_CHECK(d_in > 0, "LoraConfig.d_in must be positive, got ", d_in);
    RANKWISE_CHECK(d_out > 0, "LoraConfig.d_out must be positive, got ", d_out);
    RANKWISE_CHECK(rank > 0, "LoraConfig.rank must be positive, got ", rank);
    RANKWISE_CHECK(std::isfinite(alpha), "LoraConfig.alpha must be finite, got ", alpha);
  }

  /// The factor s applied to B A x.
  double scale() const {
    validate();
    return scale_rule == ScaleRule::kAlphaOverRank ? alpha / static_cast<double>(rank)
                                                   : alpha / std::sqrt(static_cast<double>(rank));
  }
};

}  // namespace rankwise
