// GPU benchmark of the LoRA delta (rankwise::Lora<T, CudaBackend>) for float,
// __half and __nv_bfloat16, next to the baselines it should be judged
// against, measured in the same run. The bodies, sizes and the ratio table
// are the CPU benchmark's (bench/lora/); here only what is the GPU's own: the
// types, one context, cuBLAS (Kernels<CudaBackend, T>::gemm) for the raw
// GEMMs, and the timing policy:
//
// Times per call from CUDA events around kInner back-to-back calls
// (support/cuda_backend.cuh), so launch overhead is amortised as in a
// training or serving loop. At N = 1 the calls rotate over copies of the
// layer, 3x the L2 in all, so A and B come from HBM.
//
// Without a CUDA device it prints "no CUDA device: skipping" and exits 0.
// Flags: Google Benchmark's, plus --quick (or RANKWISE_BENCH_QUICK=1; the
// bf16 cases are left out then). No Eigen here: <rankwise/cuda.cuh> only.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <rankwise/cuda.cuh>
#include <string>
#include <vector>

#include "lora/suite.hpp"
#include "lora/tables.hpp"
#include "support/cuda_backend.cuh"
#include "support/main.hpp"

namespace rankwise {
namespace bench {
namespace lora {

template <class T>
struct TypeInfo;
template <>
struct TypeInfo<float> {
  static constexpr const char* kKey = "cuda_f32";
  static constexpr const char* kTitle = "GPU (cuBLAS, float, fp32 compute, no TF32)";
};
template <>
struct TypeInfo<__half> {
  static constexpr const char* kKey = "cuda_f16";
  static constexpr const char* kTitle = "GPU (cuBLAS, __half, fp32 accumulation)";
};
template <>
struct TypeInfo<__nv_bfloat16> {
  static constexpr const char* kKey = "cuda_bf16";
  static constexpr const char* kTitle = "GPU (cuBLAS, __nv_bfloat16, fp32 accumulation)";
};

constexpr std::int64_t kInner = 10;  // calls per pair of events

template <>
struct Platform<CudaBackend> {
  static constexpr std::int64_t kRotateMaxTokens = 1;
  static constexpr std::int64_t kBatch = kInner;
  static constexpr bool kWarmUpBaselines = true;  // cuBLAS picks its kernels on first use
  static constexpr bool kReadPerThread = false;

  static CudaContext& context(int) {  // one for the whole run, created after the device check
    static CudaContext ctx;
    return ctx;
  }
  static const std::vector<int>& thread_counts() {
    static const std::vector<int> one{1};
    return one;
  }
  template <class T>
  static std::string prefix(int) {
    return TypeInfo<T>::kKey;
  }
  // The same as before the port, so the names (which carry it) stay; the
  // minimum now counts the events' time of all kInner calls of a sample.
  static double min_time(bool quick) { return quick ? 0.002 : 0.01; }
  static void before_delta() {}

  template <class T>
  static void raw_gemm(CudaContext& ctx, float alpha, MatrixView<const T> a, Op op_a,
                       MatrixView<const T> b, Op op_b, float beta, MatrixView<T> c) {
    Kernels<CudaBackend, T>::gemm(ctx, alpha, a, op_a, b, op_b, beta, c);
  }
};

namespace {

void register_all(bool quick) {
  auto nothing = [](const char*, int, std::int64_t, std::int64_t) {};
  register_suite<CudaBackend, float>(quick, nothing);
  register_suite<CudaBackend, __half>(quick, nothing);
  if (!quick) register_suite<CudaBackend, __nv_bfloat16>(quick, nothing);
}

template <class T>
Tally table(RecordingReporter& rec, bool quick) {
  return print_ratio_table(rec, TypeInfo<T>::kKey, TypeInfo<T>::kTitle, quick);
}

}  // namespace
}  // namespace lora
}  // namespace bench
}  // namespace rankwise

int main(int argc, char** argv) {
  namespace rb = rankwise::bench;
  namespace lora = rb::lora;
  const bool quick = rb::take_quick_flag(&argc, argv);
  bool list_only = false;  // listing needs no device
  for (int i = 1; i < argc; ++i) {
    list_only = list_only || std::strcmp(argv[i], "--benchmark_list_tests") == 0 ||
                std::strcmp(argv[i], "--benchmark_list_tests=true") == 0;
  }
  const bool device = rankwise::cuda_device_count() > 0;
  if (!device && !list_only) {
    std::printf("no CUDA device: skipping the GPU LoRA benchmark\n");
    return 0;
  }
  std::string machine;
  if (device) {
    try {
      machine = rb::BenchBackend<rankwise::CudaBackend>::describe();
    } catch (const std::exception& e) {
      std::printf("CUDA device present but unusable: %s\n", e.what());
      return 1;
    }
  }
  return rb::benchmark_main(
      argc, argv, quick, true, [quick] { lora::register_all(quick); },
      [&] {
        if (list_only) return;
        std::printf("rankwise GPU LoRA benchmark%s: %s\n", quick ? " (quick)" : "",
                    machine.c_str());
        std::printf(
            "Times per call from CUDA events around %lld back-to-back calls. N = 1 rows "
            "rotate over copies of A and B totalling %zux the L2, so every call reads "
            "them from HBM; the delta, the GEMM baselines and the read bound rotate "
            "alike.\n\n",
            static_cast<long long>(lora::kInner), rb::kRotationCacheMultiple);
      },
      [&](rb::RecordingReporter& rec) {
        if (list_only) return;
        rb::Tally tally;
        tally += lora::table<float>(rec, quick);
        tally += lora::table<__half>(rec, quick);
        tally += lora::table<__nv_bfloat16>(rec, quick);
        std::printf(
            "\n(the targets are stated for the CPU; on the GPU the same checks are shown "
            "for comparison)\n");
        rb::print_summary(rec, tally);
      });
}
