// Reading JSON from untrusted files in linear time and bounded depth, and quoting parts of it in
// error messages without printing unbounded values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {
namespace io {
namespace detail {

/// At most `limit` bytes of `s` as a quoted JSON string, with the total length
/// when cut, for error messages about strings read from a file.
inline std::string quote_brief(const std::string& s, std::size_t limit = 80) {
  const bool cut = s.size() > limit;
  std::string out = nlohmann::json(cut ? s.substr(0, limit) : s)
                        .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (cut) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

/// `value` as JSON text of about `limit` characters at most: containers are
/// cut after a few elements and below a few levels, strings are cut, so an
/// error message never grows with the input and never recurses deeply.
template <class Json>
std::string json_brief(const Json& value, std::size_t limit = 80, int depth = 0) {
  if (value.is_string()) return quote_brief(value.template get_ref<const std::string&>(), limit);
  if (!value.is_structured()) return value.dump();
  const bool object = value.is_object();
  if (value.empty()) return object ? "{}" : "[]";
  if (depth >= 3) return object ? "{...}" : "[...]";
  std::string out(1, object ? '{' : '[');
  std::size_t shown = 0;
  for (auto it = value.begin(); it != value.end(); ++it) {
    if (out.size() >= limit) {
      out += "... (" + std::to_string(value.size() - shown) + " more)";
      break;
    }
    if (shown) out += ", ";
    if (object) out += quote_brief(it.key(), 40) + ": ";
    out += json_brief(*it, limit / 2, depth + 1);
    ++shown;
  }
  return out + (object ? '}' : ']');
}

/// What parse_json_bounded found wrong, if anything.
struct JsonReadError {
  enum Kind { kNone, kSyntax, kTooDeep, kDuplicateKey } kind = kNone;
  std::string message;          // kSyntax: the parser's message, cut to a bounded length
  std::string key;              // kDuplicateKey: the repeated key
  std::vector<std::string> at;  // kDuplicateKey: keys of the enclosing objects, outermost first
};

struct JsonReadOptions {
  int max_depth = 64;                // containers open at once
  bool reject_duplicates = false;    // else the last value wins, as Python's json
  std::set<std::string> keep_order;  // root keys whose object values' key order is recorded
};

// Builds the document from SAX events. nlohmann's callback parser rescans the
// parent object after every nested object (quadratic in the entries of a
// safetensors header) and ordered_json inserts by linear search (quadratic in
// a config's keys); this builder keeps one pointer per open container, so each
// event costs O(log n) in a std::map. Depth is checked before a container is
// opened, so no deep tree is ever built (nor destroyed recursively).
class BoundedJsonBuilder : public nlohmann::json_sax<nlohmann::json> {
 public:
  using json = nlohmann::json;
  BoundedJsonBuilder(json& root, const JsonReadOptions& options, JsonReadError& error,
                     std::map<std::string, std::vector<std::string>>& order)
      : root_(root), options_(options), error_(error), order_(order) {}

  bool null() override { return value(json(nullptr)); }
  bool boolean(bool v) override { return value(json(v)); }
  bool number_integer(number_integer_t v) override { return value(json(v)); }
  bool number_unsigned(number_unsigned_t v) override { return value(json(v)); }
  bool number_float(number_float_t v, const string_t&) override { return value(json(v)); }
  bool string(string_t& v) override { return value(json(std::move(v))); }
  bool binary(binary_t& v) override { return value(json::binary(std::move(v))); }
  bool start_object(std::size_t) override { return open(json::object()); }
  bool start_array(std::size_t) override { return open(json::array()); }
  bool end_object() override { return close(); }
  bool end_array() override { return close(); }

  bool key(string_t& k) override {
    json& object = *stack_.back();
    const std::size_t depth = stack_.size();
    keys_.resize(depth);
    if (object.contains(k)) {
      if (options_.reject_duplicates) {
        error_.kind = JsonReadError::kDuplicateKey;
        error_.key = k;
        error_.at.assign(keys_.begin(), keys_.end() - 1);
        return false;
      }
    } else if (depth == 2 && options_.keep_order.count(keys_[0])) {
      order_[keys_[0]].push_back(k);  // Python keeps a repeated key where it first came
    }
    if (depth == 1 && options_.keep_order.count(k)) order_[k].clear();  // a repeated root key
    keys_.back() = std::move(k);
    return true;
  }

  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    error_.kind = JsonReadError::kSyntax;
    // The message quotes the last token read, which may be megabytes long.
    std::string what = e.what();
    if (what.size() > 240) what = what.substr(0, 240) + "...";
    error_.message = std::move(what);
    return false;
  }

 private:
  json* place(json&& v) {
    if (stack_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    json& parent = *stack_.back();
    if (parent.is_array()) {
      parent.push_back(std::move(v));
      return &parent.back();
    }
    json& slot = parent[keys_.back()];
    slot = std::move(v);
    return &slot;
  }
  bool value(json&& v) {
    place(std::move(v));
    return true;
  }
  bool open(json&& container) {
    if (static_cast<int>(stack_.size()) >= options_.max_depth) {
      error_.kind = JsonReadError::kTooDeep;
      return false;
    }
    stack_.push_back(place(std::move(container)));
    return true;
  }
  bool close() {
    stack_.pop_back();
    if (keys_.size() > stack_.size()) keys_.resize(stack_.size());
    return true;
  }

  json& root_;
  const JsonReadOptions& options_;
  JsonReadError& error_;
  std::map<std::string, std::vector<std::string>>& order_;
  std::vector<json*> stack_;       // open containers, outermost first
  std::vector<std::string> keys_;  // the current key of each open object
};

/// Parses `text` into `out` under `options`; false with `error` set on a
/// syntax error, nesting deeper than options.max_depth, or (when rejected) a
/// repeated key. `order` receives, for each root key in options.keep_order
/// whose value is an object, that object's keys in file order.
inline bool parse_json_bounded(const std::string& text, const JsonReadOptions& options,
                               nlohmann::json& out, JsonReadError& error,
                               std::map<std::string, std::vector<std::string>>* order = nullptr) {
  std::map<std::string, std::vector<std::string>> ignored;
  BoundedJsonBuilder builder(out, options, error, order ? *order : ignored);
  const bool ok = nlohmann::json::sax_parse(text.begin(), text.end(), &builder);
  if (!ok && error.kind == JsonReadError::kNone) {
    error.kind = JsonReadError::kSyntax;
    error.message = "parse stopped";
  }
  return ok && error.kind == JsonReadError::kNone;
}

}  // namespace detail
}  // namespace io
}  // namespace rankwise
