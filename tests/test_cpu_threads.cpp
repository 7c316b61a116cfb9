// The CPU backend on several threads: the pool runs every task once, a
// caller's executor is used, and every kernel and layer gives the bits of one
// thread at any thread count, call after call (built again as
// test_cpu_openblas, where only the call-after-call part holds for the large
// products). Values are checked against the double reference on the way, the
// small-batch kernels' shapes included.
#include <catch2/catch.hpp>

#include <atomic>
#include <memory>
#include <cstdint>
#include <vector>

#include "rankwise/rankwise.hpp"
#include "support/compare.hpp"
#include "support/harness_cpu.hpp"
#include "support/reference.hpp"
#include "support/tolerance.hpp"

#if defined(RANKWISE_USE_CBLAS)
// Built a second time as test_cpu_openblas, the large products through
// OpenBLAS: the primitive cases of test_core run again on that route.
#include "cases/kernel_cases.hpp"
RWTEST_KERNEL_TEST_CASES(rwtest::CpuHarness, "[cpu][openblas]", float, double)
#endif

namespace {

// Eigen's products and the small-batch kernels give one thread's bits at any
// thread count. OpenBLAS does not: how it tiles a part of a product depends
// on the part's size, so a split moves elements between its kernels; its
// results are the same call after call at one thread count.
#if defined(RANKWISE_USE_CBLAS)
constexpr bool kSameBitsAtAnyThreadCount = false;
#else
constexpr bool kSameBitsAtAnyThreadCount = true;
#endif

using rankwise::CpuBackend;
using rankwise::CpuContext;
using rankwise::MatrixView;
using rankwise::Op;
using rwtest::CpuHarness;
using rwtest::HostMatrix;

// Runs the tasks on the calling thread, last first: results must not depend
// on the order tasks run in. Counts what it was given.
class ReverseExecutor final : public rankwise::CpuExecutor {
 public:
  explicit ReverseExecutor(int threads) : threads_(threads) {}
  int num_threads() const override { return threads_; }
  void run(std::int64_t count, TaskFn fn, void* context) override {
    ++batches;
    tasks += count;
    for (std::int64_t i = count - 1; i >= 0; --i) fn(context, i);
  }
  int batches = 0;
  std::int64_t tasks = 0;

 private:
  int threads_;
};

const char* op_name(Op op) { return op == Op::kNoTrans ? "N" : "T"; }

struct Shape {
  std::int64_t m, n, k;
};

// The small-batch kernels' bounds (tokens 1..4 / 8 / 32 and one past), column
// counts off the vector width, inner tails, and products large enough to be
// split over threads, Eigen's path included.
const std::vector<Shape>& shapes() {
  static const std::vector<Shape> s = {
      {1, 4096, 64}, {2, 1031, 64}, {3, 517, 9},  {4, 1000, 64}, {5, 777, 33},  {8, 2000, 16},
      {9, 640, 17},  {31, 300, 65}, {32, 257, 8}, {33, 400, 40}, {64, 4096, 8}, {300, 200, 64},
      {2048, 64, 40}, {17, 1, 3},   {1, 1, 1},     {64, 64, 4096}, {48, 64, 1000}, {100, 37, 200},
      {130, 8, 4096},
  };
  return s;
}

template <class T>
std::vector<T> run_gemm(CpuContext& ctx, Op op_a, Op op_b, double alpha,
                        double beta, const HostMatrix& a, const HostMatrix& b, const HostMatrix& c0,
                        std::int64_t pad, HostMatrix* got) {
  auto da = rwtest::to_device<CpuHarness, T>(ctx, a, a.cols + pad, -7.0);
  auto db = rwtest::to_device<CpuHarness, T>(ctx, b, b.cols + pad, -7.0);
  auto dc = rwtest::to_device<CpuHarness, T>(ctx, c0, c0.cols + pad, -7.0);
  rankwise::Kernels<CpuBackend, T>::gemm(ctx, static_cast<T>(alpha), da.cview(), op_a, db.cview(),
                                         op_b, static_cast<T>(beta), dc.view());
  CHECK(rwtest::padding_intact<CpuHarness, T>(ctx, dc, -7.0));
  if (got != nullptr) *got = rwtest::to_host<CpuHarness, T>(ctx, dc);
  return rwtest::to_host_raw<CpuHarness, T>(ctx, dc.padded_view());
}

}  // namespace

TEST_CASE("ThreadPool: every task of every batch runs exactly once", "[cpu][threads]") {
  for (int threads : {2, 3, 5}) {
    rankwise::ThreadPool pool(threads);
    REQUIRE(pool.num_threads() == threads);
    std::vector<std::atomic<int>> hits(97);
    for (int batch = 0; batch < 300; ++batch) {
      const std::int64_t count = 1 + batch % 97;
      for (auto& h : hits) h.store(0);
      struct Ctx {
        std::vector<std::atomic<int>>* hits;
      } c{&hits};
      pool.run(
          count, [](void* p, std::int64_t i) { (*static_cast<Ctx*>(p)->hits)[i].fetch_add(1); },
          &c);
      int wrong = 0;
      for (std::int64_t i = 0; i < 97; ++i) wrong += hits[i].load() != (i < count ? 1 : 0);
      INFO("threads " << threads << ", batch " << batch << ", tasks " << count);
      REQUIRE(wrong == 0);
    }
  }
}

TEST_CASE("CpuContext: thread counts are checked, the count is reported", "[cpu][threads]") {
  RWTEST_CHECK_ERROR(rankwise::ErrorCode::kInvalidArgument, "threads must be in [1, 1024], got 0",
                     CpuContext(0));
  RWTEST_CHECK_ERROR(rankwise::ErrorCode::kInvalidArgument,
                     "threads must be in [1, 1024], got 1025", CpuContext(1025));
  RWTEST_CHECK_ERROR(rankwise::ErrorCode::kInvalidArgument, "ThreadPool: threads must be",
                     rankwise::ThreadPool(-3));
  CHECK(CpuContext().num_threads() == 1);
  CHECK(CpuContext(1).num_threads() == 1);
  CHECK(CpuContext(3).num_threads() == 3);
  ReverseExecutor ex(4);
  CHECK(CpuContext(ex).num_threads() == 4);
}

TEMPLATE_TEST_CASE("gemm on threads: the reference's values, one thread's bits, repeatable",
                   "[cpu][threads]",
                   float, double) {
  using T = TestType;
  CpuContext one;
  CpuContext two(2);
  CpuContext three(3);
  ReverseExecutor reverse(4);
  CpuContext caller(reverse);
  std::uint64_t seed = 900;
  for (const Shape& sh : shapes()) {
    for (const Op op_a : {Op::kNoTrans, Op::kTrans}) {
      for (const Op op_b : {Op::kNoTrans, Op::kTrans}) {
        for (const double beta : {0.0, 0.5}) {
          ++seed;
          const double alpha = -0.75;
          const std::int64_t pad = seed % 2 == 0 ? 0 : 5;
          INFO("type " << rwtest::Tolerance<T>::kName << ", m " << sh.m << ", n " << sh.n << ", k "
                       << sh.k << ", op_a " << op_name(op_a) << ", op_b " << op_name(op_b)
                       << ", beta " << beta << ", pad " << pad << ", seed " << seed);
          const HostMatrix a = rwtest::quantize<CpuHarness, T>(
              op_a == Op::kNoTrans ? rwtest::random_matrix(sh.m, sh.k, seed * 3)
                                   : rwtest::random_matrix(sh.k, sh.m, seed * 3));
          const HostMatrix b = rwtest::quantize<CpuHarness, T>(
              op_b == Op::kNoTrans ? rwtest::random_matrix(sh.k, sh.n, seed * 3 + 1)
                                   : rwtest::random_matrix(sh.n, sh.k, seed * 3 + 1));
          const HostMatrix c0 =
              rwtest::quantize<CpuHarness, T>(rwtest::random_matrix(sh.m, sh.n, seed * 3 + 2));
          HostMatrix got;
          const auto bits1 = run_gemm<T>(one, op_a, op_b, alpha, beta, a, b, c0, pad, &got);
          RWTEST_CHECK_CLOSE(got, rwtest::ref_gemm(alpha, a, op_a, b, op_b, beta, c0),
                             rwtest::ref_gemm(0.75, rwtest::abs_of(a), op_a, rwtest::abs_of(b),
                                              op_b, beta, rwtest::abs_of(c0)),
                             rwtest::tolerance<T>(1, sh.k + 1));
          const int before = reverse.batches;
          for (CpuContext* ctx : {&two, &three, &caller}) {
            INFO("threads " << ctx->num_threads());
            HostMatrix got_t;
            const auto bits = run_gemm<T>(*ctx, op_a, op_b, alpha, beta, a, b, c0, pad, &got_t);
            CHECK(rwtest::first_bit_difference(
                      run_gemm<T>(*ctx, op_a, op_b, alpha, beta, a, b, c0, pad, nullptr), bits) ==
                  -1);
            if (kSameBitsAtAnyThreadCount) {
              CHECK(rwtest::first_bit_difference(bits, bits1) == -1);
            } else {
              RWTEST_CHECK_CLOSE(got_t, rwtest::ref_gemm(alpha, a, op_a, b, op_b, beta, c0),
                                 rwtest::ref_gemm(0.75, rwtest::abs_of(a), op_a,
                                                  rwtest::abs_of(b), op_b, beta,
                                                  rwtest::abs_of(c0)),
                                 rwtest::tolerance<T>(1, sh.k + 1));
            }
          }
          // Large products are split: the caller's executor saw them.
          if (sh.m * sh.n * sh.k >= (std::int64_t(1) << 19)) CHECK(reverse.batches > before);
        }
      }
    }
  }
}

namespace {

std::vector<float> raw(MatrixView<float> v) {
  std::vector<float> out(static_cast<std::size_t>(v.rows * v.cols));
  for (std::int64_t i = 0; i < v.rows; ++i)
    for (std::int64_t j = 0; j < v.cols; ++j) out[i * v.cols + j] = v.data[i * v.ld + j];
  return out;
}

// Forward into y, backward into dx and the gradients, for one layer built on ctx.
struct LayerBits {
  std::vector<float> y, dx, da, dbt;
};

void train_forward(rankwise::Lora<float, CpuBackend>& l, MatrixView<const float> x,
                   MatrixView<float> y) {
  l.forward(x, y);
}
void train_forward(rankwise::Smora<float, CpuBackend>& l, MatrixView<const float> x,
                   MatrixView<float> y) {
  l.forward(x, y, rankwise::Mode::kTraining);
}

template <class Make>
LayerBits lora_like_bits(CpuContext& ctx, std::int64_t n, Make&& make) {
  auto layer = make(ctx);
  const std::int64_t d_in = layer->a().cols, d_out = layer->bt().cols;
  const HostMatrix hx = rwtest::random_matrix(n, d_in, 5);
  const HostMatrix hdy = rwtest::random_matrix(n, d_out, 6);
  auto x = rwtest::to_device<CpuHarness, float>(ctx, hx);
  auto dy = rwtest::to_device<CpuHarness, float>(ctx, hdy);
  auto y = rwtest::to_device<CpuHarness, float>(ctx, HostMatrix(n, d_out, 0.25));
  auto dx = rwtest::to_device<CpuHarness, float>(ctx, HostMatrix(n, d_in, -0.5));
  LayerBits out;
  for (int rep = 0; rep < 2; ++rep) {  // a repeated call must give the same bits too
    train_forward(*layer, x.cview(), y.view());
    layer->backward(x.cview(), dy.cview(), dx.view());
  }
  out.y = rwtest::to_host_raw<CpuHarness, float>(ctx, y.cview());
  out.dx = rwtest::to_host_raw<CpuHarness, float>(ctx, dx.cview());
  out.da = raw(layer->grad_a());
  out.dbt = raw(layer->grad_bt());
  return out;
}

void check_same(const LayerBits& a, const LayerBits& b) {
  CHECK(rwtest::first_bit_difference(a.y, b.y) == -1);
  CHECK(rwtest::first_bit_difference(a.dx, b.dx) == -1);
  CHECK(rwtest::first_bit_difference(a.da, b.da) == -1);
  CHECK(rwtest::first_bit_difference(a.dbt, b.dbt) == -1);
}

}  // namespace

TEST_CASE("layers on threads: Lora and Smora give one thread's bits at 2 and 3 threads, and "
          "the same bits call after call",
          "[cpu][threads]") {
  for (const std::int64_t n : {1, 3, 4, 16, 33, 300}) {
    for (const std::int64_t rank : {8, 64}) {
      INFO("n " << n << ", r " << rank);
      auto make_lora = [&](CpuContext& ctx) {
        rankwise::LoraConfig cfg;
        cfg.d_in = 1000;
        cfg.d_out = 777;
        cfg.rank = rank;
        cfg.alpha = 16;
        auto layer = std::make_unique<rankwise::Lora<float, CpuBackend>>(ctx, cfg);
        layer->init_peft(3);
        rankwise::Kernels<CpuBackend, float>::fill_uniform(ctx, layer->bt(), -0.1, 0.1, 4);
        return layer;
      };
      auto make_smora = [&](CpuContext& ctx) {
        rankwise::SmoraConfig cfg;
        cfg.d_in = 1000;
        cfg.d_out = 777;
        cfg.router.num_units = rank;
        cfg.router.top_k = rank / 8;
        cfg.alpha = 16;
        auto layer = std::make_unique<rankwise::Smora<float, CpuBackend>>(ctx, cfg);
        layer->init(3);
        rankwise::Kernels<CpuBackend, float>::fill_uniform(ctx, layer->bt(), -0.1, 0.1, 4);
        return layer;
      };
      CpuContext one, two(2), three(3);
      for (CpuContext* ctx : {&two, &three}) {
        INFO("threads " << ctx->num_threads());
        const LayerBits lora = lora_like_bits(*ctx, n, make_lora);
        check_same(lora, lora_like_bits(*ctx, n, make_lora));
        const LayerBits smora = lora_like_bits(*ctx, n, make_smora);
        check_same(smora, lora_like_bits(*ctx, n, make_smora));
        if (kSameBitsAtAnyThreadCount) {
          check_same(lora, lora_like_bits(one, n, make_lora));
          check_same(smora, lora_like_bits(one, n, make_smora));
        }
      }
    }
  }
}
