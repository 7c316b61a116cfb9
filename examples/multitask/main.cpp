// multitask: LoRA, MoE-LoRA, SMoRA and MoS trained side by side on a
// synthetic multi-task problem, with the same data, steps and optimiser.
//
//   ./build/examples/multitask            the default study (CPU: about 30 s of one core)
//   ./build/examples/multitask --quick    a shortened run (the test uses it)
//   ./build/examples/multitask --help
//
// Prints a progress line per method and seed, then the table; writes it as
// CSV and the training-loss curves as SVG. README.md (next to this file)
// describes the problem, the model and the definitions.
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <rankwise/rankwise.hpp>

#include "ops_cpu.hpp"
#include "report.hpp"
#include "study.hpp"
#include "trainer.hpp"

namespace {

using multitask::StudyOptions;

constexpr int kUsageError = 2;
constexpr int kNoDevice = 77;  // --backend cuda on a machine without a CUDA device

void print_help(const char* argv0) {
  const StudyOptions d;
  std::printf(
      "usage: %s [options]\n"
      "\n"
      "Trains LoRA r=8, LoRA r=64, MoE-LoRA (8 experts of rank 8, top-1 and top-2),\n"
      "SMoRA (r=64, k=8) and MoS (1/8 of LoRA r=64's parameters) as adapters of a\n"
      "frozen two-layer network on a synthetic multi-task regression problem, with the\n"
      "same data, steps and AdamW settings, over several seeds. Prints a table of test\n"
      "MSE per task (mean ± sd over seeds), writes it as CSV and plots the training\n"
      "loss as SVG.\n"
      "\n"
      "options (defaults in brackets):\n"
      "  --steps N          training steps per run [%lld]\n"
      "  --seeds N          seeds (problem, data and init differ per seed) [%lld]\n"
      "  --first-seed N     first seed; the others follow [%llu]\n"
      "  --tasks N          number of tasks [%lld]\n"
      "  --d N              width d_in = d_h = d_out, even [%lld]\n"
      "  --batch N          samples per step, tasks mixed [%lld]\n"
      "  --test-size N      test samples per task [%lld]\n"
      "  --log-every N      steps per point of the loss curve [%lld]\n"
      "  --lr X             AdamW learning rate [%g]\n"
      "  --weight-decay X   AdamW decoupled weight decay [%g]\n"
      "  --clip X           global gradient-norm clip, 0 = off [%g]\n"
      "  --moe-gates G      MoE-LoRA gates: prob (softmax probability of the expert) or\n"
      "                     sum-to-k (SMoRA's default; makes the top-1 router untrainable) [prob]\n"
      "  --backend B        auto, cpu or cuda; auto = cuda when built with CUDA and a\n"
      "                     device is present, else cpu [%s]\n"
      "  --csv PATH         table as CSV [%s]\n"
      "  --svg PATH         loss-curve plot [%s]\n"
      "  --quick            shortened run: 60 steps, 2 seeds, 256 test samples per task,\n"
      "                     a curve point every 5 steps (other flags still apply)\n"
      "  --quiet            no progress lines\n"
      "  --help             this text\n"
      "\n"
      "exit status: 0 done, 1 error, 2 bad usage, 77 --backend cuda without a CUDA device\n",
      argv0, static_cast<long long>(d.steps), static_cast<long long>(d.seeds),
      static_cast<unsigned long long>(d.first_seed), static_cast<long long>(d.problem.tasks),
      static_cast<long long>(d.problem.d), static_cast<long long>(d.batch),
      static_cast<long long>(d.test_size), static_cast<long long>(d.log_every), d.lr,
      d.weight_decay, d.max_grad_norm, d.backend.c_str(), d.csv.c_str(), d.svg.c_str());
}

struct UsageError {
  std::string message;
};

long long parse_int(const std::string& flag, const std::string& v, long long min) {
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x < min) {
    throw UsageError{flag + " expects an integer >= " + std::to_string(min) + ", got '" + v + "'"};
  }
  return x;
}

double parse_real(const std::string& flag, const std::string& v, double min) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !(x >= min) || !std::isfinite(x)) {
    throw UsageError{flag + " expects a number >= " + std::to_string(min) + ", got '" + v + "'"};
  }
  return x;
}

StudyOptions parse(int argc, char** argv, bool* help) {
  StudyOptions o;
  std::vector<std::pair<std::string, std::string>> flags;
  static const char* with_value[] = {"--steps", "--seeds", "--first-seed", "--tasks", "--d",
                                     "--batch", "--test-size", "--log-every", "--lr",
                                     "--weight-decay", "--clip", "--moe-gates", "--backend",
                                     "--csv", "--svg"};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], value;
    const auto eq = a.find('=');
    bool has_value = false;
    if (a.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = a.substr(eq + 1);
      a = a.substr(0, eq);
      has_value = true;
    }
    bool needs = false;
    for (const char* f : with_value) needs = needs || a == f;
    if (needs && !has_value) {
      if (i + 1 >= argc) throw UsageError{a + " needs a value"};
      value = argv[++i];
    } else if (!needs && has_value) {
      throw UsageError{a + " takes no value"};
    }
    if (!needs && a != "--quick" && a != "--quiet" && a != "--help" && a != "-h") {
      throw UsageError{"unknown option '" + a + "' (see --help)"};
    }
    flags.emplace_back(a, value);
  }
  for (const auto& f : flags) {
    if (f.first == "--help" || f.first == "-h") *help = true;
    if (f.first == "--quick") {
      o.quick = true;
      o.steps = 60;
      o.seeds = 2;
      o.test_size = 256;
      o.log_every = 5;
    }
  }
  for (const auto& [flag, v] : flags) {
    if (flag == "--steps") o.steps = parse_int(flag, v, 1);
    else if (flag == "--seeds") o.seeds = parse_int(flag, v, 1);
    else if (flag == "--first-seed")
      o.first_seed = static_cast<std::uint64_t>(parse_int(flag, v, 0));
    else if (flag == "--tasks") o.problem.tasks = parse_int(flag, v, 1);
    else if (flag == "--d") o.problem.d = parse_int(flag, v, 2);
    else if (flag == "--batch") o.batch = parse_int(flag, v, 1);
    else if (flag == "--test-size") o.test_size = parse_int(flag, v, 1);
    else if (flag == "--log-every") o.log_every = parse_int(flag, v, 1);
    else if (flag == "--lr") o.lr = parse_real(flag, v, 0);
    else if (flag == "--weight-decay") o.weight_decay = parse_real(flag, v, 0);
    else if (flag == "--clip") o.max_grad_norm = parse_real(flag, v, 0);
    else if (flag == "--moe-gates") {
      if (v == "prob") o.moe_gates = multitask::MoeGates::kSoftmaxProb;
      else if (v == "sum-to-k") o.moe_gates = multitask::MoeGates::kSumToK;
      else throw UsageError{"--moe-gates expects prob or sum-to-k, got '" + v + "'"};
    } else if (flag == "--backend") {
      if (v != "auto" && v != "cpu" && v != "cuda") {
        throw UsageError{"--backend expects auto, cpu or cuda, got '" + v + "'"};
      }
      o.backend = v;
    } else if (flag == "--csv") o.csv = v;
    else if (flag == "--svg") o.svg = v;
    else if (flag == "--quiet") o.verbose = false;
  }
  if (o.problem.d % 2 != 0) {
    throw UsageError{"--d must be even (MoS splits each rank vector into l = 2 shards), got " +
                     std::to_string(o.problem.d)};
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  StudyOptions o;
  bool help = false;
  try {
    o = parse(argc, argv, &help);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "multitask: %s\n", e.message.c_str());
    return kUsageError;
  }
  if (help) {
    print_help(argv[0]);
    return 0;
  }

#if defined(MULTITASK_WITH_CUDA)
  const bool built_with_cuda = true;
#else
  const bool built_with_cuda = false;
#endif
  std::string backend = o.backend;
  if (backend == "cuda" && !built_with_cuda) {
    std::fprintf(stderr,
                 "multitask: --backend cuda, but this binary was built without CUDA (no nvcc "
                 "when CMake configured rankwise; RANKWISE_CUDA=ON requires it)\n");
    return kUsageError;
  }
  int devices = 0;
#if defined(MULTITASK_WITH_CUDA)
  devices = multitask::cuda_devices();
#endif
  if (backend == "cuda" && devices == 0) {
    std::printf("multitask: --backend cuda, but no CUDA device is present (skipped)\n");
    return kNoDevice;
  }
  if (backend == "auto") backend = devices > 0 ? "cuda" : "cpu";

  // Fail before training, not after, when an output cannot be written.
  for (const std::string& path : {o.csv, o.svg}) {
    std::FILE* f = std::fopen(path.c_str(), "a");
    if (f == nullptr) {
      std::fprintf(stderr, "multitask: cannot write %s: %s\n", path.c_str(), std::strerror(errno));
      return 1;
    }
    std::fclose(f);
  }

  const auto methods = multitask::default_methods();
  std::printf("multitask%s: %lld tasks, d = %lld, %lld steps x batch %lld, AdamW lr %g "
              "(weight decay %g, clip %g), %lld seed%s from %llu, %lld test samples per task, "
              "MoE-LoRA gates %s, backend %s\n",
              o.quick ? " (quick)" : "", static_cast<long long>(o.problem.tasks),
              static_cast<long long>(o.problem.d), static_cast<long long>(o.steps),
              static_cast<long long>(o.batch), o.lr, o.weight_decay, o.max_grad_norm,
              static_cast<long long>(o.seeds), o.seeds == 1 ? "" : "s",
              static_cast<unsigned long long>(o.first_seed), static_cast<long long>(o.test_size),
              o.moe_gates == multitask::MoeGates::kSoftmaxProb ? "prob" : "sum-to-k",
              backend.c_str());
  std::fflush(stdout);

  const auto start = std::chrono::steady_clock::now();
  multitask::StudyResult result;
  try {
    if (backend == "cuda") {
#if defined(MULTITASK_WITH_CUDA)
      result = multitask::run_study_cuda(o, methods);
#endif
    } else {
      rankwise::CpuContext ctx;
      result = multitask::run_study<float, rankwise::CpuBackend>(ctx, o, methods,
                                                                 "CPU (Eigen, one thread)");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "multitask: %s\n", e.what());
    return 1;
  }
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  std::printf("\nTest MSE per task after %lld steps, mean ± sd over %lld seed%s (%s, %s):\n\n",
              static_cast<long long>(o.steps), static_cast<long long>(o.seeds),
              o.seeds == 1 ? "" : "s", result.backend.c_str(), result.device.c_str());
  std::fputs(multitask::format_table(result, o).c_str(), stdout);
  std::printf(
      "\ntrainable: parameters AdamW updates (both layers, routers included); active/tok:\n"
      "parameters one token uses (LoRA, MoS: r (d_in + d_out) per layer; Smora: k (d_in + d_out)\n"
      "+ the router's E d_in); s/seed: training loop only. References: the frozen base without\n"
      "adapter, and E[y | x] with the true task posterior (the best any task-blind model can "
      "do).\n");
  int status = 0;
  if (multitask::write_csv(o.csv, result, o)) {
    std::printf("wrote %s\n", o.csv.c_str());
  } else {
    std::fprintf(stderr, "multitask: cannot write %s\n", o.csv.c_str());
    status = 1;
  }
  if (multitask::write_svg(o.svg, result, o)) {
    std::printf("wrote %s\n", o.svg.c_str());
  } else {
    std::fprintf(stderr, "multitask: cannot write %s\n", o.svg.c_str());
    status = 1;
  }
  std::printf("total wall time %.1f s\n", wall);
  return status;
}
