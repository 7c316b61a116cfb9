// MoS (Mixture of Shards) benchmark on the GPU (CUDA + cuBLAS), float and
// __half: the same model-like stack as bench_mos.cpp (L = 32 layers of one
// projection type, d = 4096, one shard pool with v = 8, l = 2, p = 1, rank 16
// per layer) against 32 dense Lora layers of rank 16, forward and forward +
// backward for N in {1, 16, 256, 2048} on each ShardPath, then the ratio
// table, the parameter bytes and the direct / assembled crossover. The bodies
// and tables are mos/suite.hpp and mos/tables.hpp, shared with bench_mos.cpp.
//
// Each timed pass is bracketed by CUDA events on the context's stream
// (BenchBackend<CudaBackend>) and reported as manual time, so host-side launch
// overhead counts only where it leaves the GPU idle (as it would in a model).
// Before each timed pass, off the events, y and dx are zeroed (for both types,
// so float and __half are timed alike): the passes add into them, and __half
// outputs would otherwise run to infinity. Without a GPU it prints
// "no CUDA device: skipping" and exits 0.
//
//   bench_mos_cuda            full run
//   bench_mos_cuda --quick    smoke run (also RANKWISE_BENCH_QUICK=1)
#include <benchmark/benchmark.h>
#include <cuda_fp16.h>

#include <cstdio>
#include <rankwise/cuda.cuh>
#include <string>

#include "mos/sizes.hpp"
#include "mos/suite.hpp"
#include "mos/tables.hpp"
#include "support/cuda_backend.cuh"
#include "support/main.hpp"
#include "support/table.hpp"

namespace {

namespace rb = rankwise::bench;
namespace rm = rankwise::bench::mos;
using rankwise::CudaBackend;

template <class T>
struct TypeInfo;
template <>
struct TypeInfo<float> {
  static constexpr const char* kBackend = "cuda_f32";
  static constexpr const char* kName = "float";
};
template <>
struct TypeInfo<__half> {
  static constexpr const char* kBackend = "cuda_f16";
  static constexpr const char* kName = "__half";
};

template <class T>
void register_type(bool quick) {
  rm::Flavor flavor;
  flavor.backend = TypeInfo<T>::kBackend;
  flavor.zero_outputs = true;
  flavor.warm_up_pass = true;
  rm::register_suite<T, CudaBackend>(flavor, quick);
}

template <class T>
rb::Tally print_type(rb::RecordingReporter& rec, bool quick) {
  return rm::print_tables(rec, TypeInfo<T>::kBackend,
                          std::string("GPU (CUDA, ") + TypeInfo<T>::kName + ")", TypeInfo<T>::kName,
                          sizeof(T), quick, rm::auto_path<CudaBackend, T>, {"lora"});
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  if (rankwise::cuda_device_count() == 0) {
    std::printf("no CUDA device: skipping\n");
    return 0;
  }
  auto register_all = [&] {
    register_type<float>(quick);
    register_type<__half>(quick);
  };
  auto header = [&] {
    std::printf("rankwise GPU MoS benchmark%s: %s\n", quick ? " (quick)" : "",
                rb::BenchBackend<CudaBackend>::describe().c_str());
  };
  auto tables = [&](rb::RecordingReporter& rec) {
    rb::Tally tally = print_type<float>(rec, quick);
    tally += print_type<__half>(rec, quick);
    rb::print_summary(rec, tally);
    return tally;
  };
  // Google Benchmark's own defaults (no repetitions), as this binary always ran.
  return rb::benchmark_main(argc, argv, quick, /*defaults=*/false, register_all, header, tables);
}
