// MoS (Mixture of Shards) benchmark, CPU (Eigen, float): a model-like stack of
// L = 32 layers of one projection type, d = 4096, one shard pool (v = 8, l = 2,
// p = 1) and 32 Mos layers of rank r = 16, against 32 dense Lora layers of the
// same active rank. Forward over the stack and forward + backward, for
// N in {1, 16, 256, 2048} on each ShardPath, then the ratio table, the
// parameter bytes, and a sweep (N = 1..256, d = 4096 and 1024) for the
// direct / assembled crossover that ShardPath::kAuto should follow. The
// bodies and tables are mos/suite.hpp and mos/tables.hpp, shared with
// bench_mos_cuda.cu; this file adds the CPU-only prototype.
//
//   bench_mos            full run: ~1 minute of CPU time (3 repetitions,
//                        interleaved; N = 2048 once), ~3 minutes wall on a
//                        busy 2-core machine
//   bench_mos --quick    smoke run, seconds (also RANKWISE_BENCH_QUICK=1)
//
// Footprints: 16 MiB of LoRA A and Bᵀ (32 MiB with gradients), 8 MiB of MoS
// pool (16 MiB with gradients). Each layer reads its factors after the 31
// others read theirs, but with a 32 MiB L3 the pool can stay largely cached
// where the LoRA stack with its gradients cannot: part of MoS's edge at N = 1
// is that smaller footprint. In a real model the frozen base weights between
// two layers evict both.
//
// The tables use CPU time (one thread: Eigen without OpenMP), which leaves out
// the spans a shared machine descheduled the process. The outputs y and dx
// are not zeroed between passes here: float does not overflow over a run's
// passes, and zeroing would pause the clock around every N = 1 sample.
//
// kAuto follows TuningPolicy::prefer_assembled_shards(n): on the CPU always the
// direct path, whose gathers run as GEMMs over the shared shard rows
// (broadcast unit lists, Kernels<CpuBackend>::gather_dot & co.).
//
// Also: ONE PROTOTYPE (namespace proto, clearly marked, NOT the library),
// timed as mos_proto_asm and checked against kAssembled at start-up: the
// assembled path with a plain row copy into one scratch shared by all layers.
// It is kept because it still beats the library's kAssembled at small N
// (bench/results/ has the numbers); kAuto never takes kAssembled on the CPU.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <rankwise/rankwise.hpp>
#include <string>
#include <vector>

#include "mos/sizes.hpp"
#include "mos/suite.hpp"
#include "mos/tables.hpp"
#include "support/cpu_backend.hpp"
#include "support/cpu_matrix.hpp"
#include "support/main.hpp"
#include "support/table.hpp"

namespace {

namespace rb = rankwise::bench;
namespace rm = rankwise::bench::mos;
using rankwise::CpuBackend;
using rankwise::CpuContext;
using rankwise::host_view;
using rankwise::MatrixView;
using rankwise::ShardPath;
using rm::Mode;
using T = float;
using Mat = rb::RowMajorMatrix<T>;
using Mos = rankwise::Mos<T, CpuBackend>;
using Pool = rankwise::ShardPool<T, CpuBackend>;
using Kern = rankwise::Kernels<CpuBackend, T>;
using Model = rm::Model<T, CpuBackend>;

const std::string kBackend = "cpu_f32";

using rb::random_matrix;  // support/cpu_matrix.hpp

// =============================================================================
// PROTOTYPE (not the library): the assembled path, assembled differently.
//
// The assembled path with two changes, for comparison with Mos's kAssembled:
// the layer's A (r x d_in) and Bᵀ (r x d_out) are assembled by a plain row
// copy (Mos: fill with 0, then gather_axpy with unit coefficients: a
// read-modify-write), into ONE scratch shared by all layers (Mos: 1 MiB of
// assembled factors and gradients per layer, 32 MiB for this stack, which
// also pushes the pool and the activations out of the cache). Then the
// library's lora_forward / lora_backward, and the row gradients added into
// the pool, as Mos does.
namespace proto {

class ProtoAssembled {
 public:
  ProtoAssembled(Pool& pool, const rankwise::MosConfig& config,
                 const rankwise::ShardIndices& indices)
      : pool_(&pool),
        r_(config.rank),
        scale_(config.scale()),
        list_a_(indices.a),
        list_b_(indices.b) {}

  void forward(MatrixView<const T> x, MatrixView<T> y) {
    Shared& s = assemble(x.rows);
    rankwise::lora_forward<CpuBackend, T>(ctx_, scale_, x, a(s), bt(s), y, s.workspace.data(),
                                          s.workspace.size() * sizeof(Ws));
  }

  void backward(MatrixView<const T> x, MatrixView<const T> dy, MatrixView<T> dx) {
    Shared& s = assemble(x.rows);
    const auto& pc = pool_->config();
    rankwise::lora_backward<CpuBackend, T>(ctx_, scale_, x, a(s), bt(s), dy, dx,
                                           host_view(s.da.data(), r_, pc.d_in),
                                           host_view(s.dbt.data(), r_, pc.d_out), false,
                                           s.workspace.data(), s.workspace.size() * sizeof(Ws));
    auto ga = rankwise::detail::eigen_map(pool_->grad_a());
    auto gb = rankwise::detail::eigen_map(pool_->grad_b());
    const std::int64_t q = static_cast<std::int64_t>(list_a_.size());
    for (std::int64_t i = 0; i < q; ++i) ga.row(list_a_[i]) += s.da.row(i);
    for (std::int64_t i = 0; i < q; ++i) gb.row(list_b_[i]) += s.dbt.row(i);
  }

 private:
  struct alignas(rankwise::kWorkspaceAlignment) Ws {
    unsigned char bytes[rankwise::kWorkspaceAlignment];
  };
  // Row q = j·l + s of the (r·l x d/l) view is shard list[q]: the same layout
  // as Mos's assembled factors.
  struct Shared {
    Mat a, bt, da, dbt;
    std::vector<Ws> workspace;
  };
  Shared& assemble(std::int64_t n) {
    static Shared s;  // one for all layers (single-threaded benchmark)
    const auto& pc = pool_->config();
    const std::int64_t q = static_cast<std::int64_t>(list_a_.size());
    s.a.resize(q, pc.shard_in());
    s.bt.resize(q, pc.shard_out());
    s.da.resize(q, pc.shard_in());
    s.dbt.resize(q, pc.shard_out());
    const std::size_t bytes = rankwise::lora_backward_workspace_bytes<T>(n, r_);
    if (s.workspace.size() * sizeof(Ws) < bytes) s.workspace.resize(bytes / sizeof(Ws) + 1);
    const auto pa = rankwise::detail::eigen_map(pool_->a());
    const auto pb = rankwise::detail::eigen_map(pool_->b());
    for (std::int64_t i = 0; i < q; ++i) s.a.row(i) = pa.row(list_a_[i]);
    for (std::int64_t i = 0; i < q; ++i) s.bt.row(i) = pb.row(list_b_[i]);
    return s;
  }
  MatrixView<const T> a(const Shared& s) const {
    return host_view(s.a.data(), r_, pool_->config().d_in);
  }
  MatrixView<const T> bt(const Shared& s) const {
    return host_view(s.bt.data(), r_, pool_->config().d_out);
  }

  Pool* pool_;
  CpuContext ctx_;
  std::int64_t r_;
  double scale_;
  std::vector<std::int32_t> list_a_, list_b_;
};

}  // namespace proto
// ============================ end of PROTOTYPE ================================

// The prototype's stack on the model's pool and index lists, built on first use.
std::vector<std::unique_ptr<proto::ProtoAssembled>>& proto_layers(Model& m) {
  static std::map<std::int64_t, std::vector<std::unique_ptr<proto::ProtoAssembled>>> stacks;
  auto& layers = stacks[m.d];
  if (layers.empty()) {
    for (std::int64_t i = 0; i < rm::kLayers; ++i) {
      layers.push_back(std::make_unique<proto::ProtoAssembled>(
          m.pool, rm::mos_config(),
          rankwise::draw_shard_indices(m.pool.config(), rm::mos_config(), i)));
    }
    m.warm_up(layers);
  }
  return layers;
}

// Registers mos_proto_asm next to the library's paths (register_suite's extra).
struct ProtoBenchmarks {
  template <class Reg>
  void operator()(Reg& reg, Mode mode, std::int64_t d, std::int64_t n) const {
    const rm::Flavor& f = reg.flavor();
    reg.add("mos_proto_asm", mode, d, n, [f, mode, d, n](benchmark::State& state) {
      Model& m = rm::model<T, CpuBackend>(d);
      rm::time_passes(state, f, m, proto_layers(m), true, mode, n);
    });
  }
};

// ---- prototype check: same results as the library's assembled path -------------

// Max |a - b| / max |b| over y, dx and both pool gradients, on a small stack:
// the prototype against the library's Mos on kAssembled.
double proto_deviation(std::int64_t n) {
  const std::int64_t d = 256;
  CpuContext ctx;
  rankwise::ShardPoolConfig pc = rm::pool_config(d);
  pc.num_layers = 4;
  Pool pool(ctx, pc);
  pool.init(3);
  Kern::fill_uniform(ctx, pool.b(), -0.1, 0.1, 4);
  const Mat x = random_matrix(n, d, 5, -1, 1), dy = random_matrix(n, d, 6, -1, 1);
  auto run = [&](auto& layer) {
    pool.zero_grad();
    Mat y = Mat::Zero(n, d), dx = Mat::Zero(n, d);
    layer.forward(host_view(x.data(), n, d), host_view(y.data(), n, d));
    layer.backward(host_view(x.data(), n, d), host_view(dy.data(), n, d),
                   host_view(dx.data(), n, d));
    const Mat ga = rankwise::detail::eigen_map(pool.grad_a());
    const Mat gb = rankwise::detail::eigen_map(pool.grad_b());
    return std::vector<Mat>{y, dx, ga, gb};
  };
  double worst = 0;
  for (std::int64_t layer = 0; layer < pc.num_layers; ++layer) {
    Mos lib(pool, layer, rm::mos_config(), ShardPath::kAssembled);
    proto::ProtoAssembled pr(pool, rm::mos_config(), lib.indices());
    const auto a = run(pr), b = run(lib);
    for (std::size_t i = 0; i < a.size(); ++i) {
      const double scale = std::max<double>(b[i].cwiseAbs().maxCoeff(), 1e-30);
      worst = std::max<double>(worst, (a[i] - b[i]).cwiseAbs().maxCoeff() / scale);
    }
  }
  return worst;
}

void print_proto_table(rb::RecordingReporter& rec, bool quick) {
  const std::int64_t d = rm::kDim;
  std::printf(
      "\nPROTOTYPE (bench_mos.cpp, namespace proto; not the library), %s per pass, "
      "d = %lld:\n",
      rm::clock_name(rec), static_cast<long long>(d));
  std::printf(
      "  proto_asm = kAssembled with a plain row copy into one scratch shared by all "
      "layers (no per-layer assembled buffers); kAuto = direct on the CPU\n");
  rb::Table table({"N", "mode", "lora", "direct", "assembled", "proto_asm", "|", "p_asm/asm",
                   "p_asm/dir", "p_asm/lr"});
  for (std::int64_t n : rm::token_counts(quick)) {
    for (Mode mode : {Mode::kFwd, Mode::kStep}) {
      const rb::Measurement* pa = rec.find(rm::key(kBackend, "mos_proto_asm", mode, d, n));
      if (pa == nullptr) continue;
      const rb::Measurement* lora = rec.find(rm::key(kBackend, "lora", mode, d, n));
      const rb::Measurement* dir = rec.find(rm::key(kBackend, "mos_direct", mode, d, n));
      const rb::Measurement* asm_ = rec.find(rm::key(kBackend, "mos_assembled", mode, d, n));
      table.row({std::to_string(n), rm::mode_name(mode), rb::format_time(lora),
                 rb::format_time(dir), rb::format_time(asm_), rb::format_time(pa), "",
                 rb::format_ratio(pa, asm_), rb::format_ratio(pa, dir),
                 rb::format_ratio(pa, lora)});
    }
  }
  table.print();
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  rm::Flavor flavor;
  flavor.backend = kBackend;
  flavor.single_run_from = 2048;  // a pass over 32 layers at N = 2048 takes seconds
  auto register_all = [&] { rm::register_suite<T, CpuBackend>(flavor, quick, ProtoBenchmarks{}); };
  auto header = [&] {
    std::printf("rankwise CPU MoS benchmark%s: %s, Eigen threads: %d\n", quick ? " (quick)" : "",
                rb::BenchBackend<CpuBackend>::describe().c_str(), Eigen::nbThreads());
    std::printf(
        "prototype check (N = 3 and 40, d = 256, 4 layers; y, dx, pool gradients): max "
        "relative deviation, mos_proto_asm vs kAssembled %.1e %.1e\n",
        proto_deviation(3), proto_deviation(40));
  };
  auto tables = [&](rb::RecordingReporter& rec) {
    rec.use_cpu_time(true);  // single-threaded: CPU time skips descheduled spans
    const rb::Tally tally =
        rm::print_tables(rec, kBackend, "CPU (Eigen, float)", "float", sizeof(T), quick,
                         rm::auto_path<CpuBackend, T>, {"mos_proto_asm", "lora"});
    print_proto_table(rec, quick);
    const auto busy = rec.preempted(0.9);
    if (!busy.empty()) {
      std::printf(
          "\nnote: %zu benchmark(s) got under 90%% of a core (machine busy), e.g. %s: "
          "the tables use CPU time, which leaves those spans out\n",
          busy.size(), busy.front().c_str());
    }
    rb::print_summary(rec, tally);
    return tally;
  };
  // Full runs: 3 repetitions, randomly interleaved (a burst of load spreads
  // over MoS and LoRA alike), medians in the tables; N = 2048 runs once.
  return rb::benchmark_main(argc, argv, quick, /*defaults=*/true, register_all, header, tables);
}
