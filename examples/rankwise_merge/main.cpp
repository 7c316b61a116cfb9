// rankwise-merge: merges PEFT LoRA adapters module by module with LoRA-LEGO
// or a baseline, writes a PEFT adapter PEFT can load and, on request, a JSON
// quality report.
#include <rankwise/rankwise.hpp>

#if defined(RANKWISE_MERGE_WITH_CUDA)
#include "gpu_gram.hpp"
#endif

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

const char* kUsage =
    "usage: rankwise-merge --method lego|sum|svd|ties|linear --rank K [--weights w1,w2,...]\n"
    "                      [--seed S] [--report FILE.json] [--threads N] [--density D]\n"
    "                      [--dtype f32|f16|bf16] [--device cpu|cuda] [--overwrite]\n"
    "                      -o OUT_DIR ADAPTER_DIR...\n"
    "\n"
    "Merges the PEFT LoRA adapters ADAPTER_DIR... module by module into one adapter of rank K\n"
    "written to OUT_DIR (a new directory; written elsewhere first, then renamed into place).\n"
    "  lego    LoRA-LEGO: k-means over the adapters' rank-one units (k = K), reweighted\n"
    "  sum     exact weighted sum by concatenation (rank = sum of the ranks; K ignored)\n"
    "  svd     the best rank-K approximation of the exact sum (from the factors)\n"
    "  ties    TIES on each module's dense ΔW (PEFT semantics), then rank K by SVD\n"
    "  linear  PEFT's A/B-separate 'linear' rule: inexact (cross terms), for parity only\n"
    "--weights  one per adapter (default 1)      --seed     k-means / SVD seed (default 0)\n"
    "--report   JSON quality report per module   --threads  worker threads (default 2)\n"
    "--density  TIES density (default 0.2)       --dtype    output dtype (default f32)\n"
    "--device   where lego computes its distances: cpu (default) or cuda (cuBLAS, when built\n"
    "           with CUDA and a device is present)\n";

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "rankwise-merge: " << message << "\n\n" << kUsage;
  std::exit(2);
}

std::vector<double> parse_weights(const std::string& text) {
  std::vector<double> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    char* end = nullptr;
    const double w = std::strtod(item.c_str(), &end);
    if (item.empty() || *end != '\0' || !std::isfinite(w)) usage_error("bad weight '" + item + "'");
    out.push_back(w);
  }
  return out;
}

long long parse_integer(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0') usage_error(flag + " expects an integer, got '" + text + "'");
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  namespace merge = rankwise::merge;
  namespace io = rankwise::io;
  merge::MergeOptions options;
  std::string out_dir, report_path, method = "";
  std::vector<std::string> inputs;
  std::vector<double> weights;
  io::DType dtype = io::DType::kF32;
  bool overwrite = false, rank_given = false;
  std::string device = "cpu";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (arg == "--method") {
      method = value();
    } else if (arg == "--rank") {
      options.rank = parse_integer(arg, value());
      rank_given = true;
    } else if (arg == "--weights") {
      weights = parse_weights(value());
    } else if (arg == "--seed") {
      options.seed = static_cast<std::uint64_t>(parse_integer(arg, value()));
    } else if (arg == "--report") {
      report_path = value();
    } else if (arg == "--threads") {
      options.threads = static_cast<int>(parse_integer(arg, value()));
    } else if (arg == "--density") {
      options.ties.density = std::strtod(value().c_str(), nullptr);
    } else if (arg == "--dtype") {
      const std::string d = value();
      if (d == "f32") dtype = io::DType::kF32;
      else if (d == "f16") dtype = io::DType::kF16;
      else if (d == "bf16") dtype = io::DType::kBF16;
      else usage_error("--dtype must be f32, f16 or bf16, got '" + d + "'");
    } else if (arg == "--device") {
      device = value();
      if (device != "cpu" && device != "cuda") usage_error("--device must be cpu or cuda");
    } else if (arg == "--overwrite") {
      overwrite = true;
    } else if (arg == "-o" || arg == "--output") {
      out_dir = value();
    } else if (!arg.empty() && arg[0] == '-') {
      usage_error("unknown option " + arg);
    } else {
      inputs.push_back(arg);
    }
  }
  if (method.empty()) usage_error("--method is required");
  if (out_dir.empty()) usage_error("-o OUT_DIR is required");
  if (inputs.empty()) usage_error("at least one ADAPTER_DIR is required");
  try {
    options.method = merge::parse_merge_method(method);
    if (!rank_given && options.method != merge::MergeMethod::kSum &&
        options.method != merge::MergeMethod::kLinear) {
      usage_error("--rank K is required for --method " + method);
    }
    if (options.method == merge::MergeMethod::kLinear) {
      std::cerr << "rankwise-merge: warning: 'linear' is PEFT's inexact rule (A and B combined "
                   "separately, so cross terms B_t A_u enter); use svd or lego for a real merge\n";
    }
    if (device == "cuda") {
#if defined(RANKWISE_MERGE_WITH_CUDA)
      options.lego.gram = gpu_gram();
#else
      usage_error("--device cuda: this build of rankwise-merge has no CUDA support");
#endif
    }
    const auto start = std::chrono::steady_clock::now();
    std::vector<io::PeftAdapter> adapters;
    for (const auto& dir : inputs) adapters.push_back(io::read_peft_adapter(dir));
    std::vector<std::string> names;
    std::vector<merge::MergeInput> modules;
    merge::collect_modules(adapters, weights, names, modules);
    std::cerr << "rankwise-merge: " << method << " of " << adapters.size() << " adapters, "
              << names.size() << " modules\n";
    // A line at each tenth of the modules: readable in a terminal and in a log.
    options.progress = [&](std::size_t done, std::size_t total) {
      if (done == total || (10 * done) / total != (10 * (done - 1)) / total) {
        std::cerr << "  merged " << done << " / " << total << " modules\n";
      }
    };
    const std::vector<merge::ModuleMerge> merged = merge::merge_modules(names, modules, options);
    io::write_peft_adapter(merge::to_peft_adapter(merged, adapters.front()), out_dir, dtype,
                           overwrite);
    const nlohmann::json report = merge::quality_report(merged, options, inputs);
    if (!report_path.empty()) {
      std::ofstream file(report_path);
      file << report.dump(2) << "\n";
      if (!file) throw rankwise::error(rankwise::ErrorCode::kIo, "cannot write report " + report_path);
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("wrote %s: %zu modules, mean relative error %.4g, %.2f s\n", out_dir.c_str(),
                merged.size(), report["mean_relative_error"].get<double>(), seconds);
  } catch (const rankwise::error& e) {
    std::cerr << "\nrankwise-merge: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
