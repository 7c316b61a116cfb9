// Unit pools filled from PEFT adapter directories (io/pool_loader.hpp, issue 10
// item 4): the GPT-2 fixture into 36 pools, a pool's forward against the Lora
// layer the existing reader loads, unloading, the scale rules, and every bad
// input refused with its message and no pool changed.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <rankwise/io/peft_adapter.hpp>
#include <rankwise/io/pool_loader.hpp>
#include <rankwise/rankwise.hpp>
#include <string>
#include <utility>
#include <vector>

#include "support/temp_dir.hpp"

#ifndef RANKWISE_TEST_DATA_DIR
#error "RANKWISE_TEST_DATA_DIR must name tests/data"
#endif

namespace fs = std::filesystem;
namespace io = rankwise::io;
using Catch::Matchers::Contains;
using rankwise::AdapterId;
using rankwise::CpuBackend;
using rankwise::CpuContext;
using rankwise::ErrorCode;
using rankwise::host_view;

namespace {

using Pool = rankwise::UnitPool<float, CpuBackend>;
using Map = io::PoolMap<float, CpuBackend>;
using Loaded = io::PooledAdapter<float, CpuBackend>;

const fs::path kData = RANKWISE_TEST_DATA_DIR;
const std::string kGpt2 = (kData / "gpt2-lora-r8").string();
const fs::path kReal = kData / "real-adapters";

struct Failure {
  std::string message;
  ErrorCode code = ErrorCode::kInvalidArgument;
};

Failure failure_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const rankwise::error& e) {
    return {e.what(), e.code()};
  }
  return {"(no error)", ErrorCode::kInvalidArgument};
}

using rwtest::TempDir;

// One pool per module of `adapter`, of that module's shape.
struct PoolSet {
  std::vector<std::unique_ptr<Pool>> pools;
  Map map;
};

PoolSet pools_for(CpuContext& ctx, const io::PeftAdapter& adapter, std::int64_t capacity_units,
                  std::int64_t page_units = 8) {
  PoolSet s;
  for (const auto& m : adapter.modules) {
    rankwise::UnitPoolConfig c;
    c.d_in = m.d_in();
    c.d_out = m.d_out();
    c.capacity_units = capacity_units;
    c.page_units = page_units;
    c.max_adapters = 8;
    s.pools.push_back(std::make_unique<Pool>(ctx, c));
    s.map[m.name] = s.pools.back().get();
  }
  return s;
}

// (adapters, free units) of every pool: what a refused load must leave as it was.
std::vector<std::pair<std::int64_t, std::int64_t>> snapshot(const PoolSet& s) {
  std::vector<std::pair<std::int64_t, std::int64_t>> out;
  for (const auto& p : s.pools) out.emplace_back(p->adapters(), p->free_units());
  return out;
}

std::vector<float> as_floats(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

// B (d_out x r) as Bᵀ (r x d_out), in float.
std::vector<float> transposed_b(const io::LoraModule& m) {
  std::vector<float> bt(static_cast<std::size_t>(m.rank * m.d_out()));
  for (std::int64_t o = 0; o < m.d_out(); ++o) {
    for (std::int64_t i = 0; i < m.rank; ++i) {
      bt[i * m.d_out() + o] = static_cast<float>(m.b.values[o * m.rank + i]);
    }
  }
  return bt;
}

// The module as a Lora layer, through the reader's config and factors.
std::unique_ptr<rankwise::Lora<float, CpuBackend>> lora_of(CpuContext& ctx,
                                                           const io::PeftAdapter& adapter,
                                                           const io::LoraModule& m) {
  auto lora = std::make_unique<rankwise::Lora<float, CpuBackend>>(ctx, adapter.module_config(m));
  const std::vector<float> a = as_floats(m.a.values), b = as_floats(m.b.values);
  lora->set_a(host_view<const float>(a.data(), m.rank, m.d_in()));
  lora->set_b(host_view<const float>(b.data(), m.d_out(), m.rank));
  return lora;
}

std::vector<float> random_floats(std::size_t n, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> out(n);
  for (float& v : out) v = dist(gen);
  return out;
}

bool same_bits(const std::vector<float>& x, const std::vector<float>& y) {
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
}

// Every module's pool holds exactly the reader's factors, scale and rank.
void check_resident(const io::PeftAdapter& adapter, const Loaded& loaded) {
  for (const auto& m : adapter.modules) {
    INFO(m.name);
    const io::PooledModule<float, CpuBackend>& e = loaded.module(m.name);
    CHECK(e.rank == m.rank);
    CHECK(e.scale == m.scale);
    CHECK(e.pool->kind(e.id) == rankwise::AdapterKind::kLora);
    CHECK(e.pool->rank(e.id) == m.rank);
    CHECK(e.pool->scale(e.id) == m.scale);
    std::vector<float> a(static_cast<std::size_t>(m.rank * m.d_in()));
    std::vector<float> bt(static_cast<std::size_t>(m.rank * m.d_out()));
    e.pool->get_a(e.id, host_view(a.data(), m.rank, m.d_in()));
    e.pool->get_bt(e.id, host_view(bt.data(), m.rank, m.d_out()));
    CHECK(same_bits(a, as_floats(m.a.values)));
    CHECK(same_bits(bt, transposed_b(m)));
  }
}

// For every module and each batch size: a batch whose tokens all use the
// adapter gives, through the pool, the Lora layer's bits.
void check_forward_bits(CpuContext& ctx, const io::PeftAdapter& adapter, const Loaded& loaded) {
  for (const auto& m : adapter.modules) {
    INFO(m.name);
    const io::PooledModule<float, CpuBackend>& e = loaded.module(m.name);
    auto lora = lora_of(ctx, adapter, m);
    for (const std::int64_t n : {1, 4, 33}) {
      INFO("tokens " << n);
      const std::vector<float> x = random_floats(static_cast<std::size_t>(n * m.d_in()), 7);
      std::vector<float> y_pool(static_cast<std::size_t>(n * m.d_out()), 0.25f), y_lora = y_pool;
      const std::vector<AdapterId> ids(static_cast<std::size_t>(n), e.id);
      e.pool->forward(host_view<const AdapterId>(ids.data(), n, 1),
                      host_view<const float>(x.data(), n, m.d_in()),
                      host_view(y_pool.data(), n, m.d_out()));
      lora->forward(host_view<const float>(x.data(), n, m.d_in()),
                    host_view(y_lora.data(), n, m.d_out()));
      CHECK(same_bits(y_pool, y_lora));
    }
  }
}

}  // namespace

TEST_CASE("pool loader: the GPT-2 adapter into 36 pools, each forward the Lora layer's bits",
          "[pool_io]") {
  CpuContext ctx;
  const io::PeftAdapter adapter = io::read_peft_adapter(kGpt2);
  REQUIRE(adapter.modules.size() == 36);
  REQUIRE(adapter.fan_in_fan_out);
  PoolSet set = pools_for(ctx, adapter, 16);
  Loaded loaded = io::load_adapter_into_pools(ctx, kGpt2, set.map);
  CHECK(loaded.source == kGpt2);
  REQUIRE(loaded.modules.size() == 36);
  for (std::size_t i = 0; i < adapter.modules.size(); ++i) {
    CHECK(loaded.modules[i].module == adapter.modules[i].name);
    CHECK(loaded.modules[i].pool == set.map.at(adapter.modules[i].name));
    CHECK(loaded.modules[i].pool->adapters() == 1);
    CHECK(loaded.modules[i].pool->free_units() == 8);
  }
  // Conv1D (fan_in_fan_out): the factors are PEFT's (r x d_in), (d_out x r) as stored.
  const auto& c_attn = loaded.module("transformer.h.0.attn.c_attn");
  CHECK(c_attn.pool->d_in() == 768);
  CHECK(c_attn.pool->d_out() == 2304);
  CHECK(c_attn.scale == 4.0);
  check_resident(adapter, loaded);
  check_forward_bits(ctx, adapter, loaded);

  SECTION("a mixed batch: tokens without an adapter keep y, the others get the layer's delta") {
    const io::LoraModule& m = *adapter.find_module("transformer.h.5.mlp.c_proj");
    const io::PooledModule<float, CpuBackend>& e = loaded.module(m.name);
    auto lora = lora_of(ctx, adapter, m);
    const std::int64_t n = 9;
    const std::vector<float> x = random_floats(static_cast<std::size_t>(n * m.d_in()), 3);
    std::vector<AdapterId> ids(static_cast<std::size_t>(n), rankwise::kNoAdapter);
    for (std::int64_t t = 0; t < n; t += 2) ids[static_cast<std::size_t>(t)] = e.id;
    const std::vector<float> y0 = random_floats(static_cast<std::size_t>(n * m.d_out()), 4);
    std::vector<float> y = y0;
    e.pool->forward(host_view<const AdapterId>(ids.data(), 1, n),
                    host_view<const float>(x.data(), n, m.d_in()),
                    host_view(y.data(), n, m.d_out()));
    for (std::int64_t t = 0; t < n; ++t) {
      INFO("token " << t);
      std::vector<float> row(y0.begin() + t * m.d_out(), y0.begin() + (t + 1) * m.d_out());
      const std::vector<float> got(y.begin() + t * m.d_out(), y.begin() + (t + 1) * m.d_out());
      if (ids[static_cast<std::size_t>(t)] == rankwise::kNoAdapter) {
        CHECK(same_bits(got, row));
        continue;
      }
      lora->forward(host_view<const float>(x.data() + t * m.d_in(), 1, m.d_in()),
                    host_view(row.data(), 1, m.d_out()));
      float worst = 0.0f, largest = 0.0f;
      for (std::size_t j = 0; j < row.size(); ++j) {
        worst = std::max(worst, std::fabs(got[j] - row[j]));
        largest = std::max(largest, std::fabs(row[j]));
      }
      CHECK(worst <= 1e-5f * std::max(1.0f, largest));
    }
  }

  SECTION("unloading returns every unit; a second unload is refused and removes nothing") {
    std::vector<std::pair<Pool*, AdapterId>> ids;
    for (const auto& e : loaded.modules) ids.emplace_back(e.pool, e.id);
    Loaded copy = loaded;
    io::unload_adapter(loaded);
    CHECK(loaded.empty());
    for (const auto& p : set.pools) {
      CHECK(p->adapters() == 0);
      CHECK(p->free_units() == 16);
    }
    for (const auto& pi : ids) CHECK_FALSE(pi.first->contains(pi.second));
    const Failure twice = failure_of([&] { io::unload_adapter(copy); });
    CHECK_THAT(twice.message, Contains("unload_adapter: adapter \"" + kGpt2 +
                                       "\", module \"transformer.h.0.attn.c_attn\""));
    CHECK_THAT(twice.message, Contains("is no longer in its pool (removed already)"));
    // Loaded again, it takes the freed units under new ids.
    Loaded again = io::load_adapter_into_pools(ctx, kGpt2, set.map);
    for (std::size_t i = 0; i < again.modules.size(); ++i) {
      CHECK(again.modules[i].id != ids[i].second);
      CHECK(again.modules[i].pool->free_units() == 8);
    }
    check_resident(adapter, again);
  }

  SECTION("a second copy in the same pools gets its own ids and both serve") {
    Loaded second = io::load_adapter_into_pools(ctx, kGpt2, set.map);
    for (const auto& p : set.pools) {
      CHECK(p->adapters() == 2);
      CHECK(p->free_units() == 0);
    }
    check_resident(adapter, second);
    check_forward_bits(ctx, adapter, second);
    io::unload_adapter(second);
    check_forward_bits(ctx, adapter, loaded);
  }
}

TEST_CASE("pool loader: a BF16 OPT adapter of rank 16 spans two pages per module", "[pool_io]") {
  CpuContext ctx;
  const std::string dir = (kReal / "guilhermmeabreu__lab_08").string();
  const io::PeftAdapter adapter = io::read_peft_adapter(dir);
  REQUIRE(adapter.modules.size() == 24);
  REQUIRE(adapter.modules.front().a_dtype == io::DType::kBF16);
  PoolSet set = pools_for(ctx, adapter, 32);
  const Loaded loaded = io::load_adapter_into_pools(ctx, dir, set.map);
  REQUIRE(loaded.modules.size() == 24);
  for (const auto& e : loaded.modules) {
    CHECK(e.rank == 16);
    CHECK(e.scale == 2.0);
    CHECK(e.pool->free_units() == 16);
    CHECK(e.pool->runs(e.id).size() == 1);
  }
  check_resident(adapter, loaded);
  check_forward_bits(ctx, adapter, loaded);
}

TEST_CASE("pool loader: the scale comes from the config (rsLoRA, alpha_pattern)", "[pool_io]") {
  CpuContext ctx;
  io::PeftAdapter adapter = io::read_peft_adapter(kGpt2);
  adapter.modules.resize(2);  // transformer.h.0.attn.c_attn, transformer.h.0.attn.c_proj
  adapter.use_rslora = true;
  adapter.modules[0].scale = 32.0 / std::sqrt(8.0);
  adapter.modules[1].alpha = 12.0;
  adapter.modules[1].scale = 12.0 / std::sqrt(8.0);
  TempDir tmp;
  const std::string dir = (tmp / "rslora").string();
  io::write_peft_adapter(adapter, dir);

  PoolSet set = pools_for(ctx, adapter, 8);
  const Loaded from_dir = io::load_adapter_into_pools(ctx, dir, set.map);
  CHECK(from_dir.module(adapter.modules[0].name).scale == 32.0 / std::sqrt(8.0));
  CHECK(from_dir.module(adapter.modules[1].name).scale == 12.0 / std::sqrt(8.0));
  const io::PeftAdapter back = io::read_peft_adapter(dir);
  check_resident(back, from_dir);
  check_forward_bits(ctx, back, from_dir);

  // The same adapter from memory, labelled by the caller.
  PoolSet other = pools_for(ctx, adapter, 8);
  const Loaded from_memory = io::add_adapter_to_pools(ctx, adapter, "in-memory rsLoRA", other.map);
  CHECK(from_memory.source == "in-memory rsLoRA");
  check_resident(adapter, from_memory);
}

TEST_CASE("pool loader: every bad input is refused before any pool changes", "[pool_io]") {
  CpuContext ctx;
  const io::PeftAdapter adapter = io::read_peft_adapter(kGpt2);
  PoolSet set = pools_for(ctx, adapter, 8);
  const auto before = snapshot(set);
  const std::string at = "load_adapter_into_pools: adapter \"" + kGpt2 + "\"";

  // A pool of 8 units of 768 x 768: no module of GPT-2's adapter has that shape.
  rankwise::UnitPoolConfig square_config;
  square_config.d_in = square_config.d_out = 768;
  square_config.capacity_units = 8;

  SECTION("a module in the map that the adapter does not have") {
    Pool extra(ctx, square_config);
    Map map = set.map;
    map["transformer.h.0.attn.q_proj"] = &extra;
    const Failure f = failure_of([&] { io::load_adapter_into_pools(ctx, kGpt2, map); });
    CHECK_THAT(f.message, Contains(at + ": the module map names module "
                                        "\"transformer.h.0.attn.q_proj\", which the adapter "
                                        "does not have (its 36 modules: "
                                        "\"transformer.h.0.attn.c_attn\""));
    CHECK(extra.adapters() == 0);
  }

  SECTION("a module's shape differs from its pool's") {
    Pool square(ctx, square_config);
    Map map = set.map;
    map["transformer.h.3.attn.c_attn"] = &square;
    const Failure f = failure_of([&] { io::load_adapter_into_pools(ctx, kGpt2, map); });
    CHECK_THAT(f.message, Contains(at + ", module \"transformer.h.3.attn.c_attn\": lora_A (8 x "
                                        "768) (rank x d_in) and lora_B (2304 x 8) (d_out x rank) "
                                        "give d_in x d_out = 768 x 2304, but its pool is d_in x "
                                        "d_out = 768 x 768"));
    CHECK(square.adapters() == 0);

    // A pool sized from the Conv1D weight read as (d_out x d_in) is transposed.
    rankwise::UnitPoolConfig transposed_config = square_config;
    transposed_config.d_in = 2304;
    Pool transposed(ctx, transposed_config);
    map["transformer.h.3.attn.c_attn"] = &transposed;
    const Failure t = failure_of([&] { io::load_adapter_into_pools(ctx, kGpt2, map); });
    CHECK_THAT(t.message, Contains("but its pool is d_in x d_out = 2304 x 768 (transposed; "
                                   "fan_in_fan_out = true: the base model stores this weight as "
                                   "d_in x d_out, PEFT's factors are not transposed)"));
    CHECK(transposed.adapters() == 0);
  }

  SECTION("capacity short in the 20th module: no pool changes, the resident adapter is kept") {
    const io::LoraModule& twentieth = adapter.modules[19];
    Pool& full = *set.map.at(twentieth.name);
    const std::vector<float> a = random_floats(static_cast<std::size_t>(8 * full.d_in()), 1);
    const std::vector<float> bt = random_floats(static_cast<std::size_t>(8 * full.d_out()), 2);
    const AdapterId resident =
        full.add_lora(host_view<const float>(a.data(), 8, full.d_in()),
                      host_view<const float>(bt.data(), 8, full.d_out()), 0.5);
    const auto filled = snapshot(set);
    const Failure f = failure_of([&] { io::load_adapter_into_pools(ctx, kGpt2, set.map); });
    CHECK_THAT(f.message, Contains(at + ", module \"" + twentieth.name +
                                   "\" (rank 8) does not fit its pool (d_in x d_out = " +
                                   std::to_string(twentieth.d_in()) + " x " +
                                   std::to_string(twentieth.d_out()) +
                                   "): the adapter's modules mapped to that pool need 1 pages of "
                                   "8 units up to and including this one, but 0 of 1 pages are "
                                   "free (0 of 8 units)"));
    CHECK(snapshot(set) == filled);
    std::vector<float> a_back(a.size());
    full.get_a(resident, host_view(a_back.data(), 8, full.d_in()));
    CHECK(same_bits(a_back, a));
    full.remove(resident);
  }

  SECTION("two modules sharing one pool that holds only one of them") {
    Map map = set.map;
    map["transformer.h.1.attn.c_proj"] = map.at("transformer.h.0.attn.c_proj");
    const Failure f = failure_of([&] { io::load_adapter_into_pools(ctx, kGpt2, map); });
    CHECK_THAT(f.message, Contains(at + ", module \"transformer.h.1.attn.c_proj\" (rank 8) does "
                                        "not fit its pool (d_in x d_out = 768 x 768): the "
                                        "adapter's modules mapped to that pool need 2 pages"));
  }

  SECTION("too few adapter slots") {
    rankwise::UnitPoolConfig c;
    c.d_in = 768;
    c.d_out = 2304;
    c.capacity_units = 32;
    c.max_adapters = 1;
    Pool one_slot(ctx, c);
    const std::vector<float> a = random_floats(768 * 8, 1), bt = random_floats(2304 * 8, 2);
    one_slot.add_lora(host_view<const float>(a.data(), 8, 768),
                      host_view<const float>(bt.data(), 8, 2304), 1.0);
    Map map = set.map;
    map["transformer.h.7.attn.c_attn"] = &one_slot;
    const Failure f = failure_of([&] { io::load_adapter_into_pools(ctx, kGpt2, map); });
    CHECK_THAT(f.message, Contains(at + ", module \"transformer.h.7.attn.c_attn\" does not fit "
                                        "its pool (d_in x d_out = 768 x 2304): the adapter's "
                                        "modules mapped to that pool need 1 adapter slots up to "
                                        "and including this one, but 0 of 1 are free"));
    CHECK(one_slot.adapters() == 1);
  }

  SECTION("an adapter module the map leaves out, unless allowed") {
    Map map = set.map;
    map.erase("transformer.h.11.mlp.c_proj");
    const Failure f = failure_of([&] { io::load_adapter_into_pools(ctx, kGpt2, map); });
    CHECK_THAT(f.message, Contains(at + ": module \"transformer.h.11.mlp.c_proj\" is not in the "
                                        "module map (35 of the adapter's 36 modules are)"));
    CHECK(snapshot(set) == before);
    io::PoolLoadOptions options;
    options.allow_unmapped_modules = true;
    Loaded partial = io::load_adapter_into_pools(ctx, kGpt2, map, options);
    CHECK(partial.modules.size() == 35);
    CHECK(set.map.at("transformer.h.11.mlp.c_proj")->adapters() == 0);
    io::unload_adapter(partial);
  }

  SECTION("a null pool and an empty map") {
    Map map = set.map;
    map["transformer.h.2.mlp.c_proj"] = nullptr;
    CHECK_THAT(failure_of([&] { io::load_adapter_into_pools(ctx, kGpt2, map); }).message,
               Contains(at + ": the module map gives module \"transformer.h.2.mlp.c_proj\" a "
                             "null pool"));
    CHECK_THAT(failure_of([&] { io::load_adapter_into_pools(ctx, kGpt2, Map{}); }).message,
               Contains(at + ": the module map is empty"));
  }

  SECTION("an adapter built in memory with inconsistent or non-finite factors") {
    io::PeftAdapter bad = adapter;
    bad.modules[3].b.shape = {2304, 4};  // transformer.h.1.attn.c_attn
    CHECK_THAT(failure_of([&] { io::add_adapter_to_pools(ctx, bad, "mine", set.map); }).message,
               Contains("adapter \"mine\", module \"" + adapter.modules[3].name +
                        "\": lora_A (8 x 768) and lora_B (2304 x 4) are not (rank x d_in) and "
                        "(d_out x rank) for rank 8"));
    bad = adapter;
    bad.modules[6].a.values[10] = std::nan("");
    const Failure f = failure_of([&] { io::add_adapter_to_pools(ctx, bad, "mine", set.map); });
    CHECK_THAT(f.message, Contains("adapter \"mine\", module \"" + adapter.modules[6].name +
                                   "\": tensor \"base_model.model." + adapter.modules[6].name +
                                   ".lora_A.weight\" holds 1 non-finite values (NaN or "
                                   "infinity) of 6144; refusing to serve it"));
    CHECK(f.code == ErrorCode::kIo);
  }

  CHECK(snapshot(set) == before);
}

TEST_CASE("pool loader: broken adapter directories are refused with the reader's reason",
          "[pool_io][real]") {
  CpuContext ctx;
  const io::PeftAdapter gpt2 = io::read_peft_adapter(kGpt2);
  PoolSet set = pools_for(ctx, gpt2, 8);
  const auto before = snapshot(set);

  // LoRA on PEFT's modules_to_save wrapper.
  const std::string wrapper = (kReal / "Kuntya__Udacity").string();
  Failure f = failure_of([&] { io::load_adapter_into_pools(ctx, wrapper, set.map); });
  CHECK_THAT(f.message, Contains(wrapper));
  CHECK_THAT(f.message, Contains("tensor \"base_model.model.classifier.modules_to_save.lora_A."
                                 "weight\" is a LoRA placed on PEFT's modules_to_save wrapper"));
  CHECK(f.code == ErrorCode::kIo);

  // A truncated safetensors file.
  const std::string truncated = (kReal / "yongshuaiy__LLMs-final").string();
  f = failure_of([&] { io::load_adapter_into_pools(ctx, truncated, set.map); });
  CHECK_THAT(f.message, Contains(truncated + "/adapter_model.safetensors"));
  CHECK_THAT(f.message, Contains("truncated"));
  CHECK(f.code == ErrorCode::kIo);

  // No adapter there at all.
  const std::string missing = (kData / "no-such-adapter").string();
  f = failure_of([&] { io::load_adapter_into_pools(ctx, missing, set.map); });
  CHECK_THAT(f.message, Contains("\"" + missing +
                                 "/adapter_config.json\": missing or not a "
                                 "regular file"));
  CHECK(snapshot(set) == before);

  // Well formed but every value NaN: read, then refused by the loader.
  {
    const std::string nan_dir = (kData / "gemma-2b-lora-nan").string();
    const io::PeftAdapter nan = io::read_peft_adapter(nan_dir);
    PoolSet gemma = pools_for(ctx, nan, 16);
    const auto gemma_before = snapshot(gemma);
    f = failure_of([&] { io::load_adapter_into_pools(ctx, nan_dir, gemma.map); });
    CHECK_THAT(f.message, Contains("load_adapter_into_pools: adapter \"" + nan_dir +
                                   "\", module \"model.layers.0.self_attn.q_proj\": tensor "
                                   "\"base_model.model.model.layers.0.self_attn.q_proj.lora_A."
                                   "weight\" holds 32768 non-finite values (NaN or infinity) of "
                                   "32768; refusing to serve it"));
    CHECK(f.code == ErrorCode::kIo);
    CHECK(snapshot(gemma) == gemma_before);
  }

  // modules_to_save (a classifier head) cannot live in a pool: refused unless skipped.
  {
    const std::string cls =
        (kReal / "dayanidhi04__emotion-classification-distilbert-lora").string();
    const io::PeftAdapter head = io::read_peft_adapter(cls);
    PoolSet distil = pools_for(ctx, head, 8);
    f = failure_of([&] { io::load_adapter_into_pools(ctx, cls, distil.map); });
    CHECK_THAT(f.message, Contains("load_adapter_into_pools: adapter \"" + cls +
                                   "\": holds 4 "
                                   "modules_to_save tensors (first \"base_model.model.classifier."
                                   "bias\")"));
    CHECK_THAT(f.message, Contains("PoolLoadOptions.allow_saved_modules"));
    for (const auto& p : distil.pools) CHECK(p->adapters() == 0);
    io::PoolLoadOptions options;
    options.allow_saved_modules = true;
    const Loaded loaded = io::load_adapter_into_pools(ctx, cls, distil.map, options);
    CHECK(loaded.modules.size() == 12);
    check_resident(head, loaded);
  }
}
