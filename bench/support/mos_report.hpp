// The MoS benchmark's tables, printed from the results of one run (CPU and GPU
// binary alike). Every ratio divides two times measured in the same binary
// and the same run.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "support/mos_sizes.hpp"
#include "support/report.hpp"

namespace rankwise {
namespace bench {
namespace mos {

/// Which path Mos's kAuto takes for n tokens ("direct" or "assembled").
using PathOf = std::function<std::string(std::int64_t n)>;

/// The times the tables use: wall time (the GPU's event times, reported as
/// manual time), or CPU time. The CPU benchmark is single-threaded (Eigen
/// without OpenMP), so its CPU time is its compute time without the spans it
/// was descheduled on a shared machine, which wall time would add to one side
/// of a ratio at random.
class Times {
 public:
  Times(RecordingReporter& rec, bool cpu_time) : rec_(&rec), cpu_(cpu_time) {}
  const char* clock() const { return cpu_ ? "CPU time" : "wall time"; }
  /// The time of `name` (in real_s, whichever clock), or nullptr.
  const Measurement* operator()(const std::string& name) {
    const Measurement* m = rec_->find(name);
    if (m == nullptr || !cpu_) return m;
    Measurement& slot = cpu_view_[name];
    slot.real_s = m->cpu_s;
    slot.cpu_s = m->cpu_s;
    return &slot;
  }

 private:
  RecordingReporter* rec_;
  bool cpu_;
  std::map<std::string, Measurement> cpu_view_;
};

inline std::string mib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f MiB", bytes / (1024.0 * 1024.0));
  return buf;
}

/// Parameter bytes of the two stacks and their ratio (no timing involved).
inline void print_parameter_bytes(std::int64_t d, std::size_t bytes_per_value,
                                  const char* type_name) {
  const double mos = static_cast<double>(mos_parameters(d)) * bytes_per_value;
  const double lora = static_cast<double>(lora_parameters(d)) * bytes_per_value;
  std::printf("\nparameter bytes (%s, gradients are the same size again):\n", type_name);
  std::printf("  MoS pools  v*L*(d_in+d_out) = %lld*%lld*%lld = %lld values: %s\n",
              static_cast<long long>(kEquivalentRank), static_cast<long long>(kLayers),
              static_cast<long long>(2 * d), static_cast<long long>(mos_parameters(d)),
              mib(mos).c_str());
  std::printf("  dense LoRA L*r*(d_in+d_out) = %lld*%lld*%lld = %lld values: %s\n",
              static_cast<long long>(kLayers), static_cast<long long>(kRank),
              static_cast<long long>(2 * d), static_cast<long long>(lora_parameters(d)),
              mib(lora).c_str());
  std::printf("  MoS / LoRA parameter bytes = %.3f\n", mos / lora);
  // Not parameters, but resident per layer once a layer takes the assembled
  // path (kAssembled, or kAuto where prefer_assembled_shards(n)): assembled A (r x d_in), Bᵀ
  // (r x d_out) and their gradients, in every Mos's workspace (layers/mos_ops.hpp).
  const double assembled = 2.0 * kLayers * kRank * (d + d) * bytes_per_value;
  std::printf("  (working memory, from layers/mos_ops.hpp: each Mos's workspace on the assembled "
              "path holds A, B^T and their gradients, 2*r*(d_in+d_out) values: %s for the stack, vs %s of "
              "pool + pool gradients)\n",
              mib(assembled).c_str(), mib(2.0 * mos).c_str());
}

/// The main table: per N, the dense LoRA stack and MoS on each path, with
/// the target verdict for kAuto (what a user gets). Returns the tally.
inline Tally print_stack_table(Times& t, const std::string& backend, const std::string& title,
                               std::int64_t d, bool quick, const PathOf& auto_path) {
  Tally tally;
  std::printf(
      "\n== %s: L = %lld layers, d_in = d_out = %lld, MoS v = %lld r = %lld l = %lld "
      "p = %lld vs dense LoRA r = %lld per layer ==\n",
      title.c_str(), static_cast<long long>(kLayers), static_cast<long long>(d),
      static_cast<long long>(kEquivalentRank), static_cast<long long>(kRank),
      static_cast<long long>(kShardsPerVector), static_cast<long long>(kPrivateRank),
      static_cast<long long>(kRank));
  std::printf(
      "%s per pass over all %lld layers; ratios = MoS / dense LoRA from this run. "
      "Target: kAuto <= %.1fx LoRA.\n",
      t.clock(), static_cast<long long>(kLayers), kTarget);
  for (Mode mode : {Mode::kFwd, Mode::kStep}) {
    std::printf("\n%s\n", mode == Mode::kFwd
                              ? "forward (y += delta, layers 0..L-1)"
                              : "forward + backward (fwd, then dA/dB/dx layers L-1..0; MoS "
                                "includes the pool's zero_grad)");
    std::printf("%5s %11s | %11s %7s | %11s %7s | %11s %7s %10s | %s\n", "N", "lora", "direct",
                "/lora", "assembled", "/lora", "auto", "/lora", "auto path", "target (auto)");
    for (std::int64_t n : token_counts(quick)) {
      const Measurement* lora = t(key(backend, "lora", mode, d, n));
      if (lora == nullptr) continue;
      const Measurement* dir = t(key(backend, "mos_direct", mode, d, n));
      const Measurement* asm_ = t(key(backend, "mos_assembled", mode, d, n));
      const Measurement* aut = t(key(backend, "mos_auto", mode, d, n));
      std::printf("%5lld %11s | %11s %7s | %11s %7s | %11s %7s %10s | %s\n",
                  static_cast<long long>(n), format_time(lora).c_str(), format_time(dir).c_str(),
                  format_ratio(dir, lora).c_str(), format_time(asm_).c_str(),
                  format_ratio(asm_, lora).c_str(), format_time(aut).c_str(),
                  format_ratio(aut, lora).c_str(), auto_path(n).c_str(),
                  verdict(aut, lora, kTarget, &tally).c_str());
    }
  }
  const Measurement* zero = t(zero_grad_key(backend, d));
  if (zero != nullptr) {
    std::printf("\nMoS pool zero_grad() alone (in every MoS step above): %s\n",
                format_time(zero).c_str());
  }
  return tally;
}

namespace detail {
// The smallest N of the sweep from which `b` is faster than `a` at every
// larger N measured; -1 if never.
inline std::int64_t crossover(Times& t, const std::string& backend, const std::string& a,
                              const std::string& b, Mode mode, std::int64_t d,
                              const std::vector<std::int64_t>& ns) {
  std::int64_t from = -1;
  for (auto it = ns.rbegin(); it != ns.rend(); ++it) {
    const Measurement* ta = t(key(backend, a, mode, d, *it));
    const Measurement* tb = t(key(backend, b, mode, d, *it));
    if (ta == nullptr || tb == nullptr) continue;  // filtered out
    if (tb->real_s < ta->real_s)
      from = *it;
    else
      break;
  }
  return from;
}
}  // namespace detail

/// The crossover sweep: direct vs assembled per N (fwd and bwd separately),
/// what kAuto picks, and how much slower its pick is than the faster path.
/// `extra` names further implementations to show next to them (their time
/// relative to the faster library path).
inline void print_crossover_table(Times& t, const std::string& backend, const std::string& title,
                                  std::int64_t d, bool quick, const PathOf& auto_path,
                                  const std::vector<std::string>& extra) {
  const auto& ns = sweep_counts(quick);
  bool any = false;
  for (std::int64_t n : ns) {
    for (Mode mode : {Mode::kFwd, Mode::kBwd}) {
      any = any || t(key(backend, "mos_direct", mode, d, n)) != nullptr;
    }
  }
  if (!any) return;
  std::printf(
      "\n== %s, d = %lld: crossover of the MoS paths (L = %lld layers, r = %lld, "
      "l = %lld) ==\n",
      title.c_str(), static_cast<long long>(d), static_cast<long long>(kLayers),
      static_cast<long long>(kRank), static_cast<long long>(kShardsPerVector));
  std::printf(
      "%s per pass. dir/asm > 1: assembled is faster. auto/best: kAuto's pick over the "
      "faster of the two.\n",
      t.clock());
  for (Mode mode : {Mode::kFwd, Mode::kBwd}) {
    std::printf("\n%s\n", mode == Mode::kFwd ? "forward" : "backward (dA, dB into the pool, dx)");
    std::printf("%5s %11s %11s %8s %10s %10s %10s", "N", "direct", "assembled", "dir/asm", "faster",
                "auto", "auto/best");
    for (const std::string& e : extra) std::printf(" %11s %9s", e.c_str(), "/best");
    std::printf("\n");
    for (std::int64_t n : ns) {
      const Measurement* dir = t(key(backend, "mos_direct", mode, d, n));
      const Measurement* asm_ = t(key(backend, "mos_assembled", mode, d, n));
      if (dir == nullptr || asm_ == nullptr) continue;
      const bool asm_faster = asm_->real_s < dir->real_s;
      const Measurement* best = asm_faster ? asm_ : dir;
      const std::string pick = auto_path(n);
      const Measurement* picked = pick == "assembled" ? asm_ : dir;
      std::printf("%5lld %11s %11s %8s %10s %10s %10s", static_cast<long long>(n),
                  format_time(dir).c_str(), format_time(asm_).c_str(),
                  format_ratio(dir, asm_).c_str(), asm_faster ? "assembled" : "direct",
                  pick.c_str(), format_ratio(picked, best).c_str());
      for (const std::string& e : extra) {
        const Measurement* te = t(key(backend, e, mode, d, n));
        std::printf(" %11s %9s", format_time(te).c_str(), format_ratio(te, best).c_str());
      }
      std::printf("\n");
    }
    const std::int64_t from =
        detail::crossover(t, backend, "mos_direct", "mos_assembled", mode, d, ns);
    std::int64_t auto_from = -1;
    for (std::int64_t n : ns) {
      if (auto_path(n) == "assembled") {
        auto_from = n;
        break;
      }
    }
    if (from >= 0) {
      std::printf("crossover (%s): assembled faster from N = %lld on", mode_name(mode),
                  static_cast<long long>(from));
    } else {
      std::printf("crossover (%s): assembled never faster at every larger N of the sweep",
                  mode_name(mode));
    }
    if (auto_from >= 0) {
      std::printf("; kAuto switches at N = %lld\n", static_cast<long long>(auto_from));
    } else {
      std::printf("; kAuto stays direct over the sweep\n");
    }
  }
}

}  // namespace mos
}  // namespace bench
}  // namespace rankwise
