// Layer state in PEFT layout, written once for every layer: tensors to and
// from a TensorMap, and B between PEFT's (d_out x r) and the layers' internal
// Bᵀ (r x d_out).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/tensor_map.hpp"

namespace rankwise::detail {

/// v (backend memory) as a host tensor of `shape` (row-major, v's elements).
template <class Backend, class T>
HostTensor download_state(Context<Backend>& ctx, MatrixView<const T> v,
                          std::vector<std::int64_t> shape) {
  HostTensor t{std::move(shape), std::vector<double>(static_cast<std::size_t>(v.rows * v.cols))};
  Kernels<Backend, T>::download_doubles(ctx, v, t.values.data());
  return t;
}

/// A checked host tensor (require_tensor) into dst, which has its elements.
template <class Backend, class T>
void upload_state(Context<Backend>& ctx, const HostTensor& t, MatrixView<T> dst) {
  Kernels<Backend, T>::upload_doubles(ctx, t.values.data(), dst);
}

/// The internal Bᵀ (r x d_out) as PEFT's B (d_out x r).
template <class Backend, class T>
HostTensor download_peft_b(Context<Backend>& ctx, MatrixView<const T> bt) {
  const std::int64_t r = bt.rows, d_out = bt.cols;
  const HostTensor bt_host = download_state<Backend, T>(ctx, bt, {r, d_out});
  HostTensor b{{d_out, r}, std::vector<double>(bt_host.values.size())};
  for (std::int64_t i = 0; i < r; ++i) {
    for (std::int64_t o = 0; o < d_out; ++o) b.values[o * r + i] = bt_host.values[i * d_out + o];
  }
  return b;
}

/// PEFT's B (d_out x r, checked) into the internal Bᵀ (r x d_out).
template <class Backend, class T>
void upload_peft_b(Context<Backend>& ctx, const HostTensor& b, MatrixView<T> bt) {
  const std::int64_t r = bt.rows, d_out = bt.cols;
  std::vector<double> bt_values(b.values.size());
  for (std::int64_t o = 0; o < d_out; ++o) {
    for (std::int64_t i = 0; i < r; ++i) bt_values[i * d_out + o] = b.values[o * r + i];
  }
  Kernels<Backend, T>::upload_doubles(ctx, bt_values.data(), bt);
}

/// "lora_A" (r x d_in) and "lora_B" (d_out x r) of a layer's A and Bᵀ.
template <class Backend, class T>
void save_lora_factors(Context<Backend>& ctx, MatrixView<const T> a, MatrixView<const T> bt,
                       TensorMap& out) {
  out["lora_A"] = download_state<Backend, T>(ctx, a, {a.rows, a.cols});
  out["lora_B"] = download_peft_b<Backend, T>(ctx, bt);
}

/// The checked "lora_A" and "lora_B" of a map, for a layer of rank r: found
/// and shape-checked first, written by load() once every other key of the
/// layer is checked too.
struct LoraFactorState {
  const HostTensor* a;
  const HostTensor* b;

  LoraFactorState(const TensorMap& map, std::int64_t r, std::int64_t d_in, std::int64_t d_out)
      : a(&require_tensor(map, "lora_A", {r, d_in})),
        b(&require_tensor(map, "lora_B", {d_out, r})) {}

  template <class Backend, class T>
  void load(Context<Backend>& ctx, MatrixView<T> a_dst, MatrixView<T> bt_dst) const {
    upload_state<Backend, T>(ctx, *a, a_dst);
    upload_peft_b<Backend, T>(ctx, *b, bt_dst);
  }
};

}  // namespace rankwise::detail
