// rankwise-inspect: prints what an adapter directory (PEFT LoRA, SMoRA, rankwise MoS) holds,
// as a table or as JSON, and what is wrong with it.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "inspect.hpp"

namespace {

const char* kUsage =
    "usage: rankwise-inspect [--json] ADAPTER_DIR...\n"
    "\n"
    "Summarises each adapter directory (adapter_config.json + adapter_model.safetensors):\n"
    "kind, base model, modules with rank, widths, alpha, scale, dtype and bytes, the tensors\n"
    "that are not LoRA factors, non-finite values per tensor, and every problem found.\n"
    "Exit status: 0 every adapter is usable; 1 some adapter has a problem; 2 usage error.\n";

std::string number(double v, bool known) {
  if (!known) return "-";
  std::ostringstream out;
  out << v;
  return out.str();
}

void print_table(const inspect::Summary& s) {
  std::cout << s.dir << "\n  kind: " << s.kind
            << "\n  base model: " << (s.base_model.empty() ? "-" : s.base_model) << "\n";
  std::uint64_t bytes = 0;
  for (const auto& t : s.tensors) bytes += t.bytes;
  std::cout << "  " << s.modules.size() << " modules, " << s.tensors.size() << " tensors, " << bytes
            << " bytes\n";
  if (!s.modules.empty()) {
    std::cout << "  " << std::left << std::setw(60) << "module" << std::right << std::setw(6)
              << "rank" << std::setw(8) << "d_in" << std::setw(8) << "d_out" << std::setw(9)
              << "alpha" << std::setw(10) << "scale" << std::setw(6) << "dtype" << std::setw(10)
              << "bytes"
              << "\n";
    // Alpha and scale come from the format's reader: "-" when it refused the adapter.
    const bool known =
        s.ok() || std::any_of(s.modules.begin(), s.modules.end(),
                              [](const inspect::ModuleInfo& m) { return m.scale != 0; });
    for (const auto& m : s.modules) {
      std::cout << "  " << std::left << std::setw(60) << m.name << std::right << std::setw(6)
                << m.rank << std::setw(8) << m.d_in << std::setw(8) << m.d_out << std::setw(9)
                << number(m.alpha, known) << std::setw(10) << number(m.scale, known) << std::setw(6)
                << m.dtype << std::setw(10) << m.bytes << "\n";
    }
  }
  bool header = false;
  for (const auto& t : s.tensors) {
    if (t.role == "lora_A" || t.role == "lora_B") continue;
    if (!header) std::cout << "  tensors that are not LoRA factors:\n";
    header = true;
    std::cout << "    " << t.name << "  [" << t.role << "] " << t.dtype << " "
              << inspect::shape_text(t.shape) << "\n";
  }
  header = false;
  for (const auto& t : s.tensors) {
    if (t.non_finite <= 0) continue;
    if (!header) std::cout << "  non-finite values:\n";
    header = true;
    std::cout << "    " << t.name << ": " << t.non_finite << " of " << t.numel << "\n";
  }
  if (s.ok()) {
    std::cout << "  status: ok\n";
  } else {
    std::cout << "  status: BROKEN\n";
    for (const auto& p : s.problems) std::cout << "    problem: " << p << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool json = false;
  std::vector<std::string> dirs;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--json") {
      json = true;
    } else if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (!arg.empty() && arg[0] == '-') {
      std::cerr << "rankwise-inspect: unknown flag \"" << arg << "\"\n\n" << kUsage;
      return 2;
    } else {
      dirs.push_back(arg);
    }
  }
  if (dirs.empty()) {
    std::cerr << "rankwise-inspect: no adapter directory given\n\n" << kUsage;
    return 2;
  }
  bool all_ok = true;
  nlohmann::json out = nlohmann::json::array();
  try {
    for (const auto& dir : dirs) {
      const inspect::Summary s = inspect::summarize(dir);
      all_ok = all_ok && s.ok();
      if (json) {
        out.push_back(inspect::to_json(s));
      } else {
        print_table(s);
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "rankwise-inspect: " << e.what() << "\n";
    return 2;
  }
  if (json) {
    std::cout << (dirs.size() == 1 ? out[0] : out)
                     .dump(2, ' ', false, nlohmann::json::error_handler_t::replace)
              << "\n";
  }
  return all_ok ? 0 : 1;
}
