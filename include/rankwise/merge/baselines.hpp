// The merges people compare LoRA-LEGO against, per module: exact sum by
// concatenation, its best rank-k approximation (thin SVD from the factors),
// TIES on ΔW, and PEFT's A/B-separate "linear" rule (inexact, for parity).
#pragma once

#include <Eigen/Core>
#include <Eigen/QR>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "rankwise/core/random.hpp"
#include "rankwise/merge/lora_factors.hpp"

namespace rankwise {
namespace merge {

/// Exact Σ_t w_t s_t B_t A_t as one LoRA of rank Σ r_t: A = [w_t s_t A_t] stacked,
/// B = [B_t] side by side, scale 1.
inline LoraFactors merge_sum(const MergeInput& in, const std::string& module = "") {
  detail::check_merge_input(in, module);
  std::int64_t total = 0;
  for (const auto& f : in.sources) total += f.rank();
  LoraFactors out;
  out.a.resize(total, in.sources.front().d_in());
  out.b.resize(in.sources.front().d_out(), total);
  std::int64_t at = 0;
  for (std::size_t t = 0; t < in.sources.size(); ++t) {
    const LoraFactors& f = in.sources[t];
    out.a.middleRows(at, f.rank()) = (detail::weight_of(in, t) * f.scale) * f.a;
    out.b.middleCols(at, f.rank()) = f.b;
    at += f.rank();
  }
  return out;
}

namespace detail {

// A merged rank k is refused above max(d_in, d_out): past min(d_in, d_out)
// (and past the sources' total rank) the result is only zero padding, and an
// unchecked k sizes two dense k x d allocations (k = 10^9 asks for gigabytes).
inline void check_merged_rank(const char* method, const MergeInput& in, std::int64_t k,
                              const std::string& module) {
  const std::int64_t d_in = in.sources.front().d_in(), d_out = in.sources.front().d_out();
  std::int64_t total = 0;
  for (const auto& f : in.sources) total += f.rank();
  const std::int64_t limit = std::max(d_in, d_out);
  RANKWISE_CHECK(k <= limit, method, " merge of module '", module, "': rank k = ", k,
                 " exceeds max(d_in, d_out) = ", limit, " (d_out x d_in = ", d_out, " x ", d_in,
                 "); the sources' total rank is ", total,
                 " and a rank above min(d_in, d_out) = ", std::min(d_in, d_out),
                 " only adds zero units");
}

// Thin QR: m = Q R with Q (rows x c) orthonormal, R (c x cols), c = min(rows, cols).
inline void thin_qr(const Eigen::MatrixXd& m, Eigen::MatrixXd& q, Eigen::MatrixXd& r) {
  const Eigen::Index c = std::min(m.rows(), m.cols());
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(m);
  q = qr.householderQ() * Eigen::MatrixXd::Identity(m.rows(), c);
  r = qr.matrixQR().topRows(c).triangularView<Eigen::Upper>();
}

// Rank-k factors (B' = U_k √Σ_k, A' = √Σ_k V_kᵀ) of u Σ vᵀ, zero-padded to k.
inline LoraFactors factors_from_svd(const Eigen::MatrixXd& u, const Eigen::VectorXd& sigma,
                                    const Eigen::MatrixXd& v, std::int64_t k) {
  LoraFactors out;
  out.a = Eigen::MatrixXd::Zero(k, v.rows());
  out.b = Eigen::MatrixXd::Zero(u.rows(), k);
  const std::int64_t keep = std::min<std::int64_t>(k, sigma.size());
  for (std::int64_t j = 0; j < keep; ++j) {
    const double root = std::sqrt(sigma(j));
    out.b.col(j) = root * u.col(j);
    out.a.row(j) = root * v.col(j).transpose();
  }
  return out;
}

}  // namespace detail

/// Best rank-k approximation (Eckart–Young) of Σ_t w_t ΔW_t, computed from the
/// factors: B_cat = Q_b R_b, A_catᵀ = Q_a R_a, SVD of the small R_b R_aᵀ, so no
/// d_out x d_in matrix is ever formed. Result zero-padded to rank k; throws
/// rankwise::error naming the sizes when k > max(d_in, d_out).
inline LoraFactors merge_svd(const MergeInput& in, std::int64_t k, const std::string& module = "") {
  RANKWISE_CHECK(k >= 1, "svd merge of module '", module, "': rank k must be >= 1, got ", k);
  detail::check_merge_input(in, module);
  detail::check_merged_rank("svd", in, k, module);
  const LoraFactors sum = merge_sum(in, module);
  const Eigen::HouseholderQR<Eigen::MatrixXd> qr_b(sum.b), qr_a(sum.a.transpose());
  const Eigen::Index cb = std::min(sum.b.rows(), sum.b.cols());
  const Eigen::Index ca = std::min(sum.a.cols(), sum.a.rows());
  const Eigen::MatrixXd rb = qr_b.matrixQR().topRows(cb).triangularView<Eigen::Upper>();
  const Eigen::MatrixXd ra = qr_a.matrixQR().topRows(ca).triangularView<Eigen::Upper>();
  Eigen::BDCSVD<Eigen::MatrixXd> svd(rb * ra.transpose(),
                                     Eigen::ComputeThinU | Eigen::ComputeThinV);
  // Only the k leading singular vectors are lifted back through the
  // Householder reflectors: O(d · R · k) instead of forming Q (O(d · R²)).
  const Eigen::Index keep = std::min<Eigen::Index>(k, svd.singularValues().size());
  Eigen::MatrixXd ub = Eigen::MatrixXd::Zero(sum.b.rows(), keep);
  Eigen::MatrixXd va = Eigen::MatrixXd::Zero(sum.a.cols(), keep);
  ub.topRows(cb) = svd.matrixU().leftCols(keep);
  va.topRows(ca) = svd.matrixV().leftCols(keep);
  ub.applyOnTheLeft(qr_b.householderQ());
  va.applyOnTheLeft(qr_a.householderQ());
  return detail::factors_from_svd(ub, svd.singularValues().head(keep), va, k);
}

/// How TIES elects the sign of each entry.
enum class MajoritySign { kTotal, kFrequency };

struct TiesOptions {
  double density = 0.2;  // fraction of each ΔW_t's entries kept, by magnitude
  MajoritySign majority = MajoritySign::kTotal;
  std::uint64_t seed = 0;  // for the randomized SVD of large results
};

namespace detail {

// Keeps the round(density · numel) largest-magnitude entries (PEFT keeps
// int(density · numel)); ties go to the lower index, so the mask is deterministic.
inline void magnitude_prune(Eigen::MatrixXd& m, double density) {
  const Eigen::Index numel = m.size();
  const auto keep = static_cast<Eigen::Index>(density * static_cast<double>(numel));
  if (keep >= numel) return;
  double* data = m.data();
  if (keep == 0) {
    std::fill(data, data + numel, 0.0);
    return;
  }
  // The keep-th largest magnitude by selection, then every larger entry and,
  // in index order, as many entries equal to it as there is room for.
  std::vector<double> magnitude(static_cast<std::size_t>(numel));
  for (Eigen::Index i = 0; i < numel; ++i) magnitude[i] = std::abs(data[i]);
  std::nth_element(magnitude.begin(), magnitude.begin() + (keep - 1), magnitude.end(),
                   std::greater<double>());
  const double threshold = magnitude[keep - 1];
  Eigen::Index above = 0;
  for (Eigen::Index i = 0; i < numel; ++i) above += std::abs(data[i]) > threshold ? 1 : 0;
  Eigen::Index room = keep - above;
  for (Eigen::Index i = 0; i < numel; ++i) {
    const double a = std::abs(data[i]);
    if (a > threshold) continue;
    if (a == threshold && room > 0) {
      --room;
      continue;
    }
    data[i] = 0.0;
  }
}

// Rank-k truncated SVD of a dense matrix: exact (BDCSVD) when small, else a
// seeded randomized range finder (k + 10 columns, 2 power iterations).
inline LoraFactors truncated_svd(const Eigen::MatrixXd& m, std::int64_t k, std::uint64_t seed) {
  if (std::min(m.rows(), m.cols()) <= 512) {
    Eigen::BDCSVD<Eigen::MatrixXd> svd(m, Eigen::ComputeThinU | Eigen::ComputeThinV);
    return factors_from_svd(svd.matrixU(), svd.singularValues(), svd.matrixV(), k);
  }
  const Eigen::Index p = std::min<Eigen::Index>(k + 10, std::min(m.rows(), m.cols()));
  Eigen::MatrixXd omega(m.cols(), p);
  for (Eigen::Index i = 0; i < omega.size(); ++i) {
    omega.data()[i] = uniform(seed, static_cast<std::uint64_t>(i), -1.0, 1.0);
  }
  Eigen::MatrixXd q, r;
  thin_qr(m * omega, q, r);
  for (int it = 0; it < 2; ++it) {
    Eigen::MatrixXd z, rz;
    thin_qr(m.transpose() * q, z, rz);
    thin_qr(m * z, q, r);
  }
  Eigen::BDCSVD<Eigen::MatrixXd> svd(q.transpose() * m, Eigen::ComputeThinU | Eigen::ComputeThinV);
  return factors_from_svd(q * svd.matrixU(), svd.singularValues(), svd.matrixV(), k);
}

}  // namespace detail

/// TIES (Yadav et al. 2023) with PEFT's semantics on ΔW_t = s_t B_t A_t: trim
/// each to `density` by magnitude, elect the sign per entry (sum of the
/// trimmed values, or count of signs), average the weighted values that agree
/// with it; then rank k by SVD. Works on d_out x d_in matrices; k as for
/// merge_svd (at most max(d_in, d_out)).
inline LoraFactors merge_ties(const MergeInput& in, std::int64_t k, const TiesOptions& options,
                              const std::string& module = "") {
  detail::check_merge_input(in, module);
  RANKWISE_CHECK(k >= 1, "ties merge of module '", module, "': rank k must be >= 1, got ", k);
  detail::check_merged_rank("ties", in, k, module);
  RANKWISE_CHECK(options.density > 0.0 && options.density <= 1.0, "ties merge of module '", module,
                 "': density must be in (0, 1], got ", options.density);
  std::vector<Eigen::MatrixXd> trimmed;
  Eigen::MatrixXd elect =
      Eigen::MatrixXd::Zero(in.sources.front().d_out(), in.sources.front().d_in());
  for (const auto& f : in.sources) {
    trimmed.push_back(f.delta());
    detail::magnitude_prune(trimmed.back(), options.density);
    if (options.majority == MajoritySign::kTotal) {
      elect += trimmed.back();
    } else {
      elect += trimmed.back().unaryExpr([](double v) { return double((v > 0) - (v < 0)); });
    }
  }
  const Eigen::MatrixXd sign = elect.unaryExpr([](double v) { return v >= 0 ? 1.0 : -1.0; });
  Eigen::MatrixXd mixed = Eigen::MatrixXd::Zero(elect.rows(), elect.cols());
  Eigen::MatrixXd agree = Eigen::MatrixXd::Zero(elect.rows(), elect.cols());
  for (std::size_t t = 0; t < trimmed.size(); ++t) {
    const Eigen::MatrixXd mask = trimmed[t].binaryExpr(
        sign, [](double v, double s) { return double((v > 0) - (v < 0)) == s ? 1.0 : 0.0; });
    mixed += detail::weight_of(in, t) * trimmed[t].cwiseProduct(mask);
    agree += mask;
  }
  mixed = mixed.cwiseQuotient(agree.cwiseMax(1.0));
  return detail::truncated_svd(mixed, k, options.seed);
}

/// PEFT's "linear" combination: A' = Σ √(w_t s_t) A_t, B' = Σ √(w_t s_t) B_t,
/// scale 1. It multiplies out to cross terms B_t A_u (t ≠ u), so it is NOT the
/// weighted sum of the adapters; provided for parity with PEFT only. Needs
/// equal ranks and non-negative w_t s_t, as PEFT does.
inline LoraFactors merge_linear(const MergeInput& in, const std::string& module = "") {
  detail::check_merge_input(in, module);
  const std::int64_t r = in.sources.front().rank();
  LoraFactors out;
  out.a = Eigen::MatrixXd::Zero(r, in.sources.front().d_in());
  out.b = Eigen::MatrixXd::Zero(in.sources.front().d_out(), r);
  for (std::size_t t = 0; t < in.sources.size(); ++t) {
    const LoraFactors& f = in.sources[t];
    RANKWISE_CHECK(f.rank() == r, "linear merge of module '", module, "': adapter ", t,
                   " has rank ", f.rank(), " but adapter 0 has rank ", r,
                   "; PEFT's linear rule needs equal ranks (use sum, svd or lego)");
    const double c = detail::weight_of(in, t) * f.scale;
    RANKWISE_CHECK(c >= 0, "linear merge of module '", module, "': adapter ", t,
                   " has weight x scale = ", c, " < 0, whose square root PEFT's rule needs");
    out.a += std::sqrt(c) * f.a;
    out.b += std::sqrt(c) * f.b;
  }
  return out;
}

}  // namespace merge
}  // namespace rankwise
