// Adapter files for every layer (issue 12): SMoRA directories in the reference layout, MoS
// directories and their PEFT export, llama.cpp GGUF LoRA export, rankwise-inspect's summary, and
// the real published adapters of tests/data/real-adapters.
#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <rankwise/backend/eigen/kernels.hpp>
#include <rankwise/io/gguf.hpp>
#include <rankwise/io/module_names.hpp>
#include <rankwise/io/modules_to_save.hpp>
#include <rankwise/io/mos_adapter.hpp>
#include <rankwise/io/peft_adapter.hpp>
#include <rankwise/io/smora_adapter.hpp>
#include <rankwise/layers/lora.hpp>
#include <rankwise/layers/mos.hpp>
#include <rankwise/layers/smora.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "../examples/rankwise_inspect/inspect.hpp"

namespace fs = std::filesystem;
namespace io = rankwise::io;
using Catch::Matchers::Contains;
using rankwise::CpuBackend;
using rankwise::CpuContext;
using rankwise::HostTensor;

namespace {

const fs::path kData = RANKWISE_TEST_DATA_DIR;
const fs::path kReal = kData / "real-adapters";

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const rankwise::error& e) {
    return e.what();
  }
  return "(no error)";
}

// A fresh empty directory under the system's temporary directory.
fs::path scratch(const std::string& tag) {
  static int counter = 0;
  const fs::path p = fs::temp_directory_path() /
                     ("rankwise_adapter_files_" + tag + "_" + std::to_string(++counter) + "_" +
                      std::to_string(std::random_device{}()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

std::vector<std::uint8_t> file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), {});
}
void put_bytes(const fs::path& p, const std::vector<std::uint8_t>& b) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// Every value rounded through `dtype`, as a write and a read leave it.
HostTensor rounded(const HostTensor& t, io::DType dtype) {
  return io::to_host_tensor(io::from_host_tensor(t, dtype));
}

bool same_bits(const HostTensor& x, const HostTensor& y) {
  if (x.shape != y.shape || x.values.size() != y.values.size()) return false;
  return std::memcmp(x.values.data(), y.values.data(), x.values.size() * sizeof(double)) == 0;
}

// ΔW = scale · B A (d_out x d_in) by plain loops in double: the ground truth.
std::vector<double> delta_w(const HostTensor& a, const HostTensor& b, double scale) {
  const std::int64_t r = a.shape[0], d_in = a.shape[1], d_out = b.shape[0];
  std::vector<double> w(static_cast<std::size_t>(d_out * d_in), 0.0);
  for (std::int64_t o = 0; o < d_out; ++o) {
    for (std::int64_t k = 0; k < r; ++k) {
      const double bk = b.values[o * r + k] * scale;
      for (std::int64_t i = 0; i < d_in; ++i) w[o * d_in + i] += bk * a.values[k * d_in + i];
    }
  }
  return w;
}

double max_rel_diff(const std::vector<double>& x, const std::vector<double>& y) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    num = std::max(num, std::fabs(x[i] - y[i]));
    den = std::max(den, std::fabs(y[i]));
  }
  return den == 0 ? num : num / den;
}

// ΔW of a PEFT module computed by rankwise's Lora layer (forward of the
// identity gives ΔWᵀ): the library path, checked against delta_w.
std::vector<double> delta_w_by_layer(const io::LoraModule& m, double scale) {
  CpuContext ctx;
  rankwise::LoraConfig cfg{m.d_in(), m.d_out(), m.rank, scale * static_cast<double>(m.rank)};
  rankwise::Lora<double, CpuBackend> lora(ctx, cfg);
  lora.set_a(rankwise::host_view<const double>(m.a.values.data(), m.rank, m.d_in()));
  lora.set_b(rankwise::host_view<const double>(m.b.values.data(), m.d_out(), m.rank));
  const std::int64_t n = m.d_in();
  std::vector<double> x(static_cast<std::size_t>(n * n), 0.0),
      y(static_cast<std::size_t>(n * m.d_out()), 0.0);
  for (std::int64_t i = 0; i < n; ++i) x[i * n + i] = 1;
  lora.forward(rankwise::host_view<const double>(x.data(), n, n),
               rankwise::host_view(y.data(), n, m.d_out()));
  std::vector<double> w(static_cast<std::size_t>(m.d_out() * n));
  for (std::int64_t i = 0; i < n; ++i) {
    for (std::int64_t o = 0; o < m.d_out(); ++o) w[o * n + i] = y[i * m.d_out() + o];
  }
  return w;
}

const io::DType kDtypes[] = {io::DType::kF32, io::DType::kF16, io::DType::kBF16, io::DType::kF64};

// ---------------------------------------------------------------------------
// SMoRA

struct SmoraFixture {
  CpuContext ctx;
  io::SmoraAdapter adapter;
  std::vector<std::unique_ptr<rankwise::Smora<double, CpuBackend>>> layers;

  SmoraFixture(std::int64_t r, std::int64_t k, std::int64_t g) {
    adapter.r = r;
    adapter.activate_r = k;
    adapter.rank_partition = g;
    adapter.lora_alpha = 16;
    adapter.base_model_name_or_path = "Qwen/Qwen2.5-0.5B";
    adapter.task_type = "CAUSAL_LM";
    const char* names[2] = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"};
    const std::int64_t outs[2] = {16, 8};
    for (int i = 0; i < 2; ++i) {
      io::SmoraModule shape;
      shape.a.shape = {r, 12};
      shape.b.shape = {outs[i], r};
      rankwise::SmoraConfig c = adapter.layer_config(shape);
      REQUIRE(c.router.bias_per_rank);
      layers.push_back(std::make_unique<rankwise::Smora<double, CpuBackend>>(ctx, c));
      auto& layer = *layers.back();
      layer.init(7 + static_cast<std::uint64_t>(i));
      // B non-zero and the bias moved by a training step, so every tensor carries information.
      std::vector<double> bt(static_cast<std::size_t>(r * outs[i]));
      for (std::size_t j = 0; j < bt.size(); ++j)
        bt[j] = std::sin(0.37 * static_cast<double>(j + 1));
      rankwise::Kernels<CpuBackend, double>::upload_doubles(ctx, bt.data(), layer.bt());
      std::vector<double> x(5 * 12), y(5 * static_cast<std::size_t>(outs[i]), 0.0);
      for (std::size_t j = 0; j < x.size(); ++j) x[j] = std::cos(0.11 * static_cast<double>(j));
      layer.forward(rankwise::host_view<const double>(x.data(), 5, 12),
                    rankwise::host_view(y.data(), 5, outs[i]), rankwise::Mode::kTraining);
      adapter.modules.push_back(io::smora_module_from(names[i], layer));
    }
  }
};

}  // namespace

TEST_CASE("SMoRA adapter: official layout round trip on every dtype, loads into Smora",
          "[adapter_files][smora]") {
  for (const std::int64_t g : {1, 2}) {
    SmoraFixture f(8, 4, g);
    for (const io::DType dtype : kDtypes) {
      INFO("g = " << g << ", dtype " << io::dtype_name(dtype));
      const fs::path dir = scratch("smora") / "out";
      io::write_smora_adapter(f.adapter, dir.string(), dtype);
      // The names and shapes the reference code saves.
      const io::SafetensorsFile file = io::read_safetensors((dir / io::kPeftWeightsFile).string());
      const std::string key = "base_model.model.model.layers.0.self_attn.q_proj";
      REQUIRE(file.tensors.at(key + ".lora_A.weight").shape == std::vector<std::int64_t>{8, 12});
      REQUIRE(file.tensors.at(key + ".lora_B.weight").shape == std::vector<std::int64_t>{16, 8});
      REQUIRE(file.tensors.at(key + ".lora_router.weight").shape ==
              std::vector<std::int64_t>{8 / g, 12});
      REQUIRE(file.tensors.at(key + ".lora_biases").shape == std::vector<std::int64_t>{8});
      REQUIRE(file.tensors.size() == 8);
      const nlohmann::json config = nlohmann::json::parse(std::ifstream(dir / io::kPeftConfigFile));
      CHECK(config["peft_type"] == "SRMOLE");
      CHECK(config["r"] == 8);
      CHECK(config["activate_r"] == 4);
      CHECK(config["rank_partition"] == g);
      CHECK(config["lora_alpha"] == 16);

      const io::SmoraAdapter back = io::read_smora_adapter(dir.string());
      CHECK(back.scale() == 16.0 / 4.0);
      REQUIRE(back.modules.size() == 2);
      for (std::size_t i = 0; i < 2; ++i) {
        const auto& m = back.modules[i];
        const auto& src = f.adapter.modules[i];
        CHECK(m.name == src.name);
        CHECK(m.dtype == dtype);
        CHECK(same_bits(m.a, rounded(src.a, dtype)));
        CHECK(same_bits(m.b, rounded(src.b, dtype)));
        CHECK(same_bits(m.router, rounded(src.router, dtype)));
        CHECK(same_bits(m.bias, rounded(src.bias, dtype)));
        // Into a Smora and out again: bit exact.
        const rankwise::SmoraConfig c = back.layer_config(m);
        CHECK(c.router.bias_per_rank);
        CHECK(c.scale() == 4.0);
        rankwise::Smora<double, CpuBackend> layer(f.ctx, c);
        io::load_smora_module(layer, m);
        const io::SmoraModule again = io::smora_module_from(m.name, layer, dtype);
        CHECK(same_bits(again.a, m.a));
        CHECK(same_bits(again.b, m.b));
        CHECK(same_bits(again.router, m.router));
        CHECK(same_bits(again.bias, m.bias));
      }
      // Written again from what was read: byte for byte the same file.
      const fs::path dir2 = dir.parent_path() / "again";
      io::write_smora_adapter(back, dir2.string());
      CHECK(file_bytes(dir / io::kPeftWeightsFile) == file_bytes(dir2 / io::kPeftWeightsFile));
      CHECK(file_bytes(dir / io::kPeftConfigFile) == file_bytes(dir2 / io::kPeftConfigFile));
      fs::remove_all(dir.parent_path());
    }
  }
}

TEST_CASE("SMoRA adapter: a per-expert bias is refused for the reference layout",
          "[adapter_files][smora]") {
  CpuContext ctx;
  rankwise::SmoraConfig c;
  c.d_in = 8;
  c.d_out = 8;
  c.router.num_units = 8;
  c.router.group_size = 2;
  c.router.top_k = 4;
  rankwise::Smora<double, CpuBackend> layer(ctx, c);
  CHECK_THAT(error_of([&] { io::smora_module_from("m", layer); }),
             Contains("set router.bias_per_rank"));
}

TEST_CASE("SMoRA adapter: malformed directories are refused, failed writes leave nothing",
          "[adapter_files][smora]") {
  SmoraFixture f(8, 4, 2);
  const fs::path root = scratch("smora_bad");
  const fs::path good = root / "good";
  io::write_smora_adapter(f.adapter, good.string(), io::DType::kF32);
  const std::string key = "base_model.model.model.layers.0.self_attn.q_proj";
  const auto variant = [&](const std::string& name,
                           const std::function<void(io::SafetensorsFile&, nlohmann::json&)>& edit) {
    const fs::path dir = root / name;
    fs::create_directories(dir);
    io::SafetensorsFile file = io::read_safetensors((good / io::kPeftWeightsFile).string());
    nlohmann::json config = nlohmann::json::parse(std::ifstream(good / io::kPeftConfigFile));
    edit(file, config);
    io::write_safetensors(file, (dir / io::kPeftWeightsFile).string());
    std::ofstream(dir / io::kPeftConfigFile) << config.dump(2);
    return error_of([&] { io::read_smora_adapter(dir.string()); });
  };
  CHECK_THAT(variant("missing",
                     [&](auto& file, auto&) { file.tensors.erase(key + ".lora_router.weight"); }),
             Contains("missing tensor") && Contains(key + ".lora_router.weight"));
  CHECK_THAT(
      variant("shape",
              [&](auto& file, auto&) {
                file.tensors[key + ".lora_router.weight"] = io::from_host_tensor(
                    HostTensor{{8, 12}, std::vector<double>(96, 0.0)}, io::DType::kF32);
              }),
      Contains(key + ".lora_router.weight") && Contains("shape (8 x 12), expected (4 x 12)"));
  CHECK_THAT(variant("dtype",
                     [&](auto& file, auto&) {
                       io::SafetensorsTensor t;
                       t.dtype = io::DType::kI32;
                       t.shape = {8};
                       t.data.assign(32, 0);
                       file.tensors[key + ".lora_biases"] = t;
                     }),
             Contains(key + ".lora_biases") && Contains("I32 is not a float type"));
  CHECK_THAT(variant("extra",
                     [&](auto& file, auto&) {
                       file.tensors["base_model.model.score.weight"] =
                           io::from_host_tensor(HostTensor{{2}, {1.0, 2.0}}, io::DType::kF32);
                     }),
             Contains("\"base_model.model.score.weight\" is not a SMoRA weight"));
  CHECK_THAT(variant("type", [&](auto&, auto& config) { config["peft_type"] = "LORA"; }),
             Contains("expected \"SRMOLE\""));
  CHECK_THAT(variant("k", [&](auto&, auto& config) { config["activate_r"] = 3; }),
             Contains("activate_r (k) = 3 is not a multiple of rank_partition (g) = 2"));
  CHECK_THAT(variant("pattern",
                     [&](auto&, auto& config) {
                       config["rank_pattern"] = {{"q_proj", 4}};
                     }),
             Contains("\"rank_pattern\" is set"));
  CHECK_THAT(variant("nan",
                     [&](auto& file, auto&) {
                       HostTensor t = io::to_host_tensor(file.tensors[key + ".lora_A.weight"]);
                       t.values[3] = std::nan("");
                       file.tensors[key + ".lora_A.weight"] =
                           io::from_host_tensor(t, io::DType::kF32);
                     }),
             Contains("holds 1 non-finite values"));
  {  // truncated weights file
    const fs::path dir = root / "truncated";
    fs::create_directories(dir);
    fs::copy_file(good / io::kPeftConfigFile, dir / io::kPeftConfigFile);
    std::vector<std::uint8_t> bytes = file_bytes(good / io::kPeftWeightsFile);
    bytes.resize(bytes.size() - 7);
    put_bytes(dir / io::kPeftWeightsFile, bytes);
    CHECK_THAT(error_of([&] { io::read_smora_adapter(dir.string()); }),
               Contains(io::kPeftWeightsFile));
  }
  // A failing write leaves no output and no temporary behind.
  io::SmoraAdapter bad = f.adapter;
  bad.modules[1].bias.values[0] = INFINITY;
  const fs::path out = root / "never";
  CHECK_THAT(error_of([&] { io::write_smora_adapter(bad, out.string(), io::DType::kF16); }),
             Contains("lora_biases (r) holds 1 non-finite values"));
  bad = f.adapter;
  bad.modules[0].a.values[0] = 1e6;  // overflows F16 while writing
  CHECK_THAT(error_of([&] { io::write_smora_adapter(bad, out.string(), io::DType::kF16); }),
             Contains("overflows F16"));
  CHECK_FALSE(fs::exists(out));
  std::size_t entries = 0;
  for (const auto& e : fs::directory_iterator(root))
    entries += e.path().filename().string()[0] == '.';
  CHECK(entries == 0);
  fs::remove_all(root);
}

// ---------------------------------------------------------------------------
// MoS

namespace {

struct MosFixture {
  CpuContext ctx;
  rankwise::ShardPoolConfig pc;
  rankwise::MosConfig mc;
  std::unique_ptr<rankwise::ShardPool<double, CpuBackend>> pool;
  std::vector<std::unique_ptr<rankwise::Mos<double, CpuBackend>>> layers;
  io::MosAdapter adapter;

  MosFixture() {
    pc.d_in = 12;
    pc.d_out = 8;
    pc.num_layers = 3;
    pc.equivalent_rank = 4;
    pc.private_rank = 1;
    pc.shards_per_vector = 2;
    mc.rank = 3;
    mc.alpha = 6;
    mc.seed = 11;
    pool = std::make_unique<rankwise::ShardPool<double, CpuBackend>>(ctx, pc);
    pool->init(5);
    std::vector<double> b(static_cast<std::size_t>(pc.num_shards() * pc.shard_out()));
    for (std::size_t j = 0; j < b.size(); ++j) b[j] = std::sin(0.3 * static_cast<double>(j + 1));
    rankwise::Kernels<CpuBackend, double>::upload_doubles(ctx, b.data(), pool->b());
    adapter.base_model_name_or_path = "meta-llama/Llama-2-7b-hf";
    adapter.pools["q_proj"] = io::mos_pool_entry(*pool, mc);
    for (std::int64_t l = 0; l < pc.num_layers; ++l) {
      layers.push_back(std::make_unique<rankwise::Mos<double, CpuBackend>>(*pool, l, mc));
      adapter.layers.push_back(io::mos_layer_entry(
          "model.layers." + std::to_string(l) + ".self_attn.q_proj", "q_proj", *layers.back()));
    }
  }
};

}  // namespace

TEST_CASE("MoS adapter: pools, index lists and configuration round trip on every dtype",
          "[adapter_files][mos]") {
  MosFixture f;
  for (const io::DType dtype : kDtypes) {
    INFO("dtype " << io::dtype_name(dtype));
    const fs::path dir = scratch("mos") / "out";
    io::write_mos_adapter(f.adapter, dir.string(), dtype);
    const io::MosAdapter back = io::read_mos_adapter(dir.string());
    REQUIRE(back.pools.size() == 1);
    const io::MosPoolEntry& e = back.pools.at("q_proj");
    CHECK(e.pool.num_layers == 3);
    CHECK(e.pool.equivalent_rank == 4);
    CHECK(e.pool.private_rank == 1);
    CHECK(e.pool.shards_per_vector == 2);
    CHECK(e.config.rank == 3);
    CHECK(e.config.alpha == 6);
    CHECK(e.config.seed == 11);
    CHECK(e.config.subset_selection);
    CHECK(e.config.pair_dissociation);
    CHECK(same_bits(e.a, rounded(f.adapter.pools.at("q_proj").a, dtype)));
    CHECK(same_bits(e.b, rounded(f.adapter.pools.at("q_proj").b, dtype)));
    REQUIRE(back.layers.size() == 3);
    for (std::size_t l = 0; l < 3; ++l) {
      CHECK(back.layers[l].indices.a == f.layers[l]->indices().a);
      CHECK(back.layers[l].indices.b == f.layers[l]->indices().b);
      CHECK(back.layers[l].layer == static_cast<std::int64_t>(l));
    }
    // Training resumes: a fresh pool loaded from the file serves the same layers.
    rankwise::ShardPool<double, CpuBackend> pool2(f.ctx, e.pool);
    io::load_mos_pool(pool2, e);
    const io::MosPoolEntry again = io::mos_pool_entry(pool2, e.config, dtype);
    CHECK(same_bits(again.a, e.a));
    CHECK(same_bits(again.b, e.b));
    // Written again: the same bytes.
    const fs::path dir2 = dir.parent_path() / "again";
    io::write_mos_adapter(back, dir2.string(), dtype);
    CHECK(file_bytes(dir / io::kPeftWeightsFile) == file_bytes(dir2 / io::kPeftWeightsFile));
    CHECK(file_bytes(dir / io::kPeftConfigFile) == file_bytes(dir2 / io::kPeftConfigFile));
    fs::remove_all(dir.parent_path());
  }
}

TEST_CASE("MoS adapter: the PEFT export holds each layer's assembled A and B",
          "[adapter_files][mos]") {
  MosFixture f;
  const fs::path root = scratch("mos_lora");
  io::write_peft_adapter(io::mos_to_peft_lora(f.adapter), (root / "lora").string(),
                         io::DType::kF64);
  const io::PeftAdapter lora = io::read_peft_adapter((root / "lora").string());
  REQUIRE(lora.modules.size() == 3);
  for (std::size_t l = 0; l < 3; ++l) {
    const io::LoraModule& m = lora.modules[l];
    CHECK(m.rank == 3);
    CHECK(m.scale == 2.0);
    // The layer's own assembly (get_a / get_b) against the exported factors: exact.
    std::vector<double> a(3 * 12), b(8 * 3);
    f.layers[l]->get_a(rankwise::host_view(a.data(), 3, 12));
    f.layers[l]->get_b(rankwise::host_view(b.data(), 8, 3));
    CHECK(m.a.values == a);
    CHECK(m.b.values == b);
    // And the layer's forward on the identity is ΔWᵀ = (s B A)ᵀ.
    std::vector<double> x(12 * 12, 0.0), y(12 * 8, 0.0);
    for (int i = 0; i < 12; ++i) x[i * 12 + i] = 1;
    f.layers[l]->forward(rankwise::host_view<const double>(x.data(), 12, 12),
                         rankwise::host_view(y.data(), 12, 8));
    const std::vector<double> w = delta_w(m.a, m.b, m.scale);
    std::vector<double> wt(w.size());
    for (int i = 0; i < 12; ++i) {
      for (int o = 0; o < 8; ++o) wt[o * 12 + i] = y[i * 8 + o];
    }
    CHECK(max_rel_diff(wt, w) < 1e-13);
  }
  fs::remove_all(root);
}

TEST_CASE("MoS adapter: malformed directories are refused", "[adapter_files][mos]") {
  MosFixture f;
  const fs::path root = scratch("mos_bad");
  const fs::path good = root / "good";
  io::write_mos_adapter(f.adapter, good.string(), io::DType::kF32);
  const std::string idx = "base_model.model.model.layers.1.self_attn.q_proj.mos_indices_A";
  const auto variant = [&](const std::string& name,
                           const std::function<void(io::SafetensorsFile&, nlohmann::json&)>& edit) {
    const fs::path dir = root / name;
    fs::create_directories(dir);
    io::SafetensorsFile file = io::read_safetensors((good / io::kPeftWeightsFile).string());
    nlohmann::json config = nlohmann::json::parse(std::ifstream(good / io::kPeftConfigFile));
    edit(file, config);
    io::write_safetensors(file, (dir / io::kPeftWeightsFile).string());
    std::ofstream(dir / io::kPeftConfigFile) << config.dump(2);
    return error_of([&] { io::read_mos_adapter(dir.string()); });
  };
  CHECK_THAT(variant("missing", [&](auto& file, auto&) { file.tensors.erase(idx); }),
             Contains("missing tensor \"" + idx + "\""));
  CHECK_THAT(variant("range",
                     [&](auto& file, auto&) {
                       auto& t = file.tensors[idx];
                       t.data[0] = 0xFF;  // index 255 > M = 24
                     }),
             Contains("is outside the pool's [0, M = 24)"));
  CHECK_THAT(variant("dtype",
                     [&](auto& file, auto&) {
                       file.tensors[idx] = io::from_host_tensor(
                           HostTensor{{6}, std::vector<double>(6, 0.0)}, io::DType::kF32);
                     }),
             Contains(idx) && Contains("dtype F32, expected I32"));
  CHECK_THAT(variant("shape",
                     [&](auto& file, auto&) {
                       file.tensors["mos.pools.q_proj.shards_B"] = io::from_host_tensor(
                           HostTensor{{24, 3}, std::vector<double>(72, 0.0)}, io::DType::kF32);
                     }),
             Contains("mos.pools.q_proj.shards_B") && Contains("expected (24 x 4)"));
  CHECK_THAT(variant("twice",
                     [&](auto&, auto& config) {
                       config["layers"]["model.layers.2.self_attn.q_proj"]["layer"] = 1;
                     }),
             Contains("layer 1 of pool \"q_proj\" is used by two modules"));
  CHECK_THAT(variant("pool", [&](auto&, auto& config) { config["pools"]["q_proj"]["rank"] = 11; }),
             Contains("MosConfig: r − p = 10"));
  CHECK_THAT(variant("extra",
                     [&](auto& file, auto&) {
                       file.tensors["base_model.model.lm_head.lora_A.weight"] =
                           io::from_host_tensor(HostTensor{{1, 2}, {1.0, 2.0}}, io::DType::kF32);
                     }),
             Contains("\"base_model.model.lm_head.lora_A.weight\" is neither a pool"));
  {
    const fs::path dir = root / "truncated";
    fs::create_directories(dir);
    fs::copy_file(good / io::kPeftConfigFile, dir / io::kPeftConfigFile);
    std::vector<std::uint8_t> bytes = file_bytes(good / io::kPeftWeightsFile);
    bytes.resize(bytes.size() / 2);
    put_bytes(dir / io::kPeftWeightsFile, bytes);
    CHECK_THAT(error_of([&] { io::read_mos_adapter(dir.string()); }),
               Contains(io::kPeftWeightsFile));
  }
  io::MosAdapter bad = f.adapter;
  bad.layers[0].indices.b[0] = 1000;
  CHECK_THAT(
      error_of([&] { io::write_mos_adapter(bad, (root / "never").string(), io::DType::kF32); }),
      Contains("I_b[0] = 1000"));
  CHECK_FALSE(fs::exists(root / "never"));
  fs::remove_all(root);
}

// ---------------------------------------------------------------------------
// GGUF

namespace {

io::PeftAdapter small_llama(bool rslora) {
  io::PeftAdapter a;
  a.base_model_name_or_path = "meta-llama/Llama-3.2-1B";
  a.use_rslora = rslora;
  const char* proj[3] = {"q_proj", "v_proj", "o_proj"};
  const std::int64_t ranks[3] = {4, 4, 2};
  const double alphas[3] = {8, 8, 3};
  for (int layer = 0; layer < 2; ++layer) {
    for (int p = 0; p < 3; ++p) {
      io::LoraModule m;
      m.name = "model.layers." + std::to_string(layer) + ".self_attn." + proj[p];
      m.rank = ranks[p];
      m.alpha = alphas[p];
      m.scale = io::lora_scale(m.alpha, m.rank, a.scale_rule());
      const std::int64_t d_in = 16, d_out = p == 1 ? 8 : 16;
      m.a =
          HostTensor{{m.rank, d_in}, std::vector<double>(static_cast<std::size_t>(m.rank * d_in))};
      m.b = HostTensor{{d_out, m.rank},
                       std::vector<double>(static_cast<std::size_t>(m.rank * d_out))};
      for (std::size_t j = 0; j < m.a.values.size(); ++j)
        m.a.values[j] = std::sin(0.7 * (j + 1.0 + p));
      for (std::size_t j = 0; j < m.b.values.size(); ++j)
        m.b.values[j] = std::cos(0.3 * (j + 2.0 + layer));
      a.modules.push_back(m);
    }
  }
  return a;
}

const io::GgmlType kGgmlTypes[] = {io::GgmlType::kF32, io::GgmlType::kF16, io::GgmlType::kBF16};

double ggml_tolerance(io::GgmlType t) {
  return t == io::GgmlType::kF32 ? 1e-6 : t == io::GgmlType::kF16 ? 4e-3 : 3e-2;
}

}  // namespace

TEST_CASE("GGUF LoRA: layout, llama.cpp's checks, and ΔW per module on every type",
          "[adapter_files][gguf]") {
  for (const bool rslora : {false, true}) {
    const io::PeftAdapter src = small_llama(rslora);
    for (const io::GgmlType type : kGgmlTypes) {
      INFO("rslora " << rslora << ", type " << static_cast<int>(type));
      io::GgufLoraOptions options;
      options.names = io::module_name_map("llama");
      options.type = type;
      const fs::path root = scratch("gguf");
      const fs::path path = root / "adapter.gguf";
      io::write_gguf_lora(src, path.string(), options);
      const std::vector<std::uint8_t> bytes = file_bytes(path);
      REQUIRE(bytes.size() > 24);
      CHECK(std::string(bytes.begin(), bytes.begin() + 4) == "GGUF");
      CHECK(bytes[4] == 3);  // version 3, little endian
      CHECK(bytes.size() % 32 == 0);
      const io::GgufFile file = io::read_gguf(path.string());
      CHECK(io::serialize_gguf(file) == bytes);  // the reader keeps everything the writer wrote
      CHECK(file.find("general.type")->s == "adapter");
      CHECK(file.find("adapter.type")->s == "lora");
      CHECK(file.find("general.architecture")->s == "llama");
      const io::GgufTensor* qa = file.find_tensor("blk.0.attn_q.weight.lora_a");
      REQUIRE(qa != nullptr);
      CHECK(qa->ne == std::vector<std::int64_t>{16, 4});  // [n_embd_in, r]
      CHECK(file.find_tensor("blk.1.attn_v.weight.lora_b")->ne ==
            std::vector<std::int64_t>{4, 8});  // [r, n_embd_out]
      // The base shapes llama.cpp would check against (ggml ne of W: [in, out]).
      std::map<std::string, std::vector<std::int64_t>> base;
      for (int l = 0; l < 2; ++l) {
        base["blk." + std::to_string(l) + ".attn_q.weight"] = {16, 16};
        base["blk." + std::to_string(l) + ".attn_v.weight"] = {16, 8};
        base["blk." + std::to_string(l) + ".attn_output.weight"] = {16, 16};
      }
      const auto modules = io::gguf_lora_modules(file, "llama", &base, path.string());
      REQUIRE(modules.size() == src.modules.size());
      for (const auto& m : src.modules) {
        const std::string target = *options.names.map(m.name);
        const auto it =
            std::find_if(modules.begin(), modules.end(),
                         [&](const io::GgufLoraModule& g) { return g.base_tensor == target; });
        REQUIRE(it != modules.end());
        const double err =
            max_rel_diff(delta_w(it->a, it->b, it->scale), delta_w(m.a, m.b, m.scale));
        INFO(m.name << " relative error " << err);
        CHECK(err < ggml_tolerance(type));
      }
      base["blk.0.attn_v.weight"] = {16, 16};
      CHECK_THAT(error_of([&] { io::gguf_lora_modules(file, "llama", &base); }),
                 Contains("tensor 'blk.0.attn_v.weight' has incorrect shape"));
      base.erase("blk.0.attn_v.weight");
      CHECK_THAT(error_of([&] { io::gguf_lora_modules(file, "llama", &base); }),
                 Contains("'blk.0.attn_v.weight' does not exist in base model"));
      CHECK_THAT(error_of([&] { io::gguf_lora_modules(file, "qwen2"); }),
                 Contains("model arch and LoRA arch mismatch"));
      fs::remove_all(root);
    }
  }
}

TEST_CASE("GGUF LoRA: one alpha is exact for a uniform adapter (no folding)",
          "[adapter_files][gguf]") {
  io::PeftAdapter src = small_llama(false);
  src.modules.erase(std::remove_if(src.modules.begin(), src.modules.end(),
                                   [](const io::LoraModule& m) { return m.rank != 4; }),
                    src.modules.end());
  io::GgufLoraOptions options;
  options.names = io::module_name_map("llama");
  const io::GgufFile file = io::gguf_lora_from(src, options);
  CHECK(file.find("adapter.lora.alpha")->f == 8.0);
  for (const auto& m : io::gguf_lora_modules(file)) {
    CHECK(m.scale == 2.0);
  }
  // B is PEFT's B unchanged, bit for bit.
  const auto b = io::detail::host_from_ggml(*file.find_tensor("blk.0.attn_q.weight.lora_b"));
  CHECK(same_bits(b, rounded(src.modules[0].b, io::DType::kF32)));
}

TEST_CASE("GGUF: malformed files and adapters are refused", "[adapter_files][gguf]") {
  io::GgufLoraOptions options;
  options.names = io::module_name_map("llama");
  const io::GgufFile good = io::gguf_lora_from(small_llama(false), options);
  const std::vector<std::uint8_t> bytes = io::serialize_gguf(good);
  const auto parse = [](std::vector<std::uint8_t> b) {
    return error_of([&] { io::parse_gguf(b.data(), b.size(), "x.gguf"); });
  };
  {
    auto b = bytes;
    b[0] = 'X';
    CHECK_THAT(parse(b), Contains("invalid magic"));
  }
  {
    auto b = bytes;
    b[4] = 4;
    CHECK_THAT(parse(b), Contains("version 4 is not supported"));
  }
  {
    auto b = bytes;
    b.resize(b.size() - 40);
    CHECK_THAT(parse(b), Contains("truncated") && Contains("end past the file"));
  }
  {
    auto b = bytes;
    b.resize(60);
    CHECK_THAT(parse(b), Contains("truncated"));
  }
  {
    io::GgufFile f = good;
    f.kv.push_back(f.kv.front());
    CHECK_THAT(error_of([&] { io::serialize_gguf(f); }), Contains("is empty or repeated"));
  }
  {
    io::GgufFile f = good;
    f.tensors.pop_back();
    CHECK_THAT(
        error_of([&] { io::gguf_lora_modules(f); }),
        Contains("LoRA tensor pair for 'blk.1.attn_output.weight' is missing one component"));
  }
  {
    io::GgufFile f = good;
    f.tensors.push_back(f.tensors.front());
    f.tensors.back().name = "blk.0.attn_q.weight.extra";
    CHECK_THAT(error_of([&] { io::gguf_lora_modules(f); }), Contains("has unexpected suffix"));
  }
  {
    io::GgufFile f = good;
    std::swap(f.tensors[0].ne[0], f.tensors[0].ne[1]);
    CHECK_THAT(error_of([&] { io::gguf_lora_modules(f); }),
               Contains("lora_a tensor is not transposed"));
  }
  {
    io::GgufFile f = good;
    f.kv[1].second.s = "model";
    CHECK_THAT(error_of([&] { io::gguf_lora_modules(f); }),
               Contains("expect general.type to be 'adapter', but got: 'model'"));
  }
  {  // a wrong tensor offset in the info table
    auto b = bytes;
    const io::GgufFile f = io::parse_gguf(b.data(), b.size());
    // The first tensor info's offset field is the 8 bytes before the second info's name.
    const std::string second = f.tensors[1].name;
    const auto at = std::search(b.begin(), b.end(), second.begin(), second.end()) - b.begin();
    b[static_cast<std::size_t>(at - 8 - 8)] = 32;
    CHECK_THAT(parse(b), Contains("offset 32, expected 0"));
  }
  {
    io::PeftAdapter a = small_llama(false);
    a.modules[0].name = "model.layers.0.self_attn.rotary";
    CHECK_THAT(error_of([&] { io::gguf_lora_from(a, options); }),
               Contains("module \"model.layers.0.self_attn.rotary\": no llama name rule"));
  }
  {
    io::PeftAdapter a = small_llama(false);
    a.modules[2].b.values[1] = std::nan("");
    const fs::path root = scratch("gguf_nan");
    CHECK_THAT(error_of([&] { io::write_gguf_lora(a, (root / "x.gguf").string(), options); }),
               Contains("lora_B 1 non-finite values"));
    CHECK(fs::is_empty(root));
    fs::remove_all(root);
  }
  {
    io::ModuleNameMap names("llama");
    names.add("model.layers.{bid}.self_attn.q_proj",
              "blk.{bid}.a_name_that_is_far_too_long_for_ggml_to_hold_it.weight");
    io::GgufLoraOptions o;
    o.names = names;
    io::PeftAdapter a = small_llama(false);
    a.modules.resize(1);
    CHECK_THAT(error_of([&] { io::gguf_lora_from(a, o); }), Contains("ggml's 64-byte limit"));
  }
}

TEST_CASE("module names: the built-in families and user rules", "[adapter_files][gguf]") {
  CHECK(*io::module_name_map("qwen2").map("model.layers.23.self_attn.v_proj") ==
        "blk.23.attn_v.weight");
  CHECK(*io::module_name_map("gemma").map("model.layers.3.mlp.down_proj") ==
        "blk.3.ffn_down.weight");
  CHECK_FALSE(io::module_name_map("gemma").map("lm_head").has_value());
  CHECK(*io::module_name_map("llama").map("lm_head") == "output.weight");
  CHECK(*io::module_name_map("gpt2").map("transformer.h.11.attn.c_attn") ==
        "blk.11.attn_qkv.weight");
  CHECK(*io::module_name_map("gpt2").map("transformer.h.0.mlp.c_proj") == "blk.0.ffn_down.weight");
  CHECK(*io::module_name_map("opt").map("model.decoder.layers.5.self_attn.out_proj") ==
        "blk.5.attn_output.weight");
  CHECK_FALSE(io::module_name_map("llama").map("model.layers.x.self_attn.q_proj").has_value());
  io::ModuleNameMap m = io::module_name_map("llama");
  m.add("model.layers.{bid}.self_attn.q_proj", "blk.{bid}.custom.weight");
  CHECK(*m.map("model.layers.2.self_attn.q_proj") == "blk.2.custom.weight");
  CHECK_THAT(error_of([&] { io::module_name_map("mamba"); }), Contains("unknown architecture"));
  CHECK(*io::guess_architecture("Qwen/Qwen2.5-0.5B") == "qwen2");
  CHECK(*io::guess_architecture("google/gemma-2b") == "gemma");
  CHECK(*io::guess_architecture("facebook/opt-125m") == "opt");
  CHECK(*io::guess_architecture("gpt2") == "gpt2");
}

// ---------------------------------------------------------------------------
// Real adapters

TEST_CASE("real adapters: Qwen2.5 (GQA, F32) and OPT (BF16) read, ΔW checked, GGUF exported",
          "[adapter_files][real]") {
  struct Case {
    const char* dir;
    const char* arch;
    std::size_t modules;
    io::DType dtype;
    const char* v_module;
    std::vector<std::int64_t> v_b_shape;
    io::GgmlType type;
  };
  const Case cases[] = {
      {"SGOD-UTH__math-latex",
       "qwen2",
       48,
       io::DType::kF32,
       "model.layers.0.self_attn.v_proj",
       {128, 8},
       io::GgmlType::kF32},
      {"guilhermmeabreu__lab_08",
       "opt",
       24,
       io::DType::kBF16,
       "model.decoder.layers.0.self_attn.v_proj",
       {768, 16},
       io::GgmlType::kBF16},
  };
  for (const Case& c : cases) {
    INFO(c.dir);
    const io::PeftAdapter a = io::read_peft_adapter((kReal / c.dir).string());
    REQUIRE(a.modules.size() == c.modules);
    CHECK(a.modules.front().a_dtype == c.dtype);
    CHECK(io::guess_architecture(a.base_model_name_or_path).value_or("") == c.arch);
    const io::LoraModule* v = a.find_module(c.v_module);
    REQUIRE(v != nullptr);
    CHECK(v->b.shape == c.v_b_shape);
    CHECK(v->scale == 2.0);
    // ΔW = s · B A by rankwise's Lora layer against the plain-loop reference.
    for (const io::LoraModule* m : {&a.modules.front(), v}) {
      CHECK(max_rel_diff(delta_w_by_layer(*m, m->scale), delta_w(m->a, m->b, m->scale)) < 1e-13);
    }
    // Exported for llama.cpp in the adapter's own type: BF16 and F32 values
    // survive unchanged, so ΔW is the same to the last bit.
    io::GgufLoraOptions options;
    options.names = io::module_name_map(c.arch);
    options.type = c.type;
    const fs::path root = scratch("real_gguf");
    io::write_gguf_lora(a, (root / "a.gguf").string(), options);
    const auto modules = io::gguf_lora_modules(io::read_gguf((root / "a.gguf").string()), c.arch);
    REQUIRE(modules.size() == c.modules);
    const std::string target = *options.names.map(c.v_module);
    const auto it = std::find_if(modules.begin(), modules.end(), [&](const io::GgufLoraModule& g) {
      return g.base_tensor == target;
    });
    REQUIRE(it != modules.end());
    CHECK(same_bits(it->a, v->a));
    CHECK(same_bits(it->b, v->b));
    CHECK(it->scale == v->scale);
    fs::remove_all(root);
  }
}

TEST_CASE("real adapters: GPT-2 (Conv1D, fan_in_fan_out) exports A and B as PEFT holds them",
          "[adapter_files][real]") {
  const io::PeftAdapter a = io::read_peft_adapter((kData / "gpt2-lora-r8").string());
  REQUIRE(a.fan_in_fan_out);
  io::GgufLoraOptions options;
  options.names = io::module_name_map("gpt2");
  const io::GgufFile file = io::gguf_lora_from(a, options);
  // llama.cpp's GPT-2 weights are converted to (out x in), ggml [n_embd_in, n_embd_out]:
  // lora_a [768, 8] and lora_b [8, 2304] pass its shape check unchanged.
  std::map<std::string, std::vector<std::int64_t>> base;
  for (int l = 0; l < 12; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    base[b + "attn_qkv.weight"] = {768, 2304};
    base[b + "attn_output.weight"] = {768, 768};
    base[b + "ffn_down.weight"] = {3072, 768};
  }
  const auto modules = io::gguf_lora_modules(file, "gpt2", &base);
  CHECK(modules.size() == 36);
  CHECK(file.find_tensor("blk.0.attn_qkv.weight.lora_a")->ne == std::vector<std::int64_t>{768, 8});
  CHECK(file.find_tensor("blk.0.attn_qkv.weight.lora_b")->ne == std::vector<std::int64_t>{8, 2304});
  CHECK(file.find("adapter.lora.alpha")->f == 32.0);
}

TEST_CASE("real adapters: broken ones are refused with the reason", "[adapter_files][real]") {
  // A truncated file: a valid header for 161 MB of tensors in 262,144 bytes.
  const std::string truncated = (kReal / "yongshuaiy__LLMs-final").string();
  CHECK_THAT(error_of([&] { io::read_peft_adapter(truncated); }),
             Contains("adapter_model.safetensors"));
  // LoRA placed on PEFT's modules_to_save wrapper: refused naming the wrapper key and why.
  CHECK_THAT(error_of([&] { io::read_peft_adapter((kReal / "Kuntya__Udacity").string()); }),
             Contains("tensor \"base_model.model.classifier.modules_to_save.lora_A.weight\" is a "
                      "LoRA placed on PEFT's modules_to_save wrapper"));
  // Every value NaN: well formed, so it reads; exporting it is refused.
  const io::PeftAdapter nan = io::read_peft_adapter((kData / "gemma-2b-lora-nan").string());
  io::GgufLoraOptions options;
  options.names = io::module_name_map("gemma");
  CHECK_THAT(error_of([&] { io::gguf_lora_from(nan, options); }),
             Contains("non-finite values (NaN or infinity); refusing to export them"));
}

TEST_CASE("rankwise-inspect: every fixture summarised, broken ones explained",
          "[adapter_files][inspect]") {
  {
    const inspect::Summary s = inspect::summarize((kReal / "SGOD-UTH__math-latex").string());
    CHECK(s.ok());
    CHECK(s.kind == "LORA");
    CHECK(s.base_model == "Qwen/Qwen2.5-0.5B");
    REQUIRE(s.modules.size() == 48);
    CHECK(s.modules[0].rank == 8);
    CHECK(s.modules[0].alpha == 16);
    CHECK(s.modules[0].scale == 2);
    CHECK(s.modules[0].dtype == "F32");
    CHECK(s.tensors.size() == 96);
  }
  {
    const inspect::Summary s = inspect::summarize((kReal / "guilhermmeabreu__lab_08").string());
    CHECK(s.ok());
    CHECK(s.modules.at(0).dtype == "BF16");
    CHECK(s.modules.at(0).bytes == 2 * (16 * 768 * 2));
  }
  {
    const inspect::Summary s = inspect::summarize(
        (kReal / "dayanidhi04__emotion-classification-distilbert-lora").string());
    std::vector<std::string> full;
    for (const auto& t : s.tensors) {
      if (t.role == "full") full.push_back(t.name);
    }
    CHECK(full == std::vector<std::string>{"base_model.model.classifier.bias",
                                           "base_model.model.classifier.weight",
                                           "base_model.model.pre_classifier.bias",
                                           "base_model.model.pre_classifier.weight"});
    CHECK(s.modules.size() == 12);
    CHECK(s.ok());  // the saved modules are kept, not refused
  }
  {
    const inspect::Summary s = inspect::summarize((kReal / "Kuntya__Udacity").string());
    CHECK_FALSE(s.ok());
    bool wrapper = false;
    for (const auto& p : s.problems)
      wrapper = wrapper || p.find("modules_to_save wrapper") != std::string::npos;
    CHECK(wrapper);
  }
  {
    const inspect::Summary s = inspect::summarize((kData / "gemma-2b-lora-nan").string());
    CHECK_FALSE(s.ok());
    REQUIRE_FALSE(s.problems.empty());
    CHECK_THAT(s.problems.back(),
               Contains("every value is non-finite: ") && Contains("in 72 of 72 tensors"));
    CHECK(s.tensors[0].non_finite == s.tensors[0].numel);
  }
  {
    const inspect::Summary s = inspect::summarize((kReal / "yongshuaiy__LLMs-final").string());
    CHECK_FALSE(s.ok());
    CHECK(s.tensors.empty());
    CHECK_THAT(s.problems.at(0), Contains("adapter_model.safetensors"));
    const nlohmann::json j = inspect::to_json(s);
    CHECK(j["ok"] == false);
    CHECK(j["kind"] == "LORA");
  }
  {  // the formats rankwise writes
    SmoraFixture f(8, 4, 1);
    const fs::path root = scratch("inspect");
    io::write_smora_adapter(f.adapter, (root / "smora").string(), io::DType::kBF16);
    const inspect::Summary s = inspect::summarize((root / "smora").string());
    CHECK(s.ok());
    CHECK(s.kind == "SRMOLE");
    REQUIRE(s.modules.size() == 2);
    CHECK(s.modules[0].scale == 4.0);
    MosFixture m;
    io::write_mos_adapter(m.adapter, (root / "mos").string(), io::DType::kF16);
    const inspect::Summary t = inspect::summarize((root / "mos").string());
    CHECK(t.ok());
    CHECK(t.kind == "RANKWISE_MOS");
    CHECK(t.modules.size() == 3);
    fs::remove_all(root);
  }
}

TEST_CASE("GGUF reader: every truncation and byte flip gives rankwise::error or a valid file",
          "[adapter_files][gguf]") {
  io::GgufLoraOptions options;
  options.names = io::module_name_map("llama");
  io::PeftAdapter a = small_llama(false);
  a.modules.resize(2);
  const std::vector<std::uint8_t> bytes = io::serialize_gguf(io::gguf_lora_from(a, options));
  std::size_t refused = 0, read = 0;
  const auto attempt = [&](const std::vector<std::uint8_t>& b) {
    try {
      const io::GgufFile f = io::parse_gguf(b.data(), b.size(), "fuzz.gguf");
      ++read;
      try {
        io::gguf_lora_modules(f);
      } catch (const rankwise::error&) {
      }
    } catch (const rankwise::error& e) {
      ++refused;
      CHECK_THAT(std::string(e.what()), Contains("fuzz.gguf"));
    }
  };
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    attempt(
        std::vector<std::uint8_t>(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n)));
  }
  std::mt19937 rng(12);
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<std::uint8_t> b = bytes;
    const std::size_t at = rng() % b.size();
    b[at] = static_cast<std::uint8_t>(trial % 3 == 0 ? 0xFF : rng());
    attempt(b);
  }
  CHECK(refused >= bytes.size());  // every strict prefix is refused
  CHECK(read > 0);
}

TEST_CASE("modules_to_save: saved modules kept, wrapper LoRA and DoRA refused naming the key",
          "[adapter_files][modules_to_save]") {
  const std::vector<std::string> saved = {"pre_classifier", "classifier", "classifier", "score"};
  const io::SafetensorsFile d = io::read_safetensors(
      (kReal / "dayanidhi04__emotion-classification-distilbert-lora" / io::kPeftWeightsFile)
          .string());
  std::map<io::PeftKeyKind, int> kinds;
  std::map<std::string, io::SafetensorsTensor> full;
  for (const auto& kv : d.tensors) {
    const io::PeftKeyInfo info = io::classify_peft_key(kv.first, saved);
    ++kinds[info.kind];
    if (info.kind == io::PeftKeyKind::kSavedModule) full.emplace(kv.first, kv.second);
  }
  CHECK(kinds[io::PeftKeyKind::kLoraA] == 12);
  CHECK(kinds[io::PeftKeyKind::kLoraB] == 12);
  CHECK(kinds[io::PeftKeyKind::kSavedModule] == 4);
  CHECK(full.at("base_model.model.classifier.weight").shape == std::vector<std::int64_t>{6, 768});
  CHECK(full.at("base_model.model.pre_classifier.bias").shape == std::vector<std::int64_t>{768});
  // Without the config's list the same tensors are unknown, and refused as such.
  CHECK(io::classify_peft_key("base_model.model.classifier.weight", {}).kind ==
        io::PeftKeyKind::kUnknown);
  CHECK_THAT(io::peft_key_refusal("base_model.model.classifier.weight", io::PeftKeyKind::kUnknown,
                                  {"score"}),
             Contains("tensor \"base_model.model.classifier.weight\" is not a LoRA weight") &&
                 Contains("modules_to_save [score]"));

  const io::SafetensorsFile k =
      io::read_safetensors((kReal / "Kuntya__Udacity" / io::kPeftWeightsFile).string());
  int wrapper = 0;
  for (const auto& kv : k.tensors) {
    wrapper += io::classify_peft_key(kv.first, {}).kind == io::PeftKeyKind::kWrapperLora;
  }
  CHECK(wrapper == 4);
  CHECK_THAT(io::peft_key_refusal("base_model.model.classifier.modules_to_save.lora_A.weight",
                                  io::PeftKeyKind::kWrapperLora, {}),
             Contains("modules_to_save.lora_A.weight\" is a LoRA placed on PEFT's "
                      "modules_to_save wrapper"));
  const std::string dora = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
  CHECK(io::classify_peft_key(dora, {}).kind == io::PeftKeyKind::kDoraMagnitude);
  CHECK_THAT(io::peft_key_refusal(dora, io::PeftKeyKind::kDoraMagnitude, {}),
             Contains(dora) && Contains("DoRA magnitude vector"));

  // A merge carries them when the inputs agree (or there is one input)...
  std::map<std::string, io::SafetensorsTensor> other = full;
  CHECK(io::merged_saved_tensors({&full}, {"d"}).size() == 4);
  CHECK(io::merged_saved_tensors({&full, &other}, {"d", "e"}).size() == 4);
  // ... and otherwise refuses naming the module, unless told which input to take.
  other.at("base_model.model.classifier.bias").data[0] ^= 1;
  CHECK_THAT(error_of([&] {
               io::merged_saved_tensors({&full, &other}, {"d", "e"});
             }),
             Contains("saved module \"base_model.model.classifier\"") &&
                 Contains("differs between input 0 (\"d\") and input 1 (\"e\")"));
  CHECK(io::merged_saved_tensors({&full, &other}, {"d", "e"}, 1)
            .at("base_model.model.classifier.bias")
            .data == other.at("base_model.model.classifier.bias").data);
  const std::map<std::string, io::SafetensorsTensor> none;
  CHECK_THAT(error_of([&] {
               io::merged_saved_tensors({&none, &full}, {"a", "d"});
             }),
             Contains("saved module \"base_model.model.classifier\""));
}

TEST_CASE("modules_to_save: the PEFT reader keeps them, the writer writes them back unchanged",
          "[adapter_files][modules_to_save]") {
  const fs::path src = kReal / "dayanidhi04__emotion-classification-distilbert-lora";
  const io::PeftAdapter a = io::read_peft_adapter(src.string());
  REQUIRE(a.modules.size() == 12);
  CHECK(a.modules_to_save ==
        std::vector<std::string>{"pre_classifier", "classifier", "classifier", "score"});
  REQUIRE(a.saved_tensors.size() == 4);
  CHECK(a.saved_tensors.at("base_model.model.classifier.weight").shape ==
        std::vector<std::int64_t>{6, 768});
  CHECK(a.saved_tensors.at("base_model.model.pre_classifier.weight").shape ==
        std::vector<std::int64_t>{768, 768});
  for (const auto& m : a.modules) {
    CHECK(m.scale == 2.0);
  }
  const io::LoraModule& q = a.modules.front();
  CHECK(max_rel_diff(delta_w_by_layer(q, q.scale), delta_w(q.a, q.b, q.scale)) < 1e-13);
  const fs::path root = scratch("mts");
  io::write_peft_adapter(a, (root / "out").string());
  const io::PeftAdapter back = io::read_peft_adapter((root / "out").string());
  CHECK(back.modules_to_save == a.modules_to_save);
  REQUIRE(back.saved_tensors.size() == 4);
  for (const auto& kv : a.saved_tensors) {
    CHECK(back.saved_tensors.at(kv.first).data == kv.second.data);
  }
  // The source file's every tensor, byte for byte.
  const io::SafetensorsFile in = io::read_safetensors((src / io::kPeftWeightsFile).string());
  const io::SafetensorsFile out =
      io::read_safetensors((root / "out" / io::kPeftWeightsFile).string());
  CHECK(in.tensors.size() == out.tensors.size());
  for (const auto& kv : in.tensors) CHECK(out.tensors.at(kv.first).data == kv.second.data);

  // A saved tensor of a module the list does not name is refused by the writer.
  io::PeftAdapter bad = a;
  bad.modules_to_save = {"score"};
  CHECK_THAT(error_of([&] { io::write_peft_adapter(bad, (root / "bad").string()); }),
             Contains("saved tensor \"base_model.model.classifier.bias\" is not"));
  CHECK_FALSE(fs::exists(root / "bad"));

  // DoRA magnitudes and unknown tensors are refused by the reader, naming the key.
  const auto variant = [&](const std::string& name, const std::string& key) {
    const fs::path dir = root / name;
    fs::create_directories(dir);
    fs::copy_file(src / io::kPeftConfigFile, dir / io::kPeftConfigFile);
    io::SafetensorsFile f = in;
    f.tensors[key] = io::from_host_tensor(HostTensor{{2}, {1.0, 2.0}}, io::DType::kF32);
    io::write_safetensors(f, (dir / io::kPeftWeightsFile).string());
    return error_of([&] { io::read_peft_adapter(dir.string()); });
  };
  CHECK_THAT(variant("dora",
                     "base_model.model.distilbert.transformer.layer.0.attention.q_lin."
                     "lora_magnitude_vector"),
             Contains("q_lin.lora_magnitude_vector\" is a DoRA magnitude vector"));
  CHECK_THAT(variant("unknown", "base_model.model.distilbert.embeddings.word_embeddings.weight"),
             Contains("word_embeddings.weight\" is not a LoRA weight") &&
                 Contains("nor a tensor of a module in modules_to_save [pre_classifier, "
                          "classifier, classifier, score]"));
  fs::remove_all(root);
}

#if defined(RANKWISE_MERGE_TOOL)
namespace {
// Runs the merge tool; returns its exit status, its stderr in `err`.
int run_merge(const std::string& args, std::string& err, const fs::path& log) {
  const std::string cmd = std::string("\"") + RANKWISE_MERGE_TOOL + "\" " + args + " 2> \"" +
                          log.string() + "\" > /dev/null";
  const int status = std::system(cmd.c_str());
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  err = text.str();
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}
}  // namespace

TEST_CASE("rankwise-merge carries modules_to_save when the inputs agree, refuses otherwise",
          "[adapter_files][modules_to_save]") {
  const fs::path src = kReal / "dayanidhi04__emotion-classification-distilbert-lora";
  const fs::path root = scratch("merge_mts");
  // A second adapter: the same LoRA, a different classifier head.
  fs::create_directories(root / "other");
  fs::copy_file(src / io::kPeftConfigFile, root / "other" / io::kPeftConfigFile);
  io::SafetensorsFile f = io::read_safetensors((src / io::kPeftWeightsFile).string());
  f.tensors.at("base_model.model.classifier.bias").data[0] ^= 1;
  io::write_safetensors(f, (root / "other" / io::kPeftWeightsFile).string());
  const std::string a = "\"" + src.string() + "\"", b = "\"" + (root / "other").string() + "\"";
  std::string err;
  const fs::path log = root / "log.txt";

  CHECK(run_merge("--method sum -o \"" + (root / "one").string() + "\" " + a, err, log) == 0);
  const io::PeftAdapter one = io::read_peft_adapter((root / "one").string());
  CHECK(one.saved_tensors.size() == 4);
  CHECK(one.modules_to_save.size() == 4);

  CHECK(run_merge("--method sum --allow-duplicates -o \"" + (root / "same").string() + "\" " + a +
                      " " + a,
                  err, log) == 0);
  CHECK(io::read_peft_adapter((root / "same").string()).saved_tensors.size() == 4);

  CHECK(run_merge("--method sum -o \"" + (root / "differ").string() + "\" " + a + " " + b, err,
                  log) == 1);
  CHECK_THAT(err, Contains("saved module \"base_model.model.classifier\"") &&
                      Contains("say which input to take them from"));
  CHECK_FALSE(fs::exists(root / "differ"));

  CHECK(run_merge("--method sum --modules-to-save-from 1 -o \"" + (root / "from1").string() +
                      "\" " + a + " " + b,
                  err, log) == 0);
  const io::PeftAdapter from1 = io::read_peft_adapter((root / "from1").string());
  CHECK(from1.saved_tensors.at("base_model.model.classifier.bias").data ==
        f.tensors.at("base_model.model.classifier.bias").data);
  CHECK(run_merge("--method sum --modules-to-save-from 2 -o x " + a + " " + b, err, log) == 2);
  CHECK_THAT(err, Contains("--modules-to-save-from 2 names no input"));
  fs::remove_all(root);
}
#endif
