// LoRA-LEGO and the baseline merges: the properties of the method, checked
// against dense double-precision ΔW computed in plain loops.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <rankwise/merge/baselines.hpp>
#include <rankwise/merge/kmeans.hpp>
#include <rankwise/merge/lego.hpp>
#include <rankwise/merge/merge_modules.hpp>
#include <rankwise/merge/quality.hpp>
#include <rankwise/rankwise.hpp>
#include <vector>

using rankwise::merge::LoraFactors;
using rankwise::merge::MergeInput;
namespace merge = rankwise::merge;

namespace {

// Plain-loop ΔW = scale · B A in double: the reference every merge is held to.
std::vector<double> dense_delta(const LoraFactors& f) {
  const auto d_out = f.d_out(), d_in = f.d_in(), r = f.rank();
  std::vector<double> out(static_cast<std::size_t>(d_out * d_in), 0.0);
  for (Eigen::Index o = 0; o < d_out; ++o) {
    for (Eigen::Index i = 0; i < d_in; ++i) {
      double acc = 0.0;
      for (Eigen::Index j = 0; j < r; ++j) acc += f.b(o, j) * f.a(j, i);
      out[o * d_in + i] = f.scale * acc;
    }
  }
  return out;
}

std::vector<double> weighted_sum(const MergeInput& in) {
  std::vector<double> sum = dense_delta(in.sources[0]);
  std::fill(sum.begin(), sum.end(), 0.0);
  for (std::size_t t = 0; t < in.sources.size(); ++t) {
    const double w = in.weights.empty() ? 1.0 : in.weights[t];
    const auto d = dense_delta(in.sources[t]);
    for (std::size_t e = 0; e < sum.size(); ++e) sum[e] += w * d[e];
  }
  return sum;
}

double max_abs_diff(const std::vector<double>& x, const std::vector<double>& y) {
  REQUIRE(x.size() == y.size());
  double m = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) m = std::max(m, std::abs(x[i] - y[i]));
  return m;
}

double frobenius(const std::vector<double>& x) {
  double s = 0.0;
  for (double v : x) s += v * v;
  return std::sqrt(s);
}

MergeInput random_input(std::uint64_t seed, std::vector<std::int64_t> ranks, Eigen::Index d_in,
                        Eigen::Index d_out) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  MergeInput in;
  for (std::size_t t = 0; t < ranks.size(); ++t) {
    LoraFactors f;
    f.a = Eigen::MatrixXd::NullaryExpr(ranks[t], d_in, [&] { return u(gen); });
    f.b = Eigen::MatrixXd::NullaryExpr(d_out, ranks[t], [&] { return u(gen); });
    f.scale = 0.5 + static_cast<double>(t);
    in.sources.push_back(f);
    in.weights.push_back(1.0 - 0.25 * static_cast<double>(t));
  }
  return in;
}

}  // namespace

// Tolerance: merges in double over O(10) terms; 1e-12 relative to max |ΔW| ~ 10.
constexpr double kExact = 1e-11;

TEST_CASE("sum merge is the exact weighted sum (concatenation = summation)", "[merge]") {
  const MergeInput in = random_input(1, {3, 5, 2}, 11, 7);
  const LoraFactors sum = merge::merge_sum(in, "m");
  CHECK(sum.rank() == 10);
  CHECK(max_abs_diff(dense_delta(sum), weighted_sum(in)) < kExact);
}

TEST_CASE("lego with k = N and no reweighting is exactly the sum", "[merge][lego]") {
  const MergeInput in = random_input(2, {4, 3, 5}, 13, 9);
  merge::LegoOptions o;
  o.rank = 12;
  o.parameter_reweighting = false;
  o.output_reweighting = false;
  const merge::LegoResult r = merge::lego_merge(in, o, "m");
  CHECK(r.inertia == Approx(0.0).margin(1e-9));
  for (double g : r.gates) CHECK(g == 1.0);
  CHECK(max_abs_diff(dense_delta(r.folded()), weighted_sum(in)) < kExact);
}

TEST_CASE("lego is invariant to the order of adapters and of their ranks", "[merge][lego]") {
  const MergeInput in = random_input(3, {4, 4, 4}, 10, 6);
  MergeInput shuffled;
  for (int t : {2, 0, 1}) {
    LoraFactors f = in.sources[t];
    // Reverse the ranks inside the adapter: the same ΔW_t, other unit order.
    f.a = Eigen::MatrixXd(f.a.colwise().reverse());
    f.b = Eigen::MatrixXd(f.b.rowwise().reverse());
    shuffled.sources.push_back(f);
    shuffled.weights.push_back(in.weights[t]);
  }
  merge::LegoOptions o;
  o.rank = 5;
  o.kmeans.seed = 17;
  const auto a = merge::lego_merge(in, o, "m");
  const auto b = merge::lego_merge(shuffled, o, "m");
  CHECK(a.inertia == b.inertia);
  CHECK(max_abs_diff(dense_delta(a.folded()), dense_delta(b.folded())) == 0.0);
}

TEST_CASE("lego is deterministic for a seed", "[merge][lego]") {
  const MergeInput in = random_input(4, {6, 6}, 9, 8);
  merge::LegoOptions o;
  o.rank = 4;
  o.kmeans.seed = 5;
  const auto a = merge::lego_merge(in, o, "m");
  const auto b = merge::lego_merge(in, o, "m");
  CHECK(a.labels == b.labels);
  CHECK(max_abs_diff(dense_delta(a.folded()), dense_delta(b.folded())) == 0.0);
}

TEST_CASE("lego reweightings follow the method's formulas", "[merge][lego]") {
  const MergeInput in = random_input(6, {4, 4}, 8, 5);
  merge::LegoOptions o;
  o.rank = 3;
  o.kmeans.seed = 2;
  o.parameter_reweighting = false;
  const auto plain = merge::lego_merge(in, o, "m");
  for (double g : plain.gates) CHECK(g == Approx(std::sqrt(4.0 / 3.0)).epsilon(1e-15));
  for (auto norm : {merge::UnitNorm::kLInf, merge::UnitNorm::kL2}) {
    o.parameter_reweighting = true;
    o.output_reweighting = false;
    o.norm = norm;
    const auto r = merge::lego_merge(in, o, "m");
    const Eigen::MatrixXd units = merge::lego_units(in);
    for (Eigen::Index j = 0; j < 3; ++j) {
      double mean_norm = 0.0, count = 0.0;
      for (Eigen::Index i = 0; i < units.rows(); ++i) {
        if (r.labels[i] != j) continue;
        mean_norm += norm == merge::UnitNorm::kL2 ? units.row(i).norm()
                                                  : units.row(i).cwiseAbs().maxCoeff();
        count += 1;
      }
      Eigen::RowVectorXd mu(13);
      mu << r.units.a.row(j), r.units.b.col(j).transpose();
      const double mu_norm = norm == merge::UnitNorm::kL2 ? mu.norm() : mu.cwiseAbs().maxCoeff();
      const double f = (mean_norm / count) / mu_norm;
      CHECK(r.gates[j] == Approx(f * f).epsilon(1e-12));
      CHECK(r.gates[j] >= 1.0 - 1e-12);  // averaging never grows the norm
    }
  }
}

TEST_CASE("k-means finds well-separated clusters and re-seeds empty ones", "[merge][kmeans]") {
  std::mt19937_64 gen(9);
  std::normal_distribution<double> noise(0.0, 0.01);
  Eigen::MatrixXd points(30, 4);
  for (Eigen::Index i = 0; i < 30; ++i) {
    const double c = static_cast<double>(i % 3) * 10.0;
    for (Eigen::Index d = 0; d < 4; ++d) points(i, d) = c + noise(gen);
  }
  merge::KMeansOptions o;
  o.k = 3;
  o.seed = 1;
  const auto r = merge::kmeans_gram(points * points.transpose(), o);
  for (Eigen::Index i = 3; i < 30; ++i) CHECK(r.labels[i] == r.labels[i % 3]);
  CHECK(r.labels[0] != r.labels[1]);
  CHECK(r.labels[1] != r.labels[2]);
  CHECK(r.labels[0] != r.labels[2]);
  CHECK(r.inertia < 30 * 4 * 1e-3);

  // Four identical points and k = 3: clusters of duplicates empty out and are
  // re-seeded, so every cluster ends with a member.
  Eigen::MatrixXd same = Eigen::MatrixXd::Ones(4, 3);
  o.k = 3;
  const auto s = merge::kmeans_gram(same * same.transpose(), o);
  std::vector<int> count(3, 0);
  for (auto label : s.labels) ++count[label];
  for (int c : count) CHECK(c >= 1);
}

TEST_CASE("svd merge reaches the optimal rank-k error (Eckart-Young)", "[merge][svd]") {
  const MergeInput in = random_input(7, {3, 4, 2}, 12, 10);
  const std::vector<double> target = weighted_sum(in);
  Eigen::MatrixXd t(10, 12);
  for (int o = 0; o < 10; ++o) {
    for (int i = 0; i < 12; ++i) t(o, i) = target[o * 12 + i];
  }
  const Eigen::VectorXd sigma = Eigen::JacobiSVD<Eigen::MatrixXd>(t).singularValues();
  for (std::int64_t k : {1, 3, 5, 9, 12}) {
    const LoraFactors m = merge::merge_svd(in, k, "m");
    CHECK(m.rank() == k);
    const double err = frobenius([&] {
      auto d = dense_delta(m);
      for (std::size_t e = 0; e < d.size(); ++e) d[e] -= target[e];
      return d;
    }());
    const double optimal = std::sqrt(sigma.tail(std::max<Eigen::Index>(sigma.size() - k, 0)).squaredNorm());
    CAPTURE(k);
    CHECK(err == Approx(optimal).margin(1e-10));
  }
}

TEST_CASE("ties follows PEFT's trim, elect and disjoint-merge rule", "[merge][ties]") {
  // Two rank-1 adapters whose ΔW are 2 x 2, worked by hand.
  MergeInput in;
  LoraFactors f1, f2;
  f1.a = (Eigen::MatrixXd(1, 2) << 1.0, -2.0).finished();
  f1.b = (Eigen::MatrixXd(2, 1) << 1.0, 1.5).finished();   // ΔW1 = [1 -2; 1.5 -3]
  f2.a = (Eigen::MatrixXd(1, 2) << -3.0, 1.0).finished();
  f2.b = (Eigen::MatrixXd(2, 1) << 1.0, -0.1).finished();  // ΔW2 = [-3 1; 0.3 -0.1]
  in.sources = {f1, f2};
  in.weights = {1.0, 0.5};
  merge::TiesOptions o;
  o.density = 0.5;  // keep 2 of 4 entries: ΔW1 -> [0 -2; 0 -3], ΔW2 -> [-3 1; 0 0]
  // elected sign (total): [-3 -1; 0 -3] -> [- -; + -]
  // (0,0): only ΔW2 (-3, agrees) -> 0.5 * -3 / 1 = -1.5
  // (0,1): ΔW1 -2 agrees, ΔW2 +1 does not -> -2 / 1 = -2
  // (1,0): nothing kept -> 0;  (1,1): ΔW1 -3 -> -3
  const LoraFactors m = merge::merge_ties(in, 2, o, "m");
  const auto d = dense_delta(m);
  CHECK(d[0] == Approx(-1.5).margin(1e-12));
  CHECK(d[1] == Approx(-2.0).margin(1e-12));
  CHECK(d[2] == Approx(0.0).margin(1e-12));
  CHECK(d[3] == Approx(-3.0).margin(1e-12));
  // Equal magnitudes: the lower index is kept (deterministic trimming).
  MergeInput tie;
  LoraFactors f;
  f.a = (Eigen::MatrixXd(1, 2) << 1.0, 1.0).finished();
  f.b = (Eigen::MatrixXd(2, 1) << 1.0, 1.0).finished();  // ΔW = all ones
  tie.sources = {f};
  o.density = 0.25;
  const auto t = dense_delta(merge::merge_ties(tie, 1, o, "m"));
  CHECK(t[0] == Approx(1.0).margin(1e-12));
  CHECK(t[1] == Approx(0.0).margin(1e-12));
  CHECK(t[3] == Approx(0.0).margin(1e-12));
}

TEST_CASE("linear merge is PEFT's A/B-separate rule, with its cross terms", "[merge][linear]") {
  const MergeInput in = random_input(8, {3, 3}, 6, 5);
  const LoraFactors m = merge::merge_linear(in, "m");
  const double c0 = std::sqrt(in.weights[0] * in.sources[0].scale);
  const double c1 = std::sqrt(in.weights[1] * in.sources[1].scale);
  const Eigen::MatrixXd a = c0 * in.sources[0].a + c1 * in.sources[1].a;
  const Eigen::MatrixXd b = c0 * in.sources[0].b + c1 * in.sources[1].b;
  CHECK((m.a - a).cwiseAbs().maxCoeff() < kExact);
  CHECK((m.b - b).cwiseAbs().maxCoeff() < kExact);
  // The cross terms make it differ from the true weighted sum.
  CHECK(max_abs_diff(dense_delta(m), weighted_sum(in)) > 1e-3);
  MergeInput uneven = random_input(8, {3, 2}, 6, 5);
  REQUIRE_THROWS_WITH(merge::merge_linear(uneven, "layers.0.q"),
                      Catch::Contains("layers.0.q") && Catch::Contains("equal ranks"));
}

TEST_CASE("merge quality from factors equals the dense computation", "[merge][quality]") {
  const MergeInput in = random_input(10, {4, 2, 3}, 9, 11);
  const LoraFactors m = merge::merge_svd(in, 3, "m");
  const merge::MergeQuality q = merge::merge_quality(in, m);
  const auto target = weighted_sum(in);
  auto diff = dense_delta(m);
  for (std::size_t e = 0; e < diff.size(); ++e) diff[e] -= target[e];
  CHECK(q.relative_error == Approx(frobenius(diff) / frobenius(target)).epsilon(1e-9));
  REQUIRE(q.kept.size() == 3);
  const auto merged = dense_delta(m);
  for (std::size_t t = 0; t < 3; ++t) {
    auto own = dense_delta(in.sources[t]);
    for (double& v : own) v *= in.weights[t];
    double inner = 0.0, along = 0.0;
    for (std::size_t e = 0; e < own.size(); ++e) {
      inner += merged[e] * own[e];
      along += target[e] * own[e];
    }
    CHECK(q.kept[t] == Approx(inner / along).epsilon(1e-9));
  }
  // The exact sum keeps everything.
  for (double kept : merge::merge_quality(in, merge::merge_sum(in, "m")).kept) {
    CHECK(kept == Approx(1.0).epsilon(1e-9));
  }
}

TEST_CASE("lego on one adapter with k < r prunes it", "[merge][lego]") {
  const MergeInput in = random_input(11, {8}, 10, 10);
  merge::LegoOptions o;
  o.rank = 4;
  const auto r = merge::lego_merge(in, o, "m");
  CHECK(r.units.rank() == 4);
  const merge::MergeQuality q = merge::merge_quality(in, r.folded());
  CHECK(q.relative_error > 0.0);
  CHECK(std::isfinite(q.relative_error));
}

TEST_CASE("merge_modules gives the same result on 1 and 2 threads", "[merge]") {
  std::vector<std::string> names;
  std::vector<MergeInput> inputs;
  for (int m = 0; m < 5; ++m) {
    names.push_back("module" + std::to_string(m));
    inputs.push_back(random_input(20 + m, {4, 4, 4}, 16, 12));
  }
  merge::MergeOptions o;
  o.rank = 4;
  std::size_t calls = 0;
  o.progress = [&](std::size_t done, std::size_t total) {
    ++calls;
    CHECK(done <= total);
  };
  for (auto method : {merge::MergeMethod::kLego, merge::MergeMethod::kSvd}) {
    o.method = method;
    o.threads = 1;
    const auto one = merge::merge_modules(names, inputs, o);
    o.threads = 2;
    const auto two = merge::merge_modules(names, inputs, o);
    for (std::size_t m = 0; m < names.size(); ++m) {
      CHECK(one[m].name == names[m]);
      CHECK(max_abs_diff(dense_delta(one[m].merged), dense_delta(two[m].merged)) == 0.0);
    }
  }
  CHECK(calls == 4 * names.size());
}

TEST_CASE("merges reject inconsistent inputs, naming the module", "[merge][errors]") {
  MergeInput in = random_input(30, {3, 3}, 8, 6);
  in.sources[1].a = Eigen::MatrixXd::Ones(3, 9);
  REQUIRE_THROWS_WITH(merge::merge_sum(in, "h.3.attn.c_attn"),
                      Catch::Contains("h.3.attn.c_attn") && Catch::Contains("differs"));
  MergeInput small = random_input(31, {2, 2}, 8, 6);
  merge::LegoOptions o;
  o.rank = 5;
  REQUIRE_THROWS_WITH(merge::lego_merge(small, o, "q"), Catch::Contains("N = 4"));
  small.weights = {1.0};
  REQUIRE_THROWS_WITH(merge::merge_svd(small, 2, "q"), Catch::Contains("1 weights for 2 adapters"));
  REQUIRE_THROWS_WITH(merge::parse_merge_method("average"), Catch::Contains("average"));
}

TEST_CASE("the Lego layer applies the merged units with their gates", "[merge][lego][layer]") {
  const MergeInput in = random_input(40, {4, 4, 4}, 12, 10);
  merge::LegoOptions o;
  o.rank = 5;
  const auto r = merge::lego_merge(in, o, "m");
  const auto folded = dense_delta(r.folded());
  rankwise::CpuContext ctx;
  rankwise::Lego<double, rankwise::CpuBackend> layer(ctx, 12, 10, 5);
  layer.load_state(r.to_tensors());
  for (int n : {1, 7, 100}) {
    std::vector<double> x(static_cast<std::size_t>(n * 12)), y(static_cast<std::size_t>(n * 10), 0.5);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.3 * static_cast<double>(i));
    for (auto path : {rankwise::RankUnitPath::kSparse, rankwise::RankUnitPath::kDense}) {
      std::fill(y.begin(), y.end(), 0.5);
      layer.set_path(path);
      layer.forward(rankwise::host_view<const double>(x.data(), n, 12),
                    rankwise::host_view(y.data(), n, 10));
      for (int t = 0; t < n; ++t) {
        for (int oi = 0; oi < 10; ++oi) {
          double ref = 0.5;
          for (int i = 0; i < 12; ++i) ref += folded[oi * 12 + i] * x[t * 12 + i];
          CAPTURE(n, t, oi);
          CHECK(y[t * 10 + oi] == Approx(ref).margin(1e-12));
        }
      }
    }
  }
}

TEST_CASE("lego's Gram hook: a caller's function replaces Eigen's product", "[merge][lego]") {
  const MergeInput in = random_input(50, {4, 4, 4}, 12, 10);
  merge::LegoOptions o;
  o.rank = 5;
  const auto plain = merge::lego_merge(in, o, "m");
  int calls = 0;
  o.gram = [&calls](const double* units, std::int64_t n, std::int64_t d, double* gram) {
    ++calls;  // plain loops in double, as a GPU's DSYRK would return them
    for (std::int64_t i = 0; i < n; ++i) {
      for (std::int64_t j = 0; j < n; ++j) {
        double acc = 0.0;
        for (std::int64_t c = 0; c < d; ++c) acc += units[i * d + c] * units[j * d + c];
        gram[i * n + j] = acc;
      }
    }
  };
  const auto hooked = merge::lego_merge(in, o, "m");
  CHECK(calls == 1);
  CHECK(hooked.labels == plain.labels);
  CHECK(max_abs_diff(dense_delta(hooked.folded()), dense_delta(plain.folded())) < kExact);
}
