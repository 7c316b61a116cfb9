// Ground truth for the SMoRA tests: the rank-expert router (scores, top-k
// selection, gates, counts, balance step, Switch aux loss) and the SMoRA
// forward and backward as plain loops in double, written from the method's
// definition and not from rankwise/core/routing.hpp, so a bug in the shared
// per-token rule cannot hide behind the reference. No Eigen, no CUDA.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "rankwise/core/router_config.hpp"
#include "support/reference.hpp"

namespace rwtest {

using rankwise::GateNormalization;
using rankwise::RouterConfig;
using rankwise::ScoreFunction;

/// Per-token mask on the host: empty = every token is real, else 1 = real.
using HostMask = std::vector<std::uint8_t>;

inline bool token_counts(const HostMask& mask, std::int64_t n) {
  return mask.empty() || mask[static_cast<std::size_t>(n)] != 0;
}

/// The routing of n tokens as the method defines it. Top-k picks "choices":
/// experts of g ranks (C = E), or single ranks with a per-rank bias (C = r).
struct RefRouting {
  std::int64_t n = 0, num_experts = 0, per_token = 0, top_k = 0, group = 1;
  std::int64_t num_choices = 0;      // C
  HostMatrix logits;                 // (n, E)
  HostMatrix scores;                 // (n, E)   s0
  HostMatrix z;                      // (n, C)   s0 of the choice's expert + b
  std::vector<std::int32_t> experts; // (n, k/g | k) choices, best first, ties to the lower index
  std::vector<std::int32_t> units;   // (n, k)   choice t's ranks at [t u, (t + 1) u)
  HostMatrix gates;                  // (n, k)
  HostMatrix expert_gate;            // (n, C)   gate of choice c's ranks, 0 when not selected
  std::vector<std::int32_t> counts;  // (C)      assignments over unmasked tokens
  /// Per token, the smallest gap between consecutive z in the sorted order over
  /// the positions that decide the selection and its order (t = 0 .. k/g, the
  /// first unselected included). A backend computing in float reproduces the
  /// selection exactly when every margin is well above its rounding error.
  std::vector<double> margin;        // (n)

  std::int32_t expert(std::int64_t i, std::int64_t t) const {
    return experts[static_cast<std::size_t>(i * per_token + t)];
  }
  double min_margin() const {
    double m = std::numeric_limits<double>::infinity();
    for (double v : margin) m = std::min(m, v);
    return m;
  }
};

/// The expert whose score choice c carries.
inline std::int64_t ref_expert_of(const RouterConfig& cfg, std::int64_t c) {
  return cfg.bias_per_rank ? c / cfg.group_size : c;
}

/// The gate normaliser: the selected sum with its magnitude kept at least ε
/// and its sign kept (a negative sum must not flip the gates' signs).
inline double ref_normaliser(double sum, double epsilon) {
  if (sum >= 0.0) return std::max(sum, epsilon);
  return std::min(sum, -epsilon);
}

/// s0 of one row of logits.
inline std::vector<double> ref_scores(ScoreFunction score, const double* logits, std::int64_t e) {
  std::vector<double> s(static_cast<std::size_t>(e));
  if (score == ScoreFunction::kSigmoid) {
    for (std::int64_t i = 0; i < e; ++i) s[i] = 1.0 / (1.0 + std::exp(-logits[i]));
    return s;
  }
  double top = logits[0];
  for (std::int64_t i = 1; i < e; ++i) top = std::max(top, logits[i]);
  double total = 0.0;
  for (std::int64_t i = 0; i < e; ++i) total += (s[i] = std::exp(logits[i] - top));
  for (double& v : s) v /= total;
  return s;
}

/// Routes n tokens from given logits (n, E). bias: C values or empty (zero).
inline RefRouting ref_route_logits(const RouterConfig& cfg, const HostMatrix& logits,
                                   const std::vector<double>& bias, const HostMask& mask = {}) {
  RefRouting r;
  const std::int64_t E = cfg.num_experts(), C = cfg.num_choices(), kc = cfg.choices_per_token(),
                     u = cfg.units_per_choice();
  r.n = logits.rows;
  r.num_experts = E;
  r.num_choices = C;
  r.per_token = kc;
  r.top_k = cfg.top_k;
  r.group = u;
  r.logits = logits;
  r.scores = HostMatrix(r.n, E);
  r.z = HostMatrix(r.n, C);
  r.experts.assign(static_cast<std::size_t>(r.n * kc), -1);
  r.units.assign(static_cast<std::size_t>(r.n * cfg.top_k), -1);
  r.gates = HostMatrix(r.n, cfg.top_k);
  r.expert_gate = HostMatrix(r.n, C);
  r.counts.assign(static_cast<std::size_t>(C), 0);
  r.margin.assign(static_cast<std::size_t>(r.n), std::numeric_limits<double>::infinity());
  const double numerator =
      cfg.normalization == GateNormalization::kSumToK ? static_cast<double>(cfg.top_k) : 1.0;
  for (std::int64_t n = 0; n < r.n; ++n) {
    const std::vector<double> s = ref_scores(cfg.score, &logits.v[n * E], E);
    std::vector<std::int32_t> order(static_cast<std::size_t>(C));
    std::iota(order.begin(), order.end(), 0);
    for (std::int64_t e = 0; e < E; ++e) r.scores(n, e) = s[e];
    for (std::int64_t c = 0; c < C; ++c) {
      r.z(n, c) = s[ref_expert_of(cfg, c)] + (bias.empty() ? 0.0 : bias[c]);
    }
    // A stable sort by z descending keeps equal z in index order: ties go low.
    std::stable_sort(order.begin(), order.end(),
                     [&](std::int32_t p, std::int32_t q) { return r.z(n, p) > r.z(n, q); });
    for (std::int64_t t = 0; t < kc && t + 1 < C; ++t) {
      r.margin[n] = std::min(r.margin[n], r.z(n, order[t]) - r.z(n, order[t + 1]));
    }
    double sum_v = 0.0;
    std::vector<double> v(static_cast<std::size_t>(kc));
    for (std::int64_t t = 0; t < kc; ++t) {
      const std::int32_t c = order[t];
      r.experts[n * kc + t] = c;
      v[t] = cfg.gate_uses_bias ? r.z(n, c) : r.scores(n, ref_expert_of(cfg, c));
      sum_v += v[t];
    }
    const double denom =
        ref_normaliser(static_cast<double>(u) * sum_v, static_cast<double>(cfg.epsilon));
    for (std::int64_t t = 0; t < kc; ++t) {
      const std::int32_t c = order[t];
      const double gate =
          cfg.normalization == GateNormalization::kNone ? v[t] : numerator * v[t] / denom;
      r.expert_gate(n, c) = gate;
      for (std::int64_t q = 0; q < u; ++q) {
        r.units[n * cfg.top_k + t * u + q] = static_cast<std::int32_t>(c * u + q);
        r.gates(n, t * u + q) = gate;
      }
      if (token_counts(mask, n)) ++r.counts[c];
    }
  }
  return r;
}

/// logits = x wrᵀ, then as ref_route_logits. x (n, d_in), wr (E, d_in).
inline RefRouting ref_route(const RouterConfig& cfg, const HostMatrix& x, const HostMatrix& wr,
                            const std::vector<double>& bias, const HostMask& mask = {}) {
  return ref_route_logits(cfg, ref_gemm(1.0, x, Op::kNoTrans, wr, Op::kTrans, 0.0,
                                        HostMatrix(x.rows, wr.rows)),
                          bias, mask);
}

/// y0 + s Σ_j gate[n][j] b_u (a_u · x_n), u = units[n][j]; b in PEFT layout (d_out, r).
inline HostMatrix ref_rank_units_forward(double s, const HostMatrix& x, const HostMatrix& a,
                                         const HostMatrix& b, const std::vector<std::int32_t>& units,
                                         const HostMatrix& gates, const HostMatrix& y0) {
  HostMatrix y = y0;
  const std::int64_t k = gates.cols;
  for (std::int64_t n = 0; n < x.rows; ++n) {
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t u = units[n * k + j];
      double h = 0.0;
      for (std::int64_t i = 0; i < x.cols; ++i) h += a(u, i) * x(n, i);
      for (std::int64_t o = 0; o < b.rows; ++o) y(n, o) += s * gates(n, j) * h * b(o, u);
    }
  }
  return y;
}

/// Gradients of the rank-unit products (b in PEFT layout).
struct RankUnitGrads {
  HostMatrix da;      // (r, d_in)
  HostMatrix db;      // (d_out, r)
  HostMatrix dx;      // (n, d_in) through A only
  HostMatrix dgates;  // (n, k)
};

inline RankUnitGrads ref_rank_units_backward(double s, const HostMatrix& x, const HostMatrix& a,
                                             const HostMatrix& b,
                                             const std::vector<std::int32_t>& units,
                                             const HostMatrix& gates, const HostMatrix& dy) {
  const std::int64_t k = gates.cols;
  RankUnitGrads g{HostMatrix(a.rows, a.cols), HostMatrix(b.rows, b.cols),
                  HostMatrix(x.rows, x.cols), HostMatrix(x.rows, k)};
  for (std::int64_t n = 0; n < x.rows; ++n) {
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int32_t u = units[n * k + j];
      double h = 0.0, p = 0.0;  // a_u · x_n, b_u · dy_n
      for (std::int64_t i = 0; i < x.cols; ++i) h += a(u, i) * x(n, i);
      for (std::int64_t o = 0; o < b.rows; ++o) p += b(o, u) * dy(n, o);
      const double gate = gates(n, j);
      g.dgates(n, j) = s * p * h;
      for (std::int64_t i = 0; i < x.cols; ++i) {
        g.da(u, i) += s * gate * p * x(n, i);
        g.dx(n, i) += s * gate * p * a(u, i);
      }
      for (std::int64_t o = 0; o < b.rows; ++o) g.db(o, u) += s * gate * h * dy(n, o);
    }
  }
  return g;
}

/// ∂L/∂s0[n][e] of the Switch auxiliary loss coef · E · Σ_e f_e P_e, with the
/// shares f_e = c_e / (N k/g) held constant (they are piecewise constant):
/// coef · E · f_e / N for unmasked tokens, 0 for masked ones.
inline HostMatrix ref_aux_dscores(const RouterConfig& cfg, const RefRouting& r,
                                  const HostMask& mask, double coef) {
  const std::int64_t E = cfg.num_experts();
  HostMatrix d(r.n, E);
  std::int64_t tokens = 0;
  for (std::int64_t n = 0; n < r.n; ++n) tokens += token_counts(mask, n) ? 1 : 0;
  if (tokens == 0 || coef == 0.0) return d;
  for (std::int64_t n = 0; n < r.n; ++n) {
    if (!token_counts(mask, n)) continue;
    for (std::int64_t e = 0; e < E; ++e) {
      const double f = static_cast<double>(r.counts[e]) /
                       (static_cast<double>(tokens) * static_cast<double>(cfg.experts_per_token()));
      d(n, e) = coef * static_cast<double>(E) * f / static_cast<double>(tokens);
    }
  }
  return d;
}

/// The Switch auxiliary loss value coef · E · Σ_e f_e P_e, counts taken from
/// `counts_from` (the routing whose shares are held fixed) and P_e from `r`.
inline double ref_aux_loss(const RouterConfig& cfg, const RefRouting& counts_from,
                           const RefRouting& r, const HostMask& mask, double coef) {
  const std::int64_t E = cfg.num_experts();
  std::int64_t tokens = 0;
  for (std::int64_t n = 0; n < r.n; ++n) tokens += token_counts(mask, n) ? 1 : 0;
  if (tokens == 0) return 0.0;
  double loss = 0.0;
  for (std::int64_t e = 0; e < E; ++e) {
    double p = 0.0;
    for (std::int64_t n = 0; n < r.n; ++n) p += token_counts(mask, n) ? r.scores(n, e) : 0.0;
    p /= static_cast<double>(tokens);
    const double f = static_cast<double>(counts_from.counts[e]) /
                     (static_cast<double>(tokens) * static_cast<double>(cfg.experts_per_token()));
    loss += f * p;
  }
  return coef * static_cast<double>(E) * loss;
}

/// ∂L/∂logits (n, E) of the router given ∂L/∂gates (n, k), through the gate
/// normalisation's full Jacobian over the selected experts and the score
/// function's Jacobian; `extra_dscores` (n, E or empty) is added to ∂L/∂s0.
/// The routing `r` must hold the z (s0 + bias) of the forward that ran.
///
/// With `magnitude`, every term enters by its absolute value, the Jacobians'
/// parts included (c/S and c v g/S² separately: they cancel exactly when one
/// expert per token makes the gate constant): fed |dgates| (or their
/// magnitudes) this gives the sum of |terms| behind each ∂L/∂logit, the scale
/// its rounding error is proportional to.
inline HostMatrix ref_router_backward(const RouterConfig& cfg, const RefRouting& r,
                                      const HostMatrix& dgates, const HostMatrix& extra_dscores,
                                      bool magnitude = false, HostMatrix* dbias = nullptr) {
  auto term = [magnitude](double v) { return magnitude ? std::abs(v) : v; };
  const std::int64_t E = cfg.num_experts(), C = cfg.num_choices(), kc = cfg.choices_per_token(),
                     u = cfg.units_per_choice();
  const double c =
      cfg.normalization == GateNormalization::kSumToK ? static_cast<double>(cfg.top_k) : 1.0;
  HostMatrix dlogits(r.n, E);
  if (dbias != nullptr) *dbias = HostMatrix(1, C);
  for (std::int64_t n = 0; n < r.n; ++n) {
    std::vector<double> ds(static_cast<std::size_t>(E), 0.0);
    if (extra_dscores.size() > 0)
      for (std::int64_t e = 0; e < E; ++e) ds[e] = term(extra_dscores(n, e));
    std::vector<double> v(static_cast<std::size_t>(kc)), d(static_cast<std::size_t>(kc), 0.0);
    double sum_v = 0.0;
    for (std::int64_t t = 0; t < kc; ++t) {
      const std::int32_t ch = r.expert(n, t);
      v[t] = cfg.gate_uses_bias ? r.z(n, ch) : r.scores(n, ref_expert_of(cfg, ch));
      sum_v += v[t];
      for (std::int64_t q = 0; q < u; ++q) d[t] += term(dgates(n, t * u + q));
    }
    const double S = static_cast<double>(u) * sum_v;
    const double eps = static_cast<double>(cfg.epsilon);
    const double S_used = ref_normaliser(S, eps);
    const bool clamped = S_used != S || std::abs(S) <= eps;
    for (std::int64_t w = 0; w < kc; ++w) {  // ∂L/∂v_w = Σ_t D_t ∂gate_t/∂v_w
      double dv = 0.0;
      for (std::int64_t t = 0; t < kc; ++t) {
        const double diag = t == w ? 1.0 : 0.0;
        double jac;
        if (cfg.normalization == GateNormalization::kNone) jac = diag;
        else if (clamped) jac = diag * c / S_used;
        else if (magnitude) jac = c * (diag / std::abs(S) + std::abs(v[t]) * u / (S * S));
        else jac = c * (diag / S - v[t] * static_cast<double>(u) / (S * S));
        dv += term(d[t] * jac);
      }
      ds[ref_expert_of(cfg, r.expert(n, w))] += dv;  // v = s0 (+ b): ∂v/∂s0 = 1
      // ∂v/∂b = 1 when the gate uses the bias; the selection has no gradient.
      if (dbias != nullptr && cfg.gate_uses_bias) (*dbias)(0, r.expert(n, w)) += dv;
    }
    const std::vector<double> s(&r.scores.v[n * E], &r.scores.v[n * E] + E);
    for (std::int64_t j = 0; j < E; ++j) {  // Σ_i ds_i ∂s_i/∂l_j
      double acc = 0.0;
      for (std::int64_t i = 0; i < E; ++i) {
        const double diag = i == j ? 1.0 : 0.0;
        const double jac = cfg.score == ScoreFunction::kSigmoid ? diag * s[i] * (1.0 - s[i])
                           : magnitude                          ? s[i] * (diag + s[j])
                                                                : s[i] * (diag - s[j]);
        acc += term(ds[i] * jac);
      }
      dlogits(n, j) = acc;
    }
  }
  return dlogits;
}

/// A reference result and its magnitude: the same computation with every
/// input and term by absolute value. Rounding errors scale with the
/// magnitude, not with |ref| (which cancellation can make ~0, e.g. a router
/// gradient when one expert per token makes every gate k/g), so tests
/// compare normwise against max magnitude (support/smora_tolerance.hpp).
struct SmoraExpected {
  HostMatrix ref, mag;
};

inline SmoraExpected twice(const SmoraExpected& e) {
  return {add(e.ref, e.ref), add(e.mag, e.mag)};
}

/// The rank-unit products' expected results (b in PEFT layout).
struct RankUnitExpected {
  SmoraExpected y, da, db, dx, dgates;  // dx: dx0 + through A
};

inline RankUnitExpected expect_rank_units(double s, const HostMatrix& x, const HostMatrix& a,
                                          const HostMatrix& b,
                                          const std::vector<std::int32_t>& units,
                                          const HostMatrix& gates, const HostMatrix& y0,
                                          const HostMatrix& dy, const HostMatrix& dx0) {
  const double as = std::abs(s);
  const RankUnitGrads g = ref_rank_units_backward(s, x, a, b, units, gates, dy);
  const RankUnitGrads m =
      ref_rank_units_backward(as, abs_of(x), abs_of(a), abs_of(b), units, abs_of(gates), abs_of(dy));
  return {{ref_rank_units_forward(s, x, a, b, units, gates, y0),
           ref_rank_units_forward(as, abs_of(x), abs_of(a), abs_of(b), units, abs_of(gates),
                                  abs_of(y0))},
          {g.da, m.da},
          {g.db, m.db},
          {add(dx0, g.dx), add(abs_of(dx0), m.dx)},
          {g.dgates, m.dgates}};
}

/// router_backward's expected dW_r = dlogitsᵀ X and dx = dx0 + dlogits W_r,
/// given ∂L/∂gates and their magnitudes and the aux term's ∂L/∂s0.
struct RouterExpected {
  SmoraExpected dlogits, dwr, dx;
  SmoraExpected dbias;  // (1, C): ∂L/∂bias summed over tokens (a trained bias)
};

inline RouterExpected expect_router_backward(const RouterConfig& cfg, const RefRouting& r,
                                             const HostMatrix& x, const HostMatrix& wr,
                                             const SmoraExpected& dgates,
                                             const HostMatrix& extra_dscores,
                                             const HostMatrix& dx0) {
  RouterExpected e;
  e.dlogits = {ref_router_backward(cfg, r, dgates.ref, extra_dscores, false, &e.dbias.ref),
               ref_router_backward(cfg, r, dgates.mag, extra_dscores, true, &e.dbias.mag)};
  const HostMatrix zero_wr(wr.rows, wr.cols), zero_x(x.rows, x.cols);
  e.dwr = {ref_gemm(1.0, e.dlogits.ref, Op::kTrans, x, Op::kNoTrans, 0.0, zero_wr),
           ref_gemm(1.0, e.dlogits.mag, Op::kTrans, abs_of(x), Op::kNoTrans, 0.0, zero_wr)};
  e.dx = {add(dx0, ref_gemm(1.0, e.dlogits.ref, Op::kNoTrans, wr, Op::kNoTrans, 0.0, zero_x)),
          add(abs_of(dx0),
              ref_gemm(1.0, e.dlogits.mag, Op::kNoTrans, abs_of(wr), Op::kNoTrans, 0.0, zero_x))};
  return e;
}

/// Everything a Smora layer's forward and backward produce, in PEFT layout.
struct SmoraReference {
  RefRouting routing;
  SmoraExpected y;       // (n, d_out) = y0 + delta
  SmoraExpected da;      // (r, d_in)
  SmoraExpected db;      // (d_out, r)
  SmoraExpected dwr;     // (E, d_in)
  SmoraExpected dx;      // (n, d_in) = dx0 + through A + through the router
  SmoraExpected dbias;   // (1, C) for a trained bias
};

/// SMoRA on x (n, d_in) with A (r, d_in), B (d_out, r), W_r (E, d_in) and the
/// balance bias the forward used; dy (n, d_out) is ∂L/∂y.
inline SmoraReference ref_smora(const RouterConfig& cfg, double alpha, double aux_coef,
                                const HostMatrix& x, const HostMatrix& a, const HostMatrix& b,
                                const HostMatrix& wr, const std::vector<double>& bias,
                                const HostMask& mask, const HostMatrix& y0, const HostMatrix& dy,
                                const HostMatrix& dx0) {
  SmoraReference out;
  const double s = alpha / static_cast<double>(cfg.top_k);
  out.routing = ref_route(cfg, x, wr, bias, mask);
  const RankUnitExpected u =
      expect_rank_units(s, x, a, b, out.routing.units, out.routing.gates, y0, dy, dx0);
  const RouterExpected rt = expect_router_backward(
      cfg, out.routing, x, wr, u.dgates, ref_aux_dscores(cfg, out.routing, mask, aux_coef),
      HostMatrix(x.rows, x.cols));
  out.y = u.y;
  out.da = u.da;
  out.db = u.db;
  out.dwr = rt.dwr;
  out.dbias = rt.dbias;
  out.dx = {add(u.dx.ref, rt.dx.ref), add(u.dx.mag, rt.dx.mag)};
  return out;
}

/// Loss-free balancing in the method's words: b_e + u · sign(mean(c) − c_e),
/// with the step u rounded to Acc and the sum in Acc, as the layer stores it.
template <class Acc>
std::vector<Acc> ref_balance_step(const std::vector<Acc>& bias, const std::vector<std::int32_t>& counts,
                                  float rate) {
  std::vector<Acc> out = bias;
  double mean = 0.0;
  for (std::int32_t c : counts) mean += c;
  mean /= static_cast<double>(counts.size());
  for (std::size_t e = 0; e < counts.size(); ++e) {
    const double diff = mean - counts[e];
    const Acc step = diff > 0 ? static_cast<Acc>(rate) : diff < 0 ? -static_cast<Acc>(rate) : Acc(0);
    out[e] = static_cast<Acc>(out[e] + step);
  }
  return out;
}

}  // namespace rwtest
