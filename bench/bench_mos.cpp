// MoS (Mixture of Shards) benchmark, CPU (Eigen, float): a model-like stack of
// L = 32 layers of one projection type, d = 4096, one shard pool (v = 8, l = 2,
// p = 1) and 32 Mos layers of rank r = 16, against 32 dense Lora layers of the
// same active rank. Forward over the stack and forward + backward, for
// N in {1, 16, 256, 2048} on each ShardPath, then the ratio table, the
// parameter bytes, and a sweep (N = 1..256, d = 4096 and 1024) for the
// direct / assembled crossover that ShardPath::kAuto should follow.
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
// the spans a shared machine descheduled the process.
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
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <rankwise/rankwise.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "support/cpu_matrix.hpp"
#include "support/mos_model.hpp"
#include "support/mos_report.hpp"
#include "support/mos_sizes.hpp"
#include "support/report.hpp"
#include "support/sizes.hpp"

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

// ---- the stacks ---------------------------------------------------------------

// The model of support/mos_model.hpp plus the CPU-only prototype, on the same
// pool and the same index lists.
struct Model : rm::Model<T, CpuBackend> {
  using rm::Model<T, CpuBackend>::Model;

  std::vector<std::unique_ptr<proto::ProtoAssembled>>& proto_layers() {
    auto& layers = proto_;
    if (layers.empty()) {
      for (std::int64_t i = 0; i < rm::kLayers; ++i) {
        layers.push_back(std::make_unique<proto::ProtoAssembled>(
            pool, rm::mos_config(),
            rankwise::draw_shard_indices(pool.config(), rm::mos_config(), i)));
      }
      warm_up(layers);
    }
    return layers;
  }

 private:
  std::vector<std::unique_ptr<proto::ProtoAssembled>> proto_;
};

Model& model(std::int64_t d) {
  static std::map<std::int64_t, std::unique_ptr<Model>> models;
  auto& m = models[d];
  if (!m) m = std::make_unique<Model>(d);
  return *m;
}

// Activations x and upstream gradients dy (U(-1, 1)), outputs y and dx, per
// (N, d), built once (~0.2 GiB in all): the benchmarks run interleaved.
struct Io {
  std::int64_t n = -1, d = -1;
  Mat x, dy, y, dx;
};
Io& io(std::int64_t n, std::int64_t d) {
  static std::map<std::pair<std::int64_t, std::int64_t>, Io> cache;
  Io& slot = cache[{n, d}];
  if (slot.n != n || slot.d != d) {
    slot.x = random_matrix(n, d, 11, -1.0, 1.0);
    slot.dy = random_matrix(n, d, 12, -1.0, 1.0);
    slot.y = Mat::Zero(n, d);
    slot.dx = Mat::Zero(n, d);
    slot.n = n;
    slot.d = d;
  }
  return slot;
}

// One pass of `mode` over the stack: forward 0..L-1, backward L-1..0.
template <class Layers>
void pass(Layers& layers, Mode mode, Io& b) {
  const auto x = host_view<const T>(b.x.data(), b.n, b.d);
  const auto dy = host_view<const T>(b.dy.data(), b.n, b.d);
  if (mode != Mode::kBwd) {
    for (auto& l : layers) l->forward(x, host_view(b.y.data(), b.n, b.d));
  }
  if (mode != Mode::kFwd) {
    for (auto it = layers.rbegin(); it != layers.rend(); ++it) {
      (*it)->backward(x, dy, host_view(b.dx.data(), b.n, b.d));
    }
  }
}

void set_counters(benchmark::State& state, std::int64_t n) {
  state.counters["layers"] = static_cast<double>(rm::kLayers);
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Lora(benchmark::State& state, Mode mode, std::int64_t d, std::int64_t n) {
  Model& m = model(d);
  Io& b = io(n, d);
  for (auto _ : state) {
    pass(m.lora, mode, b);
    benchmark::ClobberMemory();
  }
  set_counters(state, n);
}

// Passes over layers that share the model's pool (a step zeroes its gradients).
template <class Layers>
void time_pool_layers(benchmark::State& state, Model& m, Layers& layers, Mode mode,
                      std::int64_t n) {
  Io& b = io(n, m.d);
  for (auto _ : state) {
    if (mode == Mode::kStep) m.pool.zero_grad();
    pass(layers, mode, b);
    benchmark::ClobberMemory();
  }
  set_counters(state, n);
}

void BM_Mos(benchmark::State& state, ShardPath path, Mode mode, std::int64_t d, std::int64_t n) {
  Model& m = model(d);
  time_pool_layers(state, m, m.mos(path), mode, n);
}

void BM_ProtoAssembled(benchmark::State& state, Mode mode, std::int64_t d, std::int64_t n) {
  Model& m = model(d);
  time_pool_layers(state, m, m.proto_layers(), mode, n);
}

void BM_ZeroGrad(benchmark::State& state, std::int64_t d) {
  Model& m = model(d);
  for (auto _ : state) {
    m.pool.zero_grad();
    benchmark::ClobberMemory();
  }
}

// ---- registration -------------------------------------------------------------

void register_all(bool quick) {
  // A pass over 32 layers at N = 2048 takes seconds (forward + backward: ~11
  // GFLOP of rank-16 GEMMs on one core): exactly one iteration, no estimation
  // run. Smaller N repeat up to min_time (one iteration whenever it exceeds it).
  const double min_time = quick ? 0.005 : 0.1;
  std::set<std::string> seen;  // the sweep repeats some of the main table's runs
  auto reg = [&](const std::string& name, std::int64_t n, auto fn, auto... args) {
    if (!seen.insert(name).second) return;
    auto* b = benchmark::RegisterBenchmark(name.c_str(), fn, args...);
    b->UseRealTime()->Unit(benchmark::kMillisecond);
    if (n >= 2048)
      b->Iterations(1)->Repetitions(1);
    else
      b->MinTime(min_time);
  };
  const std::int64_t d = rm::kDim;
  reg(rm::zero_grad_key(kBackend, d), 0, BM_ZeroGrad, d);
  // Main table: grouped by N, LoRA next to the MoS paths (similar machine load).
  for (std::int64_t n : rm::token_counts(quick)) {
    for (Mode mode : {Mode::kFwd, Mode::kStep}) {
      reg(rm::key(kBackend, "lora", mode, d, n), n, BM_Lora, mode, d, n);
      for (ShardPath p : {ShardPath::kDirect, ShardPath::kAssembled, ShardPath::kAuto}) {
        reg(rm::key(kBackend, rm::path_name(p), mode, d, n), n, BM_Mos, p, mode, d, n);
      }
      reg(rm::key(kBackend, "mos_proto_asm", mode, d, n), n, BM_ProtoAssembled, mode, d, n);
    }
  }
  // Crossover sweep: direct vs assembled (and the prototype), fwd and bwd.
  for (std::int64_t sd : rm::sweep_dims(quick)) {
    for (std::int64_t n : rm::sweep_counts(quick)) {
      for (Mode mode : {Mode::kFwd, Mode::kBwd}) {
        for (ShardPath p : {ShardPath::kDirect, ShardPath::kAssembled}) {
          reg(rm::key(kBackend, rm::path_name(p), mode, sd, n), n, BM_Mos, p, mode, sd, n);
        }
        reg(rm::key(kBackend, "mos_proto_asm", mode, sd, n), n, BM_ProtoAssembled, mode, sd, n);
        reg(rm::key(kBackend, "lora", mode, sd, n), n, BM_Lora, mode, sd, n);
      }
    }
  }
}

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

void print_proto_table(rm::Times& t, bool quick) {
  const std::int64_t d = rm::kDim;
  std::printf("\nPROTOTYPE (bench_mos.cpp, namespace proto; not the library), %s per pass, "
              "d = %lld:\n",
              t.clock(), static_cast<long long>(d));
  std::printf("  proto_asm = kAssembled with a plain row copy into one scratch shared by all "
              "layers (no per-layer assembled buffers); kAuto = direct on the CPU\n");
  std::printf("%5s %5s %10s %10s %10s %10s | %9s %9s %9s\n", "N", "mode", "lora", "direct",
              "assembled", "proto_asm", "p_asm/asm", "p_asm/dir", "p_asm/lr");
  for (std::int64_t n : rm::token_counts(quick)) {
    for (Mode mode : {Mode::kFwd, Mode::kStep}) {
      const rb::Measurement* pa = t(rm::key(kBackend, "mos_proto_asm", mode, d, n));
      if (pa == nullptr) continue;
      const rb::Measurement* lora = t(rm::key(kBackend, "lora", mode, d, n));
      const rb::Measurement* dir = t(rm::key(kBackend, "mos_direct", mode, d, n));
      const rb::Measurement* asm_ = t(rm::key(kBackend, "mos_assembled", mode, d, n));
      std::printf("%5lld %5s %10s %10s %10s %10s | %9s %9s %9s\n", static_cast<long long>(n),
                  rm::mode_name(mode), rb::format_time(lora).c_str(), rb::format_time(dir).c_str(),
                  rb::format_time(asm_).c_str(), rb::format_time(pa).c_str(),
                  rb::format_ratio(pa, asm_).c_str(), rb::format_ratio(pa, dir).c_str(),
                  rb::format_ratio(pa, lora).c_str());
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = rb::take_quick_flag(&argc, argv);
  const auto console = rb::console_options(argc, argv);
  register_all(quick);
  // Full runs: 3 repetitions, randomly interleaved (a burst of load spreads
  // over MoS and LoRA alike), medians in the tables; N = 2048 runs once.
  std::vector<char*> args;
  const auto arg_storage = rb::with_default_flags(argc, argv, quick, &args);
  int args_count = static_cast<int>(args.size()) - 1;
  benchmark::Initialize(&args_count, args.data());
  if (benchmark::ReportUnrecognizedArguments(args_count, args.data())) return 1;

  std::printf("rankwise CPU MoS benchmark%s: Eigen %d.%d.%d, SIMD: %s, Eigen threads: %d\n",
              quick ? " (quick)" : "", EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION,
              EIGEN_MINOR_VERSION, Eigen::SimdInstructionSetsInUse(), Eigen::nbThreads());
  std::printf(
      "prototype check (N = 3 and 40, d = 256, 4 layers; y, dx, pool gradients): max "
      "relative deviation, mos_proto_asm vs kAssembled %.1e %.1e\n",
      proto_deviation(3), proto_deviation(40));
  std::fflush(stdout);

  rb::RecordingReporter rec(console);
  benchmark::RunSpecifiedBenchmarks(&rec);
  std::fflush(stdout);

  const std::string title = "CPU (Eigen, float)";
  rm::Times times(rec, /*cpu_time=*/true);  // single-threaded: CPU time skips descheduled spans
  rm::print_parameter_bytes(rm::kDim, sizeof(T), "float");
  const rm::PathOf auto_path = rm::auto_path<CpuBackend, T>;
  const rb::Tally tally = rm::print_stack_table(times, kBackend, title, rm::kDim, quick, auto_path);
  for (std::int64_t d : rm::sweep_dims(quick)) {
    rm::print_crossover_table(times, kBackend, title, d, quick, auto_path,
                              {"mos_proto_asm", "lora"});
  }
  print_proto_table(times, quick);
  const auto busy = rec.preempted(0.9);
  if (!busy.empty()) {
    std::printf(
        "\nnote: %zu benchmark(s) got under 90%% of a core (machine busy), e.g. %s: "
        "the tables use CPU time, which leaves those spans out\n",
        busy.size(), busy.front().c_str());
  }
  rb::print_summary(rec, tally);
  benchmark::Shutdown();
  return 0;
}
