// GPU benchmark of many LoRA adapters in one batch (rankwise::UnitPool<float,
// CudaBackend>): the cases, baselines and tables of bench_multi.cpp
// (multi/suite.hpp, multi/tables.hpp) on the GPU, each rotation of calls timed
// by CUDA events on the context's stream (BenchBackend<CudaBackend>, manual
// time), so launches overlap as in a serving loop; plan() on the host clock,
// including its upload.
//
//   multi_pool / multi_plan / multi_padded / multi_direct / mixed_*   as on the CPU
//   multi_loop   the per-adapter loop: a gather kernel of the adapter's rows of x,
//                Lora::forward (cuBLAS) on its own layer, a scatter-add kernel
//                back into y (an engine's index_select / index_add): this file
//   read         BenchBackend<CudaBackend>::read of 8 MiB slabs of a rotation
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
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <rankwise/cuda.cuh>
#include <string>

#include "multi/sizes.hpp"
#include "multi/suite.hpp"
#include "multi/tables.hpp"
#include "support/cuda_backend.cuh"
#include "support/main.hpp"
#include "support/table.hpp"

namespace {

namespace rb = rankwise::bench;
namespace mt = rankwise::bench::multi;
using rankwise::CudaBackend;
using rankwise::CudaContext;
using rankwise::MatrixView;
using T = float;

constexpr int kBlock = 256;

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

dim3 row_grid(std::int64_t rows, std::int64_t d) {
  const std::int64_t tiles = std::min<std::int64_t>((d + kBlock - 1) / kBlock, 16);
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(rows));
}

/// The engine's row gather and scatter on the GPU: a kernel each, on the
/// context's stream.
struct CudaRowOps {
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
};

using Suite = mt::Suite<CudaBackend, CudaRowOps>;

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  if (rankwise::cuda_device_count() == 0) {
    std::printf("no CUDA device: skipping\n");
    return 0;
  }
  std::unique_ptr<CudaContext> ctx;
  std::unique_ptr<Suite> suite;
  try {
    ctx = std::make_unique<CudaContext>();
    suite = std::make_unique<Suite>(*ctx, "cuda_f32", quick);  // reads the L2 size
  } catch (const std::exception& e) {
    std::printf("CUDA device present but unusable: %s\n", e.what());
    return 1;
  }

  Suite::Agreement agree;
  bool built = false;
  auto header = [&] {
    try {
      std::printf("rankwise GPU multi-adapter (UnitPool) benchmark%s: %s\n",
                  quick ? " (quick)" : "", rb::BenchBackend<CudaBackend>::describe().c_str());
      std::printf(
          "one pool's units %.1f MiB, padded pool %.1f MiB; batches with N <= %lld rotate "
          "over %lld cop%s of every layer; SMoRA check_finite off\n",
          Suite::pool_bytes() / 1048576.0, Suite::padded_bytes() / 1048576.0,
          static_cast<long long>(mt::kRotateMaxTokens), static_cast<long long>(suite->copies()),
          suite->copies() == 1 ? "y" : "ies");
      agree = suite->agreement();  // builds every layer
      built = true;
      mt::print_agreement(agree);
    } catch (const std::exception& e) {
      // The smoke test fails on "unusable"; every benchmark then fails alike.
      std::printf("CUDA device present but unusable: %s\n", e.what());
    }
  };

  auto tables = [&](rb::RecordingReporter& rec) {
    mt::ReportOptions opt;
    opt.backend = suite->backend();
    opt.title = "GPU (CUDA, float)";
    opt.quick = quick;
    opt.cpu_time = false;  // the CUDA-event time
    opt.copies = suite->copies();
    const rb::Tally tally = mt::print_multi_tables(rec, opt);
    if (built) mt::report_disagreement(agree);
    std::printf(
        "\n(the targets are stated for the CPU; on the GPU they are shown for comparison)\n");
    rb::print_summary(rec, tally);
    return tally;
  };

  return rb::benchmark_main(
      argc, argv, quick, /*defaults=*/true, [&] { suite->register_all(); }, header, tables);
}
