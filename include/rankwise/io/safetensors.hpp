// Safetensors files: a validating reader, a deterministic writer, and bit-exact F16/BF16
// conversions.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <unordered_set>
#include <utility>
#include <vector>

#include "rankwise/core/error.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/io/json_reader.hpp"

namespace rankwise {
namespace io {

// ---------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------

/// The element type of a safetensors tensor. The first four are the ones whose
/// values rankwise converts (to and from double); the others are known so that
/// a file holding them is still validated and can be copied unchanged.
enum class DType : std::uint8_t {
  kF32,
  kF16,
  kBF16,
  kF64,
  kBool,
  kU8,
  kI8,
  kI16,
  kU16,
  kI32,
  kU32,
  kI64,
  kU64,
  kF8E5M2,
  kF8E4M3,
  kF8E8M0,
  kF8E4M3Fnuz,
  kF8E5M2Fnuz,
  kF4,
  kF6E2M3,
  kF6E3M2,
  kC64,
};

namespace detail {

struct DTypeInfo {
  DType dtype;
  const char* name;  // as spelled in a safetensors header
  int bits;          // bits per element (F4 and F6 are sub-byte)
  int order;         // position in safetensors' own Dtype enum, which its writer sorts by
};

// `order` mirrors the declaration order of the reference implementation's
// Dtype enum (increasing alignment); the writer sorts by it, descending, so
// that every tensor's data starts aligned to its element size, as safetensors does.
inline const DTypeInfo* dtype_table(std::size_t& count) {
  static const DTypeInfo table[] = {
      {DType::kBool, "BOOL", 8, 0},
      {DType::kF4, "F4", 4, 1},
      {DType::kF6E2M3, "F6_E2M3", 6, 2},
      {DType::kF6E3M2, "F6_E3M2", 6, 3},
      {DType::kU8, "U8", 8, 4},
      {DType::kI8, "I8", 8, 5},
      {DType::kF8E5M2, "F8_E5M2", 8, 6},
      {DType::kF8E4M3, "F8_E4M3", 8, 7},
      {DType::kF8E8M0, "F8_E8M0", 8, 8},
      {DType::kF8E4M3Fnuz, "F8_E4M3FNUZ", 8, 9},
      {DType::kF8E5M2Fnuz, "F8_E5M2FNUZ", 8, 10},
      {DType::kI16, "I16", 16, 11},
      {DType::kU16, "U16", 16, 12},
      {DType::kF16, "F16", 16, 13},
      {DType::kBF16, "BF16", 16, 14},
      {DType::kI32, "I32", 32, 15},
      {DType::kU32, "U32", 32, 16},
      {DType::kF32, "F32", 32, 17},
      {DType::kC64, "C64", 64, 18},
      {DType::kF64, "F64", 64, 19},
      {DType::kI64, "I64", 64, 20},
      {DType::kU64, "U64", 64, 21},
  };
  count = sizeof(table) / sizeof(table[0]);
  return table;
}

inline const DTypeInfo& dtype_info(DType dtype) {
  std::size_t count = 0;
  const DTypeInfo* table = dtype_table(count);
  for (std::size_t i = 0; i < count; ++i) {
    if (table[i].dtype == dtype) return table[i];
  }
  RANKWISE_CHECK(false, "safetensors: DType value ", static_cast<int>(dtype),
                 " is not a known dtype");
  return table[0];  // unreachable
}

}  // namespace detail

/// The header spelling of `dtype` ("F32", "BF16", ...).
inline const char* dtype_name(DType dtype) { return detail::dtype_info(dtype).name; }

/// The dtype spelled `name` in a safetensors header, or nullopt when unknown.
inline std::optional<DType> parse_dtype(const std::string& name) {
  std::size_t count = 0;
  const detail::DTypeInfo* table = detail::dtype_table(count);
  for (std::size_t i = 0; i < count; ++i) {
    if (name == table[i].name) return table[i].dtype;
  }
  return std::nullopt;
}

/// Bits per element of `dtype` (4 and 6 for the sub-byte float formats).
inline int dtype_bits(DType dtype) { return detail::dtype_info(dtype).bits; }

/// True for the dtypes whose values rankwise converts to and from double:
/// F32, F16, BF16 and F64.
inline bool dtype_has_values(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16 ||
         dtype == DType::kF64;
}

// ---------------------------------------------------------------------------
// Bit-exact float conversions
// ---------------------------------------------------------------------------

namespace detail {

// Rounds a double to the binary interchange format with `exp_bits` exponent
// and `man_bits` stored mantissa bits, to nearest, ties to even, straight from
// the double's bits: going through float first would round twice and could
// differ in the last bit. Overflow gives infinity, underflow gradual
// subnormals then zero. A NaN keeps its sign and the top of its payload; if
// that leaves no payload bit, the quiet bit is set so it stays a NaN.
inline std::uint64_t encode_float_bits(double value, int exp_bits, int man_bits) {
  std::uint64_t d = 0;
  std::memcpy(&d, &value, sizeof d);
  const std::uint64_t sign_bit = (d >> 63) << (exp_bits + man_bits);
  const int dexp = static_cast<int>((d >> 52) & 0x7FF);
  const std::uint64_t dman = d & ((std::uint64_t{1} << 52) - 1);
  const std::uint64_t exp_all = (std::uint64_t{1} << exp_bits) - 1;
  const std::uint64_t man_mask = (std::uint64_t{1} << man_bits) - 1;
  const std::uint64_t inf = exp_all << man_bits;

  if (dexp == 0x7FF) {
    if (dman == 0) return sign_bit | inf;
    std::uint64_t payload = dman >> (52 - man_bits);
    if (payload == 0) payload = std::uint64_t{1} << (man_bits - 1);
    return sign_bit | inf | payload;
  }
  if (dexp == 0 && dman == 0) return sign_bit;

  // value = sig * 2^(e - 52) with sig's leading one at bit 52.
  std::uint64_t sig = 0;
  int e = 0;
  if (dexp == 0) {
    sig = dman;
    e = -1022;
    while ((sig & (std::uint64_t{1} << 52)) == 0) {
      sig <<= 1;
      --e;
    }
  } else {
    sig = dman | (std::uint64_t{1} << 52);
    e = dexp - 1023;
  }

  const int bias = (1 << (exp_bits - 1)) - 1;
  const int emin = 1 - bias;
  int shift = 52 - man_bits;
  if (e < emin) shift += emin - e;  // subnormal in the target: fewer bits survive
  // shift >= 54 leaves less than half the smallest subnormal: rounds to zero.
  if (shift >= 54) return sign_bit;

  std::uint64_t q = sig >> shift;
  const std::uint64_t rem = sig & ((std::uint64_t{1} << shift) - 1);
  const std::uint64_t half = std::uint64_t{1} << (shift - 1);
  if (rem > half || (rem == half && (q & 1) != 0)) ++q;

  if (e < emin) {
    // q <= 2^man_bits; q == 2^man_bits is the smallest normal, whose encoding
    // (exponent field 1, mantissa 0) is exactly q.
    return sign_bit | q;
  }
  if ((q >> (man_bits + 1)) != 0) {  // rounding carried into the next binade
    q >>= 1;
    ++e;
  }
  if (e > bias) return sign_bit | inf;
  return sign_bit | (static_cast<std::uint64_t>(e + bias) << man_bits) | (q & man_mask);
}

// The exact double value of a binary interchange format value (every F32, F16
// and BF16 value is a double). NaN payloads are carried into the top of the
// double's mantissa, so encode_float_bits(decode_float_bits(x)) == x for every
// bit pattern x, NaNs included.
inline double decode_float_bits(std::uint64_t bits, int exp_bits, int man_bits) {
  const std::uint64_t exp_all = (std::uint64_t{1} << exp_bits) - 1;
  const std::uint64_t man_mask = (std::uint64_t{1} << man_bits) - 1;
  const std::uint64_t sign = (bits >> (exp_bits + man_bits)) & 1;
  const std::uint64_t exp = (bits >> man_bits) & exp_all;
  const std::uint64_t man = bits & man_mask;
  if (exp == exp_all) {
    const std::uint64_t d = (sign << 63) | (std::uint64_t{0x7FF} << 52) | (man << (52 - man_bits));
    double out = 0;
    std::memcpy(&out, &d, sizeof out);
    return out;
  }
  const int bias = (1 << (exp_bits - 1)) - 1;
  double magnitude = 0;
  if (exp == 0) {
    magnitude = std::ldexp(static_cast<double>(man), 1 - bias - man_bits);
  } else {
    magnitude = std::ldexp(static_cast<double>(man | (std::uint64_t{1} << man_bits)),
                           static_cast<int>(exp) - bias - man_bits);
  }
  return sign != 0 ? -magnitude : magnitude;
}

}  // namespace detail

/// IEEE binary16 bits of `value`, rounded to nearest, ties to even.
inline std::uint16_t double_to_half_bits(double value) {
  return static_cast<std::uint16_t>(detail::encode_float_bits(value, 5, 10));
}
/// The exact value of IEEE binary16 bits.
inline double half_bits_to_double(std::uint16_t bits) {
  return detail::decode_float_bits(bits, 5, 10);
}

/// bfloat16 bits of `value`, rounded to nearest, ties to even.
inline std::uint16_t double_to_bfloat16_bits(double value) {
  return static_cast<std::uint16_t>(detail::encode_float_bits(value, 8, 7));
}
/// The exact value of bfloat16 bits.
inline double bfloat16_bits_to_double(std::uint16_t bits) {
  return detail::decode_float_bits(bits, 8, 7);
}

/// IEEE binary32 bits of `value`, rounded to nearest, ties to even. Done on the
/// bits rather than by a cast so that signalling NaNs keep their bits too.
inline std::uint32_t double_to_float_bits(double value) {
  return static_cast<std::uint32_t>(detail::encode_float_bits(value, 8, 23));
}
/// The exact value of IEEE binary32 bits.
inline double float_bits_to_double(std::uint32_t bits) {
  return detail::decode_float_bits(bits, 8, 23);
}

// ---------------------------------------------------------------------------
// In-memory file
// ---------------------------------------------------------------------------

/// One tensor of a safetensors file, as stored: row-major little-endian bytes.
struct SafetensorsTensor {
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> data;  ///< exactly byte_size() bytes when valid

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

/// The contents of a safetensors file: tensors by name and the optional
/// `__metadata__` string map (absent and empty are kept apart, so a file reads
/// back and writes out byte for byte).
struct SafetensorsFile {
  std::optional<std::map<std::string, std::string>> metadata;
  std::map<std::string, SafetensorsTensor> tensors;
};

/// The largest header the reader accepts, as safetensors itself (100 MB).
inline constexpr std::uint64_t kMaxSafetensorsHeaderBytes = 100000000;

namespace detail {

inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string out = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    out += (i ? " x " : "") + std::to_string(shape[i]);
  }
  return out + ")";
}

inline std::string file_where(const std::string& label) {
  return ::rankwise::detail::concat("safetensors file \"", label, "\"");
}
// A name from a file, cut so that an error message stays bounded.
inline std::string name_brief(const std::string& name) {
  constexpr std::size_t kLimit = 200;
  if (name.size() <= kLimit) return name;
  return ::rankwise::detail::concat(name.substr(0, kLimit), "... (", name.size(), " bytes)");
}
inline std::string tensor_where(const std::string& label, const std::string& tensor) {
  return ::rankwise::detail::concat("safetensors file \"", label, "\", tensor \"",
                                    name_brief(tensor), "\"");
}

inline std::uint64_t load_le(const std::uint8_t* p, int bytes) {
  std::uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
inline void store_le(std::uint8_t* p, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

// Element count of `shape` with the running product checked against int64,
// as safetensors checks it (a later zero does not excuse an earlier overflow).
// nullopt on overflow.
inline std::optional<std::int64_t> checked_numel(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (auto d : shape) {
    if (d < 0) return std::nullopt;
    if (d != 0 && n > std::numeric_limits<std::int64_t>::max() / d) return std::nullopt;
    n *= d;
  }
  return n;
}

// Bytes of `numel` elements of `dtype`; nullopt on overflow or when a
// sub-byte dtype does not fill whole bytes.
inline std::optional<std::uint64_t> checked_bytes(std::int64_t numel, DType dtype) {
  const auto bits = static_cast<std::uint64_t>(dtype_bits(dtype));
  const auto n = static_cast<std::uint64_t>(numel);
  if (n > std::numeric_limits<std::uint64_t>::max() / bits) return std::nullopt;
  if ((n * bits) % 8 != 0) return std::nullopt;
  return n * bits / 8;
}

// Where a tensor's bytes lie, relative to the start of the data section.
struct HeaderEntry {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

struct ParsedHeader {
  std::optional<std::map<std::string, std::string>> metadata;
  std::vector<HeaderEntry> entries;  // sorted by offset
};

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

// Parses and validates the JSON header of a file whose data section holds
// `data_bytes` bytes. Every rule of the format is checked here, before any
// tensor data is read or allocated; parsing and checking are linear in the
// header (the offset sort aside).
inline ParsedHeader parse_header(const std::string& label, const std::string& text,
                                 std::uint64_t data_bytes) {
  const std::string where = file_where(label);
  HeaderReader reader;
  const bool parsed = nlohmann::json::sax_parse(text.begin(), text.end(), &reader);
  const JsonReadError& problem = reader.error;
  RANKWISE_CHECK_CODE(problem.kind != JsonReadError::kTooDeep, ErrorCode::kIo, where,
                      ": header nests JSON deeper than a safetensors header can "
                      "(object > tensor entry > shape)");
  RANKWISE_CHECK_CODE(
      problem.kind != JsonReadError::kSyntax && (parsed || problem.kind != JsonReadError::kNone),
      ErrorCode::kIo, where, ": header is not valid JSON (", problem.message, ")");
  if (problem.kind == JsonReadError::kDuplicateKey) {
    const std::string parent = problem.at.empty() ? std::string() : problem.at.front();
    RANKWISE_CHECK_CODE(!problem.at.empty(), ErrorCode::kIo, where, ": duplicate key ",
                        quote_brief(problem.key), " in header");
    RANKWISE_CHECK_CODE(parent != "__metadata__", ErrorCode::kIo, where, ": duplicate key ",
                        quote_brief(problem.key), " in __metadata__");
    RANKWISE_CHECK_CODE(false, ErrorCode::kIo, tensor_where(label, parent), ": duplicate key ",
                        quote_brief(problem.key), " in its header entry");
  }
  RANKWISE_CHECK_CODE(reader.root_type == nullptr, ErrorCode::kIo, where,
                      ": header is not a JSON object (it is ", reader.root_type, ")");

  ParsedHeader out;
  if (reader.metadata) {
    RANKWISE_CHECK_CODE(reader.metadata_not_object == nullptr, ErrorCode::kIo, where,
                        ": __metadata__ must be an object mapping strings to strings (it is ",
                        reader.metadata_not_object, ")");
    RANKWISE_CHECK_CODE(reader.metadata_bad_type == nullptr, ErrorCode::kIo, where,
                        ": __metadata__ value of \"", name_brief(reader.metadata_bad_key),
                        "\" must be a string (it is ", reader.metadata_bad_type, ")");
    out.metadata = std::move(reader.metadata);
  }
  out.entries.reserve(reader.entries.size());
  for (RawEntry& raw : reader.entries) {
    const std::string& name = raw.name;
    // Built only when a check fails: the happy path stays free of string formatting.
    const auto at = [&] { return tensor_where(label, name); };
    RANKWISE_CHECK_CODE(raw.not_object == nullptr, ErrorCode::kIo, at(),
                        ": header entry must be an object with dtype, shape and data_offsets");

    HeaderEntry entry;
    RANKWISE_CHECK_CODE(raw.dtype_ok, ErrorCode::kIo, at(), ": missing or non-string \"dtype\"");
    const auto dtype = parse_dtype(raw.dtype);
    RANKWISE_CHECK_CODE(dtype.has_value(), ErrorCode::kIo, at(), ": unknown dtype ",
                        quote_brief(raw.dtype));
    entry.dtype = *dtype;

    RANKWISE_CHECK_CODE(raw.has_shape && raw.shape_array, ErrorCode::kIo, at(),
                        ": missing \"shape\" or it is not an array");
    RANKWISE_CHECK_CODE(raw.bad_dim.empty(), ErrorCode::kIo, at(),
                        ": shape must hold non-negative integers, found ", raw.bad_dim);
    entry.shape.reserve(raw.shape.size());
    for (const std::uint64_t d : raw.shape) {
      RANKWISE_CHECK_CODE(d <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                          ErrorCode::kIo, at(), ": shape dimension ", d, " overflows");
      entry.shape.push_back(static_cast<std::int64_t>(d));
    }
    const auto numel = checked_numel(entry.shape);
    RANKWISE_CHECK_CODE(numel.has_value(), ErrorCode::kIo, at(), ": element count of shape ",
                        shape_string(entry.shape), " overflows");
    const auto bytes = checked_bytes(*numel, entry.dtype);
    RANKWISE_CHECK_CODE(bytes.has_value(), ErrorCode::kIo, at(), ": byte size of shape ",
                        shape_string(entry.shape), " in ", dtype_name(entry.dtype),
                        " overflows or is not a whole number of bytes");

    RANKWISE_CHECK_CODE(raw.has_offsets && raw.offsets_ok, ErrorCode::kIo, at(),
                        ": data_offsets must be [begin, end], two non-negative integers");
    entry.begin = raw.offsets[0];
    entry.end = raw.offsets[1];
    RANKWISE_CHECK_CODE(entry.begin <= entry.end, ErrorCode::kIo, at(), ": data_offsets begin ",
                        entry.begin, " is past end ", entry.end);
    RANKWISE_CHECK_CODE(entry.end - entry.begin == *bytes, ErrorCode::kIo, at(), ": data_offsets [",
                        entry.begin, ", ", entry.end, "] span ", entry.end - entry.begin,
                        " bytes but dtype ", dtype_name(entry.dtype), " and shape ",
                        shape_string(entry.shape), " need ", *bytes, " bytes");
    entry.name = std::move(raw.name);
    out.entries.push_back(std::move(entry));
  }

  // The data section must be tiled exactly: in offset order each tensor
  // starts where the previous one ended, and the last one ends the file.
  std::stable_sort(out.entries.begin(), out.entries.end(),
                   [](const HeaderEntry& x, const HeaderEntry& y) {
                     return x.begin != y.begin ? x.begin < y.begin : x.end < y.end;
                   });
  std::uint64_t expected = 0;
  const HeaderEntry* previous = nullptr;
  for (const auto& entry : out.entries) {
    const auto at = [&] { return tensor_where(label, entry.name); };
    if (entry.begin < expected) {
      RANKWISE_CHECK_CODE(false, ErrorCode::kIo, at(), ": data_offsets [", entry.begin, ", ",
                          entry.end, "] overlap tensor \"", name_brief(previous->name),
                          "\", which ends at ", expected);
    }
    if (entry.begin > expected) {
      RANKWISE_CHECK_CODE(
          false, ErrorCode::kIo, at(), ": data_offsets begin at ", entry.begin,
          ", leaving a hole of ", entry.begin - expected, " bytes after ",
          previous ? ::rankwise::detail::concat("tensor \"", name_brief(previous->name), "\"")
                   : std::string("the start of the data section"));
    }
    expected = entry.end;
    previous = &entry;
  }
  RANKWISE_CHECK_CODE(expected <= data_bytes, ErrorCode::kIo, where,
                      ": file is truncated: the tensors need ", expected,
                      " bytes of data but the data section holds ", data_bytes);
  RANKWISE_CHECK_CODE(expected == data_bytes, ErrorCode::kIo, where, ": ", data_bytes - expected,
                      " trailing bytes after the last tensor (data section holds ", data_bytes,
                      " bytes, the tensors cover ", expected, ")");
  return out;
}

// Reads the file through `read(offset, dst, n)`, which must fill dst or throw.
template <class Read>
SafetensorsFile read_safetensors_from(const std::string& label, std::uint64_t file_bytes,
                                      Read&& read) {
  const std::string where = file_where(label);
  RANKWISE_CHECK_CODE(file_bytes >= 8, ErrorCode::kIo, where, ": file is ", file_bytes,
                      " bytes, shorter than the 8-byte header length");
  std::uint8_t prefix[8];
  read(0, prefix, 8);
  const std::uint64_t n = load_le(prefix, 8);
  RANKWISE_CHECK_CODE(n <= kMaxSafetensorsHeaderBytes, ErrorCode::kIo, where, ": header length ", n,
                      " exceeds the limit of ", kMaxSafetensorsHeaderBytes, " bytes");
  RANKWISE_CHECK_CODE(n <= file_bytes - 8, ErrorCode::kIo, where, ": header length ", n,
                      " exceeds the ", file_bytes - 8, " bytes after the length prefix");

  std::string text(static_cast<std::size_t>(n), '\0');
  if (n > 0) read(8, reinterpret_cast<std::uint8_t*>(&text[0]), static_cast<std::size_t>(n));
  ParsedHeader header = parse_header(label, text, file_bytes - 8 - n);

  SafetensorsFile file;
  file.metadata = std::move(header.metadata);
  for (auto& entry : header.entries) {
    SafetensorsTensor tensor;
    tensor.dtype = entry.dtype;
    tensor.shape = std::move(entry.shape);
    const std::uint64_t bytes = entry.end - entry.begin;
    RANKWISE_CHECK_CODE(bytes <= std::numeric_limits<std::size_t>::max(), ErrorCode::kIo,
                        tensor_where(label, entry.name), ": ", bytes,
                        " bytes do not fit in memory");
    tensor.data.resize(static_cast<std::size_t>(bytes));
    if (bytes > 0) read(8 + n + entry.begin, tensor.data.data(), static_cast<std::size_t>(bytes));
    file.tensors.emplace(std::move(entry.name), std::move(tensor));
  }
  return file;
}

}  // namespace detail

/// Parses a safetensors file held in memory. `label` names it in errors.
/// Throws rankwise::error(kIo) naming the rule broken (and the tensor, when
/// one is at fault) for any malformed input; never reads out of bounds.
inline SafetensorsFile parse_safetensors(const std::uint8_t* bytes, std::size_t size,
                                         const std::string& label = "<memory>") {
  return detail::read_safetensors_from(
      label, size, [&](std::uint64_t offset, std::uint8_t* dst, std::size_t n) {
        RANKWISE_CHECK_CODE(offset <= size && n <= size - offset, ErrorCode::kIo,
                            detail::file_where(label), ": read past the end of the buffer");
        std::memcpy(dst, bytes + offset, n);
      });
}

/// Reads and validates the safetensors file at `path` (see parse_safetensors).
/// Only the header is read before validation; tensor data is then read into
/// buffers whose sizes the validated header fixed and the file size bounds.
inline SafetensorsFile read_safetensors(const std::string& path) {
  std::error_code ec;
  const bool regular = std::filesystem::is_regular_file(path, ec);
  RANKWISE_CHECK_CODE(regular && !ec, ErrorCode::kIo, detail::file_where(path),
                      ": not a readable regular file",
                      ec ? ::rankwise::detail::concat(" (", ec.message(), ")") : std::string());
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, detail::file_where(path), ": cannot get its size (",
                      ec.message(), ")");
  std::ifstream in(path, std::ios::binary);
  RANKWISE_CHECK_CODE(in.is_open(), ErrorCode::kIo, detail::file_where(path), ": cannot open it");
  return detail::read_safetensors_from(
      path, static_cast<std::uint64_t>(size),
      [&](std::uint64_t offset, std::uint8_t* dst, std::size_t n) {
        in.seekg(static_cast<std::streamoff>(offset));
        in.read(reinterpret_cast<char*>(dst), static_cast<std::streamsize>(n));
        RANKWISE_CHECK_CODE(in && static_cast<std::size_t>(in.gcount()) == n, ErrorCode::kIo,
                            detail::file_where(path), ": short read of ", n, " bytes at offset ",
                            offset, " (the file changed while being read?)");
      });
}

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------

namespace detail {

inline std::string json_string(const std::string& s, const char* what) {
  try {
    return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
  } catch (const nlohmann::json::exception&) {
    RANKWISE_CHECK(false, "safetensors writer: ", what, " is not valid UTF-8");
  }
  return {};
}

// The header and the tensors in file order, validated.
struct PreparedFile {
  std::string header;  // padded with spaces to a multiple of 8
  std::vector<const SafetensorsTensor*> order;
};

// Lays the file out as safetensors' own writer does: tensors sorted by dtype
// alignment (largest first), then by name; compact JSON with keys dtype,
// shape, data_offsets; __metadata__ first; header padded with spaces to a
// multiple of 8 so the data section (and so each tensor) stays aligned.
inline PreparedFile prepare_file(const SafetensorsFile& file) {
  std::vector<std::pair<const std::string*, const SafetensorsTensor*>> items;
  for (const auto& kv : file.tensors) {
    const std::string& name = kv.first;
    const SafetensorsTensor& t = kv.second;
    RANKWISE_CHECK(name != "__metadata__",
                   "safetensors writer: a tensor may not be named __metadata__");
    const auto numel = checked_numel(t.shape);
    RANKWISE_CHECK(numel.has_value(), "safetensors writer: tensor \"", name, "\" has shape ",
                   shape_string(t.shape), " with a negative dimension or too many elements");
    const auto bytes = checked_bytes(*numel, t.dtype);
    RANKWISE_CHECK(bytes.has_value() && *bytes == t.data.size(), "safetensors writer: tensor \"",
                   name, "\" holds ", t.data.size(), " bytes but dtype ", dtype_name(t.dtype),
                   " and shape ", shape_string(t.shape), " need ",
                   bytes ? std::to_string(*bytes) : std::string("a whole number of"), " bytes");
    items.emplace_back(&name, &t);
  }
  std::stable_sort(items.begin(), items.end(), [](const auto& x, const auto& y) {
    const int ox = dtype_info(x.second->dtype).order;
    const int oy = dtype_info(y.second->dtype).order;
    return ox != oy ? ox > oy : *x.first < *y.first;
  });

  PreparedFile out;
  std::string& h = out.header;
  h = "{";
  bool first = true;
  if (file.metadata) {
    h += "\"__metadata__\":{";
    bool first_meta = true;
    for (const auto& kv : *file.metadata) {
      if (!first_meta) h += ',';
      first_meta = false;
      h += json_string(kv.first, "a __metadata__ key");
      h += ':';
      h += json_string(kv.second, "a __metadata__ value");
    }
    h += '}';
    first = false;
  }
  std::uint64_t offset = 0;
  for (const auto& item : items) {
    if (!first) h += ',';
    first = false;
    h += json_string(*item.first, "a tensor name");
    h += ":{\"dtype\":\"";
    h += dtype_name(item.second->dtype);
    h += "\",\"shape\":[";
    for (std::size_t i = 0; i < item.second->shape.size(); ++i) {
      if (i) h += ',';
      h += std::to_string(item.second->shape[i]);
    }
    const std::uint64_t end = offset + item.second->data.size();
    h += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(end) + "]}";
    offset = end;
    out.order.push_back(item.second);
  }
  h += '}';
  h.append((8 - h.size() % 8) % 8, ' ');
  RANKWISE_CHECK(h.size() <= kMaxSafetensorsHeaderBytes, "safetensors writer: the header would be ",
                 h.size(), " bytes, over the ", kMaxSafetensorsHeaderBytes,
                 "-byte limit readers enforce");
  return out;
}

// A name for a temporary sibling of `target` that no other writer picks.
inline std::filesystem::path temporary_sibling(const std::filesystem::path& target,
                                               const char* tag) {
  static std::atomic<unsigned> counter{0};
  const auto ticks =
      static_cast<unsigned long long>(std::chrono::steady_clock::now().time_since_epoch().count());
  const auto mix = ticks ^ (static_cast<unsigned long long>(++counter) << 48) ^
                   static_cast<unsigned long long>(reinterpret_cast<std::uintptr_t>(&counter));
  char hex[17];
  for (int i = 0; i < 16; ++i) hex[i] = "0123456789abcdef"[(mix >> (4 * (15 - i))) & 0xF];
  hex[16] = '\0';
  std::filesystem::path name = target.filename();
  return target.parent_path() / ("." + name.string() + "." + tag + "-" + hex);
}

// Writes `file` to the stream; the caller checks the stream state.
inline void write_prepared(std::ostream& out, const PreparedFile& prepared) {
  std::uint8_t prefix[8];
  store_le(prefix, prepared.header.size(), 8);
  out.write(reinterpret_cast<const char*>(prefix), 8);
  out.write(prepared.header.data(), static_cast<std::streamsize>(prepared.header.size()));
  for (const auto* t : prepared.order) {
    if (!t->data.empty()) {
      out.write(reinterpret_cast<const char*>(t->data.data()),
                static_cast<std::streamsize>(t->data.size()));
    }
  }
}

// Writes bytes produced by `emit(stream)` to `path` through a temporary file
// in the same directory renamed over it at the end, so `path` is never seen
// half written.
template <class Emit>
void write_file_atomically(const std::filesystem::path& path, Emit&& emit, const char* what) {
  const std::filesystem::path tmp = temporary_sibling(path, "tmp");
  std::error_code ec;
  try {
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      RANKWISE_CHECK_CODE(out.is_open(), ErrorCode::kIo, what, " \"", path.string(),
                          "\": cannot create temporary file \"", tmp.string(), "\"");
      emit(out);
      out.flush();
      RANKWISE_CHECK_CODE(static_cast<bool>(out), ErrorCode::kIo, what, " \"", path.string(),
                          "\": writing \"", tmp.string(), "\" failed");
    }
    std::filesystem::rename(tmp, path, ec);
    RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, what, " \"", path.string(), "\": cannot rename \"",
                        tmp.string(), "\" into place (", ec.message(), ")");
  } catch (...) {
    std::filesystem::remove(tmp, ec);
    throw;
  }
}

}  // namespace detail

/// The bytes of `file` in safetensors format, laid out as the reference
/// implementation lays them out (so a file it wrote reads and re-serializes
/// to the identical bytes). Throws rankwise::error(kInvalidArgument) when a
/// tensor's data does not match its dtype and shape.
inline std::vector<std::uint8_t> serialize_safetensors(const SafetensorsFile& file) {
  const detail::PreparedFile prepared = detail::prepare_file(file);
  std::size_t total = 8 + prepared.header.size();
  for (const auto* t : prepared.order) total += t->data.size();
  std::vector<std::uint8_t> out(total);
  detail::store_le(out.data(), prepared.header.size(), 8);
  std::memcpy(out.data() + 8, prepared.header.data(), prepared.header.size());
  std::size_t at = 8 + prepared.header.size();
  for (const auto* t : prepared.order) {
    if (!t->data.empty()) std::memcpy(out.data() + at, t->data.data(), t->data.size());
    at += t->data.size();
  }
  return out;
}

/// Writes `file` to `path` (see serialize_safetensors), through a temporary
/// file renamed into place so `path` never holds a partial file.
inline void write_safetensors(const SafetensorsFile& file, const std::string& path) {
  const detail::PreparedFile prepared = detail::prepare_file(file);
  detail::write_file_atomically(
      std::filesystem::path(path),
      [&](std::ostream& out) { detail::write_prepared(out, prepared); }, "safetensors file");
}

// ---------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------

/// The values of `tensor` as a HostTensor (exact: every F32, F16, BF16 and F64
/// value is a double). Throws rankwise::error(kInvalidArgument) for a dtype
/// without value conversion (integers, bool, 8-bit and smaller floats,
/// complex) or data of the wrong size; `name` labels the tensor in errors.
inline HostTensor to_host_tensor(const SafetensorsTensor& tensor, const std::string& name = "") {
  RANKWISE_CHECK(dtype_has_values(tensor.dtype), "safetensors: tensor \"", name, "\" has dtype ",
                 dtype_name(tensor.dtype),
                 ", which rankwise does not convert to values (supported: F32, F16, BF16, F64)");
  const auto numel = detail::checked_numel(tensor.shape);
  RANKWISE_CHECK(numel.has_value(), "safetensors: tensor \"", name, "\" has invalid shape ",
                 detail::shape_string(tensor.shape));
  const int width = dtype_bits(tensor.dtype) / 8;
  const auto bytes = detail::checked_bytes(*numel, tensor.dtype);
  RANKWISE_CHECK(bytes.has_value() && tensor.data.size() == *bytes, "safetensors: tensor \"", name,
                 "\" holds ", tensor.data.size(), " bytes for shape ",
                 detail::shape_string(tensor.shape), " in ", dtype_name(tensor.dtype));
  HostTensor out;
  out.shape = tensor.shape;
  out.values.resize(static_cast<std::size_t>(*numel));
  const std::uint8_t* p = tensor.data.data();
  for (std::size_t i = 0; i < out.values.size(); ++i, p += width) {
    const std::uint64_t bits = detail::load_le(p, width);
    switch (tensor.dtype) {
      case DType::kF32:
        out.values[i] = detail::decode_float_bits(bits, 8, 23);
        break;
      case DType::kF16:
        out.values[i] = detail::decode_float_bits(bits, 5, 10);
        break;
      case DType::kBF16:
        out.values[i] = detail::decode_float_bits(bits, 8, 7);
        break;
      default:
        std::memcpy(&out.values[i], &bits, sizeof(double));
        break;  // F64
    }
  }
  return out;
}

/// `host` stored as `dtype` (F32, F16, BF16 or F64), rounded to nearest, ties
/// to even. A finite value too large for `dtype` is an error rather than a
/// silent infinity; NaN and infinities are kept. Throws
/// rankwise::error(kInvalidArgument); `name` labels the tensor in errors.
inline SafetensorsTensor from_host_tensor(const HostTensor& host, DType dtype,
                                          const std::string& name = "") {
  RANKWISE_CHECK(dtype_has_values(dtype), "safetensors: cannot store tensor \"", name, "\" as ",
                 dtype_name(dtype), " (supported: F32, F16, BF16, F64)");
  const auto numel = detail::checked_numel(host.shape);
  RANKWISE_CHECK(numel.has_value(), "safetensors: tensor \"", name, "\" has invalid shape ",
                 detail::shape_string(host.shape));
  RANKWISE_CHECK(host.values.size() == static_cast<std::uint64_t>(*numel), "safetensors: tensor \"",
                 name, "\" holds ", host.values.size(), " values for shape ",
                 detail::shape_string(host.shape));
  SafetensorsTensor out;
  out.dtype = dtype;
  out.shape = host.shape;
  const int width = dtype_bits(dtype) / 8;
  const int exp_bits = dtype == DType::kF16 ? 5 : 8;  // F32 and BF16 share float's exponent
  const int man_bits = width * 8 - 1 - exp_bits;
  const std::uint64_t exp_all = (std::uint64_t{1} << exp_bits) - 1;
  out.data.resize(host.values.size() * static_cast<std::size_t>(width));
  std::uint8_t* p = out.data.data();
  for (std::size_t i = 0; i < host.values.size(); ++i, p += width) {
    const double v = host.values[i];
    std::uint64_t bits = 0;
    if (dtype == DType::kF64) {
      std::memcpy(&bits, &v, sizeof(double));
    } else {
      bits = detail::encode_float_bits(v, exp_bits, man_bits);
      // The exponent field all ones from a finite value means it rounded to infinity.
      RANKWISE_CHECK(!std::isfinite(v) || ((bits >> man_bits) & exp_all) != exp_all,
                     "safetensors: value ", v, " at index ", i, " of tensor \"", name,
                     "\" overflows ", dtype_name(dtype));
    }
    detail::store_le(p, bits, width);
  }
  return out;
}

/// Every tensor of `file` as values (see to_host_tensor).
inline TensorMap to_tensor_map(const SafetensorsFile& file) {
  TensorMap out;
  for (const auto& kv : file.tensors) out.emplace(kv.first, to_host_tensor(kv.second, kv.first));
  return out;
}

/// Every tensor of `map` stored as `dtype` (see from_host_tensor), no metadata.
inline SafetensorsFile from_tensor_map(const TensorMap& map, DType dtype) {
  SafetensorsFile out;
  for (const auto& kv : map)
    out.tensors.emplace(kv.first, from_host_tensor(kv.second, dtype, kv.first));
  return out;
}

}  // namespace io
}  // namespace rankwise
