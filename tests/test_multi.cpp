// The multi-adapter unit pool on the CPU backend (float, double): the shared
// cases of cases/multi_cases.hpp, plus the page allocator, central finite
// differences in double of every adapter kind's gradients and of dx, and the
// same bits at any thread count.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cases/multi_cases.hpp"
#include "support/harness_cpu.hpp"

RWTEST_MULTI_TEST_CASES(rwtest::CpuHarness, "[cpu]", float, double)

namespace {

using rankwise::UnitPages;
using rankwise::UnitRun;
using rwtest::HostMatrix;
using rwtest::multi_cases::Fixture;
using rwtest::multi_cases::kDin;
using rwtest::multi_cases::kDout;
using H = rwtest::CpuHarness;

bool same_run(const UnitRun& a, const UnitRun& b) {
  return a.local == b.local && a.pool == b.pool && a.length == b.length;
}

}  // namespace

TEST_CASE("UnitPages: lowest free pages, runs, release", "[multi][pages]") {
  UnitPages pages(64, 8);
  CHECK(pages.pages() == 8);
  CHECK(pages.pages_for(1) == 1);
  CHECK(pages.pages_for(8) == 1);
  CHECK(pages.pages_for(9) == 2);
  const std::vector<std::int64_t> a = pages.allocate(12, "test");  // pages 0, 1
  const std::vector<std::int64_t> b = pages.allocate(8, "test");   // page 2
  const std::vector<std::int64_t> c = pages.allocate(20, "test");  // pages 3, 4, 5
  CHECK(a == std::vector<std::int64_t>{0, 1});
  CHECK(c == std::vector<std::int64_t>{3, 4, 5});
  const std::vector<UnitRun> ra = pages.runs(a, 12);
  REQUIRE(ra.size() == 1);
  CHECK(same_run(ra[0], {0, 0, 12}));
  pages.release(a);
  CHECK(pages.free_pages() == 4);
  // Rank 24 takes the freed pages 0, 1 and then 6: two runs, none moved.
  const std::vector<std::int64_t> d = pages.allocate(24, "test");
  CHECK(d == std::vector<std::int64_t>{0, 1, 6});
  const std::vector<UnitRun> rd = pages.runs(d, 24);
  REQUIRE(rd.size() == 2);
  CHECK(same_run(rd[0], {0, 0, 16}));
  CHECK(same_run(rd[1], {16, 48, 8}));
  CHECK_THROWS_WITH(pages.allocate(16, "UnitPool::add_lora"),
                    Catch::Contains("UnitPool::add_lora: capacity exhausted: rank 16 needs 2 pages "
                                    "of 8 units but 1 of 8 are free (8 of 64 units)"));
  CHECK(pages.free_pages() == 1);
  CHECK_THROWS_WITH(pages.release({2, 7}), Catch::Contains("page 7 is not allocated"));
  CHECK(pages.free_pages() == 1);  // nothing released by the refused call
  pages.release(b);
  CHECK_THROWS_WITH(UnitPages(60, 8), Catch::Contains("capacity_units = 60 is not a multiple"));
  CHECK_THROWS_WITH(pages.allocate(0, "f"), Catch::Contains("f: rank must be positive, got 0"));
}

TEST_CASE("multi: gradients match central finite differences (double)", "[multi][fd]") {
  using T = double;
  Fixture<H, T> f;
  f.add_lora(3, 6.0, false, 800);
  f.add_smora(16, 4, 1, 810, /*step_every_forward=*/false);
  f.add_smora(16, 8, 4, 820, false);
  f.add_lora(8, 16.0, true, 830);
  f.add_mos(6, 1);
  const std::int64_t n = 13;
  const std::vector<std::int32_t> ids =
      rwtest::multi_cases::random_ids(rwtest::multi_cases::ids_of(f), n, 840);
  HostMatrix x = rwtest::random_matrix(n, kDin, 841);
  const HostMatrix w = rwtest::random_matrix(n, kDout, 842);  // L = Σ w ⊙ y
  rankwise::PoolPlan<rankwise::CpuBackend> plan;
  f.plan(ids, plan);
  auto view_x = [&] { return rankwise::host_view<const T>(x.v.data(), n, kDin); };
  auto loss = [&] {
    HostMatrix y(n, kDout);
    f.pool.forward(plan, view_x(), rankwise::host_view(y.v.data(), n, kDout));
    double l = 0.0;
    for (std::size_t i = 0; i < y.v.size(); ++i) l += w.v[i] * y.v[i];
    return l;
  };
  HostMatrix y(n, kDout), dx(n, kDin);
  f.pool.forward(plan, view_x(), rankwise::host_view(y.v.data(), n, kDout),
                 rankwise::Mode::kTraining);
  f.pool.backward(plan, view_x(), rankwise::host_view<const T>(w.v.data(), n, kDout),
                  rankwise::host_view(dx.v.data(), n, kDin));
  // Smooth away from the routing's switches; the loss is linear in A, B and x
  // for a fixed routing, quadratic-free, so the step only meets the sigmoid.
  constexpr double h = 1e-5;
  auto central = [&](double& v) {
    const double keep = v;
    v = keep + h;
    const double up = loss();
    v = keep - h;
    const double down = loss();
    v = keep;
    return (up - down) / (2 * h);
  };
  int checked = 0;
  for (auto& e : f.entries) {
    for (rankwise::ParameterRef<T>& p : f.pool.parameters(e.id)) {
      INFO("adapter " << e.id << " (" << rankwise::to_string(e.kind) << "), " << p.name);
      double scale = 0.0;
      for (std::int64_t i = 0; i < p.grad.rows; ++i)
        for (std::int64_t j = 0; j < p.grad.cols; ++j)
          scale = std::max(scale, std::abs(p.grad.data[i * p.grad.ld + j]));
      for (const auto& at : {std::pair<std::int64_t, std::int64_t>{0, 0},
                             {p.value.rows - 1, p.value.cols - 1},
                             {p.value.rows / 2, p.value.cols / 3}}) {
        const double fd = central(p.value.data[at.first * p.value.ld + at.second]);
        const double g = p.grad.data[at.first * p.grad.ld + at.second];
        INFO("at (" << at.first << ", " << at.second << "): fd " << fd << ", grad " << g);
        CHECK(std::abs(fd - g) <= 1e-7 * std::max(scale, 1e-3));
        ++checked;
      }
    }
  }
  for (std::int64_t t = 0; t < n; t += 3) {
    for (std::int64_t i : {std::int64_t(0), kDin - 1}) {
      const double fd = central(x(t, i));
      INFO("dx(" << t << ", " << i << "): fd " << fd << ", grad " << dx(t, i));
      CHECK(std::abs(fd - dx(t, i)) <= 1e-7);
      ++checked;
    }
  }
  CHECK(checked >= 40);
}

TEST_CASE("multi: the same bits at any thread count", "[multi][threads]") {
  using T = float;
  const std::int64_t n = 300;  // large enough for the threaded products
  std::vector<std::vector<T>> ys;
  for (int threads : {1, 2}) {
    Fixture<H, T> f(160, threads);
    f.add_mix();
    const std::vector<std::int32_t> ids =
        rwtest::multi_cases::random_ids(rwtest::multi_cases::ids_of(f), n, 900);
    const HostMatrix x = rwtest::random_matrix(n, kDin, 901);
    std::vector<T> xf(x.v.begin(), x.v.end()), y(static_cast<std::size_t>(n * kDout), T(0));
    rankwise::PoolPlan<rankwise::CpuBackend> plan;
    f.plan(ids, plan);
    f.pool.forward(plan, rankwise::host_view<const T>(xf.data(), n, kDin),
                   rankwise::host_view(y.data(), n, kDout));
    ys.push_back(y);
  }
  CHECK(rwtest::first_bit_difference(ys[0], ys[1]) == -1);
}
