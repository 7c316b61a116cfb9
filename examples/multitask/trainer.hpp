// The study's model and training loop, written once for both backends: a
// template over (T, Backend) that includes only Eigen-free rankwise headers,
// so main.cpp (CPU) and study_cuda.cu (GPU) both instantiate it. Before
// including it, a file includes its backend's umbrella header and defines
// DeviceOps<Backend> (the elementwise GELU and the loss; ops_cpu.hpp on the
// CPU, study_cuda.cu on the GPU).
//
// Model, with a frozen base and the same adapter method on both layers:
//   z = x W1^T + delta1(x)     adapted layer 1 (d -> d)
//   h = gelu(z)
//   y = h W2^T + delta2(h)     adapted layer 2 (d -> d)
// Loss: mean squared error over the batch and the d outputs.
//
// Every step runs in backend memory: nothing but the logged loss (one double
// per logging interval) comes back to the host while training.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include "problem.hpp"
#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/backend/tags.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/random.hpp"
#include "rankwise/layers/layer.hpp"
#include "rankwise/layers/lora.hpp"
#include "rankwise/layers/mos.hpp"
#include "rankwise/layers/shard_pool.hpp"
#include "rankwise/layers/smora.hpp"
#include "rankwise/optim/adam.hpp"
#include "study.hpp"

namespace multitask {

using rankwise::Buffer;
using rankwise::Context;
using rankwise::MatrixView;
using rankwise::ParameterRef;

/// Per backend (T = float; double too on the CPU), all views contiguous and
/// in the backend's memory, `acc` a backend pointer to doubles:
///   gelu_forward(ctx, z, h)                 h = gelu(z)
///   gelu_backward(ctx, z, dh, dz)           dz = dh * gelu'(z)
///   squared_error(ctx, y, t, dy, s, acc)    *acc += sum (y - t)^2, in a fixed order;
///                                           dy = s (y - t) unless dy is empty
///   zero(ctx, acc, n) / read(ctx, acc, n, host)
///   kCheckRouterFinite                      Smora's per-forward NaN check (a host
///                                           read on the GPU, so off there)
template <class Backend>
struct DeviceOps;

// ---------------------------------------------------------------------------
// The adapted layers: Lora, Smora or Mos, used through the layer concept
// (rankwise/layers/layer.hpp): the same forward, backward, parameters() and
// num_parameters() on all three, so the model holds a std::variant and one
// generic lambda drives whichever it holds.
// ---------------------------------------------------------------------------
template <class T, class Backend>
using AdaptedLayer = std::variant<std::monostate, rankwise::Lora<T, Backend>,
                                  rankwise::Smora<T, Backend>, rankwise::Mos<T, Backend>>;

inline rankwise::LoraConfig lora_config(std::int64_t d_in, std::int64_t d_out,
                                        const MethodSpec& m) {
  rankwise::LoraConfig c;
  c.d_in = d_in;
  c.d_out = d_out;
  c.rank = m.rank;
  c.alpha = m.alpha;
  return c;
}

template <class Backend>
rankwise::SmoraConfig smora_config(std::int64_t d_in, std::int64_t d_out, const MethodSpec& m,
                                   MoeGates gates) {
  rankwise::SmoraConfig c;
  c.d_in = d_in;
  c.d_out = d_out;
  c.router.num_units = m.rank;
  c.router.group_size = m.group_size;
  c.router.top_k = m.top_k;
  c.alpha = m.alpha;
  c.check_finite = DeviceOps<Backend>::kCheckRouterFinite;
  if (m.moe && gates == MoeGates::kSoftmaxProb) {
    // A conventional MoE router: softmax over the experts, each selected
    // expert weighted by its probability (Switch Transformer for top-1).
    // Renormalising the selected gates (the SMoRA default, kSumToK) makes a
    // top-1 gate constant, so its router would get no gradient at all.
    c.router.score = rankwise::ScoreFunction::kSoftmax;
    c.router.normalization = rankwise::GateNormalization::kNone;
    c.router.gate_uses_bias = false;
  }
  return c;
}

inline rankwise::MosConfig mos_config(const MethodSpec& m, std::uint64_t seed) {
  rankwise::MosConfig c;
  c.rank = m.rank;
  c.alpha = m.alpha;
  c.seed = seed;
  return c;
}

/// Parameters one token touches in one adapted layer (d_in -> d_out):
///   LoRA      r (d_in + d_out)
///   Smora     k (d_in + d_out) + E d_in     (k routed rank units + all E router rows)
///   MoS       r (d_in + d_out)              (the r assembled rank-1 units; the pool
///                                            holds fewer, shared, parameters)
inline std::int64_t activated_per_layer(const MethodSpec& m, std::int64_t d_in,
                                        std::int64_t d_out) {
  switch (m.kind) {
    case MethodSpec::Kind::kLora:
      return m.rank * (d_in + d_out);
    case MethodSpec::Kind::kSmora:
      return m.top_k * (d_in + d_out) + (m.rank / m.group_size) * d_in;
    case MethodSpec::Kind::kMos:
      return m.rank * (d_in + d_out);
  }
  return 0;
}

// ---------------------------------------------------------------------------
// The student network.
// ---------------------------------------------------------------------------
template <class T, class Backend>
class Student {
 public:
  /// `method` null: the frozen base alone (no adapter). Activations are
  /// allocated for up to `capacity` rows.
  Student(Context<Backend>& ctx, MatrixView<const T> w1, MatrixView<const T> w2,
          const MethodSpec* method, MoeGates gates, std::uint64_t seed, std::int64_t capacity)
      : ctx_(&ctx),
        w1_(w1),
        w2_(w2),
        d_(w1.rows),
        capacity_(capacity),
        z_(capacity * d_),
        h_(capacity * d_),
        y_(capacity * d_),
        dy_(capacity * d_),
        dh_(capacity * d_) {
    if (method == nullptr) return;
    const MethodSpec& m = *method;
    using Lora = rankwise::Lora<T, Backend>;
    using Smora = rankwise::Smora<T, Backend>;
    using Mos = rankwise::Mos<T, Backend>;
    switch (m.kind) {
      case MethodSpec::Kind::kLora:
        layer1_.template emplace<Lora>(ctx, lora_config(d_, d_, m))
            .init_peft(rankwise::substream(seed, 1));
        layer2_.template emplace<Lora>(ctx, lora_config(d_, d_, m))
            .init_peft(rankwise::substream(seed, 2));
        break;
      case MethodSpec::Kind::kSmora:
        layer1_.template emplace<Smora>(ctx, smora_config<Backend>(d_, d_, m, gates))
            .init(rankwise::substream(seed, 1));
        layer2_.template emplace<Smora>(ctx, smora_config<Backend>(d_, d_, m, gates))
            .init(rankwise::substream(seed, 2));
        break;
      case MethodSpec::Kind::kMos: {
        // Both layers are d -> d, so they are one projection type sharing one
        // pool (L = 2): MoS's cross-layer sharing is part of what is measured.
        rankwise::ShardPoolConfig pc;
        pc.d_in = d_;
        pc.d_out = d_;
        pc.num_layers = 2;
        pc.equivalent_rank = m.mos_v;
        pc.private_rank = m.mos_p;
        pc.shards_per_vector = m.mos_l;
        pool_ = std::make_unique<rankwise::ShardPool<T, Backend>>(ctx, pc);
        pool_->init(rankwise::substream(seed, 3));
        layer1_.template emplace<Mos>(*pool_, 0, mos_config(m, rankwise::substream(seed, 4)));
        layer2_.template emplace<Mos>(*pool_, 1, mos_config(m, rankwise::substream(seed, 4)));
        break;
      }
    }
    activated_ = 2 * activated_per_layer(m, d_, d_);
  }

  /// The adapters' trainable tensors: each layer's own, and the shard pool's
  /// once (a Mos layer owns none: kOwnsParameters is false).
  std::vector<ParameterRef<T>> parameters() {
    std::vector<ParameterRef<T>> out;
    for (AdaptedLayer<T, Backend>* layer : {&layer1_, &layer2_}) {
      visit_layer(*layer, [&](auto& l) {
        for (auto& p : l.parameters()) out.push_back(p);
      });
    }
    if (pool_) {
      for (auto& p : pool_->parameters()) out.push_back(p);
    }
    return out;
  }
  std::int64_t trainable() const {
    std::int64_t n = pool_ ? pool_->num_parameters() : 0;
    for (const AdaptedLayer<T, Backend>* layer : {&layer1_, &layer2_}) {
      visit_layer(*layer, [&](const auto& l) { n += l.num_parameters(); });
    }
    return n;
  }
  std::int64_t activated() const { return activated_; }

  /// Forward on x (n x d): output(n) holds y afterwards.
  void forward(MatrixView<const T> x, bool training) {
    using K = rankwise::Kernels<Backend, T>;
    using Acc = rankwise::accumulator_t<T>;
    const std::int64_t n = x.rows;
    RANKWISE_CHECK(n <= capacity_, "Student: ", n, " rows exceed the capacity ", capacity_);
    K::gemm(*ctx_, Acc(1), x, rankwise::Op::kNoTrans, w1_, rankwise::Op::kTrans, Acc(0),
            rows(z_, n));
    const rankwise::Mode mode = training ? rankwise::Mode::kTraining : rankwise::Mode::kInference;
    visit_layer(layer1_, [&](auto& l) { l.forward(x, rows(z_, n), mode); });
    DeviceOps<Backend>::gelu_forward(*ctx_, crows(z_, n), rows(h_, n));
    K::gemm(*ctx_, Acc(1), crows(h_, n), rankwise::Op::kNoTrans, w2_, rankwise::Op::kTrans, Acc(0),
            rows(y_, n));
    visit_layer(layer2_, [&](auto& l) { l.forward(crows(h_, n), rows(y_, n), mode); });
  }

  MatrixView<const T> output(std::int64_t n) { return crows(y_, n); }
  /// Where the loss writes dL/dy before backward().
  MatrixView<T> output_grad(std::int64_t n) { return rows(dy_, n); }

  /// Gradients of every adapter parameter for the last training forward on x,
  /// from output_grad(). The optimiser's zero_grad() must come first (MoS adds).
  void backward(MatrixView<const T> x) {
    using K = rankwise::Kernels<Backend, T>;
    using Acc = rankwise::accumulator_t<T>;
    const std::int64_t n = x.rows;
    // dh = dy W2 (+ the layer-2 adapter's part), then dz = dh * gelu'(z) in place.
    K::gemm(*ctx_, Acc(1), crows(dy_, n), rankwise::Op::kNoTrans, w2_, rankwise::Op::kNoTrans,
            Acc(0), rows(dh_, n));
    visit_layer(layer2_, [&](auto& l) { l.backward(crows(h_, n), crows(dy_, n), rows(dh_, n)); });
    DeviceOps<Backend>::gelu_backward(*ctx_, crows(z_, n), crows(dh_, n), rows(dh_, n));
    visit_layer(layer1_, [&](auto& l) { l.backward(x, crows(dh_, n)); });  // dL/dx is not needed
  }

 private:
  // f(layer) for the layer a variant holds; nothing for the frozen base.
  template <class Variant, class F>
  static void visit_layer(Variant& layer, F&& f) {
    std::visit(
        [&](auto& l) {
          if constexpr (!std::is_same<std::decay_t<decltype(l)>, std::monostate>::value) f(l);
        },
        layer);
  }

  MatrixView<T> rows(Buffer<Backend, T>& b, std::int64_t n) {
    return MatrixView<T>(b.data(), n, d_, Backend::kMemorySpace);
  }
  MatrixView<const T> crows(Buffer<Backend, T>& b, std::int64_t n) {
    return MatrixView<const T>(b.data(), n, d_, Backend::kMemorySpace);
  }

  Context<Backend>* ctx_;
  MatrixView<const T> w1_, w2_;
  std::int64_t d_, capacity_;
  std::unique_ptr<rankwise::ShardPool<T, Backend>> pool_;  // before the layers that use it
  AdaptedLayer<T, Backend> layer1_, layer2_;
  std::int64_t activated_ = 0;
  Buffer<Backend, T> z_, h_, y_, dy_, dh_;
};

// ---------------------------------------------------------------------------
// One seed's data in backend memory.
// ---------------------------------------------------------------------------
template <class T, class Backend>
struct DeviceData {
  std::int64_t d = 0;
  std::unique_ptr<Buffer<Backend, T>> w1, w2, train_x, train_y;
  std::vector<std::unique_ptr<Buffer<Backend, T>>> test_x, test_y;

  static std::unique_ptr<Buffer<Backend, T>> upload(Context<Backend>& ctx,
                                                    const std::vector<T>& host, std::int64_t rows,
                                                    std::int64_t cols) {
    auto b = std::make_unique<Buffer<Backend, T>>(rows * cols);
    rankwise::Kernels<Backend, T>::upload(ctx, host.data(), b->view(rows, cols));
    return b;
  }
  static MatrixView<const T> view(const std::unique_ptr<Buffer<Backend, T>>& b, std::int64_t first,
                                  std::int64_t rows, std::int64_t cols) {
    return MatrixView<const T>(b->data() + first * cols, rows, cols, Backend::kMemorySpace);
  }
};

template <class T>
std::vector<T> to_storage(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}
template <class T>
std::vector<T> to_storage(const std::vector<float>& v) {
  return std::vector<T>(v.begin(), v.end());
}

/// Test MSE per task of a trained (or frozen) student.
template <class T, class Backend>
std::vector<double> evaluate(Context<Backend>& ctx, Student<T, Backend>& model,
                             const DeviceData<T, Backend>& data, std::int64_t tasks,
                             std::int64_t test_size, Buffer<Backend, double>& acc) {
  using Ops = DeviceOps<Backend>;
  const std::int64_t d = data.d;
  Ops::zero(ctx, acc.data(), tasks);
  for (std::int64_t t = 0; t < tasks; ++t) {
    const auto x = DeviceData<T, Backend>::view(data.test_x[t], 0, test_size, d);
    const auto y = DeviceData<T, Backend>::view(data.test_y[t], 0, test_size, d);
    model.forward(x, false);
    Ops::squared_error(ctx, model.output(test_size), y, MatrixView<T>(), 0.0, acc.data() + t);
  }
  std::vector<double> loss(static_cast<std::size_t>(tasks));
  Ops::read(ctx, acc.data(), tasks, loss.data());
  for (double& l : loss) l /= static_cast<double>(test_size * d);
  return loss;
}

/// Trains one method on one seed's data and evaluates it.
template <class T, class Backend>
RunResult train_run(Context<Backend>& ctx, const DeviceData<T, Backend>& data,
                    const MethodSpec& method, const StudyOptions& o, std::uint64_t seed,
                    std::int64_t* trainable, std::int64_t* activated) {
  using Ops = DeviceOps<Backend>;
  using Clock = std::chrono::steady_clock;
  const std::int64_t d = data.d, batch = o.batch, tasks = o.problem.tasks;
  Student<T, Backend> model(ctx, DeviceData<T, Backend>::view(data.w1, 0, d, d),
                            DeviceData<T, Backend>::view(data.w2, 0, d, d), &method, o.moe_gates,
                            rankwise::substream(seed, 5000), std::max(batch, o.test_size));
  *trainable = model.trainable();
  *activated = model.activated();
  rankwise::optim::AdamOptions adam;
  adam.lr = o.lr;
  adam.weight_decay = o.weight_decay;
  adam.max_grad_norm = o.max_grad_norm;
  rankwise::optim::Adam<T, Backend> optimiser(ctx, model.parameters(), adam);

  Buffer<Backend, double> acc(std::max<std::int64_t>(tasks, 1));
  Ops::zero(ctx, acc.data(), 1);
  RunResult run;
  rankwise::Kernels<Backend, T>::synchronize(ctx);
  const auto start = Clock::now();
  std::int64_t interval_begin = 0;
  for (std::int64_t step = 0; step < o.steps; ++step) {
    const auto x = DeviceData<T, Backend>::view(data.train_x, step * batch, batch, d);
    const auto target = DeviceData<T, Backend>::view(data.train_y, step * batch, batch, d);
    model.forward(x, true);
    optimiser.zero_grad();
    Ops::squared_error(ctx, model.output(batch), target, model.output_grad(batch),
                       2.0 / static_cast<double>(batch * d), acc.data());
    model.backward(x);
    optimiser.step();
    if ((step + 1) % o.log_every == 0 || step + 1 == o.steps) {
      double sum = 0;
      Ops::read(ctx, acc.data(), 1, &sum);  // the one host read of the interval
      Ops::zero(ctx, acc.data(), 1);
      const std::int64_t count = step + 1 - interval_begin;
      run.curve_step.push_back(0.5 * static_cast<double>(interval_begin + step));
      run.curve_loss.push_back(sum / static_cast<double>(count * batch * d));
      interval_begin = step + 1;
    }
  }
  rankwise::Kernels<Backend, T>::synchronize(ctx);
  run.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  run.test_loss = evaluate(ctx, model, data, tasks, o.test_size, acc);
  return run;
}

/// The whole study: for every seed, a fresh problem and data, then every
/// method on the same data in the same order with the same optimiser.
template <class T, class Backend>
StudyResult run_study(Context<Backend>& ctx, const StudyOptions& o,
                      const std::vector<MethodSpec>& methods, const std::string& device) {
  using Clock = std::chrono::steady_clock;
  using DD = DeviceData<T, Backend>;
  const std::int64_t d = o.problem.d, tasks = o.problem.tasks;
  StudyResult result;
  result.backend = Backend::kName;
  result.device = device;
  for (const auto& m : methods) {
    MethodResult r;
    r.name = m.name;
    result.methods.push_back(r);
  }
  for (std::int64_t s = 0; s < o.seeds; ++s) {
    const std::uint64_t seed = o.first_seed + static_cast<std::uint64_t>(s);
    const auto data_start = Clock::now();
    const Teacher teacher = make_teacher(o.problem, seed);
    std::vector<Samples> test;
    std::vector<double> bayes;
    for (std::int64_t t = 0; t < tasks; ++t) {
      test.push_back(sample(teacher, o.test_size, rankwise::substream(seed, 2000 + t), t));
      bayes.push_back(bayes_mixture_loss(teacher, test.back()));
    }
    DD data;
    data.d = d;
    data.w1 = DD::upload(ctx, to_storage<T>(teacher.w1), d, d);
    data.w2 = DD::upload(ctx, to_storage<T>(teacher.w2), d, d);
    {  // the host copy of the training stream is freed once uploaded
      const Samples train = sample(teacher, o.steps * o.batch, rankwise::substream(seed, 1000));
      data.train_x = DD::upload(ctx, to_storage<T>(train.x), train.rows, d);
      data.train_y = DD::upload(ctx, to_storage<T>(train.y), train.rows, d);
    }
    for (std::int64_t t = 0; t < tasks; ++t) {
      data.test_x.push_back(DD::upload(ctx, to_storage<T>(test[t].x), o.test_size, d));
      data.test_y.push_back(DD::upload(ctx, to_storage<T>(test[t].y), o.test_size, d));
    }
    Buffer<Backend, double> acc(tasks);
    Student<T, Backend> base(ctx, DD::view(data.w1, 0, d, d), DD::view(data.w2, 0, d, d), nullptr,
                             o.moe_gates, 0, o.test_size);
    const std::vector<double> base_loss = evaluate(ctx, base, data, tasks, o.test_size, acc);
    result.base_loss.push_back(base_loss);
    result.bayes_loss.push_back(bayes);
    if (o.verbose) {
      double b = 0, f = 0;
      for (std::int64_t t = 0; t < tasks; ++t) {
        b += base_loss[t] / tasks;
        f += bayes[t] / tasks;
      }
      std::printf(
          "seed %llu (%lld/%lld): data in %.2f s; test MSE of the frozen base %.4f, "
          "of the task-blind Bayes predictor %.4f\n",
          static_cast<unsigned long long>(seed), static_cast<long long>(s + 1),
          static_cast<long long>(o.seeds),
          std::chrono::duration<double>(Clock::now() - data_start).count(), b, f);
      std::fflush(stdout);
    }
    for (std::size_t i = 0; i < methods.size(); ++i) {
      MethodResult& mr = result.methods[i];
      RunResult run = train_run(ctx, data, methods[i], o, seed, &mr.trainable, &mr.activated);
      if (o.verbose) {
        double mean = 0;
        for (double l : run.test_loss) mean += l / static_cast<double>(tasks);
        std::printf("  %-22s %5lld steps  train loss %.4f -> %.4f  test %.4f  %6.2f s\n",
                    mr.name.c_str(), static_cast<long long>(o.steps), run.curve_loss.front(),
                    run.curve_loss.back(), mean, run.seconds);
        std::fflush(stdout);
      }
      mr.runs.push_back(std::move(run));
    }
  }
  return result;
}

}  // namespace multitask
