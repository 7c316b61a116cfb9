// LoRA-LEGO: merge LoRAs by clustering their rank-one units (Zhao et al.,
// arXiv 2409.16167), per module.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "rankwise/core/tensor_map.hpp"
#include "rankwise/merge/gram.hpp"
#include "rankwise/merge/kmeans.hpp"
#include "rankwise/merge/lora_factors.hpp"

namespace rankwise {
namespace merge {

/// Which norm the parameter reweighting compares.
enum class UnitNorm { kLInf, kL2 };

struct LegoOptions {
  std::int64_t rank = 8;   // k, the merged rank (number of clusters)
  KMeansOptions kmeans{};  // k is taken from `rank`
  /// μ_j ← μ_j · mean_{u∈C_j} ‖u‖ / ‖μ_j‖: undo the norm decay of averaging.
  bool parameter_reweighting = true;
  UnitNorm norm = UnitNorm::kLInf;
  /// ΔW' ← √(r / k) · ΔW', r the mean source rank.
  bool output_reweighting = true;
  /// Cluster unit-norm copies of the units (centroids still average the originals).
  bool normalize_units = false;
  /// Before clustering, flip each unit so its a has a positive largest-magnitude
  /// entry and rescale so ‖a‖ = ‖b‖; b aᵀ is unchanged.
  bool canonicalize_units = false;
  /// Computes the Gram matrix the clustering runs on: gram (n x n) = U Uᵀ for
  /// the units U (n x d), both row-major in double. Empty: Eigen on the CPU;
  /// rankwise/merge/cuda_gram.cuh provides one on the GPU (cuBLAS).
  GramFunction gram{};
};

/// The merged module: rank-one units (a_j, b_j) = centroid halves, each with
/// a gate g_j from the reweightings, ΔW' = Σ_j g_j b_j a_jᵀ (scale 1).
struct LegoResult {
  LoraFactors units;                 // a (k x d_in), b (d_out x k), scale 1
  std::vector<double> gates;         // (k)
  std::vector<std::int64_t> labels;  // cluster of each source unit, in source order
  double inertia = 0.0;

  /// "lora_A" (k x d_in), "lora_B" (d_out x k), "gates" (k): the state of a
  /// rankwise::Lego layer.
  TensorMap to_tensors() const {
    TensorMap out;
    const auto k = units.a.rows(), d_in = units.a.cols(), d_out = units.b.rows();
    HostTensor a{{k, d_in}, std::vector<double>(static_cast<std::size_t>(k * d_in))};
    HostTensor b{{d_out, k}, std::vector<double>(static_cast<std::size_t>(d_out * k))};
    for (Eigen::Index j = 0; j < k; ++j) {
      for (Eigen::Index c = 0; c < d_in; ++c) a.values[j * d_in + c] = units.a(j, c);
      for (Eigen::Index o = 0; o < d_out; ++o) b.values[o * k + j] = units.b(o, j);
    }
    out["lora_A"] = std::move(a);
    out["lora_B"] = std::move(b);
    out["gates"] = HostTensor{{k}, gates};
    return out;
  }

  /// The same merge as a plain LoRA: √g_j folded into a_j and b_j, scale 1.
  LoraFactors folded() const {
    LoraFactors out = units;
    for (std::size_t j = 0; j < gates.size(); ++j) {
      const double root = std::sqrt(gates[j]);
      out.a.row(static_cast<Eigen::Index>(j)) *= root;
      out.b.col(static_cast<Eigen::Index>(j)) *= root;
    }
    return out;
  }
};

/// Minimal semantic units u_{t,i} = [√|c_t| a_{t,i} ; sign(c_t) √|c_t| b_{t,i}],
/// c_t = w_t s_t, one row each (N x (d_in + d_out)), adapters in order: so
/// b aᵀ summed over the units is Σ_t w_t ΔW_t.
inline Eigen::MatrixXd lego_units(const MergeInput& in) {
  std::int64_t total = 0;
  for (const auto& f : in.sources) total += f.rank();
  const std::int64_t d_in = in.sources.front().d_in(), d_out = in.sources.front().d_out();
  Eigen::MatrixXd units(total, d_in + d_out);
  std::int64_t row = 0;
  for (std::size_t t = 0; t < in.sources.size(); ++t) {
    const LoraFactors& f = in.sources[t];
    const double c = detail::weight_of(in, t) * f.scale;
    const double root = std::sqrt(std::abs(c));
    const double sign = c < 0 ? -1.0 : 1.0;
    units.block(row, 0, f.rank(), d_in) = root * f.a;
    units.block(row, d_in, f.rank(), d_out) = (sign * root) * f.b.transpose();
    row += f.rank();
  }
  return units;
}

namespace detail {

inline double unit_norm(const Eigen::Ref<const Eigen::RowVectorXd>& u, UnitNorm norm) {
  return norm == UnitNorm::kLInf ? u.cwiseAbs().maxCoeff() : u.norm();
}

// U Uᵀ, by the caller's function when one is given (e.g. on the GPU).
inline Eigen::MatrixXd gram_of(const Eigen::MatrixXd& units, const GramFunction& gram) {
  if (!gram) return units * units.transpose();
  const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> rows = units;
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> out(units.rows(),
                                                                              units.rows());
  gram(rows.data(), rows.rows(), rows.cols(), out.data());
  return out;
}

inline std::vector<Eigen::Index> lexicographic_order(const Eigen::MatrixXd& rows) {
  std::vector<Eigen::Index> order(static_cast<std::size_t>(rows.rows()));
  std::iota(order.begin(), order.end(), Eigen::Index(0));
  std::stable_sort(order.begin(), order.end(), [&](Eigen::Index x, Eigen::Index y) {
    for (Eigen::Index c = 0; c < rows.cols(); ++c) {
      if (rows(x, c) != rows(y, c)) return rows(x, c) < rows(y, c);
    }
    return false;
  });
  return order;
}

inline void canonicalize(Eigen::MatrixXd& units, std::int64_t d_in) {
  const std::int64_t d_out = units.cols() - d_in;
  for (Eigen::Index i = 0; i < units.rows(); ++i) {
    auto a = units.row(i).head(d_in);
    auto b = units.row(i).tail(d_out);
    Eigen::Index arg = 0;
    a.cwiseAbs().maxCoeff(&arg);
    if (a(arg) < 0) units.row(i) *= -1.0;
    const double na = a.norm(), nb = b.norm();
    if (na > 0 && nb > 0) {
      const double c = std::sqrt(nb / na);
      a *= c;
      b /= c;
    }
  }
}

}  // namespace detail

/// LoRA-LEGO merge of one module: units → seeded k-means (in Gram space) →
/// centroids → reweightings. Throws rankwise::error (naming `module`) when
/// the sources are inconsistent or k exceeds the number of units.
inline LegoResult lego_merge(const MergeInput& in, const LegoOptions& options,
                             const std::string& module = "") {
  detail::check_merge_input(in, module);
  const std::int64_t d_in = in.sources.front().d_in(), d_out = in.sources.front().d_out();
  Eigen::MatrixXd units = lego_units(in);
  const std::int64_t n = units.rows(), k = options.rank;
  RANKWISE_CHECK(k >= 1 && k <= n, "lego merge of module '", module, "': rank k = ", k,
                 " must be in [1, N = ", n, " source units]");
  if (options.canonicalize_units) detail::canonicalize(units, d_in);
  // Clustering runs on the units in lexicographic order, so the merge does not
  // depend on the order of the adapters or of the ranks inside them.
  const std::vector<Eigen::Index> order = detail::lexicographic_order(units);
  units = Eigen::MatrixXd(units(order, Eigen::all));
  Eigen::MatrixXd gram;
  if (options.normalize_units) {
    Eigen::MatrixXd normalized = units;
    for (Eigen::Index i = 0; i < n; ++i) {
      const double norm = normalized.row(i).norm();
      if (norm > 0) normalized.row(i) /= norm;
    }
    gram = detail::gram_of(normalized, options.gram);
  } else {
    gram = detail::gram_of(units, options.gram);
  }
  KMeansOptions km = options.kmeans;
  km.k = k;
  KMeansResult clusters = kmeans_gram(gram, km);

  Eigen::MatrixXd centroids = Eigen::MatrixXd::Zero(k, d_in + d_out);
  Eigen::VectorXd count = Eigen::VectorXd::Zero(k), mean_norm = Eigen::VectorXd::Zero(k);
  for (Eigen::Index i = 0; i < n; ++i) {
    const std::int64_t j = clusters.labels[i];
    centroids.row(j) += units.row(i);
    count(j) += 1.0;
    mean_norm(j) += detail::unit_norm(units.row(i), options.norm);
  }
  std::int64_t total_rank = 0;
  for (const auto& f : in.sources) total_rank += f.rank();
  const double mean_rank = static_cast<double>(total_rank) / static_cast<double>(in.sources.size());
  const double output_gate =
      options.output_reweighting ? std::sqrt(mean_rank / static_cast<double>(k)) : 1.0;

  LegoResult result;
  result.units.a.resize(k, d_in);
  result.units.b.resize(d_out, k);
  result.units.scale = 1.0;
  result.gates.assign(static_cast<std::size_t>(k), output_gate);
  for (Eigen::Index j = 0; j < k; ++j) {
    centroids.row(j) /= count(j);
    if (options.parameter_reweighting) {
      // Scaling μ_j by f scales its a and b, so its ΔW by f²: kept in the gate.
      const double norm = detail::unit_norm(centroids.row(j), options.norm);
      const double f = norm > 0 ? (mean_norm(j) / count(j)) / norm : 1.0;
      result.gates[j] *= f * f;
    }
    result.units.a.row(j) = centroids.row(j).head(d_in);
    result.units.b.col(j) = centroids.row(j).tail(d_out).transpose();
  }
  result.labels.assign(static_cast<std::size_t>(n), 0);
  for (Eigen::Index i = 0; i < n; ++i) result.labels[order[i]] = clusters.labels[i];
  result.inertia = clusters.inertia;
  return result;
}

}  // namespace merge
}  // namespace rankwise
