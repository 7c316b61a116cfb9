// Records every result of a Google Benchmark run and prints the LoRA ratio
// table from them. Shared by the CPU and the GPU benchmark; no Eigen, no CUDA.
//
// Each ratio divides two times measured in the same binary and the same run,
// never a time against a number from elsewhere: the machines are shared and
// noisy, ratios of neighbours are what stays meaningful.
#pragma once

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <ostream>
#include <streambuf>
#include <string>
#include <vector>

#include "support/sizes.hpp"

namespace rankwise {
namespace bench {

/// One benchmark's time per call, in seconds (median over repetitions):
/// wall-clock (manual, for the GPU) and CPU time. format_time, format_ratio
/// and verdict read real_s; RecordingReporter::use_cpu_time(true) makes find()
/// hand out CPU time in real_s, so the same table code prints either clock.
struct Measurement {
  double real_s = 0;
  double cpu_s = 0;
};

/// The value of `--<name>=` on the command line ("" when absent; the last one wins).
inline std::string flag_value(int argc, char** argv, const char* name) {
  const std::string prefix = std::string("--") + name + "=";
  std::string value;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) value = argv[i] + prefix.size();
  }
  return value;
}

/// Console options for RecordingReporter: tabular counters, colour only on a
/// terminal and unless --benchmark_color=false|no|0 was given (Google
/// Benchmark applies that flag only to the reporter it creates itself).
inline benchmark::ConsoleReporter::OutputOptions console_options(int argc, char** argv) {
  bool color = isatty(fileno(stdout)) != 0;
  const std::string value = flag_value(argc, argv, "benchmark_color");
  if (value == "false" || value == "no" || value == "0") color = false;
  if (value == "true" || value == "yes" || value == "1") color = true;
  return color ? benchmark::ConsoleReporter::OO_ColorTabular
               : benchmark::ConsoleReporter::OO_Tabular;
}

/// A std::streambuf writing to a C stream.
class FileStreamBuf : public std::streambuf {
 public:
  explicit FileStreamBuf(std::FILE* file) : file_(file) {}

 protected:
  int_type overflow(int_type c) override {
    if (traits_type::eq_int_type(c, traits_type::eof())) return traits_type::not_eof(c);
    return std::fputc(c, file_) == EOF ? traits_type::eof() : c;
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    return static_cast<std::streamsize>(std::fwrite(s, 1, static_cast<std::size_t>(n), file_));
  }
  int sync() override { return std::fflush(file_) == 0 ? 0 : -1; }

 private:
  std::FILE* file_;
};

/// Google Benchmark's display output, plus a copy of every result keyed by
/// the registered benchmark name (see key() in sizes.hpp).
class RecordingReporter : public benchmark::BenchmarkReporter {
 public:
  /// Console output with `options` (see console_options()).
  explicit RecordingReporter(benchmark::ConsoleReporter::OutputOptions options)
      : display_(std::make_unique<benchmark::ConsoleReporter>(options)) {}

  /// The display --benchmark_format asks for (Google Benchmark applies that
  /// flag only to a reporter it creates itself): console, or json, with which
  /// standard output carries the JSON alone and whatever else the benchmark
  /// prints (header, tables) goes to standard error, so it stays parseable.
  /// (csv, deprecated by Google Benchmark, gets the console.) Construct it
  /// before printing anything, and before benchmark::Initialize takes the
  /// flags out of argv.
  RecordingReporter(int argc, char** argv) {
    if (flag_value(argc, argv, "benchmark_format") != "json") {
      display_ = std::make_unique<benchmark::ConsoleReporter>(console_options(argc, argv));
      return;
    }
    display_ = std::make_unique<benchmark::JSONReporter>();
    std::fflush(stdout);
    const int machine_fd = dup(STDOUT_FILENO);
    machine_file_ = machine_fd < 0 ? nullptr : fdopen(machine_fd, "w");
    if (machine_file_ == nullptr) return;  // leave everything on stdout
    dup2(STDERR_FILENO, STDOUT_FILENO);
    machine_buf_ = std::make_unique<FileStreamBuf>(machine_file_);
    machine_out_ = std::make_unique<std::ostream>(machine_buf_.get());
    display_->SetOutputStream(machine_out_.get());
  }

  RecordingReporter(const RecordingReporter&) = delete;
  RecordingReporter& operator=(const RecordingReporter&) = delete;

  ~RecordingReporter() override {
    if (machine_file_ == nullptr) return;
    machine_out_->flush();
    std::fflush(stdout);
    dup2(fileno(machine_file_), STDOUT_FILENO);
    std::fclose(machine_file_);
  }

  bool ReportContext(const Context& context) override { return display_->ReportContext(context); }
  void Finalize() override { display_->Finalize(); }

  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      const std::string& name = run.run_name.function_name;
      if (run.error_occurred) {
        errors_.push_back(name + ": " + run.error_message);
        continue;
      }
      const double unit = benchmark::GetTimeUnitMultiplier(run.time_unit);
      const Measurement m{run.GetAdjustedRealTime() / unit, run.GetAdjustedCPUTime() / unit};
      if (run.run_type == Run::RT_Aggregate) {
        if (run.aggregate_name == "median" && run.aggregate_unit == benchmark::kTime) {
          medians_[name] = m;
        }
        continue;
      }
      if (run.iterations > 0) samples_[name].push_back(m);
    }
    display_->ReportRuns(runs);
  }

  /// The time of `name`, or nullptr when it did not run (filtered out, failed).
  const Measurement* find(const std::string& name) {
    auto med = medians_.find(name);
    if (med == medians_.end()) {
      auto it = samples_.find(name);
      if (it == samples_.end() || it->second.empty()) return nullptr;
      std::vector<double> real, cpu;
      for (const Measurement& m : it->second) {
        real.push_back(m.real_s);
        cpu.push_back(m.cpu_s);
      }
      std::sort(real.begin(), real.end());
      std::sort(cpu.begin(), cpu.end());
      const Measurement m{real[real.size() / 2], cpu[cpu.size() / 2]};
      med = medians_.emplace(name, m).first;
    }
    if (!cpu_time_) return &med->second;
    Measurement& cpu_view = cpu_view_[name];
    cpu_view = Measurement{med->second.cpu_s, med->second.cpu_s};
    return &cpu_view;
  }

  /// Whether the table uses CPU time instead of wall-clock time. CPU time
  /// leaves out the time the process was descheduled, so on a busy machine it
  /// is the steadier measure of single-threaded CPU work; never for the GPU.
  void use_cpu_time(bool cpu) { cpu_time_ = cpu; }
  bool cpu_time() const { return cpu_time_; }

  const std::vector<std::string>& errors() const { return errors_; }

  /// Names of runs whose CPU time was under `fraction` of their wall time: the
  /// process was descheduled (a busy machine), so ratios involving them are
  /// noisy. Only names starting with `prefix`: CPU time counts the benchmark
  /// thread alone, so this says nothing about runs on several threads.
  std::vector<std::string> preempted(double fraction, const std::string& prefix = "") const {
    std::vector<std::string> out;
    auto busy = [fraction](const Measurement& m) {
      return m.real_s > 0 && m.cpu_s < fraction * m.real_s;
    };
    auto named = [&prefix](const std::string& name) { return name.rfind(prefix, 0) == 0; };
    for (const auto& kv : medians_) {
      if (named(kv.first) && busy(kv.second)) out.push_back(kv.first);
    }
    for (const auto& kv : samples_) {
      if (named(kv.first) && medians_.count(kv.first) == 0 &&
          std::any_of(kv.second.begin(), kv.second.end(), busy)) {
        out.push_back(kv.first);
      }
    }
    return out;
  }

 private:
  std::map<std::string, std::vector<Measurement>> samples_;
  std::map<std::string, Measurement> medians_;
  std::map<std::string, Measurement> cpu_view_;  // CPU time in real_s
  std::vector<std::string> errors_;
  bool cpu_time_ = false;
  std::unique_ptr<benchmark::BenchmarkReporter> display_;
  // With json: the original standard output, which display_ writes to.
  std::FILE* machine_file_ = nullptr;
  std::unique_ptr<FileStreamBuf> machine_buf_;
  std::unique_ptr<std::ostream> machine_out_;
};

/// "123.4 us" etc.; "-" when missing.
inline std::string format_time(const Measurement* m) {
  if (m == nullptr) return "-";
  const double s = m->real_s;
  char buf[32];
  if (s < 1e-6) std::snprintf(buf, sizeof buf, "%.1f ns", s * 1e9);
  else if (s < 1e-3) std::snprintf(buf, sizeof buf, "%.1f us", s * 1e6);
  else if (s < 1.0) std::snprintf(buf, sizeof buf, "%.2f ms", s * 1e3);
  else std::snprintf(buf, sizeof buf, "%.3f s", s);
  return buf;
}

inline std::string format_ratio(const Measurement* num, const Measurement* den) {
  if (num == nullptr || den == nullptr || den->real_s <= 0) return "-";
  const double r = num->real_s / den->real_s;
  char buf[32];
  if (r < 0.001) std::snprintf(buf, sizeof buf, "%.2e", r);
  else if (r < 100) std::snprintf(buf, sizeof buf, "%.3f", r);
  else std::snprintf(buf, sizeof buf, "%.0f", r);
  return buf;
}

struct Tally {
  int pass = 0;
  int miss = 0;
  Tally& operator+=(const Tally& other) {
    pass += other.pass;
    miss += other.miss;
    return *this;
  }
};

// A ratio against its target, an upper bound unless `at_least`: "PASS (0.93
// <= 1.10)", "MISS (1.31 > 1.20)", "PASS (1.92 >= 1.80)", counted into
// `tally`; "n/a (not measured)" for r < 0 (a time is missing).
inline std::string judge(double r, double target, Tally* tally, bool at_least = false) {
  if (r < 0) return "n/a (not measured)";
  const bool ok = at_least ? r >= target : r <= target;
  ++(ok ? tally->pass : tally->miss);
  const char* relation = at_least ? (ok ? ">=" : "<") : (ok ? "<=" : ">");
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s (%.2f %s %.2f)", ok ? "PASS" : "MISS", r, relation, target);
  return buf;
}

// judge() of num / den (real_s); "n/a" when a time is missing.
inline std::string verdict(const Measurement* num, const Measurement* den, double target,
                           Tally* tally) {
  if (num == nullptr || den == nullptr || den->real_s <= 0) return "n/a (not measured)";
  return judge(num->real_s / den->real_s, target, tally);
}

/// Prints the forward and backward ratio tables of one backend (`backend` is
/// the key prefix, e.g. "cpu_f32") for every size that has results. Returns
/// the PASS/MISS tally. Purely informational: callers exit 0 either way.
inline Tally print_ratio_table(RecordingReporter& rec, const std::string& backend,
                               const std::string& title, bool quick) {
  Tally tally;
  const auto& rs = ranks(quick);
  const auto& ns = token_counts(quick);
  bool any = false;
  for (std::int64_t r : rs) {
    for (std::int64_t n : ns) {
      any = any || rec.find(key(backend, "delta_fwd", r, n)) != nullptr ||
            rec.find(key(backend, "delta_bwd", r, n)) != nullptr;
    }
  }
  if (!any) return tally;  // this backend was filtered out
  std::printf("\n== %s: LoRA delta, d_in = d_out = %lld; %s time per call, ratios of "
              "times from this run ==\n",
              title.c_str(), static_cast<long long>(kDim), rec.cpu_time() ? "CPU" : "wall-clock");
  std::printf("Targets: N >= %lld: delta fwd/bwd <= %.1fx its raw GEMMs; N = 1: delta fwd "
              "<= %.1fx reading A and B once from memory.\n",
              static_cast<long long>(kGemmTargetMinTokens), kGemmTarget, kReadTarget);
  std::printf("\nforward: delta = y += s*x*A^T*B^T; 2gemm = the same two GEMMs on raw "
              "matrices; base = x*W0^T; naive = materialise s*B*A, then x*dW^T\n");
  std::printf("%4s %5s %11s %11s %11s %11s | %9s %9s %9s | %11s %9s | %s\n", "r", "N",
              "delta fwd", "2gemm", "base", "naive", "/2gemm", "/base", "/naive",
              "read A,B", "/read", "target");
  for (std::int64_t r : rs) {
    for (std::int64_t n : ns) {
      const Measurement* fwd = rec.find(key(backend, "delta_fwd", r, n));
      if (fwd == nullptr) continue;
      const Measurement* gemm = rec.find(key(backend, "gemm_fwd", r, n));
      const Measurement* base = rec.find(key(backend, "base", 0, n));
      const Measurement* naive = rec.find(key(backend, "naive", r, n));
      const Measurement* read = n == 1 ? rec.find(key(backend, "read", r, 0)) : nullptr;
      std::string target = "- (no target at this N)";
      if (n >= kGemmTargetMinTokens) target = "2gemm " + verdict(fwd, gemm, kGemmTarget, &tally);
      if (n == 1) target = "read " + verdict(fwd, read, kReadTarget, &tally);
      std::printf("%4lld %5lld %11s %11s %11s %11s | %9s %9s %9s | %11s %9s | %s\n",
                  static_cast<long long>(r), static_cast<long long>(n), format_time(fwd).c_str(),
                  format_time(gemm).c_str(), format_time(base).c_str(),
                  format_time(naive).c_str(), format_ratio(fwd, gemm).c_str(),
                  format_ratio(fwd, base).c_str(), format_ratio(fwd, naive).c_str(),
                  n == 1 ? format_time(read).c_str() : "", n == 1 ? format_ratio(fwd, read).c_str() : "",
                  target.c_str());
    }
  }
  std::printf("\nbackward: delta = dA, dB and dx += (rankwise backward); 5gemm = the same five "
              "GEMMs on raw matrices\n");
  std::printf("%4s %5s %11s %11s | %9s %9s %9s | %9s | %s\n", "r", "N", "delta bwd", "5gemm",
              "/5gemm", "/base", "/fwd", "/read", "target");
  for (std::int64_t r : rs) {
    for (std::int64_t n : ns) {
      const Measurement* bwd = rec.find(key(backend, "delta_bwd", r, n));
      if (bwd == nullptr) continue;
      const Measurement* gemm = rec.find(key(backend, "gemm_bwd", r, n));
      const Measurement* base = rec.find(key(backend, "base", 0, n));
      const Measurement* fwd = rec.find(key(backend, "delta_fwd", r, n));
      const Measurement* read = n == 1 ? rec.find(key(backend, "read", r, 0)) : nullptr;
      std::string target = "- (no target at this N)";
      if (n >= kGemmTargetMinTokens) target = "5gemm " + verdict(bwd, gemm, kGemmTarget, &tally);
      std::printf("%4lld %5lld %11s %11s | %9s %9s %9s | %9s | %s\n", static_cast<long long>(r),
                  static_cast<long long>(n), format_time(bwd).c_str(), format_time(gemm).c_str(),
                  format_ratio(bwd, gemm).c_str(), format_ratio(bwd, base).c_str(),
                  format_ratio(bwd, fwd).c_str(), n == 1 ? format_ratio(bwd, read).c_str() : "",
                  target.c_str());
    }
  }
  return tally;
}

/// Failed benchmarks and the PASS/MISS summary; always informational.
inline void print_summary(RecordingReporter& rec, const Tally& tally, const char* which = "") {
  for (const std::string& e : rec.errors()) std::printf("benchmark error: %s\n", e.c_str());
  std::printf("\ntargets%s: %d PASS, %d MISS (informational: the benchmark exits 0 either way)\n",
              which, tally.pass, tally.miss);
}

}  // namespace bench
}  // namespace rankwise
