// Merging real PEFT adapter files: the GPT-2 fixture merged with itself, the
// written adapter read back, and mismatched adapters refused by module name.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <rankwise/io.hpp>
#include <rankwise/merge.hpp>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace merge = rankwise::merge;
namespace io = rankwise::io;

namespace {

std::string fixture() { return std::string(RANKWISE_TEST_DATA_DIR) + "/gpt2-lora-r8"; }

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("rankwise_test_" + name);
  fs::remove_all(dir);
  return dir;
}

}  // namespace

TEST_CASE("the GPT-2 adapter merged with itself, per method", "[merge][peft]") {
  const io::PeftAdapter adapter = io::read_peft_adapter(fixture());
  std::vector<std::string> names;
  std::vector<merge::MergeInput> inputs;
  merge::collect_modules({adapter, adapter}, {0.25, 0.75}, names, inputs);
  REQUIRE(names.size() == 36);
  merge::MergeOptions options;
  options.rank = 8;
  for (auto method : {merge::MergeMethod::kSvd, merge::MergeMethod::kSum,
                      merge::MergeMethod::kLinear, merge::MergeMethod::kLego}) {
    options.method = method;
    const auto merged = merge::merge_modules(names, inputs, options);
    REQUIRE(merged.size() == 36);
    for (const auto& m : merged) {
      CAPTURE(merge::to_string(method), m.name);
      // 0.25 ΔW + 0.75 ΔW = ΔW has rank 8: svd, sum and linear (equal factors,
      // √0.25 + √0.75 ≠ 1 though) are checked against what each must give.
      if (method == merge::MergeMethod::kSvd || method == merge::MergeMethod::kSum) {
        CHECK(m.quality.relative_error < 1e-6);
      }
      if (method == merge::MergeMethod::kLinear) {
        const double c = std::sqrt(0.25) + std::sqrt(0.75);  // A and B each scaled by c
        CHECK(m.quality.relative_error == Approx(c * c - 1.0).epsilon(1e-6));
      }
      if (method == merge::MergeMethod::kLego) CHECK(std::isfinite(m.quality.relative_error));
    }
    const fs::path out = fresh_dir(std::string("merge_") + merge::to_string(method));
    io::write_peft_adapter(merge::to_peft_adapter(merged, adapter), out.string(), io::DType::kF32);
    const io::PeftAdapter back = io::read_peft_adapter(out.string());
    REQUIRE(back.modules.size() == 36);
    CHECK(back.fan_in_fan_out);
    for (std::size_t i = 0; i < back.modules.size(); ++i) {
      CHECK(back.modules[i].name == merged[i].name);
      CHECK(back.modules[i].rank == merged[i].merged.rank());
      CHECK(back.modules[i].scale == Approx(1.0).epsilon(1e-12));
    }
    fs::remove_all(out);
  }
}

TEST_CASE("adapters with different modules or shapes are refused by name", "[merge][peft]") {
  const io::PeftAdapter adapter = io::read_peft_adapter(fixture());
  io::PeftAdapter fewer = adapter;
  fewer.modules.erase(fewer.modules.begin() + 3);
  std::vector<std::string> names;
  std::vector<merge::MergeInput> inputs;
  REQUIRE_THROWS_WITH(merge::collect_modules({adapter, fewer}, {}, names, inputs),
                      Catch::Contains(adapter.modules[3].name) &&
                          Catch::Contains("not in adapter 1"));
  io::PeftAdapter narrower = adapter;
  narrower.modules[5].a.shape[1] -= 1;
  narrower.modules[5].a.values.resize(narrower.modules[5].a.values.size() - 8);
  REQUIRE_THROWS_WITH(merge::collect_modules({adapter, narrower}, {}, names, inputs),
                      Catch::Contains(adapter.modules[5].name) && Catch::Contains("d_out x d_in"));
  REQUIRE_THROWS_WITH(merge::collect_modules({adapter, adapter}, {1.0}, names, inputs),
                      Catch::Contains("1 weights for 2 adapters"));
}
