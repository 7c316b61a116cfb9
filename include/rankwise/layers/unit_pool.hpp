// Many adapters in one batch: the rank units of several adapters in one pool
// for one adapted module (d_in, d_out), each token routed to its own
// adapter's units. Plain LoRA and MoS adapters run as ranges of units; SMoRA
// and block MoE-LoRA adapters route each token to its top-k inside their own
// units, with their router and balance bias kept in the pool beside them.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/backend/tuning.hpp"
#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/parameter.hpp"
#include "rankwise/core/segment_table.hpp"
#include "rankwise/core/unit_pages.hpp"
#include "rankwise/detail/owned_workspace.hpp"
#include "rankwise/layers/lora.hpp"
#include "rankwise/layers/lora_ops.hpp"
#include "rankwise/layers/mos.hpp"
#include "rankwise/layers/rank_units.hpp"
#include "rankwise/layers/router.hpp"
#include "rankwise/layers/smora.hpp"

namespace rankwise {

/// What an adapter in a pool was built from.
enum class AdapterKind {
  kLora,   ///< plain LoRA: every token uses all of its units, gate 1
  kSmora,  ///< SMoRA / block MoE-LoRA: top-k of its units per token, its own router
  kMos,    ///< MoS: its A and B assembled from the shard pools when added
};

inline const char* to_string(AdapterKind kind) {
  switch (kind) {
    case AdapterKind::kLora:
      return "lora";
    case AdapterKind::kSmora:
      return "smora";
    case AdapterKind::kMos:
      return "mos";
  }
  return "?";
}

/// An adapter's handle in a pool: never reused for a later adapter, so a
/// stale id is refused rather than served with someone else's units.
using AdapterId = std::int32_t;
/// The per-token id for "no adapter": the token's y is left as it is.
inline constexpr AdapterId kNoAdapter = -1;

struct UnitPoolConfig {
  std::int64_t d_in = 0;
  std::int64_t d_out = 0;
  std::int64_t capacity_units = 0;   ///< rank units in the pool (a multiple of page_units)
  std::int64_t page_units = 8;       ///< units per page: the granularity of allocation
  std::int64_t max_adapters = 1024;  ///< adapters resident at once

  void validate() const {
    RANKWISE_CHECK(d_in > 0, "UnitPoolConfig.d_in must be positive, got ", d_in);
    RANKWISE_CHECK(d_out > 0, "UnitPoolConfig.d_out must be positive, got ", d_out);
    RANKWISE_CHECK(max_adapters > 0 && max_adapters <= (std::int64_t(1) << 20),
                   "UnitPoolConfig.max_adapters must be in [1, 2^20], got ", max_adapters);
    checked_elements(capacity_units, d_in, "UnitPool: A pool (capacity_units x d_in)");
    checked_elements(capacity_units, d_out, "UnitPool: Bt pool (capacity_units x d_out)");
  }
};

template <class T, class Backend>
class UnitPool;

namespace detail {
// Plans are numbered across the process, so a routing kept from one plan's
// training forward is never taken for another's.
inline std::uint64_t next_plan_serial() {
  static std::atomic<std::uint64_t> serial{0};
  return ++serial;
}
}  // namespace detail

/// One batch's assignment of tokens to adapters, made by UnitPool::plan from
/// the per-token ids: the tokens of each adapter in the batch (a segment, in
/// token order) and where that adapter's units are. One plan serves every
/// layer of a forward pass whose pools hold the batch's adapters with the
/// same ids, ranks, scales and units (pools of one model filled in the same
/// order, as io/pool_loader.hpp does): each pool checks that on every call
/// and refuses a plan it does not match. Grows to the largest batch and then
/// allocates nothing.
template <class Backend>
class PoolPlan {
 public:
  std::int64_t tokens() const { return tokens_; }
  /// Distinct adapters in the batch.
  std::int64_t adapters() const { return static_cast<std::int64_t>(segments_.size()); }
  /// Tokens with an adapter (the rest had kNoAdapter).
  std::int64_t routed_tokens() const { return static_cast<std::int64_t>(order_host_.size()); }

 private:
  template <class, class>
  friend class UnitPool;

  struct Segment {
    AdapterId id = kNoAdapter;
    std::int64_t rank = 0;
    double scale = 0.0;
    std::int64_t runs_begin = 0, runs_count = 0;  // the adapter's units: runs_[...]
    std::int64_t begin = 0;                       // into order
    std::int64_t count = 0;
    std::int64_t first_token = -1;  // >= 0: the tokens are first_token, first_token + 1, ...
    bool segmented = false;         // served by the backend's segment_lora_forward
  };

  std::vector<Segment> segments_;
  std::vector<UnitRun> runs_;
  std::vector<std::int32_t> order_host_;  // token indices, grouped by adapter
  std::vector<std::int64_t> counts_;      // per slot, while planning
  Buffer<Backend, std::int32_t> order_;   // order_host_ in backend memory
  // The segmented adapters' tokens as one SegmentTable: its arrays packed
  // into one int32 upload (scales as float bits, h offsets as int64 pairs).
  std::vector<std::int32_t> table_words_;
  Buffer<Backend, std::int32_t> table_device_;
  SegmentTable table_;
  std::int64_t tokens_ = -1;
  std::uint64_t serial_ = 0;  // new per plan(): what a training forward marks its routing with
};

/// A pool of rank units for one module shape, on one backend. Adapters are
/// added and removed at run time; each token of a batch names its adapter.
/// forward / backward follow each token's adapter alone: the result for a
/// token is what its adapter's own layer gives (up to the rounding of the
/// products' order), its gradients land only in its adapter. Not
/// thread-safe: one pool, one stream of calls.
template <class T, class Backend>
class UnitPool {
 public:
  using Kernels = rankwise::Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  using Plan = PoolPlan<Backend>;

  UnitPool(Context<Backend>& ctx, const UnitPoolConfig& config)
      : ctx_(&ctx),
        config_(validated(config)),
        pages_(config.capacity_units, config.page_units),
        slots_(static_cast<std::size_t>(config.max_adapters)),
        a_(config.capacity_units * config.d_in),
        bt_(config.capacity_units * config.d_out) {
    Kernels::fill(ctx, a_.view(capacity_units(), d_in()), 0.0);
    Kernels::fill(ctx, bt_.view(capacity_units(), d_out()), 0.0);
  }

  const UnitPoolConfig& config() const { return config_; }
  Context<Backend>& context() const { return *ctx_; }
  std::int64_t d_in() const { return config_.d_in; }
  std::int64_t d_out() const { return config_.d_out; }
  std::int64_t capacity_units() const { return config_.capacity_units; }
  std::int64_t free_units() const { return pages_.free_units(); }
  std::int64_t adapters() const { return live_; }
  /// Slots an add can still take (a slot retires once its ids would pass int32).
  std::int64_t free_slots() const {
    std::int64_t n = 0;
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      n += !slots_[i].live && id_of(i, slots_[i].generation) >= 0;
    }
    return n;
  }

  // ---- adapters -----------------------------------------------------------

  /// A plain adapter: a (r x d_in), bt = Bᵀ (r x d_out) in backend memory,
  /// y += scale · B A x for its tokens. Copies the factors in.
  AdapterId add_lora(MatrixView<const T> a, MatrixView<const T> bt, double scale,
                     AdapterKind kind = AdapterKind::kLora) {
    constexpr const char* fn = "UnitPool::add_lora";
    RANKWISE_CHECK(kind != AdapterKind::kSmora, fn,
                   ": a SMoRA adapter needs its router; add the Smora layer instead");
    check_factors(fn, a, bt, scale);
    return insert(fn, kind, a, bt, scale, nullptr);
  }

  AdapterId add(const Lora<T, Backend>& lora) {
    return add_lora(lora.a(), lora.bt(), lora.scale(), AdapterKind::kLora);
  }

  /// A SMoRA (or block MoE-LoRA) adapter: its A, Bᵀ, router, balance bias and
  /// options are copied in; its tokens are routed inside its own units.
  AdapterId add(Smora<T, Backend>& smora) {
    constexpr const char* fn = "UnitPool::add (Smora)";
    const SmoraConfig& c = smora.config();
    RANKWISE_CHECK(!c.train_bias, fn,
                   ": SmoraConfig.train_bias (a bias trained by gradient) is not supported in a "
                   "pool; the sign-rule balance bias is");
    check_factors(fn, MatrixView<const T>(smora.a()), MatrixView<const T>(smora.bt()),
                  smora.scale());
    auto routed = std::make_unique<Routed>(c, d_in());
    Kernels::copy(*ctx_, MatrixView<const T>(smora.wr()), Op::kNoTrans,
                  routed->wr.view(c.router.num_experts(), d_in()));
    rankwise::Kernels<Backend, Acc>::copy(*ctx_, MatrixView<const Acc>(smora.bias()), Op::kNoTrans,
                                          routed->bias.view(1, c.router.num_choices()));
    Kernels::fill(*ctx_, routed->grad_wr_view(), 0.0);
    // Counting no tokens zeroes the counts: update_bias before any forward is a no-op.
    Kernels::count_experts(*ctx_, detail::prefix(routed->experts, 0, c.router.choices_per_token()),
                           {}, routed->counts_view());
    return insert(fn, AdapterKind::kSmora, smora.a(), smora.bt(), smora.scale(), std::move(routed));
  }

  /// A MoS adapter, stored assembled: its A and B are gathered from the shard
  /// pools once, here. Serving then reads r (d_in + d_out) values per
  /// adapter as plain LoRA does, instead of r · l shard lookups per product;
  /// the shards are not referenced afterwards (gradients reach the assembled
  /// units, not the shared shards).
  AdapterId add(Mos<T, Backend>& mos) {
    const std::int64_t r = mos.config().rank;
    Buffer<Backend, T> a(checked_elements(r, d_in(), "UnitPool: MoS A (r x d_in)"));
    Buffer<Backend, T> b(checked_elements(d_out(), r, "UnitPool: MoS B (d_out x r)"));
    Buffer<Backend, T> bt(b.size());
    mos.get_a(a.view(r, d_in()));
    mos.get_b(b.view(d_out(), r));
    Kernels::copy(*ctx_, MatrixView<const T>(b.view(d_out(), r)), Op::kTrans, bt.view(r, d_out()));
    return add_lora(MatrixView<const T>(a.view(r, d_in())),
                    MatrixView<const T>(bt.view(r, d_out())), mos.scale(), AdapterKind::kMos);
  }

  /// Frees the adapter's units and slot. Plans made before are refused.
  void remove(AdapterId id) {
    Slot& s = slot_of("UnitPool::remove", id);
    pages_.release(s.pages);
    Slot freed;
    freed.generation = s.generation + 1;
    s = std::move(freed);
    --live_;
  }

  bool contains(AdapterId id) const { return find(id) != nullptr; }
  AdapterKind kind(AdapterId id) const { return slot_of("UnitPool::kind", id).kind; }
  std::int64_t rank(AdapterId id) const { return slot_of("UnitPool::rank", id).rank; }
  double scale(AdapterId id) const { return slot_of("UnitPool::scale", id).scale; }
  /// Where the adapter's units are in the pool.
  std::vector<UnitRun> runs(AdapterId id) const { return slot_of("UnitPool::runs", id).runs; }

  // ---- batches ------------------------------------------------------------

  /// Groups the tokens of a batch by adapter. ids (n x 1 or 1 x n, host
  /// int32): each token's adapter, or kNoAdapter; any order. Every id is
  /// checked here (unknown, removed), so forward and backward index nothing
  /// unchecked; they check again that the plan's adapters are still there.
  void plan(MatrixView<const std::int32_t> ids, Plan& out) const {
    constexpr const char* fn = "UnitPool::plan";
    check_view(ids, "ids", ids.rows, ids.cols, MemorySpace::kHost);
    RANKWISE_CHECK(ids.rows == 1 || ids.cols == 1 || ids.empty(), fn,
                   ": ids must be one row or one column (one id per token), got ", shape_of(ids));
    const std::int64_t n = ids.rows == 1 ? ids.cols : ids.rows;
    const std::int64_t step = ids.rows == 1 ? 1 : ids.ld;
    out.tokens_ = -1;
    out.counts_.assign(slots_.size(), 0);
    for (std::int64_t t = 0; t < n; ++t) {
      const AdapterId id = ids.data[t * step];
      if (id == kNoAdapter) continue;
      RANKWISE_CHECK(find(id) != nullptr, fn, ": ids[", t, "] = ", id, " ", why_missing(id));
      ++out.counts_[static_cast<std::size_t>(slot_index(id))];
    }
    // A counting sort by slot, stable: each adapter's tokens in token order.
    out.segments_.clear();
    out.runs_.clear();
    std::int64_t offset = 0;
    for (std::size_t s = 0; s < slots_.size(); ++s) {
      if (out.counts_[s] == 0) continue;
      const Slot& slot = slots_[s];
      typename Plan::Segment seg;
      seg.id = slot.id;
      seg.rank = slot.rank;
      seg.scale = slot.scale;
      seg.runs_begin = static_cast<std::int64_t>(out.runs_.size());
      seg.runs_count = static_cast<std::int64_t>(slot.runs.size());
      out.runs_.insert(out.runs_.end(), slot.runs.begin(), slot.runs.end());
      seg.begin = offset;
      seg.count = out.counts_[s];
      out.segments_.push_back(seg);
      out.counts_[s] = offset;  // now the next free position of slot s
      offset += seg.count;
    }
    out.order_host_.resize(static_cast<std::size_t>(offset));
    for (std::int64_t t = 0; t < n; ++t) {
      const AdapterId id = ids.data[t * step];
      if (id == kNoAdapter) continue;
      out.order_host_[static_cast<std::size_t>(
          out.counts_[static_cast<std::size_t>(slot_index(id))]++)] = static_cast<std::int32_t>(t);
    }
    for (typename Plan::Segment& seg : out.segments_) {
      const std::int32_t* o = out.order_host_.data() + seg.begin;
      bool contiguous = true;
      for (std::int64_t i = 1; i < seg.count && contiguous; ++i) contiguous = o[i] == o[0] + i;
      seg.first_token = contiguous ? o[0] : -1;
    }
    detail::grow(out.order_, offset);
    if (offset > 0) {
      Kernels::upload_indices(*ctx_, out.order_host_.data(), detail::prefix(out.order_, offset, 1));
    }
    out.table_ = SegmentTable{};
    if constexpr (Kernels::kSegmentedLora) pack_segment_table(out);
    out.serial_ = detail::next_plan_serial();
    out.tokens_ = n;
  }

  /// y (n x d_out) += each token's adapter's delta for x (n x d_in); tokens
  /// with kNoAdapter are left alone. In training mode the routing of SMoRA
  /// adapters is kept for backward (with this plan) and their balance bias
  /// steps as their layer's would. y must not overlap x or the pool.
  void forward(Plan& plan, MatrixView<const T> x, MatrixView<T> y, Mode mode = Mode::kInference) {
    constexpr const char* fn = "UnitPool::forward";
    check_plan(fn, plan, x);
    check_view(y, "y (n x d_out)", x.rows, d_out(), Backend::kMemorySpace);
    check_no_overlap(fn, y, "y (n x d_out)", x, "x (n x d_in)");
    check_no_overlap(fn, y, "y (n x d_out)", a_view(), "the pool's A");
    check_no_overlap(fn, y, "y (n x d_out)", bt_view(), "the pool's Bt");
    reserve_scratch(plan, false);
    if constexpr (Kernels::kSegmentedLora) {
      if (plan.table_.positions > 0) {
        detail::grow(h_, plan.table_.h_size);
        Kernels::segment_lora_forward(*ctx_, plan.table_, x, a_view(), bt_view(), y, h_.data());
      }
    }
    for (const typename Plan::Segment& seg : plan.segments_) {
      if (seg.segmented) continue;
      Slot& s = slot_for(seg);
      const std::int64_t m = seg.count;
      const bool direct = seg.first_token >= 0;
      const MatrixView<const T> xs =
          direct ? x.row_block(seg.first_token, m) : gather(plan, seg, x, xs_);
      const MatrixView<T> ys = direct ? y.row_block(seg.first_token, m) : zeroed(ys_, m, d_out());
      if (s.routed) {
        routed_forward(s, xs, ys, mode, plan);
      } else {
        workspace_.reserve(lora_forward_workspace_bytes<T>(m, s.rank));
        for (const UnitRun& run : s.runs) {
          lora_forward<Backend, T>(*ctx_, s.scale, xs, a_run(run), bt_run(run), ys,
                                   workspace_.data(), workspace_.bytes());
        }
      }
      if (!direct) scatter_add(plan, seg, MatrixView<const T>(ys), y);
    }
  }

  /// forward with a plan of the pool's own, made from ids here.
  void forward(MatrixView<const std::int32_t> ids, MatrixView<const T> x, MatrixView<T> y,
               Mode mode = Mode::kInference) {
    plan(ids, own_plan_);
    forward(own_plan_, x, y, mode);
  }

  /// Gradients for a batch given dy (n x d_out): every adapter in the plan
  /// gets the gradient of its own tokens in its units (and router), overwritten
  /// or, with accumulate, added to; adapters not in the batch are untouched.
  /// dx (n x d_in), when given, receives += ∂L/∂x. A SMoRA adapter in the batch
  /// needs the training forward of this plan just before.
  void backward(Plan& plan, MatrixView<const T> x, MatrixView<const T> dy, MatrixView<T> dx = {},
                bool accumulate = false) {
    constexpr const char* fn = "UnitPool::backward";
    check_plan(fn, plan, x);
    constexpr MemorySpace space = Backend::kMemorySpace;
    check_view(dy, "dy (n x d_out)", x.rows, d_out(), space);
    const bool want_dx = !dx.empty() || dx.data != nullptr;
    if (want_dx) {
      check_view(dx, "dx (n x d_in)", x.rows, d_in(), space);
      check_no_overlap(fn, dx, "dx (n x d_in)", x, "x (n x d_in)");
      check_no_overlap(fn, dx, "dx (n x d_in)", dy, "dy (n x d_out)");
    }
    for (const typename Plan::Segment& seg : plan.segments_) {
      const Slot& s = slot_for(seg);
      RANKWISE_CHECK(!s.routed || s.routed->serial == plan.serial_, fn, ": adapter ", s.id,
                     " (smora) needs the training forward of this plan "
                     "(forward(plan, x, y, Mode::kTraining)) just before its backward");
    }
    ensure_grads();
    reserve_scratch(plan, true);
    for (const typename Plan::Segment& seg : plan.segments_) {
      Slot& s = slot_for(seg);
      const std::int64_t m = seg.count;
      const bool direct = seg.first_token >= 0;
      const MatrixView<const T> xs =
          direct ? x.row_block(seg.first_token, m) : gather(plan, seg, x, xs_);
      const MatrixView<const T> dys =
          direct ? dy.row_block(seg.first_token, m) : gather(plan, seg, dy, dys_);
      MatrixView<T> dxs;
      if (want_dx) dxs = direct ? dx.row_block(seg.first_token, m) : zeroed(dxs_, m, d_in());
      if (s.routed) {
        routed_backward(s, xs, dys, dxs, accumulate);
      } else {
        workspace_.reserve(lora_backward_workspace_bytes<T>(m, s.rank));
        for (const UnitRun& run : s.runs) {
          lora_backward<Backend, T>(*ctx_, s.scale, xs, a_run(run), bt_run(run), dys, dxs,
                                    grad_a_run(run), grad_bt_run(run), accumulate,
                                    workspace_.data(), workspace_.bytes());
        }
      }
      if (want_dx && !direct) scatter_add(plan, seg, MatrixView<const T>(dxs), dx);
    }
  }

  // ---- parameters ---------------------------------------------------------

  /// The adapter's A (r x d_in) and Bᵀ (r x d_out), copied out.
  void get_a(AdapterId id, MatrixView<T> out) const {
    copy_out("UnitPool::get_a", id, a_, d_in(), out);
  }
  void get_bt(AdapterId id, MatrixView<T> out) const {
    copy_out("UnitPool::get_bt", id, bt_, d_out(), out);
  }
  void get_grad_a(AdapterId id, MatrixView<T> out) const {
    copy_out("UnitPool::get_grad_a", id, grad_a_, d_in(), out);
  }
  void get_grad_bt(AdapterId id, MatrixView<T> out) const {
    copy_out("UnitPool::get_grad_bt", id, grad_bt_, d_out(), out);
  }
  /// A SMoRA adapter's router W_r (E x d_in) and its gradient.
  MatrixView<T> router_weight(AdapterId id) {
    return routed_of("UnitPool::router_weight", id).wr_view();
  }
  MatrixView<T> grad_router_weight(AdapterId id) {
    return routed_of("UnitPool::grad_router_weight", id).grad_wr_view();
  }
  MatrixView<Acc> balance_bias(AdapterId id) {
    Routed& r = routed_of("UnitPool::balance_bias", id);
    return r.bias.view(1, r.config.router.num_choices());
  }

  /// The adapter's trainable tensors for an optimiser: one (value, gradient)
  /// pair per run of its units in A and in Bᵀ ("a[0]", "bt[0]", ...) and, for
  /// SMoRA, "wr".
  std::vector<ParameterRef<T>> parameters(AdapterId id) {
    Slot& s = slot_of("UnitPool::parameters", id);
    ensure_grads();
    std::vector<ParameterRef<T>> out;
    for (std::size_t i = 0; i < s.runs.size(); ++i) {
      const UnitRun& run = s.runs[i];
      out.push_back({"a[" + std::to_string(i) + "]", a_run(run), grad_a_run(run)});
      out.push_back({"bt[" + std::to_string(i) + "]", bt_run(run), grad_bt_run(run)});
    }
    if (s.routed) out.push_back({"wr", s.routed->wr_view(), s.routed->grad_wr_view()});
    return out;
  }

  /// Zeroes every adapter's gradients.
  void zero_grad() {
    if (grad_a_.size() == 0) return;
    Kernels::fill(*ctx_, grad_a_.view(capacity_units(), d_in()), 0.0);
    Kernels::fill(*ctx_, grad_bt_.view(capacity_units(), d_out()), 0.0);
    for (Slot& s : slots_) {
      if (s.routed) Kernels::fill(*ctx_, s.routed->grad_wr_view(), 0.0);
    }
  }

  /// A SMoRA adapter's balancing step from the counts of its last training
  /// forward (for adapters whose config steps on request only).
  void update_bias(AdapterId id) {
    Routed& r = routed_of("UnitPool::update_bias", id);
    router_update_bias<Backend, T>(*ctx_, r.config.router, r.counts_view(),
                                   r.bias.view(1, r.config.router.num_choices()));
  }

 private:
  // A routed adapter's router, bias and the routing of its last forward.
  struct Routed {
    Routed(const SmoraConfig& c, std::int64_t d_in)
        : config(c),
          wr(checked_elements(c.router.num_experts(), d_in, "UnitPool: router W_r (E x d_in)")),
          grad_wr(wr.size()),
          bias(c.router.num_choices()),
          routed_bias(c.router.num_choices()),
          counts(c.router.num_choices()),
          d_in_(d_in) {}
    SmoraConfig config;
    Buffer<Backend, T> wr, grad_wr;
    Buffer<Backend, Acc> bias, routed_bias;
    Buffer<Backend, std::int32_t> counts;
    Buffer<Backend, std::int32_t> table;  // local unit -> pool unit (r)
    Buffer<Backend, Acc> scores, gates, dgates;
    Buffer<Backend, std::int32_t> experts, units, pool_units;
    std::int64_t tokens = -1;
    std::uint64_t serial = 0;  // the plan of the last training forward (0: none)
    std::int64_t d_in_;

    MatrixView<T> wr_view() { return wr.view(config.router.num_experts(), d_in_); }
    MatrixView<T> grad_wr_view() { return grad_wr.view(config.router.num_experts(), d_in_); }
    MatrixView<std::int32_t> counts_view() { return counts.view(1, config.router.num_choices()); }
    RoutingBuffers<Acc> routing(std::int64_t n) {
      const RouterConfig& rc = config.router;
      return {detail::prefix(scores, n, rc.num_experts()),
              detail::prefix(experts, n, rc.choices_per_token()),
              detail::prefix(units, n, rc.top_k), detail::prefix(gates, n, rc.top_k),
              counts_view()};
    }
    void grow(std::int64_t n) {
      const RouterConfig& rc = config.router;
      detail::grow(scores, checked_elements(n, rc.num_experts(), "UnitPool: routing scores"));
      detail::grow(experts, checked_elements(n, rc.choices_per_token(), "UnitPool: experts"));
      detail::grow(units, checked_elements(n, rc.top_k, "UnitPool: units"));
      detail::grow(pool_units, checked_elements(n, rc.top_k, "UnitPool: pool units"));
      detail::grow(gates, checked_elements(n, rc.top_k, "UnitPool: gates"));
      detail::grow(dgates, checked_elements(n, rc.top_k, "UnitPool: dgates"));
    }
  };

  struct Slot {
    bool live = false;
    std::int32_t generation = 0;
    AdapterId id = kNoAdapter;
    AdapterKind kind = AdapterKind::kLora;
    std::int64_t rank = 0;
    double scale = 0.0;
    std::vector<std::int64_t> pages;
    std::vector<UnitRun> runs;
    std::unique_ptr<Routed> routed;
  };

  static const UnitPoolConfig& validated(const UnitPoolConfig& c) {
    c.validate();
    return c;
  }

  void check_factors(const char* fn, const MatrixView<const T>& a, const MatrixView<const T>& bt,
                     double scale) const {
    constexpr MemorySpace space = Backend::kMemorySpace;
    RANKWISE_CHECK(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
    RANKWISE_CHECK(a.rows > 0, fn, ": a must have at least one rank (row), got ", shape_of(a));
    RANKWISE_CHECK(a.cols == d_in(), fn, ": a (r x d_in) is ", shape_of(a),
                   " but the pool's d_in is ", d_in());
    RANKWISE_CHECK(bt.cols == d_out(), fn, ": bt (r x d_out) is ", shape_of(bt),
                   " but the pool's d_out is ", d_out());
    check_view(a, "a (r x d_in)", a.rows, d_in(), space);
    check_view(bt, "bt (r x d_out)", a.rows, d_out(), space);
    check_no_overlap(fn, a_view(), "the pool's A", a, "a (r x d_in)");
    check_no_overlap(fn, bt_view(), "the pool's Bt", bt, "bt (r x d_out)");
  }

  // Everything that can fail is done before the pool changes.
  AdapterId insert(const char* fn, AdapterKind kind, MatrixView<const T> a, MatrixView<const T> bt,
                   double scale, std::unique_ptr<Routed> routed) {
    std::size_t free_slot = slots_.size();
    for (std::size_t i = 0; i < slots_.size() && free_slot == slots_.size(); ++i) {
      if (!slots_[i].live && id_of(i, slots_[i].generation) >= 0) free_slot = i;
    }
    RANKWISE_CHECK(free_slot < slots_.size(), fn, ": all ", slots_.size(),
                   " adapter slots are in use (UnitPoolConfig.max_adapters); remove one first");
    const std::int64_t r = a.rows;
    std::vector<std::int64_t> pages = pages_.allocate(r, fn);  // throws with the pool unchanged
    std::vector<UnitRun> runs = pages_.runs(pages, r);
    if (routed) {
      // The table from local to pool units, for routings on split units.
      std::vector<std::int32_t> table(static_cast<std::size_t>(r));
      for (const UnitRun& run : runs) {
        for (std::int64_t j = 0; j < run.length; ++j) {
          table[static_cast<std::size_t>(run.local + j)] = static_cast<std::int32_t>(run.pool + j);
        }
      }
      try {
        routed->table.resize(r);
        Kernels::upload_indices(*ctx_, table.data(), routed->table.view(1, r));
      } catch (...) {
        pages_.release(pages);
        throw;
      }
    }
    for (const UnitRun& run : runs) {
      Kernels::copy(*ctx_, a.row_block(run.local, run.length), Op::kNoTrans, a_run(run));
      Kernels::copy(*ctx_, bt.row_block(run.local, run.length), Op::kNoTrans, bt_run(run));
      if (grad_a_.size() != 0) {
        Kernels::fill(*ctx_, grad_a_run(run), 0.0);
        Kernels::fill(*ctx_, grad_bt_run(run), 0.0);
      }
    }
    Slot& s = slots_[free_slot];
    s.live = true;
    s.id = id_of(free_slot, s.generation);
    s.kind = kind;
    s.rank = r;
    s.scale = scale;
    s.pages = std::move(pages);
    s.runs = std::move(runs);
    s.routed = std::move(routed);
    ++live_;
    return s.id;
  }

  // id = generation · max_adapters + slot: a slot's next adapter gets a new id.
  AdapterId id_of(std::size_t slot, std::int32_t generation) const {
    const std::int64_t id = std::int64_t(generation) * config_.max_adapters + std::int64_t(slot);
    return id <= std::numeric_limits<AdapterId>::max() ? static_cast<AdapterId>(id) : kNoAdapter;
  }
  std::int64_t slot_index(AdapterId id) const { return id % config_.max_adapters; }

  const Slot* find(AdapterId id) const {
    if (id < 0) return nullptr;
    const Slot& s = slots_[static_cast<std::size_t>(slot_index(id))];
    return s.live && s.id == id ? &s : nullptr;
  }
  std::string why_missing(AdapterId id) const {
    if (id < 0) return "is negative and not kNoAdapter (-1)";
    // A slot's generation grows by one per removal, so an older one was removed.
    const Slot& s = slots_[static_cast<std::size_t>(slot_index(id))];
    if (id / config_.max_adapters < s.generation) {
      return "names an adapter that was removed from this pool";
    }
    return "names no adapter in this pool (never added)";
  }
  const Slot& slot_of(const char* fn, AdapterId id) const {
    const Slot* s = find(id);
    RANKWISE_CHECK(s != nullptr, fn, ": adapter id ", id, " ", why_missing(id));
    return *s;
  }
  Slot& slot_of(const char* fn, AdapterId id) {
    return const_cast<Slot&>(static_cast<const UnitPool&>(*this).slot_of(fn, id));
  }
  Routed& routed_of(const char* fn, AdapterId id) {
    Slot& s = slot_of(fn, id);
    RANKWISE_CHECK(s.routed != nullptr, fn, ": adapter ", id, " is ", to_string(s.kind),
                   ", not smora: it has no router");
    return *s.routed;
  }

  // Every adapter of the plan must be here, with the units, rank and scale
  // the plan knows: a removed adapter's id never comes back, so a stale plan
  // fails here, and so does a pool filled differently from the planning one.
  void check_plan(const char* fn, const Plan& plan, const MatrixView<const T>& x) const {
    RANKWISE_CHECK(plan.tokens_ >= 0, fn, ": the plan is empty: make it with plan() first");
    for (const typename Plan::Segment& seg : plan.segments_) {
      const Slot* s = find(seg.id);
      RANKWISE_CHECK(s != nullptr, fn, ": adapter ", seg.id, " of the plan ", why_missing(seg.id),
                     "; plan the batch again");
      bool same = s->rank == seg.rank && s->scale == seg.scale &&
                  static_cast<std::int64_t>(s->runs.size()) == seg.runs_count;
      for (std::int64_t i = 0; same && i < seg.runs_count; ++i) {
        const UnitRun& a = s->runs[static_cast<std::size_t>(i)];
        const UnitRun& b = plan.runs_[static_cast<std::size_t>(seg.runs_begin + i)];
        same = a.local == b.local && a.pool == b.pool && a.length == b.length;
      }
      RANKWISE_CHECK(same, fn, ": adapter ", seg.id,
                     " has other units, rank or scale in this pool than in the one that made the "
                     "plan (rank ",
                     s->rank, " here, ", seg.rank, " there); plan the batch for this pool");
    }
    check_view(x, "x (n x d_in)", plan.tokens_, d_in(), Backend::kMemorySpace);
  }
  // check_plan has run: the segment's adapter is live.
  Slot& slot_for(const typename Plan::Segment& seg) {
    return slots_[static_cast<std::size_t>(slot_index(seg.id))];
  }

  MatrixView<T> a_view() { return a_.view(capacity_units(), d_in()); }
  MatrixView<const T> a_view() const { return a_.view(capacity_units(), d_in()); }
  MatrixView<T> bt_view() { return bt_.view(capacity_units(), d_out()); }
  MatrixView<const T> bt_view() const { return bt_.view(capacity_units(), d_out()); }
  MatrixView<T> a_run(const UnitRun& run) { return a_view().row_block(run.pool, run.length); }
  MatrixView<T> bt_run(const UnitRun& run) { return bt_view().row_block(run.pool, run.length); }
  MatrixView<T> grad_a_run(const UnitRun& run) {
    return grad_a_.view(capacity_units(), d_in()).row_block(run.pool, run.length);
  }
  MatrixView<T> grad_bt_run(const UnitRun& run) {
    return grad_bt_.view(capacity_units(), d_out()).row_block(run.pool, run.length);
  }

  void ensure_grads() {
    if (grad_a_.size() != 0) return;
    grad_a_.resize(a_.size());
    grad_bt_.resize(bt_.size());
    zero_grad();
  }

  void copy_out(const char* fn, AdapterId id, const Buffer<Backend, T>& pool, std::int64_t cols,
                MatrixView<T> out) const {
    const Slot& s = slot_of(fn, id);
    check_view(out, "out (r x d)", s.rank, cols, Backend::kMemorySpace);
    RANKWISE_CHECK(pool.size() != 0, fn, ": no gradients yet (no backward has run)");
    const MatrixView<const T> all = pool.view(capacity_units(), cols);
    for (const UnitRun& run : s.runs) {
      Kernels::copy(*ctx_, all.row_block(run.pool, run.length), Op::kNoTrans,
                    out.row_block(run.local, run.length));
    }
  }

  // The plain adapters that prefer the backend's segment kernels, as one
  // table: per token its row, its adapter's rank, unit list, scale and the
  // start of its shrink results; the unit lists once per adapter.
  void pack_segment_table(Plan& out) const {
    std::int64_t positions = 0, list_units = 0, max_rank = 0;
    for (typename Plan::Segment& seg : out.segments_) {
      const Slot& s = slots_[static_cast<std::size_t>(slot_index(seg.id))];
      seg.segmented = !s.routed && TuningPolicy<Backend>::prefer_segmented(seg.count);
      if (!seg.segmented) continue;
      positions += seg.count;
      list_units += s.rank;
      max_rank = std::max(max_rank, s.rank);
    }
    if (positions == 0) return;
    const std::int64_t m = positions;
    const std::int64_t h_at = (4 * m + 1) / 2 * 2;  // int64 alignment
    const std::int64_t units_at = h_at + 2 * m;
    const std::int64_t words = checked_add(units_at, list_units, "UnitPool::plan: segment table");
    RANKWISE_CHECK(words <= std::numeric_limits<std::int32_t>::max(),
                   "UnitPool::plan: the segment table of ", m, " tokens exceeds int32 offsets");
    out.table_words_.assign(static_cast<std::size_t>(words), 0);
    std::int32_t* w = out.table_words_.data();
    std::int64_t p = 0, unit = 0, h = 0;
    for (const typename Plan::Segment& seg : out.segments_) {
      if (!seg.segmented) continue;
      const Slot& s = slots_[static_cast<std::size_t>(slot_index(seg.id))];
      const auto list = static_cast<std::int32_t>(unit);
      for (const UnitRun& run : s.runs) {
        for (std::int64_t j = 0; j < run.length; ++j) {
          w[units_at + unit++] = static_cast<std::int32_t>(run.pool + j);
        }
      }
      const auto scale = static_cast<float>(s.scale);
      for (std::int64_t i = 0; i < seg.count; ++i, ++p) {
        w[p] = out.order_host_[static_cast<std::size_t>(seg.begin + i)];
        w[m + p] = static_cast<std::int32_t>(s.rank);
        w[2 * m + p] = list;
        std::memcpy(w + 3 * m + p, &scale, sizeof scale);
        std::memcpy(w + h_at + 2 * p, &h, sizeof h);
        h += s.rank;
      }
    }
    detail::grow(out.table_device_, words);
    Kernels::upload_indices(*ctx_, w, detail::prefix(out.table_device_, words, 1));
    const std::int32_t* d = out.table_device_.data();
    SegmentTable& t = out.table_;
    t.positions = m;
    t.max_rank = max_rank;
    t.token = d;
    t.rank = d + m;
    t.unit_offset = d + 2 * m;
    t.scale = reinterpret_cast<const float*>(d + 3 * m);
    t.h_offset = reinterpret_cast<const std::int64_t*>(d + h_at);
    t.units = d + units_at;
    t.h_size = h;
  }

  // Scratch for the largest gathered segment of the plan.
  void reserve_scratch(const Plan& plan, bool backward) {
    std::int64_t most = 0;
    for (const typename Plan::Segment& seg : plan.segments_) {
      if (seg.first_token < 0 && seg.count > most) most = seg.count;
    }
    detail::grow(xs_, checked_elements(most, d_in(), "UnitPool: gathered x"));
    detail::grow(ys_, checked_elements(most, d_out(), "UnitPool: gathered y"));
    if (backward) {
      detail::grow(dys_, checked_elements(most, d_out(), "UnitPool: gathered dy"));
      detail::grow(dxs_, checked_elements(most, d_in(), "UnitPool: gathered dx"));
    }
  }

  MatrixView<const std::int32_t> order_of(const Plan& plan,
                                          const typename Plan::Segment& seg) const {
    return MatrixView<const std::int32_t>(plan.order_.data() + seg.begin, seg.count, 1,
                                          Backend::kMemorySpace);
  }

  MatrixView<const T> gather(const Plan& plan, const typename Plan::Segment& seg,
                             const MatrixView<const T>& src, Buffer<Backend, T>& into) {
    const MatrixView<T> dst = detail::prefix(into, seg.count, src.cols);
    Kernels::take_rows(*ctx_, src, order_of(plan, seg), dst);
    return dst;
  }

  MatrixView<T> zeroed(Buffer<Backend, T>& buffer, std::int64_t rows, std::int64_t cols) {
    const MatrixView<T> v = detail::prefix(buffer, rows, cols);
    Kernels::fill(*ctx_, v, 0.0);
    return v;
  }

  // dst[order[i]] += src[i]: each token belongs to one segment, so no row is
  // written twice.
  void scatter_add(const Plan& plan, const typename Plan::Segment& seg, MatrixView<const T> src,
                   MatrixView<T> dst) {
    Kernels::add_rows(*ctx_, src, order_of(plan, seg), dst);
  }

  // The units a routed adapter's routing indexes: its own run when it has
  // one (local units are then direct indices), else the whole pool with the
  // routing mapped to pool units, on the sparse path (the dense one would
  // touch every unit in the span).
  struct Span {
    MatrixView<const T> a, bt;
    MatrixView<T> grad_a, grad_bt;
    MatrixView<const std::int32_t> units;
    RankUnitPath path;
  };
  Span routed_span(Slot& s, std::int64_t m, bool with_grads) {
    Routed& r = *s.routed;
    const std::int64_t k = r.config.router.top_k;
    Span span;
    if (s.runs.size() == 1) {
      const UnitRun& run = s.runs.front();
      span.a = a_run(run);
      span.bt = bt_run(run);
      if (with_grads) {
        span.grad_a = grad_a_run(run);
        span.grad_bt = grad_bt_run(run);
      }
      span.units = detail::prefix(r.units, m, k);
      span.path = r.config.path;
      return span;
    }
    span.a = a_view();
    span.bt = bt_view();
    if (with_grads) {
      span.grad_a = grad_a_.view(capacity_units(), d_in());
      span.grad_bt = grad_bt_.view(capacity_units(), d_out());
    }
    span.units = detail::prefix(r.pool_units, m, k);
    span.path = RankUnitPath::kSparse;
    return span;
  }

  void routed_forward(Slot& s, MatrixView<const T> xs, MatrixView<T> ys, Mode mode,
                      const Plan& plan) {
    Routed& r = *s.routed;
    const RouterConfig& rc = r.config.router;
    const std::int64_t m = xs.rows, k = rc.top_k;
    r.grow(m);
    r.tokens = -1;
    workspace_.reserve(router_forward_workspace_bytes<T>(m, rc));
    router_forward<Backend, T>(*ctx_, rc, xs, MatrixView<const T>(r.wr_view()),
                               r.bias.view(1, rc.num_choices()), {}, r.routing(m),
                               r.config.check_finite, workspace_.data(), workspace_.bytes());
    if (s.runs.size() > 1) {
      Kernels::remap_units(*ctx_, r.table.view(1, s.rank), detail::prefix(r.units, m, k),
                           detail::prefix(r.pool_units, m, k));
    }
    const Span span = routed_span(s, m, false);
    const UnitRouting<Acc> routing{span.units, detail::prefix(r.gates, m, k)};
    workspace_.reserve(rank_units_forward_workspace_bytes<T>(m, k, span.a.rows));
    rank_units_forward<Backend, T>(*ctx_, s.scale, xs, span.a, span.bt, routing, ys, span.path,
                                   workspace_.data(), workspace_.bytes());
    r.tokens = m;
    r.serial = 0;
    if (mode == Mode::kTraining) {
      // backward differentiates the gates of this forward: the bias before its step.
      rankwise::Kernels<Backend, Acc>::copy(*ctx_, r.bias.view(1, rc.num_choices()), Op::kNoTrans,
                                            r.routed_bias.view(1, rc.num_choices()));
      r.serial = plan.serial_;
      if (r.config.update_bias_every_forward) {
        router_update_bias<Backend, T>(*ctx_, rc, r.counts_view(),
                                       r.bias.view(1, rc.num_choices()));
      }
    }
  }

  void routed_backward(Slot& s, MatrixView<const T> xs, MatrixView<const T> dys, MatrixView<T> dxs,
                       bool accumulate) {
    Routed& r = *s.routed;
    const RouterConfig& rc = r.config.router;
    const std::int64_t m = xs.rows, k = rc.top_k;
    RANKWISE_CHECK(r.tokens == m, "UnitPool::backward: adapter ", s.id, " routed ", r.tokens,
                   " tokens in its last forward, this batch gives it ", m);
    const Span span = routed_span(s, m, true);
    if (!accumulate) {
      for (const UnitRun& run : s.runs) {
        Kernels::fill(*ctx_, grad_a_run(run), 0.0);
        Kernels::fill(*ctx_, grad_bt_run(run), 0.0);
      }
    }
    const UnitRouting<Acc> routing{span.units, detail::prefix(r.gates, m, k)};
    const MatrixView<Acc> dgates = detail::prefix(r.dgates, m, k);
    workspace_.reserve(std::max(rank_units_backward_workspace_bytes<T>(m, k, span.a.rows),
                                router_backward_workspace_bytes<T>(m, rc)));
    rank_units_backward<Backend, T>(*ctx_, s.scale, xs, span.a, span.bt, routing, dys, dxs,
                                    span.grad_a, span.grad_bt, dgates, true, span.path,
                                    workspace_.data(), workspace_.bytes());
    router_backward<Backend, T>(*ctx_, rc, xs, MatrixView<const T>(r.wr_view()),
                                r.routed_bias.view(1, rc.num_choices()), {}, r.routing(m), dgates,
                                r.config.aux_loss_coef, dxs, r.grad_wr_view(), accumulate,
                                workspace_.data(), workspace_.bytes());
  }

  Context<Backend>* ctx_;
  UnitPoolConfig config_;
  UnitPages pages_;
  std::vector<Slot> slots_;
  std::int64_t live_ = 0;
  Buffer<Backend, T> a_, bt_, grad_a_, grad_bt_;  // (capacity x d_in / d_out)
  Buffer<Backend, T> xs_, ys_, dys_, dxs_;
  Buffer<Backend, Acc> h_;  // the segment kernels' shrink results
  Plan own_plan_;
  detail::OwnedWorkspace<Backend> workspace_;
};

}  // namespace rankwise
