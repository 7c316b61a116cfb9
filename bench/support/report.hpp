// Records every result of a Google Benchmark run for the tables printed after
// it (support/table.hpp), and keeps --benchmark_format=json parseable. Shared
// by every benchmark, CPU and GPU; no Eigen, no CUDA.
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
/// the registered benchmark name.
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

}  // namespace bench
}  // namespace rankwise
