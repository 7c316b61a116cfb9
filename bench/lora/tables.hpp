// The LoRA tables, printed through support/table.hpp from the results
// RecordingReporter kept: the ratio table (forward, backward) of either
// backend, and the CPU's tables per thread count (the delta next to OpenBLAS
// and the floor, then the speed-up from 1 to 2 threads). No Eigen, no CUDA.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "lora/sizes.hpp"
#include "support/table.hpp"

namespace rankwise {
namespace bench {
namespace lora {

/// Whether `prefix` has any delta result in this run (else it was filtered out).
inline bool any_delta(RecordingReporter& rec, const std::string& prefix, bool quick) {
  for (std::int64_t r : ranks(quick)) {
    for (std::int64_t n : token_counts(quick)) {
      if (rec.find(key(prefix, "delta_fwd", r, n)) || rec.find(key(prefix, "delta_bwd", r, n)))
        return true;
    }
  }
  return false;
}

/// The delta against its raw GEMMs, the base product, the naive ΔW and (N =
/// 1) the read bound, on the clock rec hands out; `prefix` names the runs
/// ("cpu_f32/t:1", "cuda_f16").
inline Tally print_ratio_table(RecordingReporter& rec, const std::string& prefix,
                               const std::string& title, bool quick) {
  Tally tally;
  if (!any_delta(rec, prefix, quick)) return tally;
  std::printf(
      "\n== %s: LoRA delta, d_in = d_out = %lld; %s time per call, ratios of times "
      "from this run ==\n",
      title.c_str(), static_cast<long long>(kDim), rec.cpu_time() ? "CPU" : "wall-clock");
  std::printf(
      "Targets: N >= %lld: delta fwd/bwd <= %.1fx its raw GEMMs; N = 1: delta fwd <= "
      "%.1fx reading A and B once from memory.\n",
      static_cast<long long>(kGemmTargetMinTokens), kGemmTarget, kReadTarget);
  std::printf(
      "\nforward: delta = y += s*x*A^T*B^T; 2gemm = the same two GEMMs on raw matrices; "
      "base = x*W0^T; naive = materialise s*B*A, then x*dW^T\n");
  Table fwd_table({"r", "N", "delta fwd", "2gemm", "base", "naive", "|", "/2gemm", "/base",
                   "/naive", "|", "read A,B", "/read", "|", "target"});
  Table bwd_table({"r", "N", "delta bwd", "5gemm", "|", "/5gemm", "/base", "/fwd", "|", "/read",
                   "|", "target"});
  for (std::int64_t r : ranks(quick)) {
    for (std::int64_t n : token_counts(quick)) {
      const Measurement* fwd = rec.find(key(prefix, "delta_fwd", r, n));
      const Measurement* bwd = rec.find(key(prefix, "delta_bwd", r, n));
      const Measurement* base = rec.find(key(prefix, "base", 0, n));
      const Measurement* read = n == 1 ? rec.find(key(prefix, "read", r, 0)) : nullptr;
      const std::string rs = std::to_string(r), ns = std::to_string(n);
      if (fwd != nullptr) {
        const Measurement* gemm = rec.find(key(prefix, "gemm_fwd", r, n));
        const Measurement* naive = rec.find(key(prefix, "naive", r, n));
        Targets target;
        if (n >= kGemmTargetMinTokens) target.add("2gemm", verdict(fwd, gemm, kGemmTarget, &tally));
        if (n == 1) target.add("read", verdict(fwd, read, kReadTarget, &tally));
        fwd_table.row({rs, ns, format_time(fwd), format_time(gemm), format_time(base),
                       format_time(naive), "", format_ratio(fwd, gemm), format_ratio(fwd, base),
                       format_ratio(fwd, naive), "", n == 1 ? format_time(read) : "",
                       n == 1 ? format_ratio(fwd, read) : "", "", target.str()});
      }
      if (bwd != nullptr) {
        const Measurement* gemm = rec.find(key(prefix, "gemm_bwd", r, n));
        Targets target;
        if (n >= kGemmTargetMinTokens) target.add("5gemm", verdict(bwd, gemm, kGemmTarget, &tally));
        bwd_table.row({rs, ns, format_time(bwd), format_time(gemm), "", format_ratio(bwd, gemm),
                       format_ratio(bwd, base), format_ratio(bwd, fwd), "",
                       n == 1 ? format_ratio(bwd, read) : "", "", target.str()});
      }
    }
  }
  fwd_table.print();
  std::printf(
      "\nbackward: delta = dA, dB and dx += (rankwise backward); 5gemm = the same five "
      "GEMMs on raw matrices\n");
  bwd_table.print();
  return tally;
}

/// The floor of one CPU call at `threads` threads: max(its bytes at the read
/// rate, its FLOPs at the large-sgemm rate), from "read" (A and B once) and
/// "blas_sgemm". Each rate is the best measured at up to `threads` threads:
/// what fewer threads reach, more can too, so the floor never rises with the
/// thread count (on a busy machine a threaded run can measure far below what
/// the hardware gives).
class Floors {
 public:
  Floors(RecordingReporter& rec, const std::string& backend, int threads) : rec_(&rec) {
    for (int t : cpu_thread_counts()) {
      if (t > threads) continue;
      prefixes_.push_back(thread_prefix(backend, t));
      const Measurement* m = rec.find(key(prefixes_.back(), "blas_sgemm", 0, kPeakGemmDim));
      if (m != nullptr && m->real_s > 0)
        flop_rate_ = std::max(flop_rate_, peak_gemm_flops() / m->real_s);
    }
  }
  /// FLOP/s; 0 when not measured.
  double flop_rate() const { return flop_rate_; }
  /// Seconds to read A and B of rank `rank` once; 0 when not measured.
  double read_seconds(std::int64_t rank) const {
    double best = 0;
    for (const std::string& p : prefixes_) {
      const Measurement* m = rec_->find(key(p, "read", rank, 0));
      if (m != nullptr && m->real_s > 0 && (best == 0 || m->real_s < best)) best = m->real_s;
    }
    return best;
  }
  /// `read_multiple`: the call's bytes in units of A and B (1 forward; 2
  /// backward, which also writes dA and dB). nullptr when a rate is missing.
  const Measurement* of(std::int64_t rank, double flops, double read_multiple) {
    const double read_s = read_seconds(rank);
    if (read_s <= 0 || flop_rate_ <= 0) return nullptr;
    return derived_.of(std::max(read_multiple * read_s, flops / flop_rate_));
  }

 private:
  RecordingReporter* rec_;
  std::vector<std::string> prefixes_;
  double flop_rate_ = 0;
  Derived derived_;
};

/// The forward and backward tables at `t` threads: delta, OpenBLAS, floor.
/// Without `blas` (no OpenBLAS in this build) the delta's times alone: the
/// floor's FLOP rate is OpenBLAS's too.
inline void print_thread_table(RecordingReporter& rec, const std::string& backend, int t,
                               bool quick, bool blas, Tally* tally) {
  const std::string p = thread_prefix(backend, t);
  Floors floors(rec, backend, t);
  const char* plural = t == 1 ? "" : "s";
  std::printf(
      "\n== CPU (float), %d thread%s: LoRA delta%s, d_in = d_out = %lld; wall-clock "
      "time per call ==\n",
      t, plural, blas ? " vs OpenBLAS and the floor" : "", static_cast<long long>(kDim));
  if (blas) {
    std::printf(
        "blas = the cblas_sgemm calls a user writes (2 forward, 5 backward) on the same "
        "memory. floor = max(bytes of A and B at the read rate, FLOPs at OpenBLAS's "
        "%lld^3 sgemm rate); backward: twice the bytes (dA, dB written). Rates: the best "
        "of this run at up to %d thread%s: sgemm ",
        static_cast<long long>(kPeakGemmDim), t, plural);
    if (floors.flop_rate() > 0)
      std::printf("%.1f GFLOP/s; ", floors.flop_rate() * 1e-9);
    else
      std::printf("- (not measured); ");
  } else {
    std::printf(
        "No OpenBLAS in this build: no blas or floor columns. Rates: the best of this "
        "run at up to %d thread%s: ",
        t, plural);
  }
  std::printf("read");
  for (std::int64_t r : ranks(quick)) {
    const double read_s = floors.read_seconds(r);
    if (read_s <= 0)
      std::printf(" r=%lld -", static_cast<long long>(r));
    else
      std::printf(" r=%lld %.1f GB/s", static_cast<long long>(r),
                  2.0 * sizeof(float) * r * kDim / read_s * 1e-9);
  }
  std::printf(".\n");
  if (blas) {
    std::printf(
        "Targets: fwd <= %.1fx blas at every N; fwd <= %.1fx the floor for N <= %lld; "
        "bwd <= %.1fx blas for N >= %lld.\n",
        kBlasForwardTarget, kFloorTarget, static_cast<long long>(kFloorMaxTokens),
        kBlasBackwardTarget, static_cast<long long>(kBlasBackwardMinTokens));
  }
  for (bool backward : {false, true}) {
    const char* what = backward ? "delta_bwd" : "delta_fwd";
    std::printf("\n%s\n", backward ? "backward (dA, dB, dx +=)" : "forward (y += s x A^T B^T)");
    Table table = blas ? Table({"r", "N", backward ? "delta bwd" : "delta fwd", "blas", "floor",
                                "|", "/blas", "/floor", "|", "target"})
                       : Table({"r", "N", backward ? "delta bwd" : "delta fwd"});
    for (std::int64_t r : ranks(quick)) {
      for (std::int64_t n : token_counts(quick)) {
        const Measurement* delta = rec.find(key(p, what, r, n));
        if (delta == nullptr) continue;
        const std::string rs = std::to_string(r), ns = std::to_string(n);
        if (!blas) {
          table.row({rs, ns, format_time(delta)});
          continue;
        }
        const Measurement* blas_time = rec.find(key(p, backward ? "blas_bwd" : "blas_fwd", r, n));
        const Measurement* floor_time = floors.of(r, delta_flops(backward, r, n), backward ? 2 : 1);
        Targets target;
        if (!backward) {
          target.add("blas", verdict(delta, blas_time, kBlasForwardTarget, tally));
          if (n <= kFloorMaxTokens)
            target.add("floor", verdict(delta, floor_time, kFloorTarget, tally));
        } else if (n >= kBlasBackwardMinTokens) {
          target.add("blas", verdict(delta, blas_time, kBlasBackwardTarget, tally));
        }
        table.row({rs, ns, format_time(delta), format_time(blas_time), format_time(floor_time), "",
                   format_ratio(delta, blas_time), format_ratio(delta, floor_time), "",
                   target.str()});
      }
    }
    table.print();
  }
}

/// The speed-up of the delta (and OpenBLAS) from `lo` to `hi` threads.
inline void print_speedups(RecordingReporter& rec, const std::string& backend, int lo, int hi,
                           bool quick, bool blas, Tally* tally) {
  const std::string p_lo = thread_prefix(backend, lo), p_hi = thread_prefix(backend, hi);
  std::printf(
      "\n== CPU (float): speed-up from %d to %d threads (time at %d / time at %d), "
      "wall-clock ==\n",
      lo, hi, lo, hi);
  std::printf("Target: the rankwise delta >= %.1fx for N >= %lld, forward and backward%s.\n",
              kScalingTarget, static_cast<long long>(kScalingMinTokens),
              blas ? "; OpenBLAS for reference" : "");
  Table table = blas ? Table({"r", "N", "|", "delta fwd", "delta bwd", "|", "blas fwd", "blas bwd",
                              "|", "target"})
                     : Table({"r", "N", "|", "delta fwd", "delta bwd", "|", "target"});
  auto cell = [](double s) {
    if (s < 0) return std::string("-");
    char buf[16];
    std::snprintf(buf, sizeof buf, "%.2fx", s);
    return std::string(buf);
  };
  for (std::int64_t r : ranks(quick)) {
    for (std::int64_t n : token_counts(quick)) {
      auto speedup = [&](const char* what) {
        return ratio_of(rec.find(key(p_lo, what, r, n)), rec.find(key(p_hi, what, r, n)));
      };
      const double fwd = speedup("delta_fwd"), bwd = speedup("delta_bwd");
      if (fwd < 0 && bwd < 0) continue;
      Targets target;
      if (n >= kScalingMinTokens) {
        target.add("fwd", judge(fwd, kScalingTarget, tally, true));
        target.add("bwd", judge(bwd, kScalingTarget, tally, true));
      }
      std::vector<std::string> cells{std::to_string(r), std::to_string(n), "",
                                     cell(fwd),         cell(bwd),         ""};
      if (blas) {
        cells.push_back(cell(speedup("blas_fwd")));
        cells.push_back(cell(speedup("blas_bwd")));
        cells.push_back("");
      }
      cells.push_back(target.str());
      table.row(std::move(cells));
    }
  }
  table.print();
}

/// Per thread count, print_thread_table; then the speed-up from the fewest to
/// the most threads. `backend`: the prefix of thread_prefix().
inline Tally print_thread_tables(RecordingReporter& rec, const std::string& backend, bool quick,
                                 bool blas) {
  Tally tally;
  const auto& threads = cpu_thread_counts();
  for (int t : threads) {
    if (any_delta(rec, thread_prefix(backend, t), quick))
      print_thread_table(rec, backend, t, quick, blas, &tally);
  }
  const int lo = threads.front(), hi = threads.back();
  if (hi > lo && any_delta(rec, thread_prefix(backend, lo), quick) &&
      any_delta(rec, thread_prefix(backend, hi), quick)) {
    print_speedups(rec, backend, lo, hi, quick, blas, &tally);
  }
  return tally;
}

}  // namespace lora
}  // namespace bench
}  // namespace rankwise
