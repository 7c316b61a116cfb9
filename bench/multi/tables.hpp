// Tables of the multi-adapter benchmark (UnitPool), from the results
// RecordingReporter kept, printed through support/table.hpp's Table. Shared
// by the CPU and the GPU binary; no Eigen, no CUDA. Every ratio divides two
// times measured in the same binary and the same run (the floor: bytes at the
// read rate of this run).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "multi/sizes.hpp"
#include "support/report.hpp"
#include "support/table.hpp"

namespace rankwise {
namespace bench {
namespace multi {

struct ReportOptions {
  std::string backend;  // result-name prefix, e.g. "cpu_f32"
  std::string title;    // e.g. "CPU (Eigen, float), 1 thread"
  bool quick = false;
  bool cpu_time = false;  // ratios of CPU time (the 1-thread CPU run), else wall / event time
  bool blas = false;      // the run has the OpenBLAS loop (multi_blas)
  /// Copies of every layer that the batches with N <= kRotateMaxTokens rotate over.
  std::int64_t copies = 1;
};

/// The check run before timing (Suite::Agreement): how far the pool is from
/// the loop, the padded pool, and the mixed batch from its halves served apart.
template <class Agreement>
void print_agreement(const Agreement& agree) {
  std::printf(
      "agreement from y = 0 (max |difference| / max |y|): pool vs loop %.1e, vs padded "
      "%.1e (N = 16, T = 4); mixed together vs separate %.1e (N = 16)\n\n",
      agree.loop, agree.padded, agree.mixed);
  std::fflush(stdout);
}

/// After the tables: a pool that disagrees with its baselines makes the run
/// fail (the smoke tests match "benchmark error:"), since its times compare
/// different computations.
template <class Agreement>
void report_disagreement(const Agreement& agree) {
  if (agree.loop > 1e-4 || agree.padded > 1e-4 || agree.mixed > 1e-4) {
    std::printf(
        "\nbenchmark error: the pool's results differ from its baselines' (agreement "
        "line above): the times compare different computations\n");
  }
}

/// The read rate of this run in bytes/s (0 when not measured).
inline double read_rate(RecordingReporter& rec, const ReportOptions& o) {
  const Measurement* m = rec.find(read_key(o.backend));
  return m == nullptr || m->real_s <= 0 ? 0.0 : static_cast<double>(kReadSlabBytes) / m->real_s;
}

/// The tables and their PASS/MISS verdicts. Informational: callers exit 0.
inline Tally print_multi_tables(RecordingReporter& rec, const ReportOptions& o) {
  Tally tally;
  rec.use_cpu_time(o.cpu_time);
  const double rate = read_rate(rec, o);

  std::printf(
      "\n== %s: %lld LoRA adapters in one UnitPool, d_in = d_out = %lld, ranks "
      "{8,16,32,64} (%lld units); %s per call ==\n",
      o.title.c_str(), static_cast<long long>(kAdapters), static_cast<long long>(kDim),
      static_cast<long long>(total_units()), o.cpu_time ? "CPU time" : "wall-clock time");
  std::printf(
      "N tokens over T distinct adapters, assigned at random (unsorted); each call is the next "
      "batch of a rotation whose batches partition the %lld adapters (units = mean ranks a "
      "batch touches)%s.\n",
      static_cast<long long>(kAdapters),
      o.copies > 1 ? ", for N <= 64 also over copies of every layer, >= 3x the cache in all" : "");
  std::printf(
      "pool   = UnitPool::forward with a plan made before the timed loop: one plan per batch "
      "serves every copy of the pool, as it serves every layer of a model. plan = "
      "UnitPool::plan alone (the host grouping and its upload).\n"
      "loop   = the per-adapter loop an engine writes today: per adapter gather its rows of x, "
      "Lora::forward on its own layer, add the rows back into y (buffers allocated once).\n");
  if (o.blas) {
    std::printf(
        "blas   = the same loop with the two cblas_sgemm calls (OpenBLAS) in place of "
        "Lora::forward.\n");
  }
  std::printf(
      "padded = every adapter padded to rank %lld with zero units, in a second UnitPool, the "
      "same batch (the flat layout of vLLM / Punica).\n"
      "floor  = bytes of the touched units, units * (d_in + d_out) * 4, plus x and y once, at "
      "the read rate of this run: ",
      static_cast<long long>(kPaddedRank));
  if (rate > 0)
    std::printf("%.1f GB/s.\n", rate * 1e-9);
  else
    std::printf("- (not measured).\n");
  std::printf(
      "Targets: pool <= %.2fx loop (>= 2x faster) for T >= %lld at N <= %lld; <= %.2fx "
      "padded; <= %.1fx the floor for N <= %lld.\n",
      kLoopTarget, static_cast<long long>(kLoopMinAdapters), static_cast<long long>(kLoopMaxTokens),
      kPaddedTarget, kFloorTarget, static_cast<long long>(kFloorMaxTokens));

  std::vector<std::string> header{"N",    "T", "units", "|",     "pool",
                                  "plan", "|", "loop",  "/loop", "|"};
  if (o.blas) header.insert(header.end(), {"blas", "/blas", "|"});
  header.insert(header.end(), {"padded", "/padded", "|", "floor", "/floor", "|", "targets"});
  Table cases(header);
  Derived floors;
  for (std::int64_t n : token_counts(o.quick)) {
    for (std::int64_t t : distinct_counts(n)) {
      const Measurement* pool = rec.find(case_key(o.backend, "pool", n, t));
      if (pool == nullptr) continue;
      const Measurement* plan = rec.find(case_key(o.backend, "plan", n, t));
      const Measurement* loop = rec.find(case_key(o.backend, "loop", n, t));
      const Measurement* blas = rec.find(case_key(o.backend, "blas", n, t));
      const Measurement* padded = rec.find(case_key(o.backend, "padded", n, t));
      const Measurement* floor = floors.of(rate > 0 ? floor_bytes(n, t, 4) / rate : 0.0);
      Targets targets;
      if (t >= kLoopMinAdapters && n <= kLoopMaxTokens)
        targets.add("loop", verdict(pool, loop, kLoopTarget, &tally));
      targets.add("padded", verdict(pool, padded, kPaddedTarget, &tally));
      if (n <= kFloorMaxTokens) targets.add("floor", verdict(pool, floor, kFloorTarget, &tally));
      char units[32];
      std::snprintf(units, sizeof units, "%.0f", mean_units(t));
      std::vector<std::string> row{std::to_string(n), std::to_string(t), units, ""};
      row.insert(row.end(), {format_time(pool), format_time(plan), ""});
      row.insert(row.end(), {format_time(loop), format_ratio(pool, loop), ""});
      if (o.blas) row.insert(row.end(), {format_time(blas), format_ratio(pool, blas), ""});
      row.insert(row.end(), {format_time(padded), format_ratio(pool, padded), "",
                             format_time(floor), format_ratio(pool, floor), "", targets.str()});
      cases.row(std::move(row));
    }
  }
  std::printf("\n");
  cases.print();

  std::printf(
      "\nT = 1: the pool vs Lora::forward of the batch's one adapter on all N rows "
      "(same rotation). Target: pool <= %.1fx direct.\n",
      kDirectTarget);
  Table direct_table({"N", "|", "pool", "direct", "/direct", "|", "target"});
  for (std::int64_t n : token_counts(o.quick)) {
    const Measurement* pool = rec.find(case_key(o.backend, "pool", n, 1));
    const Measurement* direct = rec.find(case_key(o.backend, "direct", n, 1));
    if (pool == nullptr && direct == nullptr) continue;
    direct_table.row({std::to_string(n), "", format_time(pool), format_time(direct),
                      format_ratio(pool, direct), "",
                      verdict(pool, direct, kDirectTarget, &tally)});
  }
  direct_table.print();

  std::printf(
      "\nmixed batch: N / 2 tokens over %lld plain LoRA adapters and N / 2 to one SMoRA adapter "
      "(r = %lld, k = %lld, inference), at random. together = one plan of the pool holding "
      "both; separate = the plain half with its own plan in that pool, then the SMoRA half in "
      "a pool of its own (each skips the other's tokens). Target: together <= %.1fx "
      "separate.\n",
      static_cast<long long>(kMixedLoraAdapters), static_cast<long long>(kSmoraRank),
      static_cast<long long>(kSmoraTopK), kMixedTarget);
  Table mixed_table({"N", "|", "together", "separate", "/separate", "|", "target"});
  for (std::int64_t n : mixed_token_counts(o.quick)) {
    const Measurement* together = rec.find(mixed_key(o.backend, "together", n));
    const Measurement* separate = rec.find(mixed_key(o.backend, "separate", n));
    if (together == nullptr && separate == nullptr) continue;
    mixed_table.row({std::to_string(n), "", format_time(together), format_time(separate),
                     format_ratio(together, separate), "",
                     verdict(together, separate, kMixedTarget, &tally)});
  }
  mixed_table.print();
  rec.use_cpu_time(false);
  return tally;
}

}  // namespace multi
}  // namespace bench
}  // namespace rankwise
