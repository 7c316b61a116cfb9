// GGUF files (version 3, little endian) and llama.cpp's LoRA adapter form of them: a validating
// reader, a writer laid out as gguf-py writes, the export of a PEFT LoRA, and the checks
// llama.cpp applies when it loads an adapter.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "rankwise/core/error.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/io/module_names.hpp"
#include "rankwise/io/peft_adapter.hpp"
#include "rankwise/io/safetensors.hpp"

namespace rankwise {
namespace io {

/// GGUF metadata value types (gguf-py GGUFValueType).
enum class GgufType : std::uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

/// The ggml tensor types rankwise reads and writes (ggml_type values).
enum class GgmlType : std::uint32_t { kF32 = 0, kF16 = 1, kBF16 = 30 };

/// One metadata value: a scalar (number, bool or string) or an array of them.
struct GgufValue {
  GgufType type = GgufType::kUint32;     ///< kArray for arrays
  GgufType element = GgufType::kUint32;  ///< arrays: the element type
  std::uint64_t u = 0;                   ///< unsigned types and bool
  std::int64_t i = 0;                    ///< signed types
  double f = 0;                          ///< float types (float32 held exactly)
  std::string s;                         ///< kString
  std::vector<GgufValue> items;          ///< kArray

  static GgufValue string(std::string v) {
    GgufValue out;
    out.type = GgufType::kString;
    out.s = std::move(v);
    return out;
  }
  static GgufValue float32(float v) {
    GgufValue out;
    out.type = GgufType::kFloat32;
    out.f = v;
    return out;
  }
  static GgufValue uint32(std::uint32_t v) {
    GgufValue out;
    out.type = GgufType::kUint32;
    out.u = v;
    return out;
  }
};

/// One tensor: ggml dimension order (ne[0] varies fastest), raw little-endian bytes.
struct GgufTensor {
  std::string name;
  GgmlType type = GgmlType::kF32;
  std::vector<std::int64_t> ne;
  std::vector<std::uint8_t> data;
};

/// A GGUF file: metadata in file order, tensors in file order.
struct GgufFile {
  std::uint32_t version = 3;
  std::vector<std::pair<std::string, GgufValue>> kv;
  std::vector<GgufTensor> tensors;

  const GgufValue* find(const std::string& key) const {
    for (const auto& p : kv) {
      if (p.first == key) return &p.second;
    }
    return nullptr;
  }
  const GgufTensor* find_tensor(const std::string& name) const {
    for (const auto& t : tensors) {
      if (t.name == name) return &t;
    }
    return nullptr;
  }
  /// The alignment of tensor data: general.alignment, or 32.
  std::uint64_t alignment() const {
    const GgufValue* v = find("general.alignment");
    return v != nullptr && v->type == GgufType::kUint32 ? v->u : 32;
  }
};

/// Limits of the reader: ggml's name limit (GGML_MAX_NAME, names are shorter),
/// its dimension limit, and bounds of rankwise's own on strings and arrays.
inline constexpr std::size_t kGgmlMaxName = 64;
inline constexpr std::uint32_t kGgmlMaxDims = 4;
inline constexpr std::uint64_t kMaxGgufString = std::uint64_t{1} << 24;
inline constexpr std::uint64_t kMaxGgufArray = std::uint64_t{1} << 26;

namespace detail {

inline const char* ggml_type_name(GgmlType t) {
  switch (t) {
    case GgmlType::kF32:
      return "F32";
    case GgmlType::kF16:
      return "F16";
    case GgmlType::kBF16:
      return "BF16";
  }
  return "?";
}
inline int ggml_type_bytes(GgmlType t) { return t == GgmlType::kF32 ? 4 : 2; }

inline int gguf_scalar_bytes(GgufType t) {
  switch (t) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kBool:
      return 1;
    case GgufType::kUint16:
    case GgufType::kInt16:
      return 2;
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kFloat32:
      return 4;
    case GgufType::kUint64:
    case GgufType::kInt64:
    case GgufType::kFloat64:
      return 8;
    default:
      return 0;  // string (variable), array (not a scalar)
  }
}

// A bounded cursor over the file's bytes; every read checks what is left.
class GgufCursor {
 public:
  GgufCursor(const std::uint8_t* data, std::size_t size, const std::string& where)
      : data_(data), size_(size), where_(where) {}

  std::uint64_t pos() const { return pos_; }
  std::uint64_t left() const { return size_ - pos_; }
  const std::string& where() const { return where_; }

  std::uint64_t uint(int bytes, const char* what) {
    need(static_cast<std::uint64_t>(bytes), what);
    const std::uint64_t v = load_le(data_ + pos_, bytes);
    pos_ += static_cast<std::uint64_t>(bytes);
    return v;
  }
  std::string string(const char* what) {
    const std::uint64_t n = uint(8, what);
    RANKWISE_CHECK_CODE(n <= kMaxGgufString, ErrorCode::kIo, where_, ": ", what, " at offset ",
                        pos_ - 8, " is ", n, " bytes, over the ", kMaxGgufString, "-byte limit");
    need(n, what);
    std::string out(reinterpret_cast<const char*>(data_ + pos_), static_cast<std::size_t>(n));
    pos_ += n;
    return out;
  }
  void need(std::uint64_t n, const char* what) const {
    RANKWISE_CHECK_CODE(n <= left(), ErrorCode::kIo, where_, ": truncated: ", what, " at offset ",
                        pos_, " needs ", n, " bytes, ", left(), " left in the file");
  }
  void seek(std::uint64_t at) {
    RANKWISE_CHECK_CODE(at <= size_, ErrorCode::kIo, where_, ": truncated: offset ", at,
                        " is past the end of the file (", size_, " bytes)");
    pos_ = at;
  }
  const std::uint8_t* at(std::uint64_t offset) const { return data_ + offset; }

 private:
  const std::uint8_t* data_;
  std::uint64_t size_;
  std::uint64_t pos_ = 0;
  std::string where_;
};

inline GgufValue read_gguf_scalar(GgufCursor& c, GgufType type, const std::string& key) {
  GgufValue v;
  v.type = type;
  const char* what = "a metadata value";
  switch (type) {
    case GgufType::kUint8:
    case GgufType::kUint16:
    case GgufType::kUint32:
    case GgufType::kUint64:
      v.u = c.uint(gguf_scalar_bytes(type), what);
      break;
    case GgufType::kBool:
      v.u = c.uint(1, what) != 0 ? 1 : 0;
      break;
    case GgufType::kInt8:
    case GgufType::kInt16:
    case GgufType::kInt32:
    case GgufType::kInt64: {
      const int bytes = gguf_scalar_bytes(type);
      const std::uint64_t raw = c.uint(bytes, what);
      const int shift = 64 - 8 * bytes;
      v.i = static_cast<std::int64_t>(raw << shift) >> shift;  // sign-extend
      break;
    }
    case GgufType::kFloat32:
      v.f = float_bits_to_double(static_cast<std::uint32_t>(c.uint(4, what)));
      break;
    case GgufType::kFloat64: {
      const std::uint64_t raw = c.uint(8, what);
      std::memcpy(&v.f, &raw, sizeof raw);
      break;
    }
    case GgufType::kString:
      v.s = c.string("a metadata string");
      break;
    default:
      RANKWISE_CHECK_CODE(false, ErrorCode::kIo, c.where(), ": key \"", name_brief(key),
                          "\" has invalid GGUF type ", static_cast<std::uint32_t>(type));
  }
  return v;
}

}  // namespace detail

/// Parses a GGUF file held in memory with the rules of ggml's gguf reader:
/// magic "GGUF", version 2 or 3 in this byte order, unique non-empty keys of
/// known types (no arrays of arrays), general.alignment a power of two of type
/// uint32, unique tensor names shorter than 64 bytes, at most 4 dimensions,
/// non-negative and non-overflowing sizes, tensor offsets that follow each
/// other in order with the alignment's padding, and data inside the file.
/// Only F32, F16 and BF16 tensors are read. Throws rankwise::error(kIo) naming
/// the file, the key or tensor and the rule.
inline GgufFile parse_gguf(const std::uint8_t* bytes, std::size_t size,
                           const std::string& label = "<memory>") {
  using detail::GgufCursor;
  const std::string where = ::rankwise::detail::concat("GGUF file \"", label, "\"");
  GgufCursor c(bytes, size, where);
  c.need(4, "the magic");
  RANKWISE_CHECK_CODE(std::memcmp(bytes, "GGUF", 4) == 0, ErrorCode::kIo, where,
                      ": invalid magic, expected \"GGUF\"");
  c.seek(4);
  GgufFile file;
  file.version = static_cast<std::uint32_t>(c.uint(4, "the version"));
  RANKWISE_CHECK_CODE((file.version & 0xFFFF) != 0, ErrorCode::kIo, where, ": version ",
                      file.version, " (a big-endian file?); only little endian is read");
  RANKWISE_CHECK_CODE(file.version == 2 || file.version == 3, ErrorCode::kIo, where, ": version ",
                      file.version, " is not supported (2 or 3)");
  const std::uint64_t n_tensors = c.uint(8, "the tensor count");
  const std::uint64_t n_kv = c.uint(8, "the metadata count");
  // Each entry takes at least 13 (key) or 24 (tensor info) bytes: bounds the counts by the file.
  RANKWISE_CHECK_CODE(n_kv <= c.left() / 13 && n_tensors <= c.left() / 24, ErrorCode::kIo, where,
                      ": truncated: ", n_kv, " metadata entries and ", n_tensors,
                      " tensors cannot fit in the file's ", size, " bytes");
  std::set<std::string> keys;
  for (std::uint64_t k = 0; k < n_kv; ++k) {
    std::string key = c.string("a metadata key");
    RANKWISE_CHECK_CODE(!key.empty(), ErrorCode::kIo, where, ": metadata key ", k, " is empty");
    RANKWISE_CHECK_CODE(keys.insert(key).second, ErrorCode::kIo, where, ": duplicate key \"",
                        detail::name_brief(key), "\"");
    const auto type = static_cast<GgufType>(c.uint(4, "a metadata type"));
    GgufValue v;
    if (type == GgufType::kArray) {
      v.type = GgufType::kArray;
      v.element = static_cast<GgufType>(c.uint(4, "an array type"));
      RANKWISE_CHECK_CODE(
          v.element != GgufType::kArray && static_cast<std::uint32_t>(v.element) <= 12,
          ErrorCode::kIo, where, ": key \"", detail::name_brief(key),
          "\" is an array of invalid type ", static_cast<std::uint32_t>(v.element));
      const std::uint64_t n = c.uint(8, "an array length");
      const int each =
          std::max(detail::gguf_scalar_bytes(v.element), v.element == GgufType::kString ? 8 : 1);
      RANKWISE_CHECK_CODE(n <= kMaxGgufArray && n <= c.left() / static_cast<std::uint64_t>(each),
                          ErrorCode::kIo, where, ": key \"", detail::name_brief(key), "\" holds ",
                          n, " elements, more than the file or the ", kMaxGgufArray,
                          "-element limit allows");
      v.items.reserve(static_cast<std::size_t>(n));
      for (std::uint64_t i = 0; i < n; ++i)
        v.items.push_back(detail::read_gguf_scalar(c, v.element, key));
    } else {
      v = detail::read_gguf_scalar(c, type, key);
    }
    file.kv.emplace_back(std::move(key), std::move(v));
  }
  const GgufValue* align = file.find("general.alignment");
  RANKWISE_CHECK_CODE(align == nullptr || align->type == GgufType::kUint32, ErrorCode::kIo, where,
                      ": general.alignment must be of type uint32");
  const std::uint64_t alignment = file.alignment();
  RANKWISE_CHECK_CODE(alignment != 0 && (alignment & (alignment - 1)) == 0, ErrorCode::kIo, where,
                      ": alignment ", alignment, " is not a power of 2");

  struct Info {
    std::uint64_t offset = 0;
    std::uint64_t bytes = 0;
  };
  std::vector<Info> infos;
  std::set<std::string> names;
  for (std::uint64_t t = 0; t < n_tensors; ++t) {
    GgufTensor tensor;
    tensor.name = c.string("a tensor name");
    const std::string at =
        ::rankwise::detail::concat(where, ", tensor \"", detail::name_brief(tensor.name), "\"");
    RANKWISE_CHECK_CODE(tensor.name.size() < kGgmlMaxName, ErrorCode::kIo, at, ": name is ",
                        tensor.name.size(), " bytes, ggml's limit is ", kGgmlMaxName - 1);
    RANKWISE_CHECK_CODE(names.insert(tensor.name).second, ErrorCode::kIo, at, ": duplicate name");
    const std::uint64_t n_dims = c.uint(4, "a dimension count");
    RANKWISE_CHECK_CODE(n_dims <= kGgmlMaxDims, ErrorCode::kIo, at, ": ", n_dims,
                        " dimensions, ggml's limit is ", kGgmlMaxDims);
    std::uint64_t numel = 1;
    bool overflow = false;
    for (std::uint64_t d = 0; d < n_dims; ++d) {
      const auto ne = static_cast<std::int64_t>(c.uint(8, "a dimension"));
      RANKWISE_CHECK_CODE(ne >= 0, ErrorCode::kIo, at, ": dimension ", d, " is negative (", ne,
                          ")");
      if (ne != 0 && numel > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) /
                                 static_cast<std::uint64_t>(ne)) {
        overflow = true;
      }
      numel *= static_cast<std::uint64_t>(ne);
      tensor.ne.push_back(ne);
    }
    RANKWISE_CHECK_CODE(!overflow, ErrorCode::kIo, at, ": its element count overflows int64");
    const auto type = static_cast<std::uint32_t>(c.uint(4, "a tensor type"));
    RANKWISE_CHECK_CODE(type == 0 || type == 1 || type == 30, ErrorCode::kIo, at, ": ggml type ",
                        type, " is not one rankwise reads (F32 = 0, F16 = 1, BF16 = 30)");
    tensor.type = static_cast<GgmlType>(type);
    Info info;
    info.offset = c.uint(8, "a tensor offset");
    info.bytes = numel * static_cast<std::uint64_t>(detail::ggml_type_bytes(tensor.type));
    file.tensors.push_back(std::move(tensor));
    infos.push_back(info);
  }
  // The data section starts at the next multiple of the alignment.
  std::uint64_t data_start = c.pos();
  if (n_tensors > 0) {
    data_start = (c.pos() + alignment - 1) / alignment * alignment;
    c.seek(data_start);
  }
  std::uint64_t expected = 0;
  for (std::size_t t = 0; t < infos.size(); ++t) {
    const std::string at = ::rankwise::detail::concat(
        where, ", tensor \"", detail::name_brief(file.tensors[t].name), "\"");
    RANKWISE_CHECK_CODE(infos[t].offset == expected, ErrorCode::kIo, at, ": offset ",
                        infos[t].offset, ", expected ", expected,
                        " (tensors follow each other, each padded to ", alignment, " bytes)");
    RANKWISE_CHECK_CODE(infos[t].bytes <= size - data_start &&
                            infos[t].offset <= size - data_start - infos[t].bytes,
                        ErrorCode::kIo, at, ": truncated: its ", infos[t].bytes,
                        " bytes at data offset ", infos[t].offset, " end past the file's ", size,
                        " bytes");
    const std::uint8_t* p = c.at(data_start + infos[t].offset);
    file.tensors[t].data.assign(p, p + infos[t].bytes);
    expected += (infos[t].bytes + alignment - 1) / alignment * alignment;
  }
  return file;
}

/// Reads and validates the GGUF file at `path` (see parse_gguf).
inline GgufFile read_gguf(const std::string& path) {
  std::error_code ec;
  const std::string where = ::rankwise::detail::concat("GGUF file \"", path, "\"");
  RANKWISE_CHECK_CODE(std::filesystem::is_regular_file(path, ec) && !ec, ErrorCode::kIo, where,
                      ": not a readable regular file");
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  RANKWISE_CHECK_CODE(!ec, ErrorCode::kIo, where, ": cannot get its size (", ec.message(), ")");
  std::ifstream in(path, std::ios::binary);
  RANKWISE_CHECK_CODE(in.is_open(), ErrorCode::kIo, where, ": cannot open it");
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size));
  if (size > 0) in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  RANKWISE_CHECK_CODE(static_cast<std::uintmax_t>(in.gcount()) == size, ErrorCode::kIo, where,
                      ": short read");
  return parse_gguf(bytes.data(), bytes.size(), path);
}

namespace detail {

inline void put_uint(std::vector<std::uint8_t>& out, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}
inline void put_string(std::vector<std::uint8_t>& out, const std::string& s) {
  put_uint(out, s.size(), 8);
  out.insert(out.end(), s.begin(), s.end());
}
inline void put_scalar(std::vector<std::uint8_t>& out, const GgufValue& v, GgufType type) {
  switch (type) {
    case GgufType::kString:
      put_string(out, v.s);
      break;
    case GgufType::kFloat32:
      put_uint(out, double_to_float_bits(v.f), 4);
      break;
    case GgufType::kFloat64: {
      std::uint64_t raw = 0;
      std::memcpy(&raw, &v.f, sizeof raw);
      put_uint(out, raw, 8);
      break;
    }
    case GgufType::kInt8:
    case GgufType::kInt16:
    case GgufType::kInt32:
    case GgufType::kInt64:
      put_uint(out, static_cast<std::uint64_t>(v.i), gguf_scalar_bytes(type));
      break;
    default:
      put_uint(out, v.u, gguf_scalar_bytes(type));
  }
}

}  // namespace detail

/// The bytes of `file` as gguf-py writes them: header, metadata in order,
/// tensor infos (offsets computed here), zero padding to the alignment, then
/// each tensor's data padded to the alignment. Throws
/// rankwise::error(kInvalidArgument) for data that does not match its shape
/// or a name ggml would refuse.
inline std::vector<std::uint8_t> serialize_gguf(const GgufFile& file) {
  const std::uint64_t alignment = file.alignment();
  RANKWISE_CHECK(alignment != 0 && (alignment & (alignment - 1)) == 0, "GGUF writer: alignment ",
                 alignment, " is not a power of 2");
  std::vector<std::uint8_t> out;
  for (const char c : {'G', 'G', 'U', 'F'}) out.push_back(static_cast<std::uint8_t>(c));
  detail::put_uint(out, 3, 4);
  detail::put_uint(out, file.tensors.size(), 8);
  detail::put_uint(out, file.kv.size(), 8);
  std::set<std::string> keys;
  for (const auto& p : file.kv) {
    RANKWISE_CHECK(!p.first.empty() && keys.insert(p.first).second, "GGUF writer: key \"", p.first,
                   "\" is empty or repeated");
    detail::put_string(out, p.first);
    detail::put_uint(out, static_cast<std::uint32_t>(p.second.type), 4);
    if (p.second.type == GgufType::kArray) {
      RANKWISE_CHECK(p.second.element != GgufType::kArray, "GGUF writer: key \"", p.first,
                     "\" is an array of arrays");
      detail::put_uint(out, static_cast<std::uint32_t>(p.second.element), 4);
      detail::put_uint(out, p.second.items.size(), 8);
      for (const auto& item : p.second.items) detail::put_scalar(out, item, p.second.element);
    } else {
      detail::put_scalar(out, p.second, p.second.type);
    }
  }
  std::uint64_t offset = 0;
  std::set<std::string> names;
  for (const auto& t : file.tensors) {
    RANKWISE_CHECK(!t.name.empty() && t.name.size() < kGgmlMaxName && names.insert(t.name).second,
                   "GGUF writer: tensor name \"", t.name,
                   "\" is empty, repeated or not shorter than ", kGgmlMaxName,
                   " bytes (ggml's limit)");
    RANKWISE_CHECK(!t.ne.empty() && t.ne.size() <= kGgmlMaxDims, "GGUF writer: tensor \"", t.name,
                   "\" has ", t.ne.size(), " dimensions (1 to 4)");
    std::uint64_t numel = 1;
    for (auto d : t.ne) {
      RANKWISE_CHECK(d >= 0, "GGUF writer: tensor \"", t.name, "\" has a negative dimension");
      numel *= static_cast<std::uint64_t>(d);
    }
    RANKWISE_CHECK(
        t.data.size() == numel * static_cast<std::uint64_t>(detail::ggml_type_bytes(t.type)),
        "GGUF writer: tensor \"", t.name, "\" holds ", t.data.size(), " bytes, its shape and ",
        detail::ggml_type_name(t.type), " need ",
        numel * static_cast<std::uint64_t>(detail::ggml_type_bytes(t.type)));
    detail::put_string(out, t.name);
    detail::put_uint(out, t.ne.size(), 4);
    for (auto d : t.ne) detail::put_uint(out, static_cast<std::uint64_t>(d), 8);
    detail::put_uint(out, static_cast<std::uint32_t>(t.type), 4);
    detail::put_uint(out, offset, 8);
    offset += (t.data.size() + alignment - 1) / alignment * alignment;
  }
  out.resize((out.size() + alignment - 1) / alignment * alignment, 0);
  for (const auto& t : file.tensors) {
    out.insert(out.end(), t.data.begin(), t.data.end());
    out.resize((out.size() + alignment - 1) / alignment * alignment, 0);
  }
  return out;
}

/// Writes `file` to `path` through a temporary file renamed into place.
inline void write_gguf(const GgufFile& file, const std::string& path) {
  const std::vector<std::uint8_t> bytes = serialize_gguf(file);
  detail::write_file_atomically(
      std::filesystem::path(path),
      [&](std::ostream& out) {
        out.write(reinterpret_cast<const char*>(bytes.data()),
                  static_cast<std::streamsize>(bytes.size()));
      },
      "GGUF file");
}

// ---------------------------------------------------------------------------
// llama.cpp LoRA adapters
// ---------------------------------------------------------------------------

/// How a PEFT LoRA becomes a llama.cpp adapter.
struct GgufLoraOptions {
  ModuleNameMap names;  ///< its architecture() is general.architecture
  GgmlType type = GgmlType::kF32;
  std::string name;  ///< general.name; empty: not written
};

/// One LoRA pair of a llama.cpp adapter, with the scale llama.cpp applies.
struct GgufLoraModule {
  std::string base_tensor;  ///< e.g. "blk.0.attn_q.weight"
  HostTensor a;             ///< (r x n_embd_in): lora_a, ggml ne = [n_embd_in, r]
  HostTensor b;             ///< (n_embd_out x r): lora_b, ggml ne = [r, n_embd_out]
  double scale = 1;         ///< alpha / r as llama.cpp computes it (in float), 1 when alpha is 0
};

namespace detail {

inline GgufTensor ggml_tensor_from(const HostTensor& t, GgmlType type, const std::string& name) {
  RANKWISE_CHECK(t.shape.size() == 2, "GGUF writer: tensor \"", name, "\" is not a matrix");
  const DType dtype = type == GgmlType::kF32   ? DType::kF32
                      : type == GgmlType::kF16 ? DType::kF16
                                               : DType::kBF16;
  GgufTensor out;
  out.name = name;
  out.type = type;
  out.ne = {t.shape[1], t.shape[0]};  // row-major (rows x cols) is ggml [cols, rows]
  out.data = from_host_tensor(t, dtype, name).data;
  return out;
}

inline HostTensor host_from_ggml(const GgufTensor& t) {
  SafetensorsTensor st;
  st.dtype = t.type == GgmlType::kF32   ? DType::kF32
             : t.type == GgmlType::kF16 ? DType::kF16
                                        : DType::kBF16;
  st.shape.assign(t.ne.rbegin(), t.ne.rend());
  st.data = t.data;
  return to_host_tensor(st, t.name);
}

// llama.cpp computes a module's scale as alpha / rank in float.
inline double llama_scale(double alpha, std::int64_t rank) {
  if (static_cast<float>(alpha) == 0.0f) return 1.0;
  return static_cast<double>(static_cast<float>(alpha) / static_cast<float>(rank));
}

}  // namespace detail

/// The llama.cpp adapter of `adapter` (general.architecture,
/// general.type = "adapter", adapter.type = "lora", adapter.lora.alpha;
/// tensors "<base tensor>.lora_a" (ggml [n_embd_in, r], PEFT's A as is) and
/// ".lora_b" ([r, n_embd_out], PEFT's B as is), in module order).
///
/// llama.cpp applies one alpha to every module (scale alpha / r), so the
/// alpha written is the most common alpha_eff = scale · r over the modules
/// when float holds it exactly, else the most common rank (scale 1); a
/// module whose own scale differs from what llama.cpp would compute then
/// carries the ratio folded into its B. rsLoRA and per-module alphas are so
/// reproduced exactly (up to the storage type's rounding of the folded B).
/// Throws rankwise::error naming the module: no name rule for it, a tensor
/// name over ggml's limit, two modules on one base tensor, non-finite values.
inline GgufFile gguf_lora_from(const PeftAdapter& adapter, const GgufLoraOptions& options) {
  RANKWISE_CHECK(!options.names.architecture().empty(),
                 "GGUF LoRA export: the name map has no architecture");
  RANKWISE_CHECK(!adapter.modules.empty(), "GGUF LoRA export: the adapter has no modules");
  std::map<double, std::size_t> alpha_counts;
  std::map<std::int64_t, std::size_t> rank_counts;
  for (const auto& m : adapter.modules) {
    ++alpha_counts[m.scale * static_cast<double>(m.rank)];
    ++rank_counts[m.rank];
  }
  const auto most = [](const auto& counts) {
    auto best = counts.begin();
    for (auto it = counts.begin(); it != counts.end(); ++it) {
      if (it->second > best->second) best = it;
    }
    return best->first;
  };
  double alpha = most(alpha_counts);
  if (static_cast<double>(static_cast<float>(alpha)) != alpha || alpha == 0) {
    alpha = static_cast<double>(most(rank_counts));
  }

  GgufFile file;
  file.kv.emplace_back("general.architecture", GgufValue::string(options.names.architecture()));
  file.kv.emplace_back("general.type", GgufValue::string("adapter"));
  if (!options.name.empty()) file.kv.emplace_back("general.name", GgufValue::string(options.name));
  file.kv.emplace_back("adapter.type", GgufValue::string("lora"));
  file.kv.emplace_back("adapter.lora.alpha", GgufValue::float32(static_cast<float>(alpha)));
  std::set<std::string> targets;
  for (const auto& m : adapter.modules) {
    const std::string at =
        ::rankwise::detail::concat("GGUF LoRA export: module \"", detail::name_brief(m.name), "\"");
    const auto base = options.names.map(m.name);
    RANKWISE_CHECK(base.has_value(), at, ": no ", options.names.architecture(),
                   " name rule maps it to a GGUF tensor (add one to the ModuleNameMap)");
    RANKWISE_CHECK(targets.insert(*base).second, at, ": maps to \"", *base,
                   "\", which another module maps to as well");
    RANKWISE_CHECK(base->size() + 7 < kGgmlMaxName, at, ": tensor name \"", *base,
                   ".lora_a\" is not shorter than ggml's ", kGgmlMaxName, "-byte limit");
    const auto bad_a = std::count_if(m.a.values.begin(), m.a.values.end(),
                                     [](double v) { return !std::isfinite(v); });
    const auto bad_b = std::count_if(m.b.values.begin(), m.b.values.end(),
                                     [](double v) { return !std::isfinite(v); });
    RANKWISE_CHECK(bad_a == 0 && bad_b == 0, at, ": lora_A holds ", bad_a, " and lora_B ", bad_b,
                   " non-finite values (NaN or infinity); refusing to export them");
    RANKWISE_CHECK(m.a.shape.size() == 2 && m.b.shape.size() == 2 && m.a.shape[0] == m.rank &&
                       m.b.shape[1] == m.rank,
                   at, ": lora_A ", detail::shape_string(m.a.shape), " and lora_B ",
                   detail::shape_string(m.b.shape), " do not have rank ", m.rank);
    HostTensor b = m.b;
    const double applied = detail::llama_scale(alpha, m.rank);
    if (static_cast<float>(m.scale) != static_cast<float>(applied)) {
      const double ratio = m.scale / applied;
      for (double& v : b.values) v *= ratio;
    }
    file.tensors.push_back(detail::ggml_tensor_from(m.a, options.type, *base + ".lora_a"));
    file.tensors.push_back(detail::ggml_tensor_from(b, options.type, *base + ".lora_b"));
  }
  return file;
}

/// Writes gguf_lora_from(adapter, options) to `path` (temporary file, then rename).
inline void write_gguf_lora(const PeftAdapter& adapter, const std::string& path,
                            const GgufLoraOptions& options) {
  write_gguf(gguf_lora_from(adapter, options), path);
}

/// The LoRA pairs of a llama.cpp adapter file, checked as llama.cpp's
/// llama_adapter_lora_init checks them: general.type "adapter", adapter.type
/// "lora", general.architecture present (and equal to `architecture` when
/// given), every tensor named "<base>.lora_a" or "<base>.lora_b" (norm
/// vectors "_norm.weight" are skipped, as llama.cpp does), each pair complete,
/// lora_a's ne[1] equal to lora_b's ne[0] (the rank); and, for every base
/// tensor in `base_shapes` (ggml ne of the base model's tensors), the base
/// exists and its ne[0] equals lora_a's ne[0], its ne[1] lora_b's ne[1].
/// Throws rankwise::error(kIo) with llama.cpp's reason.
inline std::vector<GgufLoraModule> gguf_lora_modules(
    const GgufFile& file, const std::string& architecture = "",
    const std::map<std::string, std::vector<std::int64_t>>* base_shapes = nullptr,
    const std::string& label = "<memory>") {
  const std::string where = ::rankwise::detail::concat("GGUF LoRA \"", label, "\"");
  const auto str = [&](const char* key) {
    const GgufValue* v = file.find(key);
    return v != nullptr && v->type == GgufType::kString ? v->s : std::string();
  };
  RANKWISE_CHECK_CODE(str("general.type") == "adapter", ErrorCode::kIo, where,
                      ": expect general.type to be 'adapter', but got: '", str("general.type"),
                      "'");
  RANKWISE_CHECK_CODE(!str("general.architecture").empty(), ErrorCode::kIo, where,
                      ": general.architecture is missing");
  RANKWISE_CHECK_CODE(architecture.empty() || str("general.architecture") == architecture,
                      ErrorCode::kIo, where, ": model arch and LoRA arch mismatch (", architecture,
                      " vs ", str("general.architecture"), ")");
  RANKWISE_CHECK_CODE(str("adapter.type") == "lora", ErrorCode::kIo, where,
                      ": expect adapter.type to be 'lora', but got: '", str("adapter.type"), "'");
  const GgufValue* alpha_v = file.find("adapter.lora.alpha");
  RANKWISE_CHECK_CODE(alpha_v == nullptr || alpha_v->type == GgufType::kFloat32, ErrorCode::kIo,
                      where, ": adapter.lora.alpha must be a float32");
  const double alpha = alpha_v != nullptr ? alpha_v->f : 0.0;

  std::map<std::string, std::pair<const GgufTensor*, const GgufTensor*>> pairs;
  for (const auto& t : file.tensors) {
    if (detail::ends_with(t.name, ".lora_a")) {
      pairs[t.name.substr(0, t.name.size() - 7)].first = &t;
    } else if (detail::ends_with(t.name, ".lora_b")) {
      pairs[t.name.substr(0, t.name.size() - 7)].second = &t;
    } else if (!detail::ends_with(t.name, "_norm.weight")) {
      RANKWISE_CHECK_CODE(false, ErrorCode::kIo, where, ": LoRA tensor '", t.name,
                          "' has unexpected suffix");
    }
  }
  std::vector<GgufLoraModule> out;
  for (const auto& kv : pairs) {
    const std::string& name = kv.first;
    const GgufTensor* a = kv.second.first;
    const GgufTensor* b = kv.second.second;
    RANKWISE_CHECK_CODE(a != nullptr && b != nullptr, ErrorCode::kIo, where,
                        ": LoRA tensor pair for '", name, "' is missing one component");
    RANKWISE_CHECK_CODE(a->ne.size() == 2 && b->ne.size() == 2, ErrorCode::kIo, where,
                        ": LoRA tensors of '", name, "' must be matrices");
    if (base_shapes != nullptr) {
      const auto base = base_shapes->find(name);
      RANKWISE_CHECK_CODE(base != base_shapes->end(), ErrorCode::kIo, where, ": LoRA tensor '",
                          name, "' does not exist in base model (hint: maybe wrong base model?)");
      const bool embd = detail::ends_with(name, "token_embd.weight");
      const bool ok = base->second.size() >= 2 &&
                      (embd ? base->second[0] == b->ne[1] && base->second[1] == a->ne[1]
                            : base->second[0] == a->ne[0] && base->second[1] == b->ne[1]);
      RANKWISE_CHECK_CODE(ok, ErrorCode::kIo, where, ": tensor '", name,
                          "' has incorrect shape (hint: maybe wrong base model?)");
    }
    RANKWISE_CHECK_CODE(a->ne[1] == b->ne[0], ErrorCode::kIo, where,
                        ": lora_a tensor is not transposed (hint: adapter from \"finetune\" "
                        "example is no longer supported) for '",
                        name, "'");
    GgufLoraModule m;
    m.base_tensor = name;
    m.a = detail::host_from_ggml(*a);
    m.b = detail::host_from_ggml(*b);
    m.scale = detail::llama_scale(alpha, b->ne[0]);
    out.push_back(std::move(m));
  }
  return out;
}

}  // namespace io
}  // namespace rankwise
