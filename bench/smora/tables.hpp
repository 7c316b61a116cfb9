// Tables of the SMoRA benchmarks, from the results RecordingReporter kept
// (support/report.hpp, shared with the LoRA bench). Shared by the CPU and the
// GPU benchmark; no Eigen, no CUDA.
//
// Every ratio divides two times measured in the same binary and the same run.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "smora/sizes.hpp"
#include "support/report.hpp"
#include "support/table.hpp"

namespace rankwise {
namespace bench {
namespace smora {

struct ReportOptions {
  std::string backend;  // result-name prefix, e.g. "cpu_f32"
  std::string title;    // e.g. "CPU (Eigen, float)"
  bool quick = false;
  /// TuningPolicy<Backend>::prefer_dense: what kAuto resolves to.
  std::function<bool(std::int64_t, std::int64_t, std::int64_t)> prefer_dense;
  /// One line each on what "cached" and "uncached" mean for this backend.
  std::string cached_note, uncached_note;
  /// Bytes per weight element (4 for float, 2 for half).
  std::size_t element_bytes = 4;
  /// Whether the run has the OpenBLAS dense rank-64 LoRA (blas_key): adds its
  /// time and SMoRA (auto) / it to the layer table.
  bool blas = false;
};

struct SmoraTally {
  Tally cached, uncached;
  int pass() const { return cached.pass + uncached.pass; }
  int miss() const { return cached.miss + uncached.miss; }
  SmoraTally& operator+=(const SmoraTally& other) {
    cached += other.cached;
    uncached += other.uncached;
    return *this;
  }
};

/// The layer table: SMoRA (sparse, dense, auto) next to LoRA rank 64 and 8
/// (and, with o.blas, rank 64 as OpenBLAS calls), forward and backward, cached
/// and uncached; rows where SMoRA did not run are left out. Verdicts judge the
/// layer as shipped (kAuto) against the dense rank-64 LoRA: forward <=
/// forward_target(g, N), backward <= kMaxVsLora64.
inline SmoraTally print_layer_table(RecordingReporter& rec, const ReportOptions& o) {
  SmoraTally tally;
  for (bool uncached : {false, true}) {
    for (bool backward : {false, true}) {
      std::printf("\n== %s: SMoRA (r = %lld, k = %lld) vs LoRA, d = %lld, %s, %s ==\n",
                  o.title.c_str(), static_cast<long long>(kRank), static_cast<long long>(kTopK),
                  static_cast<long long>(kDim),
                  backward ? "BACKWARD (dA, dB, dW_r, dx)" : "FORWARD (inference)",
                  uncached ? "UNCACHED" : "CACHED");
      std::printf("   %s\n", (uncached ? o.uncached_note : o.cached_note).c_str());
      if (uncached && o.quick) {
        std::printf(
            "   QUICK MODE: the rotation is cut to a few layers, so these runs are NOT "
            "uncached; use the full run for cache effects\n");
      }
      std::vector<std::string> header{"g", "N", "|", "lora64", "lora8", "|"};
      if (o.blas) header.insert(header.end(), {"blas64", "|"});
      header.insert(header.end(), {"sparse", "/l64", "/l8", "|", "dense", "/l64", "/l8", "|",
                                   "auto", "/l64", "/l8"});
      if (o.blas) header.push_back("/bl64");
      header.insert(header.end(), {"|", "bound", "|", "target: auto / lora64"});
      Table table(std::move(header));
      Tally& t = uncached ? tally.uncached : tally.cached;
      std::string rates;
      for (std::int64_t g : groups()) {
        for (std::int64_t n : token_counts(o.quick)) {
          const Measurement* l64 = rec.find(lora_key(o.backend, backward, 64, n, uncached));
          const Measurement* l8 = rec.find(lora_key(o.backend, backward, 8, n, uncached));
          const Measurement* bl64 = rec.find(blas_key(o.backend, backward, 64, n, uncached));
          const Measurement* sp =
              rec.find(smora_key(o.backend, backward, g, RankUnitPath::kSparse, n, uncached));
          const Measurement* de =
              rec.find(smora_key(o.backend, backward, g, RankUnitPath::kDense, n, uncached));
          const Measurement* au =
              rec.find(smora_key(o.backend, backward, g, RankUnitPath::kAuto, n, uncached));
          if (sp == nullptr && de == nullptr && au == nullptr) continue;
          const bool dense = o.prefer_dense && o.prefer_dense(n, kTopK, kRank);
          const std::string auto_cell = format_time(au) + (dense ? "(D)" : "(S)");
          const double r64 = ratio_of(au, l64);
          const double tgt = backward ? kMaxVsLora64 : forward_target(g, n);
          char buf[96];
          std::snprintf(buf, sizeof buf, "<= %.2f: ", tgt);
          const std::string target = buf + judge(r64, tgt, &t);
          if (n == 1 && !backward) {
            // Bytes one forward reads / its time: the byte bound assumes equal rates.
            const auto rate = [&](const Measurement* m, double bytes) {
              char b[32];
              if (m == nullptr || m->real_s <= 0) return std::string("-");
              std::snprintf(b, sizeof b, "%.1f", bytes / m->real_s * 1e-9);
              return std::string(b);
            };
            const double elem = static_cast<double>(o.element_bytes);
            rates += "  g=" + std::to_string(g) + ": lora64 " +
                     rate(l64, 2.0 * kRank * kDim * elem) + " GB/s, smora sparse " +
                     rate(sp, (kRank / g + 2.0 * kTopK) * kDim * elem) + " GB/s\n";
          }
          std::vector<std::string> row{std::to_string(g), std::to_string(n), "",
                                       format_time(l64),  format_time(l8),   ""};
          if (o.blas) row.insert(row.end(), {format_time(bl64), ""});
          row.insert(row.end(), {format_time(sp), format_ratio(ratio_of(sp, l64)),
                                 format_ratio(ratio_of(sp, l8)), "", format_time(de),
                                 format_ratio(ratio_of(de, l64)), format_ratio(ratio_of(de, l8)),
                                 "", auto_cell, format_ratio(r64), format_ratio(ratio_of(au, l8))});
          if (o.blas) row.push_back(format_ratio(ratio_of(au, bl64)));
          row.insert(row.end(),
                     {"", n == 1 && !backward ? format_ratio(n1_byte_bound(g)) : "", "", target});
          table.row(std::move(row));
        }
      }
      table.print();
      if (!rates.empty()) {
        std::printf("N = 1 read rate (weight bytes the forward reads / its time):\n%s",
                    rates.c_str());
      }
    }
  }
  std::printf(
      "\nauto(S|D): the path kAuto resolves to (TuningPolicy::prefer_dense). bound: the N = 1 "
      "byte bound, (E + 2k) / 2r of dense rank-64's bytes.%s\n",
      o.blas ? " blas64: dense LoRA-64 as the cblas_sgemm calls a user writes (OpenBLAS), "
               "on the same memory; /bl64: auto / blas64."
             : "");
  return tally;
}

/// One (d, k, r, direction, N) cell of the crossover grid.
struct CrossCell {
  std::int64_t d, k, r, n;
  bool backward;
  double sparse_s, dense_s;
};

/// A candidate rule: dense iff n >= min_tokens && r <= ratio * k.
struct Rule {
  std::int64_t min_tokens;
  std::int64_t ratio;
  bool dense(std::int64_t n, std::int64_t k, std::int64_t r) const {
    return n >= min_tokens && r <= ratio * k;
  }
};

struct RuleScore {
  double geomean = 1.0;  // chosen / best, geometric mean over the grid
  double worst = 1.0;    // the largest chosen / best
  int wrong = 0;         // cells where the slower path is chosen by more than 5%
};

template <class Pick>
RuleScore score_rule(const std::vector<CrossCell>& cells, Pick pick) {
  RuleScore s;
  double log_sum = 0;
  for (const CrossCell& cell : cells) {
    const double best = std::min(cell.sparse_s, cell.dense_s);
    const double chosen = pick(cell.n, cell.k, cell.r) ? cell.dense_s : cell.sparse_s;
    const double slow = chosen / best;
    log_sum += std::log(slow);
    s.worst = std::max(s.worst, slow);
    if (slow > 1.05) ++s.wrong;
  }
  if (!cells.empty()) s.geomean = std::exp(log_sum / static_cast<double>(cells.size()));
  return s;
}

/// The crossover table (rank_units_forward / backward, kSparse vs kDense),
/// per d and (k, r). Then fits the rule
/// "dense iff n >= N0 and r <= c k" to the grid and prints the best candidates
/// next to the backend's current prefer_dense. Returns the grid.
inline std::vector<CrossCell> print_crossover(RecordingReporter& rec, const ReportOptions& o) {
  std::vector<CrossCell> cells;
  std::printf(
      "\n== %s: crossover of the rank-unit paths (rank_units_forward / backward "
      "alone, no router), cached weights ==\n",
      o.title.c_str());
  std::printf(
      "   d/s = dense time / sparse time (> 1: sparse faster). rule = what the current "
      "prefer_dense picks; '!' = it picks the path that is > 5%% slower.\n");
  for (std::int64_t d : crossover_dims(o.quick)) {
    for (const UnitShape& s : crossover_shapes(o.quick)) {
      std::printf("\nd = %lld, k = %lld, r = %lld (r/k = %lld)\n", static_cast<long long>(d),
                  static_cast<long long>(s.k), static_cast<long long>(s.r),
                  static_cast<long long>(s.r / s.k));
      Table table(
          {"N", "|", "fwd sp", "fwd de", "d/s", "|", "bwd sp", "bwd de", "d/s", "|", "rule"});
      for (std::int64_t n : crossover_tokens(o.quick)) {
        std::vector<std::string> row{std::to_string(n), ""};
        const bool rule_dense = o.prefer_dense && o.prefer_dense(n, s.k, s.r);
        bool any = false;
        std::string marks;
        for (bool backward : {false, true}) {
          const Measurement* sp = rec.find(units_key(o.backend, backward, d, s, "sparse", n));
          const Measurement* de = rec.find(units_key(o.backend, backward, d, s, "dense", n));
          const double ds = ratio_of(de, sp);
          row.insert(row.end(), {format_time(sp), format_time(de), format_ratio(ds), ""});
          if (sp != nullptr && de != nullptr) {
            any = true;
            cells.push_back({d, s.k, s.r, n, backward, sp->real_s, de->real_s});
            const bool wrong = rule_dense ? ds > 1.05 : (ds > 0 && ds < 1.0 / 1.05);
            marks += wrong ? "!" : "";
          }
        }
        if (!any) continue;
        row.push_back(std::string(rule_dense ? "dense" : "sparse") + (marks.empty() ? "" : " !"));
        table.row(std::move(row));
      }
      table.print();
    }
  }
  if (cells.empty()) return cells;

  // Fit "dense iff n >= N0 and r <= c k" to the grid.
  const std::int64_t never = std::numeric_limits<std::int64_t>::max();
  struct Scored {
    Rule rule;
    RuleScore score;
  };
  std::vector<Scored> all;
  for (std::int64_t n0 :
       {std::int64_t(1), std::int64_t(16), std::int64_t(32), std::int64_t(64), std::int64_t(128),
        std::int64_t(256), std::int64_t(512), std::int64_t(2048), never}) {
    for (std::int64_t ratio_c : {1, 2, 3, 4, 6, 8, 16}) {
      const Rule rule{n0, ratio_c};
      all.push_back({rule, score_rule(cells, [&](std::int64_t n, std::int64_t k, std::int64_t r) {
                       return rule.dense(n, k, r);
                     })});
      if (n0 == never) break;
    }
  }
  std::sort(all.begin(), all.end(), [](const Scored& a, const Scored& b) {
    if (a.score.worst != b.score.worst) return a.score.worst < b.score.worst;
    return a.score.geomean < b.score.geomean;
  });
  auto describe = [&](const Rule& r) {
    char buf[96];
    if (r.min_tokens == never) return std::string("never dense (always sparse)");
    std::snprintf(buf, sizeof buf, "dense iff n >= %lld && r <= %lld k",
                  static_cast<long long>(r.min_tokens), static_cast<long long>(r.ratio));
    return std::string(buf);
  };
  std::printf("\nrule fit over %zu cells (fwd and bwd): chosen time / best time\n", cells.size());
  std::printf("  %-40s %8s %8s %s\n", "rule", "geomean", "worst", "wrong picks (>5% slower)");
  if (o.prefer_dense) {
    const RuleScore cur = score_rule(cells, o.prefer_dense);
    std::printf("  %-40s %8.3f %8.3f %d  <- current prefer_dense\n", "current", cur.geomean,
                cur.worst, cur.wrong);
  }
  const RuleScore always_dense =
      score_rule(cells, [](std::int64_t, std::int64_t, std::int64_t) { return true; });
  std::printf("  %-40s %8.3f %8.3f %d\n", "always dense", always_dense.geomean, always_dense.worst,
              always_dense.wrong);
  for (std::size_t i = 0; i < all.size() && i < 6; ++i) {
    std::printf("  %-40s %8.3f %8.3f %d%s\n", describe(all[i].rule).c_str(), all[i].score.geomean,
                all[i].score.worst, all[i].score.wrong, i == 0 ? "  <- best fit" : "");
  }
  return cells;
}

/// The PASS/MISS summary and failed benchmarks; always informational.
inline void print_smora_summary(RecordingReporter& rec, const SmoraTally& t) {
  for (const std::string& e : rec.errors()) std::printf("benchmark error: %s\n", e.c_str());
  std::printf("\ntargets (cached): %d PASS, %d MISS; (uncached): %d PASS, %d MISS\n", t.cached.pass,
              t.cached.miss, t.uncached.pass, t.uncached.miss);
  std::printf("targets: %d PASS, %d MISS (informational: the benchmark exits 0 either way)\n",
              t.pass(), t.miss());
}

}  // namespace smora
}  // namespace bench
}  // namespace rankwise
