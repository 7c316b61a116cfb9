// The benchmarked model, written once for both backends: one projection type
// at width d — the dense LoRA stack, the MoS pool, and Mos stacks per path.
// Include after <rankwise/rankwise.hpp> or <rankwise/cuda.cuh>.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "support/mos_sizes.hpp"

namespace rankwise {
namespace bench {
namespace mos {

template <class T, class Backend>
struct Model {
  using Kern = Kernels<Backend, T>;
  using LoraLayer = Lora<T, Backend>;
  using MosLayer = Mos<T, Backend>;

  explicit Model(std::int64_t d_) : d(d_), pool(ctx, pool_config(d_)) {
    pool.init(1);
    Kern::fill_uniform(ctx, pool.b(), -0.01, 0.01, 2);  // nonzero B: real arithmetic
    for (std::int64_t i = 0; i < kLayers; ++i) {
      lora.push_back(std::make_unique<LoraLayer>(ctx, lora_config(d)));
      lora.back()->init_peft(100 + i);
      Kern::fill_uniform(ctx, lora.back()->bt(), -0.01, 0.01, 200 + i);
    }
    warm_up(lora);
  }

  /// The stack of one path, built on first use (all on the same pool and the
  /// same index lists; only the stack being timed touches its buffers).
  std::vector<std::unique_ptr<MosLayer>>& mos(ShardPath path) {
    auto& layers = mos_[path];
    if (layers.empty()) {
      for (std::int64_t i = 0; i < kLayers; ++i) {
        layers.push_back(std::make_unique<MosLayer>(pool, i, mos_config(), path));
      }
      warm_up(layers);
    }
    return layers;
  }

  /// One N = 1 and one N = 64 step: allocates every per-layer buffer (and, on
  /// the GPU, loads the kernels) outside the timed loops.
  template <class Layers>
  void warm_up(Layers& layers) {
    for (std::int64_t n : {1, 64}) {
      Buffer<Backend, T> x(n * d), y(n * d), dx(n * d);
      Kern::fill(ctx, x.view(n, d), 0.0);
      Kern::fill(ctx, y.view(n, d), 0.0);
      Kern::fill(ctx, dx.view(n, d), 0.0);
      for (auto& l : layers) {
        l->forward(x.view(n, d), y.view(n, d));
        l->backward(x.view(n, d), y.view(n, d), dx.view(n, d));
      }
      ctx.synchronize();
    }
    pool.zero_grad();
    ctx.synchronize();
  }

  std::int64_t d;
  Context<Backend> ctx;
  ShardPool<T, Backend> pool;
  std::vector<std::unique_ptr<LoraLayer>> lora;

 private:
  std::map<ShardPath, std::vector<std::unique_ptr<MosLayer>>> mos_;
};

}  // namespace mos
}  // namespace bench
}  // namespace rankwise
