// Low-level MoS: stateless forward and backward of one layer on caller-owned
// memory. The layer's A and B are never stored: unit j's a_j is the
// concatenation of the l shards A_pool[I_a[j·l + s]] (b_j likewise), read in
// place through the index tables (ShardPath::kDirect) or gathered into an
// assembled A and Bᵀ first, then two GEMMs (kAssembled). The Mos layer
// (layers/mos.hpp) owns the tables and a workspace and calls these.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/backend/tuning.hpp"
#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/error.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/shard_config.hpp"
#include "rankwise/core/shard_indices.hpp"
#include "rankwise/core/workspace.hpp"
#include "rankwise/layers/lora_ops.hpp"
#include "rankwise/layers/rank_units.hpp"

namespace rankwise {

/// How a MoS layer reaches its shards.
enum class ShardPath {
  kAuto,       ///< the backend's crossover (TuningPolicy<Backend>::prefer_assembled_shards)
  kDirect,     ///< read shards through the index lists; nothing is materialised
  kAssembled,  ///< assemble A and B by gathering shards, then two GEMMs
};

/// The path a call with n tokens takes on Backend: `path` itself unless kAuto.
template <class Backend, class T>
ShardPath resolve_shard_path(ShardPath path, std::int64_t n) {
  if (path != ShardPath::kAuto) return path;
  return TuningPolicy<Backend>::prefer_assembled_shards(n) ? ShardPath::kAssembled
                                                           : ShardPath::kDirect;
}

/// One layer's index tables in the backend's memory space (int32, contiguous).
///   list_a, list_b        (1 x r·l): chunk s of unit j is shard list[j·l + s]
///   pattern_a, pattern_b  (l x r): the same by chunk, pattern[s][j] = list[j·l + s],
///                         so the direct path hands one row to every token
/// MosTableBuffers builds all four from ShardIndices; a pattern that is not its
/// list by chunk is refused on the CPU (GPU: not checked, by the no-readback rule).
struct MosTables {
  MatrixView<const std::int32_t> list_a, list_b;
  MatrixView<const std::int32_t> pattern_a, pattern_b;
};

/// The by-chunk pattern of an index list of r units of l chunks (host side).
inline std::vector<std::int32_t> shard_chunk_pattern(const std::vector<std::int32_t>& list,
                                                     std::int64_t rank, std::int64_t chunks) {
  RANKWISE_CHECK(static_cast<std::int64_t>(list.size()) == rank * chunks,
                 "shard_chunk_pattern: index list of ", list.size(),
                 " entries, expected r · l = ", rank, " · ", chunks);
  std::vector<std::int32_t> pattern(list.size());
  for (std::int64_t j = 0; j < rank; ++j)
    for (std::int64_t s = 0; s < chunks; ++s) pattern[s * rank + j] = list[j * chunks + s];
  return pattern;
}

/// The tables of one layer, owned, in the backend's memory.
template <class Backend>
class MosTableBuffers {
 public:
  MosTableBuffers(Context<Backend>& ctx, const ShardPoolConfig& pool, const MosConfig& config,
                  const ShardIndices& indices)
      : rank_(config.rank), chunks_(pool.shards_per_vector) {
    check_shard_indices(pool, config, indices);
    const std::int64_t q = checked_mul(rank_, chunks_, "MosTableBuffers: index lists r · l");
    upload(ctx, indices.a, list_a_, 1, q);
    upload(ctx, indices.b, list_b_, 1, q);
    upload(ctx, shard_chunk_pattern(indices.a, rank_, chunks_), pattern_a_, chunks_, rank_);
    upload(ctx, shard_chunk_pattern(indices.b, rank_, chunks_), pattern_b_, chunks_, rank_);
  }

  MosTables tables() const {
    constexpr MemorySpace space = Backend::kMemorySpace;
    const std::int64_t q = rank_ * chunks_;
    return {MatrixView<const std::int32_t>(list_a_.data(), 1, q, space),
            MatrixView<const std::int32_t>(list_b_.data(), 1, q, space),
            MatrixView<const std::int32_t>(pattern_a_.data(), chunks_, rank_, space),
            MatrixView<const std::int32_t>(pattern_b_.data(), chunks_, rank_, space)};
  }

 private:
  static void upload(Context<Backend>& ctx, const std::vector<std::int32_t>& host,
                     Buffer<Backend, std::int32_t>& dst, std::int64_t rows, std::int64_t cols) {
    dst.resize(rows * cols);
    Kernels<Backend, float>::upload_indices(ctx, host.data(), dst.view(rows, cols));
  }

  std::int64_t rank_, chunks_;
  Buffer<Backend, std::int32_t> list_a_, list_b_, pattern_a_, pattern_b_;
};

namespace detail {

/// What a MoS op carves: the plan below is the one layout, run through a
/// counting carver for the *_workspace_bytes functions and through the real
/// one by the ops.
enum class MosCall { kForward, kBackward, kAssemble };

template <class T>
struct MosBlocks {
  using Acc = accumulator_t<T>;
  MatrixView<Acc> h, dh;           // direct path: H = X Aᵀ, dH = s dY B (n x r)
  MatrixView<T> a, bt;             // assembled A (r x d_in), Bᵀ (r x d_out)
  MatrixView<Acc> ones;            // (r·l x 1): the coefficients of the gathers and scatters
  MatrixView<unsigned char> lora;  // assembled path: lora_forward's / lora_backward's workspace
  MatrixView<T> da, dbt;           // assembled path: the layer's dA, dBᵀ before the scatter
};

template <class T>
MosBlocks<T> plan_mos(WorkspaceCarver& carve, MosCall call, ShardPath path, std::int64_t n,
                      std::int64_t rank, const ShardPoolConfig& pool) {
  using Acc = accumulator_t<T>;
  MosBlocks<T> blocks;
  if (call != MosCall::kAssemble && path == ShardPath::kDirect) {
    blocks.h = carve.take<Acc>(n, rank);
    if (call == MosCall::kBackward) blocks.dh = carve.take<Acc>(n, rank);
    return blocks;
  }
  blocks.a = carve.take<T>(rank, pool.d_in);
  blocks.bt = carve.take<T>(rank, pool.d_out);
  blocks.ones = carve.take<Acc>(rank * pool.shards_per_vector, 1);
  if (call == MosCall::kAssemble) return blocks;
  const bool backward = call == MosCall::kBackward;
  blocks.lora = carve.take<unsigned char>(1, backward ? lora_backward_workspace_bytes<T>(n, rank)
                                                      : lora_forward_workspace_bytes<T>(n, rank));
  if (backward) {
    blocks.da = carve.take<T>(rank, pool.d_in);
    blocks.dbt = carve.take<T>(rank, pool.d_out);
  }
  return blocks;
}

template <class Backend, class T>
std::size_t mos_workspace_bytes(MosCall call, const char* fn, const ShardPoolConfig& pool,
                                const MosConfig& config, std::int64_t n, ShardPath path) {
  config.validate(pool);
  RANKWISE_CHECK(n >= 0, fn, ": n must be non-negative, got ", n);
  const ShardPath resolved = resolve_shard_path<Backend, T>(path, n);
  return planned_workspace_bytes(
      fn, [&](WorkspaceCarver& c) { plan_mos<T>(c, call, resolved, n, config.rank, pool); });
}

// Columns [c · width, (c + 1) · width) of m: chunk c of every row.
template <class U>
MatrixView<U> shard_chunk(const MatrixView<U>& m, std::int64_t c, std::int64_t width) {
  return MatrixView<U>(m.data + c * width, m.rows, width, m.space, m.rows <= 1 ? m.cols : m.ld);
}

// Row c of a pattern, broadcast to n tokens (ld = 0).
inline MatrixView<const std::int32_t> pattern_row(const MatrixView<const std::int32_t>& pattern,
                                                  std::int64_t c, std::int64_t n) {
  return MatrixView<const std::int32_t>(pattern.data + c * pattern.ld, n, pattern.cols,
                                        pattern.space, 0);
}

// A list (1 x q) as q tokens of one unit each.
inline MatrixView<const std::int32_t> list_units(const MatrixView<const std::int32_t>& list) {
  return MatrixView<const std::int32_t>(list.data, list.cols, 1, list.space);
}

// The checks every MoS op makes before any work: configs, the pools' shapes,
// the tables' shapes and (CPU) their indices.
template <class Backend, class T>
void check_mos_operands(const char* fn, const ShardPoolConfig& pool, const MosConfig& config,
                        const MatrixView<const T>& a_shards, const MatrixView<const T>& b_shards,
                        const MosTables& tables) {
  constexpr MemorySpace space = Backend::kMemorySpace;
  config.validate(pool);
  const std::int64_t m = pool.num_shards(), r = config.rank, l = pool.shards_per_vector;
  const std::int64_t q = checked_mul(r, l, "MoS index lists r · l");
  check_view(a_shards, "A shards (M x d_in/l)", m, pool.shard_in(), space);
  check_view(b_shards, "B shards (M x d_out/l)", m, pool.shard_out(), space);
  check_view(tables.list_a, "list_a (1 x r·l)", 1, q, space);
  check_view(tables.list_b, "list_b (1 x r·l)", 1, q, space);
  check_view(tables.pattern_a, "pattern_a (l x r)", l, r, space);
  check_view(tables.pattern_b, "pattern_b (l x r)", l, r, space);
  check_indices_on_host<Backend>(fn, "shard indices", "list_a", tables.list_a, m, "M");
  check_indices_on_host<Backend>(fn, "shard indices", "list_b", tables.list_b, m, "M");
  if constexpr (space == MemorySpace::kHost) {
    auto check_pattern = [&](const MatrixView<const std::int32_t>& list,
                             const MatrixView<const std::int32_t>& pattern, const char* name) {
      for (std::int64_t s = 0; s < l; ++s) {
        for (std::int64_t j = 0; j < r; ++j) {
          const std::int32_t by_chunk = pattern.data[s * pattern.ld + j];
          const std::int32_t by_unit = list.data[j * l + s];
          RANKWISE_CHECK(by_chunk == by_unit, fn, ": ", name, "[", s, "][", j, "] = ", by_chunk,
                         " differs from its list's entry [", j, " · l + ", s, "] = ", by_unit,
                         " (MosTableBuffers builds both from one list)");
        }
      }
    };
    check_pattern(tables.list_a, tables.pattern_a, "pattern_a");
    check_pattern(tables.list_b, tables.pattern_b, "pattern_b");
  }
}

// out (n x r) = alpha · Σ_c (pool[pattern[c][j]] · chunk c of m[n]).
template <class Backend, class T>
void gather_shard_chunks(Context<Backend>& ctx, MatrixView<const T> m, MatrixView<const T> shards,
                         const MatrixView<const std::int32_t>& pattern,
                         MatrixView<accumulator_t<T>> out, accumulator_t<T> alpha) {
  using Acc = accumulator_t<T>;
  const std::int64_t width = shards.cols;
  for (std::int64_t c = 0; c < pattern.rows; ++c) {
    Kernels<Backend, T>::gather_dot(ctx, alpha, shard_chunk(m, c, width), shards,
                                    pattern_row(pattern, c, m.rows), out, c == 0 ? Acc(0) : Acc(1));
  }
}

// blocks.a (r x d_in) = A, blocks.bt (r x d_out) = Bᵀ, gathered from the
// pools: row j·l + s of A viewed as (r·l x d_in/l) is A_pool[list_a[j·l + s]].
template <class Backend, class T>
void assemble_shards(Context<Backend>& ctx, const MatrixView<const T>& a_shards,
                     const MatrixView<const T>& b_shards, const MosTables& tables,
                     const MosBlocks<T>& blocks) {
  using K = Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  constexpr MemorySpace space = Backend::kMemorySpace;
  const std::int64_t q = tables.list_a.cols;
  rankwise::Kernels<Backend, Acc>::fill(ctx, blocks.ones, 1.0);
  MatrixView<T> a_rows(blocks.a.data, q, a_shards.cols, space);
  MatrixView<T> b_rows(blocks.bt.data, q, b_shards.cols, space);
  K::fill(ctx, a_rows, 0.0);
  K::fill(ctx, b_rows, 0.0);
  K::gather_axpy(ctx, Acc(1), blocks.ones, a_shards, list_units(tables.list_a), a_rows);
  K::gather_axpy(ctx, Acc(1), blocks.ones, b_shards, list_units(tables.list_b), b_rows);
}

}  // namespace detail

/// Workspace bytes of mos_forward for n tokens on `path` (kAuto: the path the
/// op takes for n on Backend), from the same plan the op carves.
template <class Backend, class T>
std::size_t mos_forward_workspace_bytes(const ShardPoolConfig& pool, const MosConfig& config,
                                        std::int64_t n, ShardPath path = ShardPath::kAuto) {
  return detail::mos_workspace_bytes<Backend, T>(detail::MosCall::kForward, "mos_forward", pool,
                                                 config, n, path);
}

/// Workspace bytes of mos_backward, as mos_forward_workspace_bytes.
template <class Backend, class T>
std::size_t mos_backward_workspace_bytes(const ShardPoolConfig& pool, const MosConfig& config,
                                         std::int64_t n, ShardPath path = ShardPath::kAuto) {
  return detail::mos_workspace_bytes<Backend, T>(detail::MosCall::kBackward, "mos_backward", pool,
                                                 config, n, path);
}

/// Workspace bytes of mos_assemble.
template <class Backend, class T>
std::size_t mos_assemble_workspace_bytes(const ShardPoolConfig& pool, const MosConfig& config) {
  return detail::mos_workspace_bytes<Backend, T>(detail::MosCall::kAssemble, "mos_assemble", pool,
                                                 config, 0, ShardPath::kAssembled);
}

/// y (n x d_out) += (alpha / r) · B A x for x (n x d_in): one MoS layer over
/// the pools a_shards (M x d_in/l), b_shards (M x d_out/l) through `tables`.
/// workspace: mos_forward_workspace_bytes<Backend, T>(pool, config, n, path)
/// bytes, 256-byte aligned, in the backend's memory space. Throws
/// rankwise::error before any work on mismatched shapes, a short or
/// overlapping workspace, y sharing memory with the shards, and (CPU) shard
/// indices outside [0, M) or a pattern that is not its list by chunk.
template <class Backend, class T>
void mos_forward(Context<Backend>& ctx, const ShardPoolConfig& pool, const MosConfig& config,
                 MatrixView<const T> a_shards, MatrixView<const T> b_shards,
                 const MosTables& tables, MatrixView<const T> x, MatrixView<T> y, ShardPath path,
                 void* workspace, std::size_t workspace_bytes) {
  using K = Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  constexpr MemorySpace space = Backend::kMemorySpace;
  constexpr const char* fn = "mos_forward";
  detail::check_mos_operands<Backend, T>(fn, pool, config, a_shards, b_shards, tables);
  check_view(x, "x (n x d_in)", x.rows, pool.d_in, space);
  check_view(y, "y (n x d_out)", x.rows, pool.d_out, space);
  check_no_overlap(fn, y, "y (n x d_out)", a_shards, "the pool's A shards");
  check_no_overlap(fn, y, "y (n x d_out)", b_shards, "the pool's B shards");
  const std::int64_t n = x.rows;
  if (n == 0) return;
  const ShardPath resolved = resolve_shard_path<Backend, T>(path, n);
  WorkspaceCarver carve(workspace, workspace_bytes, space, fn);
  const detail::MosBlocks<T> blocks =
      detail::plan_mos<T>(carve, detail::MosCall::kForward, resolved, n, config.rank, pool);
  carve.check_disjoint(x, "x (n x d_in)");
  carve.check_disjoint(y, "y (n x d_out)");
  carve.check_disjoint(a_shards, "the pool's A shards");
  carve.check_disjoint(b_shards, "the pool's B shards");
  const auto s = static_cast<Acc>(config.scale());
  if (resolved == ShardPath::kAssembled) {
    detail::assemble_shards<Backend, T>(ctx, a_shards, b_shards, tables, blocks);
    lora_forward<Backend, T>(ctx, config.scale(), x, blocks.a, blocks.bt, y, blocks.lora.data,
                             static_cast<std::size_t>(blocks.lora.cols));
    return;
  }
  detail::gather_shard_chunks<Backend, T>(ctx, x, a_shards, tables.pattern_a, blocks.h, Acc(1));
  for (std::int64_t c = 0; c < pool.shards_per_vector; ++c) {
    K::gather_axpy(ctx, s, blocks.h, b_shards, detail::pattern_row(tables.pattern_b, c, n),
                   detail::shard_chunk(y, c, pool.shard_out()));
  }
}

/// The gradients of mos_forward given dy = ∂L/∂y (n x d_out), added into
/// grad_a (M x d_in/l) and grad_b (M x d_out/l) (always accumulating: the
/// shards are shared across layers), and dx (n x d_in) += ∂L/∂x when dx is
/// not empty. workspace: mos_backward_workspace_bytes. The gradients must not
/// share memory with x, dy, dx or the workspace, nor dx with the shards.
template <class Backend, class T>
void mos_backward(Context<Backend>& ctx, const ShardPoolConfig& pool, const MosConfig& config,
                  MatrixView<const T> a_shards, MatrixView<const T> b_shards,
                  const MosTables& tables, MatrixView<const T> x, MatrixView<const T> dy,
                  MatrixView<T> dx, MatrixView<T> grad_a, MatrixView<T> grad_b, ShardPath path,
                  void* workspace, std::size_t workspace_bytes) {
  using K = Kernels<Backend, T>;
  using Acc = accumulator_t<T>;
  constexpr MemorySpace space = Backend::kMemorySpace;
  constexpr const char* fn = "mos_backward";
  detail::check_mos_operands<Backend, T>(fn, pool, config, a_shards, b_shards, tables);
  check_view(x, "x (n x d_in)", x.rows, pool.d_in, space);
  check_view(dy, "dy (n x d_out)", x.rows, pool.d_out, space);
  if (!dx.empty() || dx.data != nullptr) check_view(dx, "dx (n x d_in)", x.rows, pool.d_in, space);
  check_view(grad_a, "grad_a (M x d_in/l)", pool.num_shards(), pool.shard_in(), space);
  check_view(grad_b, "grad_b (M x d_out/l)", pool.num_shards(), pool.shard_out(), space);
  auto against_streams = [&](const MatrixView<T>& grad, const char* name) {
    check_no_overlap(fn, grad, name, x, "x (n x d_in)");
    check_no_overlap(fn, grad, name, dy, "dy (n x d_out)");
    check_no_overlap(fn, grad, name, dx, "dx (n x d_in)");
  };
  against_streams(grad_a, "grad_a");
  against_streams(grad_b, "grad_b");
  check_no_overlap(fn, dx, "dx (n x d_in)", a_shards, "the pool's A shards");
  check_no_overlap(fn, dx, "dx (n x d_in)", b_shards, "the pool's B shards");
  const std::int64_t n = x.rows, r = config.rank, l = pool.shards_per_vector;
  if (n == 0) return;
  const ShardPath resolved = resolve_shard_path<Backend, T>(path, n);
  WorkspaceCarver carve(workspace, workspace_bytes, space, fn);
  const detail::MosBlocks<T> blocks =
      detail::plan_mos<T>(carve, detail::MosCall::kBackward, resolved, n, r, pool);
  carve.check_disjoint(x, "x (n x d_in)");
  carve.check_disjoint(dy, "dy (n x d_out)");
  carve.check_disjoint(dx, "dx (n x d_in)");
  carve.check_disjoint(grad_a, "grad_a");
  carve.check_disjoint(grad_b, "grad_b");
  carve.check_disjoint(a_shards, "the pool's A shards");
  carve.check_disjoint(b_shards, "the pool's B shards");
  const auto s = static_cast<Acc>(config.scale());
  if (resolved == ShardPath::kAssembled) {
    // lora_backward, then each row j·l + s of the assembled gradients added
    // into shard list[j·l + s].
    detail::assemble_shards<Backend, T>(ctx, a_shards, b_shards, tables, blocks);
    lora_backward<Backend, T>(ctx, config.scale(), x, blocks.a, blocks.bt, dy, dx, blocks.da,
                              blocks.dbt, false, blocks.lora.data,
                              static_cast<std::size_t>(blocks.lora.cols));
    K::scatter_axpy(ctx, Acc(1), blocks.ones,
                    MatrixView<const T>(blocks.da.data, r * l, pool.shard_in(), space),
                    detail::list_units(tables.list_a), Acc(1), grad_a);
    K::scatter_axpy(ctx, Acc(1), blocks.ones,
                    MatrixView<const T>(blocks.dbt.data, r * l, pool.shard_out(), space),
                    detail::list_units(tables.list_b), Acc(1), grad_b);
    return;
  }
  // dH = scale · dY B: MoS has no gates.
  detail::gather_shard_chunks<Backend, T>(ctx, x, a_shards, tables.pattern_a, blocks.h, Acc(1));
  detail::gather_shard_chunks<Backend, T>(ctx, dy, b_shards, tables.pattern_b, blocks.dh, s);
  for (std::int64_t c = 0; c < l; ++c) {
    const auto ua = detail::pattern_row(tables.pattern_a, c, n);
    const auto ub = detail::pattern_row(tables.pattern_b, c, n);
    K::scatter_axpy(ctx, Acc(1), blocks.dh, detail::shard_chunk(x, c, pool.shard_in()), ua, Acc(1),
                    grad_a);
    K::scatter_axpy(ctx, s, blocks.h, detail::shard_chunk(dy, c, pool.shard_out()), ub, Acc(1),
                    grad_b);
    if (!dx.empty()) {
      K::gather_axpy(ctx, Acc(1), blocks.dh, a_shards, ua,
                     detail::shard_chunk(dx, c, pool.shard_in()));
    }
  }
}

/// The layer's A (r x d_in) into a_out and B (d_out x r) into b_out, PEFT's
/// layout, gathered from the pools: what a plain LoRA export of this layer
/// holds. Either output may be empty (not written). workspace:
/// mos_assemble_workspace_bytes.
template <class Backend, class T>
void mos_assemble(Context<Backend>& ctx, const ShardPoolConfig& pool, const MosConfig& config,
                  MatrixView<const T> a_shards, MatrixView<const T> b_shards,
                  const MosTables& tables, MatrixView<T> a_out, MatrixView<T> b_out,
                  void* workspace, std::size_t workspace_bytes) {
  constexpr MemorySpace space = Backend::kMemorySpace;
  constexpr const char* fn = "mos_assemble";
  detail::check_mos_operands<Backend, T>(fn, pool, config, a_shards, b_shards, tables);
  const bool want_a = !a_out.empty() || a_out.data != nullptr;
  const bool want_b = !b_out.empty() || b_out.data != nullptr;
  if (want_a) check_view(a_out, "A (r x d_in)", config.rank, pool.d_in, space);
  if (want_b) check_view(b_out, "B (d_out x r)", pool.d_out, config.rank, space);
  WorkspaceCarver carve(workspace, workspace_bytes, space, fn);
  const detail::MosBlocks<T> blocks = detail::plan_mos<T>(
      carve, detail::MosCall::kAssemble, ShardPath::kAssembled, 0, config.rank, pool);
  carve.check_disjoint(a_out, "A (r x d_in)");
  carve.check_disjoint(b_out, "B (d_out x r)");
  detail::assemble_shards<Backend, T>(ctx, a_shards, b_shards, tables, blocks);
  if (want_a) Kernels<Backend, T>::copy(ctx, blocks.a, Op::kNoTrans, a_out);
  if (want_b) Kernels<Backend, T>::copy(ctx, blocks.bt, Op::kTrans, b_out);
}

}  // namespace rankwise
