// The GPU half of lora_demo, callable from plain C++: no CUDA types here, so
// main.cpp (compiled by the host compiler, with Eigen) and gpu.cu (compiled by
// nvcc, without Eigen) share only this.
#pragma once

#include <cstdint>
#include <vector>

namespace lora_demo {

/// What the CPU part used and computed, all row-major float.
struct GpuDemoInput {
  std::int64_t d_in = 0;
  std::int64_t d_out = 0;
  std::int64_t rank = 0;
  std::int64_t tokens = 0;
  double alpha = 0;
  std::uint64_t seed = 0;  // the init_peft seed: A is the same on both backends

  std::vector<float> x;   // (tokens x d_in)
  std::vector<float> w0;  // (d_out x d_in), torch.nn.Linear layout
  std::vector<float> b;   // (d_out x rank), PEFT layout
  std::vector<float> dy;  // (tokens x d_out)

  // CPU results the GPU is compared with.
  std::vector<float> a;       // (rank x d_in) after init_peft(seed)
  std::vector<float> y;       // (tokens x d_out) = x W0ᵀ + s x Aᵀ Bᵀ
  std::vector<float> grad_a;  // (rank x d_in)
  std::vector<float> grad_b;  // (d_out x rank)
  std::vector<float> dx;      // (tokens x d_in), the adapter's part of ∂L/∂x
};

/// Runs the same forward and backward on the GPU in float and in __half and
/// prints how far each result is from the CPU's. Returns 0 when they agree
/// within each type's tolerance, or when there is no CUDA device (it prints
/// "no CUDA device: GPU part skipped"); 1 otherwise.
int run_gpu_demo(const GpuDemoInput& in);

}  // namespace lora_demo
