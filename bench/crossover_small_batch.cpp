// Where the small-batch kernels stop beating Eigen's packed GEMM: the three
// products of a LoRA delta at d = 4096, r in {8, 16, 64}, N = 1..64 tokens,
// one thread, weights resident in cache (the N > 1 case of a decode step
// whose layer was just read). Prints small-batch time / Eigen time per cell;
// Kernels<CpuBackend>::kSmallBatch{Dot,Axpy,Grad}Tokens are read off it.
//
//   shrink  H = X Aᵀ            (tokens x weight rowsᵀ: rows_dot)
//   expand  Y += s H Bᵀ          (tokens x weights: rows_axpy)
//   grad    dBᵀ = s Hᵀ dY        (weightsᵀ x tokens: rows_axpy, transposed coefficients)
//
// A plain timing loop (best of 5 runs of >= 20 ms each), not Google Benchmark:
// it is a sweep of 90 cells read by eye, not a tracked benchmark.
#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstdio>

#include <rankwise/rankwise.hpp>

namespace {

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
namespace sb = rankwise::detail::small_batch;

template <class F>
double seconds_per_call(F&& f) {
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    std::int64_t calls = 0;
    const auto t0 = std::chrono::steady_clock::now();
    double elapsed = 0;
    do {
      f();
      ++calls;
      elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    } while (elapsed < 0.02);
    best = std::min(best, elapsed / static_cast<double>(calls));
  }
  return best;
}

}  // namespace

int main() {
  const int d = 4096;
  std::printf("small-batch kernels / Eigen GEMM, time ratio (< 1: small batch faster); "
              "d = %d, one thread, SIMD: %s\n\n",
              d, Eigen::SimdInstructionSetsInUse());
  std::printf("   r    N |  shrink  expand    grad\n");
  for (int r : {8, 16, 64}) {
    const Mat a = Mat::Random(r, d), bt = Mat::Random(r, d);
    for (int n : {1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64}) {
      const Mat x = Mat::Random(n, d), dy = Mat::Random(n, d);
      Mat y = Mat::Zero(n, d), h(n, r), dbt(r, d);
      h.setRandom();
      const double shrink_eigen = seconds_per_call([&] { h.noalias() = x * a.transpose(); });
      const double shrink_small = seconds_per_call([&] {
        sb::rows_dot<float>(1.f, x.data(), d, a.data(), d, n, d, 0.f, h.data(), r, 0, r);
      });
      const double expand_eigen = seconds_per_call([&] { y.noalias() += 0.5f * h * bt; });
      const double expand_small = seconds_per_call([&] {
        sb::rows_axpy<float>(0.5f, h.data(), r, 1, bt.data(), d, n, r, 1.f, y.data(), d, 0, d);
      });
      const double grad_eigen =
          seconds_per_call([&] { dbt.noalias() = 0.5f * h.transpose() * dy; });
      const double grad_small = seconds_per_call([&] {
        sb::rows_axpy<float>(0.5f, h.data(), 1, r, dy.data(), d, r, n, 0.f, dbt.data(), d, 0, d);
      });
      std::printf("  %2d %4d |   %5.2f   %5.2f   %5.2f\n", r, n, shrink_small / shrink_eigen,
                  expand_small / expand_eigen, grad_small / grad_eigen);
    }
  }
  return 0;
}
