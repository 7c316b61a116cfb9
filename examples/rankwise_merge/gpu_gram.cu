// The merge tool's GPU distance computations (LoRA-LEGO's Gram matrices).
#include <rankwise/cuda.cuh>
#include <rankwise/merge/cuda_gram.cuh>

#include "gpu_gram.hpp"

rankwise::merge::GramFunction gpu_gram() {
  RANKWISE_CHECK(rankwise::cuda_device_count() > 0,
                 "--device cuda: no CUDA device is available on this machine");
  static rankwise::CudaContext ctx;  // lives for the whole run of the tool
  return rankwise::merge::cuda_gram(ctx);
}
