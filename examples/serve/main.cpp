// serve: many adapters of one base model in every batch. The 36 modules of a
// GPT-2 LoRA adapter (tests/data/gpt2-lora-r8) each get a UnitPool holding six
// adapters of that base; a stream of batches, every token naming its own
// adapter (or none), runs through all 36 pools, and each token's output is
// checked against its adapter's own layer applied to it alone. It prints the
// throughput of the pools and of the per-adapter loop they replace.
//
// The adapters, all derived from the one published adapter:
//   lora-r8   the adapter itself, loaded from its directory (io/pool_loader.hpp)
//   svd-r2    its best rank-2 approximation, per module (merge_svd)
//   svd-r4    its best rank-4 approximation
//   lego-r6   LoRA-LEGO merge (merge/lego.hpp) of lora-r8 and svd-r4, weights
//             1/2 each, into 6 units; the pool holds the gates folded into the
//             factors, its own layer is the gated Lego layer
//   smora-r8  SMoRA over the adapter's 8 rank units as 8 experts, top-4 per
//             token, alpha 16 (so alpha / k = 4, the LoRA's alpha / r), an
//             untrained random router (Smora::init's U(±1/sqrt(d_in))) and
//             zero balance bias: it routes, but learned nothing
//   mos-r8    MoS (rank 8, 2 shards per vector, 1 private rank): per module
//             type (attn.c_attn, attn.c_proj, mlp.c_proj) one shard pool
//             filled with the 12 layers' own A rows and B columns cut in
//             halves, in order; each layer draws its shards from that pool
//             by seed as MoS does. Recombined real factors, not a trained MoS
//             and not an approximation of the LoRA.
// Inputs are random (uniform in [-1, 1]), one per module per batch: the base
// model is not run, only the adapters' deltas.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <rankwise/io/peft_adapter.hpp>
#include <rankwise/io/pool_loader.hpp>
#include <rankwise/merge/peft_merge.hpp>
#include <rankwise/rankwise.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifndef RANKWISE_SERVE_ADAPTER_DIR
#error "RANKWISE_SERVE_ADAPTER_DIR must name tests/data/gpt2-lora-r8"
#endif

namespace {

using rankwise::AdapterId;
using rankwise::CpuBackend;
using rankwise::CpuContext;
using rankwise::MatrixView;
using Pool = rankwise::UnitPool<float, CpuBackend>;
using Kernels = rankwise::Kernels<CpuBackend, float>;
using Layer = std::function<void(MatrixView<const float>, MatrixView<float>)>;
namespace io = rankwise::io;
namespace merge = rankwise::merge;

// A token's output may differ from its own layer's by this much, relative to
// the largest |value| of that layer's output for the token (at least 1e-3).
// Plain LoRA adapters give the same bits (the pool runs the same products on
// the same rows), and so does SMoRA (the same router on the same rows picks
// the same ranks). The others differ by float rounding only: the pool holds
// LEGO's gates folded into its factors (√g rounded into a and b) where the
// Lego layer applies them to its unit outputs, seen up to 2e-5; and MoS
// assembled once where the Mos layer reads its shards in place, up to 3e-6.
constexpr double kTolerance = 1e-4;

struct Options {
  int batches = 200;
  int tokens = 64;
  int threads = 1;
  std::uint64_t seed = 1;
  std::string adapter = RANKWISE_SERVE_ADAPTER_DIR;
};

const char* const kUsage =
    "usage: serve [--batches N] [--tokens N] [--threads N] [--seed S] [--adapter DIR]\n"
    "  --batches N   batches in the stream (default 200)\n"
    "  --tokens N    tokens per batch (default 64)\n"
    "  --threads N   CPU threads of the context (default 1)\n"
    "  --seed S      seed of the derived adapters and the stream (default 1)\n"
    "  --adapter DIR a GPT-2 PEFT LoRA adapter (default tests/data/gpt2-lora-r8)\n";

long parse_int(const std::string& flag, const char* value, long lo, long hi) {
  char* end = nullptr;
  const long v = std::strtol(value, &end, 10);
  if (end == value || *end != '\0' || v < lo || v > hi) {
    throw std::invalid_argument(flag + " must be an integer in [" + std::to_string(lo) + ", " +
                                std::to_string(hi) + "], got \"" + value + "\"");
  }
  return v;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::invalid_argument(flag + " needs a value (or unknown flag)");
    const char* value = argv[++i];
    if (flag == "--batches") {
      o.batches = static_cast<int>(parse_int(flag, value, 1, 1000000));
    } else if (flag == "--tokens") {
      o.tokens = static_cast<int>(parse_int(flag, value, 1, 65536));
    } else if (flag == "--threads") {
      o.threads = static_cast<int>(parse_int(flag, value, 1, 64));
    } else if (flag == "--seed") {
      o.seed = static_cast<std::uint64_t>(parse_int(flag, value, 0, 1L << 30));
    } else if (flag == "--adapter") {
      o.adapter = value;
    } else {
      throw std::invalid_argument("unknown flag " + flag);
    }
  }
  return o;
}

// "transformer.h.7.mlp.c_proj" -> ("transformer.h.*.mlp.c_proj", 7): the
// module type a MoS shard pool is shared by, and the layer number.
std::pair<std::string, long> type_and_layer(const std::string& name) {
  std::size_t begin = 0;
  while (begin < name.size()) {
    const std::size_t end = std::min(name.find('.', begin), name.size());
    const std::string part = name.substr(begin, end - begin);
    if (!part.empty() && part.find_first_not_of("0123456789") == std::string::npos) {
      return {name.substr(0, begin) + "*" + name.substr(end), std::stol(part)};
    }
    begin = end + 1;
  }
  throw std::invalid_argument("module \"" + name + "\" has no layer number in its path");
}

struct AdapterInfo {
  std::string name;
  std::string what;
};

// One adapted module: its pool, each adapter's id there and own layer.
struct Module {
  std::string name;
  std::int64_t d_in = 0, d_out = 0;
  std::unique_ptr<Pool> pool;
  std::vector<AdapterId> ids;  // by adapter index
  std::vector<Layer> own;      // by adapter index
  std::vector<float> x, y_pool, y_own;
};

template <class Layers, class... Args>
auto& keep(Layers& layers, Args&&... args) {
  layers.push_back(
      std::make_unique<typename Layers::value_type::element_type>(std::forward<Args>(args)...));
  return *layers.back();
}

// The own layer of a plain LoRA module, from the factors a reader gives.
Layer lora_layer(CpuContext& ctx, const io::PeftAdapter& adapter, const io::LoraModule& m,
                 std::vector<std::unique_ptr<rankwise::Lora<float, CpuBackend>>>& keep_in) {
  auto& lora = keep(keep_in, ctx, adapter.module_config(m));
  Kernels::upload_doubles(ctx, m.a.values.data(), lora.a());
  std::vector<double> bt(m.b.values.size());
  for (std::int64_t o = 0; o < m.d_out(); ++o) {
    for (std::int64_t i = 0; i < m.rank; ++i) bt[i * m.d_out() + o] = m.b.values[o * m.rank + i];
  }
  Kernels::upload_doubles(ctx, bt.data(), lora.bt());
  return [&lora](MatrixView<const float> x, MatrixView<float> y) { lora.forward(x, y); };
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int run(const Options& opt) {
  using rankwise::host_view;
  CpuContext ctx(opt.threads);
  const io::PeftAdapter base = io::read_peft_adapter(opt.adapter);
  const std::size_t n_modules = base.modules.size();
  std::vector<AdapterInfo> adapters = {
      {"lora-r8", "the adapter, from its directory"},
      {"svd-r2", "best rank-2 approximation"},
      {"svd-r4", "best rank-4 approximation"},
      {"lego-r6", "LoRA-LEGO of lora-r8 + svd-r4 (1/2 each), 6 units"},
      {"smora-r8", "SMoRA: 8 rank experts, top-4, random router"},
      {"mos-r8", "MoS: shards from the adapter's own factors"}};
  const std::size_t n_adapters = adapters.size();

  // One pool per module: one page of 8 units per adapter (the largest rank is 8).
  std::vector<Module> modules(n_modules);
  io::PoolMap<float, CpuBackend> map;
  for (std::size_t i = 0; i < n_modules; ++i) {
    const io::LoraModule& m = base.modules[i];
    Module& mod = modules[i];
    mod.name = m.name;
    mod.d_in = m.d_in();
    mod.d_out = m.d_out();
    rankwise::UnitPoolConfig pc;
    pc.d_in = mod.d_in;
    pc.d_out = mod.d_out;
    pc.page_units = 8;
    pc.capacity_units = 8 * static_cast<std::int64_t>(n_adapters);
    pc.max_adapters = 8;
    mod.pool = std::make_unique<Pool>(ctx, pc);
    mod.ids.resize(n_adapters, rankwise::kNoAdapter);
    mod.own.resize(n_adapters);
    map[m.name] = mod.pool.get();
  }

  std::vector<std::unique_ptr<rankwise::Lora<float, CpuBackend>>> loras;
  std::vector<std::unique_ptr<rankwise::Lego<float, CpuBackend>>> legos;
  std::vector<std::unique_ptr<rankwise::Smora<float, CpuBackend>>> smoras;
  std::vector<std::unique_ptr<rankwise::ShardPool<float, CpuBackend>>> shard_pools;
  std::vector<std::unique_ptr<rankwise::Mos<float, CpuBackend>>> mos_layers;
  const auto t_setup = std::chrono::steady_clock::now();

  // lora-r8, svd-r2, svd-r4, lego-r6: plain LoRA adapters through the loader.
  std::vector<io::PooledAdapter<float, CpuBackend>> loaded;
  loaded.push_back(io::load_adapter_into_pools(ctx, opt.adapter, map));
  std::vector<std::string> names;
  std::vector<merge::MergeInput> inputs;
  merge::collect_modules({base}, {}, names, inputs, {opt.adapter});
  std::vector<std::vector<merge::ModuleMerge>> svd;
  for (const std::int64_t k : {2, 4}) {
    merge::MergeOptions mo;
    mo.method = merge::MergeMethod::kSvd;
    mo.rank = k;
    mo.threads = 1;
    svd.push_back(merge::merge_modules(names, inputs, mo));
    loaded.push_back(io::add_adapter_to_pools(ctx, merge::to_peft_adapter(svd.back(), base),
                                              "svd rank " + std::to_string(k), map));
  }
  std::vector<merge::ModuleMerge> lego_folded(n_modules);
  std::vector<merge::LegoResult> lego(n_modules);
  for (std::size_t i = 0; i < n_modules; ++i) {
    merge::MergeInput in;
    in.sources = {inputs[i].sources.front(), svd[1][i].merged};
    in.weights = {0.5, 0.5};
    merge::LegoOptions lo;
    lo.rank = 6;
    lo.kmeans.seed = opt.seed;
    lego[i] = merge::lego_merge(in, lo, names[i]);
    lego_folded[i].name = names[i];
    lego_folded[i].merged = lego[i].folded();
  }
  loaded.push_back(
      io::add_adapter_to_pools(ctx, merge::to_peft_adapter(lego_folded, base), "lego rank 6", map));
  const io::PeftAdapter svd2 = merge::to_peft_adapter(svd[0], base);
  const io::PeftAdapter svd4 = merge::to_peft_adapter(svd[1], base);
  for (std::size_t i = 0; i < n_modules; ++i) {
    Module& mod = modules[i];
    for (std::size_t a = 0; a < 4; ++a) mod.ids[a] = loaded[a].modules[i].id;
    mod.own[0] = lora_layer(ctx, base, base.modules[i], loras);
    mod.own[1] = lora_layer(ctx, svd2, svd2.modules[i], loras);
    mod.own[2] = lora_layer(ctx, svd4, svd4.modules[i], loras);
    auto& lg = keep(legos, ctx, mod.d_in, mod.d_out, std::int64_t{6});
    lg.load_state(lego[i].to_tensors());
    mod.own[3] = [&lg](MatrixView<const float> x, MatrixView<float> y) { lg.forward(x, y); };
  }

  // smora-r8: the adapter's units as rank experts, routed by a random router.
  for (std::size_t i = 0; i < n_modules; ++i) {
    Module& mod = modules[i];
    rankwise::SmoraConfig sc;
    sc.d_in = mod.d_in;
    sc.d_out = mod.d_out;
    sc.router.num_units = 8;
    sc.router.top_k = 4;
    sc.alpha = 16.0;
    auto& s = keep(smoras, ctx, sc);
    s.init(rankwise::substream(opt.seed, 100 + i));
    rankwise::TensorMap state = s.state();
    state["lora_A"] = base.modules[i].a;
    state["lora_B"] = base.modules[i].b;
    s.load_state(state);
    mod.ids[4] = mod.pool->add(s);
    mod.own[4] = [&s](MatrixView<const float> x, MatrixView<float> y) {
      s.forward(x, y, rankwise::Mode::kInference);
    };
  }

  // mos-r8: per module type, a shard pool of the layers' own factor halves.
  std::map<std::string, std::vector<std::pair<long, std::size_t>>> types;  // (layer, module)
  for (std::size_t i = 0; i < n_modules; ++i) {
    const auto tl = type_and_layer(modules[i].name);
    types[tl.first].emplace_back(tl.second, i);
  }
  for (auto& type : types) {
    auto& layers = type.second;
    std::sort(layers.begin(), layers.end());
    const io::LoraModule& first = base.modules[layers.front().second];
    rankwise::ShardPoolConfig spc;
    spc.d_in = first.d_in();
    spc.d_out = first.d_out();
    spc.num_layers = static_cast<std::int64_t>(layers.size());
    spc.equivalent_rank = 8;
    spc.private_rank = 1;
    spc.shards_per_vector = 2;
    auto& sp = keep(shard_pools, ctx, spc);
    const std::int64_t l = spc.shards_per_vector, si = spc.shard_in(), so = spc.shard_out();
    std::vector<double> a(static_cast<std::size_t>(spc.num_shards() * si));
    std::vector<double> b(static_cast<std::size_t>(spc.num_shards() * so));
    std::int64_t shard = 0;
    for (const auto& layer : layers) {
      const io::LoraModule& m = base.modules[layer.second];
      for (std::int64_t u = 0; u < m.rank && shard < spc.num_shards(); ++u) {
        for (std::int64_t h = 0; h < l && shard < spc.num_shards(); ++h, ++shard) {
          for (std::int64_t c = 0; c < si; ++c)
            a[shard * si + c] = m.a.values[u * m.d_in() + h * si + c];
          for (std::int64_t o = 0; o < so; ++o)
            b[shard * so + o] = m.b.values[(h * so + o) * m.rank + u];
        }
      }
    }
    Kernels::upload_doubles(ctx, a.data(), sp.a());
    Kernels::upload_doubles(ctx, b.data(), sp.b());
    rankwise::MosConfig mc;
    mc.rank = 8;
    mc.alpha = 32.0;
    mc.seed = opt.seed;
    for (std::size_t li = 0; li < layers.size(); ++li) {
      Module& mod = modules[layers[li].second];
      auto& mos = keep(mos_layers, sp, static_cast<std::int64_t>(li), mc);
      mod.ids[5] = mod.pool->add(mos);
      mod.own[5] = [&mos](MatrixView<const float> x, MatrixView<float> y) { mos.forward(x, y); };
    }
  }
  std::printf("serve: %zu modules of %s, %zu adapters per pool, set up in %.2f s\n", n_modules,
              opt.adapter.c_str(), n_adapters, seconds_since(t_setup));
  double svd_error[2] = {0.0, 0.0};
  for (int k = 0; k < 2; ++k) {
    for (const auto& m : svd[k]) svd_error[k] += m.quality.relative_error / double(n_modules);
  }
  for (std::size_t a = 0; a < n_adapters; ++a) {
    const Module& m0 = modules.front();
    std::printf("  %zu %-9s %-6s rank %lld  %s", a, adapters[a].name.c_str(),
                rankwise::to_string(m0.pool->kind(m0.ids[a])),
                static_cast<long long>(m0.pool->rank(m0.ids[a])), adapters[a].what.c_str());
    if (a == 1 || a == 2) std::printf(" (mean relative error vs lora-r8 %.3f)", svd_error[a - 1]);
    std::printf("\n");
  }

  // The stream: every token draws an adapter or none (kNoAdapter), uniformly.
  std::mt19937_64 gen(opt.seed);
  std::uniform_int_distribution<int> pick(-1, static_cast<int>(n_adapters) - 1);
  const std::int64_t n = opt.tokens;
  std::vector<int> choice(static_cast<std::size_t>(n));
  std::vector<std::int64_t> rows;
  std::vector<float> xa, ya;
  double pool_s = 0.0, own_s = 0.0;
  std::vector<double> worst(n_adapters, 0.0);
  long failures = 0;
  std::int64_t routed = 0;
  for (Module& mod : modules) {
    mod.x.resize(static_cast<std::size_t>(n * mod.d_in));
    mod.y_pool.resize(static_cast<std::size_t>(n * mod.d_out));
    mod.y_own.resize(mod.y_pool.size());
    if (mod.ids != modules.front().ids) {
      throw std::runtime_error("module " + mod.name + " holds the adapters under other ids");
    }
  }
  std::vector<AdapterId> token_ids(static_cast<std::size_t>(n));
  rankwise::PoolPlan<CpuBackend> plan;
  const int report_every = std::max(1, opt.batches / 10);
  for (int batch = 0; batch < opt.batches; ++batch) {
    for (int& c : choice) c = pick(gen);
    for (std::size_t i = 0; i < n_modules; ++i) {
      Module& mod = modules[i];
      Kernels::fill_uniform(ctx, host_view(mod.x.data(), n, mod.d_in), -1.0, 1.0,
                            rankwise::substream(opt.seed, (std::uint64_t(batch) << 8) + i));
      std::fill(mod.y_pool.begin(), mod.y_pool.end(), 0.0f);
      std::fill(mod.y_own.begin(), mod.y_own.end(), 0.0f);
    }
    for (const int c : choice) routed += c >= 0;

    // The pools: one plan for the batch (every module's pool holds the
    // adapters under the same ids and units), one forward per module.
    auto t0 = std::chrono::steady_clock::now();
    for (std::int64_t t = 0; t < n; ++t) {
      const int c = choice[static_cast<std::size_t>(t)];
      token_ids[static_cast<std::size_t>(t)] =
          c < 0 ? rankwise::kNoAdapter : modules.front().ids[static_cast<std::size_t>(c)];
    }
    modules.front().pool->plan(host_view<const AdapterId>(token_ids.data(), n, 1), plan);
    for (Module& mod : modules) {
      mod.pool->forward(plan, host_view<const float>(mod.x.data(), n, mod.d_in),
                        host_view(mod.y_pool.data(), n, mod.d_out));
    }
    pool_s += seconds_since(t0);

    // What the pools replace: per module, each adapter's tokens gathered,
    // run through its own layer, and scattered back.
    t0 = std::chrono::steady_clock::now();
    for (Module& mod : modules) {
      for (std::size_t a = 0; a < n_adapters; ++a) {
        rows.clear();
        for (std::int64_t t = 0; t < n; ++t) {
          if (choice[static_cast<std::size_t>(t)] == static_cast<int>(a)) rows.push_back(t);
        }
        if (rows.empty()) continue;
        const std::int64_t m = static_cast<std::int64_t>(rows.size());
        xa.resize(static_cast<std::size_t>(m * mod.d_in));
        ya.assign(static_cast<std::size_t>(m * mod.d_out), 0.0f);
        for (std::int64_t r = 0; r < m; ++r) {
          std::copy_n(mod.x.data() + rows[r] * mod.d_in, mod.d_in, xa.data() + r * mod.d_in);
        }
        mod.own[a](host_view<const float>(xa.data(), m, mod.d_in),
                   host_view(ya.data(), m, mod.d_out));
        for (std::int64_t r = 0; r < m; ++r) {
          std::copy_n(ya.data() + r * mod.d_out, mod.d_out, mod.y_own.data() + rows[r] * mod.d_out);
        }
      }
    }
    own_s += seconds_since(t0);

    for (const Module& mod : modules) {
      for (std::int64_t t = 0; t < n; ++t) {
        const int c = choice[static_cast<std::size_t>(t)];
        const float* p = mod.y_pool.data() + t * mod.d_out;
        const float* q = mod.y_own.data() + t * mod.d_out;
        double diff = 0.0, largest = 0.0;
        for (std::int64_t j = 0; j < mod.d_out; ++j) {
          diff = std::max(diff, std::fabs(double(p[j]) - double(q[j])));
          largest = std::max(largest, std::fabs(double(q[j])));
        }
        // A token without an adapter must come out exactly as it went in (zero).
        const double err = c < 0 ? diff : diff / std::max(largest, 1e-3);
        if (c >= 0)
          worst[static_cast<std::size_t>(c)] = std::max(worst[static_cast<std::size_t>(c)], err);
        if ((c < 0 && err != 0.0) || err > kTolerance) {
          if (failures++ < 5) {
            std::printf(
                "MISMATCH batch %d token %lld module %s adapter %s: max |diff| %.3g, "
                "relative %.3g\n",
                batch, static_cast<long long>(t), mod.name.c_str(),
                c < 0 ? "none" : adapters[static_cast<std::size_t>(c)].name.c_str(), diff, err);
          }
        }
      }
    }
    if ((batch + 1) % report_every == 0 || batch + 1 == opt.batches) {
      const double tokens = double(batch + 1) * double(n);
      std::printf(
          "batch %d/%d: pool %.0f tokens/s, per-adapter loop %.0f tokens/s, %ld "
          "mismatches\n",
          batch + 1, opt.batches, tokens / pool_s, tokens / own_s, failures);
      std::fflush(stdout);
    }
  }

  const double tokens = double(opt.batches) * double(n);
  std::printf("\n%d batches x %d tokens (%.0f%% with an adapter), %zu modules, %d thread(s):\n",
              opt.batches, opt.tokens, 100.0 * double(routed) / tokens, n_modules, opt.threads);
  std::printf("  pool              %10.0f tokens/s  (%.3f s)\n", tokens / pool_s, pool_s);
  std::printf("  per-adapter loop  %10.0f tokens/s  (%.3f s)  pool / loop = %.2fx\n",
              tokens / own_s, own_s, own_s / pool_s);
  std::printf("  largest relative difference to the own layer (tolerance %.0e):\n", kTolerance);
  for (std::size_t a = 0; a < n_adapters; ++a) {
    std::printf("    %-9s %.3g\n", adapters[a].name.c_str(), worst[a]);
  }

  // Unloading returns every unit of the loaded adapters to the pools.
  const std::int64_t free_before = modules.front().pool->free_units();
  for (auto& l : loaded) io::unload_adapter(l);
  std::printf("unloaded the 4 loaded adapters: %s has %lld free units, was %lld\n",
              modules.front().name.c_str(),
              static_cast<long long>(modules.front().pool->free_units()),
              static_cast<long long>(free_before));
  if (failures > 0) {
    std::printf("FAILED: %ld token outputs outside the tolerance\n", failures);
    return 1;
  }
  std::printf("OK: every token matched its own adapter's layer\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "serve: %s\n%s", e.what(), kUsage);
    return 2;
  }
  try {
    return run(opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "serve: %s\n", e.what());
    return 1;
  }
}
