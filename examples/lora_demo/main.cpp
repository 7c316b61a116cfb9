// lora_demo: one LoRA layer, shaped like GPT-2's attention projection c_attn
// (768 -> 2304), run forward and backward on the CPU and, when rankwise was
// built with CUDA and a GPU is present, on the GPU too. It prints what it did
// and checks every result against a plain Eigen computation of the same
// formula; the exit status is 0 when all checks pass.
//
//   ./build/examples/lora_demo
#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include <rankwise/rankwise.hpp>

#if defined(RANKWISE_DEMO_WITH_CUDA)
#include "gpu_demo.hpp"
#endif

namespace {

using rankwise::CpuBackend;
using rankwise::CpuContext;
using rankwise::host_view;
using rankwise::WeightLayout;
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr std::int64_t kDin = 768;
constexpr std::int64_t kDout = 2304;
constexpr std::int64_t kRank = 8;
constexpr double kAlpha = 32;
constexpr std::int64_t kTokens = 64;
constexpr std::uint64_t kSeed = 2024;

// Deterministic U(lo, hi) entries from rankwise's counter-based generator.
Mat random_matrix(std::int64_t rows, std::int64_t cols, std::uint64_t seed, double lo, double hi) {
  Mat m(rows, cols);
  for (std::int64_t i = 0; i < m.size(); ++i) {
    m.data()[i] = static_cast<float>(rankwise::uniform(seed, static_cast<std::uint64_t>(i), lo, hi));
  }
  return m;
}

// Views of Eigen matrices (row-major, contiguous).
rankwise::MatrixView<float> view(Mat& m) { return host_view(m.data(), m.rows(), m.cols()); }
rankwise::MatrixView<const float> cview(const Mat& m) {
  return host_view(m.data(), m.rows(), m.cols());
}

// The layer's A (r x d_in) and B (d_out x r, PEFT layout) as Eigen matrices.
Mat get_a(const rankwise::Lora<float, CpuBackend>& layer) {
  Mat a(kRank, kDin);
  layer.get_a(view(a));
  return a;
}
Mat get_b(const rankwise::Lora<float, CpuBackend>& layer) {
  Mat b(kDout, kRank);
  layer.get_b(view(b));
  return b;
}

// max |got - want| / max |want|.
double relative_error(const Mat& got, const Mat& want) {
  const double scale = want.cwiseAbs().maxCoeff();
  const double diff = (got - want).cwiseAbs().maxCoeff();
  return scale > 0 ? diff / scale : diff;
}

int failures = 0;

void check(const char* what, double error, double tolerance) {
  const bool ok = error <= tolerance;
  failures += ok ? 0 : 1;
  std::printf("  %-58s %.2e  (tolerance %.0e) %s\n", what, error, tolerance, ok ? "OK" : "FAILED");
}

#if defined(RANKWISE_DEMO_WITH_CUDA)
std::vector<float> to_vector(const Mat& m) { return std::vector<float>(m.data(), m.data() + m.size()); }
#endif

}  // namespace

int main() {
  CpuContext ctx;
  rankwise::LoraConfig cfg;
  cfg.d_in = kDin;
  cfg.d_out = kDout;
  cfg.rank = kRank;
  cfg.alpha = kAlpha;
  rankwise::Lora<float, CpuBackend> layer(ctx, cfg);
  const float s = static_cast<float>(layer.scale());

  std::printf("LoRA layer like GPT-2's c_attn: d_in = %lld, d_out = %lld, r = %lld, alpha = %g, "
              "scale s = alpha / r = %g\n",
              static_cast<long long>(kDin), static_cast<long long>(kDout),
              static_cast<long long>(kRank), kAlpha, layer.scale());
  std::printf("  trainable parameters: %lld (A and B), %.2f%% of the frozen %lld in W0\n",
              static_cast<long long>(layer.num_parameters()),
              100.0 * layer.num_parameters() / (kDin * kDout),
              static_cast<long long>(kDin * kDout));

  // ---- PEFT initialisation: A random, B zero, so the adapter adds nothing.
  layer.init_peft(kSeed);
  Mat a = get_a(layer);
  const Mat x = random_matrix(kTokens, kDin, 1, -1.0, 1.0);
  const Mat w0 = random_matrix(kDout, kDin, 2, -1.0 / std::sqrt(kDin), 1.0 / std::sqrt(kDin));
  Mat delta = Mat::Zero(kTokens, kDout);
  layer.forward(cview(x), view(delta));
  std::printf("\ninit_peft(%llu): A in [%.4f, %.4f] (bound 1/sqrt(d_in) = %.4f), B = 0\n",
              static_cast<unsigned long long>(kSeed), a.minCoeff(), a.maxCoeff(),
              1.0 / std::sqrt(static_cast<double>(kDin)));
  std::printf("  forward on %lld tokens with B = 0: the adapter adds max |delta y| = %g\n",
              static_cast<long long>(kTokens), delta.cwiseAbs().maxCoeff());
  check("delta is exactly zero at initialisation", delta.cwiseAbs().maxCoeff(), 0.0);

  // ---- A nonzero B, then forward with the base weight in both layouts.
  const Mat b_init = random_matrix(kDout, kRank, 3, -0.02, 0.02);
  layer.set_b(cview(b_init));
  const Mat b = get_b(layer);
  std::printf("\nset B to U(-0.02, 0.02): forward y = x W0^T + s x A^T B^T on %lld tokens\n",
              static_cast<long long>(kTokens));
  Mat y(kTokens, kDout);
  layer.forward(cview(x), cview(w0), WeightLayout::kOutIn, view(y));
  const Mat y_base = x * w0.transpose();
  const Mat y_ref = y_base + s * (x * a.transpose()) * b.transpose();
  std::printf("  |x W0^T| = %.3f, |adapter part| = %.3f (Frobenius norms)\n", y_base.norm(),
              (y - y_base).norm());
  check("forward vs Eigen reference (relative)", relative_error(y, y_ref), 1e-5);

  const Mat w0_t = w0.transpose();  // (d_in x d_out): Conv1D / fan_in_fan_out layout
  Mat y_t(kTokens, kDout);
  layer.forward(cview(x), cview(w0_t), WeightLayout::kInOut, view(y_t));
  check("fan_in_fan_out layout (W0 as d_in x d_out) vs out-in layout", relative_error(y_t, y),
        1e-6);

  // ---- Backward for an upstream gradient dy.
  const Mat dy = random_matrix(kTokens, kDout, 4, -1.0, 1.0);
  Mat dx = Mat::Zero(kTokens, kDin);
  layer.backward(cview(x), cview(dy), view(dx));
  Mat grad_a(kRank, kDin), grad_b(kDout, kRank);
  Eigen::Map<const Mat> grad_a_map(layer.grad_a().data, kRank, kDin);
  grad_a = grad_a_map;
  layer.get_grad_b(view(grad_b));
  const Mat h = x * a.transpose();              // (n x r)
  const Mat dh = s * dy * b;                    // (n x r)
  const Mat grad_a_ref = dh.transpose() * x;    // (r x d_in)
  const Mat grad_b_ref = s * dy.transpose() * h;  // (d_out x r)
  const Mat dx_ref = dh * a;                    // (n x d_in)
  std::printf("\nbackward with a random dL/dy: |dL/dA| = %.4f, |dL/dB| = %.4f, |dL/dx (adapter)| "
              "= %.4f\n",
              grad_a.norm(), grad_b.norm(), dx.norm());
  check("dL/dA vs Eigen reference (relative)", relative_error(grad_a, grad_a_ref), 1e-5);
  check("dL/dB vs Eigen reference (relative)", relative_error(grad_b, grad_b_ref), 1e-5);
  check("dL/dx vs Eigen reference (relative)", relative_error(dx, dx_ref), 1e-5);

#if defined(RANKWISE_DEMO_WITH_CUDA)
  lora_demo::GpuDemoInput gpu;
  gpu.d_in = kDin;
  gpu.d_out = kDout;
  gpu.rank = kRank;
  gpu.tokens = kTokens;
  gpu.alpha = kAlpha;
  gpu.seed = kSeed;
  gpu.x = to_vector(x);
  gpu.w0 = to_vector(w0);
  gpu.b = to_vector(b);
  gpu.dy = to_vector(dy);
  gpu.a = to_vector(a);
  gpu.y = to_vector(y);
  gpu.grad_a = to_vector(grad_a);
  gpu.grad_b = to_vector(grad_b);
  gpu.dx = to_vector(dx);
#endif

  // ---- Merge and unmerge: W0 + s B A folded into the base weight and back.
  Mat w_merged = w0;
  layer.merge(view(w_merged), WeightLayout::kOutIn);
  const Mat y_merged = x * w_merged.transpose();
  std::printf("\nmerge: W0 += s B A (max |s B A| = %.2e)\n", (w_merged - w0).cwiseAbs().maxCoeff());
  check("x (W0 + s B A)^T vs forward with the adapter (relative)", relative_error(y_merged, y),
        1e-5);
  layer.unmerge(view(w_merged), WeightLayout::kOutIn);
  check("unmerge: max |W0 after round trip - W0| (absolute)",
        (w_merged - w0).cwiseAbs().maxCoeff(), 1e-6);
  Mat w_merged_t = w0_t;
  layer.merge(view(w_merged_t), WeightLayout::kInOut);
  check("merge in fan_in_fan_out layout vs W0 + s B A (relative)",
        relative_error(w_merged_t.transpose(), w0 + s * b * a), 1e-6);
  layer.unmerge(view(w_merged_t), WeightLayout::kInOut);
  check("unmerge in fan_in_fan_out layout: round trip (absolute)",
        (w_merged_t - w0_t).cwiseAbs().maxCoeff(), 1e-6);

  // ---- Training: fit the adapter to a rank-r "teacher" update with SGD.
  // The target is what a hidden rank-r update ΔW* adds to the base output; the
  // base output x W0^T is frozen, so each step runs only the adapter: y = base
  // + s x A^T B^T, loss = 0.5 / n |y - target|^2, dL/dy = (y - target) / n.
  const Mat teacher_a = random_matrix(kRank, kDin, 5, -0.05, 0.05);
  const Mat teacher_b = random_matrix(kDout, kRank, 6, -0.05, 0.05);
  const Mat target = y_base + x * (teacher_b * teacher_a).transpose();
  layer.init_peft(kSeed);  // start from the PEFT initialisation (B = 0)
  layer.zero_grad();
  constexpr int kSteps = 30;
  constexpr float kLearningRate = 0.05f;  // 0.1 diverges here
  std::printf("\nSGD on a toy regression (fit a rank-%lld teacher update, %lld tokens, lr = %g, "
              "%d steps):\n",
              static_cast<long long>(kRank), static_cast<long long>(kTokens), kLearningRate,
              kSteps);
  double first_loss = 0, last_loss = 0;
  bool decreasing = true;
  double previous = 0;
  for (int step = 0; step <= kSteps; ++step) {
    Mat y_step = y_base;
    layer.forward(cview(x), view(y_step));
    const Mat residual = y_step - target;
    const double loss = 0.5 * residual.squaredNorm() / kTokens;
    if (step == 0) first_loss = loss;
    if (step > 0 && loss > previous) decreasing = false;
    previous = last_loss = loss;
    if (step % 5 == 0) std::printf("  step %2d: loss %.6f\n", step, loss);
    if (step == kSteps) break;
    const Mat dy_step = residual / static_cast<float>(kTokens);
    layer.backward(cview(x), cview(dy_step));  // overwrites the gradients
    for (auto& p : layer.parameters()) {
      Eigen::Map<Mat> value(p.value.data, p.value.rows, p.value.cols);
      Eigen::Map<const Mat> grad(p.grad.data, p.grad.rows, p.grad.cols);
      value -= kLearningRate * grad;
    }
  }
  const bool trained = decreasing && last_loss < 0.5 * first_loss;
  failures += trained ? 0 : 1;
  std::printf("  loss %.6f -> %.6f (%.1f%% of the start), %s at every step %s\n", first_loss,
              last_loss, 100.0 * last_loss / first_loss,
              decreasing ? "decreasing" : "NOT decreasing", trained ? "OK" : "FAILED");

  std::printf("\nCPU part: %s\n\n", failures == 0 ? "all checks passed" : "SOME CHECKS FAILED");

#if defined(RANKWISE_DEMO_WITH_CUDA)
  failures += lora_demo::run_gpu_demo(gpu);
#else
  std::printf("GPU part: not built (rankwise was configured without CUDA)\n");
#endif
  return failures == 0 ? 0 : 1;
}
