// The one table-and-verdict printer of the benchmarks: cells formatted from
// the times RecordingReporter kept, verdicts against the targets, and a Table
// that sizes its columns to its cells. Every ratio divides two times measured
// in the same binary and the same run: on shared, noisy machines ratios of
// neighbours are what stays meaningful. No Eigen, no CUDA.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <deque>
#include <string>
#include <utility>
#include <vector>

#include "support/report.hpp"

namespace rankwise {
namespace bench {

/// "123.4 us" etc.; "-" when missing.
inline std::string format_time(const Measurement* m) {
  if (m == nullptr) return "-";
  const double s = m->real_s;
  char buf[32];
  if (s < 1e-6)
    std::snprintf(buf, sizeof buf, "%.1f ns", s * 1e9);
  else if (s < 1e-3)
    std::snprintf(buf, sizeof buf, "%.1f us", s * 1e6);
  else if (s < 1.0)
    std::snprintf(buf, sizeof buf, "%.2f ms", s * 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.3f s", s);
  return buf;
}

/// num / den, or -1 when a time is missing.
inline double ratio_of(const Measurement* num, const Measurement* den) {
  if (num == nullptr || den == nullptr || den->real_s <= 0) return -1.0;
  return num->real_s / den->real_s;
}

/// A ratio with three significant places; "-" for r < 0 (not measured).
inline std::string format_ratio(double r) {
  if (r < 0) return "-";
  char buf[32];
  if (r < 0.001)
    std::snprintf(buf, sizeof buf, "%.2e", r);
  else if (r < 100)
    std::snprintf(buf, sizeof buf, "%.3f", r);
  else
    std::snprintf(buf, sizeof buf, "%.0f", r);
  return buf;
}
inline std::string format_ratio(const Measurement* num, const Measurement* den) {
  return format_ratio(ratio_of(num, den));
}

/// A time computed rather than measured (a floor), as a Measurement the
/// cells and verdicts take; nullptr for seconds <= 0 (not measured).
class Derived {
 public:
  const Measurement* of(double seconds) {
    if (seconds <= 0) return nullptr;
    slots_.push_back({seconds, seconds});
    return &slots_.back();
  }

 private:
  std::deque<Measurement> slots_;  // push_back keeps earlier pointers valid
};

struct Tally {
  int pass = 0;
  int miss = 0;
  Tally& operator+=(const Tally& other) {
    pass += other.pass;
    miss += other.miss;
    return *this;
  }
};

/// A ratio against its target, an upper bound unless `at_least`: "PASS (0.93
/// <= 1.10)", "MISS (1.31 > 1.20)", "PASS (1.92 >= 1.80)", counted into
/// `tally`; "n/a (not measured)" for r < 0 (a time is missing).
inline std::string judge(double r, double target, Tally* tally, bool at_least = false) {
  if (r < 0) return "n/a (not measured)";
  const bool ok = at_least ? r >= target : r <= target;
  ++(ok ? tally->pass : tally->miss);
  const char* relation = at_least ? (ok ? ">=" : "<") : (ok ? "<=" : ">");
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s (%.2f %s %.2f)", ok ? "PASS" : "MISS", r, relation, target);
  return buf;
}

/// judge() of num / den.
inline std::string verdict(const Measurement* num, const Measurement* den, double target,
                           Tally* tally) {
  return judge(ratio_of(num, den), target, tally);
}

/// A table printed once all its rows are in, each column as wide as its
/// widest cell: right-aligned, but the last column (the verdicts) left. A
/// column headed "|" is a separator; pass "" cells for it, or anything.
class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}

  /// A row of cells, one per column (missing ones print empty).
  Table& row(std::vector<std::string> cells) {
    cells.resize(header_.size());
    rows_.push_back(std::move(cells));
    return *this;
  }
  bool empty() const { return rows_.empty(); }

  void print(std::FILE* out = stdout) const {
    std::vector<std::size_t> width(header_.size());
    for (std::size_t c = 0; c < header_.size(); ++c) {
      width[c] = header_[c].size();
      for (const auto& r : rows_) width[c] = std::max(width[c], r[c].size());
    }
    auto line = [&](const std::vector<std::string>& cells) {
      std::string s;
      for (std::size_t c = 0; c < cells.size(); ++c) {
        const bool bar = header_[c] == "|";
        const std::string& text = bar ? header_[c] : cells[c];
        const std::string pad(bar ? 0 : width[c] - text.size(), ' ');
        if (c > 0) s += ' ';
        s += c + 1 == cells.size() ? text + pad : pad + text;
      }
      while (!s.empty() && s.back() == ' ') s.pop_back();
      std::fprintf(out, "%s\n", s.c_str());
    };
    line(header_);
    for (const auto& r : rows_) line(r);
  }

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

/// Verdicts of one row, joined with "; ": "loop PASS (...); floor MISS (...)".
class Targets {
 public:
  Targets& add(const std::string& name, const std::string& verdict_text) {
    text_ += (text_.empty() ? "" : "; ") + (name.empty() ? "" : name + " ") + verdict_text;
    return *this;
  }
  std::string str(const char* none = "- (no target at this N)") const {
    return text_.empty() ? none : text_;
  }

 private:
  std::string text_;
};

/// Failed benchmarks and the PASS/MISS summary; always informational.
inline void print_summary(const RecordingReporter& rec, const Tally& tally,
                          const char* which = "") {
  for (const std::string& e : rec.errors()) std::printf("benchmark error: %s\n", e.c_str());
  std::printf("\ntargets%s: %d PASS, %d MISS (informational: the benchmark exits 0 either way)\n",
              which, tally.pass, tally.miss);
}

}  // namespace bench
}  // namespace rankwise
