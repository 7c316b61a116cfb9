// Steady state allocates nothing: once a layer has run at its largest batch,
// repeated CPU forward and backward calls (any smaller batch included) make no
// heap allocation, on one thread and on a pool. The global operator new is
// replaced by one that counts while a test holds a Counting guard.
//
// The sizes stay below what Eigen's products keep on the stack
// (EIGEN_STACK_ALLOCATION_LIMIT): above it Eigen allocates its packing
// buffers per product, which is Eigen's behaviour, not rankwise's.
#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

#include "rankwise/rankwise.hpp"
#include "support/harness_cpu.hpp"
#include "support/reference.hpp"

namespace {
std::atomic<bool> g_counting{false};
std::atomic<std::int64_t> g_allocations{0};

void* counted_alloc(std::size_t size) {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
}  // namespace

void* operator new(std::size_t size) { return counted_alloc(size); }
void* operator new[](std::size_t size) { return counted_alloc(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace {

using rankwise::CpuBackend;
using rankwise::CpuContext;
using rankwise::MatrixView;
using rwtest::CpuHarness;
using rwtest::HostMatrix;

/// Heap allocations (operator new, any thread) made while it lives.
class Counting {
 public:
  Counting() {
    g_allocations = 0;
    g_counting = true;
  }
  ~Counting() { g_counting = false; }
  std::int64_t count() const { return g_allocations.load(); }
};

constexpr std::int64_t kDin = 96, kDout = 80;
// Token counts on every path: the small-batch kernels, the per-token and the
// broadcast gathers (from 8 tokens), Eigen's products (past 24).
const std::vector<std::int64_t> kTokens = {40, 1, 5, 8, 16, 33};

struct Batch {
  rwtest::DeviceMatrix<CpuHarness, float> x, y, dy, dx;
  explicit Batch(CpuContext& ctx, std::int64_t n)
      : x(rwtest::to_device<CpuHarness, float>(ctx, rwtest::random_matrix(n, kDin, 1))),
        y(rwtest::to_device<CpuHarness, float>(ctx, HostMatrix(n, kDout, 0.0))),
        dy(rwtest::to_device<CpuHarness, float>(ctx, rwtest::random_matrix(n, kDout, 2))),
        dx(rwtest::to_device<CpuHarness, float>(ctx, HostMatrix(n, kDin, 0.0))) {}
};

/// Runs step(batch) once per token count to warm up, then again under a
/// Counting guard; returns the allocations of the second pass.
template <class Step>
std::int64_t steady_allocations(CpuContext& ctx, Step&& step) {
  std::vector<std::unique_ptr<Batch>> batches;
  for (const std::int64_t n : kTokens) batches.push_back(std::make_unique<Batch>(ctx, n));
  for (auto& b : batches) step(*b);
  Counting counting;
  for (int rep = 0; rep < 3; ++rep)
    for (auto& b : batches) step(*b);
  return counting.count();
}

}  // namespace

TEST_CASE("the counting allocator sees allocations (so a zero below can fail)", "[steady]") {
  Counting counting;
  std::vector<float> v(100);
  v[0] = 1.0f;
  CHECK(counting.count() >= 1);
}

TEST_CASE("steady-state CPU forward and backward allocate nothing, every layer", "[steady]") {
  // No SECTIONs: Catch runs a section once per test case, not once per loop pass.
  for (const int threads : {1, 2}) {
    INFO("threads " << threads);
    CpuContext ctx(threads);
    {
      rankwise::LoraConfig cfg;
      cfg.d_in = kDin;
      cfg.d_out = kDout;
      cfg.rank = 16;
      rankwise::Lora<float, CpuBackend> layer(ctx, cfg);
      layer.init_peft(3);
      INFO("Lora");
      CHECK(steady_allocations(ctx, [&](Batch& b) {
              layer.forward(b.x.cview(), b.y.view());
              layer.backward(b.x.cview(), b.dy.cview(), b.dx.view());
            }) == 0);
    }
    for (const std::int64_t g : {1, 4}) {
      INFO("Smora, g " << g << ", with the balance step");
      rankwise::SmoraConfig cfg;
      cfg.d_in = kDin;
      cfg.d_out = kDout;
      cfg.router.num_units = 32;
      cfg.router.top_k = 8;
      cfg.router.group_size = g;
      rankwise::Smora<float, CpuBackend> layer(ctx, cfg);
      layer.init(3);
      CHECK(steady_allocations(ctx, [&](Batch& b) {
              layer.forward(b.x.cview(), b.y.view(), rankwise::Mode::kTraining);
              layer.backward(b.x.cview(), b.dy.cview(), b.dx.view());
              layer.update_bias();
              layer.forward(b.x.cview(), b.y.view());
            }) == 0);
    }
    {
      rankwise::ShardPoolConfig pc;
      pc.d_in = kDin;
      pc.d_out = kDout;
      pc.num_layers = 3;
      pc.equivalent_rank = 4;
      pc.private_rank = 1;
      pc.shards_per_vector = 2;
      rankwise::ShardPool<float, CpuBackend> pool(ctx, pc);
      pool.init(5);
      rankwise::MosConfig mc;
      mc.rank = 6;
      for (const rankwise::ShardPath path :
           {rankwise::ShardPath::kAuto, rankwise::ShardPath::kDirect,
            rankwise::ShardPath::kAssembled}) {
        INFO("Mos, 3 layers on one pool, path " << static_cast<int>(path));
        std::vector<std::unique_ptr<rankwise::Mos<float, CpuBackend>>> layers;
        for (std::int64_t i = 0; i < pc.num_layers; ++i)
          layers.push_back(std::make_unique<rankwise::Mos<float, CpuBackend>>(pool, i, mc, path));
        CHECK(steady_allocations(ctx, [&](Batch& b) {
                pool.zero_grad();
                for (auto& l : layers) l->forward(b.x.cview(), b.y.view());
                for (auto& l : layers) l->backward(b.x.cview(), b.dy.cview(), b.dx.view());
              }) == 0);
      }
    }
    {
      INFO("UnitPool: plan, training forward and backward of mixed batches");
      rankwise::UnitPoolConfig pc;
      pc.d_in = kDin;
      pc.d_out = kDout;
      pc.capacity_units = 128;
      rankwise::UnitPool<float, CpuBackend> pool(ctx, pc);
      rankwise::LoraConfig lc;
      lc.d_in = kDin;
      lc.d_out = kDout;
      lc.rank = 16;
      rankwise::Lora<float, CpuBackend> lora(ctx, lc);
      lora.init_peft(3);
      rankwise::Kernels<CpuBackend, float>::fill_uniform(ctx, lora.bt(), -0.1, 0.1, 4);
      lc.rank = 8;
      rankwise::Lora<float, CpuBackend> small(ctx, lc);
      small.init_peft(5);
      rankwise::SmoraConfig sc;
      sc.d_in = kDin;
      sc.d_out = kDout;
      sc.router.num_units = 32;
      sc.router.top_k = 8;
      rankwise::Smora<float, CpuBackend> smora(ctx, sc);
      smora.init(6);
      const rankwise::AdapterId first = pool.add(small);
      const std::vector<rankwise::AdapterId> ids = {pool.add(lora), pool.add(smora)};
      pool.remove(first);  // the next adapter's units split around the hole
      const std::vector<rankwise::AdapterId> more = {pool.add(smora), pool.add(small)};
      std::vector<rankwise::AdapterId> all = ids;
      all.insert(all.end(), more.begin(), more.end());
      REQUIRE(pool.runs(more[0]).size() == 2);
      std::vector<std::vector<std::int32_t>> token_ids;
      for (const std::int64_t n : kTokens) {
        std::vector<std::int32_t> t(static_cast<std::size_t>(n));
        for (std::int64_t i = 0; i < n; ++i) {
          t[static_cast<std::size_t>(i)] =
              i % 5 == 4 ? rankwise::kNoAdapter : all[static_cast<std::size_t>((i * 7) % 4)];
        }
        token_ids.push_back(std::move(t));
      }
      rankwise::PoolPlan<CpuBackend> plan;
      CHECK(steady_allocations(ctx, [&](Batch& b) {
              const auto& t = token_ids[static_cast<std::size_t>(
                  std::find(kTokens.begin(), kTokens.end(), b.x.rows) - kTokens.begin())];
              pool.plan(rankwise::host_view<const std::int32_t>(t.data(), b.x.rows, 1), plan);
              pool.forward(plan, b.x.cview(), b.y.view(), rankwise::Mode::kTraining);
              pool.backward(plan, b.x.cview(), b.dy.cview(), b.dx.view());
              pool.forward(plan, b.x.cview(), b.y.view());
            }) == 0);
    }
    {
      INFO("Lego");
      rankwise::Lego<float, CpuBackend> layer(ctx, kDin, kDout, 12);
      rankwise::Kernels<CpuBackend, float>::fill_uniform(ctx, layer.a(), -0.1, 0.1, 1);
      rankwise::Kernels<CpuBackend, float>::fill_uniform(ctx, layer.bt(), -0.1, 0.1, 2);
      CHECK(steady_allocations(ctx, [&](Batch& b) {
              layer.forward(b.x.cview(), b.y.view());
              layer.backward(b.x.cview(), b.dy.cview(), b.dx.view());
            }) == 0);
    }
  }
}
