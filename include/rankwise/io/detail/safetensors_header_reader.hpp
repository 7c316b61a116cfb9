// The safetensors header read from SAX events into raw per-tensor records, before
// any validation: linear in the header, bounded in depth, duplicates caught.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "rankwise/io/json_reader.hpp"

namespace rankwise {
namespace io {

namespace detail {

// What the header says about one tensor, as read, before validation.
struct RawEntry {
  std::string name;
  const char* not_object = nullptr;  // the JSON type of a value that is not an object
  bool dtype_ok = false;             // "dtype" present and a string
  std::string dtype;
  bool has_shape = false, shape_array = false;
  std::vector<std::uint64_t> shape;
  std::string bad_dim;  // the first shape element that is not a non-negative integer
  bool has_offsets = false, offsets_ok = false;
  std::size_t offsets_count = 0;
  std::uint64_t offsets[2] = {0, 0};
};

// The header read straight from SAX events into RawEntry records, with no
// JSON tree: nlohmann's DOM costs about ten allocations per tensor, this
// about three, so a 200,000-tensor header parses in a fraction of a second.
// Depth is bounded (a valid header nests three containers: object > tensor
// entry > shape) and every duplicate key is caught, both as the events come.
class HeaderReader : public nlohmann::json_sax<nlohmann::json> {
 public:
  enum class Field { kNone, kDtype, kShape, kOffsets, kOther };

  std::vector<RawEntry> entries;
  std::optional<std::map<std::string, std::string>> metadata;
  const char* metadata_not_object = nullptr;
  std::string metadata_bad_key;             // first key whose value is not a string...
  const char* metadata_bad_type = nullptr;  // ... and that value's type
  const char* root_type = nullptr;          // set when the root is not an object
  JsonReadError error;

  bool null() override { return scalar("null", "null"); }
  bool boolean(bool v) override { return scalar("boolean", v ? "true" : "false"); }
  bool number_integer(number_integer_t v) override {
    if (v >= 0) return unsigned_value(static_cast<std::uint64_t>(v));  // "-0"
    return scalar("number", std::to_string(v));
  }
  bool number_unsigned(number_unsigned_t v) override { return unsigned_value(v); }
  bool number_float(number_float_t v, const string_t&) override {
    return scalar("number", nlohmann::json(v).dump());
  }
  bool string(string_t& v) override {
    if (root_type) return true;
    if (depth_ == 2 && in_metadata_) {
      metadata->emplace(key_, std::move(v));
      return true;
    }
    if (depth_ == 2 && field_ == Field::kDtype && !in_ignored_) {
      RawEntry& e = entries.back();
      e.dtype_ok = true;
      e.dtype = std::move(v);
      return true;
    }
    return scalar("string", quote_brief(v));
  }
  bool binary(binary_t&) override { return scalar("binary", "binary"); }

  bool start_object(std::size_t) override { return open(true); }
  bool start_array(std::size_t) override { return open(false); }
  bool end_object() override { return close(); }
  bool end_array() override { return close(); }

  bool key(string_t& k) override {
    if (root_type) return true;
    if (depth_ == 1) {
      if (!root_names_.insert(k).second) return duplicate(k, {});
      key_ = std::move(k);
      return true;
    }
    if (depth_ == 2 && in_metadata_) {
      if (metadata->count(k)) return duplicate(k, {"__metadata__"});
      key_ = std::move(k);
      return true;
    }
    if (depth_ == 2 && !in_ignored_) {
      RawEntry& e = entries.back();
      // Entries have a few keys: a linear check, then a set for hostile ones.
      if (entry_keys_.size() < 8) {
        for (const auto& seen : entry_keys_) {
          if (seen == k) return duplicate(k, {e.name});
        }
        entry_keys_.push_back(k);
      } else if (!entry_key_set_.insert(k).second ||
                 std::find(entry_keys_.begin(), entry_keys_.end(), k) != entry_keys_.end()) {
        return duplicate(k, {e.name});
      }
      field_ = k == "dtype"          ? Field::kDtype
               : k == "shape"        ? Field::kShape
               : k == "data_offsets" ? Field::kOffsets
                                     : Field::kOther;
      if (field_ == Field::kShape) e.has_shape = true;
      if (field_ == Field::kOffsets) e.has_offsets = true;
      if (field_ == Field::kDtype) e.dtype_ok = false;
      return true;
    }
    return true;  // keys of objects nested in ignored values
  }

  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    error.kind = JsonReadError::kSyntax;
    std::string what = e.what();  // quotes the last token, which may be huge
    if (what.size() > 240) what = what.substr(0, 240) + "...";
    error.message = std::move(what);
    return false;
  }

 private:
  bool duplicate(const std::string& k, std::vector<std::string> at) {
    error.kind = JsonReadError::kDuplicateKey;
    error.key = k;
    error.at = std::move(at);
    return false;
  }

  // A tensor entry (or __metadata__) begins at depth 1 with the current key.
  void begin_value_at_root(bool object, const char* type) {
    field_ = Field::kNone;
    array_field_ = Field::kNone;
    if (key_ == "__metadata__") {
      in_metadata_ = object;
      in_ignored_ = !object;
      metadata.emplace();
      if (!object) metadata_not_object = type;
      return;
    }
    entries.emplace_back();
    RawEntry& e = entries.back();
    e.name = key_;
    if (!object) e.not_object = type;
    in_ignored_ = !object;
    entry_keys_.clear();
    entry_key_set_.clear();
  }

  // A value that is not a container; `brief` is its JSON text, cut.
  bool scalar(const char* type, std::string brief) {
    if (root_type) return true;
    if (depth_ == 0) {
      root_type = type;
    } else if (depth_ == 1) {
      begin_value_at_root(false, type);
    } else if (depth_ == 2 && in_metadata_) {
      if (!metadata_bad_type) {
        metadata_bad_key = key_;
        metadata_bad_type = type;
      }
    } else if (depth_ == 3 && !in_ignored_ && array_field_ == Field::kShape) {
      RawEntry& e = entries.back();
      if (e.bad_dim.empty()) e.bad_dim = std::move(brief);
    } else if (depth_ == 3 && !in_ignored_ && array_field_ == Field::kOffsets) {
      RawEntry& e = entries.back();
      ++e.offsets_count;
      e.offsets_ok = false;
      offsets_bad_ = true;
    }
    // A non-string dtype stays !dtype_ok; other fields' scalars mean "not an array".
    return true;
  }

  bool unsigned_value(std::uint64_t v) {
    if (root_type) return true;
    if (depth_ == 3 && !in_ignored_ && array_field_ == Field::kShape) {
      RawEntry& e = entries.back();
      e.shape.push_back(v);
      return true;
    }
    if (depth_ == 3 && !in_ignored_ && array_field_ == Field::kOffsets) {
      RawEntry& e = entries.back();
      if (e.offsets_count < 2) e.offsets[e.offsets_count] = v;
      ++e.offsets_count;
      return true;
    }
    return scalar("number", std::to_string(v));
  }

  bool open(bool object) {
    if (depth_ >= 3) {
      error.kind = JsonReadError::kTooDeep;
      return false;
    }
    const char* type = object ? "object" : "array";
    if (depth_ == 0 && !object) root_type = type;
    if (root_type) {
      ++depth_;
      return true;
    }
    if (depth_ == 1) begin_value_at_root(object, type);
    if (depth_ == 2 && in_metadata_ && !metadata_bad_type) {
      metadata_bad_key = key_;
      metadata_bad_type = type;
    }
    if (depth_ == 2 && !in_metadata_ && !in_ignored_ && !object) {
      array_field_ = field_;
      RawEntry& e = entries.back();
      if (field_ == Field::kShape) {
        e.shape_array = true;
        e.shape.clear();
        e.bad_dim.clear();
      } else if (field_ == Field::kOffsets) {
        e.offsets_count = 0;
        offsets_bad_ = false;
      }
    }
    ++depth_;
    return true;
  }

  bool close() {
    --depth_;
    if (root_type) return true;
    if (depth_ == 2 && !in_metadata_ && !in_ignored_) {
      RawEntry& e = entries.back();
      if (array_field_ == Field::kOffsets) e.offsets_ok = !offsets_bad_ && e.offsets_count == 2;
      array_field_ = Field::kNone;
    }
    if (depth_ == 1) {
      in_metadata_ = false;
      in_ignored_ = false;
    }
    return true;
  }

  int depth_ = 0;
  std::string key_;  // the current key at depth 1 or in __metadata__
  bool in_metadata_ = false;
  bool in_ignored_ = false;  // inside a root value that is not an object
  Field field_ = Field::kNone;
  Field array_field_ = Field::kNone;
  bool offsets_bad_ = false;
  std::unordered_set<std::string> root_names_;
  std::vector<std::string> entry_keys_;
  std::set<std::string> entry_key_set_;
};

}  // namespace detail

}  // namespace io
}  // namespace rankwise
