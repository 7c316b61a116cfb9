// Small-batch products of the CPU backend: the shapes of a LoRA delta when one
// side of the product is a handful of tokens. Each weight row is streamed from
// memory once for all tokens, the tokens held in cache and register-blocked,
// where a general GEMM packs the weights first and is tuned for large blocks.
//
// Every output element is computed by one fixed sequence of operations that
// does not depend on the tile it falls in or on how the output is split into
// tasks (column splits stay multiples of kColumnAlign): any thread count gives
// the same bits.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace rankwise {
namespace detail {
namespace small_batch {

template <class T>
using Packet = typename Eigen::internal::packet_traits<T>::type;
template <class T>
constexpr std::int64_t kLanes = Eigen::internal::unpacket_traits<Packet<T>>::size;

/// Column splits of rows_axpy are multiples of this many elements, so a
/// column's vector-or-scalar path never depends on the split.
template <class T>
constexpr std::int64_t kColumnAlign = 2 * kLanes<T>;

// R rows of a against C rows of b: acc[i][j] = Σ_p a_i[p] b_j[p], over whole
// packets, then a scalar tail; out[i][j] = alpha * acc + beta * out.
template <int R, int C, class T>
inline void dot_tile(T alpha, const T* const* a, const T* const* b, std::int64_t k, T beta,
                     T* const* out, std::int64_t out_stride) {
  using namespace Eigen::internal;
  using P = Packet<T>;
  constexpr std::int64_t L = kLanes<T>;
  P acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) acc[i][j] = pset1<P>(T(0));
  const std::int64_t whole = k / L * L;
  for (std::int64_t p = 0; p < whole; p += L) {
    P bp[C];
    for (int j = 0; j < C; ++j) bp[j] = ploadu<P>(b[j] + p);
    for (int i = 0; i < R; ++i) {
      const P ap = ploadu<P>(a[i] + p);
      for (int j = 0; j < C; ++j) acc[i][j] = pmadd(ap, bp[j], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < C; ++j) {
      T s = predux(acc[i][j]);
      for (std::int64_t p = whole; p < k; ++p) s += a[i][p] * b[j][p];
      T& o = out[i][j * out_stride];
      o = beta == T(0) ? alpha * s : alpha * s + beta * o;
    }
  }
}

/// c (m x n) = alpha * a bᵀ + beta * c for the rows j in [j_begin, j_end) of b:
/// a (m x k) tokens, b (n x k) weight rows; all row-major with leading
/// dimensions. Each row of b is read once per four tokens, from cache after
/// the first: tiles of 4 tokens x 2 weight rows, the last tokens 1 x 4.
template <class T>
void rows_dot(T alpha, const T* a, std::int64_t lda, const T* b, std::int64_t ldb, std::int64_t m,
              std::int64_t k, T beta, T* c, std::int64_t ldc, std::int64_t j_begin,
              std::int64_t j_end) {
  constexpr int kRows = 4;
  const std::int64_t blocked = m / kRows * kRows;
  auto sweep = [&](auto rows_tag, auto cols_tag, std::int64_t i_begin, std::int64_t i_end) {
    constexpr int R = decltype(rows_tag)::value;
    constexpr int C = decltype(cols_tag)::value;
    std::int64_t j = j_begin;
    auto tile = [&](auto width_tag) {
      constexpr int Cw = decltype(width_tag)::value;
      const T* bj[Cw];
      for (int t = 0; t < Cw; ++t) bj[t] = b + (j + t) * ldb;
      for (std::int64_t i = i_begin; i < i_end; i += R) {
        const T* ai[R];
        T* ci[R];
        for (int t = 0; t < R; ++t) {
          ai[t] = a + (i + t) * lda;
          ci[t] = c + (i + t) * ldc + j;
        }
        dot_tile<R, Cw>(alpha, ai, bj, k, beta, ci, 1);
      }
    };
    for (; j + C <= j_end; j += C) tile(std::integral_constant<int, C>{});
    for (; j < j_end; ++j) tile(std::integral_constant<int, 1>{});
  };
  sweep(std::integral_constant<int, kRows>{}, std::integral_constant<int, 2>{}, 0, blocked);
  sweep(std::integral_constant<int, 1>{}, std::integral_constant<int, 4>{}, blocked, m);
}

// R output rows, W packets wide: out_i = beta * out_i + Σ_p (alpha coef(i, p)) b_p,
// b_p the p-th row of a panel W packets wide, ldb apart. out is read before
// the products, not after: rows of c a multiple of 4 KiB apart would make each
// load wait on the previous row's store (4K aliasing).
template <int R, int W, class T>
inline void axpy_tile(T alpha, const T* coef, std::int64_t coef_row, std::int64_t coef_step,
                      const T* b, std::int64_t ldb, std::int64_t k, T beta, T* const* out) {
  using namespace Eigen::internal;
  using P = Packet<T>;
  constexpr std::int64_t L = kLanes<T>;
  P acc[R][W];
  const P pb = pset1<P>(beta);
  for (int i = 0; i < R; ++i)
    for (int w = 0; w < W; ++w)
      acc[i][w] = beta == T(0) ? pset1<P>(T(0)) : pmul(pb, ploadu<P>(out[i] + w * L));
  for (std::int64_t p = 0; p < k; ++p) {
    P bp[W];
    for (int w = 0; w < W; ++w) bp[w] = ploadu<P>(b + p * ldb + w * L);
    for (int i = 0; i < R; ++i) {
      const P ci = pset1<P>(alpha * coef[i * coef_row + p * coef_step]);
      for (int w = 0; w < W; ++w) acc[i][w] = pmadd(ci, bp[w], acc[i][w]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int w = 0; w < W; ++w) pstoreu(out[i] + w * L, acc[i][w]);
}

// The scalar columns past the last whole packet, in the same order per element.
template <class T>
inline void axpy_scalar(T alpha, const T* coef, std::int64_t coef_step, const T* b,
                        std::int64_t ldb, std::int64_t k, T beta, T* out) {
  T s = beta == T(0) ? T(0) : beta * *out;
  for (std::int64_t p = 0; p < k; ++p) s += (alpha * coef[p * coef_step]) * b[p * ldb];
  *out = s;
}

// y[q] = start(y + q) + c0 r0[q] + c1 r1[q] + c2 r2[q] + c3 r3[q] over whole
// packets of [lo, hi), multiply-adds in row order: the four-rows pass of
// stream_axpy and gathered_axpy.
template <class T, class Start>
inline void four_row_pass(const Packet<T> (&coef)[4], const T* const (&rows)[4], T* y,
                          std::int64_t lo, std::int64_t hi, Start&& start) {
  using namespace Eigen::internal;
  using P = Packet<T>;
  constexpr std::int64_t L = kLanes<T>;
  for (std::int64_t q = lo; q < hi; q += L) {
    P acc = start(y + q);
    acc = pmadd(coef[0], ploadu<P>(rows[0] + q), acc);
    acc = pmadd(coef[1], ploadu<P>(rows[1] + q), acc);
    acc = pmadd(coef[2], ploadu<P>(rows[2] + q), acc);
    acc = pmadd(coef[3], ploadu<P>(rows[3] + q), acc);
    pstoreu(y + q, acc);
  }
}

// c's panel: at most this many elements of c (32 KiB of float, L1) and at
// most kPanelCols columns, so each row of b is read in long contiguous runs.
constexpr std::int64_t kPanelElements = 8192;
constexpr std::int64_t kPanelCols = 1024;

// c = beta * c + alpha * coef b over the whole packets [col_begin, vector_end):
// for each panel of c's columns, every row of b is streamed contiguously (what
// the prefetchers follow best; b is often in DRAM) into the panel, four rows
// of b per pass over c, which stays in L1. Per element: beta * c, then one
// multiply-add per row of b in order, so the same bits for any split.
template <class T>
void stream_axpy(T alpha, const T* coef, std::int64_t coef_row, std::int64_t coef_step, const T* b,
                 std::int64_t ldb, std::int64_t m, std::int64_t k, T beta, T* c, std::int64_t ldc,
                 std::int64_t col_begin, std::int64_t vector_end) {
  using namespace Eigen::internal;
  using P = Packet<T>;
  constexpr std::int64_t L = kLanes<T>;
  const std::int64_t rows = std::max<std::int64_t>(m, 1);
  const std::int64_t panel = std::max(L, std::min(kPanelCols, kPanelElements / rows) / L * L);
  const P pb = pset1<P>(beta);
  for (std::int64_t col0 = col_begin; col0 < vector_end; col0 += panel) {
    const std::int64_t end = std::min(vector_end, col0 + panel);
    // The first pass starts from beta * c instead of loading a stored one.
    bool first = true;
    auto start = [&](const T* ci) {
      if (!first) return ploadu<P>(ci);
      return beta == T(0) ? pset1<P>(T(0)) : pmul(pb, ploadu<P>(ci));
    };
    if (k == 0) {
      for (std::int64_t i = 0; i < m; ++i)
        for (std::int64_t q = col0; q < end; q += L)
          pstoreu(c + i * ldc + q, start(c + i * ldc + q));
      continue;
    }
    // Four rows of b per pass over c: c is loaded and stored a quarter as often.
    std::int64_t p = 0;
    for (; p + 4 <= k; p += 4) {
      const T* const rows[4] = {b + p * ldb, b + (p + 1) * ldb, b + (p + 2) * ldb,
                                b + (p + 3) * ldb};
      for (std::int64_t i = 0; i < m; ++i) {
        const T* ai = coef + i * coef_row + p * coef_step;
        const P cs[4] = {pset1<P>(alpha * ai[0]), pset1<P>(alpha * ai[coef_step]),
                         pset1<P>(alpha * ai[2 * coef_step]), pset1<P>(alpha * ai[3 * coef_step])};
        four_row_pass<T>(cs, rows, c + i * ldc, col0, end, start);
      }
      first = false;
    }
    for (; p < k; ++p) {
      const T* bp = b + p * ldb;
      for (std::int64_t i = 0; i < m; ++i) {
        const P cp = pset1<P>(alpha * coef[i * coef_row + p * coef_step]);
        T* ci = c + i * ldc;
        for (std::int64_t q = col0; q < end; q += L)
          pstoreu(ci + q, pmadd(cp, ploadu<P>(bp + q), start(ci + q)));
      }
      first = false;
    }
  }
}

// Many rows of c (a gradient dBᵀ = s Hᵀ dY over a few tokens): b in panels
// copied to a contiguous buffer (b's rows are often a multiple of 4 KiB
// apart, which would put a panel's rows in one L1 set), then tiles of 4 rows
// of c x 2 packets accumulated in registers over all k, written once. The
// same operations per element as stream_axpy.
template <class T>
void tiled_axpy(T alpha, const T* coef, std::int64_t coef_row, std::int64_t coef_step, const T* b,
                std::int64_t ldb, std::int64_t m, std::int64_t k, T beta, T* c, std::int64_t ldc,
                std::int64_t col_begin, std::int64_t vector_end) {
  using namespace Eigen::internal;
  using P = Packet<T>;
  constexpr std::int64_t L = kLanes<T>;
  constexpr int kRows = 4;
  constexpr int kWidth = 2;  // packets
  constexpr std::int64_t kTile = kWidth * L;
  constexpr std::int64_t kBuffer = 4096;  // elements: 16 KiB of float
  alignas(64) T panel[kBuffer];
  const bool pack = k * kTile <= kBuffer;
  const std::int64_t panel_cols = pack ? kBuffer / k / kTile * kTile : kTile;
  for (std::int64_t col0 = col_begin; col0 < vector_end; col0 += panel_cols) {
    const std::int64_t width = std::min(panel_cols, vector_end - col0);  // a multiple of L
    const T* bp = b + col0;
    std::int64_t ldp = ldb;
    if (pack) {
      for (std::int64_t p = 0; p < k; ++p)
        for (std::int64_t q = 0; q < width; q += L)
          pstore(panel + p * width + q, ploadu<P>(b + p * ldb + col0 + q));
      bp = panel;
      ldp = width;
    }
    auto row_block = [&](std::int64_t i, auto rows_tag) {
      constexpr int R = decltype(rows_tag)::value;
      T* ci[R];
      const T* coef_i = coef + i * coef_row;
      std::int64_t q = 0;
      for (; q + kTile <= width; q += kTile) {
        for (int t = 0; t < R; ++t) ci[t] = c + (i + t) * ldc + col0 + q;
        axpy_tile<R, kWidth>(alpha, coef_i, coef_row, coef_step, bp + q, ldp, k, beta, ci);
      }
      for (; q < width; q += L) {
        for (int t = 0; t < R; ++t) ci[t] = c + (i + t) * ldc + col0 + q;
        axpy_tile<R, 1>(alpha, coef_i, coef_row, coef_step, bp + q, ldp, k, beta, ci);
      }
    };
    std::int64_t i = 0;
    for (; i + kRows <= m; i += kRows) row_block(i, std::integral_constant<int, kRows>{});
    for (; i < m; ++i) row_block(i, std::integral_constant<int, 1>{});
  }
}

/// Rows of c up to which rows_axpy streams b (more: tiles).
constexpr std::int64_t kStreamRows = 16;

/// c (m x n) = beta * c + alpha * coef b for the columns [col_begin, col_end):
/// coef (m x k) read as coef[i * coef_row + p * coef_step] (a matrix or its
/// transpose), b (k x n) row-major. b is read once (stream_axpy, or
/// tiled_axpy for more than kStreamRows rows of c), the columns past the last
/// whole packet one by one. col_begin must be a
/// multiple of kColumnAlign<T>.
template <class T>
void rows_axpy(T alpha, const T* coef, std::int64_t coef_row, std::int64_t coef_step, const T* b,
               std::int64_t ldb, std::int64_t m, std::int64_t k, T beta, T* c, std::int64_t ldc,
               std::int64_t col_begin, std::int64_t col_end) {
  constexpr std::int64_t L = kLanes<T>;
  const std::int64_t vector_end = col_begin + (col_end - col_begin) / L * L;
  if (m <= kStreamRows)
    stream_axpy(alpha, coef, coef_row, coef_step, b, ldb, m, k, beta, c, ldc, col_begin,
                vector_end);
  else
    tiled_axpy(alpha, coef, coef_row, coef_step, b, ldb, m, k, beta, c, ldc, col_begin, vector_end);
  for (std::int64_t col = vector_end; col < col_end; ++col) {
    for (std::int64_t i = 0; i < m; ++i)
      axpy_scalar(alpha, coef + i * coef_row, coef_step, b + col, ldb, k, beta, c + i * ldc + col);
  }
}

/// The gathered form of rows_dot for one token: out[j * out_stride] =
/// alpha * x · rows[j] + beta * out[...] for j < count, four rows at a time
/// (four streams from memory at once), by the same operations per element
/// as rows_dot.
template <class T>
void gathered_dots(T alpha, const T* x, const T* const* rows, std::int64_t count, std::int64_t k,
                   T beta, T* out, std::int64_t out_stride) {
  const T* xs[1] = {x};
  std::int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    T* o[1] = {out + j * out_stride};
    dot_tile<1, 4>(alpha, xs, rows + j, k, beta, o, out_stride);
  }
  for (; j < count; ++j) {
    T* o[1] = {out + j * out_stride};
    dot_tile<1, 1>(alpha, xs, rows + j, k, beta, o, out_stride);
  }
}

/// The gathered form of rows_axpy for one token: y += Σ_j coef[j] rows[j]
/// (coef already scaled), four rows per pass over a 4 KiB panel of y, which
/// stays in L1; per element one multiply-add per row in order, whole packets,
/// then scalars past the last one.
template <class T>
void gathered_axpy(const T* coef, const T* const* rows, std::int64_t count, std::int64_t n, T* y) {
  using namespace Eigen::internal;
  using P = Packet<T>;
  constexpr std::int64_t L = kLanes<T>;
  const std::int64_t vector_end = n / L * L;
  for (std::int64_t col0 = 0; col0 < vector_end; col0 += kPanelCols) {
    const std::int64_t end = std::min(vector_end, col0 + kPanelCols);
    std::int64_t j = 0;
    for (; j + 4 <= count; j += 4) {
      const P cs[4] = {pset1<P>(coef[j]), pset1<P>(coef[j + 1]), pset1<P>(coef[j + 2]),
                       pset1<P>(coef[j + 3])};
      const T* const four[4] = {rows[j], rows[j + 1], rows[j + 2], rows[j + 3]};
      four_row_pass<T>(cs, four, y, col0, end, [](const T* yq) { return ploadu<P>(yq); });
    }
    for (; j < count; ++j) {
      const P cj = pset1<P>(coef[j]);
      for (std::int64_t q = col0; q < end; q += L)
        pstoreu(y + q, pmadd(cj, ploadu<P>(rows[j] + q), ploadu<P>(y + q)));
    }
  }
  for (std::int64_t q = vector_end; q < n; ++q)
    for (std::int64_t j = 0; j < count; ++j) y[q] += coef[j] * rows[j][q];
}

/// dst[q] += a * src[q] for q in [lo, hi): whole packets from lo, then
/// scalars. With lo a multiple of the packet width (0 or a split point), an
/// element's path depends on its column only, never on the split.
template <class T>
inline void axpy_span(T a, const T* src, T* dst, std::int64_t lo, std::int64_t hi) {
  using namespace Eigen::internal;
  using P = Packet<T>;
  constexpr std::int64_t L = kLanes<T>;
  const P pa = pset1<P>(a);
  std::int64_t q = lo;
  for (; q + L <= hi; q += L)
    pstoreu(dst + q, padd(ploadu<P>(dst + q), pmul(pa, ploadu<P>(src + q))));
  for (; q < hi; ++q) dst[q] += a * src[q];
}

}  // namespace small_batch
}  // namespace detail
}  // namespace rankwise
