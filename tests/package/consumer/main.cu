// A downstream CUDA program: instantiates the GPU layer for every storage
// type so the package tests prove <rankwise/cuda.cuh> compiles and links
// against rankwise::cuda. Build machines have no GPU; it is never run there.
#include <rankwise/cuda.cuh>

#include <cstdio>

template <class T>
void run_forward(rankwise::CudaContext& ctx) {
  rankwise::LoraConfig config;
  config.d_in = 16;
  config.d_out = 8;
  config.rank = 4;
  rankwise::Lora<T, rankwise::CudaBackend> lora(ctx, config);
  lora.init_peft(42);
  rankwise::Buffer<rankwise::CudaBackend, T> x(2 * config.d_in), y(2 * config.d_out);
  rankwise::Kernels<rankwise::CudaBackend, T>::fill(ctx, x.view(2, config.d_in), 1.0);
  rankwise::Kernels<rankwise::CudaBackend, T>::fill(ctx, y.view(2, config.d_out), 0.0);
  lora.forward(x.view(2, config.d_in), y.view(2, config.d_out));
  ctx.synchronize();
}

int main() {
  if (rankwise::cuda_device_count() == 0) {
    std::printf("no CUDA device\n");
    return 0;
  }
  rankwise::CudaContext ctx;
  run_forward<float>(ctx);
  run_forward<__half>(ctx);
  run_forward<__nv_bfloat16>(ctx);
  std::printf("rankwise CUDA consumer: ok\n");
  return 0;
}
