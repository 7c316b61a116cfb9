// GPU benchmark of the LoRA delta (rankwise::Lora<T, CudaBackend>) for float,
// __half and __nv_bfloat16, next to the baselines it should be judged
// against, measured in the same run; the sizes are the CPU benchmark's
// (support/sizes.hpp) and the table the same (support/report.hpp).
//
//   delta_fwd  Lora::forward(x, y): y += s x Aᵀ Bᵀ
//   delta_bwd  Lora::backward(x, dy, dx): dA, dB, dx +=
//   gemm_fwd   the two cuBLAS GEMMs the forward consists of
//              (Kernels<CudaBackend, T>::gemm on the same layer's memory, no
//              layer, no checks, no workspace)
//   gemm_bwd   the five cuBLAS GEMMs of the backward, likewise
//   base       the frozen base product Y = X W0ᵀ (d x d), one cuBLAS GEMM
//   naive      ΔW = s B A materialised (d x d) every call, then Y += X ΔWᵀ
//   read       a kernel that reads A and B once (16-byte loads): the N = 1 bound
//
// Timing: cudaEvents on the context's stream around kInner back-to-back calls,
// reported per call through UseManualTime(); launch overhead is thus amortised
// as in a training or serving loop. At N = 1 the calls rotate over copies of
// the layer, 3x the L2 size in all, so A and B come from HBM (support/sizes.hpp).
//
// Without a CUDA device it prints "no CUDA device: skipping" and exits 0.
// Flags: Google Benchmark's, plus --quick (or RANKWISE_BENCH_QUICK=1).
// No Eigen here: <rankwise/cuda.cuh> only.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <rankwise/cuda.cuh>

#include "support/report.hpp"
#include "support/sizes.hpp"

namespace {

namespace rb = rankwise::bench;
using rankwise::CudaBackend;
using rankwise::CudaContext;
using rankwise::MatrixView;
using rankwise::Op;

constexpr std::int64_t kD = rb::kDim;
constexpr int kInner = 10;  // calls per timed batch of events

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

// One context for the whole run, created on first use (after the device check).
CudaContext& context() {
  static CudaContext ctx;
  return ctx;
}

std::size_t l2_bytes() {
  int device = 0, l2 = 0;
  RANKWISE_CUDA_CHECK(cudaGetDevice(&device));
  RANKWISE_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
  return l2 > 0 ? static_cast<std::size_t>(l2) : std::size_t(50) << 20;
}

int sm_count() {
  int device = 0, sms = 0;
  RANKWISE_CUDA_CHECK(cudaGetDevice(&device));
  RANKWISE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms > 0 ? sms : 1;
}

template <class T>
std::size_t factor_bytes(std::int64_t rank) {
  return 2 * sizeof(T) * static_cast<std::size_t>(rank * kD);  // A and Bᵀ
}

template <class T>
std::int64_t copies_for(std::int64_t rank, std::int64_t n) {
  return rb::rotates(n) ? rb::rotation_copies(factor_bytes<T>(rank), l2_bytes()) : 1;
}

double scale_for(std::int64_t rank) { return rb::kAlpha / static_cast<double>(rank); }

// ---- device data ----------------------------------------------------------------

template <class T>
using DeviceBuffer = rankwise::Buffer<CudaBackend, T>;
template <class T>
using Kern = rankwise::Kernels<CudaBackend, T>;

// A (rows x cols) device matrix of U(lo, hi) values, built once per
// (rows, cols, seed) and kept for the run.
template <class T>
MatrixView<T> device_random(std::int64_t rows, std::int64_t cols, std::uint64_t seed, double lo,
                            double hi) {
  static std::map<std::tuple<std::int64_t, std::int64_t, std::uint64_t>,
                  std::unique_ptr<DeviceBuffer<T>>>
      cache;
  auto& slot = cache[std::make_tuple(rows, cols, seed)];
  if (!slot) {
    slot = std::make_unique<DeviceBuffer<T>>(rows * cols);
    Kern<T>::fill_uniform(context(), slot->view(rows, cols), lo, hi, seed);
  }
  return slot->view(rows, cols);
}

template <class T>
MatrixView<const T> tokens_input(std::int64_t n) {
  return device_random<T>(n, kD, 11, -1.0, 1.0);
}
template <class T>
MatrixView<const T> upstream_grad(std::int64_t n) {
  return device_random<T>(n, kD, 12, -1.0, 1.0);
}
template <class T>
MatrixView<const T> base_weight() {
  return device_random<T>(kD, kD, 13, -1.0 / 64, 1.0 / 64);  // (d_out x d_in)
}

// A zeroed (rows x cols) device matrix owned by the benchmark that asks.
template <class T>
struct Scratch {
  DeviceBuffer<T> buffer;
  MatrixView<T> view;
  Scratch(std::int64_t rows, std::int64_t cols) : buffer(rows * cols) {
    view = buffer.view(rows, cols);
    Kern<T>::fill(context(), view, 0.0);
  }
};

// `copies` rankwise layers, PEFT-initialised A and a nonzero B, kept for the
// run (random interleaving shuffles the benchmarks). The GEMM baselines and
// the read bound use the same layers' memory, so every variant reads the
// same bytes at the same addresses.
template <class T>
std::vector<std::unique_ptr<rankwise::Lora<T, CudaBackend>>>& layer_pool(std::int64_t rank,
                                                                         std::int64_t copies) {
  using Layer = rankwise::Lora<T, CudaBackend>;
  static std::map<std::pair<std::int64_t, std::int64_t>, std::vector<std::unique_ptr<Layer>>>
      pools;
  auto& pool = pools[{rank, copies}];
  if (pool.empty()) {
    rankwise::LoraConfig cfg;
    cfg.d_in = kD;
    cfg.d_out = kD;
    cfg.rank = rank;
    cfg.alpha = rb::kAlpha;
    for (std::int64_t i = 0; i < copies; ++i) {
      pool.push_back(std::make_unique<Layer>(context(), cfg));
      pool.back()->init_peft(100 + i);
      Kern<T>::fill_uniform(context(), pool.back()->bt(), -0.01, 0.01, 200 + i);
    }
    context().synchronize();
  }
  return pool;
}

// ---- timing -------------------------------------------------------------------

// Times kInner calls of `call(i)` (i = the rotation index) per benchmark
// iteration with a pair of events on the context's stream; reports per call.
template <class Call>
void timed_loop(benchmark::State& state, std::int64_t copies, Call call) {
  cudaStream_t stream = context().stream();
  cudaEvent_t start = nullptr, stop = nullptr;
  RANKWISE_CUDA_CHECK(cudaEventCreate(&start));
  RANKWISE_CUDA_CHECK(cudaEventCreate(&stop));
  std::int64_t i = 0;
  for (std::int64_t k = 0; k < copies; ++k) call(k);  // warm-up: workspaces, cuBLAS heuristics
  RANKWISE_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (auto _ : state) {
    RANKWISE_CUDA_CHECK(cudaEventRecord(start, stream));
    for (int k = 0; k < kInner; ++k) {
      call(i);
      if (++i == copies) i = 0;
    }
    RANKWISE_CUDA_CHECK(cudaEventRecord(stop, stream));
    RANKWISE_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    RANKWISE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(static_cast<double>(ms) * 1e-3 / kInner);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  state.counters["copies"] = static_cast<double>(copies);
}

// Every benchmark body runs through this: a rankwise or CUDA error marks the
// benchmark as failed instead of terminating the run.
template <class Body>
void guarded(benchmark::State& state, Body body) {
  try {
    body();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// Rates divide by the manual time, which is per call: `flops` is per call.
void flops_counter(benchmark::State& state, double flops) {
  state.counters["FLOP/s"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

// ---- benchmarks -------------------------------------------------------------

template <class T>
void BM_DeltaForward(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  guarded(state, [&] {
    const std::int64_t copies = copies_for<T>(rank, n);
    auto& layers = layer_pool<T>(rank, copies);
    const auto x = tokens_input<T>(n);
    Scratch<T> y(n, kD);
    timed_loop(state, copies, [&](std::int64_t i) { layers[i]->forward(x, y.view); });
    flops_counter(state, 4.0 * n * rank * kD);
  });
}

template <class T>
void BM_DeltaBackward(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  guarded(state, [&] {
    const std::int64_t copies = copies_for<T>(rank, n);
    auto& layers = layer_pool<T>(rank, copies);
    const auto x = tokens_input<T>(n);
    const auto dy = upstream_grad<T>(n);
    Scratch<T> dx(n, kD);
    timed_loop(state, copies, [&](std::int64_t i) { layers[i]->backward(x, dy, dx.view); });
    flops_counter(state, 10.0 * n * rank * kD);
  });
}

template <class T>
void BM_GemmForward(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  guarded(state, [&] {
    const std::int64_t copies = copies_for<T>(rank, n);
    auto& layers = layer_pool<T>(rank, copies);
    const auto x = tokens_input<T>(n);
    Scratch<T> y(n, kD), h(n, rank);
    const float s = static_cast<float>(scale_for(rank));
    auto& ctx = context();
    timed_loop(state, copies, [&](std::int64_t i) {
      const auto& layer = *layers[i];
      Kern<T>::gemm(ctx, 1.0f, x, Op::kNoTrans, layer.a(), Op::kTrans, 0.0f, h.view);
      Kern<T>::gemm(ctx, s, h.view, Op::kNoTrans, layer.bt(), Op::kNoTrans, 1.0f, y.view);
    });
    flops_counter(state, 4.0 * n * rank * kD);
  });
}

template <class T>
void BM_GemmBackward(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  guarded(state, [&] {
    const std::int64_t copies = copies_for<T>(rank, n);
    auto& layers = layer_pool<T>(rank, copies);
    const auto x = tokens_input<T>(n);
    const auto dy = upstream_grad<T>(n);
    Scratch<T> dx(n, kD), h(n, rank), dh(n, rank);
    const float s = static_cast<float>(scale_for(rank));
    auto& ctx = context();
    timed_loop(state, copies, [&](std::int64_t i) {
      auto& layer = *layers[i];
      const MatrixView<const T> a = layer.a(), bt = layer.bt();
      Kern<T>::gemm(ctx, 1.0f, x, Op::kNoTrans, a, Op::kTrans, 0.0f, h.view);
      Kern<T>::gemm(ctx, s, dy, Op::kNoTrans, bt, Op::kTrans, 0.0f, dh.view);
      Kern<T>::gemm(ctx, s, h.view, Op::kTrans, dy, Op::kNoTrans, 0.0f, layer.grad_bt());
      Kern<T>::gemm(ctx, 1.0f, dh.view, Op::kTrans, x, Op::kNoTrans, 0.0f, layer.grad_a());
      Kern<T>::gemm(ctx, 1.0f, dh.view, Op::kNoTrans, a, Op::kNoTrans, 1.0f, dx.view);
    });
    flops_counter(state, 10.0 * n * rank * kD);
  });
}

template <class T>
void BM_Base(benchmark::State& state, std::int64_t n) {
  guarded(state, [&] {
    const auto x = tokens_input<T>(n);
    // W0 is 64 MiB in float but 32 MiB in 16-bit types, which can stay in
    // a 50 MiB L2 across back-to-back calls at small N: base is then warm.
    const auto w0 = base_weight<T>();
    Scratch<T> y(n, kD);
    auto& ctx = context();
    timed_loop(state, 1, [&](std::int64_t) {
      Kern<T>::gemm(ctx, 1.0f, x, Op::kNoTrans, w0, Op::kTrans, 0.0f, y.view);
    });
    flops_counter(state, 2.0 * n * kD * kD);
  });
}

template <class T>
void BM_Naive(benchmark::State& state, std::int64_t rank, std::int64_t n) {
  guarded(state, [&] {
    const auto& layer = *layer_pool<T>(rank, copies_for<T>(rank, n))[0];
    const auto x = tokens_input<T>(n);
    Scratch<T> y(n, kD), dw(kD, kD);  // ΔW (d_out x d_in), allocated once
    const float s = static_cast<float>(scale_for(rank));
    auto& ctx = context();
    timed_loop(state, 1, [&](std::int64_t) {
      Kern<T>::gemm(ctx, s, layer.bt(), Op::kTrans, layer.a(), Op::kNoTrans, 0.0f, dw.view);
      Kern<T>::gemm(ctx, 1.0f, x, Op::kNoTrans, dw.view, Op::kTrans, 1.0f, y.view);
    });
    flops_counter(state, 2.0 * kD * kD * rank + 2.0 * n * kD * kD);
  });
}

// Reads two arrays once with 16-byte loads. The XOR of everything read is
// stored only if it equals a value it practically never takes, which keeps
// every load without writing anything.
__global__ void read_kernel(const uint4* a, std::int64_t a_count, const uint4* b,
                            std::int64_t b_count, unsigned* sink) {
  unsigned acc = 0;
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < a_count;
       i += stride) {
    const uint4 v = a[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < b_count;
       i += stride) {
    const uint4 v = b[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

template <class T>
void BM_Read(benchmark::State& state, std::int64_t rank) {
  guarded(state, [&] {
    const std::int64_t copies = copies_for<T>(rank, 1);
    auto& layers = layer_pool<T>(rank, copies);
    DeviceBuffer<unsigned> sink(1);
    const std::int64_t count = rank * kD * static_cast<std::int64_t>(sizeof(T)) / 16;
    constexpr int kBlock = 256;
    const int blocks = static_cast<int>(
        std::min<std::int64_t>(rankwise::ceil_div(count, kBlock), 8 * sm_count()));
    cudaStream_t stream = context().stream();
    timed_loop(state, copies, [&](std::int64_t i) {
      const auto& layer = *layers[i];
      read_kernel<<<blocks, kBlock, 0, stream>>>(reinterpret_cast<const uint4*>(layer.a().data),
                                                 count,
                                                 reinterpret_cast<const uint4*>(layer.bt().data),
                                                 count, sink.data());
      RANKWISE_CUDA_LAUNCH_CHECK();
    });
    state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(factor_bytes<T>(rank)));
  });
}

// ---- registration -------------------------------------------------------------

template <class T>
void register_type(bool quick) {
  const std::string backend = TypeInfo<T>::kKey;
  // Manual time per call; the wall time per benchmark is about kInner times it.
  const double min_time = quick ? 0.002 : 0.01;
  auto configure = [&](benchmark::internal::Benchmark* b, std::int64_t n) {
    b->MinTime(min_time)->UseManualTime()->Unit(n >= 256 ? benchmark::kMillisecond
                                                         : benchmark::kMicrosecond);
  };
  for (std::int64_t n : rb::token_counts(quick)) {
    configure(benchmark::RegisterBenchmark(rb::key(backend, "base", 0, n).c_str(), BM_Base<T>, n),
              n);
  }
  for (std::int64_t r : rb::ranks(quick)) {
    for (std::int64_t n : rb::token_counts(quick)) {
      auto reg = [&](const char* what, void (*fn)(benchmark::State&, std::int64_t, std::int64_t)) {
        configure(benchmark::RegisterBenchmark(rb::key(backend, what, r, n).c_str(), fn, r, n),
                  n);
      };
      reg("delta_fwd", BM_DeltaForward<T>);
      reg("gemm_fwd", BM_GemmForward<T>);
      if (n == 1) {
        configure(
            benchmark::RegisterBenchmark(rb::key(backend, "read", r, 0).c_str(), BM_Read<T>, r),
            n);
      }
      reg("delta_bwd", BM_DeltaBackward<T>);
      reg("gemm_bwd", BM_GemmBackward<T>);
      reg("naive", BM_Naive<T>);
    }
  }
}

template <class T>
rb::Tally table(rb::RecordingReporter& rec, bool quick) {
  return rb::print_ratio_table(rec, TypeInfo<T>::kKey, TypeInfo<T>::kTitle, quick);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  const auto console = rb::console_options(argc, argv);
  std::vector<char*> args;
  const auto arg_storage = rb::with_default_flags(argc, argv, quick, &args);
  int nargs = static_cast<int>(args.size()) - 1;
  bool list_only = false;
  for (int i = 1; i < nargs; ++i) {
    list_only = list_only || std::string(args[i]) == "--benchmark_list_tests" ||
                std::string(args[i]) == "--benchmark_list_tests=true";
  }
  register_type<float>(quick);
  register_type<__half>(quick);
  if (!quick) register_type<__nv_bfloat16>(quick);
  benchmark::Initialize(&nargs, args.data());
  if (benchmark::ReportUnrecognizedArguments(nargs, args.data())) return 1;

  if (list_only) {  // Initialize removed the flag but set it: this lists, runs nothing
    benchmark::RunSpecifiedBenchmarks();
    return 0;
  }
  if (rankwise::cuda_device_count() == 0) {
    std::printf("no CUDA device: skipping the GPU LoRA benchmark\n");
    return 0;
  }
  try {
    int device = 0;
    cudaDeviceProp prop{};
    RANKWISE_CUDA_CHECK(cudaGetDevice(&device));
    RANKWISE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    std::printf("rankwise GPU LoRA benchmark%s: %s (sm_%d%d, %d SMs, L2 %zu KiB)\n",
                quick ? " (quick)" : "", prop.name, prop.major, prop.minor, sm_count(),
                l2_bytes() >> 10);
    std::printf("Times per call from cudaEvents around %d back-to-back calls. N = 1 rows rotate "
                "over copies of A and B totalling %zux the L2, so every call reads them from "
                "HBM; the delta, the GEMM baselines and the read bound rotate alike.\n\n",
                kInner, rb::kRotationCacheMultiple);
    std::fflush(stdout);
  } catch (const std::exception& e) {
    std::printf("CUDA device present but unusable: %s\n", e.what());
    return 1;
  }

  rb::RecordingReporter rec(console);
  benchmark::RunSpecifiedBenchmarks(&rec);
  std::fflush(stdout);

  rb::Tally tally;
  for (const rb::Tally& t : {table<float>(rec, quick), table<__half>(rec, quick),
                             table<__nv_bfloat16>(rec, quick)}) {
    tally.pass += t.pass;
    tally.miss += t.miss;
  }
  std::printf("\n(the targets are stated for the CPU; on the GPU the same checks are shown for "
              "comparison)\n");
  rb::print_summary(rec, tally);
  benchmark::Shutdown();
  return 0;
}
