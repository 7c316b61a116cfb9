// How good a merge is, measured from low-rank factors without forming any
// d_out x d_in matrix: ⟨B1 A1, B2 A2⟩_F = tr((B1ᵀ B2)(A2 A1ᵀ)).
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <vector>

#include "rankwise/merge/lora_factors.hpp"

namespace rankwise {
namespace merge {

/// ⟨s1 B1 A1, s2 B2 A2⟩_F from the factors.
inline double frobenius_inner(const LoraFactors& x, const LoraFactors& y) {
  return x.scale * y.scale * ((x.b.transpose() * y.b).cwiseProduct((x.a * y.a.transpose())).sum());
}

struct MergeQuality {
  /// ‖ΔW_merged − Σ_t w_t ΔW_t‖_F / ‖Σ_t w_t ΔW_t‖_F
  double relative_error = 0.0;
  /// Per source t: ⟨ΔW_merged, w_t ΔW_t⟩ / ⟨Σ_u w_u ΔW_u, w_t ΔW_t⟩ — how much of
  /// what the exact sum holds along ΔW_t the merge keeps (1: as much as the sum).
  std::vector<double> kept;
};

/// Quality of `merged` against the weighted sum of the sources.
inline MergeQuality merge_quality(const MergeInput& in, const LoraFactors& merged) {
  std::vector<LoraFactors> weighted;
  for (std::size_t t = 0; t < in.sources.size(); ++t) {
    weighted.push_back(in.sources[t]);
    weighted.back().scale *= detail::weight_of(in, t);
  }
  double target = 0.0, cross = 0.0;
  for (std::size_t t = 0; t < weighted.size(); ++t) {
    cross += frobenius_inner(merged, weighted[t]);
    for (std::size_t u = 0; u < weighted.size(); ++u)
      target += frobenius_inner(weighted[t], weighted[u]);
  }
  const double error2 = frobenius_inner(merged, merged) - 2.0 * cross + target;
  MergeQuality q;
  q.relative_error = target > 0 ? std::sqrt(std::max(error2, 0.0) / target) : 0.0;
  for (const auto& w : weighted) {
    double along = 0.0;  // ⟨Σ_u w_u ΔW_u, w_t ΔW_t⟩
    for (const auto& u : weighted) along += frobenius_inner(u, w);
    q.kept.push_back(along != 0.0 ? frobenius_inner(merged, w) / along : 0.0);
  }
  return q;
}

}  // namespace merge
}  // namespace rankwise
