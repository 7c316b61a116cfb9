// A downstream program: one LoRA forward on the CPU, checked against a
// hand-written loop. Exits nonzero on a wrong result.
#include <rankwise/rankwise.hpp>

// rankwise::rankwise brings Eigen and Threads only: its umbrella header must not
// need nlohmann_json (rankwise::io's dependency).
#if defined(INCLUDE_NLOHMANN_JSON_HPP_) || defined(NLOHMANN_JSON_VERSION_MAJOR)
#error "<rankwise/rankwise.hpp> includes nlohmann/json"
#endif

#if defined(CONSUMER_EXPECT_CBLAS) && !defined(RANKWISE_USE_CBLAS)
#error "rankwise::openblas did not bring RANKWISE_USE_CBLAS"
#endif

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  rankwise::LoraConfig config;
  config.d_in = 3;
  config.d_out = 2;
  config.rank = 2;
  config.alpha = 4.0;  // scale = alpha / rank = 2

  const std::vector<float> a = {1, 2, 3,     // r x d_in
                                -1, 0, 2};
  const std::vector<float> b = {1, -2,       // d_out x r
                                0.5f, 1};
  const std::vector<float> x = {1, 0, -1,    // n x d_in
                                2, 1, 0.5f};
  std::vector<float> y = {10, 20, 30, 40};   // n x d_out, added to

  rankwise::CpuContext ctx;
  rankwise::Lora<float, rankwise::CpuBackend> lora(ctx, config);
  lora.set_a(rankwise::host_view(a.data(), 2, 3));
  lora.set_b(rankwise::host_view(b.data(), 2, 2));
  const std::vector<float> y0 = y;
  lora.forward(rankwise::host_view(x.data(), 2, 3), rankwise::host_view(y.data(), 2, 2));

  int failures = 0;
  for (int t = 0; t < 2; ++t) {
    for (int o = 0; o < 2; ++o) {
      double expected = y0[t * 2 + o];
      for (int k = 0; k < 2; ++k) {
        double h = 0;
        for (int i = 0; i < 3; ++i) h += a[k * 3 + i] * x[t * 3 + i];
        expected += lora.scale() * b[o * 2 + k] * h;
      }
      if (std::abs(expected - y[t * 2 + o]) > 1e-4) {
        std::printf("y[%d][%d] = %g, expected %g\n", t, o, y[t * 2 + o], expected);
        ++failures;
      }
    }
  }
  std::printf("rankwise consumer: %s\n", failures == 0 ? "ok" : "WRONG");
  return failures == 0 ? 0 : 1;
}
