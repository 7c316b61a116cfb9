// The MoS benchmark's tables, printed from the results of one run (CPU and GPU
// binary alike) on the clock RecordingReporter hands out. Every ratio divides
// two times measured in the same binary and the same run.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "mos/sizes.hpp"
#include "support/report.hpp"
#include "support/table.hpp"

namespace rankwise {
namespace bench {
namespace mos {

/// Which path Mos's kAuto takes for n tokens ("direct" or "assembled").
using PathOf = std::function<std::string(std::int64_t n)>;

inline const char* clock_name(const RecordingReporter& rec) {
  return rec.cpu_time() ? "CPU time" : "wall time";
}

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
  // path (kAssembled, or kAuto where prefer_assembled_shards(n)): assembled
  // A (r x d_in), Bᵀ (r x d_out) and their gradients, in every Mos's
  // workspace (layers/mos_ops.hpp).
  const double assembled = 2.0 * kLayers * kRank * (d + d) * bytes_per_value;
  std::printf(
      "  (working memory, from layers/mos_ops.hpp: each Mos's workspace on the assembled "
      "path holds A, B^T and their gradients, 2*r*(d_in+d_out) values: %s for the stack, "
      "vs %s of pool + pool gradients)\n",
      mib(assembled).c_str(), mib(2.0 * mos).c_str());
}

/// The main table: per N, the dense LoRA stack and MoS on each path, with
/// the target verdict for kAuto (what a user gets). Returns the tally.
inline Tally print_stack_table(RecordingReporter& rec, const std::string& backend,
                               const std::string& title, std::int64_t d, bool quick,
                               const PathOf& auto_path) {
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
      clock_name(rec), static_cast<long long>(kLayers), kTarget);
  for (Mode mode : {Mode::kFwd, Mode::kStep}) {
    std::printf("\n%s\n", mode == Mode::kFwd
                              ? "forward (y += delta, layers 0..L-1)"
                              : "forward + backward (fwd, then dA/dB/dx layers L-1..0; MoS "
                                "includes the pool's zero_grad)");
    Table table({"N", "lora", "|", "direct", "/lora", "|", "assembled", "/lora", "|", "auto",
                 "/lora", "auto path", "|", "target (auto)"});
    for (std::int64_t n : token_counts(quick)) {
      const Measurement* lora = rec.find(key(backend, "lora", mode, d, n));
      if (lora == nullptr) continue;
      const Measurement* dir = rec.find(key(backend, "mos_direct", mode, d, n));
      const Measurement* asm_ = rec.find(key(backend, "mos_assembled", mode, d, n));
      const Measurement* aut = rec.find(key(backend, "mos_auto", mode, d, n));
      table.row({std::to_string(n), format_time(lora), "", format_time(dir),
                 format_ratio(dir, lora), "", format_time(asm_), format_ratio(asm_, lora), "",
                 format_time(aut), format_ratio(aut, lora), auto_path(n), "",
                 verdict(aut, lora, kTarget, &tally)});
    }
    table.print();
  }
  const Measurement* zero = rec.find(zero_grad_key(backend, d));
  if (zero != nullptr) {
    std::printf("\nMoS pool zero_grad() alone (in every MoS step above): %s\n",
                format_time(zero).c_str());
  }
  return tally;
}

namespace detail {
// The smallest N of the sweep from which `b` is faster than `a` at every
// larger N measured; -1 if never.
inline std::int64_t crossover(RecordingReporter& rec, const std::string& backend,
                              const std::string& a, const std::string& b, Mode mode, std::int64_t d,
                              const std::vector<std::int64_t>& ns) {
  std::int64_t from = -1;
  for (auto it = ns.rbegin(); it != ns.rend(); ++it) {
    const Measurement* ta = rec.find(key(backend, a, mode, d, *it));
    const Measurement* tb = rec.find(key(backend, b, mode, d, *it));
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
inline void print_crossover_table(RecordingReporter& rec, const std::string& backend,
                                  const std::string& title, std::int64_t d, bool quick,
                                  const PathOf& auto_path, const std::vector<std::string>& extra) {
  const auto& ns = sweep_counts(quick);
  bool any = false;
  for (std::int64_t n : ns) {
    for (Mode mode : {Mode::kFwd, Mode::kBwd}) {
      any = any || rec.find(key(backend, "mos_direct", mode, d, n)) != nullptr;
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
      clock_name(rec));
  for (Mode mode : {Mode::kFwd, Mode::kBwd}) {
    std::printf("\n%s\n", mode == Mode::kFwd ? "forward" : "backward (dA, dB into the pool, dx)");
    std::vector<std::string> header{"N",      "direct", "assembled", "dir/asm",
                                    "faster", "auto",   "auto/best"};
    for (const std::string& e : extra) {
      header.push_back("|");
      header.push_back(e);
      header.push_back("/best");
    }
    Table table(header);
    for (std::int64_t n : ns) {
      const Measurement* dir = rec.find(key(backend, "mos_direct", mode, d, n));
      const Measurement* asm_ = rec.find(key(backend, "mos_assembled", mode, d, n));
      if (dir == nullptr || asm_ == nullptr) continue;
      const bool asm_faster = asm_->real_s < dir->real_s;
      const Measurement* best = asm_faster ? asm_ : dir;
      const std::string pick = auto_path(n);
      const Measurement* picked = pick == "assembled" ? asm_ : dir;
      std::vector<std::string> cells{std::to_string(n),
                                     format_time(dir),
                                     format_time(asm_),
                                     format_ratio(dir, asm_),
                                     asm_faster ? "assembled" : "direct",
                                     pick,
                                     format_ratio(picked, best)};
      for (const std::string& e : extra) {
        const Measurement* te = rec.find(key(backend, e, mode, d, n));
        cells.insert(cells.end(), {"", format_time(te), format_ratio(te, best)});
      }
      table.row(cells);
    }
    table.print();
    const std::int64_t from =
        detail::crossover(rec, backend, "mos_direct", "mos_assembled", mode, d, ns);
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

/// The tables of one storage type: parameter bytes, the main table at
/// d = kDim, and the crossover at every width of the sweep. Returns the tally.
inline Tally print_tables(RecordingReporter& rec, const std::string& backend,
                          const std::string& title, const char* type_name,
                          std::size_t bytes_per_value, bool quick, const PathOf& auto_path,
                          const std::vector<std::string>& extra) {
  print_parameter_bytes(kDim, bytes_per_value, type_name);
  const Tally tally = print_stack_table(rec, backend, title, kDim, quick, auto_path);
  for (std::int64_t d : sweep_dims(quick)) {
    print_crossover_table(rec, backend, title, d, quick, auto_path, extra);
  }
  return tally;
}

}  // namespace mos
}  // namespace bench
}  // namespace rankwise
