// The study's outputs: the text table, the CSV and a self-contained SVG plot
// of the training-loss curves. Plain C++ on the results of study.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "study.hpp"

namespace multitask {

struct Stat {
  double mean = 0, sd = 0;  // sd: sample standard deviation (n - 1), 0 for one value
};

inline Stat stat_of(const std::vector<double>& v) {
  Stat s;
  if (v.empty()) return s;
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  if (v.size() > 1) {
    double q = 0;
    for (double x : v) q += (x - s.mean) * (x - s.mean);
    s.sd = std::sqrt(q / static_cast<double>(v.size() - 1));
  }
  return s;
}

/// One table row: per-task and mean test losses over seeds, and the rest.
struct Row {
  std::string kind;  // "method" or "reference"
  std::string name;
  std::int64_t trainable = 0, activated = 0;
  std::vector<Stat> task;
  Stat mean;
  double train_first = NAN, train_last = NAN, seconds = NAN;
};

// per_seed[s][t] -> per-task stats and the stats of the per-seed task means.
inline void fill_losses(Row& row, const std::vector<std::vector<double>>& per_seed) {
  if (per_seed.empty()) return;
  const std::size_t tasks = per_seed[0].size();
  std::vector<double> means;
  for (const auto& seed : per_seed) {
    double m = 0;
    for (double l : seed) m += l / static_cast<double>(tasks);
    means.push_back(m);
  }
  for (std::size_t t = 0; t < tasks; ++t) {
    std::vector<double> v;
    for (const auto& seed : per_seed) v.push_back(seed[t]);
    row.task.push_back(stat_of(v));
  }
  row.mean = stat_of(means);
}

inline std::vector<Row> table_rows(const StudyResult& r) {
  std::vector<Row> rows;
  for (const auto& m : r.methods) {
    Row row;
    row.kind = "method";
    row.name = m.name;
    row.trainable = m.trainable;
    row.activated = m.activated;
    std::vector<std::vector<double>> losses;
    std::vector<double> first, last, seconds;
    for (const auto& run : m.runs) {
      losses.push_back(run.test_loss);
      first.push_back(run.curve_loss.front());
      last.push_back(run.curve_loss.back());
      seconds.push_back(run.seconds);
    }
    fill_losses(row, losses);
    row.train_first = stat_of(first).mean;
    row.train_last = stat_of(last).mean;
    row.seconds = stat_of(seconds).mean;
    rows.push_back(row);
  }
  Row base;
  base.kind = "reference";
  base.name = "frozen base";
  fill_losses(base, r.base_loss);
  rows.push_back(base);
  Row bayes;
  bayes.kind = "reference";
  bayes.name = "task-blind Bayes floor";
  fill_losses(bayes, r.bayes_loss);
  rows.push_back(bayes);
  return rows;
}

inline std::string with_commas(std::int64_t v) {
  std::string s = std::to_string(v), out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i > 0 && (s.size() - i) % 3 == 0) out += ',';
    out += s[i];
  }
  return out;
}

inline std::string format(const char* fmt, double a, double b = 0) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, a, b);
  return buf;
}

inline std::string loss_cell(const Stat& s) { return format("%.4f ± %.4f", s.mean, s.sd); }

/// The table as text (what the program prints).
inline std::string format_table(const StudyResult& r, const StudyOptions& o) {
  const std::vector<Row> rows = table_rows(r);
  const std::size_t tasks = static_cast<std::size_t>(o.problem.tasks);
  std::ostringstream out;
  auto pad = [](std::string s, std::size_t w, bool right) {
    // Width in characters, counting the two-byte "±" as one.
    std::size_t len = 0;
    for (unsigned char c : s) len += (c & 0xC0) != 0x80;
    if (len >= w) return s;
    return right ? std::string(w - len, ' ') + s : s + std::string(w - len, ' ');
  };
  const std::size_t name_w = 24, num_w = 10, loss_w = 17, time_w = 9;
  out << pad("method", name_w, false) << pad("trainable", num_w, true) << "  "
      << pad("active/tok", num_w, true);
  for (std::size_t t = 0; t < tasks; ++t)
    out << "  " << pad("task " + std::to_string(t), loss_w, false);
  out << "  " << pad("mean", loss_w, false) << "  " << pad("s/seed", time_w, true) << "\n";
  const std::size_t total = name_w + 2 * num_w + 2 + (tasks + 1) * (loss_w + 2) + 2 + time_w;
  out << std::string(total, '-') << "\n";
  for (const Row& row : rows) {
    const bool method = row.kind == "method";
    if (!method && row.name == "frozen base") out << std::string(total, '-') << "\n";
    out << pad(row.name, name_w, false)
        << pad(method ? with_commas(row.trainable) : "-", num_w, true) << "  "
        << pad(method ? with_commas(row.activated) : "-", num_w, true);
    for (std::size_t t = 0; t < tasks; ++t)
      out << "  " << pad(loss_cell(row.task[t]), loss_w, false);
    out << "  " << pad(loss_cell(row.mean), loss_w, false) << "  "
        << pad(method ? format("%.2f", row.seconds) : "-", time_w, true) << "\n";
  }
  return out.str();
}

/// The same rows as CSV, plus the first and last logged training loss.
inline bool write_csv(const std::string& path, const StudyResult& r, const StudyOptions& o) {
  std::ofstream f(path);
  if (!f) return false;
  const std::vector<Row> rows = table_rows(r);
  const std::int64_t tasks = o.problem.tasks;
  f << "kind,method,trainable_params,activated_params_per_token";
  for (std::int64_t t = 0; t < tasks; ++t) f << ",task" << t << "_test_mse,task" << t << "_sd";
  f << ",mean_test_mse,mean_sd,train_loss_first,train_loss_last,train_seconds_per_seed,seeds,"
       "steps,backend\n";
  auto num = [](double v) {
    if (std::isnan(v)) return std::string();
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.6g", v);
    return std::string(buf);
  };
  for (const Row& row : rows) {
    f << row.kind << "," << row.name << "," << row.trainable << "," << row.activated;
    for (std::int64_t t = 0; t < tasks; ++t)
      f << "," << num(row.task[t].mean) << "," << num(row.task[t].sd);
    f << "," << num(row.mean.mean) << "," << num(row.mean.sd) << "," << num(row.train_first) << ","
      << num(row.train_last) << "," << num(row.seconds) << "," << o.seeds << "," << o.steps << ","
      << r.backend << "\n";
  }
  return static_cast<bool>(f);
}

inline std::string xml_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '&') out += "&amp;";
    else if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '"') out += "&quot;";
    else out += c;
  }
  return out;
}

/// Mean training loss (over seeds) against step, log-scale y, one line per
/// method, with the frozen base and the Bayes floor (test MSE) as dashed lines.
inline bool write_svg(const std::string& path, const StudyResult& r, const StudyOptions& o) {
  const double width = 900, height = 540, left = 80, right = 250, top = 56, bottom = 64;
  const double pw = width - left - right, ph = height - top - bottom;
  struct Series {
    std::string name;
    std::vector<double> x, y;
  };
  std::vector<Series> series;
  for (const auto& m : r.methods) {
    if (m.runs.empty()) continue;
    Series s;
    s.name = m.name;
    s.x = m.runs[0].curve_step;
    s.y.assign(s.x.size(), 0.0);
    for (const auto& run : m.runs) {
      for (std::size_t i = 0; i < s.y.size(); ++i) {
        s.y[i] += run.curve_loss[i] / static_cast<double>(m.runs.size());
      }
    }
    series.push_back(s);
  }
  const std::vector<Row> rows = table_rows(r);
  const double base = rows[rows.size() - 2].mean.mean, floor = rows.back().mean.mean;
  double lo = floor > 0 ? floor : 1e300, hi = base;
  for (const auto& s : series) {
    for (double v : s.y) {
      if (v > 0 && std::isfinite(v)) {
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
    }
  }
  if (!(lo < hi)) hi = lo * 10;
  // Axis ends at the nearest 1, 2 or 5 x 10^e outside the data (log10 units).
  auto nice = [](double v, bool up) {
    const double e = std::floor(std::log10(v));
    const double steps[] = {1, 2, 5, 10};
    double best = up ? 10 : 1;
    for (double k : steps) {
      if (up && k * std::pow(10.0, e) >= v * (1 - 1e-12)) { best = k; break; }
      if (!up && k * std::pow(10.0, e) <= v * (1 + 1e-12)) best = k;
    }
    return std::log10(best) + e;
  };
  const double ylo = nice(lo, false), yhi = nice(hi, true);
  const double xmax = static_cast<double>(std::max<std::int64_t>(o.steps, 1));
  auto px = [&](double step) { return left + pw * step / xmax; };
  auto py = [&](double v) { return top + ph * (yhi - std::log10(v)) / (yhi - ylo); };

  std::ostringstream svg;
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
      << "\" viewBox=\"0 0 " << width << " " << height
      << "\" font-family=\"sans-serif\" font-size=\"12\">\n";
  svg << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  svg << "<text x=\"" << left << "\" y=\"24\" font-size=\"15\">" << "Training loss (MSE, mean of "
      << o.seeds << " seed" << (o.seeds == 1 ? "" : "s") << ", " << o.log_every
      << "-step averages), " << o.problem.tasks << " tasks, d = " << o.problem.d << ", backend "
      << xml_escape(r.backend) << "</text>\n";
  // Grid and y ticks: decades labelled, 2..9 as light lines.
  for (double e = std::floor(ylo + 1e-9); e <= yhi + 1e-9; e += 1) {
    for (int k = 1; k <= 9; ++k) {
      const double v = k * std::pow(10.0, e);
      if (std::log10(v) < ylo - 1e-9) continue;
      if (std::log10(v) > yhi + 1e-9) break;
      const double y = py(v);
      svg << "<line x1=\"" << left << "\" x2=\"" << left + pw << "\" y1=\"" << y << "\" y2=\"" << y
          << "\" stroke=\"" << (k == 1 ? "#bbb" : "#eee") << "\"/>\n";
      if (k == 1 || k == 2 || k == 5) {
        char label[32];
        std::snprintf(label, sizeof label, "%g", v);
        svg << "<text x=\"" << left - 6 << "\" y=\"" << y + 4 << "\" text-anchor=\"end\">" << label
            << "</text>\n";
      }
    }
  }
  // x ticks: about six round steps.
  const double raw = xmax / 6, mag = std::pow(10.0, std::floor(std::log10(raw)));
  const double tick = raw / mag < 2 ? 2 * mag : raw / mag < 5 ? 5 * mag : 10 * mag;
  for (double s = 0; s <= xmax + 1e-9; s += tick) {
    svg << "<line x1=\"" << px(s) << "\" x2=\"" << px(s) << "\" y1=\"" << top << "\" y2=\""
        << top + ph << "\" stroke=\"#eee\"/>\n";
    svg << "<text x=\"" << px(s) << "\" y=\"" << top + ph + 18 << "\" text-anchor=\"middle\">"
        << s << "</text>\n";
  }
  svg << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << pw << "\" height=\"" << ph
      << "\" fill=\"none\" stroke=\"black\"/>\n";
  svg << "<text x=\"" << left + pw / 2 << "\" y=\"" << height - 18
      << "\" text-anchor=\"middle\">step</text>\n";
  svg << "<text transform=\"translate(22," << top + ph / 2
      << ") rotate(-90)\" text-anchor=\"middle\">loss (log scale)</text>\n";

  static const char* colours[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                  "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"};
  double legend_y = top + 8;
  auto legend = [&](const std::string& name, const char* colour, const char* dash) {
    svg << "<line x1=\"" << left + pw + 16 << "\" x2=\"" << left + pw + 44 << "\" y1=\"" << legend_y
        << "\" y2=\"" << legend_y << "\" stroke=\"" << colour << "\" stroke-width=\"2\"" << dash
        << "/>\n";
    svg << "<text x=\"" << left + pw + 50 << "\" y=\"" << legend_y + 4 << "\">" << xml_escape(name)
        << "</text>\n";
    legend_y += 20;
  };
  for (std::size_t i = 0; i < series.size(); ++i) {
    const char* colour = colours[i % 10];
    svg << "<polyline fill=\"none\" stroke=\"" << colour << "\" stroke-width=\"1.8\" points=\"";
    for (std::size_t k = 0; k < series[i].x.size(); ++k) {
      if (!(series[i].y[k] > 0) || !std::isfinite(series[i].y[k])) continue;
      svg << px(series[i].x[k]) << "," << py(series[i].y[k]) << " ";
    }
    svg << "\"/>\n";
    legend(series[i].name, colour, "");
  }
  auto hline = [&](double v, const std::string& name, const char* dash) {
    if (!(v > 0) || !std::isfinite(v)) return;
    svg << "<line x1=\"" << left << "\" x2=\"" << left + pw << "\" y1=\"" << py(v) << "\" y2=\""
        << py(v) << "\" stroke=\"#555\" stroke-width=\"1.2\"" << dash << "/>\n";
    legend(name, "#555", dash);
  };
  hline(base, "frozen base (test)", " stroke-dasharray=\"6,4\"");
  hline(floor, "Bayes floor (test)", " stroke-dasharray=\"2,3\"");
  svg << "</svg>\n";
  std::ofstream f(path);
  if (!f) return false;
  f << svg.str();
  return static_cast<bool>(f);
}

}  // namespace multitask
