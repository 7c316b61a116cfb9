// Ground truth for the MoS tests, written from the method's definition (Wang
// et al., "Mixture of Shards") as plain loops in double, independently of
// rankwise's layers and backends (no Eigen, no CUDA, no use of ShardPoolConfig's
// derived sizes): shard pools, index lists, the assembled A and B, forward,
// and the backward that scatters into pool-gradient arrays.
//
//   M = v · L · l shards per pool; A_pool (M x d_in / l), B_pool (M x d_out / l).
//   Unit j of a layer: a_j = concat_s A_pool[I_a[j·l + s]], b_j = concat_s B_pool[I_b[j·l + s]].
//   y += (alpha / r) · Σ_j b_j (a_j · x).
#pragma once

#include <cmath>
#include <cstdint>
#include <ostream>
#include <set>
#include <vector>

#include "rankwise/core/random.hpp"
#include "rankwise/core/shard_config.hpp"
#include "support/reference.hpp"

namespace rwtest {

using ShardList = std::vector<std::int32_t>;

/// The sizes of one pool and one layer's use of it, restated from the method
/// (every derived number is computed here, not taken from ShardPoolConfig).
struct MosShape {
  std::int64_t d_in = 0, d_out = 0;
  std::int64_t num_layers = 1;  // L
  std::int64_t v = 1;           // equivalent rank
  std::int64_t p = 0;           // private ranks per layer
  std::int64_t l = 1;           // shards per vector
  std::int64_t r = 1;           // rank a layer uses

  std::int64_t shards() const { return v * num_layers * l; }             // M
  std::int64_t public_shards() const { return (v - p) * num_layers * l; }  // P0
  std::int64_t width_in() const { return d_in / l; }
  std::int64_t width_out() const { return d_out / l; }
  std::int64_t list_length() const { return r * l; }
  std::int64_t public_count() const { return (r - p) * l; }
  /// Layer i's private block [first, first + p · l).
  std::int64_t private_first(std::int64_t layer) const {
    return (v - p) * num_layers * l + layer * p * l;
  }

  rankwise::ShardPoolConfig pool_config() const {
    rankwise::ShardPoolConfig c;
    c.d_in = d_in;
    c.d_out = d_out;
    c.num_layers = num_layers;
    c.equivalent_rank = v;
    c.private_rank = p;
    c.shards_per_vector = l;
    return c;
  }
};

inline std::ostream& operator<<(std::ostream& out, const MosShape& s) {
  return out << "{d_in " << s.d_in << ", d_out " << s.d_out << ", L " << s.num_layers << ", v "
             << s.v << ", p " << s.p << ", l " << s.l << ", r " << s.r << "}";
}

/// The layer's A (r x d_in, PEFT layout): row j = concat_s A_pool[I_a[j·l + s]].
inline HostMatrix ref_mos_assemble_a(const MosShape& s, const HostMatrix& a_pool,
                                     const ShardList& ia) {
  const std::int64_t w = s.width_in();
  HostMatrix a(s.r, s.d_in);
  for (std::int64_t j = 0; j < s.r; ++j)
    for (std::int64_t c = 0; c < s.l; ++c)
      for (std::int64_t e = 0; e < w; ++e) a(j, c * w + e) = a_pool(ia[j * s.l + c], e);
  return a;
}

/// The layer's B (d_out x r, PEFT layout): column j = concat_s B_pool[I_b[j·l + s]].
inline HostMatrix ref_mos_assemble_b(const MosShape& s, const HostMatrix& b_pool,
                                     const ShardList& ib) {
  const std::int64_t w = s.width_out();
  HostMatrix b(s.d_out, s.r);
  for (std::int64_t j = 0; j < s.r; ++j)
    for (std::int64_t c = 0; c < s.l; ++c)
      for (std::int64_t e = 0; e < w; ++e) b(c * w + e, j) = b_pool(ib[j * s.l + c], e);
  return b;
}

/// h (n x r): h[n][j] = a_j · x[n], a_j read shard by shard from the pool.
inline HostMatrix ref_mos_hidden(const MosShape& s, const HostMatrix& a_pool, const ShardList& ia,
                                 const HostMatrix& x) {
  const std::int64_t w = s.width_in();
  HostMatrix h(x.rows, s.r);
  for (std::int64_t n = 0; n < x.rows; ++n)
    for (std::int64_t j = 0; j < s.r; ++j) {
      double acc = 0.0;
      for (std::int64_t c = 0; c < s.l; ++c)
        for (std::int64_t e = 0; e < w; ++e) acc += a_pool(ia[j * s.l + c], e) * x(n, c * w + e);
      h(n, j) = acc;
    }
  return h;
}

/// y0 + scale · Σ_j b_j (a_j · x) for every row of x (n x d_in); y0 is (n x d_out).
inline HostMatrix ref_mos_forward(const MosShape& s, double scale, const HostMatrix& a_pool,
                                  const HostMatrix& b_pool, const ShardList& ia,
                                  const ShardList& ib, const HostMatrix& x, const HostMatrix& y0) {
  const std::int64_t w = s.width_out();
  const HostMatrix h = ref_mos_hidden(s, a_pool, ia, x);
  HostMatrix y = y0;
  for (std::int64_t n = 0; n < x.rows; ++n)
    for (std::int64_t c = 0; c < s.l; ++c)
      for (std::int64_t e = 0; e < w; ++e) {
        double acc = 0.0;
        for (std::int64_t j = 0; j < s.r; ++j) acc += b_pool(ib[j * s.l + c], e) * h(n, j);
        y(n, c * w + e) += scale * acc;
      }
  return y;
}

/// One layer's gradients, scattered into pool-shaped arrays: a shard listed k
/// times receives the sum of its k contributions; rows of unused shards are 0.
struct MosGrads {
  HostMatrix da_pool;  // (M, d_in / l)
  HostMatrix db_pool;  // (M, d_out / l)
  HostMatrix dx;       // (n, d_in): this layer's part of ∂L/∂x
};

inline MosGrads ref_mos_backward(const MosShape& s, double scale, const HostMatrix& a_pool,
                                 const HostMatrix& b_pool, const ShardList& ia,
                                 const ShardList& ib, const HostMatrix& x, const HostMatrix& dy) {
  const std::int64_t wi = s.width_in(), wo = s.width_out(), n_tok = x.rows;
  const HostMatrix h = ref_mos_hidden(s, a_pool, ia, x);
  HostMatrix g(n_tok, s.r);  // g[n][j] = scale · b_j · dy[n] = ∂L/∂h
  for (std::int64_t n = 0; n < n_tok; ++n)
    for (std::int64_t j = 0; j < s.r; ++j) {
      double acc = 0.0;
      for (std::int64_t c = 0; c < s.l; ++c)
        for (std::int64_t e = 0; e < wo; ++e) acc += b_pool(ib[j * s.l + c], e) * dy(n, c * wo + e);
      g(n, j) = scale * acc;
    }
  MosGrads out{HostMatrix(s.shards(), wi), HostMatrix(s.shards(), wo), HostMatrix(n_tok, s.d_in)};
  for (std::int64_t j = 0; j < s.r; ++j)
    for (std::int64_t c = 0; c < s.l; ++c) {
      const std::int32_t sa = ia[j * s.l + c], sb = ib[j * s.l + c];
      for (std::int64_t e = 0; e < wi; ++e) {
        double acc = 0.0;
        for (std::int64_t n = 0; n < n_tok; ++n) acc += g(n, j) * x(n, c * wi + e);
        out.da_pool(sa, e) += acc;
      }
      for (std::int64_t e = 0; e < wo; ++e) {
        double acc = 0.0;
        for (std::int64_t n = 0; n < n_tok; ++n) acc += h(n, j) * dy(n, c * wo + e);
        out.db_pool(sb, e) += scale * acc;
      }
    }
  for (std::int64_t n = 0; n < n_tok; ++n)
    for (std::int64_t c = 0; c < s.l; ++c)
      for (std::int64_t e = 0; e < wi; ++e) {
        double acc = 0.0;
        for (std::int64_t j = 0; j < s.r; ++j) acc += g(n, j) * a_pool(ia[j * s.l + c], e);
        out.dx(n, c * wi + e) = acc;
      }
  return out;
}

/// A reference result and its magnitude: the same reference run on |inputs|,
/// which gives, element by element, the sum of the magnitudes of every term
/// behind the result — the yardstick rounding errors are bounded by
/// (support/compare.hpp, support/mos_tolerance.hpp).
struct MosExpected {
  HostMatrix ref, mag;
};

inline MosExpected expect_mos_forward(const MosShape& s, double scale, const HostMatrix& a_pool,
                                      const HostMatrix& b_pool, const ShardList& ia,
                                      const ShardList& ib, const HostMatrix& x,
                                      const HostMatrix& y0) {
  return {ref_mos_forward(s, scale, a_pool, b_pool, ia, ib, x, y0),
          ref_mos_forward(s, std::abs(scale), abs_of(a_pool), abs_of(b_pool), ia, ib, abs_of(x),
                          abs_of(y0))};
}

/// Element-wise c · m.
inline HostMatrix scaled(const HostMatrix& m, double c) {
  HostMatrix out = m;
  for (double& x : out.v) x *= c;
  return out;
}

/// Reference gradients of one or more backward calls and their magnitudes.
struct MosExpectedGrads {
  MosGrads ref, mag;

  MosExpected da() const { return {ref.da_pool, mag.da_pool}; }
  MosExpected db() const { return {ref.db_pool, mag.db_pool}; }
  /// dx after `dx += ...` on a dx that held dx0.
  MosExpected dx_after(const HostMatrix& dx0) const {
    return {add(dx0, ref.dx), add(abs_of(dx0), mag.dx)};
  }
  /// The pool gradients after this call and `other` both added into them.
  MosExpectedGrads plus(const MosExpectedGrads& other) const {
    MosExpectedGrads out = *this;
    out.ref.da_pool = add(ref.da_pool, other.ref.da_pool);
    out.ref.db_pool = add(ref.db_pool, other.ref.db_pool);
    out.mag.da_pool = add(mag.da_pool, other.mag.da_pool);
    out.mag.db_pool = add(mag.db_pool, other.mag.db_pool);
    return out;
  }
};

inline MosExpectedGrads expect_mos_backward(const MosShape& s, double scale,
                                            const HostMatrix& a_pool, const HostMatrix& b_pool,
                                            const ShardList& ia, const ShardList& ib,
                                            const HostMatrix& x, const HostMatrix& dy) {
  return {ref_mos_backward(s, scale, a_pool, b_pool, ia, ib, x, dy),
          ref_mos_backward(s, std::abs(scale), abs_of(a_pool), abs_of(b_pool), ia, ib, abs_of(x),
                           abs_of(dy))};
}

/// Pool gradients with no backward call yet: all zero.
inline MosExpectedGrads no_mos_grads(const MosShape& s, std::int64_t n) {
  const MosGrads zero{HostMatrix(s.shards(), s.width_in()), HostMatrix(s.shards(), s.width_out()),
                      HostMatrix(n, s.d_in)};
  return {zero, zero};
}

/// The longest chain of accumulations behind any MoS result, bounded by the
/// sum of the dimensions (dB_pool: h over d_in, then over the n tokens; with
/// shards reached chunk by chunk, plus l partial sums), plus one addition per
/// backward call that adds into the same pool gradient.
inline std::int64_t mos_chain(const MosShape& s, std::int64_t n, std::int64_t calls = 1) {
  return n + s.d_in + s.d_out + s.r + s.l + calls;
}

/// The shards a list uses, each once.
inline std::set<std::int32_t> shard_set(const ShardList& list) {
  return std::set<std::int32_t>(list.begin(), list.end());
}

/// The value element `index` of A_pool gets from ShardPool::init(seed), in
/// double: U(±1/√d_in) from rankwise's counter-based generator on stream
/// substream(seed, 0) (the contract of Kernels::fill_uniform: element (i, j) is
/// uniform(seed, i · cols + j, lo, hi), the same bits on every backend). A
/// backend storing T rounds it to T: the CPU float pool holds (float) of this,
/// and the GPU must hold the same bits.
inline double expected_pool_init_a(const MosShape& s, std::uint64_t seed, std::int64_t index) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(s.d_in));
  return rankwise::uniform(rankwise::substream(seed, 0), static_cast<std::uint64_t>(index), -bound,
                           bound);
}

}  // namespace rwtest
