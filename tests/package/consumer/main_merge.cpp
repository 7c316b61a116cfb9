// A downstream program of rankwise::merge: a PEFT adapter written, read back,
// merged with itself by the exact sum and written again. Exits nonzero on a
// wrong result.
#include <cmath>
#include <cstdio>
#include <rankwise/io.hpp>
#include <rankwise/merge.hpp>
#include <string>
#include <vector>

namespace io = rankwise::io;
namespace merge = rankwise::merge;

int main(int argc, char** argv) {
  if (argc != 2) {
    std::printf("usage: consumer_merge <directory>\n");
    return 2;
  }
  const std::string dir = argv[1];

  io::LoraModule m;
  m.name = "layers.0.q_proj";
  m.rank = 2;
  m.alpha = 4.0;
  m.scale = 2.0;                                            // alpha / rank
  m.a = rankwise::HostTensor{{2, 3}, {1, 2, 3, -1, 0, 2}};  // rank x d_in
  m.b = rankwise::HostTensor{{2, 2}, {1, -2, 0.5, 1}};      // d_out x rank
  io::PeftAdapter adapter;
  adapter.r = 2;
  adapter.lora_alpha = 4.0;
  adapter.target_modules = {"q_proj"};
  adapter.modules = {m};
  io::write_peft_adapter(adapter, dir + "/adapter", io::DType::kF32, /*overwrite=*/true);
  const io::PeftAdapter read = io::read_peft_adapter(dir + "/adapter");

  std::vector<std::string> names;
  std::vector<merge::MergeInput> inputs;
  merge::collect_modules({read, read}, {}, names, inputs);
  merge::MergeOptions options;
  options.method = merge::MergeMethod::kSum;
  options.threads = 1;
  const std::vector<merge::ModuleMerge> merged = merge::merge_modules(names, inputs, options);

  int failures = 0;
  if (merged.size() != 1 || merged[0].name != m.name || merged[0].merged.rank() != 4 ||
      !(merged[0].quality.relative_error < 1e-12)) {
    std::printf("the sum of the adapter with itself is wrong\n");
    ++failures;
  } else {
    // ΔW of the sum is twice the adapter's: 2 · scale · B A.
    const auto delta = merged[0].merged.delta();
    for (int o = 0; o < 2; ++o) {
      for (int i = 0; i < 3; ++i) {
        double expected = 0;
        for (int k = 0; k < 2; ++k) expected += m.b.values[o * 2 + k] * m.a.values[k * 3 + i];
        expected *= 2 * m.scale;
        if (std::abs(delta(o, i) - expected) > 1e-9) {
          std::printf("dW[%d][%d] = %g, expected %g\n", o, i, delta(o, i), expected);
          ++failures;
        }
      }
    }
  }
  io::write_peft_adapter(merge::to_peft_adapter(merged, read), dir + "/merged", io::DType::kF32,
                         /*overwrite=*/true);
  const io::PeftAdapter again = io::read_peft_adapter(dir + "/merged");
  if (again.modules.size() != 1 || again.modules[0].rank != 4) {
    std::printf("the merged adapter does not read back as written\n");
    ++failures;
  }
  std::printf("rankwise merge consumer: %s\n", failures == 0 ? "ok" : "WRONG");
  return failures == 0 ? 0 : 1;
}
