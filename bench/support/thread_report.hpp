// The CPU LoRA tables per thread count (bench_lora): the rankwise delta next
// to OpenBLAS (support/openblas_baseline.hpp) and next to the floor, then the
// speed-up from 1 to 2 threads, with PASS/MISS against the targets.
// No Eigen, no OpenBLAS here: only results RecordingReporter kept.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "support/report.hpp"
#include "support/sizes.hpp"

namespace rankwise {
namespace bench {

/// Thread counts of the CPU runs. The delta, its OpenBLAS baseline, the read
/// bound and the large sgemm run at each; rankwise through CpuContext(t),
/// OpenBLAS through openblas_set_num_threads(t). The Eigen baselines run on one.
inline const std::vector<int>& thread_counts() {
  static const std::vector<int> t{1, 2};
  return t;
}

/// Result-name prefix of the runs at `threads` threads, e.g. "cpu_f32/t:2".
inline std::string thread_prefix(const std::string& backend, int threads) {
  return backend + "/t:" + std::to_string(threads);
}

/// Targets (d = 4096, fp32), at every thread count:
///  * forward <= kBlasForwardTarget x the two cblas_sgemm, at every N;
///  * forward <= kFloorTarget x the floor for N <= kFloorMaxTokens;
///  * backward <= kBlasBackwardTarget x the five cblas_sgemm for N >= kBlasBackwardMinTokens;
///  * 2 threads >= kScalingTarget x the 1-thread speed for N >= kScalingMinTokens
///    (rankwise, forward and backward).
inline constexpr double kBlasForwardTarget = 1.0;
inline constexpr double kFloorTarget = 1.3;
inline constexpr std::int64_t kFloorMaxTokens = 16;
inline constexpr double kBlasBackwardTarget = 1.0;
inline constexpr std::int64_t kBlasBackwardMinTokens = 64;
inline constexpr double kScalingTarget = 1.8;
inline constexpr std::int64_t kScalingMinTokens = 64;

/// The floor's FLOP rate is OpenBLAS's on a square sgemm of this size
/// (C = A B, all kPeakGemmDim x kPeakGemmDim), measured in the same run.
inline constexpr std::int64_t kPeakGemmDim = 2048;
inline double peak_gemm_flops() {
  return 2.0 * static_cast<double>(kPeakGemmDim) * kPeakGemmDim * kPeakGemmDim;
}

/// The floor of one call at `threads` threads: max(its bytes at the read
/// rate, its FLOPs at the large-sgemm rate), from the read bound ("read", A
/// and B once) and the large sgemm ("blas_sgemm"). Each rate is the best
/// measured at up to `threads` threads: what fewer threads reach, more can
/// too, so the floor never rises with the thread count (on a busy machine a
/// threaded run can measure far below what the hardware gives).
class Floors {
 public:
  Floors(RecordingReporter& rec, const std::string& backend, int threads) : rec_(&rec) {
    for (int t : thread_counts()) {
      if (t > threads) continue;
      prefixes_.push_back(thread_prefix(backend, t));
      const Measurement* m = rec.find(key(prefixes_.back(), "blas_sgemm", 0, kPeakGemmDim));
      if (m != nullptr && m->real_s > 0) {
        flop_rate_ = std::max(flop_rate_, peak_gemm_flops() / m->real_s);
      }
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

  /// `read_multiple`: the call's bytes in units of A and B (1 for the
  /// forward; 2 for the backward, which also writes dA and dB). nullptr when
  /// a rate was not measured.
  const Measurement* of(std::int64_t rank, double flops, double read_multiple) {
    const double read_s = read_seconds(rank);
    if (read_s <= 0 || flop_rate_ <= 0) return nullptr;
    const double s = std::max(read_multiple * read_s, flops / flop_rate_);
    Measurement& m = floors_[{rank, flops, read_multiple}];
    m = Measurement{s, s};
    return &m;
  }

 private:
  RecordingReporter* rec_;
  std::vector<std::string> prefixes_;
  double flop_rate_ = 0;
  std::map<std::tuple<std::int64_t, double, double>, Measurement> floors_;
};

/// FLOPs of the LoRA delta at n tokens: 2 GEMMs forward (4 n r d), 5 backward (10 n r d).
inline double delta_flops(bool backward, std::int64_t rank, std::int64_t n) {
  return (backward ? 10.0 : 4.0) * static_cast<double>(n) * rank * kDim;
}

/// Whether `p` (a thread_prefix) has any delta result in this run.
inline bool any_delta(RecordingReporter& rec, const std::string& p, bool quick) {
  for (std::int64_t r : ranks(quick)) {
    for (std::int64_t n : token_counts(quick)) {
      if (rec.find(key(p, "delta_fwd", r, n)) || rec.find(key(p, "delta_bwd", r, n))) return true;
    }
  }
  return false;
}

/// The forward and backward tables at `t` threads: delta,
/// OpenBLAS, floor. Without `blas` (no OpenBLAS in this build) only the
/// delta's times: the floor's FLOP rate is OpenBLAS's too.
inline void print_thread_table(RecordingReporter& rec, const std::string& backend, int t,
                               bool quick, bool blas, Tally* tally) {
  const std::string p = thread_prefix(backend, t);
  const auto& rs = ranks(quick);
  const auto& ns = token_counts(quick);
  Floors floors(rec, backend, t);
  std::printf(
      "\n== CPU (float), %d thread%s: LoRA delta%s, d_in = d_out = %lld; wall-clock time per "
      "call ==\n",
      t, t == 1 ? "" : "s", blas ? " vs OpenBLAS and the floor" : "", static_cast<long long>(kDim));
  if (blas) {
    std::printf(
        "blas = the cblas_sgemm calls a user writes (2 forward, 5 backward) on the "
        "same memory. floor = max(bytes of A and B at the read rate, FLOPs at "
        "OpenBLAS's %lld^3 sgemm rate); backward: twice the bytes (dA, dB written). "
        "Rates: the best of this run at up to %d thread%s: sgemm ",
        static_cast<long long>(kPeakGemmDim), t, t == 1 ? "" : "s");
    if (floors.flop_rate() > 0)
      std::printf("%.1f GFLOP/s; ", floors.flop_rate() * 1e-9);
    else
      std::printf("- (not measured); ");
  } else {
    std::printf(
        "No OpenBLAS in this build: no blas or floor columns. Rates: the best of this run at "
        "up to %d thread%s: ",
        t, t == 1 ? "" : "s");
  }
  std::printf("read");
  for (std::int64_t r : rs) {
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
    const char* blas_what = backward ? "blas_bwd" : "blas_fwd";
    std::printf("\n%s\n%4s %5s %11s",
                backward ? "backward (dA, dB, dx +=)" : "forward (y += s x A^T B^T)", "r", "N",
                backward ? "delta bwd" : "delta fwd");
    if (blas)
      std::printf(" %11s %11s | %7s %7s | %s", "blas", "floor", "/blas", "/floor", "target");
    std::printf("\n");
    for (std::int64_t r : rs) {
      for (std::int64_t n : ns) {
        const Measurement* delta = rec.find(key(p, what, r, n));
        if (delta == nullptr) continue;
        if (!blas) {
          std::printf("%4lld %5lld %11s\n", static_cast<long long>(r), static_cast<long long>(n),
                      format_time(delta).c_str());
          continue;
        }
        const Measurement* blas_time = rec.find(key(p, blas_what, r, n));
        const Measurement* floor_time = floors.of(r, delta_flops(backward, r, n), backward ? 2 : 1);
        std::string target;
        if (!backward) {
          target = "blas " + verdict(delta, blas_time, kBlasForwardTarget, tally);
          if (n <= kFloorMaxTokens) {
            target += "; floor " + verdict(delta, floor_time, kFloorTarget, tally);
          }
        } else if (n >= kBlasBackwardMinTokens) {
          target = "blas " + verdict(delta, blas_time, kBlasBackwardTarget, tally);
        } else {
          target = "- (no target at this N)";
        }
        std::printf("%4lld %5lld %11s %11s %11s | %7s %7s | %s\n", static_cast<long long>(r),
                    static_cast<long long>(n), format_time(delta).c_str(),
                    format_time(blas_time).c_str(), format_time(floor_time).c_str(),
                    format_ratio(delta, blas_time).c_str(), format_ratio(delta, floor_time).c_str(),
                    target.c_str());
      }
    }
  }
}

/// The speed-up of the delta (and OpenBLAS) from `lo` to `hi` threads.
inline void print_speedups(RecordingReporter& rec, const std::string& p_lo, const std::string& p_hi,
                           int lo, int hi, bool quick, bool blas, Tally* tally) {
  const auto& rs = ranks(quick);
  const auto& ns = token_counts(quick);
  std::printf(
      "\n== CPU (float): speed-up from %d to %d threads (time at %d / time at %d), "
      "wall-clock ==\n",
      lo, hi, lo, hi);
  std::printf("Target: the rankwise delta >= %.1fx for N >= %lld, forward and backward%s.\n",
              kScalingTarget, static_cast<long long>(kScalingMinTokens),
              blas ? "; OpenBLAS for reference" : "");
  std::printf("%4s %5s | %9s %9s |", "r", "N", "delta fwd", "delta bwd");
  if (blas) std::printf(" %9s %9s |", "blas fwd", "blas bwd");
  std::printf(" %s\n", "target");
  for (std::int64_t r : rs) {
    for (std::int64_t n : ns) {
      auto speedup = [&](const char* what) {
        const Measurement* one = rec.find(key(p_lo, what, r, n));
        const Measurement* many = rec.find(key(p_hi, what, r, n));
        return one == nullptr || many == nullptr || many->real_s <= 0 ? -1.0
                                                                      : one->real_s / many->real_s;
      };
      const double fwd = speedup("delta_fwd"), bwd = speedup("delta_bwd");
      if (fwd < 0 && bwd < 0) continue;
      std::string target = "- (no target at this N)";
      if (n >= kScalingMinTokens) {
        target = "fwd " + judge(fwd, kScalingTarget, tally, true) + "; bwd " +
                 judge(bwd, kScalingTarget, tally, true);
      }
      auto cell = [](double s) {
        char buf[16];
        if (s < 0) return std::string("-");
        std::snprintf(buf, sizeof buf, "%.2fx", s);
        return std::string(buf);
      };
      std::printf("%4lld %5lld | %9s %9s |", static_cast<long long>(r), static_cast<long long>(n),
                  cell(fwd).c_str(), cell(bwd).c_str());
      if (blas) {
        std::printf(" %9s %9s |", cell(speedup("blas_fwd")).c_str(),
                    cell(speedup("blas_bwd")).c_str());
      }
      std::printf(" %s\n", target.c_str());
    }
  }
}

/// Per thread count, print_thread_table; then the speed-up from the fewest to
/// the most threads. `backend`: the prefix of thread_prefix().
inline Tally print_thread_tables(RecordingReporter& rec, const std::string& backend, bool quick,
                                 bool blas) {
  Tally tally;
  for (int t : thread_counts()) {
    const std::string p = thread_prefix(backend, t);
    if (any_delta(rec, p, quick)) print_thread_table(rec, backend, t, quick, blas, &tally);
  }
  const int lo = thread_counts().front(), hi = thread_counts().back();
  const std::string p_lo = thread_prefix(backend, lo), p_hi = thread_prefix(backend, hi);
  if (hi > lo && any_delta(rec, p_lo, quick) && any_delta(rec, p_hi, quick)) {
    print_speedups(rec, p_lo, p_hi, lo, hi, quick, blas, &tally);
  }
  return tally;
}

}  // namespace bench
}  // namespace rankwise
