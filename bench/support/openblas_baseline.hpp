// The OpenBLAS baseline of the CPU benchmarks: the cblas_sgemm calls a C++
// user without rankwise writes for a LoRA layer, run on a rankwise layer's own
// A, Bᵀ and gradient memory. Shared by bench_lora and bench_smora.
//
// bench/CMakeLists.txt defines RANKWISE_BENCH_OPENBLAS=1 when it finds
// OpenBLAS; without it this header is empty (kOpenBlas, openblas_note() and
// the wait for idle OpenBLAS threads are the CPU timer's, cpu_backend.hpp).
#pragma once

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <rankwise/rankwise.hpp>
#include <vector>

#include "support/cpu_backend.hpp"

#if RANKWISE_BENCH_OPENBLAS
#include <cblas.h>
#endif

namespace rankwise {
namespace bench {

#if RANKWISE_BENCH_OPENBLAS

/// Runs OpenBLAS on `threads` threads from here on; call before the timed loop.
inline void use_openblas_threads(int threads) {
  if (threads == 1) wait_for_openblas_idle();
  openblas_set_num_threads(threads);
}
/// After the timed loop of a call on `threads` threads.
inline void openblas_done(int threads) {
  if (threads > 1) last_threaded_openblas_call() = std::chrono::steady_clock::now();
}

/// A LoRA layer as rankwise stores it, row-major: A (r x d_in), Bt = Bᵀ
/// (r x d_out), and their gradients alike; the scale s = alpha / r.
struct BlasLora {
  int d_in = 0, d_out = 0, rank = 0;
  float scale = 0;
  const float* a = nullptr;
  const float* bt = nullptr;
  float* da = nullptr;
  float* dbt = nullptr;
};

template <class Layer>
BlasLora blas_lora(Layer& layer) {
  BlasLora l;
  l.d_in = static_cast<int>(layer.config().d_in);
  l.d_out = static_cast<int>(layer.config().d_out);
  l.rank = static_cast<int>(layer.config().rank);
  l.scale = static_cast<float>(layer.scale());
  l.a = layer.a().data;
  l.bt = layer.bt().data;
  l.da = layer.grad_a().data;
  l.dbt = layer.grad_bt().data;
  return l;
}

/// y += s x Aᵀ Bt for the n rows of x: H = X Aᵀ, then Y += s H Bt. h: n x r.
inline void blas_lora_forward(const BlasLora& l, int n, const float* x, float* h, float* y) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, l.rank, l.d_in, 1.0f, x, l.d_in, l.a,
              l.d_in, 0.0f, h, l.rank);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, l.d_out, l.rank, l.scale, h, l.rank,
              l.bt, l.d_out, 1.0f, y, l.d_out);
}

/// The backward as five calls: H = X Aᵀ, dH = s dY Btᵀ, dBt = s Hᵀ dY,
/// dA = dHᵀ X, dX += dH A. h, dh: n x r.
inline void blas_lora_backward(const BlasLora& l, int n, const float* x, const float* dy, float* h,
                               float* dh, float* dx) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, l.rank, l.d_in, 1.0f, x, l.d_in, l.a,
              l.d_in, 0.0f, h, l.rank);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, l.rank, l.d_out, l.scale, dy, l.d_out,
              l.bt, l.d_out, 0.0f, dh, l.rank);
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, l.rank, l.d_out, n, l.scale, h, l.rank, dy,
              l.d_out, 0.0f, l.dbt, l.d_out);
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, l.rank, l.d_in, n, 1.0f, dh, l.rank, x,
              l.d_in, 0.0f, l.da, l.d_in);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, l.d_in, l.rank, 1.0f, dh, l.rank, l.a,
              l.d_in, 1.0f, dx, l.d_in);
}

/// Times the OpenBLAS forward (or backward) of the n rows of x over `layers`
/// in rotation (call i uses layer i mod size, as the rankwise runs do), on
/// `threads` OpenBLAS threads, with BenchBackend<CpuBackend>::run. dy and dx:
/// the backward only.
template <class Layer>
void time_blas_lora(benchmark::State& state, const std::vector<std::unique_ptr<Layer>>& layers,
                    int threads, bool backward, std::int64_t n, const float* x, const float* dy,
                    float* y, float* dx) {
  using Backend = typename Layer::backend_type;
  std::vector<BlasLora> ops;
  for (const auto& layer : layers) ops.push_back(blas_lora(*layer));
  const int rows = static_cast<int>(n);
  std::vector<float> h(static_cast<std::size_t>(n * ops.front().rank)), dh(h.size());
  static Context<Backend> unused_context;  // the CPU clock takes a context and ignores it
  use_openblas_threads(threads);
  BenchBackend<Backend>::run(state, unused_context, {static_cast<std::int64_t>(ops.size()), 1},
                             [&](std::int64_t i) {
                               if (backward)
                                 blas_lora_backward(ops[i], rows, x, dy, h.data(), dh.data(), dx);
                               else
                                 blas_lora_forward(ops[i], rows, x, h.data(), y);
                             });
  openblas_done(threads);
}

#endif  // RANKWISE_BENCH_OPENBLAS

}  // namespace bench
}  // namespace rankwise
