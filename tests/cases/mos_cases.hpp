// MoS (Mixture of Shards) test bodies, written once over a harness H
// (support/harness_*.hpp) and a storage type T, instantiated for every backend
// by RWTEST_MOS_TEST_CASES. Numeric checks are against the plain-loop double
// reference of support/mos_reference.hpp with the tolerances of
// support/mos_tolerance.hpp; every case prints its backend, type, shape, layer,
// path, index lists and seed on failure. No Eigen, no CUDA: the CUDA test
// includes this file too.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "rankwise/core/error.hpp"
#include "rankwise/core/shard_config.hpp"
#include "rankwise/core/shard_indices.hpp"
#include "rankwise/layers/lora.hpp"
#include "rankwise/layers/mos.hpp"
#include "rankwise/layers/shard_pool.hpp"
#include "support/compare.hpp"
#include "support/harness_common.hpp"
#include "support/mos_reference.hpp"
#include "support/mos_tolerance.hpp"
#include "support/reference.hpp"

namespace rwtest {
namespace mos_cases {

using rankwise::ErrorCode;
using rankwise::MatrixView;
using rankwise::MosConfig;
using rankwise::ShardIndices;
using rankwise::ShardPath;

template <class H, class T>
using PoolOf = rankwise::ShardPool<T, typename H::Backend>;
template <class H, class T>
using MosOf = rankwise::Mos<T, typename H::Backend>;

/// A pool shape, the layer that uses it, the tokens, and the strategy switches.
struct MosCase {
  const char* what;
  MosShape shape;
  std::int64_t layer = 0;
  std::int64_t n = 1;
  bool subset_selection = true;
  bool pair_dissociation = true;
};

inline std::ostream& operator<<(std::ostream& out, const MosCase& c) {
  return out << "\"" << c.what << "\" " << c.shape << ", layer " << c.layer << ", n " << c.n
             << ", subset_selection " << c.subset_selection << ", pair_dissociation "
             << c.pair_dissociation;
}

inline std::string list_str(const ShardList& list) {
  std::ostringstream out;
  out << "[";
  for (std::size_t i = 0; i < list.size(); ++i) out << (i ? " " : "") << list[i];
  out << "]";
  return out.str();
}

inline const char* path_name(ShardPath p) {
  switch (p) {
    case ShardPath::kAuto: return "kAuto";
    case ShardPath::kDirect: return "kDirect";
    case ShardPath::kAssembled: return "kAssembled";
  }
  return "?";
}

constexpr ShardPath kAllPaths[] = {ShardPath::kDirect, ShardPath::kAssembled, ShardPath::kAuto};

inline MosConfig config_for(const MosShape& s, std::uint64_t seed, bool subset = true,
                            bool pair = true, double alpha = 16.0) {
  MosConfig c;
  c.rank = s.r;
  c.alpha = alpha;
  c.subset_selection = subset;
  c.pair_dissociation = pair;
  c.seed = seed;
  return c;
}

inline MosConfig config_for(const MosCase& c, std::uint64_t seed) {
  return config_for(c.shape, seed, c.subset_selection, c.pair_dissociation);
}

/// alpha / r with config_for's alpha = 16.
inline double scale_of(const MosShape& s) { return 16.0 / static_cast<double>(s.r); }

/// The model's worst-case bounds (support/tolerance.hpp) with MoS's
/// parameters (support/mos_tolerance.hpp) for n tokens; `calls` backward calls
/// adding into the same pool gradient.
template <class T>
double forward_tolerance(const MosShape& s, std::int64_t n) {
  return worst_case_tolerance<T>(kMosForwardRoundings, mos_chain(s, n)).rel;
}
template <class T>
double backward_tolerance(const MosShape& s, std::int64_t n, std::int64_t calls = 1) {
  return worst_case_tolerance<T>(kMosBackwardRoundings + static_cast<int>(calls) - 1,
                                 mos_chain(s, n, calls))
      .rel;
}

/// Every strategy on and off, l = 1, 2, 4, p = 0, 1 (and p = v), shard widths
/// that are not multiples of 8, one token, many tokens (n = 64 and 100: past
/// the GPU's kAuto crossover), the first, a middle and the last layer.
//          shape: {d_in, d_out, L, v, p, l, r}
inline const std::vector<MosCase>& reference_cases() {
  static const std::vector<MosCase> cases = {
      {"l = 1, p = 0", {13, 9, 3, 4, 0, 1, 4}, 2, 5},
      {"l = 2, p = 1", {14, 22, 3, 4, 1, 2, 3}, 1, 17},
      {"l = 4, p = 1, one token", {36, 20, 2, 3, 1, 4, 4}, 1, 1},
      {"subset selection off, r > v", {26, 10, 4, 2, 0, 2, 5}, 3, 9, false, true},
      {"pair dissociation off", {30, 6, 2, 3, 1, 2, 2}, 0, 64, true, false},
      {"both off, l = 4", {20, 44, 3, 2, 0, 4, 2}, 1, 3, false, false},
      {"l = 1, p = 1, wide", {129, 65, 5, 2, 1, 1, 3}, 4, 40},
      {"only private shards (p = v = r)", {6, 4, 2, 2, 2, 2, 2}, 1, 2},
      {"many tokens, r > v", {66, 98, 4, 4, 1, 2, 6}, 2, 100},
      {"every public shard used", {132, 12, 2, 2, 0, 4, 4}, 0, 7},
  };
  return cases;
}

/// Pool contents, rounded to T: A shards like the init (U(±1/√d_in)), B shards
/// like trained ones (U(±1/√r)), so every intermediate is O(1).
struct PoolData {
  HostMatrix a;  // (M, d_in / l)
  HostMatrix b;  // (M, d_out / l)
};

template <class H, class T>
PoolData make_pool_data(const MosShape& s, std::uint64_t seed) {
  const double ra = 1.0 / std::sqrt(static_cast<double>(s.d_in));
  const double rb = 1.0 / std::sqrt(static_cast<double>(s.r));
  return {quantize<H, T>(random_matrix(s.shards(), s.width_in(), seed * 16 + 1, -ra, ra)),
          quantize<H, T>(random_matrix(s.shards(), s.width_out(), seed * 16 + 2, -rb, rb))};
}

/// n tokens of input, upstream gradient and the old contents of y and dx.
struct Batch {
  HostMatrix x, y0, dy, dx0;
};

template <class H, class T>
Batch make_batch(const MosShape& s, std::int64_t n, std::uint64_t seed) {
  return {quantize<H, T>(random_matrix(n, s.d_in, seed * 16 + 3)),
          quantize<H, T>(random_matrix(n, s.d_out, seed * 16 + 4)),
          quantize<H, T>(random_matrix(n, s.d_out, seed * 16 + 5)),
          quantize<H, T>(random_matrix(n, s.d_in, seed * 16 + 6))};
}

/// Writes `m` (rounded to T) into an existing contiguous view.
template <class H, class T>
void set_view(typename H::Ctx& ctx, const HostMatrix& m, MatrixView<T> dst) {
  REQUIRE(dst.rows == m.rows);
  REQUIRE(dst.cols == m.cols);
  std::vector<T> host(static_cast<std::size_t>(m.size()));
  for (std::size_t i = 0; i < host.size(); ++i) host[i] = H::template from_double<T>(m.v[i]);
  if (!dst.empty()) rankwise::Kernels<typename H::Backend, T>::upload(ctx, host.data(), dst);
}

template <class H, class T>
void load_pool(typename H::Ctx& ctx, PoolOf<H, T>& pool, const PoolData& d) {
  set_view<H, T>(ctx, d.a, pool.a());
  set_view<H, T>(ctx, d.b, pool.b());
}

template <class H, class T>
HostMatrix host_of(typename H::Ctx& ctx, MatrixView<T> v) {
  return to_host<H, T>(ctx, MatrixView<const T>(v));
}

template <class H, class T>
std::vector<T> bits_of(typename H::Ctx& ctx, MatrixView<T> v) {
  return to_host_raw<H, T>(ctx, MatrixView<const T>(v));
}

/// Exactly equal element by element (doubles widened from T compare exactly).
inline bool same_values(const HostMatrix& a, const HostMatrix& b) {
  return a.rows == b.rows && a.cols == b.cols && a.v == b.v;
}

/// Rows of a pool-shaped matrix no list names hold exactly 0.
inline bool unused_rows_zero(const HostMatrix& g, const ShardList& used) {
  const auto set = shard_set(used);
  for (std::int64_t i = 0; i < g.rows; ++i) {
    if (set.count(static_cast<std::int32_t>(i)) != 0) continue;
    for (std::int64_t e = 0; e < g.cols; ++e)
      if (g(i, e) != 0.0) return false;
  }
  return true;
}

/// y after forward on batch b (y held b.y0) against the reference.
template <class H, class T>
void check_forward(typename H::Ctx& ctx, const DeviceMatrix<H, T>& y, const MosShape& sh,
                   const PoolData& d, const ShardList& ia, const ShardList& ib, const Batch& b) {
  const MosExpected e = expect_mos_forward(sh, scale_of(sh), d.a, d.b, ia, ib, b.x, b.y0);
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, y), e.ref, e.mag, forward_tolerance<T>(sh, b.x.rows));
}

/// The pool gradients (zeroed before) and dx (held b.dx0) after one backward
/// on batch b, against the reference.
template <class H, class T>
void check_backward(typename H::Ctx& ctx, PoolOf<H, T>& pool, const DeviceMatrix<H, T>& dx,
                    const MosShape& sh, const PoolData& d, const ShardList& ia,
                    const ShardList& ib, const Batch& b) {
  const MosExpectedGrads g = expect_mos_backward(sh, scale_of(sh), d.a, d.b, ia, ib, b.x, b.dy);
  const double tol = backward_tolerance<T>(sh, b.x.rows);
  const MosExpected e_dx = g.dx_after(b.dx0);
  RWTEST_CHECK_CLOSE(host_of<H, T>(ctx, pool.grad_a()), g.da().ref, g.da().mag, tol);
  RWTEST_CHECK_CLOSE(host_of<H, T>(ctx, pool.grad_b()), g.db().ref, g.db().mag, tol);
  RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dx), e_dx.ref, e_dx.mag, tol);
}

#define RWTEST_MOS_LISTS_INFO(indices) \
  INFO("I_a " << list_str((indices).a) << ", I_b " << list_str((indices).b))

// ---------------------------------------------------------------------------

/// y += (alpha / r) Σ_j b_j (a_j · x) matches the reference for every case on
/// every path, with the lists the layer drew from its seed.
template <class H, class T>
void forward_matches_reference() {
  typename H::Ctx ctx;
  std::uint64_t seed = 1000;
  for (const MosCase& c : reference_cases()) {
    ++seed;
    const PoolData d = make_pool_data<H, T>(c.shape, seed);
    const Batch b = make_batch<H, T>(c.shape, c.n, seed);
    for (const ShardPath path : kAllPaths) {
      RWTEST_CONTEXT(H, T, c, seed);
      INFO("path " << path_name(path));
      PoolOf<H, T> pool(ctx, c.shape.pool_config());
      load_pool<H, T>(ctx, pool, d);
      MosOf<H, T> layer(pool, c.layer, config_for(c, seed), path);
      const ShardIndices& ix = layer.indices();
      RWTEST_MOS_LISTS_INFO(ix);
      const auto x = to_device<H, T>(ctx, b.x);
      auto y = to_device<H, T>(ctx, b.y0);
      layer.forward(x.cview(), y.view());
      const MosExpected e =
          expect_mos_forward(c.shape, scale_of(c.shape), d.a, d.b, ix.a, ix.b, b.x, b.y0);
      RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, y), e.ref, e.mag, forward_tolerance<T>(c.shape, c.n));
      // Forward reads the pool and writes nothing else.
      CHECK(same_values(host_of<H, T>(ctx, pool.a()), d.a));
      CHECK(same_values(host_of<H, T>(ctx, pool.b()), d.b));
    }
  }
}

/// Pool gradients and dx match the reference on every path: the first call
/// adds into zeroed gradients (unused shards stay exactly 0), a second call
/// adds again (2x), zero_grad clears, and dx receives += its part.
template <class H, class T>
void backward_matches_reference() {
  typename H::Ctx ctx;
  std::uint64_t seed = 2000;
  for (const MosCase& c : reference_cases()) {
    ++seed;
    const PoolData d = make_pool_data<H, T>(c.shape, seed);
    const Batch b = make_batch<H, T>(c.shape, c.n, seed);
    for (const ShardPath path : kAllPaths) {
      RWTEST_CONTEXT(H, T, c, seed);
      INFO("path " << path_name(path));
      PoolOf<H, T> pool(ctx, c.shape.pool_config());
      load_pool<H, T>(ctx, pool, d);
      MosOf<H, T> layer(pool, c.layer, config_for(c, seed), path);
      const ShardIndices& ix = layer.indices();
      RWTEST_MOS_LISTS_INFO(ix);
      const MosExpectedGrads g =
          expect_mos_backward(c.shape, scale_of(c.shape), d.a, d.b, ix.a, ix.b, b.x, b.dy);
      const double tol = backward_tolerance<T>(c.shape, c.n);

      const auto x = to_device<H, T>(ctx, b.x);
      const auto dy = to_device<H, T>(ctx, b.dy);
      auto dx = to_device<H, T>(ctx, b.dx0);
      layer.backward(x.cview(), dy.cview(), dx.view());
      const HostMatrix ga = host_of<H, T>(ctx, pool.grad_a());
      const HostMatrix gb = host_of<H, T>(ctx, pool.grad_b());
      RWTEST_CHECK_CLOSE(ga, g.da().ref, g.da().mag, tol);
      RWTEST_CHECK_CLOSE(gb, g.db().ref, g.db().mag, tol);
      const MosExpected e_dx = g.dx_after(b.dx0);
      RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dx), e_dx.ref, e_dx.mag, tol);
      CHECK(unused_rows_zero(ga, ix.a));
      CHECK(unused_rows_zero(gb, ix.b));

      // Always adds: a second call (no dx) doubles the gradients.
      layer.backward(x.cview(), dy.cview());
      const MosExpectedGrads twice = g.plus(g);
      const double tol2 = backward_tolerance<T>(c.shape, c.n, 2);
      RWTEST_CHECK_CLOSE(host_of<H, T>(ctx, pool.grad_a()), twice.da().ref, twice.da().mag, tol2);
      RWTEST_CHECK_CLOSE(host_of<H, T>(ctx, pool.grad_b()), twice.db().ref, twice.db().mag, tol2);

      pool.zero_grad();
      CHECK(same_values(host_of<H, T>(ctx, pool.grad_a()), HostMatrix(ga.rows, ga.cols)));
      CHECK(same_values(host_of<H, T>(ctx, pool.grad_b()), HostMatrix(gb.rows, gb.cols)));
    }
  }
}

/// Strided x, y, dy and dx (ld > cols) on both paths; padding untouched.
template <class H, class T>
void strided_views() {
  typename H::Ctx ctx;
  const MosCase c{"strided", {28, 18, 3, 3, 1, 2, 3}, 1, 11};
  std::uint64_t seed = 2500;
  for (const ShardPath path : kAllPaths) {
    ++seed;
    RWTEST_CONTEXT(H, T, c, seed);
    INFO("path " << path_name(path));
    const MosShape& sh = c.shape;
    const PoolData d = make_pool_data<H, T>(sh, seed);
    const Batch b = make_batch<H, T>(sh, c.n, seed);
    PoolOf<H, T> pool(ctx, sh.pool_config());
    load_pool<H, T>(ctx, pool, d);
    MosOf<H, T> layer(pool, c.layer, config_for(c, seed), path);
    const ShardIndices& ix = layer.indices();
    RWTEST_MOS_LISTS_INFO(ix);
    const double pad = -7.0;
    const auto x = to_device<H, T>(ctx, b.x, sh.d_in + 5, pad);
    auto y = to_device<H, T>(ctx, b.y0, sh.d_out + 3, pad);
    const auto dy = to_device<H, T>(ctx, b.dy, sh.d_out + 1, pad);
    auto dx = to_device<H, T>(ctx, b.dx0, sh.d_in + 2, pad);
    layer.forward(x.cview(), y.view());
    layer.backward(x.cview(), dy.cview(), dx.view());
    check_forward<H, T>(ctx, y, sh, d, ix.a, ix.b, b);
    check_backward<H, T>(ctx, pool, dx, sh, d, ix.a, ix.b, b);
    CHECK(padding_intact<H, T>(ctx, y, pad));
    CHECK(padding_intact<H, T>(ctx, dx, pad));
  }
}

/// N = 0 does nothing on any path (null views allowed); N = 1 matches the
/// reference on every path.
template <class H, class T>
void zero_and_one_token() {
  typename H::Ctx ctx;
  const MosShape sh{18, 10, 2, 3, 1, 2, 3};
  std::uint64_t seed = 3000;
  for (const ShardPath path : kAllPaths) {
    ++seed;
    RWTEST_CONTEXT(H, T, sh, seed);
    INFO("path " << path_name(path));
    const PoolData d = make_pool_data<H, T>(sh, seed);
    PoolOf<H, T> pool(ctx, sh.pool_config());
    load_pool<H, T>(ctx, pool, d);
    // Nonzero gradients, which N = 0 must leave alone.
    const HostMatrix ga0 = quantize<H, T>(random_matrix(sh.shards(), sh.width_in(), seed + 7));
    const HostMatrix gb0 = quantize<H, T>(random_matrix(sh.shards(), sh.width_out(), seed + 8));
    set_view<H, T>(ctx, ga0, pool.grad_a());
    set_view<H, T>(ctx, gb0, pool.grad_b());
    MosOf<H, T> layer(pool, 1, config_for(sh, seed), path);
    const ShardIndices& ix = layer.indices();
    RWTEST_MOS_LISTS_INFO(ix);

    DeviceMatrix<H, T> x0(0, sh.d_in), y0(0, sh.d_out), dy0(0, sh.d_out), dx0(0, sh.d_in);
    CHECK(x0.view().data == nullptr);  // empty views may be null
    CHECK_NOTHROW(layer.forward(x0.cview(), y0.view()));
    CHECK_NOTHROW(layer.backward(x0.cview(), dy0.cview(), dx0.view()));
    CHECK_NOTHROW(layer.backward(x0.cview(), dy0.cview()));
    CHECK(same_values(host_of<H, T>(ctx, pool.grad_a()), ga0));
    CHECK(same_values(host_of<H, T>(ctx, pool.grad_b()), gb0));
    CHECK(same_values(host_of<H, T>(ctx, pool.a()), d.a));

    pool.zero_grad();
    const Batch b = make_batch<H, T>(sh, 1, seed);
    const auto x = to_device<H, T>(ctx, b.x);
    auto y = to_device<H, T>(ctx, b.y0);
    const auto dy = to_device<H, T>(ctx, b.dy);
    auto dx = to_device<H, T>(ctx, b.dx0);
    layer.forward(x.cview(), y.view());
    layer.backward(x.cview(), dy.cview(), dx.view());
    check_forward<H, T>(ctx, y, sh, d, ix.a, ix.b, b);
    check_backward<H, T>(ctx, pool, dx, sh, d, ix.a, ix.b, b);
  }
}

/// kAuto takes the backend's crossover (TuningPolicy::prefer_assembled_shards(n));
/// explicit paths are kept whatever n; kAuto matches the reference on both
/// sides of the crossover (or at few and many tokens when there is none).
template <class H, class T>
void auto_path_follows_crossover() {
  typename H::Ctx ctx;
  const MosShape sh{12, 8, 2, 2, 1, 2, 2};
  const std::uint64_t seed = 3500;
  RWTEST_CONTEXT(H, T, sh, seed);
  const PoolData d = make_pool_data<H, T>(sh, seed);
  PoolOf<H, T> pool(ctx, sh.pool_config());
  load_pool<H, T>(ctx, pool, d);
  MosOf<H, T> automatic(pool, 0, config_for(sh, seed));  // kAuto is the default
  MosOf<H, T> direct(pool, 0, config_for(sh, seed), ShardPath::kDirect);
  MosOf<H, T> assembled(pool, 0, config_for(sh, seed), ShardPath::kAssembled);
  std::int64_t first_assembled = -1;  // stays -1 where the backend never assembles
  for (std::int64_t n = 0; n <= 4096; ++n) {
    const bool assemble = rankwise::TuningPolicy<typename H::Backend>::prefer_assembled_shards(n);
    CHECK(automatic.path_for(n) == (assemble ? ShardPath::kAssembled : ShardPath::kDirect));
    CHECK(direct.path_for(n) == ShardPath::kDirect);
    CHECK(assembled.path_for(n) == ShardPath::kAssembled);
    if (assemble && first_assembled < 0) first_assembled = n;
  }
  CAPTURE(first_assembled);
  const std::vector<std::int64_t> token_counts =
      first_assembled > 1 ? std::vector<std::int64_t>{first_assembled - 1, first_assembled}
                          : std::vector<std::int64_t>{1, 300};
  const ShardIndices& ix = automatic.indices();
  RWTEST_MOS_LISTS_INFO(ix);
  for (const std::int64_t n : token_counts) {
    INFO("n " << n << ", kAuto takes " << path_name(automatic.path_for(n)));
    pool.zero_grad();
    const Batch b = make_batch<H, T>(sh, n, seed + static_cast<std::uint64_t>(n));
    const auto x = to_device<H, T>(ctx, b.x);
    auto y = to_device<H, T>(ctx, b.y0);
    const auto dy = to_device<H, T>(ctx, b.dy);
    auto dx = to_device<H, T>(ctx, b.dx0);
    automatic.forward(x.cview(), y.view());
    automatic.backward(x.cview(), dy.cview(), dx.view());
    check_forward<H, T>(ctx, y, sh, d, ix.a, ix.b, b);
    check_backward<H, T>(ctx, pool, dx, sh, d, ix.a, ix.b, b);
  }
}

/// l = 1 and p = v = r: layer i's units are its own private rows [i r, (i + 1) r)
/// of the pools, and MoS is exactly LoRA with A = those rows of A_pool and
/// B = those rows of B_pool transposed. The assembled path runs LoRA's own
/// GEMMs, so it gives LoRA's bits; the direct path agrees within tolerance.
template <class H, class T>
void equals_lora_when_all_private() {
  typename H::Ctx ctx;
  const std::int64_t r = 4;
  const MosShape sh{19, 11, 3, r, r, 1, r};
  std::uint64_t seed = 4000;
  for (const std::int64_t n : {7, 70}) {
    for (std::int64_t i = 0; i < sh.num_layers; ++i) {
      ++seed;
      RWTEST_CONTEXT(H, T, sh, seed);
      INFO("layer " << i << ", n " << n);
      const PoolData d = make_pool_data<H, T>(sh, seed);
      const Batch b = make_batch<H, T>(sh, n, seed);
      HostMatrix a(r, sh.d_in), bt(r, sh.d_out);
      for (std::int64_t k = 0; k < r; ++k) {
        for (std::int64_t e = 0; e < sh.d_in; ++e) a(k, e) = d.a(i * r + k, e);
        for (std::int64_t e = 0; e < sh.d_out; ++e) bt(k, e) = d.b(i * r + k, e);
      }
      const HostMatrix b_peft = transpose(bt);

      rankwise::LoraConfig lc;
      lc.d_in = sh.d_in;
      lc.d_out = sh.d_out;
      lc.rank = r;
      lc.alpha = 16.0;
      rankwise::Lora<T, typename H::Backend> lora(ctx, lc);
      const auto da = to_device<H, T>(ctx, a);
      const auto db = to_device<H, T>(ctx, b_peft);
      lora.set_a(da.cview());
      lora.set_b(db.cview());
      const auto x = to_device<H, T>(ctx, b.x);
      const auto dy = to_device<H, T>(ctx, b.dy);
      auto y_lora = to_device<H, T>(ctx, b.y0);
      auto dx_lora = to_device<H, T>(ctx, b.dx0);
      lora.forward(x.cview(), y_lora.view());
      lora.backward(x.cview(), dy.cview(), dx_lora.view());
      const HostMatrix ga_lora = host_of<H, T>(ctx, lora.grad_a());
      const HostMatrix gbt_lora = host_of<H, T>(ctx, lora.grad_bt());

      for (const ShardPath path : kAllPaths) {
        INFO("path " << path_name(path));
        PoolOf<H, T> pool(ctx, sh.pool_config());
        load_pool<H, T>(ctx, pool, d);
        MosOf<H, T> mos(pool, i, config_for(sh, seed), path);
        RWTEST_MOS_LISTS_INFO(mos.indices());
        CHECK(mos.scale() == lora.scale());
        ShardList own(static_cast<std::size_t>(r));
        for (std::int64_t k = 0; k < r; ++k) own[static_cast<std::size_t>(k)] =
            static_cast<std::int32_t>(i * r + k);
        CHECK(mos.indices().a == own);
        CHECK(mos.indices().b == own);

        DeviceMatrix<H, T> a_out(r, sh.d_in), b_out(sh.d_out, r);
        mos.get_a(a_out.view());
        mos.get_b(b_out.view());
        CHECK(same_values(to_host<H, T>(ctx, a_out), a));
        CHECK(same_values(to_host<H, T>(ctx, b_out), b_peft));

        auto y = to_device<H, T>(ctx, b.y0);
        auto dx = to_device<H, T>(ctx, b.dx0);
        mos.forward(x.cview(), y.view());
        mos.backward(x.cview(), dy.cview(), dx.view());
        const HostMatrix ga = host_of<H, T>(ctx, pool.grad_a());
        const HostMatrix gb = host_of<H, T>(ctx, pool.grad_b());
        HostMatrix ga_own(r, sh.d_in), gbt_own(r, sh.d_out);
        for (std::int64_t k = 0; k < r; ++k) {
          for (std::int64_t e = 0; e < sh.d_in; ++e) ga_own(k, e) = ga(i * r + k, e);
          for (std::int64_t e = 0; e < sh.d_out; ++e) gbt_own(k, e) = gb(i * r + k, e);
        }
        CHECK(unused_rows_zero(ga, own));
        CHECK(unused_rows_zero(gb, own));
        if (mos.path_for(n) == ShardPath::kAssembled) {
          CHECK(first_bit_difference(to_host_raw<H, T>(ctx, y.cview()),
                                     to_host_raw<H, T>(ctx, y_lora.cview())) == -1);
          CHECK(first_bit_difference(to_host_raw<H, T>(ctx, dx.cview()),
                                     to_host_raw<H, T>(ctx, dx_lora.cview())) == -1);
          CHECK(same_values(ga_own, ga_lora));
          CHECK(same_values(gbt_own, gbt_lora));
        }
        // Otherwise MoS and LoRA are each within the bound of the exact
        // result, so within twice the bound of each other.
        const MosExpected e = expect_mos_forward(sh, scale_of(sh), d.a, d.b, own, own, b.x, b.y0);
        const MosExpectedGrads g =
            expect_mos_backward(sh, scale_of(sh), d.a, d.b, own, own, b.x, b.dy);
        HostMatrix mag_a(r, sh.d_in), mag_bt(r, sh.d_out);
        for (std::int64_t k = 0; k < r; ++k) {
          for (std::int64_t e2 = 0; e2 < sh.d_in; ++e2) mag_a(k, e2) = g.mag.da_pool(i * r + k, e2);
          for (std::int64_t e2 = 0; e2 < sh.d_out; ++e2) mag_bt(k, e2) = g.mag.db_pool(i * r + k, e2);
        }
        const double tol_f = 2 * forward_tolerance<T>(sh, n), tol_b = 2 * backward_tolerance<T>(sh, n);
        RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, y), to_host<H, T>(ctx, y_lora), e.mag, tol_f);
        RWTEST_CHECK_CLOSE(to_host<H, T>(ctx, dx), to_host<H, T>(ctx, dx_lora),
                           g.dx_after(b.dx0).mag, tol_b);
        RWTEST_CHECK_CLOSE(ga_own, ga_lora, mag_a, tol_b);
        RWTEST_CHECK_CLOSE(gbt_own, gbt_lora, mag_bt, tol_b);
        // And both match the reference.
        check_forward<H, T>(ctx, y, sh, d, own, own, b);
        check_backward<H, T>(ctx, pool, dx, sh, d, own, own, b);
      }
    }
  }
}

/// One pass of `layers` Mos layers over one pool: each layer forward and
/// backward on its own batch, gradients summed into the pool.
template <class T>
struct SharedRun {
  std::vector<std::vector<T>> y, dx;
  std::vector<T> grad_a, grad_b;
  std::vector<ShardIndices> indices;
};

template <class H, class T>
SharedRun<T> run_shared(typename H::Ctx& ctx, const MosShape& sh, const MosConfig& cfg,
                        const PoolData& d, const std::vector<Batch>& batches,
                        const std::vector<ShardPath>& paths,
                        const std::vector<ShardIndices>& given = {}) {
  PoolOf<H, T> pool(ctx, sh.pool_config());
  load_pool<H, T>(ctx, pool, d);
  SharedRun<T> out;
  for (std::size_t k = 0; k < batches.size(); ++k) {
    const auto i = static_cast<std::int64_t>(k);
    MosOf<H, T> layer = given.empty() ? MosOf<H, T>(pool, i, cfg, paths[k])
                                      : MosOf<H, T>(pool, i, cfg, given[k], paths[k]);
    const auto x = to_device<H, T>(ctx, batches[k].x);
    const auto dy = to_device<H, T>(ctx, batches[k].dy);
    auto y = to_device<H, T>(ctx, batches[k].y0);
    auto dx = to_device<H, T>(ctx, batches[k].dx0);
    layer.forward(x.cview(), y.view());
    layer.backward(x.cview(), dy.cview(), dx.view());
    out.y.push_back(to_host_raw<H, T>(ctx, y.cview()));
    out.dx.push_back(to_host_raw<H, T>(ctx, dx.cview()));
    out.indices.push_back(layer.indices());
  }
  out.grad_a = bits_of<H, T>(ctx, pool.grad_a());
  out.grad_b = bits_of<H, T>(ctx, pool.grad_b());
  return out;
}

template <class H, class T>
HostMatrix widen(const std::vector<T>& raw, std::int64_t rows, std::int64_t cols) {
  HostMatrix m(rows, cols);
  for (std::size_t i = 0; i < raw.size(); ++i) m.v[i] = H::to_double(raw[i]);
  return m;
}

/// Every layer of a type adds into the one pool: with L = 3 layers whose lists
/// overlap, the pool gradient after the three backward calls is the sum of
/// the three layers' separate reference gradients — on each path, with the
/// paths mixed, with drawn lists, with pure sharing (both strategies off) and
/// with lists that put one shard in all three layers. Two runs give the same
/// bits.
template <class H, class T>
void shared_shards_sum_gradients() {
  typename H::Ctx ctx;
  const MosShape sh{20, 12, 3, 2, 1, 2, 3};  // M = 12, P0 = 6, 4 public shards per list
  struct Variant {
    const char* what;
    bool subset, pair, given;
    std::vector<ShardPath> paths;
  };
  const std::vector<Variant> variants = {
      {"drawn, kDirect", true, true, false, {ShardPath::kDirect, ShardPath::kDirect, ShardPath::kDirect}},
      {"drawn, kAssembled", true, true, false,
       {ShardPath::kAssembled, ShardPath::kAssembled, ShardPath::kAssembled}},
      {"drawn, mixed paths", true, true, false,
       {ShardPath::kDirect, ShardPath::kAssembled, ShardPath::kAuto}},
      {"pure sharing (subset selection and pair dissociation off)", false, false, false,
       {ShardPath::kAssembled, ShardPath::kDirect, ShardPath::kDirect}},
      {"given lists, shard 3 in every layer", true, true, true,
       {ShardPath::kDirect, ShardPath::kAssembled, ShardPath::kDirect}},
  };
  // Layer i's private block is [6 + 2i, 8 + 2i).
  const std::vector<ShardIndices> given = {
      {{3, 0, 5, 1, 6, 7}, {3, 4, 2, 0, 6, 7}},
      {{1, 3, 2, 4, 8, 9}, {5, 3, 1, 0, 8, 9}},
      {{4, 5, 3, 0, 10, 11}, {0, 2, 3, 5, 10, 11}},
  };
  std::uint64_t seed = 5000;
  for (const Variant& v : variants) {
    ++seed;
    RWTEST_CONTEXT(H, T, sh, seed);
    INFO("variant \"" << v.what << "\"");
    const MosConfig cfg = config_for(sh, seed, v.subset, v.pair);
    const PoolData d = make_pool_data<H, T>(sh, seed);
    std::vector<Batch> batches;
    for (std::int64_t i = 0; i < sh.num_layers; ++i)
      batches.push_back(make_batch<H, T>(sh, 5 + 3 * i, seed * 4 + static_cast<std::uint64_t>(i)));
    const SharedRun<T> run =
        run_shared<H, T>(ctx, sh, cfg, d, batches, v.paths, v.given ? given : std::vector<ShardIndices>{});

    MosExpectedGrads sum = no_mos_grads(sh, 0);
    std::map<std::int32_t, int> users_a, users_b;  // shard -> layers using it
    std::int64_t tokens = 0;
    for (std::size_t k = 0; k < batches.size(); ++k) {
      const ShardIndices& ix = run.indices[k];
      INFO("layer " << k << ": I_a " << list_str(ix.a) << ", I_b " << list_str(ix.b));
      for (const auto sa : shard_set(ix.a)) ++users_a[sa];
      for (const auto sb : shard_set(ix.b)) ++users_b[sb];
      const Batch& b = batches[k];
      const std::int64_t n = b.x.rows;
      tokens += n;
      const MosExpectedGrads g =
          expect_mos_backward(sh, scale_of(sh), d.a, d.b, ix.a, ix.b, b.x, b.dy);
      sum = sum.plus(g);
      const MosExpected e = expect_mos_forward(sh, scale_of(sh), d.a, d.b, ix.a, ix.b, b.x, b.y0);
      RWTEST_CHECK_CLOSE(widen<H, T>(run.y[k], n, sh.d_out), e.ref, e.mag,
                         forward_tolerance<T>(sh, n));
      const MosExpected e_dx = g.dx_after(b.dx0);
      RWTEST_CHECK_CLOSE(widen<H, T>(run.dx[k], n, sh.d_in), e_dx.ref, e_dx.mag,
                         backward_tolerance<T>(sh, n));
    }
    // The point of the test: some shard really is used by several layers.
    int most_a = 0, most_b = 0;
    for (const auto& u : users_a) most_a = std::max(most_a, u.second);
    for (const auto& u : users_b) most_b = std::max(most_b, u.second);
    CAPTURE(most_a, most_b);
    REQUIRE(most_a >= 2);
    REQUIRE(most_b >= 2);
    if (v.given) {
      CHECK(most_a == 3);
      CHECK(most_b == 3);
    }
    // Each layer's chain is at most that of all tokens at once, plus one
    // addition per layer.
    const double tol = backward_tolerance<T>(sh, tokens, sh.num_layers);
    RWTEST_CHECK_CLOSE(widen<H, T>(run.grad_a, sh.shards(), sh.width_in()), sum.da().ref,
                       sum.da().mag, tol);
    RWTEST_CHECK_CLOSE(widen<H, T>(run.grad_b, sh.shards(), sh.width_out()), sum.db().ref,
                       sum.db().mag, tol);

    // Deterministic: a second run from scratch gives the same bits.
    const SharedRun<T> again =
        run_shared<H, T>(ctx, sh, cfg, d, batches, v.paths, v.given ? given : std::vector<ShardIndices>{});
    CHECK(first_bit_difference(again.grad_a, run.grad_a) == -1);
    CHECK(first_bit_difference(again.grad_b, run.grad_b) == -1);
    for (std::size_t k = 0; k < batches.size(); ++k) {
      CHECK(first_bit_difference(again.y[k], run.y[k]) == -1);
      CHECK(first_bit_difference(again.dx[k], run.dx[k]) == -1);
    }
  }
}

/// Lists given to the ShardIndices constructor are used exactly as given, in
/// their order, duplicates and other layers' private shards included.
template <class H, class T>
void given_lists_used_as_given() {
  typename H::Ctx ctx;
  const MosShape sh{12, 8, 3, 2, 1, 2, 3};  // M = 12, P0 = 6, private blocks [6,8) [8,10) [10,12)
  // Unit j's chunks are positions 2j and 2j + 1. I_a repeats shard 5 within
  // unit 1 and borrows layer 2's shard 11; I_b repeats shard 2 in chunk 0 of
  // units 0 and 2 and in chunk 1 of unit 0, and borrows layer 0's shard 7.
  const ShardIndices given{{11, 0, 5, 5, 9, 3}, {2, 2, 7, 0, 2, 1}};
  std::uint64_t seed = 6000;
  for (const ShardPath path : kAllPaths) {
    ++seed;
    RWTEST_CONTEXT(H, T, sh, seed);
    INFO("path " << path_name(path));
    RWTEST_MOS_LISTS_INFO(given);
    const PoolData d = make_pool_data<H, T>(sh, seed);
    PoolOf<H, T> pool(ctx, sh.pool_config());
    load_pool<H, T>(ctx, pool, d);
    MosOf<H, T> layer(pool, 1, config_for(sh, seed), given, path);
    CHECK(layer.indices().a == given.a);
    CHECK(layer.indices().b == given.b);
    CHECK(layer.layer() == 1);
    const Batch b = make_batch<H, T>(sh, 6, seed);
    const auto x = to_device<H, T>(ctx, b.x);
    auto y = to_device<H, T>(ctx, b.y0);
    const auto dy = to_device<H, T>(ctx, b.dy);
    auto dx = to_device<H, T>(ctx, b.dx0);
    layer.forward(x.cview(), y.view());
    layer.backward(x.cview(), dy.cview(), dx.view());
    check_forward<H, T>(ctx, y, sh, d, given.a, given.b, b);
    check_backward<H, T>(ctx, pool, dx, sh, d, given.a, given.b, b);
    CHECK(unused_rows_zero(host_of<H, T>(ctx, pool.grad_a()), given.a));
    CHECK(unused_rows_zero(host_of<H, T>(ctx, pool.grad_b()), given.b));
  }
}

/// get_a / get_b give the layer's A (r x d_in) and B (d_out x r) in PEFT
/// layout, assembled from the current pool: exactly the reference assembly,
/// and fresh after the pool changes (as after an optimiser step), as is the
/// assembled path's forward.
template <class H, class T>
void get_a_get_b_assemble() {
  typename H::Ctx ctx;
  std::uint64_t seed = 7000;
  for (const MosCase& c : reference_cases()) {
    ++seed;
    RWTEST_CONTEXT(H, T, c, seed);
    const MosShape& sh = c.shape;
    PoolOf<H, T> pool(ctx, sh.pool_config());
    const PoolData d = make_pool_data<H, T>(sh, seed);
    load_pool<H, T>(ctx, pool, d);
    MosOf<H, T> layer(pool, c.layer, config_for(c, seed), ShardPath::kAssembled);
    const ShardIndices& ix = layer.indices();
    RWTEST_MOS_LISTS_INFO(ix);
    DeviceMatrix<H, T> a(sh.r, sh.d_in), b(sh.d_out, sh.r);
    layer.get_a(a.view());
    layer.get_b(b.view());
    CHECK(same_values(to_host<H, T>(ctx, a), ref_mos_assemble_a(sh, d.a, ix.a)));
    CHECK(same_values(to_host<H, T>(ctx, b), ref_mos_assemble_b(sh, d.b, ix.b)));

    const Batch batch = make_batch<H, T>(sh, c.n, seed);
    const auto x = to_device<H, T>(ctx, batch.x);
    auto y = to_device<H, T>(ctx, batch.y0);
    layer.forward(x.cview(), y.view());  // assembles from the old pool
    check_forward<H, T>(ctx, y, sh, d, ix.a, ix.b, batch);

    const PoolData d2 = make_pool_data<H, T>(sh, seed + 100);
    load_pool<H, T>(ctx, pool, d2);
    layer.get_a(a.view());
    layer.get_b(b.view());
    CHECK(same_values(to_host<H, T>(ctx, a), ref_mos_assemble_a(sh, d2.a, ix.a)));
    CHECK(same_values(to_host<H, T>(ctx, b), ref_mos_assemble_b(sh, d2.b, ix.b)));
    auto y2 = to_device<H, T>(ctx, batch.y0);
    layer.forward(x.cview(), y2.view());
    check_forward<H, T>(ctx, y2, sh, d2, ix.a, ix.b, batch);
  }
}

/// ShardPool: allocation zeroes everything; init(seed) fills A_pool with
/// U(±1/√d_in) — the bits of the CPU float pool rounded to T, so every backend
/// and type agrees — and B_pool with 0; parameters and counts.
template <class H, class T>
void pool_init_and_parameters() {
  typename H::Ctx ctx;
  const MosShape sh{30, 14, 4, 3, 1, 2, 3};
  const std::uint64_t seed = 8000;
  RWTEST_CONTEXT(H, T, sh, seed);
  const std::int64_t m = sh.shards(), wi = sh.width_in(), wo = sh.width_out();
  PoolOf<H, T> pool(ctx, sh.pool_config());
  CHECK(same_values(host_of<H, T>(ctx, pool.a()), HostMatrix(m, wi)));
  CHECK(same_values(host_of<H, T>(ctx, pool.b()), HostMatrix(m, wo)));
  CHECK(same_values(host_of<H, T>(ctx, pool.grad_a()), HostMatrix(m, wi)));
  CHECK(same_values(host_of<H, T>(ctx, pool.grad_b()), HostMatrix(m, wo)));

  load_pool<H, T>(ctx, pool, make_pool_data<H, T>(sh, 1));  // nonzero B, which init clears
  pool.init(seed);
  const std::vector<T> a_bits = bits_of<H, T>(ctx, pool.a());
  std::vector<T> expected(a_bits.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const double u = expected_pool_init_a(sh, seed, static_cast<std::int64_t>(i));
    // double stores u itself; every other type the CPU float's value rounded.
    expected[i] = std::is_same<T, double>::value
                      ? H::template from_double<T>(u)
                      : H::template from_double<T>(static_cast<double>(static_cast<float>(u)));
  }
  const std::int64_t diff = first_bit_difference(a_bits, expected);
  CAPTURE(diff);
  CHECK(diff == -1);
  CHECK(same_values(host_of<H, T>(ctx, pool.b()), HostMatrix(m, wo)));

  const HostMatrix a = host_of<H, T>(ctx, pool.a());
  const double bound = 1.0 / std::sqrt(static_cast<double>(sh.d_in));
  const double bound_t = H::to_double(H::template from_double<T>(bound));
  double lo = bound, hi = -bound, mean = 0.0;
  for (double v : a.v) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    mean += v / static_cast<double>(a.v.size());
  }
  CAPTURE(bound, lo, hi, mean);
  CHECK(lo >= -bound_t);
  CHECK(hi <= bound_t);
  CHECK(lo < -0.9 * bound);  // 360 draws span the interval
  CHECK(hi > 0.9 * bound);
  CHECK(std::abs(mean) < 0.1 * bound);  // sd of the mean ≈ 0.03 bound

  PoolOf<H, T> same(ctx, sh.pool_config());
  same.init(seed);
  CHECK(first_bit_difference(bits_of<H, T>(ctx, same.a()), a_bits) == -1);
  PoolOf<H, T> other(ctx, sh.pool_config());
  other.init(seed + 1);
  const std::vector<T> other_bits = bits_of<H, T>(ctx, other.a());
  int equal = 0;
  for (std::size_t i = 0; i < a_bits.size(); ++i)
    equal += std::memcmp(&a_bits[i], &other_bits[i], sizeof(T)) == 0 ? 1 : 0;
  CAPTURE(equal);
  CHECK(equal * 10 < static_cast<int>(a_bits.size()));

  // Counts: a rank-v LoRA's parameters in every layer.
  CHECK(pool.num_parameters() == sh.v * sh.num_layers * (sh.d_in + sh.d_out));
  CHECK(pool.equivalent_rank() == sh.v);
  CHECK(pool.config().num_shards() == m);
  const auto params = pool.parameters();
  REQUIRE(params.size() == 2);
  CHECK(std::string(params[0].name) == "shards_A");
  CHECK(std::string(params[1].name) == "shards_B");
  CHECK(params[0].value.data == pool.a().data);
  CHECK(params[0].grad.data == pool.grad_a().data);
  CHECK(params[1].value.data == pool.b().data);
  CHECK(params[1].grad.data == pool.grad_b().data);
  CHECK(params[0].value.rows == m);
  CHECK(params[0].value.cols == wi);
  CHECK(params[1].value.rows == m);
  CHECK(params[1].value.cols == wo);
  std::int64_t total = 0;
  for (const auto& prm : params) {
    CHECK(prm.grad.rows == prm.value.rows);
    CHECK(prm.grad.cols == prm.value.cols);
    CHECK(prm.value.space == H::Backend::kMemorySpace);
    total += prm.value.size();
  }
  CHECK(total == pool.num_parameters());

  // A pool whose L layers each use r = v ranks has v · L · (d_in + d_out)
  // parameters, the same as L rank-v LoRA layers.
  rankwise::LoraConfig lc;
  lc.d_in = sh.d_in;
  lc.d_out = sh.d_out;
  lc.rank = sh.v;
  rankwise::Lora<T, typename H::Backend> lora(ctx, lc);
  CHECK(pool.num_parameters() == sh.num_layers * lora.num_parameters());
}

/// Every invalid argument throws rankwise::error naming the problem, before
/// any work: y, dx and the pool gradients are untouched.
template <class H, class T>
void rejects_bad_input() {
  typename H::Ctx ctx;
  const MosShape sh{16, 8, 3, 3, 1, 2, 3};  // M = 18, P0 = 12
  const std::uint64_t seed = 9000;
  RWTEST_CONTEXT(H, T, sh, seed);
  const auto inv = ErrorCode::kInvalidArgument;
  const auto pc = sh.pool_config();

  // Pool configurations.
  {
    auto bad = pc;
    bad.d_in = 15;  // not divisible by l = 2
    RWTEST_CHECK_ERROR(inv, "divisible by shards_per_vector", PoolOf<H, T>(ctx, bad));
    bad = pc;
    bad.d_out = 9;
    RWTEST_CHECK_ERROR(inv, "divisible by shards_per_vector", PoolOf<H, T>(ctx, bad));
    bad = pc;
    bad.private_rank = 4;  // p > v = 3
    RWTEST_CHECK_ERROR(inv, "private_rank (p) = 4 must be in [0, v = 3]", PoolOf<H, T>(ctx, bad));
    bad = pc;
    bad.shards_per_vector = 0;
    RWTEST_CHECK_ERROR(inv, "shards_per_vector (l) must be positive", PoolOf<H, T>(ctx, bad));
    bad = pc;
    bad.num_layers = 0;
    RWTEST_CHECK_ERROR(inv, "num_layers (L) must be positive", PoolOf<H, T>(ctx, bad));
  }

  PoolOf<H, T> pool(ctx, pc);
  const PoolData d = make_pool_data<H, T>(sh, seed);
  load_pool<H, T>(ctx, pool, d);
  const MosConfig cfg = config_for(sh, seed);
  const ShardIndices good = rankwise::draw_shard_indices(pc, cfg, 1);

  // Layer and rank against the pool, through both constructors.
  RWTEST_CHECK_ERROR(inv, "layer 3 is outside [0, L = 3)", MosOf<H, T>(pool, 3, cfg));
  RWTEST_CHECK_ERROR(inv, "layer 3 is outside [0, L = 3)", MosOf<H, T>(pool, 3, cfg, good));
  RWTEST_CHECK_ERROR(inv, "layer -1 is outside [0, L = 3)", MosOf<H, T>(pool, -1, cfg));
  {
    MosConfig big = cfg;
    big.rank = 8;  // r − p = 7 public ranks need 14 public shards; P0 = 12
    RWTEST_CHECK_ERROR(inv, "need 14 public shards, but the pool has only P0", MosOf<H, T>(pool, 0, big));
    ShardIndices long_lists{ShardList(16, 0), ShardList(16, 0)};
    RWTEST_CHECK_ERROR(inv, "need 14 public shards, but the pool has only P0",
                       MosOf<H, T>(pool, 0, big, long_lists));
    MosConfig small = cfg;
    small.rank = 0;
    RWTEST_CHECK_ERROR(inv, "rank (r) must be positive", MosOf<H, T>(pool, 0, small));
    // r < p cannot hold the private block.
    auto p2 = pc;
    p2.private_rank = 2;
    PoolOf<H, T> pool2(ctx, p2);
    MosConfig r1 = cfg;
    r1.rank = 1;
    RWTEST_CHECK_ERROR(inv, "must be at least the pool's private_rank (p) = 2", MosOf<H, T>(pool2, 0, r1));
    MosConfig nan_alpha = cfg;
    nan_alpha.alpha = std::nan("");
    RWTEST_CHECK_ERROR(inv, "alpha must be finite", MosOf<H, T>(pool, 0, nan_alpha));
  }

  // Index lists: range and length, naming the list and the position.
  {
    ShardIndices ix = good;
    ix.a[2] = 18;  // M = 18
    RWTEST_CHECK_ERROR(inv, "I_a[2] = 18 is outside the pool's [0, M = 18)",
                       MosOf<H, T>(pool, 1, cfg, ix));
    ix = good;
    ix.b[5] = -1;
    RWTEST_CHECK_ERROR(inv, "I_b[5] = -1 is outside the pool's [0, M = 18)",
                       MosOf<H, T>(pool, 1, cfg, ix));
    ix = good;
    ix.a.pop_back();
    RWTEST_CHECK_ERROR(inv, "shard indices I_a: expected r", MosOf<H, T>(pool, 1, cfg, ix));
    RWTEST_CHECK_ERROR(inv, "entries, got 5", MosOf<H, T>(pool, 1, cfg, ix));
    ix = good;
    ix.b.push_back(0);
    RWTEST_CHECK_ERROR(inv, "entries, got 7", MosOf<H, T>(pool, 1, cfg, ix));
    RWTEST_CHECK_ERROR(inv, "shard indices I_b", MosOf<H, T>(pool, 1, cfg, ix));
    ix = good;
    ix.a.clear();
    RWTEST_CHECK_ERROR(inv, "entries, got 0", MosOf<H, T>(pool, 1, cfg, ix));
  }

  // Shapes of x, y, dy, dx and of get_a / get_b's outputs; nothing changes.
  for (const ShardPath path : kAllPaths) {
    INFO("path " << path_name(path));
    MosOf<H, T> layer(pool, 1, cfg, path);
    const std::int64_t n = 5;
    const Batch b = make_batch<H, T>(sh, n, seed);
    const HostMatrix ga0 = quantize<H, T>(random_matrix(sh.shards(), sh.width_in(), seed + 1));
    const HostMatrix gb0 = quantize<H, T>(random_matrix(sh.shards(), sh.width_out(), seed + 2));
    set_view<H, T>(ctx, ga0, pool.grad_a());
    set_view<H, T>(ctx, gb0, pool.grad_b());
    const auto x = to_device<H, T>(ctx, b.x);
    auto y = to_device<H, T>(ctx, b.y0);
    const auto dy = to_device<H, T>(ctx, b.dy);
    auto dx = to_device<H, T>(ctx, b.dx0);
    DeviceMatrix<H, T> x_wide(n, sh.d_in + 2), y_short(n - 1, sh.d_out), y_wide(n, sh.d_out + 2),
        dy_short(n - 1, sh.d_out), dx_wide(n, sh.d_in + 2), dx_short(n - 1, sh.d_in);
    RWTEST_CHECK_ERROR(inv, "x (n x d_in): expected shape", layer.forward(x_wide.cview(), y.view()));
    RWTEST_CHECK_ERROR(inv, "y (n x d_out): expected shape (5 x 8), got (4 x 8)",
                       layer.forward(x.cview(), y_short.view()));
    RWTEST_CHECK_ERROR(inv, "y (n x d_out): expected shape (5 x 8), got (5 x 10)",
                       layer.forward(x.cview(), y_wide.view()));
    RWTEST_CHECK_ERROR(inv, "x (n x d_in): expected shape",
                       layer.backward(x_wide.cview(), dy.cview(), dx.view()));
    RWTEST_CHECK_ERROR(inv, "dy (n x d_out): expected shape (5 x 8), got (4 x 8)",
                       layer.backward(x.cview(), dy_short.cview(), dx.view()));
    RWTEST_CHECK_ERROR(inv, "dx (n x d_in): expected shape (5 x 16), got (5 x 18)",
                       layer.backward(x.cview(), dy.cview(), dx_wide.view()));
    RWTEST_CHECK_ERROR(inv, "dx (n x d_in): expected shape (5 x 16), got (4 x 16)",
                       layer.backward(x.cview(), dy.cview(), dx_short.view()));
    // Views in the other memory space.
    const MatrixView<const T> x_foreign(x.cview().data, n, sh.d_in, foreign_space<H>());
    const MatrixView<T> y_foreign(y.view().data, n, sh.d_out, foreign_space<H>());
    RWTEST_CHECK_ERROR(ErrorCode::kMemorySpace, "x (n x d_in): expected",
                       layer.forward(x_foreign, y.view()));
    RWTEST_CHECK_ERROR(ErrorCode::kMemorySpace, "y (n x d_out): expected",
                       layer.forward(x.cview(), y_foreign));
    RWTEST_CHECK_ERROR(ErrorCode::kMemorySpace, "x (n x d_in): expected",
                       layer.backward(x_foreign, dy.cview()));

    DeviceMatrix<H, T> a_bad(sh.r, sh.d_in + 1), b_bad(sh.r, sh.d_out);  // B must be (d_out x r)
    RWTEST_CHECK_ERROR(inv, "A (r x d_in): expected shape", layer.get_a(a_bad.view()));
    RWTEST_CHECK_ERROR(inv, "B (d_out x r): expected shape (8 x 3), got (3 x 8)",
                       layer.get_b(b_bad.view()));

    CHECK(same_values(to_host<H, T>(ctx, y), b.y0));
    CHECK(same_values(to_host<H, T>(ctx, dx), b.dx0));
    CHECK(same_values(host_of<H, T>(ctx, pool.grad_a()), ga0));
    CHECK(same_values(host_of<H, T>(ctx, pool.grad_b()), gb0));
    CHECK(same_values(host_of<H, T>(ctx, pool.a()), d.a));
    CHECK(same_values(host_of<H, T>(ctx, pool.b()), d.b));
  }
}

/// The stateless ops (layers/mos_ops.hpp) on caller-owned memory give the
/// layer's bits on each path, with a workspace of exactly
/// mos_*_workspace_bytes (one byte less is refused, naming the op); the sizes
/// are the blocks the plan carves. CPU: shard indices outside [0, M) and a
/// pattern that is not its list by chunk are refused before any work.
template <class H, class T>
void stateless_ops_match_layer() {
  using Backend = typename H::Backend;
  using Acc = rankwise::accumulator_t<T>;
  // Function pointers: template arguments would split the REQUIRE_THROWS_WITH macro.
  const auto forward_op = rankwise::mos_forward<Backend, T>;
  const auto backward_op = rankwise::mos_backward<Backend, T>;
  typename H::Ctx ctx;
  std::uint64_t seed = 9000;
  for (const MosCase& c : reference_cases()) {
    for (const ShardPath path : {ShardPath::kDirect, ShardPath::kAssembled}) {
      ++seed;
      RWTEST_CONTEXT(H, T, c, seed);
      INFO("path " << path_name(path));
      const MosShape& sh = c.shape;
      const rankwise::ShardPoolConfig pc = sh.pool_config();
      const MosConfig cfg = config_for(c, seed);
      const PoolData d = make_pool_data<H, T>(sh, seed);
      const Batch b = make_batch<H, T>(sh, c.n, seed);
      const auto x = to_device<H, T>(ctx, b.x);
      const auto dy = to_device<H, T>(ctx, b.dy);

      PoolOf<H, T> pool_layer(ctx, pc), pool_ops(ctx, pc);
      load_pool<H, T>(ctx, pool_layer, d);
      load_pool<H, T>(ctx, pool_ops, d);
      MosOf<H, T> layer(pool_layer, c.layer, cfg, path);
      RWTEST_MOS_LISTS_INFO(layer.indices());
      auto y_layer = to_device<H, T>(ctx, b.y0);
      auto dx_layer = to_device<H, T>(ctx, b.dx0);
      layer.forward(x.cview(), y_layer.view());
      layer.backward(x.cview(), dy.cview(), dx_layer.view());

      const rankwise::MosTableBuffers<Backend> buffers(ctx, pc, cfg, layer.indices());
      const rankwise::MosTables tables = buffers.tables();
      const MatrixView<const T> a_shards = pool_ops.a(), b_shards = pool_ops.b();
      const std::size_t fwd_bytes =
          rankwise::mos_forward_workspace_bytes<Backend, T>(pc, cfg, c.n, path);
      const std::size_t bwd_bytes =
          rankwise::mos_backward_workspace_bytes<Backend, T>(pc, cfg, c.n, path);
      const std::size_t asm_bytes = rankwise::mos_assemble_workspace_bytes<Backend, T>(pc, cfg);
      auto block = [](std::int64_t rows, std::int64_t cols, std::size_t size) {
        return (static_cast<std::size_t>(rows * cols) * size + 255) / 256 * 256;
      };
      const std::int64_t r = sh.r, q = sh.r * sh.l;
      const std::size_t assembled = block(r, sh.d_in, sizeof(T)) + block(r, sh.d_out, sizeof(T)) +
                                    block(q, 1, sizeof(Acc));
      CHECK(asm_bytes == assembled);
      if (path == ShardPath::kDirect) {
        CHECK(fwd_bytes == block(c.n, r, sizeof(Acc)));
        CHECK(bwd_bytes == 2 * block(c.n, r, sizeof(Acc)));
      } else {
        CHECK(fwd_bytes == assembled + block(c.n, r, sizeof(T)));
        CHECK(bwd_bytes == assembled + 2 * block(c.n, r, sizeof(T)) +
                               block(r, sh.d_in, sizeof(T)) + block(r, sh.d_out, sizeof(T)));
      }

      rankwise::detail::OwnedWorkspace<Backend> ws;
      ws.reserve(std::max({fwd_bytes, bwd_bytes, asm_bytes}));
      auto y_ops = to_device<H, T>(ctx, b.y0);
      auto dx_ops = to_device<H, T>(ctx, b.dx0);
      REQUIRE_THROWS_WITH(forward_op(ctx, pc, cfg, a_shards, b_shards,
                                                            tables, x.cview(), y_ops.view(), path,
                                                            ws.data(), fwd_bytes - 1),
                          Catch::Contains("mos_forward: workspace of") &&
                              Catch::Contains("is too small"));
      REQUIRE_THROWS_WITH(
          backward_op(ctx, pc, cfg, a_shards, b_shards, tables, x.cview(),
                                             dy.cview(), dx_ops.view(), pool_ops.grad_a(),
                                             pool_ops.grad_b(), path, ws.data(), bwd_bytes - 1),
          Catch::Contains("mos_backward: workspace of") && Catch::Contains("is too small"));
      forward_op(ctx, pc, cfg, a_shards, b_shards, tables, x.cview(),
                                        y_ops.view(), path, ws.data(), fwd_bytes);
      backward_op(ctx, pc, cfg, a_shards, b_shards, tables, x.cview(),
                                         dy.cview(), dx_ops.view(), pool_ops.grad_a(),
                                         pool_ops.grad_b(), path, ws.data(), bwd_bytes);
      CHECK(first_bit_difference(to_host_raw<H, T>(ctx, y_ops.cview()),
                                 to_host_raw<H, T>(ctx, y_layer.cview())) == -1);
      CHECK(first_bit_difference(to_host_raw<H, T>(ctx, dx_ops.cview()),
                                 to_host_raw<H, T>(ctx, dx_layer.cview())) == -1);
      CHECK(first_bit_difference(bits_of<H, T>(ctx, pool_ops.grad_a()),
                                 bits_of<H, T>(ctx, pool_layer.grad_a())) == -1);
      CHECK(first_bit_difference(bits_of<H, T>(ctx, pool_ops.grad_b()),
                                 bits_of<H, T>(ctx, pool_layer.grad_b())) == -1);
      check_forward<H, T>(ctx, y_ops, sh, d, layer.indices().a, layer.indices().b, b);

      DeviceMatrix<H, T> a_out(sh.r, sh.d_in), b_out(sh.d_out, sh.r);
      rankwise::mos_assemble<Backend, T>(ctx, pc, cfg, a_shards, b_shards, tables, a_out.view(),
                                         b_out.view(), ws.data(), asm_bytes);
      CHECK(same_values(to_host<H, T>(ctx, a_out), ref_mos_assemble_a(sh, d.a, layer.indices().a)));
      CHECK(same_values(to_host<H, T>(ctx, b_out), ref_mos_assemble_b(sh, d.b, layer.indices().b)));

      if constexpr (Backend::kMemorySpace == rankwise::MemorySpace::kHost) {
        // Tables a caller got wrong: on the CPU, refused before any work.
        std::vector<std::int32_t> list(layer.indices().a);
        std::vector<std::int32_t> pattern = rankwise::shard_chunk_pattern(list, sh.r, sh.l);
        const auto space = Backend::kMemorySpace;
        rankwise::MosTables bad = tables;
        const std::int32_t saved = list.back();
        list.back() = static_cast<std::int32_t>(sh.shards());
        bad.list_a = MatrixView<const std::int32_t>(list.data(), 1, q, space);
        REQUIRE_THROWS_WITH(
            forward_op(ctx, pc, cfg, a_shards, b_shards, bad, x.cview(),
                                              y_ops.view(), path, ws.data(), fwd_bytes),
            Catch::Contains("mos_forward") && Catch::Contains("list_a") &&
                Catch::Contains("outside [0, M = " + std::to_string(sh.shards()) + ")"));
        list.back() = saved;
        if (q > 1) {
          std::swap(pattern[0], pattern[static_cast<std::size_t>(q - 1)]);
          if (pattern[0] != pattern[static_cast<std::size_t>(q - 1)]) {
            bad.pattern_a = MatrixView<const std::int32_t>(pattern.data(), sh.l, sh.r, space);
            REQUIRE_THROWS_WITH(
                backward_op(ctx, pc, cfg, a_shards, b_shards, bad,
                                                   x.cview(), dy.cview(), dx_ops.view(),
                                                   pool_ops.grad_a(), pool_ops.grad_b(), path,
                                                   ws.data(), bwd_bytes),
                Catch::Contains("mos_backward: pattern_a[0][0]") &&
                    Catch::Contains("differs from its list's entry"));
          }
        }
        // The workspace may not be y.
        MatrixView<T> y_in_ws(static_cast<T*>(ws.data()), c.n, sh.d_out, space);
        REQUIRE_THROWS_WITH(
            forward_op(ctx, pc, cfg, a_shards, b_shards, tables, x.cview(),
                                              y_in_ws, path, ws.data(), ws.bytes()),
            Catch::Contains("mos_forward: y (n x d_out)") && Catch::Contains("overlaps"));
      }
    }
  }
}

}  // namespace mos_cases
}  // namespace rwtest

/// Instantiates every MoS case for HARNESS and the storage types that follow,
/// tagged TAG (e.g. "[cpu]"): the same bodies on every backend.
#define RWTEST_MOS_TEST_CASES(HARNESS, TAG, ...)                                                 \
  TEMPLATE_TEST_CASE("mos: forward matches the double reference", "[mos]" TAG, __VA_ARGS__) {   \
    ::rwtest::mos_cases::forward_matches_reference<HARNESS, TestType>();                         \
  }                                                                                              \
  TEMPLATE_TEST_CASE("mos: backward matches the double reference", "[mos]" TAG, __VA_ARGS__) {  \
    ::rwtest::mos_cases::backward_matches_reference<HARNESS, TestType>();                        \
  }                                                                                              \
  TEMPLATE_TEST_CASE("mos: strided views", "[mos]" TAG, __VA_ARGS__) {                           \
    ::rwtest::mos_cases::strided_views<HARNESS, TestType>();                                     \
  }                                                                                              \
  TEMPLATE_TEST_CASE("mos: zero and one token", "[mos]" TAG, __VA_ARGS__) {                      \
    ::rwtest::mos_cases::zero_and_one_token<HARNESS, TestType>();                                \
  }                                                                                              \
  TEMPLATE_TEST_CASE("mos: kAuto follows the backend's crossover", "[mos]" TAG, __VA_ARGS__) {   \
    ::rwtest::mos_cases::auto_path_follows_crossover<HARNESS, TestType>();                       \
  }                                                                                              \
  TEMPLATE_TEST_CASE("mos: l = 1, p = v = r is LoRA", "[mos][lora]" TAG, __VA_ARGS__) {         \
    ::rwtest::mos_cases::equals_lora_when_all_private<HARNESS, TestType>();                      \
  }                                                                                              \
  TEMPLATE_TEST_CASE("mos: layers sharing shards sum their gradients", "[mos][determinism]" TAG, \
                     __VA_ARGS__) {                                                              \
    ::rwtest::mos_cases::shared_shards_sum_gradients<HARNESS, TestType>();                       \
  }                                                                                              \
  TEMPLATE_TEST_CASE("mos: given index lists are used as given", "[mos][indices]" TAG,          \
                     __VA_ARGS__) {                                                              \
    ::rwtest::mos_cases::given_lists_used_as_given<HARNESS, TestType>();                         \
  }                                                                                              \
  TEMPLATE_TEST_CASE("mos: get_a and get_b assemble from the pool", "[mos]" TAG, __VA_ARGS__) {  \
    ::rwtest::mos_cases::get_a_get_b_assemble<HARNESS, TestType>();                              \
  }                                                                                              \
  TEMPLATE_TEST_CASE("mos: shard pool init and parameters", "[mos][init]" TAG, __VA_ARGS__) {    \
    ::rwtest::mos_cases::pool_init_and_parameters<HARNESS, TestType>();                          \
  }                                                                                              \
  TEMPLATE_TEST_CASE("mos: rejects bad input", "[mos][errors]" TAG, __VA_ARGS__) {               \
    ::rwtest::mos_cases::rejects_bad_input<HARNESS, TestType>();                                 \
  }                                                                                              \
  TEMPLATE_TEST_CASE("mos: stateless ops on caller memory", "[mos][ops]" TAG, __VA_ARGS__) {     \
    ::rwtest::mos_cases::stateless_ops_match_layer<HARNESS, TestType>();                         \
  }
