// Seeded k-means (k-means++ initialisation, restarts, empty-cluster
// re-seeding) computed in the Gram space of the points: with centroids as
// cluster means, every distance follows from inner products, so an
// iteration costs O(N²) however long the points are.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "rankwise/core/error.hpp"
#include "rankwise/core/random.hpp"

namespace rankwise {
namespace merge {

struct KMeansOptions {
  std::int64_t k = 8;
  int n_init = 10;     // restarts; the lowest inertia wins (ties: the earlier restart)
  int max_iter = 300;  // Lloyd iterations per restart
  std::uint64_t seed = 0;
};

struct KMeansResult {
  std::vector<std::int64_t> labels;  // cluster of each point, in [0, k)
  double inertia = 0.0;              // Σ squared distance to the own centroid
  int iterations = 0;                // of the winning restart
};

namespace detail {

// Squared distances of every point to every cluster mean, from the Gram matrix:
// ‖u_i − μ_j‖² = G_ii − (2/|S_j|) Σ_{m∈S_j} G_im + (1/|S_j|²) Σ_{m,m'∈S_j} G_mm'.
inline Eigen::MatrixXd gram_distances(const Eigen::MatrixXd& gram,
                                      const std::vector<std::int64_t>& labels, std::int64_t k) {
  const std::int64_t n = gram.rows();
  Eigen::MatrixXd cross = Eigen::MatrixXd::Zero(n, k);  // Σ_{m∈S_j} G_im
  Eigen::VectorXd size = Eigen::VectorXd::Zero(k);
  for (std::int64_t m = 0; m < n; ++m) {
    if (labels[m] < 0) continue;
    cross.col(labels[m]) += gram.col(m);
    size(labels[m]) += 1.0;
  }
  Eigen::VectorXd self = Eigen::VectorXd::Zero(k);  // Σ_{m,m'∈S_j} G_mm'
  for (std::int64_t m = 0; m < n; ++m) {
    if (labels[m] >= 0) self(labels[m]) += cross(m, labels[m]);
  }
  Eigen::MatrixXd dist(n, k);
  for (std::int64_t j = 0; j < k; ++j) {
    const double inv = size(j) > 0 ? 1.0 / size(j) : 0.0;
    for (std::int64_t i = 0; i < n; ++i) {
      const double d = size(j) > 0 ? gram(i, i) - 2.0 * inv * cross(i, j) + inv * inv * self(j)
                                   : std::numeric_limits<double>::infinity();
      dist(i, j) = d > 0.0 ? d : 0.0;  // rounding can dip below zero
    }
  }
  return dist;
}

inline double point_distance(const Eigen::MatrixXd& gram, std::int64_t i, std::int64_t j) {
  const double d = gram(i, i) + gram(j, j) - 2.0 * gram(i, j);
  return d > 0.0 ? d : 0.0;
}

// k-means++: the first centre uniform, each next one with probability
// proportional to the squared distance to the nearest centre chosen so far.
inline std::vector<std::int64_t> kmeans_plus_plus(const Eigen::MatrixXd& gram, std::int64_t k,
                                                  std::uint64_t seed) {
  const std::int64_t n = gram.rows();
  std::vector<std::int64_t> centres;
  std::vector<bool> taken(static_cast<std::size_t>(n), false);
  std::uint64_t draw = 0;
  auto next_uniform = [&] { return uniform01(seed, draw++); };
  std::int64_t first = static_cast<std::int64_t>(next_uniform() * static_cast<double>(n));
  first = std::min(first, n - 1);
  centres.push_back(first);
  taken[first] = true;
  std::vector<double> nearest(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) nearest[i] = point_distance(gram, i, first);
  while (static_cast<std::int64_t>(centres.size()) < k) {
    double total = 0.0;
    for (std::int64_t i = 0; i < n; ++i) total += taken[i] ? 0.0 : nearest[i];
    std::int64_t pick = -1;
    if (total > 0.0) {
      double target = next_uniform() * total, run = 0.0;
      for (std::int64_t i = 0; i < n; ++i) {
        if (taken[i] || nearest[i] <= 0.0) continue;
        run += nearest[i];
        pick = i;
        if (run > target) break;
      }
    }
    if (pick < 0) {  // every remaining point coincides with a centre
      for (std::int64_t i = 0; i < n && pick < 0; ++i) {
        if (!taken[i]) pick = i;
      }
    }
    centres.push_back(pick);
    taken[pick] = true;
    for (std::int64_t i = 0; i < n; ++i) {
      nearest[i] = std::min(nearest[i], point_distance(gram, i, pick));
    }
  }
  return centres;
}

}  // namespace detail

/// Clusters the N points whose Gram matrix (N x N, G_ij = u_i · u_j) is given
/// into k clusters under squared L2 distance. Deterministic for a seed.
/// Throws rankwise::error when k is not in [1, N] or the options are invalid.
inline KMeansResult kmeans_gram(const Eigen::MatrixXd& gram, const KMeansOptions& options) {
  const std::int64_t n = gram.rows(), k = options.k;
  RANKWISE_CHECK(gram.rows() == gram.cols(), "kmeans: Gram matrix must be square, got (",
                 gram.rows(), " x ", gram.cols(), ")");
  RANKWISE_CHECK(k >= 1 && k <= n, "kmeans: k = ", k, " must be in [1, N = ", n, "]");
  RANKWISE_CHECK(options.n_init >= 1 && options.max_iter >= 1,
                 "kmeans: n_init and max_iter must be at least 1, got ", options.n_init, " and ",
                 options.max_iter);
  KMeansResult best;
  best.inertia = std::numeric_limits<double>::infinity();
  for (int restart = 0; restart < options.n_init; ++restart) {
    const std::uint64_t seed = substream(options.seed, static_cast<std::uint64_t>(restart));
    std::vector<std::int64_t> labels(static_cast<std::size_t>(n), -1);
    const std::vector<std::int64_t> centres = detail::kmeans_plus_plus(gram, k, seed);
    for (std::int64_t j = 0; j < k; ++j) labels[centres[j]] = j;
    int iteration = 0;
    Eigen::MatrixXd dist;
    for (; iteration < options.max_iter; ++iteration) {
      dist = detail::gram_distances(gram, labels, k);
      std::vector<std::int64_t> next(static_cast<std::size_t>(n));
      std::vector<std::int64_t> size(static_cast<std::size_t>(k), 0);
      for (std::int64_t i = 0; i < n; ++i) {
        std::int64_t arg = 0;
        for (std::int64_t j = 1; j < k; ++j) {
          if (dist(i, j) < dist(i, arg)) arg = j;  // ties go to the lower cluster
        }
        next[i] = arg;
        ++size[arg];
      }
      // An empty cluster takes the point farthest from its own centroid among
      // clusters that can spare one.
      for (std::int64_t j = 0; j < k; ++j) {
        if (size[j] > 0) continue;
        std::int64_t far = -1;
        for (std::int64_t i = 0; i < n; ++i) {
          if (size[next[i]] > 1 && (far < 0 || dist(i, next[i]) > dist(far, next[far]))) far = i;
        }
        --size[next[far]];
        next[far] = j;
        size[j] = 1;
        dist(far, j) = 0.0;
      }
      const bool converged = next == labels;
      labels = std::move(next);
      if (converged) break;
    }
    dist = detail::gram_distances(gram, labels, k);
    double inertia = 0.0;
    for (std::int64_t i = 0; i < n; ++i) inertia += dist(i, labels[i]);
    if (inertia < best.inertia) {
      best.labels = labels;
      best.inertia = inertia;
      best.iterations = iteration + 1;
    }
  }
  return best;
}

}  // namespace merge
}  // namespace rankwise
