// LoRA-LEGO's GPU distance computations: the cuBLAS Gram matrix against a
// plain-loop double reference. Exits 77 without a CUDA device.
#include <catch2/catch.hpp>

#include <cmath>
#include <rankwise/cuda.cuh>
#include <rankwise/merge/cuda_gram.cuh>
#include <vector>

#include "support/cuda_session.cuh"

TEST_CASE("cuda gram: U Uᵀ equals the double reference", "[cuda][merge][lego]") {
  rankwise::CudaContext ctx;
  const rankwise::merge::GramFunction gram = rankwise::merge::cuda_gram(ctx);
  for (const auto& shape : {std::pair<int, int>{1, 5}, {7, 13}, {112, 8192}, {33, 1}}) {
    const int n = shape.first, d = shape.second;
    std::vector<double> units(static_cast<std::size_t>(n) * d), got(static_cast<std::size_t>(n) * n);
    for (std::size_t i = 0; i < units.size(); ++i) units[i] = rankwise::uniform(7, i, -1.0, 1.0);
    gram(units.data(), n, d, got.data());
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        double ref = 0.0, mag = 0.0;
        for (int c = 0; c < d; ++c) {
          ref += units[i * d + c] * units[j * d + c];
          mag += std::abs(units[i * d + c] * units[j * d + c]);
        }
        CAPTURE(n, d, i, j);
        // Double accumulation of d products in another order: d ulps of the magnitude.
        CHECK(std::abs(got[i * n + j] - ref) <= 4.0 * d * 1.2e-16 * mag);
        CHECK(got[i * n + j] == got[j * n + i]);
      }
    }
  }
}

int main(int argc, char** argv) { return rwtest::run_catch_on_device(argc, argv); }
