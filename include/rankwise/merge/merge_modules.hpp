// Merging whole adapters: every module independently with one method, spread
// over worker threads, with a quality report per module.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "rankwise/merge/baselines.hpp"
#include "rankwise/merge/lego.hpp"
#include "rankwise/merge/lora_factors.hpp"
#include "rankwise/merge/quality.hpp"

namespace rankwise {
namespace merge {

enum class MergeMethod { kLego, kSum, kSvd, kTies, kLinear };

inline const char* to_string(MergeMethod m) {
  switch (m) {
    case MergeMethod::kLego:
      return "lego";
    case MergeMethod::kSum:
      return "sum";
    case MergeMethod::kSvd:
      return "svd";
    case MergeMethod::kTies:
      return "ties";
    case MergeMethod::kLinear:
      return "linear";
  }
  return "?";
}

/// Parses "lego" | "sum" | "svd" | "ties" | "linear"; throws naming the value.
inline MergeMethod parse_merge_method(const std::string& name) {
  for (MergeMethod m : {MergeMethod::kLego, MergeMethod::kSum, MergeMethod::kSvd,
                        MergeMethod::kTies, MergeMethod::kLinear}) {
    if (name == to_string(m)) return m;
  }
  RANKWISE_CHECK(false, "unknown merge method '", name,
                 "': expected lego, sum, svd, ties or linear");
  return MergeMethod::kSum;
}

struct MergeOptions {
  MergeMethod method = MergeMethod::kLego;
  std::int64_t rank = 16;  // k (ignored by sum; linear keeps the sources' rank)
  LegoOptions lego{};      // rank taken from `rank`, seed from `seed`
  TiesOptions ties{};
  std::uint64_t seed = 0;
  int threads = 2;
  /// Called after each module with (modules done, modules total); from worker
  /// threads, serialised.
  std::function<void(std::size_t, std::size_t)> progress;
};

struct ModuleMerge {
  std::string name;
  LoraFactors merged;  // scale folded in: ΔW = merged.scale · B A
  MergeQuality quality;
};

/// Merges one module with `options.method`.
inline LoraFactors merge_module(const MergeInput& in, const MergeOptions& options,
                                const std::string& module) {
  switch (options.method) {
    case MergeMethod::kLego: {
      LegoOptions lego = options.lego;
      lego.rank = options.rank;
      lego.kmeans.seed = options.seed;
      return lego_merge(in, lego, module).folded();
    }
    case MergeMethod::kSum:
      return merge_sum(in, module);
    case MergeMethod::kSvd:
      return merge_svd(in, options.rank, module);
    case MergeMethod::kTies: {
      TiesOptions ties = options.ties;
      ties.seed = options.seed;
      return merge_ties(in, options.rank, ties, module);
    }
    case MergeMethod::kLinear:
      return merge_linear(in, module);
  }
  return {};
}

/// Merges every module (names[i] with inputs[i]) on `options.threads` threads.
/// Results are in input order and do not depend on the thread count. The
/// first error (in module order) is rethrown after all workers stop.
inline std::vector<ModuleMerge> merge_modules(const std::vector<std::string>& names,
                                              const std::vector<MergeInput>& inputs,
                                              const MergeOptions& options) {
  RANKWISE_CHECK(names.size() == inputs.size(), "merge_modules: ", names.size(), " names for ",
                 inputs.size(), " modules");
  RANKWISE_CHECK(options.threads >= 1, "merge_modules: threads must be >= 1, got ",
                 options.threads);
  std::vector<ModuleMerge> out(inputs.size());
  std::vector<std::exception_ptr> errors(inputs.size());
  std::atomic<std::size_t> next{0};
  std::size_t done = 0;
  std::mutex progress_mutex;
  auto worker = [&] {
    for (std::size_t i = next++; i < inputs.size(); i = next++) {
      try {
        out[i].name = names[i];
        out[i].merged = merge_module(inputs[i], options, names[i]);
        out[i].quality = merge_quality(inputs[i], out[i].merged);
      } catch (...) {
        errors[i] = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(progress_mutex);
      ++done;
      if (options.progress) options.progress(done, inputs.size());
    }
  };
  const int workers = static_cast<int>(
      std::min<std::size_t>(options.threads, std::max<std::size_t>(inputs.size(), 1)));
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  return out;
}

}  // namespace merge
}  // namespace rankwise
