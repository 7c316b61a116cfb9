// GPU benchmark of many LoRA adapters in one batch (rankwise::UnitPool<float,
// CudaBackend>): the cases, baselines and tables of bench_multi.cpp
// (support/multi_*.hpp) on the GPU, each rotation of calls timed by CUDA
// events on the context's stream (UseManualTime), so launches overlap as in a
// serving loop; plan() on the host clock, including its upload.
//
//   multi_pool / multi_plan / multi_padded / multi_direct / mixed_*   as on the CPU
//   multi_loop   the per-adapter loop: a gather kernel of the adapter's rows of x,
//                Lora::forward (cuBLAS) on its own layer, a scatter-add kernel
//                back into y (an engine's index_select / index_add)
//   read         a kernel reading 8 MiB slabs (16-byte loads) of a rotation
//                totalling >= 3x the L2: the floor's read rate
//
// For N <= 64 the calls also rotate over copies of every layer totalling >=
// 3x the L2 (cudaDevAttrL2CacheSize), so the units come from HBM. The
// SMoRA adapter's check_finite is off: on the GPU it reads a flag back (a
// stream synchronisation per forward), which engines that trust their inputs
// turn off. --quick (or RANKWISE_BENCH_QUICK=1): a smoke run. Without a CUDA
// device this prints "no CUDA device: skipping" and exits 0. Informational:
// exits 0 whatever the verdicts.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <rankwise/cuda.cuh>
#include <string>
#include <vector>

#include "support/multi_bench.hpp"
#include "support/multi_report.hpp"
#include "support/multi_sizes.hpp"
#include "support/report.hpp"

namespace {

namespace rb = rankwise::bench;
namespace mt = rankwise::bench::multi;
using rankwise::CudaBackend;
using rankwise::CudaContext;
using rankwise::MatrixView;
using T = float;

constexpr int kBlock = 256;

int sm_count() {
  static const int count = [] {
    int device = 0, sms = 0;
    RANKWISE_CUDA_CHECK(cudaGetDevice(&device));
    RANKWISE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
  }();
  return count;
}

// xs[j] = x[rows[j]], one grid row per gathered row.
__global__ void gather_rows_kernel(const float* x, std::int64_t ldx, const std::int32_t* rows,
                                   std::int64_t d, float* xs, std::int64_t ldxs) {
  const float* src = x + std::int64_t(rows[blockIdx.y]) * ldx;
  float* dst = xs + std::int64_t(blockIdx.y) * ldxs;
  for (std::int64_t c = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; c < d;
       c += std::int64_t(gridDim.x) * blockDim.x) {
    dst[c] = src[c];
  }
}

// y[rows[j]] += ys[j]; the rows are distinct, so no two blocks write one element.
__global__ void scatter_add_rows_kernel(const float* ys, std::int64_t ldys,
                                        const std::int32_t* rows, std::int64_t d, float* y,
                                        std::int64_t ldy) {
  const float* src = ys + std::int64_t(blockIdx.y) * ldys;
  float* dst = y + std::int64_t(rows[blockIdx.y]) * ldy;
  for (std::int64_t c = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; c < d;
       c += std::int64_t(gridDim.x) * blockDim.x) {
    dst[c] += src[c];
  }
}

// Reads an array once with 16-byte loads. The XOR of everything read is
// stored only if it equals a value it practically never takes, which keeps
// every load without writing anything (as bench_lora_cuda's read bound).
__global__ void read_kernel(const uint4* a, std::int64_t count, unsigned* sink) {
  unsigned acc = 0;
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const uint4 v = a[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

dim3 row_grid(std::int64_t rows, std::int64_t d) {
  const std::int64_t tiles = std::min<std::int64_t>((d + kBlock - 1) / kBlock, 16);
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(rows));
}

/// The GPU's side of the suite: CUDA events around each rotation of calls.
struct CudaOps {
  static constexpr bool kManualTime = true;
  static constexpr bool kCheckFinite = false;

  template <class Call>
  static void run(benchmark::State& state, CudaContext& ctx, std::int64_t cycle, Call call) {
    cudaEvent_t start = nullptr, stop = nullptr;
    RANKWISE_CUDA_CHECK(cudaEventCreate(&start));
    RANKWISE_CUDA_CHECK(cudaEventCreate(&stop));
    while (state.KeepRunningBatch(cycle)) {
      RANKWISE_CUDA_CHECK(cudaEventRecord(start, ctx.stream()));
      for (std::int64_t i = 0; i < cycle; ++i) call(i);
      RANKWISE_CUDA_CHECK(cudaEventRecord(stop, ctx.stream()));
      RANKWISE_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.0f;
      RANKWISE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      state.SetIterationTime(static_cast<double>(ms) * 1e-3);
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }

  template <class Call>
  static void run_host(benchmark::State& state, CudaContext& ctx, std::int64_t cycle, Call call) {
    while (state.KeepRunningBatch(cycle)) {
      const auto t0 = std::chrono::steady_clock::now();
      for (std::int64_t i = 0; i < cycle; ++i) call(i);
      ctx.synchronize();
      const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
      state.SetIterationTime(dt.count());
    }
  }

  static void gather_rows(CudaContext& ctx, MatrixView<const T> x, const mt::RowList& rows,
                          MatrixView<T> xs) {
    if (rows.count == 0) return;
    gather_rows_kernel<<<row_grid(rows.count, x.cols), kBlock, 0, ctx.stream()>>>(
        x.data, x.ld, rows.device, x.cols, xs.data, xs.ld);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }
  static void scatter_add_rows(CudaContext& ctx, MatrixView<const T> ys, const mt::RowList& rows,
                               MatrixView<T> y) {
    if (rows.count == 0) return;
    scatter_add_rows_kernel<<<row_grid(rows.count, y.cols), kBlock, 0, ctx.stream()>>>(
        ys.data, ys.ld, rows.device, y.cols, y.data, y.ld);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }
  static void read(CudaContext& ctx, const T* data, std::int64_t count) {
    static unsigned* sink = [] {
      unsigned* p = nullptr;
      RANKWISE_CUDA_CHECK(cudaMalloc(&p, sizeof(unsigned)));
      return p;
    }();
    const std::int64_t vectors = count * static_cast<std::int64_t>(sizeof(T)) / 16;
    const int blocks =
        static_cast<int>(std::min<std::int64_t>((vectors + kBlock - 1) / kBlock, 8 * sm_count()));
    read_kernel<<<blocks, kBlock, 0, ctx.stream()>>>(reinterpret_cast<const uint4*>(data), vectors,
                                                     sink);
    RANKWISE_CUDA_LAUNCH_CHECK();
  }
};

using Suite = mt::Suite<CudaBackend, CudaOps>;

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  if (rankwise::cuda_device_count() == 0) {
    std::printf("no CUDA device: skipping\n");
    return 0;
  }
  rb::RecordingReporter rec(argc, argv);  // before anything prints: it may move the text to stderr
  std::vector<char*> args;
  const auto arg_storage = rb::with_default_flags(argc, argv, quick, &args);
  int nargs = static_cast<int>(args.size()) - 1;
  benchmark::Initialize(&nargs, args.data());
  if (benchmark::ReportUnrecognizedArguments(nargs, args.data())) return 1;

  cudaDeviceProp prop{};
  try {
    int device = 0;
    RANKWISE_CUDA_CHECK(cudaGetDevice(&device));
    RANKWISE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  } catch (const std::exception& e) {
    std::printf("CUDA device present but unusable: %s\n", e.what());
    return 1;
  }
  const std::size_t l2 =
      prop.l2CacheSize > 0 ? static_cast<std::size_t>(prop.l2CacheSize) : (std::size_t(50) << 20);
  CudaContext ctx;
  Suite suite(ctx, "cuda_f32", l2, quick);
  suite.register_all();

  std::printf(
      "rankwise GPU multi-adapter (UnitPool) benchmark%s: %s (sm_%d%d, %d SMs), L2 %zu "
      "KiB, %zu MiB memory\n",
      quick ? " (quick)" : "", prop.name, prop.major, prop.minor, sm_count(), l2 >> 10,
      static_cast<std::size_t>(prop.totalGlobalMem >> 20));
  std::printf(
      "one pool's units %.1f MiB, padded pool %.1f MiB; batches with N <= %lld rotate "
      "over %lld cop%s of every layer; SMoRA check_finite off\n",
      Suite::pool_bytes() / 1048576.0, Suite::padded_bytes() / 1048576.0,
      static_cast<long long>(mt::kRotateMaxTokens), static_cast<long long>(suite.copies()),
      suite.copies() == 1 ? "y" : "ies");
  Suite::Agreement agree;
  try {
    agree = suite.agreement();
  } catch (const std::exception& e) {
    std::printf("CUDA device present but unusable: %s\n", e.what());
    return 1;
  }
  mt::print_agreement(agree);

  benchmark::RunSpecifiedBenchmarks(&rec);
  std::fflush(stdout);

  mt::ReportOptions opt;
  opt.backend = suite.backend();
  opt.title = "GPU (CUDA, float)";
  opt.quick = quick;
  opt.cpu_time = false;  // the CUDA-event time
  opt.copies = suite.copies();
  rb::Tally tally = mt::print_multi_tables(rec, opt);
  mt::report_disagreement(agree);
  std::printf("\n(the targets are stated for the CPU; on the GPU they are shown for comparison)\n");
  rb::print_summary(rec, tally);
  benchmark::Shutdown();
  return 0;
}
