// The synthetic multi-task problem, built on the host from a seed.
//
// A teacher network y = W2_t · gelu(W1_t · x) per task t, where
//   W1_t = W1 + S1 + sign_t · C1_{pair(t)}        (and W2_t likewise)
//   W1          frozen base, shared by every task and by the student
//   S1          a rank-`shared_rank` change every task has (shared structure)
//   C1_p        a rank-`task_rank` change of task pair p = t / 2, with sign +
//               for the even task and - for the odd one (conflict: no single
//               weight fits both tasks of a pair)
// and inputs x ~ N(mu_t, I) with |mu_t| = mean_shift in a random direction:
// the task is identifiable from x only statistically (the distributions
// overlap). The student never sees t.
//
// Everything is drawn from rankwise's counter-based generator, so a seed
// gives the same bits on every machine and both backends train on the same
// data. The host side is plain C++ (no Eigen, no CUDA).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "rankwise/core/random.hpp"
#include "study.hpp"

namespace multitask {

/// tanh-approximated GELU and its derivative (the student uses the same formula in float).
inline double gelu(double z) {
  const double c = 0.7978845608028654;  // sqrt(2 / pi)
  return 0.5 * z * (1.0 + std::tanh(c * (z + 0.044715 * z * z * z)));
}

/// N(0, 1) number `index` of stream `stream` (Box-Muller on the counter-based uniform).
inline double normal(std::uint64_t stream, std::uint64_t index) {
  const double u1 = 1.0 - rankwise::uniform01(stream, 2 * index);  // (0, 1]
  const double u2 = rankwise::uniform01(stream, 2 * index + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

/// A rows x cols row-major matrix of N(0, std^2) entries.
inline std::vector<double> normal_matrix(std::int64_t rows, std::int64_t cols, double std_dev,
                                         std::uint64_t stream) {
  std::vector<double> m(static_cast<std::size_t>(rows * cols));
  for (std::size_t i = 0; i < m.size(); ++i) m[i] = std_dev * normal(stream, i);
  return m;
}

/// m (d x d) += scale * U V^T, U and V (d x r) row-major.
inline void add_low_rank(std::vector<double>& m, const std::vector<double>& u,
                         const std::vector<double>& v, std::int64_t d, std::int64_t r,
                         double scale) {
  for (std::int64_t i = 0; i < d; ++i) {
    for (std::int64_t j = 0; j < d; ++j) {
      double s = 0;
      for (std::int64_t q = 0; q < r; ++q) s += u[i * r + q] * v[j * r + q];
      m[i * d + j] += scale * s;
    }
  }
}

struct Teacher {
  std::int64_t d = 0, tasks = 0;
  std::vector<double> w1, w2;                  // frozen base, (d x d) each, (out x in)
  std::vector<std::vector<double>> w1_task;    // per task: W1 + S1 + sign C1
  std::vector<std::vector<double>> w2_task;
  std::vector<std::vector<double>> mean;       // per task: mu_t (d)

  /// y (d) = W2_t gelu(W1_t x).
  void forward(std::int64_t t, const double* x, double* y) const {
    std::vector<double> h(static_cast<std::size_t>(d));
    const double* a = w1_task[t].data();
    const double* b = w2_task[t].data();
    for (std::int64_t i = 0; i < d; ++i) {
      double s = 0;
      for (std::int64_t j = 0; j < d; ++j) s += a[i * d + j] * x[j];
      h[i] = gelu(s);
    }
    for (std::int64_t i = 0; i < d; ++i) {
      double s = 0;
      for (std::int64_t j = 0; j < d; ++j) s += b[i * d + j] * h[j];
      y[i] = s;
    }
  }
};

inline Teacher make_teacher(const ProblemConfig& p, std::uint64_t seed) {
  using rankwise::substream;
  Teacher t;
  t.d = p.d;
  t.tasks = p.tasks;
  const std::int64_t d = p.d;
  const double sd = 1.0 / std::sqrt(static_cast<double>(d));  // columns of unit norm on average
  t.w1 = normal_matrix(d, d, sd, substream(seed, 1));
  t.w2 = normal_matrix(d, d, sd, substream(seed, 2));
  const std::int64_t pairs = (p.tasks + 1) / 2;
  for (int layer = 0; layer < 2; ++layer) {
    const std::uint64_t base = 100 + 100 * static_cast<std::uint64_t>(layer);
    std::vector<double> shared = layer == 0 ? t.w1 : t.w2;
    add_low_rank(shared, normal_matrix(d, p.shared_rank, sd, substream(seed, base)),
                 normal_matrix(d, p.shared_rank, sd, substream(seed, base + 1)), d, p.shared_rank,
                 p.shared_scale);
    std::vector<std::vector<double>> u, v;
    for (std::int64_t q = 0; q < pairs; ++q) {
      u.push_back(normal_matrix(d, p.task_rank, sd, substream(seed, base + 10 + 2 * q)));
      v.push_back(normal_matrix(d, p.task_rank, sd, substream(seed, base + 11 + 2 * q)));
    }
    auto& out = layer == 0 ? t.w1_task : t.w2_task;
    for (std::int64_t task = 0; task < p.tasks; ++task) {
      std::vector<double> w = shared;
      const double sign = task % 2 == 0 ? 1.0 : -1.0;
      add_low_rank(w, u[task / 2], v[task / 2], d, p.task_rank, sign * p.task_scale);
      out.push_back(std::move(w));
    }
  }
  for (std::int64_t task = 0; task < p.tasks; ++task) {
    std::vector<double> m = normal_matrix(1, d, 1.0, substream(seed, 300 + task));
    double norm = 0;
    for (double e : m) norm += e * e;
    norm = std::sqrt(norm);
    for (double& e : m) e *= p.mean_shift / norm;
    t.mean.push_back(std::move(m));
  }
  return t;
}

/// Samples as float rows for the student, with their task.
struct Samples {
  std::int64_t rows = 0, d = 0;
  std::vector<float> x, y;        // (rows x d) each
  std::vector<std::int32_t> task;
};

/// `rows` samples from stream `stream`; task = `task` for every sample, or
/// uniform over the tasks when task < 0 (a mixed training stream).
inline Samples sample(const Teacher& teacher, std::int64_t rows, std::uint64_t stream,
                      std::int64_t task = -1) {
  const std::int64_t d = teacher.d;
  Samples s;
  s.rows = rows;
  s.d = d;
  s.x.resize(static_cast<std::size_t>(rows * d));
  s.y.resize(static_cast<std::size_t>(rows * d));
  s.task.resize(static_cast<std::size_t>(rows));
  const std::uint64_t task_stream = rankwise::substream(stream, 1);
  const std::uint64_t x_stream = rankwise::substream(stream, 2);
  std::vector<double> x(static_cast<std::size_t>(d)), y(static_cast<std::size_t>(d));
  for (std::int64_t n = 0; n < rows; ++n) {
    std::int64_t t = task;
    if (t < 0) {
      t = static_cast<std::int64_t>(rankwise::uniform01(task_stream, n) * teacher.tasks);
      if (t >= teacher.tasks) t = teacher.tasks - 1;
    }
    for (std::int64_t j = 0; j < d; ++j) {
      x[j] = teacher.mean[t][j] + normal(x_stream, static_cast<std::uint64_t>(n * d + j));
    }
    teacher.forward(t, x.data(), y.data());
    for (std::int64_t j = 0; j < d; ++j) {
      s.x[n * d + j] = static_cast<float>(x[j]);
      s.y[n * d + j] = static_cast<float>(y[j]);
    }
    s.task[n] = static_cast<std::int32_t>(t);
  }
  return s;
}

/// Test MSE of the best predictor that does not see the task,
/// E[y | x] = sum_t p(t | x) f_t(x) with the true posterior (equal priors,
/// x ~ N(mu_t, I)): the floor for every method of the study.
inline double bayes_mixture_loss(const Teacher& teacher, const Samples& s) {
  const std::int64_t d = teacher.d, tasks = teacher.tasks;
  std::vector<double> x(static_cast<std::size_t>(d)), y(static_cast<std::size_t>(d));
  std::vector<double> mix(static_cast<std::size_t>(d)), logp(static_cast<std::size_t>(tasks));
  double total = 0;
  for (std::int64_t n = 0; n < s.rows; ++n) {
    for (std::int64_t j = 0; j < d; ++j) x[j] = s.x[n * d + j];
    double max_logp = -1e300;
    for (std::int64_t t = 0; t < tasks; ++t) {
      double q = 0;
      for (std::int64_t j = 0; j < d; ++j)
        q += (x[j] - teacher.mean[t][j]) * (x[j] - teacher.mean[t][j]);
      logp[t] = -0.5 * q;
      max_logp = std::max(max_logp, logp[t]);
    }
    double z = 0;
    for (std::int64_t t = 0; t < tasks; ++t) z += std::exp(logp[t] - max_logp);
    std::fill(mix.begin(), mix.end(), 0.0);
    for (std::int64_t t = 0; t < tasks; ++t) {
      const double p = std::exp(logp[t] - max_logp) / z;
      teacher.forward(t, x.data(), y.data());
      for (std::int64_t j = 0; j < d; ++j) mix[j] += p * y[j];
    }
    for (std::int64_t j = 0; j < d; ++j) {
      const double e = mix[j] - s.y[n * d + j];
      total += e * e;
    }
  }
  return total / static_cast<double>(s.rows * d);
}

}  // namespace multitask
