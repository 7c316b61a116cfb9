// A LoRA adapter of one module as its two factors, in double on the host:
// the common currency of the merging algorithms.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "rankwise/core/error.hpp"

namespace rankwise {
namespace merge {

/// ΔW = scale · B A, A (r x d_in), B (d_out x r), PEFT's convention.
struct LoraFactors {
  Eigen::MatrixXd a;  // (r, d_in)
  Eigen::MatrixXd b;  // (d_out, r)
  double scale = 1.0;

  std::int64_t rank() const { return a.rows(); }
  std::int64_t d_in() const { return a.cols(); }
  std::int64_t d_out() const { return b.rows(); }

  /// ΔW (d_out x d_in), materialised: for tests and for TIES, which works on ΔW.
  Eigen::MatrixXd delta() const { return scale * (b * a); }
};

/// The same module of T adapters, with the weight w_t of each in the merge.
struct MergeInput {
  std::vector<LoraFactors> sources;
  std::vector<double> weights;  // empty: all 1
};

namespace detail {

inline double weight_of(const MergeInput& in, std::size_t t) {
  return in.weights.empty() ? 1.0 : in.weights[t];
}

/// Throws rankwise::error naming `module` when the sources cannot be merged:
/// none given, inconsistent factor shapes, differing d_in / d_out, a weight
/// count that does not match, or non-finite values.
inline void check_merge_input(const MergeInput& in, const std::string& module) {
  RANKWISE_CHECK(!in.sources.empty(), "merge of module '", module, "': no source adapters");
  RANKWISE_CHECK(in.weights.empty() || in.weights.size() == in.sources.size(), "merge of module '",
                 module, "': ", in.weights.size(), " weights for ", in.sources.size(), " adapters");
  const auto& first = in.sources.front();
  for (std::size_t t = 0; t < in.sources.size(); ++t) {
    const LoraFactors& f = in.sources[t];
    RANKWISE_CHECK(f.rank() > 0 && f.b.cols() == f.rank(), "merge of module '", module,
                   "', adapter ", t, ": A is (", f.a.rows(), " x ", f.a.cols(), ") and B is (",
                   f.b.rows(), " x ", f.b.cols(), "); B must have as many columns as A has rows");
    RANKWISE_CHECK(f.d_in() == first.d_in() && f.d_out() == first.d_out(), "merge of module '",
                   module, "', adapter ", t, ": shape d_out x d_in = ", f.d_out(), " x ", f.d_in(),
                   " differs from adapter 0's ", first.d_out(), " x ", first.d_in());
    RANKWISE_CHECK(std::isfinite(f.scale) && std::isfinite(weight_of(in, t)) && f.a.allFinite() &&
                       f.b.allFinite(),
                   "merge of module '", module, "', adapter ", t,
                   ": non-finite scale, weight or factor values");
  }
}

}  // namespace detail
}  // namespace merge
}  // namespace rankwise
