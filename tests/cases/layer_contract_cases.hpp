// The layer concept (rankwise/layers/layer.hpp), checked at run time the same
// way for every layer and backend: one generic body over a "maker" that builds
// two different layers of a kind (Lora, Smora, block MoE-LoRA, Mos, Lego).
// What each layer computes is checked against its double reference in its own
// cases; here, what the concept promises: the two modes agree, the gradients
// are overwritten or accumulated as asked (Mos: always accumulated into its
// pool), dx is optional and added to, zero_grad() and num_parameters() match
// parameters(), and state() / load_state() reproduce the layer bit for bit,
// refusing a bad map without touching the layer.
// Tolerance: accumulate (g then g + g') against 2g: tolerance<T>(2, n + r).
#pragma once

#include <catch2/catch.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rankwise/core/lora_config.hpp"
#include "rankwise/core/shard_config.hpp"
#include "rankwise/layers/layer.hpp"
#include "rankwise/layers/lego.hpp"
#include "rankwise/layers/lora.hpp"
#include "rankwise/layers/mos.hpp"
#include "rankwise/layers/shard_pool.hpp"
#include "rankwise/layers/smora.hpp"
#include "rankwise/layers/unit_pool.hpp"
#include "support/compare.hpp"
#include "support/harness_common.hpp"
#include "support/reference.hpp"
#include "support/tolerance.hpp"

namespace rwtest {
namespace layer_contract_cases {

using rankwise::ErrorCode;
using rankwise::MatrixView;
using rankwise::Mode;
using rankwise::ParameterRef;
using rankwise::TensorMap;

inline constexpr std::int64_t kDin = 20, kDout = 14, kRank = 8, kTokens = 9;

// Not layers: the pool serves a plan, not one x; a type without state.
struct WithoutState {
  using value_type = float;
  using backend_type = rankwise::CpuBackend;
  static constexpr bool kOwnsParameters = true;
  void forward(MatrixView<const float>, MatrixView<float>, Mode) {}
  void backward(MatrixView<const float>, MatrixView<const float>, MatrixView<float>, bool) {}
  std::vector<ParameterRef<float>> parameters() { return {}; }
  void zero_grad() {}
  std::int64_t num_parameters() const { return 0; }
};
static_assert(!rankwise::is_layer_v<WithoutState>);
static_assert(!rankwise::is_layer_v<int>);

/// Every layer of backend B with storage T follows the concept.
template <class T, class B>
constexpr bool all_layers_conform() {
  static_assert(rankwise::is_layer_v<rankwise::Lora<T, B>>);
  static_assert(rankwise::is_layer_v<rankwise::Smora<T, B>>);
  static_assert(rankwise::is_layer_v<rankwise::Mos<T, B>>);
  static_assert(rankwise::is_layer_v<rankwise::Lego<T, B>>);
  static_assert(!rankwise::is_layer_v<rankwise::UnitPool<T, B>>);
  static_assert(rankwise::Lora<T, B>::kOwnsParameters && rankwise::Smora<T, B>::kOwnsParameters &&
                rankwise::Lego<T, B>::kOwnsParameters && !rankwise::Mos<T, B>::kOwnsParameters);
  return true;
}

template <class H, class T>
void fill_random(typename H::Ctx& ctx, MatrixView<T> m, std::uint64_t seed) {
  rankwise::Kernels<typename H::Backend, T>::fill_uniform(ctx, m, -0.5, 0.5, seed);
}

template <class H, class T>
struct LoraMaker {
  using Layer = rankwise::Lora<T, typename H::Backend>;
  static constexpr const char* kName = "Lora";
  typename H::Ctx& ctx;
  explicit LoraMaker(typename H::Ctx& c) : ctx(c) {}
  std::unique_ptr<Layer> make(std::uint64_t seed) {
    rankwise::LoraConfig c;
    c.d_in = kDin;
    c.d_out = kDout;
    c.rank = kRank;
    c.alpha = 12.0;
    auto layer = std::make_unique<Layer>(ctx, c);
    layer->init_peft(seed);
    fill_random<H, T>(ctx, layer->bt(), seed + 1);
    return layer;
  }
  std::vector<ParameterRef<T>> owner_parameters() { return {}; }
  void owner_zero_grad() {}
};

template <class H, class T, int kGroup>
struct SmoraMaker {
  using Layer = rankwise::Smora<T, typename H::Backend>;
  using Acc = rankwise::accumulator_t<T>;
  static constexpr const char* kName = kGroup == 1 ? "Smora" : "Smora (block MoE-LoRA, g = 2)";
  typename H::Ctx& ctx;
  explicit SmoraMaker(typename H::Ctx& c) : ctx(c) {}
  std::unique_ptr<Layer> make(std::uint64_t seed) {
    rankwise::SmoraConfig c;
    c.d_in = kDin;
    c.d_out = kDout;
    c.router.num_units = kRank;
    c.router.group_size = kGroup;
    c.router.top_k = 4;
    c.check_finite = false;  // a host read on the GPU, not what is tested here
    auto layer = std::make_unique<Layer>(ctx, c);
    layer->init(seed);
    fill_random<H, T>(ctx, layer->bt(), seed + 1);
    rankwise::Kernels<typename H::Backend, Acc>::fill_uniform(ctx, layer->bias(), -0.1, 0.1,
                                                              seed + 2);
    return layer;
  }
  std::vector<ParameterRef<T>> owner_parameters() { return {}; }
  void owner_zero_grad() {}
};

template <class H, class T>
struct MosMaker {
  using Layer = rankwise::Mos<T, typename H::Backend>;
  static constexpr const char* kName = "Mos";
  typename H::Ctx& ctx;
  rankwise::ShardPool<T, typename H::Backend> pool;
  explicit MosMaker(typename H::Ctx& c) : ctx(c), pool(c, pool_config()) {
    pool.init(5);
    fill_random<H, T>(ctx, pool.b(), 6);
  }
  static rankwise::ShardPoolConfig pool_config() {
    rankwise::ShardPoolConfig c;
    c.d_in = kDin;
    c.d_out = kDout;
    c.num_layers = 2;
    c.equivalent_rank = 8;
    c.private_rank = 1;
    c.shards_per_vector = 2;
    return c;
  }
  // Layers of one seed's index lists; different seeds draw different lists.
  std::unique_ptr<Layer> make(std::uint64_t seed) {
    rankwise::MosConfig c;
    c.rank = kRank;
    c.alpha = 12.0;
    c.seed = seed;
    return std::make_unique<Layer>(pool, 1, c);
  }
  std::vector<ParameterRef<T>> owner_parameters() { return pool.parameters(); }
  void owner_zero_grad() { pool.zero_grad(); }
};

template <class H, class T>
struct LegoMaker {
  using Layer = rankwise::Lego<T, typename H::Backend>;
  using Acc = rankwise::accumulator_t<T>;
  static constexpr const char* kName = "Lego";
  typename H::Ctx& ctx;
  explicit LegoMaker(typename H::Ctx& c) : ctx(c) {}
  std::unique_ptr<Layer> make(std::uint64_t seed) {
    auto layer = std::make_unique<Layer>(ctx, kDin, kDout, kRank);
    fill_random<H, T>(ctx, layer->a(), seed);
    fill_random<H, T>(ctx, layer->bt(), seed + 1);
    rankwise::Kernels<typename H::Backend, Acc>::fill_uniform(ctx, layer->gates(), 0.5, 1.5,
                                                              seed + 2);
    return layer;
  }
  std::vector<ParameterRef<T>> owner_parameters() { return {}; }
  void owner_zero_grad() {}
};

/// The gradients an optimiser would see: the layer's own, or its owner's.
template <class Maker, class Layer>
std::vector<ParameterRef<typename Layer::value_type>> trained(Maker& maker, Layer& layer) {
  return Layer::kOwnsParameters ? layer.parameters() : maker.owner_parameters();
}

template <class H, class T>
std::vector<HostMatrix> grads_of(typename H::Ctx& ctx, const std::vector<ParameterRef<T>>& ps) {
  std::vector<HostMatrix> out;
  for (const auto& p : ps) out.push_back(to_host<H, T>(ctx, MatrixView<const T>(p.grad)));
  return out;
}

template <class H, class T>
std::vector<std::vector<T>> raw_grads_of(typename H::Ctx& ctx,
                                         const std::vector<ParameterRef<T>>& ps) {
  std::vector<std::vector<T>> out;
  for (const auto& p : ps) out.push_back(to_host_raw<H, T>(ctx, MatrixView<const T>(p.grad)));
  return out;
}

template <class H, class T, class Layer>
HostMatrix forward_of(typename H::Ctx& ctx, Layer& layer, const DeviceMatrix<H, T>& x,
                      const HostMatrix& y0, Mode mode) {
  DeviceMatrix<H, T> y = to_device<H, T>(ctx, y0);
  layer.forward(x.cview(), y.view(), mode);
  return to_host<H, T>(ctx, y);
}

template <class H, class T, class Maker>
void layer_follows_the_contract() {
  using Layer = typename Maker::Layer;
  typename H::Ctx ctx;
  Maker maker(ctx);
  INFO(Maker::kName << ", " << H::kName << ", " << H::template type_name<T>());
  static_assert(all_layers_conform<T, typename H::Backend>());

  std::unique_ptr<Layer> layer = maker.make(101);
  const HostMatrix xh = quantize<H, T>(random_matrix(kTokens, kDin, 7));
  const HostMatrix y0 = quantize<H, T>(random_matrix(kTokens, kDout, 8));
  const HostMatrix dyh = quantize<H, T>(random_matrix(kTokens, kDout, 9));
  const HostMatrix dx0 = quantize<H, T>(random_matrix(kTokens, kDin, 10));
  const DeviceMatrix<H, T> x = to_device<H, T>(ctx, xh);
  const DeviceMatrix<H, T> dy = to_device<H, T>(ctx, dyh);

  // num_parameters() counts what parameters() lists (none for a shared owner).
  std::int64_t listed = 0;
  for (const auto& p : layer->parameters()) {
    CHECK(p.value.rows == p.grad.rows);
    CHECK(p.value.cols == p.grad.cols);
    listed += p.value.rows * p.value.cols;
  }
  CHECK(layer->num_parameters() == listed);
  if (!Layer::kOwnsParameters) CHECK(listed == 0);

  // Inference and training forwards give the same y (the training one also
  // keeps the routing and takes the balance step, after computing y).
  const HostMatrix y_inf = forward_of<H, T>(ctx, *layer, x, y0, Mode::kInference);
  const TensorMap before_training = layer->state();
  const HostMatrix y_train = forward_of<H, T>(ctx, *layer, x, y0, Mode::kTraining);
  CHECK(y_train.v == y_inf.v);

  // Overwrite: two backwards leave one backward's gradients (an owner that
  // is shared always adds, so its gradients are zeroed before each).
  const auto params = trained(maker, *layer);
  REQUIRE(!params.empty());
  maker.owner_zero_grad();
  layer->backward(x.cview(), dy.cview(), {}, false);
  const auto once = raw_grads_of<H, T>(ctx, params);
  const std::vector<HostMatrix> g = grads_of<H, T>(ctx, params);
  maker.owner_zero_grad();
  layer->backward(x.cview(), dy.cview(), {}, false);
  if (Layer::kOwnsParameters) layer->backward(x.cview(), dy.cview(), {}, false);
  CHECK(raw_grads_of<H, T>(ctx, params) == once);

  // Accumulate: a second backward adds its gradients (Mos: whatever the flag).
  for (bool flag : {true, false}) {
    if (!Layer::kOwnsParameters) maker.owner_zero_grad();
    layer->backward(x.cview(), dy.cview(), {}, false);
    if (Layer::kOwnsParameters && !flag) continue;  // overwrite: checked above
    layer->backward(x.cview(), dy.cview(), {}, flag);
    const std::vector<HostMatrix> twice = grads_of<H, T>(ctx, params);
    for (std::size_t i = 0; i < params.size(); ++i) {
      INFO(params[i].name << ", accumulate = " << flag);
      HostMatrix doubled = g[i];
      for (double& v : doubled.v) v *= 2.0;
      RWTEST_CHECK_CLOSE(twice[i], doubled, normwise_magnitude(doubled),
                         tolerance<T>(2, kTokens + kRank));
    }
  }

  // dx is optional: the gradients do not depend on it, and it is added to.
  maker.owner_zero_grad();
  DeviceMatrix<H, T> dx = to_device<H, T>(ctx, dx0);
  layer->backward(x.cview(), dy.cview(), dx.view(), false);
  CHECK(raw_grads_of<H, T>(ctx, params) == once);
  DeviceMatrix<H, T> dx_zero = to_device<H, T>(ctx, HostMatrix(kTokens, kDin, 0.0));
  maker.owner_zero_grad();
  layer->backward(x.cview(), dy.cview(), dx_zero.view(), false);
  const HostMatrix dx_alone = to_host<H, T>(ctx, dx_zero);
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dx), add(dx0, dx_alone),
                     normwise_magnitude(add(abs_of(dx0), abs_of(dx_alone))),
                     tolerance<T>(3, kRank + kDout));

  // zero_grad() clears what parameters() lists.
  if (Layer::kOwnsParameters) {
    layer->zero_grad();
    for (const HostMatrix& m : grads_of<H, T>(ctx, params)) {
      for (double v : m.v) CHECK(v == 0.0);
    }
  }

  // state() / load_state(): a different layer of the kind becomes this one.
  std::unique_ptr<Layer> copy = maker.make(202);
  const TensorMap state = before_training;
  layer->load_state(state);  // undo the training forward's balance step
  const HostMatrix y_again = forward_of<H, T>(ctx, *layer, x, y0, Mode::kInference);
  CHECK(y_again.v == y_inf.v);
  CHECK(forward_of<H, T>(ctx, *copy, x, y0, Mode::kInference).v != y_inf.v);
  copy->load_state(state);
  CHECK(forward_of<H, T>(ctx, *copy, x, y0, Mode::kInference).v == y_inf.v);
  const TensorMap again = copy->state();
  REQUIRE(again.size() == state.size());
  for (const auto& [key, tensor] : state) {
    INFO("key " << key);
    REQUIRE(again.count(key) == 1);
    CHECK(again.at(key).shape == tensor.shape);
    CHECK(again.at(key).values == tensor.values);
  }

  // A bad map is refused, naming the key, and the layer is left as it was.
  std::unique_ptr<Layer> other = maker.make(303);
  const TensorMap other_state = other->state();
  for (const auto& [key, tensor] : state) {
    INFO("key " << key);
    TensorMap missing = state;
    missing.erase(key);
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "missing key \"" + key + "\"",
                       other->load_state(missing));
    TensorMap wrong = state;
    wrong[key].shape.push_back(1);
    RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "\"" + key + "\" has shape",
                       other->load_state(wrong));
  }
  const TensorMap unchanged = other->state();
  for (const auto& [key, tensor] : other_state) CHECK(unchanged.at(key).values == tensor.values);
}

/// Mos's state is its index lists: entries must be int32 shard indices.
template <class H, class T>
void mos_state_refuses_bad_indices() {
  typename H::Ctx ctx;
  MosMaker<H, T> maker(ctx);
  auto layer = maker.make(1);
  const TensorMap state = layer->state();
  const std::vector<std::int32_t> before = layer->indices().a;
  const std::int64_t shards = maker.pool.config().num_shards();
  TensorMap wrong = state;
  wrong["mos_indices_A"].values[3] = 1.5;
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "\"mos_indices_A\"[3] = 1.5",
                     layer->load_state(wrong));
  wrong = state;
  wrong["mos_indices_B"].values[0] = static_cast<double>(shards);
  RWTEST_CHECK_ERROR(ErrorCode::kInvalidArgument, "outside the pool's [0, M",
                     layer->load_state(wrong));
  CHECK(layer->indices().a == before);
}

}  // namespace layer_contract_cases
}  // namespace rwtest

#define RWTEST_LAYER_CONTRACT_TEST_CASES(HARNESS, TAG, ...)                                   \
  TEMPLATE_TEST_CASE("layer concept: Lora", "[layer]" TAG, __VA_ARGS__) {                     \
    rwtest::layer_contract_cases::layer_follows_the_contract<                                 \
        HARNESS, TestType, rwtest::layer_contract_cases::LoraMaker<HARNESS, TestType>>();     \
  }                                                                                           \
  TEMPLATE_TEST_CASE("layer concept: Smora", "[layer]" TAG, __VA_ARGS__) {                    \
    rwtest::layer_contract_cases::layer_follows_the_contract<                                 \
        HARNESS, TestType, rwtest::layer_contract_cases::SmoraMaker<HARNESS, TestType, 1>>(); \
    rwtest::layer_contract_cases::layer_follows_the_contract<                                 \
        HARNESS, TestType, rwtest::layer_contract_cases::SmoraMaker<HARNESS, TestType, 2>>(); \
  }                                                                                           \
  TEMPLATE_TEST_CASE("layer concept: Mos", "[layer]" TAG, __VA_ARGS__) {                      \
    rwtest::layer_contract_cases::layer_follows_the_contract<                                 \
        HARNESS, TestType, rwtest::layer_contract_cases::MosMaker<HARNESS, TestType>>();      \
    rwtest::layer_contract_cases::mos_state_refuses_bad_indices<HARNESS, TestType>();         \
  }                                                                                           \
  TEMPLATE_TEST_CASE("layer concept: Lego", "[layer]" TAG, __VA_ARGS__) {                     \
    rwtest::layer_contract_cases::layer_follows_the_contract<                                 \
        HARNESS, TestType, rwtest::layer_contract_cases::LegoMaker<HARNESS, TestType>>();     \
  }
