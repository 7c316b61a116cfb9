// LoRA on the CPU backend (float, double): the shared cases of
// cases/lora_cases.hpp, plus finite-difference gradients in double.
#include <catch2/catch.hpp>

#include "cases/lora_cases.hpp"
#include "support/finite_difference.hpp"
#include "support/harness_cpu.hpp"

RWTEST_LORA_TEST_CASES(rwtest::CpuHarness, "[cpu]", float, double)

namespace {

using rwtest::HostMatrix;
using H = rwtest::CpuHarness;
using T = double;

/// L(A, B, X) = Σ w ⊙ (y0 + s B A x), evaluated by the layer's own forward.
double loss(H::Ctx& ctx, rankwise::Lora<T, H::Backend>& layer, const HostMatrix& a,
            const HostMatrix& b, const HostMatrix& x, const HostMatrix& y0, const HostMatrix& w) {
  rwtest::lora_cases::load<H, T>(ctx, layer, a, b);
  const auto dx = rwtest::to_device<H, T>(ctx, x);
  auto dy = rwtest::to_device<H, T>(ctx, y0);
  layer.forward(dx.cview(), dy.view());
  return rwtest::ref_weighted_sum(w, rwtest::to_host<H, T>(ctx, dy));
}

}  // namespace

TEST_CASE("lora: gradients match central finite differences (double)", "[lora][cpu][fd]") {
  // L is linear in each of A, B and X separately, so a central difference has
  // no truncation error: what remains is rounding, about eps * |L| / h.
  H::Ctx ctx;
  const rwtest::lora_cases::LoraShape sh{4, 9, 6, 3};
  const std::uint64_t seed = 31337;
  RWTEST_CONTEXT(H, T, "shape " << sh, seed);
  const rankwise::LoraConfig cfg = rwtest::lora_cases::config_for(sh);
  rankwise::Lora<T, H::Backend> layer(ctx, cfg);
  const auto p = rwtest::lora_cases::make_problem<H, T>(sh, seed);
  const HostMatrix w = rwtest::random_matrix(sh.n, sh.d_out, seed + 1);

  // Analytic: backward with dy = ∂L/∂y = w and dx starting at 0.
  rwtest::lora_cases::load<H, T>(ctx, layer, p.a, p.b);
  const auto x = rwtest::to_device<H, T>(ctx, p.x);
  const auto dw = rwtest::to_device<H, T>(ctx, w);
  auto dx = rwtest::to_device<H, T>(ctx, HostMatrix(sh.n, sh.d_in));
  layer.backward(x.cview(), dw.cview(), dx.view());
  const HostMatrix da = rwtest::lora_cases::grad_a_of<H, T>(ctx, layer);
  const HostMatrix db = rwtest::lora_cases::grad_b_of<H, T>(ctx, layer);
  const HostMatrix dxh = rwtest::to_host<H, T>(ctx, dx);

  auto central = [&](const HostMatrix& base, auto evaluate) {
    return rwtest::central_difference(base, rwtest::kLinearStep, evaluate);
  };
  const HostMatrix fd_a =
      central(p.a, [&](const HostMatrix& a) { return loss(ctx, layer, a, p.b, p.x, p.y0, w); });
  const HostMatrix fd_b =
      central(p.b, [&](const HostMatrix& b) { return loss(ctx, layer, p.a, b, p.x, p.y0, w); });
  const HostMatrix fd_x =
      central(p.x, [&](const HostMatrix& xx) { return loss(ctx, layer, p.a, p.b, xx, p.y0, w); });
  // Errors in units of the largest gradient entry (normwise).
  const double tol = rwtest::Tolerance<double>::kFiniteDifference;
  RWTEST_CHECK_FINITE_DIFFERENCE(da, fd_a, tol);
  RWTEST_CHECK_FINITE_DIFFERENCE(db, fd_b, tol);
  RWTEST_CHECK_FINITE_DIFFERENCE(dxh, fd_x, tol);
}
