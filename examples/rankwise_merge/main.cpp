// rankwise-merge: merges PEFT LoRA adapters module by module with LoRA-LEGO
// or a baseline, writes a PEFT adapter PEFT can load and, on request, a JSON
// quality report.
#include <rankwise/io.hpp>
#include <rankwise/merge.hpp>

#if defined(RANKWISE_MERGE_WITH_CUDA)
#include "gpu_gram.hpp"
#endif

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

namespace {

const char* kUsage =
    "usage: rankwise-merge --method lego|sum|svd|ties|linear --rank K [--weights w1,w2,...]\n"
    "                      [--seed S] [--report FILE.json] [--threads N] [--density D]\n"
    "                      [--dtype f32|f16|bf16] [--device cpu|cuda] [--overwrite]\n"
    "                      [--allow-duplicates] [--modules-to-save-from N] -o OUT_DIR\n"
    "                      ADAPTER_DIR...\n"
    "\n"
    "Merges the PEFT LoRA adapters ADAPTER_DIR... module by module into one adapter of rank K\n"
    "written to OUT_DIR (a new directory; written elsewhere first, then renamed into place).\n"
    "  lego    LoRA-LEGO: k-means over the adapters' rank-one units (k = K), reweighted\n"
    "  sum     exact weighted sum by concatenation (rank = sum of the ranks; K ignored)\n"
    "  svd     the best rank-K approximation of the exact sum (from the factors)\n"
    "  ties    TIES on each module's dense ΔW (PEFT semantics), then rank K by SVD\n"
    "  linear  PEFT's A/B-separate 'linear' rule: inexact (cross terms), for parity only\n"
    "--rank     1 to 1000000                     --seed     k-means / SVD seed, 0 to 2^64-1\n"
    "--weights  one finite number per adapter (default 1)\n"
    "--report   JSON quality report per module   --threads  worker threads, 1 to 1024 (default 2)\n"
    "--density  TIES density in (0, 1] (default 0.2)   --dtype output dtype (default f32)\n"
    "--device   where lego computes its distances: cpu (default) or cuda (cuBLAS, when built\n"
    "           with CUDA and a device is present)\n"
    "--allow-duplicates  merge the same adapter directory more than once (refused otherwise)\n"
    "--modules-to-save-from N  take the modules_to_save tensors (whole modules PEFT saves, e.g.\n"
    "           a classifier head) from input N (0-based); without it they are carried when\n"
    "           every input holds the same ones, and the merge is refused otherwise\n"
    "\n"
    "Exit status: 0 merged; 1 an input was refused or the merge failed (nothing written);\n"
    "2 a usage error or an unexpected failure (nothing written).\n";

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "rankwise-merge: " << message << "\n\n" << kUsage;
  std::exit(2);
}

// A flag's value quoted for a message, cut so that a huge argument stays readable.
std::string shown(const std::string& text) {
  return "'" + (text.size() > 60 ? text.substr(0, 60) + "..." : text) + "'";
}

std::vector<double> parse_weights(const std::string& text) {
  std::vector<double> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    char* end = nullptr;
    errno = 0;
    const double w = std::strtod(item.c_str(), &end);
    if (item.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(w)) {
      usage_error("bad weight " + shown(item) + ": expected a finite number");
    }
    out.push_back(w);
  }
  if (out.empty() || (!text.empty() && text.back() == ',')) {
    usage_error("--weights expects a comma-separated list of numbers, got " + shown(text));
  }
  return out;
}

// A decimal integer in [lo, hi]: the whole argument must be digits (an
// optional '-'), and values out of range are refused rather than saturated.
long long parse_integer(const std::string& flag, const std::string& text, long long lo,
                        long long hi) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || std::isspace(static_cast<unsigned char>(text[0]))) {
    usage_error(flag + " expects an integer, got " + shown(text));
  }
  if (errno == ERANGE || v < lo || v > hi) {
    usage_error(flag + " must be between " + std::to_string(lo) + " and " + std::to_string(hi) +
                ", got " + shown(text));
  }
  return v;
}

std::uint64_t parse_seed(const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || !std::isdigit(static_cast<unsigned char>(text[0]))) {
    usage_error("--seed expects a non-negative integer, got " + shown(text));
  }
  if (errno == ERANGE) usage_error("--seed must be below 2^64, got " + shown(text));
  return static_cast<std::uint64_t>(v);
}

double parse_density(const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const double d = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno == ERANGE) {
    usage_error("--density expects a number, got " + shown(text));
  }
  if (!(d > 0.0 && d <= 1.0)) usage_error("--density must be in (0, 1], got " + shown(text));
  return d;
}

// The directory's identity for the duplicate check: its canonical path when
// it exists (so "a", "./a/" and a symlink to a agree), else its normal form.
std::string identity_of(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path canonical = fs::canonical(dir, ec);
  if (!ec) return canonical.string();
  return fs::absolute(dir, ec).lexically_normal().string();
}

// Writes `text` to a fresh file next to `path` and returns the file's name;
// renamed into place only once the adapter is written, so a failure leaves
// neither file behind.
std::filesystem::path stage_report(const std::string& path, const std::string& text) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  std::error_code ec;
  if (fs::is_directory(target, ec)) {
    throw rankwise::error(rankwise::ErrorCode::kIo,
                          "cannot write report \"" + path + "\": it is a directory");
  }
  const fs::path staged = rankwise::io::detail::temporary_sibling(target, "report");
  std::ofstream file(staged, std::ios::binary | std::ios::trunc);
  if (!file.is_open()) {
    throw rankwise::error(
        rankwise::ErrorCode::kIo,
        "cannot write report \"" + path + "\": cannot create \"" + staged.string() + "\"");
  }
  file << text;
  file.close();
  if (!file) {
    fs::remove(staged, ec);
    throw rankwise::error(rankwise::ErrorCode::kIo, "cannot write report \"" + path + "\"");
  }
  return staged;
}

int run(int argc, char** argv) {
  namespace merge = rankwise::merge;
  namespace io = rankwise::io;
  namespace fs = std::filesystem;
  merge::MergeOptions options;
  std::string out_dir, report_path, method = "";
  std::vector<std::string> inputs;
  std::vector<double> weights;
  io::DType dtype = io::DType::kF32;
  bool overwrite = false, rank_given = false, allow_duplicates = false;
  std::string device = "cpu";
  std::optional<std::size_t> saved_from;
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
      options.rank = parse_integer(arg, value(), 1, 1000000);
      rank_given = true;
    } else if (arg == "--weights") {
      weights = parse_weights(value());
    } else if (arg == "--seed") {
      options.seed = parse_seed(value());
    } else if (arg == "--report") {
      report_path = value();
      if (report_path.empty()) usage_error("--report needs a file name");
    } else if (arg == "--threads") {
      options.threads = static_cast<int>(parse_integer(arg, value(), 1, 1024));
    } else if (arg == "--density") {
      options.ties.density = parse_density(value());
    } else if (arg == "--dtype") {
      const std::string d = value();
      if (d == "f32")
        dtype = io::DType::kF32;
      else if (d == "f16")
        dtype = io::DType::kF16;
      else if (d == "bf16")
        dtype = io::DType::kBF16;
      else
        usage_error("--dtype must be f32, f16 or bf16, got " + shown(d));
    } else if (arg == "--device") {
      device = value();
      if (device != "cpu" && device != "cuda") usage_error("--device must be cpu or cuda");
    } else if (arg == "--overwrite") {
      overwrite = true;
    } else if (arg == "--allow-duplicates") {
      allow_duplicates = true;
    } else if (arg == "--modules-to-save-from") {
      saved_from = static_cast<std::size_t>(parse_integer(arg, value(), 0, 1000000));
    } else if (arg == "-o" || arg == "--output") {
      out_dir = value();
    } else if (!arg.empty() && arg[0] == '-') {
      usage_error("unknown option " + shown(arg));
    } else {
      inputs.push_back(arg);
    }
  }
  if (method.empty()) usage_error("--method is required");
  if (out_dir.empty()) usage_error("-o OUT_DIR is required");
  if (inputs.empty()) usage_error("at least one ADAPTER_DIR is required");
  if (!weights.empty() && weights.size() != inputs.size()) {
    usage_error("--weights has " + std::to_string(weights.size()) + " values for " +
                std::to_string(inputs.size()) + " adapters");
  }
  if (saved_from && *saved_from >= inputs.size()) {
    usage_error("--modules-to-save-from " + std::to_string(*saved_from) + " names no input (" +
                std::to_string(inputs.size()) + " adapters, numbered from 0)");
  }
  if (!allow_duplicates) {
    std::map<std::string, std::size_t> seen;
    for (std::size_t t = 0; t < inputs.size(); ++t) {
      const auto it = seen.emplace(identity_of(inputs[t]), t);
      if (!it.second) {
        usage_error("adapters " + std::to_string(it.first->second) + " (" +
                    shown(inputs[it.first->second]) + ") and " + std::to_string(t) + " (" +
                    shown(inputs[t]) + ") are the same directory " + shown(it.first->first) +
                    "; pass --allow-duplicates to merge an adapter with itself");
      }
    }
  }
  if (!report_path.empty() && identity_of(out_dir) == identity_of(report_path)) {
    usage_error("--report and -o name the same path");
  }
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
  merge::collect_modules(adapters, weights, names, modules, inputs);
  // Whole saved modules cannot be merged, only carried: checked before any work.
  std::vector<const std::map<std::string, io::SafetensorsTensor>*> saved;
  for (const auto& a : adapters) saved.push_back(&a.saved_tensors);
  const auto carried = io::merged_saved_tensors(saved, inputs, saved_from);
  std::cerr << "rankwise-merge: " << method << " of " << adapters.size() << " adapters, "
            << names.size() << " modules\n";
  // A line at each tenth of the modules: readable in a terminal and in a log.
  options.progress = [&](std::size_t done, std::size_t total) {
    if (done == total || (10 * done) / total != (10 * (done - 1)) / total) {
      std::cerr << "  merged " << done << " / " << total << " modules\n";
    }
  };
  const std::vector<merge::ModuleMerge> merged = merge::merge_modules(names, modules, options);
  const nlohmann::json report = merge::quality_report(merged, options, inputs);

  // The report is staged before the adapter is written and renamed after, so
  // an unwritable report path fails before anything appears.
  fs::path staged_report;
  if (!report_path.empty()) staged_report = stage_report(report_path, report.dump(2) + "\n");
  std::error_code ec;
  const bool existed = fs::exists(out_dir, ec);
  try {
    io::PeftAdapter out = merge::to_peft_adapter(merged, adapters.front());
    out.modules_to_save = adapters[saved_from.value_or(0)].modules_to_save;
    out.saved_tensors = carried;
    io::write_peft_adapter(out, out_dir, dtype, overwrite);
    if (!staged_report.empty()) {
      fs::rename(staged_report, report_path, ec);
      if (ec) {
        if (!existed) fs::remove_all(out_dir);
        throw rankwise::error(
            rankwise::ErrorCode::kIo,
            "cannot move the report into \"" + report_path + "\" (" + ec.message() + ")");
      }
    }
  } catch (...) {
    if (!staged_report.empty()) fs::remove(staged_report, ec);
    throw;
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("wrote %s: %zu modules, mean relative error %.4g, %.2f s\n", out_dir.c_str(),
              merged.size(), report["mean_relative_error"].get<double>(), seconds);
  return 0;
}

}  // namespace

// Every failure ends here with a message and a status, never in an abort.
int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const rankwise::error& e) {
    std::cerr << "\nrankwise-merge: " << e.what() << "\n";
    return 1;
  } catch (const std::bad_alloc&) {
    std::cerr << "\nrankwise-merge: out of memory (the merge needs more memory than is "
                 "available; try a smaller --rank)\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "\nrankwise-merge: unexpected error: " << e.what() << "\n";
    return 2;
  } catch (...) {
    std::cerr << "\nrankwise-merge: unexpected error of unknown type\n";
    return 2;
  }
}
