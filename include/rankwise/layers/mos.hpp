// MoS: a LoRA layer whose A and B are assembled from shards of pools shared
// across layers (Wang et al., "Mixture of Shards", arXiv 2410.00938).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/shard_config.hpp"
#include "rankwise/core/shard_indices.hpp"
#include "rankwise/detail/owned_workspace.hpp"
#include "rankwise/layers/lora_ops.hpp"
#include "rankwise/layers/shard_pool.hpp"

namespace rankwise {

/// How a Mos layer reaches its shards.
enum class ShardPath {
  kAuto,       ///< the backend's crossover (Kernels::prefer_assembled_shards)
  kDirect,     ///< read shards through the index lists; nothing is materialised
  kAssembled,  ///< assemble A and B by gathering shards, then two GEMMs
};

/// Layer `layer` of L: y += (alpha / r) · B A x, where unit j's a_j is the
/// concatenation of the l shards A_pool[I_a[j·l + s]] (b_j likewise from
/// B_pool with I_b). Gradients are added into the pool's gradients. The pool
/// must outlive the layer.
template <class T, class Backend>
class Mos {
 public:
  using Kernels = rankwise::Kernels<Backend, T>;
  using Acc = accumulator_t<T>;

  /// Index lists drawn from (config.seed, layer) as MoS does.
  Mos(ShardPool<T, Backend>& pool, std::int64_t layer, const MosConfig& config,
      ShardPath path = ShardPath::kAuto)
      : Mos(pool, layer, config, draw_shard_indices(pool.config(), config, layer), path) {}

  /// Index lists supplied by the caller, checked for length and range.
  Mos(ShardPool<T, Backend>& pool, std::int64_t layer, const MosConfig& config,
      ShardIndices indices, ShardPath path = ShardPath::kAuto)
      : pool_(&pool),
        ctx_(&pool.context()),
        layer_(layer),
        config_(config),
        path_(path),
        indices_(std::move(indices)) {
    const ShardPoolConfig& pc = pool.config();
    RANKWISE_CHECK(layer >= 0 && layer < pc.num_layers, "Mos: layer ", layer,
                   " is outside [0, L = ", pc.num_layers, ")");
    config_.validate(pc);
    // Every size the layer allocates later, checked once here: the index
    // lists (r · l) and the assembled A (r x d_in) and B (d_out x r).
    const std::int64_t q =
        checked_mul(config_.rank, pc.shards_per_vector, "Mos: index lists r · l");
    checked_elements(config_.rank, pc.d_in, "Mos: assembled A (r x d_in)");
    checked_elements(config_.rank, pc.d_out, "Mos: assembled B (d_out x r)");
    check_shard_indices(pc, config_, indices_);
    const std::int64_t r = config_.rank, l = pc.shards_per_vector;
    list_a_.resize(q);
    list_b_.resize(q);
    pattern_a_.resize(q);
    pattern_b_.resize(q);
    ones_.resize(q);
    upload_ints(indices_.a, list_a_);
    upload_ints(indices_.b, list_b_);
    // pattern[s][j] = list[j·l + s]: the shard of chunk s of every unit, one
    // row per chunk, so the direct path can broadcast a row to all tokens.
    std::vector<std::int32_t> pa(q), pb(q);
    for (std::int64_t j = 0; j < r; ++j) {
      for (std::int64_t s = 0; s < l; ++s) {
        pa[s * r + j] = indices_.a[j * l + s];
        pb[s * r + j] = indices_.b[j * l + s];
      }
    }
    upload_ints(pa, pattern_a_);
    upload_ints(pb, pattern_b_);
    rankwise::Kernels<Backend, Acc>::fill(*ctx_, ones_.view(q, 1), 1.0);
  }

  const MosConfig& config() const { return config_; }
  const ShardIndices& indices() const { return indices_; }
  std::int64_t layer() const { return layer_; }
  double scale() const { return config_.scale(); }

  /// Which path a call with n tokens takes.
  ShardPath path_for(std::int64_t n) const {
    if (path_ != ShardPath::kAuto) return path_;
    return Kernels::prefer_assembled_shards(n) ? ShardPath::kAssembled : ShardPath::kDirect;
  }

  /// y (n x d_out) += (alpha / r) · B A x for x (n x d_in).
  void forward(MatrixView<const T> x, MatrixView<T> y) {
    check_io(x, y, "y (n x d_out)");
    check_no_overlap("Mos::forward", y, "y (n x d_out)", pool_->a(), "the pool's A shards");
    check_no_overlap("Mos::forward", y, "y (n x d_out)", pool_->b(), "the pool's B shards");
    const std::int64_t n = x.rows, r = config_.rank;
    if (n == 0) return;
    if (path_for(n) == ShardPath::kAssembled) {
      assemble();
      workspace_.reserve(lora_forward_workspace_bytes<T>(n, r));
      lora_forward<Backend, T>(*ctx_, scale(), x, assembled_a(), assembled_bt(), y,
                               workspace_.data(), workspace_.bytes());
      return;
    }
    const auto s = static_cast<Acc>(scale());
    MatrixView<Acc> h = scratch(n, 1);
    gather_chunks(x, pool_->a(), pattern_a_, h, Acc(1));
    for (std::int64_t c = 0; c < chunks(); ++c) {
      Kernels::gather_axpy(*ctx_, s, h, pool_->b(), chunk_units(pattern_b_, c, n),
                           chunk_of(y, c, pool_->config().shard_out()));
    }
  }

  /// Adds this layer's gradients into the pool's grad_a() / grad_b() (always
  /// accumulating: shards are shared) and, when dx (n x d_in) is given,
  /// dx += ∂L/∂x. dy is (n x d_out).
  void backward(MatrixView<const T> x, MatrixView<const T> dy, MatrixView<T> dx = {}) {
    check_io(x, dy, "dy (n x d_out)");
    if (!dx.empty() || dx.data != nullptr) {
      check_view(dx, "dx (n x d_in)", x.rows, x.cols, Backend::kMemorySpace);
    }
    check_pool_overlaps(x, dy, dx);
    const ShardPoolConfig& pc = pool_->config();
    const std::int64_t n = x.rows, r = config_.rank, l = pc.shards_per_vector;
    if (n == 0) return;
    if (path_for(n) == ShardPath::kAssembled) {
      assemble();
      grad_a_.resize(r * pc.d_in);
      grad_bt_.resize(r * pc.d_out);
      MatrixView<T> da = grad_a_.view(r, pc.d_in), dbt = grad_bt_.view(r, pc.d_out);
      workspace_.reserve(lora_backward_workspace_bytes<T>(n, r));
      lora_backward<Backend, T>(*ctx_, scale(), x, assembled_a(), assembled_bt(), dy, dx, da, dbt,
                                false, workspace_.data(), workspace_.bytes());
      // Row j·l + s of the assembled gradient belongs to shard list[j·l + s].
      const MatrixView<const Acc> ones = ones_.view(r * l, 1);
      Kernels::scatter_axpy(
          *ctx_, Acc(1), ones,
          MatrixView<const T>(da.data, r * l, pc.shard_in(), Backend::kMemorySpace),
          list_a_.view(r * l, 1), Acc(1), pool_->grad_a());
      Kernels::scatter_axpy(
          *ctx_, Acc(1), ones,
          MatrixView<const T>(dbt.data, r * l, pc.shard_out(), Backend::kMemorySpace),
          list_b_.view(r * l, 1), Acc(1), pool_->grad_b());
      return;
    }
    const auto s = static_cast<Acc>(scale());
    MatrixView<Acc> h = scratch(n, 1);
    MatrixView<Acc> dh = scratch(n, 2);  // = scale · B ᵀ dy: no gates in MoS
    gather_chunks(x, pool_->a(), pattern_a_, h, Acc(1));
    gather_chunks(dy, pool_->b(), pattern_b_, dh, s);
    for (std::int64_t c = 0; c < chunks(); ++c) {
      const auto ua = chunk_units(pattern_a_, c, n), ub = chunk_units(pattern_b_, c, n);
      Kernels::scatter_axpy(*ctx_, Acc(1), dh, chunk_of(x, c, pc.shard_in()), ua, Acc(1),
                            pool_->grad_a());
      Kernels::scatter_axpy(*ctx_, s, h, chunk_of(dy, c, pc.shard_out()), ub, Acc(1),
                            pool_->grad_b());
      if (!dx.empty()) {
        Kernels::gather_axpy(*ctx_, Acc(1), dh, pool_->a(), ua, chunk_of(dx, c, pc.shard_in()));
      }
    }
  }

  /// The layer's A (r x d_in) and B (d_out x r) in PEFT layout, assembled
  /// from the pool: what a plain LoRA export of this layer holds.
  void get_a(MatrixView<T> a_out) {
    check_view(a_out, "A (r x d_in)", config_.rank, pool_->config().d_in, Backend::kMemorySpace);
    assemble();
    Kernels::copy(*ctx_, assembled_a(), Op::kNoTrans, a_out);
  }
  void get_b(MatrixView<T> b_out) {
    check_view(b_out, "B (d_out x r)", pool_->config().d_out, config_.rank, Backend::kMemorySpace);
    assemble();
    Kernels::copy(*ctx_, assembled_bt(), Op::kTrans, b_out);
  }

 private:
  std::int64_t chunks() const { return pool_->config().shards_per_vector; }

  template <class U>
  void check_io(const MatrixView<const T>& x, const MatrixView<U>& y, const char* y_name) const {
    const ShardPoolConfig& pc = pool_->config();
    check_view(x, "x (n x d_in)", x.rows, pc.d_in, Backend::kMemorySpace);
    check_view(y, y_name, x.rows, pc.d_out, Backend::kMemorySpace);
  }

  // The pool's gradients are written while x, dy and the shards are read, and
  // dx while the shards are: none of them may share memory.
  void check_pool_overlaps(const MatrixView<const T>& x, const MatrixView<const T>& dy,
                           const MatrixView<T>& dx) {
    constexpr const char* fn = "Mos::backward";
    auto against_streams = [&](const MatrixView<T>& grad, const char* name) {
      check_no_overlap(fn, grad, name, x, "x (n x d_in)");
      check_no_overlap(fn, grad, name, dy, "dy (n x d_out)");
      check_no_overlap(fn, grad, name, dx, "dx (n x d_in)");
    };
    against_streams(pool_->grad_a(), "the pool's grad_a");
    against_streams(pool_->grad_b(), "the pool's grad_b");
    check_no_overlap(fn, dx, "dx (n x d_in)", pool_->a(), "the pool's A shards");
    check_no_overlap(fn, dx, "dx (n x d_in)", pool_->b(), "the pool's B shards");
  }

  // Columns [c · width, (c + 1) · width) of m: chunk c of every row.
  template <class U>
  static MatrixView<U> chunk_of(const MatrixView<U>& m, std::int64_t c, std::int64_t width) {
    return MatrixView<U>(m.data + c * width, m.rows, width, m.space, m.rows <= 1 ? m.cols : m.ld);
  }

  // Row c of a pattern, broadcast to n tokens (ld = 0).
  MatrixView<const std::int32_t> chunk_units(const Buffer<Backend, std::int32_t>& pattern,
                                             std::int64_t c, std::int64_t n) const {
    return MatrixView<const std::int32_t>(pattern.data() + c * config_.rank, n, config_.rank,
                                          Backend::kMemorySpace, 0);
  }

  // out (n x r) = alpha · Σ_c (pool[pattern[c][j]] · chunk c of m[n]).
  void gather_chunks(MatrixView<const T> m, MatrixView<T> pool,
                     const Buffer<Backend, std::int32_t>& pattern, MatrixView<Acc> out, Acc alpha) {
    const std::int64_t width = pool.cols;
    for (std::int64_t c = 0; c < chunks(); ++c) {
      Kernels::gather_dot(*ctx_, alpha, chunk_of(m, c, width), pool,
                          chunk_units(pattern, c, m.rows), out, c == 0 ? Acc(0) : Acc(1));
    }
  }

  // assembled A (r x d_in) viewed as (r·l x d_in/l): row j·l + s = A_pool[I_a[j·l + s]].
  void assemble() {
    const ShardPoolConfig& pc = pool_->config();
    const std::int64_t r = config_.rank, q = r * pc.shards_per_vector;
    a_.resize(r * pc.d_in);
    bt_.resize(r * pc.d_out);
    const MatrixView<const Acc> ones = ones_.view(q, 1);
    MatrixView<T> a_rows(a_.data(), q, pc.shard_in(), Backend::kMemorySpace);
    MatrixView<T> b_rows(bt_.data(), q, pc.shard_out(), Backend::kMemorySpace);
    Kernels::fill(*ctx_, a_rows, 0.0);
    Kernels::fill(*ctx_, b_rows, 0.0);
    Kernels::gather_axpy(*ctx_, Acc(1), ones, pool_->a(), list_a_.view(q, 1), a_rows);
    Kernels::gather_axpy(*ctx_, Acc(1), ones, pool_->b(), list_b_.view(q, 1), b_rows);
  }
  MatrixView<const T> assembled_a() const {
    return MatrixView<const T>(a_.data(), config_.rank, pool_->config().d_in,
                               Backend::kMemorySpace);
  }
  MatrixView<const T> assembled_bt() const {
    return MatrixView<const T>(bt_.data(), config_.rank, pool_->config().d_out,
                               Backend::kMemorySpace);
  }

  MatrixView<Acc> scratch(std::int64_t n, int which) {
    Buffer<Backend, Acc>& b = which == 1 ? h_ : dh_;
    const std::int64_t size = checked_elements(n, config_.rank, "Mos: scratch (n x r)");
    if (b.size() < size) b.resize(size);
    return MatrixView<Acc>(b.data(), n, config_.rank, Backend::kMemorySpace);
  }

  void upload_ints(const std::vector<std::int32_t>& host, Buffer<Backend, std::int32_t>& dst) {
    Kernels::upload_indices(*ctx_, host.data(),
                            dst.view(1, static_cast<std::int64_t>(host.size())));
  }

  ShardPool<T, Backend>* pool_;
  Context<Backend>* ctx_;
  std::int64_t layer_;
  MosConfig config_;
  ShardPath path_;
  ShardIndices indices_;                     // host copy, saved with the adapter
  Buffer<Backend, std::int32_t> list_a_;     // (r·l)  I_a
  Buffer<Backend, std::int32_t> list_b_;     // (r·l)  I_b
  Buffer<Backend, std::int32_t> pattern_a_;  // (l, r) I_a by chunk
  Buffer<Backend, std::int32_t> pattern_b_;  // (l, r) I_b by chunk
  Buffer<Backend, Acc> ones_;                // (r·l)  unit coefficients of gathers
  Buffer<Backend, T> a_;                     // (r, d_in)  assembled, kAssembled path
  Buffer<Backend, T> bt_;                    // (r, d_out) assembled
  Buffer<Backend, T> grad_a_;                // (r, d_in)  before the scatter into the pool
  Buffer<Backend, T> grad_bt_;               // (r, d_out)
  Buffer<Backend, Acc> h_;                   // (n, r) direct path
  Buffer<Backend, Acc> dh_;                  // (n, r)
  detail::OwnedWorkspace<Backend> workspace_;
};

}  // namespace rankwise
