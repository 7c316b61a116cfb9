// The multi-task study's plain types: options, the methods, the results.
// No rankwise, Eigen or CUDA types here, so main.cpp (host compiler, Eigen)
// and study_cuda.cu (nvcc, no Eigen) share exactly this.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace multitask {

/// The synthetic problem (see problem.hpp for how it is built from a seed).
struct ProblemConfig {
  std::int64_t d = 64;             // d_in = d_h = d_out
  std::int64_t tasks = 4;          // T
  std::int64_t shared_rank = 4;    // rank of the change every task shares, per layer
  std::int64_t task_rank = 4;      // rank of each task pair's conflicting change, per layer
  double shared_scale = 1.5;       // singular-value scale of the shared change
  double task_scale = 2.0;         // ... of the conflicting change (sign +/- within a pair)
  double mean_shift = 2.0;         // |mu_t|: how far apart the task input means are
};

/// How MoE-LoRA's gates are formed from the router's scores.
enum class MoeGates {
  kSoftmaxProb,  // softmax scores, gate = p_e of the selected expert(s), not renormalised
  kSumToK,       // the library's SMoRA default: sigmoid scores, gates renormalised to sum to k
};

struct StudyOptions {
  ProblemConfig problem;
  std::int64_t steps = 1000;
  std::int64_t seeds = 5;
  std::uint64_t first_seed = 1;    // seeds first_seed, first_seed + 1, ...
  std::int64_t batch = 128;
  std::int64_t test_size = 1024;   // test samples per task
  std::int64_t log_every = 10;     // steps per point of the loss curve
  double lr = 2e-3;
  double weight_decay = 0.0;
  double max_grad_norm = 1.0;
  MoeGates moe_gates = MoeGates::kSoftmaxProb;
  std::string backend = "auto";    // auto | cpu | cuda
  std::string csv = "multitask_results.csv";
  std::string svg = "multitask_loss.svg";
  bool quick = false;
  bool verbose = true;
};

/// One adapter method, applied to both adapted layers.
struct MethodSpec {
  enum class Kind { kLora, kSmora, kMos };
  std::string name;
  Kind kind = Kind::kLora;
  std::int64_t rank = 8;         // LoRA r; Smora r (= E g); MoS r (active rank per layer)
  std::int64_t top_k = 0;        // Smora k, in rank units
  std::int64_t group_size = 1;   // Smora g (g > 1: block MoE-LoRA)
  bool moe = false;              // Smora used as MoE-LoRA (gates from options.moe_gates)
  std::int64_t mos_v = 0;        // MoS equivalent rank v (pool budget)
  std::int64_t mos_l = 2;        // MoS shards per vector l
  std::int64_t mos_p = 1;        // MoS private ranks per layer p
  double alpha = 16;             // scale alpha / (active rank)
};

/// The methods of the study, in table order. Every method's scale is 2:
/// alpha = 2 x the rank a token uses (LoRA r, Smora k, MoS r).
inline std::vector<MethodSpec> default_methods() {
  using K = MethodSpec::Kind;
  std::vector<MethodSpec> m;
  auto lora = [&](std::int64_t r) {
    MethodSpec s;
    s.name = "LoRA r=" + std::to_string(r);
    s.kind = K::kLora;
    s.rank = r;
    s.alpha = 2.0 * r;
    m.push_back(s);
  };
  auto smora = [&](std::string name, std::int64_t r, std::int64_t g, std::int64_t k, bool moe) {
    MethodSpec s;
    s.name = std::move(name);
    s.kind = K::kSmora;
    s.rank = r;
    s.group_size = g;
    s.top_k = k;
    s.moe = moe;
    s.alpha = 2.0 * k;
    m.push_back(s);
  };
  lora(8);
  lora(64);
  smora("MoE-LoRA 8x8 top-1", 64, 8, 8, true);
  smora("MoE-LoRA 8x8 top-2", 64, 8, 16, true);
  smora("SMoRA r=64 k=8", 64, 1, 8, false);
  MethodSpec mos;
  mos.name = "MoS v=8 r=12";
  mos.kind = K::kMos;
  mos.mos_v = 8;  // pool = 1/8 of LoRA r=64's parameters
  mos.rank = 12;
  mos.mos_l = 2;
  mos.mos_p = 1;
  mos.alpha = 2.0 * 12;
  m.push_back(mos);
  return m;
}

/// One training run: one method, one seed.
struct RunResult {
  std::vector<double> test_loss;     // per task, MSE after training
  std::vector<double> curve_step;    // midpoint of each logging interval
  std::vector<double> curve_loss;    // mean training loss over that interval
  double seconds = 0;                // training loop only (no data generation, no evaluation)
};

struct MethodResult {
  std::string name;
  std::int64_t trainable = 0;        // parameters the optimiser updates (both layers)
  std::int64_t activated = 0;        // parameters one token touches (both layers)
  std::vector<RunResult> runs;       // one per seed
};

struct StudyResult {
  std::string backend;
  std::string device;
  std::vector<MethodResult> methods;
  // References per seed and task, computed on the same test sets.
  std::vector<std::vector<double>> base_loss;   // frozen base, no adapter
  std::vector<std::vector<double>> bayes_loss;  // E[y | x] under the true task posterior
};

/// Number of usable CUDA devices (0 without a driver or device); defined in
/// study_cuda.cu, only in builds with CUDA.
int cuda_devices();
/// The study on the GPU; defined in study_cuda.cu.
StudyResult run_study_cuda(const StudyOptions& options, const std::vector<MethodSpec>& methods);

}  // namespace multitask
