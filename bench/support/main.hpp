// What every benchmark binary's main does: its own flags (--quick and the
// like), this project's Google Benchmark defaults, the recording reporter
// (which keeps --benchmark_format=json parseable), the runs, then the tables
// printed from the results of this run. No Eigen, no CUDA.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "support/report.hpp"
#include "support/table.hpp"

namespace rankwise {
namespace bench {

/// Takes `flag` out of argv (so Google Benchmark does not see it); true when
/// it was there or the environment variable `env` is set to anything but
/// "" or "0".
inline bool take_flag(int* argc, char** argv, const char* flag, const char* env) {
  bool found = false;
  int out = 1;
  for (int i = 1; i < *argc; ++i) {
    if (std::strcmp(argv[i], flag) == 0)
      found = true;
    else
      argv[out++] = argv[i];
  }
  *argc = out;
  argv[out] = nullptr;
  if (const char* v = std::getenv(env)) found = found || (v[0] != '\0' && std::strcmp(v, "0") != 0);
  return found;
}

/// Quick mode (smoke runs, CI): `--quick` or RANKWISE_BENCH_QUICK=1. Each
/// benchmark cuts its sizes and minimum times; the numbers then mean nothing.
inline bool take_quick_flag(int* argc, char** argv) {
  return take_flag(argc, argv, "--quick", "RANKWISE_BENCH_QUICK");
}

/// A byte count from the environment (0 when unset).
inline std::size_t env_bytes(const char* env) {
  const char* v = std::getenv(env);
  return v == nullptr || v[0] == '\0' ? 0 : static_cast<std::size_t>(std::strtoull(v, nullptr, 10));
}

/// argv with this project's defaults, each added only when the command line
/// does not set that flag itself: repetitions with random interleaving, so a
/// burst of load on a shared machine spreads over a benchmark and its
/// baselines alike, and medians in the tables. The result owns the strings
/// `argv_out` points into.
inline std::vector<std::string> with_default_flags(int argc, char** argv, bool quick,
                                                   std::vector<char*>* argv_out) {
  const std::vector<std::string> defaults =
      quick ? std::vector<std::string>{}
            : std::vector<std::string>{"--benchmark_repetitions=3",
                                       "--benchmark_enable_random_interleaving=true",
                                       "--benchmark_display_aggregates_only=true"};
  std::vector<std::string> args{argv[0]};
  for (const std::string& d : defaults) {
    const std::string flag = d.substr(0, d.find('=') + 1);
    bool given = false;
    for (int i = 1; i < argc; ++i)
      given = given || std::strncmp(argv[i], flag.c_str(), flag.size()) == 0;
    if (!given) args.push_back(d);
  }
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
  argv_out->clear();
  for (std::string& a : args) argv_out->push_back(&a[0]);
  argv_out->push_back(nullptr);
  return args;
}

/// The whole run: `defaults` adds with_default_flags (benchmarks whose runs
/// take seconds each leave them out); `register_all()` registers the
/// benchmarks, `header()` prints what the run is (after the flags were
/// accepted), `tables(rec)` prints the tables and returns their tally. Take
/// the binary's own flags out of argv before. Exits 0 whatever the verdicts.
template <class Register, class Header, class Tables>
int benchmark_main(int argc, char** argv, bool quick, bool defaults, Register register_all,
                   Header header, Tables tables) {
  RecordingReporter rec(argc, argv);  // before anything prints: json moves the text to stderr
  std::vector<char*> args;
  std::vector<std::string> storage;
  if (defaults) {
    storage = with_default_flags(argc, argv, quick, &args);
  } else {
    for (int i = 0; i < argc; ++i) args.push_back(argv[i]);
    args.push_back(nullptr);
  }
  int nargs = static_cast<int>(args.size()) - 1;
  register_all();
  benchmark::Initialize(&nargs, args.data());
  if (benchmark::ReportUnrecognizedArguments(nargs, args.data())) return 1;
  header();
  std::fflush(stdout);
  benchmark::RunSpecifiedBenchmarks(&rec);
  std::fflush(stdout);
  tables(rec);
  std::fflush(stdout);
  benchmark::Shutdown();
  return 0;
}

}  // namespace bench
}  // namespace rankwise
