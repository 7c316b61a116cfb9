// File I/O: safetensors (validation corpus, bit-exact conversions, byte-exact
// rewrite) and PEFT LoRA adapter directories (the GPT-2 fixture, patterns,
// config errors, safe writing).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "rankwise/io/peft_adapter.hpp"
#include "rankwise/io/safetensors.hpp"
#include "support/temp_dir.hpp"

#ifndef RANKWISE_TEST_DATA_DIR
#error "RANKWISE_TEST_DATA_DIR must name tests/data"
#endif

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using rankwise::ErrorCode;
using rankwise::HostTensor;
using namespace rankwise::io;

namespace {

const fs::path kFixture = fs::path(RANKWISE_TEST_DATA_DIR) / "gpt2-lora-r8";

using rwtest::TempDir;

std::vector<std::uint8_t> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const fs::path& path, const std::vector<std::uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

std::string read_text(const fs::path& path) {
  const auto bytes = read_bytes(path);
  return std::string(bytes.begin(), bytes.end());
}

void write_text(const fs::path& path, const std::string& text) {
  write_bytes(path, std::vector<std::uint8_t>(text.begin(), text.end()));
}

// The fixture copied into `dir`, which then holds an adapter to modify.
fs::path copy_fixture(const TempDir& tmp, const std::string& name = "adapter") {
  const fs::path dir = tmp / name;
  fs::create_directories(dir);
  fs::copy_file(kFixture / kPeftConfigFile, dir / kPeftConfigFile);
  fs::copy_file(kFixture / kPeftWeightsFile, dir / kPeftWeightsFile);
  fs::permissions(dir / kPeftConfigFile, fs::perms::owner_read | fs::perms::owner_write,
                  fs::perm_options::add);
  fs::permissions(dir / kPeftWeightsFile, fs::perms::owner_read | fs::perms::owner_write,
                  fs::perm_options::add);
  return dir;
}

// The message of the rankwise::error `f` throws, checked to carry `code`.
std::string error_of(const std::function<void()>& f, ErrorCode code) {
  try {
    f();
  } catch (const rankwise::error& e) {
    CHECK(static_cast<int>(e.code()) == static_cast<int>(code));
    return e.what();
  }
  FAIL("expected a rankwise::error");
  return {};
}

// A safetensors file from a raw header and data section.
std::vector<std::uint8_t> make_file(const std::string& header, std::size_t data_bytes,
                                    std::uint64_t declared_length = ~std::uint64_t{0}) {
  const std::uint64_t n = declared_length == ~std::uint64_t{0} ? header.size() : declared_length;
  std::vector<std::uint8_t> out;
  out.reserve(8 + header.size() + data_bytes);
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(n >> (8 * i)));
  for (char c : header) out.push_back(static_cast<std::uint8_t>(c));
  for (std::size_t i = 0; i < data_bytes; ++i) out.push_back(static_cast<std::uint8_t>(i * 7 + 1));
  return out;
}

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  std::uint64_t begin, std::uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
         ",\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(end) + "]}";
}

std::uint64_t bits_of(double v) {
  std::uint64_t b = 0;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

bool same_bits(const std::vector<double>& x, const std::vector<double>& y) {
  if (x.size() != y.size()) return false;
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (bits_of(x[i]) != bits_of(y[i])) return false;
  }
  return true;
}

HostTensor filled(std::vector<std::int64_t> shape, double start, double step) {
  HostTensor t;
  t.shape = std::move(shape);
  t.values.resize(static_cast<std::size_t>(t.numel()));
  for (std::size_t i = 0; i < t.values.size(); ++i) t.values[i] = start + step * static_cast<double>(i);
  return t;
}

LoraModule make_module(const std::string& name, std::int64_t rank, std::int64_t d_in,
                       std::int64_t d_out, double alpha, bool rslora = false) {
  LoraModule m;
  m.name = name;
  m.rank = rank;
  m.alpha = alpha;
  m.scale = lora_scale(alpha, rank, rslora ? rankwise::ScaleRule::kAlphaOverSqrtRank
                                           : rankwise::ScaleRule::kAlphaOverRank);
  m.a = filled({rank, d_in}, 0.25, 0.125);
  m.b = filled({d_out, rank}, -1.5, 0.0625);
  return m;
}

std::vector<std::string> entries_of(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

// ---------------------------------------------------------------------------
// Float conversions
// ---------------------------------------------------------------------------

TEST_CASE("F16 conversion: known bit patterns", "[io][convert]") {
  struct Case {
    std::uint16_t bits;
    double value;
  };
  const Case cases[] = {
      {0x0000, 0.0},
      {0x3C00, 1.0},
      {0xC000, -2.0},
      {0x3555, 0.333251953125},
      {0x7BFF, 65504.0},                      // largest finite
      {0x0400, std::ldexp(1.0, -14)},         // smallest normal
      {0x03FF, 1023 * std::ldexp(1.0, -24)},  // largest subnormal
      {0x0001, std::ldexp(1.0, -24)},         // smallest subnormal
      {0x8001, -std::ldexp(1.0, -24)},
  };
  for (const auto& c : cases) {
    CAPTURE(c.bits, c.value);
    CHECK(half_bits_to_double(c.bits) == c.value);
    CHECK(double_to_half_bits(c.value) == c.bits);
  }
  CHECK(double_to_half_bits(-0.0) == 0x8000);
  CHECK(std::signbit(half_bits_to_double(0x8000)));
  CHECK(half_bits_to_double(0x7C00) == std::numeric_limits<double>::infinity());
  CHECK(half_bits_to_double(0xFC00) == -std::numeric_limits<double>::infinity());
  CHECK(double_to_half_bits(std::numeric_limits<double>::infinity()) == 0x7C00);
  CHECK(double_to_half_bits(-std::numeric_limits<double>::infinity()) == 0xFC00);
  CHECK(std::isnan(half_bits_to_double(0x7E00)));
  CHECK(std::isnan(half_bits_to_double(0x7C01)));  // signalling NaN is still a NaN
  CHECK(double_to_half_bits(std::numeric_limits<double>::quiet_NaN()) == 0x7E00);
  CHECK(double_to_half_bits(-std::numeric_limits<double>::quiet_NaN()) == 0xFE00);

  // Round to nearest, ties to even.
  CHECK(double_to_half_bits(1.0 + std::ldexp(1.0, -11)) == 0x3C00);      // tie, down to even
  CHECK(double_to_half_bits(1.0 + 3 * std::ldexp(1.0, -11)) == 0x3C02);  // tie, up to even
  CHECK(double_to_half_bits(1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -30)) == 0x3C01);
  // Direct from double: via float this would round twice and give 0x3C00.
  CHECK(double_to_half_bits(1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40)) == 0x3C01);
  CHECK(double_to_half_bits(65519.99) == 0x7BFF);
  CHECK(double_to_half_bits(65520.0) == 0x7C00);  // tie with the odd 65504: overflows
  CHECK(double_to_half_bits(1e300) == 0x7C00);
  // Subnormals and underflow.
  CHECK(double_to_half_bits(std::ldexp(1.0, -25)) == 0x0000);       // tie with zero
  CHECK(double_to_half_bits(std::ldexp(1.0, -25) * 1.0001) == 0x0001);
  CHECK(double_to_half_bits(3 * std::ldexp(1.0, -25)) == 0x0002);   // tie, up to even
  CHECK(double_to_half_bits(1023.5 * std::ldexp(1.0, -24)) == 0x0400);  // into the normals
  CHECK(double_to_half_bits(std::ldexp(1.0, -26)) == 0x0000);
  CHECK(double_to_half_bits(-std::ldexp(1.0, -30)) == 0x8000);
  CHECK(double_to_half_bits(std::numeric_limits<double>::denorm_min()) == 0x0000);
}

TEST_CASE("BF16 conversion: known bit patterns", "[io][convert]") {
  CHECK(bfloat16_bits_to_double(0x3F80) == 1.0);
  CHECK(bfloat16_bits_to_double(0xC000) == -2.0);
  CHECK(bfloat16_bits_to_double(0x7F7F) == std::ldexp(255.0, 120));  // largest finite
  CHECK(bfloat16_bits_to_double(0x0080) == std::ldexp(1.0, -126));   // smallest normal
  CHECK(bfloat16_bits_to_double(0x0001) == std::ldexp(1.0, -133));   // smallest subnormal
  CHECK(bfloat16_bits_to_double(0x7F80) == std::numeric_limits<double>::infinity());
  CHECK(bfloat16_bits_to_double(0xFF80) == -std::numeric_limits<double>::infinity());
  CHECK(std::isnan(bfloat16_bits_to_double(0x7FC0)));
  CHECK(double_to_bfloat16_bits(1.0) == 0x3F80);
  CHECK(double_to_bfloat16_bits(3.140625) == 0x4049);
  CHECK(double_to_bfloat16_bits(std::numeric_limits<double>::quiet_NaN()) == 0x7FC0);
  CHECK(double_to_bfloat16_bits(-0.0) == 0x8000);
  CHECK(double_to_bfloat16_bits(1.0 + std::ldexp(1.0, -8)) == 0x3F80);      // tie, down
  CHECK(double_to_bfloat16_bits(1.0 + 3 * std::ldexp(1.0, -8)) == 0x3F82);  // tie, up
  CHECK(double_to_bfloat16_bits(std::ldexp(255.0, 120) + std::ldexp(1.0, 119)) == 0x7F80);
  CHECK(double_to_bfloat16_bits(std::ldexp(255.0, 120) + std::ldexp(1.0, 118)) == 0x7F7F);
  CHECK(double_to_bfloat16_bits(std::ldexp(1.0, -134)) == 0x0000);  // tie with zero
  CHECK(double_to_bfloat16_bits(std::ldexp(3.0, -134)) == 0x0002);
  CHECK(double_to_bfloat16_bits(std::ldexp(1.0, -200)) == 0x0000);
}

TEST_CASE("F16 and BF16: every bit pattern round-trips; midpoints round to even",
          "[io][convert]") {
  using Decode = double (*)(std::uint16_t);
  using Encode = std::uint16_t (*)(double);
  struct Format {
    const char* name;
    Decode decode;
    Encode encode;
    std::uint16_t inf;
  };
  const Format formats[] = {{"F16", half_bits_to_double, double_to_half_bits, 0x7C00},
                            {"BF16", bfloat16_bits_to_double, double_to_bfloat16_bits, 0x7F80}};
  for (const auto& f : formats) {
    CAPTURE(f.name);
    int failures = 0;
    for (std::uint32_t b = 0; b <= 0xFFFF; ++b) {
      const auto bits = static_cast<std::uint16_t>(b);
      if (f.encode(f.decode(bits)) != bits) ++failures;  // NaN payloads included
    }
    CHECK(failures == 0);

    // Positive finite values ascend; the midpoint of neighbours goes to the
    // even one, and just either side of it to the nearer one.
    int misrounded = 0;
    for (std::uint16_t b = 0; b < f.inf - 1; ++b) {
      const double lo = f.decode(b);
      const double hi = f.decode(static_cast<std::uint16_t>(b + 1));
      if (!(lo < hi)) ++misrounded;
      const double mid = (lo + hi) / 2;  // exact in double
      const std::uint16_t even = (b % 2 == 0) ? b : static_cast<std::uint16_t>(b + 1);
      if (f.encode(mid) != even) ++misrounded;
      if (f.encode(std::nextafter(mid, 0.0)) != b) ++misrounded;
      if (f.encode(std::nextafter(mid, 1e300)) != b + 1) ++misrounded;
      if (f.encode(-mid) != (even | 0x8000)) ++misrounded;
    }
    CHECK(misrounded == 0);
  }

  // BF16 is the top half of a float: an independent reference.
  int mismatched = 0;
  for (std::uint32_t b = 0; b <= 0xFFFF; ++b) {
    const std::uint32_t f32 = b << 16;
    float f = 0;
    std::memcpy(&f, &f32, sizeof f);
    if (!std::isnan(f) && bfloat16_bits_to_double(static_cast<std::uint16_t>(b)) != static_cast<double>(f)) {
      ++mismatched;
    }
  }
  CHECK(mismatched == 0);
}

TEST_CASE("F32 conversion matches the hardware and keeps NaN bits", "[io][convert]") {
  std::mt19937_64 rng(7);
  int mismatched = 0;
  for (int i = 0; i < 200000; ++i) {
    const auto f32 = static_cast<std::uint32_t>(rng());
    float f = 0;
    std::memcpy(&f, &f32, sizeof f);
    if (std::isnan(f)) continue;
    if (float_bits_to_double(f32) != static_cast<double>(f)) ++mismatched;
    if (double_to_float_bits(static_cast<double>(f)) != f32) ++mismatched;
    // Random doubles near float range: compare rounding with the cast.
    std::uint64_t d64 = rng();
    d64 = (d64 & 0x800FFFFFFFFFFFFFull) | (static_cast<std::uint64_t>(1023 - 160 + rng() % 300) << 52);
    double d = 0;
    std::memcpy(&d, &d64, sizeof d);
    const float cast = static_cast<float>(d);
    std::uint32_t cast_bits = 0;
    std::memcpy(&cast_bits, &cast, sizeof cast_bits);
    if (double_to_float_bits(d) != cast_bits) ++mismatched;
  }
  CHECK(mismatched == 0);
  CHECK(double_to_float_bits(float_bits_to_double(0x7F800001u)) == 0x7F800001u);  // signalling
  CHECK(double_to_float_bits(float_bits_to_double(0xFFC12345u)) == 0xFFC12345u);
}

// ---------------------------------------------------------------------------
// Safetensors: layout, writer, values
// ---------------------------------------------------------------------------

TEST_CASE("safetensors: the fixture reads and rewrites byte for byte", "[io][safetensors]") {
  const fs::path path = kFixture / kPeftWeightsFile;
  const SafetensorsFile file = read_safetensors(path.string());
  CHECK(file.tensors.size() == 72);
  REQUIRE(file.metadata.has_value());
  CHECK(*file.metadata == std::map<std::string, std::string>{{"format", "pt"}});
  const auto& a = file.tensors.at("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight");
  CHECK(a.dtype == DType::kF32);
  CHECK(a.shape == std::vector<std::int64_t>{8, 768});
  CHECK(a.data.size() == 8 * 768 * 4);

  const auto original = read_bytes(path);
  CHECK(serialize_safetensors(file) == original);
  CHECK(parse_safetensors(original.data(), original.size()).tensors.size() == 72);

  TempDir tmp;
  write_safetensors(file, (tmp / "copy.safetensors").string());
  CHECK(read_bytes(tmp / "copy.safetensors") == original);
  CHECK(entries_of(tmp.path()) == std::vector<std::string>{"copy.safetensors"});
}

TEST_CASE("safetensors: writer matches the reference layout", "[io][safetensors]") {
  // Known answers from the reference implementation's own tests.
  SafetensorsFile empty;
  const std::vector<std::uint8_t> empty_bytes = {8, 0, 0, 0, 0, 0, 0, 0, '{', '}',
                                                 ' ', ' ', ' ', ' ', ' ', ' '};
  CHECK(serialize_safetensors(empty) == empty_bytes);
  empty.metadata = std::map<std::string, std::string>{{"framework", "pt"}};
  const std::string meta_header = "{\"__metadata__\":{\"framework\":\"pt\"}}     ";
  CHECK(serialize_safetensors(empty) == make_file(meta_header, 0));

  SafetensorsFile one;
  one.tensors["attn.0"] = from_host_tensor(filled({1, 2, 3}, 0, 1), DType::kF32);
  const auto bytes = serialize_safetensors(one);
  const std::string header =
      "{\"attn.0\":{\"dtype\":\"F32\",\"shape\":[1,2,3],\"data_offsets\":[0,24]}}";
  REQUIRE(header.size() == 64);
  REQUIRE(bytes.size() == 8 + 64 + 24);
  CHECK(std::string(bytes.begin() + 8, bytes.begin() + 72) == header);
  const std::vector<std::uint8_t> data(bytes.begin() + 72, bytes.end());
  CHECK(data == std::vector<std::uint8_t>{0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 64,
                                          0, 0, 64, 64, 0, 0, 128, 64, 0, 0, 160, 64});

  // Mixed dtypes: larger alignment first, then by name; every tensor aligned.
  SafetensorsFile mixed;
  mixed.tensors["b"] = from_host_tensor(filled({3}, 1, 1), DType::kF16);
  mixed.tensors["a"] = from_host_tensor(filled({3}, 1, 1), DType::kF16);
  mixed.tensors["z"] = from_host_tensor(filled({2}, 1, 1), DType::kF64);
  mixed.tensors["m"] = from_host_tensor(filled({1}, 1, 1), DType::kF32);
  mixed.tensors["k"] = SafetensorsTensor{DType::kU8, {3}, {1, 2, 3}};
  mixed.tensors["i"] = SafetensorsTensor{DType::kI64, {1}, {1, 0, 0, 0, 0, 0, 0, 0}};
  mixed.tensors["e"] = SafetensorsTensor{DType::kF8E4M3, {0, 5}, {}};
  const auto mixed_bytes = serialize_safetensors(mixed);
  const std::uint64_t n = rankwise::io::detail::load_le(mixed_bytes.data(), 8);
  CHECK(n % 8 == 0);
  const std::string mixed_header(mixed_bytes.begin() + 8, mixed_bytes.begin() + 8 + static_cast<long>(n));
  const auto pos = [&](const std::string& name) { return mixed_header.find("\"" + name + "\":"); };
  CHECK(pos("i") < pos("z"));  // I64 after F64 in the enum: sorts first
  CHECK(pos("z") < pos("m"));
  CHECK(pos("m") < pos("a"));
  CHECK(pos("a") < pos("b"));
  CHECK(pos("b") < pos("e"));  // F8_E4M3 follows U8 in the enum
  CHECK(pos("e") < pos("k"));
  const SafetensorsFile back = parse_safetensors(mixed_bytes.data(), mixed_bytes.size());
  CHECK(serialize_safetensors(back) == mixed_bytes);
  CHECK(back.tensors.at("k").data == std::vector<std::uint8_t>{1, 2, 3});
  CHECK(back.tensors.at("e").shape == std::vector<std::int64_t>{0, 5});
  CHECK_FALSE(back.metadata.has_value());

  // Values of other dtypes are refused only when asked for.
  CHECK_THAT(error_of([&] { to_host_tensor(back.tensors.at("i"), "i"); }, ErrorCode::kInvalidArgument),
             Contains("\"i\" has dtype I64") && Contains("does not convert"));
  CHECK_THAT(error_of([&] { to_tensor_map(back); }, ErrorCode::kInvalidArgument),
             Contains("dtype"));

  // Writer refusals.
  SafetensorsFile bad;
  bad.tensors["w"] = SafetensorsTensor{DType::kF32, {2, 2}, std::vector<std::uint8_t>(12)};
  CHECK_THAT(error_of([&] { serialize_safetensors(bad); }, ErrorCode::kInvalidArgument),
             Contains("\"w\" holds 12 bytes") && Contains("need 16"));
  bad.tensors.clear();
  bad.tensors["__metadata__"] = SafetensorsTensor{DType::kF32, {}, std::vector<std::uint8_t>(4)};
  CHECK_THAT(error_of([&] { serialize_safetensors(bad); }, ErrorCode::kInvalidArgument),
             Contains("__metadata__"));
  bad.tensors.clear();
  bad.tensors["bad\xff"] = SafetensorsTensor{DType::kF32, {}, std::vector<std::uint8_t>(4)};
  CHECK_THAT(error_of([&] { serialize_safetensors(bad); }, ErrorCode::kInvalidArgument),
             Contains("UTF-8"));
}

TEST_CASE("safetensors: values round-trip bit for bit", "[io][safetensors]") {
  HostTensor t;
  t.shape = {2, 5};
  t.values = {0.0, -0.0, 1.0, -2.5, 0.333251953125, 65504.0, std::ldexp(1.0, -24),
              std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
              std::numeric_limits<double>::quiet_NaN()};
  for (DType dtype : {DType::kF32, DType::kF16, DType::kF64}) {
    CAPTURE(dtype_name(dtype));
    SafetensorsFile file;
    file.tensors["t"] = from_host_tensor(t, dtype, "t");
    const auto bytes = serialize_safetensors(file);
    const HostTensor back = to_host_tensor(parse_safetensors(bytes.data(), bytes.size()).tensors.at("t"));
    CHECK(back.shape == t.shape);
    CHECK(same_bits(back.values, t.values));
  }
  // BF16: values it can represent come back exactly.
  HostTensor b = t;
  b.values[4] = 0.333984375;                // 0x3EAB
  b.values[5] = std::ldexp(255.0, 120);     // largest finite
  b.values[6] = std::ldexp(1.0, -133);      // smallest subnormal
  const HostTensor b_back = to_host_tensor(from_host_tensor(b, DType::kBF16));
  CHECK(same_bits(b_back.values, b.values));

  // Values that round: the result is the rounded value, and re-encoding it
  // gives the same bytes.
  const HostTensor odd = filled({7}, 0.1, 0.37);
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32}) {
    const SafetensorsTensor once = from_host_tensor(odd, dtype);
    const HostTensor rounded = to_host_tensor(once);
    CHECK(from_host_tensor(rounded, dtype).data == once.data);
    for (std::size_t i = 0; i < odd.values.size(); ++i) {
      CHECK(rounded.values[i] == Approx(odd.values[i]).epsilon(dtype == DType::kBF16 ? 4e-3 : 1e-3));
    }
  }

  // Overflow is an error, not a silent infinity.
  HostTensor big;
  big.shape = {2};
  big.values = {1.0, 70000.0};
  CHECK_THAT(error_of([&] { from_host_tensor(big, DType::kF16, "big"); }, ErrorCode::kInvalidArgument),
             Contains("value 70000 at index 1 of tensor \"big\" overflows F16"));
  CHECK_NOTHROW(from_host_tensor(big, DType::kBF16));
  big.values = {1e300, 0.0};
  CHECK_THAT(error_of([&] { from_host_tensor(big, DType::kF32, "big"); }, ErrorCode::kInvalidArgument),
             Contains("overflows F32"));
  HostTensor short_values;
  short_values.shape = {3};
  short_values.values = {1.0};
  CHECK_THAT(error_of([&] { from_host_tensor(short_values, DType::kF32, "s"); },
                      ErrorCode::kInvalidArgument),
             Contains("holds 1 values for shape (3)"));

  // TensorMap helpers.
  rankwise::TensorMap map;
  map["x"] = filled({2, 3}, 1, 0.5);
  const auto map_back = to_tensor_map(from_tensor_map(map, DType::kF32));
  CHECK(same_bits(map_back.at("x").values, map.at("x").values));
  CHECK(map_back.at("x").shape == map.at("x").shape);
}

TEST_CASE("safetensors: every malformed file gets its own error", "[io][safetensors]") {
  TempDir tmp;
  const std::string good_header =
      "{" + entry("a", "F32", "[2,2]", 0, 16) + "," + entry("b", "F16", "[4]", 16, 24) + "}";
  const auto good = make_file(good_header, 24);
  {
    const fs::path p = tmp / "good.safetensors";
    write_bytes(p, good);
    const auto file = read_safetensors(p.string());
    CHECK(file.tensors.size() == 2);
  }

  struct Case {
    const char* name;
    std::vector<std::uint8_t> bytes;
    std::vector<std::string> expect;
  };
  std::vector<std::uint8_t> truncated = good;
  truncated.resize(truncated.size() - 5);
  std::vector<std::uint8_t> trailing = good;
  for (int i = 0; i < 4; ++i) trailing.push_back(9);
  std::vector<std::uint8_t> bad_utf8 = make_file("{\"a\xff\":{}}", 0);

  const std::vector<Case> cases = {
      {"tiny", {1, 2, 3, 4, 5}, {"is 5 bytes, shorter than the 8-byte header length"}},
      {"empty", {}, {"is 0 bytes, shorter than the 8-byte header length"}},
      {"long_header_length", make_file("{}", 0, 1000),
       {"header length 1000 exceeds the 2 bytes after the length prefix"}},
      {"huge_header_length", make_file("{}", 0, std::uint64_t{1} << 62),
       {"header length 4611686018427387904 exceeds the limit of 100000000 bytes"}},
      {"bad_json", make_file("{\"a\":", 0), {"header is not valid JSON"}},
      {"bad_utf8", bad_utf8, {"header is not valid JSON"}},
      {"not_object", make_file("[1,2]", 0), {"header is not a JSON object (it is array)"}},
      {"deep", make_file("{\"a\":[[[[1]]]]}", 0), {"nests JSON deeper"}},
      {"truncated", truncated,
       {"file is truncated: the tensors need 24 bytes of data but the data section holds 19"}},
      {"trailing", trailing, {"4 trailing bytes after the last tensor"}},
      {"unknown_dtype", make_file("{" + entry("w", "F17", "[2]", 0, 8) + "}", 8),
       {"tensor \"w\"", "unknown dtype \"F17\""}},
      {"missing_dtype", make_file("{\"w\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8),
       {"tensor \"w\"", "missing or non-string \"dtype\""}},
      {"entry_not_object", make_file("{\"w\":5}", 0),
       {"tensor \"w\"", "header entry must be an object"}},
      {"wrong_size", make_file("{" + entry("w", "F32", "[2,3]", 0, 20) + "}", 20),
       {"tensor \"w\"", "data_offsets [0, 20] span 20 bytes but dtype F32 and shape (2 x 3) need 24 bytes"}},
      {"overlap",
       make_file("{" + entry("a", "F32", "[4]", 0, 16) + "," + entry("b", "F32", "[4]", 8, 24) + "}", 24),
       {"tensor \"b\"", "overlap tensor \"a\", which ends at 16"}},
      {"hole",
       make_file("{" + entry("a", "F32", "[4]", 0, 16) + "," + entry("b", "F32", "[4]", 20, 36) + "}", 36),
       {"tensor \"b\"", "leaving a hole of 4 bytes after tensor \"a\""}},
      {"hole_at_start", make_file("{" + entry("a", "F32", "[4]", 4, 20) + "}", 20),
       {"tensor \"a\"", "hole of 4 bytes after the start of the data section"}},
      {"duplicate_key",
       make_file("{" + entry("w", "F32", "[1]", 0, 4) + "," + entry("w", "F32", "[1]", 4, 8) + "}", 8),
       {"duplicate key \"w\" in header"}},
      {"duplicate_field",
       make_file("{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4),
       {"tensor \"w\"", "duplicate key \"dtype\" in its header entry"}},
      {"negative_shape", make_file("{" + entry("w", "F32", "[-1,4]", 0, 16) + "}", 16),
       {"tensor \"w\"", "shape must hold non-negative integers, found -1"}},
      {"fractional_shape", make_file("{" + entry("w", "F32", "[2.5]", 0, 8) + "}", 8),
       {"tensor \"w\"", "shape must hold non-negative integers, found 2.5"}},
      {"overflowing_shape",
       make_file("{" + entry("w", "F32", "[4294967296,4294967296]", 0, 0) + "}", 0),
       {"tensor \"w\"", "element count of shape (4294967296 x 4294967296) overflows"}},
      {"huge_dimension", make_file("{" + entry("w", "U8", "[18446744073709551615]", 0, 0) + "}", 0),
       {"tensor \"w\"", "shape dimension 18446744073709551615 overflows"}},
      {"byte_overflow", make_file("{" + entry("w", "F64", "[4611686018427387904]", 0, 0) + "}", 0),
       {"tensor \"w\"", "byte size of shape (4611686018427387904) in F64 overflows"}},
      {"sub_byte", make_file("{" + entry("w", "F4", "[3]", 0, 2) + "}", 2),
       {"tensor \"w\"", "not a whole number of bytes"}},
      {"begin_after_end", make_file("{" + entry("w", "F32", "[0]", 16, 0) + "}", 16),
       {"tensor \"w\"", "data_offsets begin 16 is past end 0"}},
      {"offsets_shape", make_file("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4),
       {"tensor \"w\"", "data_offsets must be [begin, end]"}},
      {"metadata_not_object", make_file("{\"__metadata__\":[1]}", 0),
       {"__metadata__ must be an object mapping strings to strings (it is array)"}},
      {"metadata_duplicate", make_file("{\"__metadata__\":{\"format\":\"pt\",\"format\":\"np\"}}", 0),
       {"duplicate key \"format\" in __metadata__"}},
      {"metadata_value", make_file("{\"__metadata__\":{\"format\":1}}", 0),
       {"__metadata__ value of \"format\" must be a string (it is number)"}},
  };
  for (const auto& c : cases) {
    CAPTURE(c.name);
    const fs::path p = tmp / (std::string(c.name) + ".safetensors");
    write_bytes(p, c.bytes);
    const std::string message = error_of([&] { read_safetensors(p.string()); }, ErrorCode::kIo);
    CHECK_THAT(message, Contains("safetensors file \"" + p.string() + "\""));
    for (const auto& e : c.expect) CHECK_THAT(message, Contains(e));
    // The in-memory parser applies the same rules.
    const std::string from_memory =
        error_of([&] { parse_safetensors(c.bytes.data(), c.bytes.size(), c.name); }, ErrorCode::kIo);
    for (const auto& e : c.expect) CHECK_THAT(from_memory, Contains(e));
  }

  CHECK_THAT(error_of([&] { read_safetensors((tmp / "absent.safetensors").string()); }, ErrorCode::kIo),
             Contains("absent.safetensors") && Contains("not a readable regular file"));
  CHECK_THAT(error_of([&] { read_safetensors(tmp.path().string()); }, ErrorCode::kIo),
             Contains("not a readable regular file"));
}

TEST_CASE("safetensors: random corruption never crashes the reader", "[io][safetensors]") {
  SafetensorsFile file;
  file.metadata = std::map<std::string, std::string>{{"format", "pt"}};
  file.tensors["x.lora_A.weight"] = from_host_tensor(filled({2, 3}, 0.5, 0.25), DType::kF32);
  file.tensors["x.lora_B.weight"] = from_host_tensor(filled({4, 2}, 0.5, 0.25), DType::kBF16);
  const auto good = serialize_safetensors(file);
  std::mt19937 rng(1234);
  int parsed = 0;
  int rejected = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    std::vector<std::uint8_t> bytes = good;
    const int kind = trial % 4;
    if (kind == 0) {  // flip a byte of the header
      const std::size_t at = 8 + rng() % (bytes.size() - 8 - 40);
      bytes[at] = static_cast<std::uint8_t>(rng());
    } else if (kind == 1) {  // truncate anywhere
      bytes.resize(rng() % bytes.size());
    } else if (kind == 2) {  // corrupt the length prefix
      bytes[rng() % 8] = static_cast<std::uint8_t>(rng());
    } else {  // replace a digit or punctuation with another
      const char swaps[] = "0123456789,:[]{}\" -";
      const std::size_t at = 8 + rng() % (bytes.size() - 8 - 40);
      bytes[at] = static_cast<std::uint8_t>(swaps[rng() % (sizeof(swaps) - 1)]);
    }
    try {
      const SafetensorsFile back = parse_safetensors(bytes.data(), bytes.size(), "fuzz");
      // Whatever parses must re-serialize to a valid file.
      const auto again = serialize_safetensors(back);
      CHECK_NOTHROW(parse_safetensors(again.data(), again.size()));
      ++parsed;
    } catch (const rankwise::error& e) {
      if (e.code() != ErrorCode::kIo) FAIL("unexpected error code: " << e.what());
      ++rejected;
    }
  }
  CHECK(rejected > 2000);
  CHECK(parsed + rejected == 4000);
}

// ---------------------------------------------------------------------------
// PEFT adapters
// ---------------------------------------------------------------------------

TEST_CASE("PEFT: the GPT-2 fixture", "[io][peft]") {
  const PeftAdapter adapter = read_peft_adapter(kFixture.string());
  CHECK(adapter.r == 8);
  CHECK(adapter.lora_alpha == 32);
  CHECK(adapter.fan_in_fan_out);
  CHECK_FALSE(adapter.use_rslora);
  CHECK(adapter.base_layout() == rankwise::WeightLayout::kInOut);
  CHECK(adapter.scale_rule() == rankwise::ScaleRule::kAlphaOverRank);
  CHECK(adapter.base_model_name_or_path == "gpt2");
  CHECK(adapter.task_type == "CAUSAL_LM");
  CHECK(adapter.target_modules == std::vector<std::string>{"c_attn", "c_proj"});
  CHECK(adapter.target_modules_regex.empty());
  CHECK(adapter.rank_pattern.empty());
  CHECK(adapter.alpha_pattern.empty());
  REQUIRE(adapter.modules.size() == 36);
  CHECK(std::is_sorted(adapter.modules.begin(), adapter.modules.end(),
                       [](const LoraModule& x, const LoraModule& y) { return x.name < y.name; }));
  int c_attn = 0, attn_proj = 0, mlp_proj = 0;
  for (const auto& m : adapter.modules) {
    CAPTURE(m.name);
    CHECK(m.rank == 8);
    CHECK(m.alpha == 32);
    CHECK(m.scale == 4);
    CHECK(m.a_dtype == DType::kF32);
    CHECK(m.b_dtype == DType::kF32);
    CHECK(m.a.values.size() == static_cast<std::size_t>(m.a.numel()));
    if (rankwise::io::detail::ends_with(m.name, "attn.c_attn")) {
      ++c_attn;
      CHECK(m.a.shape == std::vector<std::int64_t>{8, 768});
      CHECK(m.b.shape == std::vector<std::int64_t>{2304, 8});
    } else if (rankwise::io::detail::ends_with(m.name, "attn.c_proj")) {
      ++attn_proj;
      CHECK(m.a.shape == std::vector<std::int64_t>{8, 768});
      CHECK(m.b.shape == std::vector<std::int64_t>{768, 8});
    } else if (rankwise::io::detail::ends_with(m.name, "mlp.c_proj")) {
      ++mlp_proj;
      CHECK(m.a.shape == std::vector<std::int64_t>{8, 3072});
      CHECK(m.b.shape == std::vector<std::int64_t>{768, 8});
    }
  }
  CHECK(c_attn == 12);
  CHECK(attn_proj == 12);
  CHECK(mlp_proj == 12);

  const LoraModule* m = adapter.find_module("transformer.h.11.mlp.c_proj");
  REQUIRE(m != nullptr);
  const rankwise::LoraConfig config = adapter.module_config(*m);
  CHECK(config.d_in == 3072);
  CHECK(config.d_out == 768);
  CHECK(config.rank == 8);
  CHECK(config.scale() == 4);
  CHECK(adapter.find_module("transformer.h.12.mlp.c_proj") == nullptr);

  // The values are the file's float32 values.
  const SafetensorsFile raw = read_safetensors((kFixture / kPeftWeightsFile).string());
  const auto& raw_b = raw.tensors.at("base_model.model.transformer.h.11.mlp.c_proj.lora_B.weight");
  float first = 0;
  std::memcpy(&first, raw_b.data.data(), sizeof first);
  CHECK(m->b.values[0] == static_cast<double>(first));
}

TEST_CASE("PEFT: write and read back", "[io][peft]") {
  TempDir tmp;
  const fs::path src = copy_fixture(tmp);
  const PeftAdapter adapter = read_peft_adapter(src.string());

  SECTION("F32 rewrite is byte for byte") {
    const fs::path out = tmp / "out";
    write_peft_adapter(adapter, out.string(), DType::kF32);
    CHECK(read_bytes(out / kPeftWeightsFile) == read_bytes(kFixture / kPeftWeightsFile));
    CHECK(entries_of(out) == std::vector<std::string>{kPeftConfigFile, kPeftWeightsFile});
    CHECK(entries_of(tmp.path()) == std::vector<std::string>{"adapter", "out"});

    // The config is PEFT's own, but for the dropout the writer zeroes.
    auto written = nlohmann::json::parse(read_text(out / kPeftConfigFile));
    auto original = nlohmann::json::parse(read_text(kFixture / kPeftConfigFile));
    CHECK(written["lora_dropout"] == 0.0);
    written.erase("lora_dropout");
    original.erase("lora_dropout");
    CHECK(written == original);

    const PeftAdapter back = read_peft_adapter(out.string());
    REQUIRE(back.modules.size() == adapter.modules.size());
    for (std::size_t i = 0; i < back.modules.size(); ++i) {
      CHECK(back.modules[i].name == adapter.modules[i].name);
      CHECK(same_bits(back.modules[i].a.values, adapter.modules[i].a.values));
      CHECK(same_bits(back.modules[i].b.values, adapter.modules[i].b.values));
      CHECK(back.modules[i].scale == adapter.modules[i].scale);
    }
  }

  SECTION("F16 and BF16 store rounded values, stably") {
    for (DType dtype : {DType::kF16, DType::kBF16}) {
      CAPTURE(dtype_name(dtype));
      const fs::path out = tmp / (std::string("out-") + dtype_name(dtype));
      write_peft_adapter(adapter, out.string(), dtype);
      const PeftAdapter back = read_peft_adapter(out.string());
      REQUIRE(back.modules.size() == 36);
      for (std::size_t i = 0; i < back.modules.size(); ++i) {
        const auto& m = back.modules[i];
        CHECK(m.a_dtype == dtype);
        CHECK(m.b_dtype == dtype);
        const SafetensorsTensor expected_b = from_host_tensor(adapter.modules[i].b, dtype);
        CHECK(same_bits(m.b.values, to_host_tensor(expected_b).values));
      }
      // Rewriting in the dtype read (the preserving overload) changes nothing.
      const fs::path again = tmp / (std::string("again-") + dtype_name(dtype));
      write_peft_adapter(back, again.string());
      CHECK(read_bytes(again / kPeftWeightsFile) == read_bytes(out / kPeftWeightsFile));
      CHECK(read_bytes(again / kPeftConfigFile) == read_bytes(out / kPeftConfigFile));
    }
  }
}

TEST_CASE("PEFT: pattern keys follow PEFT's rule", "[io][peft]") {
  using rankwise::io::detail::PatternMatcher;
  const auto matches = [](const std::string& key, const std::string& module) {
    return PatternMatcher(key, "test").matches(module);
  };
  CHECK(matches("c_attn", "transformer.h.0.attn.c_attn"));
  CHECK(matches("attn.c_attn", "transformer.h.0.attn.c_attn"));
  CHECK(matches("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_attn"));
  CHECK(matches("h.0.attn.c_attn", "transformer.h.0.attn.c_attn"));
  CHECK_FALSE(matches("h.0.attn.c_attn", "transformer.h.10.attn.c_attn"));
  CHECK_FALSE(matches("c_attn", "transformer.h.0.attn.xc_attn"));  // only at a dot
  CHECK_FALSE(matches("attn", "transformer.h.0.attn.c_attn"));     // anchored at the end
  CHECK(matches("h\\.[0-2]\\.attn\\.c_attn", "transformer.h.2.attn.c_attn"));
  CHECK_FALSE(matches("h\\.[0-2]\\.attn\\.c_attn", "transformer.h.3.attn.c_attn"));
  CHECK(matches(".*q_proj", "model.layers.0.self_attn.q_proj"));
}

TEST_CASE("PEFT: rank_pattern and alpha_pattern apply per module", "[io][peft]") {
  TempDir tmp;
  PeftAdapter adapter;
  adapter.r = 4;
  adapter.lora_alpha = 8;
  adapter.target_modules = {"q_proj", "v_proj"};
  adapter.base_model_name_or_path = "tiny-llama";
  adapter.modules = {make_module("model.layers.0.self_attn.q_proj", 4, 6, 5, 8),
                     make_module("model.layers.0.self_attn.v_proj", 6, 6, 5, 8),
                     make_module("model.layers.1.self_attn.q_proj", 2, 6, 5, 8),
                     make_module("model.layers.10.self_attn.q_proj", 4, 6, 5, 3)};

  // A hand-written config: PEFT-style suffix and regex keys, first match wins.
  const fs::path dir = tmp / "patterns";
  write_peft_adapter(adapter, dir.string(), DType::kF32);
  auto config = nlohmann::ordered_json::parse(read_text(dir / kPeftConfigFile));
  config["rank_pattern"] = nlohmann::ordered_json::parse(
      R"({"layers.1.self_attn.q_proj": 2, "v_proj": 6, "layers.0.self_attn.v_proj": 99})");
  config["alpha_pattern"] = nlohmann::ordered_json::parse(R"({"layers\\.1\\d\\..*q_proj": 3})");
  write_text(dir / kPeftConfigFile, config.dump(2));

  const PeftAdapter read = read_peft_adapter(dir.string());
  REQUIRE(read.modules.size() == 4);
  CHECK(read.rank_pattern.size() == 3);
  CHECK(read.rank_pattern[0].first == "layers.1.self_attn.q_proj");  // file order kept
  const auto check = [&](const std::string& name, std::int64_t rank, double alpha) {
    const LoraModule* m = read.find_module(name);
    REQUIRE(m != nullptr);
    CAPTURE(name);
    CHECK(m->rank == rank);
    CHECK(m->alpha == alpha);
    CHECK(m->scale == alpha / static_cast<double>(rank));
  };
  check("model.layers.0.self_attn.q_proj", 4, 8);
  check("model.layers.0.self_attn.v_proj", 6, 8);  // "v_proj" comes first, not 99
  check("model.layers.1.self_attn.q_proj", 2, 8);
  check("model.layers.10.self_attn.q_proj", 4, 3);  // "layers.1..." does not match layers.10

  // The writer derives the patterns from the modules and they read back.
  const fs::path out = tmp / "derived";
  write_peft_adapter(read, out.string());
  const auto derived = nlohmann::json::parse(read_text(out / kPeftConfigFile));
  CHECK(derived["r"] == 4);
  CHECK(derived["lora_alpha"] == 8);
  CHECK(derived["rank_pattern"] ==
        nlohmann::json::parse(R"({"model.layers.0.self_attn.v_proj": 6, "model.layers.1.self_attn.q_proj": 2})"));
  CHECK(derived["alpha_pattern"] == nlohmann::json::parse(R"({"model.layers.10.self_attn.q_proj": 3})"));
  CHECK(derived["target_modules"] == nlohmann::json::parse(R"(["q_proj", "v_proj"])"));
  CHECK(derived["base_model_name_or_path"] == "tiny-llama");
  CHECK(derived["task_type"].is_null());
  CHECK(derived["peft_type"] == "LORA");
  CHECK(derived["inference_mode"] == true);
  const PeftAdapter again = read_peft_adapter(out.string());
  for (std::size_t i = 0; i < again.modules.size(); ++i) {
    CHECK(again.modules[i].rank == read.modules[i].rank);
    CHECK(again.modules[i].alpha == read.modules[i].alpha);
    CHECK(same_bits(again.modules[i].a.values, read.modules[i].a.values));
  }

  // rsLoRA scales by alpha / sqrt(r); a fractional alpha is kept as a float.
  PeftAdapter rs = adapter;
  rs.use_rslora = true;
  rs.target_modules.clear();  // derived from the module names
  for (auto& m : rs.modules) {
    m.alpha = 2.5;
    m.scale = 2.5 / std::sqrt(static_cast<double>(m.rank));
  }
  const fs::path rs_dir = tmp / "rslora";
  write_peft_adapter(rs, rs_dir.string(), DType::kF64);
  const auto rs_config = nlohmann::json::parse(read_text(rs_dir / kPeftConfigFile));
  CHECK(rs_config["lora_alpha"] == 2.5);
  CHECK(rs_config["use_rslora"] == true);
  CHECK(rs_config["target_modules"] == nlohmann::json::parse(R"(["q_proj", "v_proj"])"));
  const PeftAdapter rs_back = read_peft_adapter(rs_dir.string());
  for (const auto& m : rs_back.modules) {
    CHECK(m.scale == 2.5 / std::sqrt(static_cast<double>(m.rank)));
    CHECK(m.a_dtype == DType::kF64);
  }
}

TEST_CASE("PEFT: config and tensor errors name the file and the rule", "[io][peft]") {
  TempDir tmp;
  const fs::path dir = copy_fixture(tmp);
  const fs::path config_path = dir / kPeftConfigFile;
  const std::string original_config = read_text(config_path);
  const auto edit_config = [&](const std::function<void(nlohmann::ordered_json&)>& edit) {
    auto config = nlohmann::ordered_json::parse(original_config);
    edit(config);
    write_text(config_path, config.dump(2));
  };
  const auto read_error = [&] {
    return error_of([&] { read_peft_adapter(dir.string()); }, ErrorCode::kIo);
  };

  edit_config([](auto& c) { c["peft_type"] = "IA3"; });
  CHECK_THAT(read_error(), Contains(config_path.string()) &&
                               Contains("peft_type is \"IA3\", but only \"LORA\""));
  edit_config([](auto& c) { c.erase("peft_type"); });
  CHECK_THAT(read_error(), Contains("missing \"peft_type\""));
  edit_config([](auto& c) { c.erase("r"); });
  CHECK_THAT(read_error(), Contains(config_path.string()) && Contains("missing \"r\""));
  edit_config([](auto& c) { c["r"] = 0; });
  CHECK_THAT(read_error(), Contains("\"r\" must be a positive integer, got 0"));
  edit_config([](auto& c) { c["r"] = "8"; });
  CHECK_THAT(read_error(), Contains("\"r\" must be a positive integer, got \"8\""));
  edit_config([](auto& c) { c["lora_alpha"] = "32"; });
  CHECK_THAT(read_error(), Contains("\"lora_alpha\" must be a finite number"));
  edit_config([](auto& c) { c["use_dora"] = true; });
  CHECK_THAT(read_error(), Contains("DoRA adapters are not supported"));
  edit_config([](auto& c) { c["fan_in_fan_out"] = "yes"; });
  CHECK_THAT(read_error(), Contains("\"fan_in_fan_out\" must be true or false"));
  edit_config([](auto& c) { c["target_modules"] = 3; });
  CHECK_THAT(read_error(), Contains("\"target_modules\" must be a list of names, a string or null"));
  edit_config([](auto& c) { c["rank_pattern"] = {{"c_attn", -2}}; });
  CHECK_THAT(read_error(), Contains("rank_pattern[\"c_attn\"] must be a positive integer"));
  edit_config([](auto& c) { c["rank_pattern"] = {{"h.0.(", 4}}; });
  CHECK_THAT(read_error(), Contains("pattern key \"h.0.(\" is not a regular expression"));
  edit_config([](auto& c) { c["rank_pattern"] = {{"h.0.attn.c_attn", 4}}; });
  CHECK_THAT(read_error(), Contains("module \"transformer.h.0.attn.c_attn\"") &&
                               Contains("rank mismatch: the config gives rank 4") &&
                               Contains(kPeftWeightsFile));
  write_text(config_path, "{\"peft_type\": \"LORA\", ");
  CHECK_THAT(read_error(), Contains(config_path.string()) && Contains("not valid JSON"));
  write_text(config_path, "[]");
  CHECK_THAT(read_error(), Contains("not a JSON object"));

  // Unknown keys, target_modules as a string and null patterns are fine.
  edit_config([](auto& c) {
    c["some_future_option"] = {1, 2};
    c["target_modules"] = ".*c_(attn|proj)";
    c["rank_pattern"] = nullptr;
    c["lora_alpha"] = 32.0;
  });
  const PeftAdapter relaxed = read_peft_adapter(dir.string());
  CHECK(relaxed.target_modules_regex == ".*c_(attn|proj)");
  CHECK(relaxed.modules.size() == 36);
  CHECK(relaxed.lora_alpha == 32);

  fs::remove(config_path);
  CHECK_THAT(read_error(), Contains(config_path.string()) && Contains("missing or not a regular file"));
  write_text(config_path, original_config);

  // Tensor-level errors.
  const fs::path weights_path = dir / kPeftWeightsFile;
  const SafetensorsFile weights = read_safetensors(weights_path.string());
  const auto with_weights = [&](const std::function<void(SafetensorsFile&)>& edit) {
    SafetensorsFile copy = weights;
    edit(copy);
    write_safetensors(copy, weights_path.string());
  };
  const std::string key = "base_model.model.transformer.h.3.mlp.c_proj";
  with_weights([&](auto& f) { f.tensors.erase(key + ".lora_B.weight"); });
  CHECK_THAT(read_error(), Contains(weights_path.string()) &&
                               Contains("module \"transformer.h.3.mlp.c_proj\": has lora_A but no lora_B"));
  with_weights([&](auto& f) { f.tensors.erase(key + ".lora_A.weight"); });
  CHECK_THAT(read_error(), Contains("module \"transformer.h.3.mlp.c_proj\": has lora_B but no lora_A"));
  with_weights([&](auto& f) {
    f.tensors[key + ".lora_B.weight"] = from_host_tensor(filled({768, 4}, 0, 1), DType::kF32);
  });
  CHECK_THAT(read_error(), Contains("module \"transformer.h.3.mlp.c_proj\"") &&
                               Contains("rank mismatch") && Contains("lora_B is (768 x 4)"));
  with_weights([&](auto& f) {
    f.tensors[key + ".lora_A.weight"] = from_host_tensor(filled({8, 3, 2}, 0, 1), DType::kF32);
  });
  CHECK_THAT(read_error(), Contains("must both be matrices"));
  with_weights([&](auto& f) {
    f.tensors["base_model.model.score.weight"] = from_host_tensor(filled({2, 2}, 0, 1), DType::kF32);
  });
  CHECK_THAT(read_error(), Contains("tensor \"base_model.model.score.weight\" is not a LoRA weight"));
  with_weights([&](auto& f) {
    f.tensors[key + ".lora_A.weight"] = SafetensorsTensor{DType::kI32, {8, 3072}, std::vector<std::uint8_t>(8 * 3072 * 4)};
  });
  CHECK_THAT(read_error(), Contains("lora_A is I32") && Contains("only F32, F16, BF16 and F64"));
  with_weights([&](auto& f) { f.tensors.clear(); });
  CHECK_THAT(read_error(), Contains("holds no tensors"));
  write_bytes(weights_path, {1, 2, 3});
  CHECK_THAT(read_error(), Contains(weights_path.string()) && Contains("shorter than the 8-byte"));
}

TEST_CASE("PEFT: writing is all or nothing", "[io][peft]") {
  TempDir tmp;
  PeftAdapter adapter;
  adapter.r = 2;
  adapter.lora_alpha = 4;
  adapter.modules = {make_module("layers.0.q_proj", 2, 3, 4, 4), make_module("layers.1.q_proj", 2, 3, 4, 4)};

  SECTION("an existing non-empty directory is refused unless asked") {
    const fs::path out = tmp / "out";
    fs::create_directories(out);
    write_text(out / "README.md", "keep me");
    CHECK_THAT(error_of([&] { write_peft_adapter(adapter, out.string(), DType::kF32); }, ErrorCode::kIo),
               Contains("refusing to overwrite \"" + out.string() + "\""));
    CHECK(entries_of(out) == std::vector<std::string>{"README.md"});
    CHECK(entries_of(tmp.path()) == std::vector<std::string>{"out"});

    write_peft_adapter(adapter, out.string(), DType::kF32, /*overwrite=*/true);
    CHECK(entries_of(out) == std::vector<std::string>{"README.md", kPeftConfigFile, kPeftWeightsFile});
    CHECK(read_text(out / "README.md") == "keep me");
    adapter.modules[0].a.values[0] = 42;
    write_peft_adapter(adapter, out.string(), DType::kF32, true);
    CHECK(read_peft_adapter(out.string()).modules[0].a.values[0] == 42);
    CHECK(entries_of(tmp.path()) == std::vector<std::string>{"out"});

    // An empty directory is filled without asking; a trailing slash is fine.
    fs::create_directories(tmp / "empty");
    write_peft_adapter(adapter, (tmp / "empty").string() + "/", DType::kBF16);
    CHECK(read_peft_adapter((tmp / "empty").string()).modules.size() == 2);
  }

  SECTION("a failure part way leaves no output and no temporary files") {
    PeftAdapter bad = adapter;
    bad.modules[1].b.values[3] = 1e6;  // overflows F16 after the config is written
    const fs::path out = tmp / "out";
    CHECK_THAT(error_of([&] { write_peft_adapter(bad, out.string(), DType::kF16); },
                        ErrorCode::kInvalidArgument),
               Contains("layers.1.q_proj.lora_B.weight") && Contains("overflows F16"));
    CHECK_FALSE(fs::exists(out));
    CHECK(entries_of(tmp.path()).empty());

    // The same failure over an existing adapter leaves it untouched.
    write_peft_adapter(adapter, out.string(), DType::kF32);
    const auto before_weights = read_bytes(out / kPeftWeightsFile);
    const auto before_config = read_bytes(out / kPeftConfigFile);
    CHECK_THROWS_AS(write_peft_adapter(bad, out.string(), DType::kF16, true), rankwise::error);
    CHECK(read_bytes(out / kPeftWeightsFile) == before_weights);
    CHECK(read_bytes(out / kPeftConfigFile) == before_config);
    CHECK(entries_of(tmp.path()) == std::vector<std::string>{"out"});
  }

  SECTION("an unwritable parent fails cleanly") {
    write_text(tmp / "plain-file", "x");
    const fs::path out = tmp / "plain-file" / "adapter";
    CHECK_THAT(error_of([&] { write_peft_adapter(adapter, out.string(), DType::kF32); }, ErrorCode::kIo),
               Contains("cannot create the temporary directory"));
    CHECK(entries_of(tmp.path()) == std::vector<std::string>{"plain-file"});
    CHECK_THAT(error_of([&] { write_peft_adapter(adapter, (tmp / "plain-file").string(), DType::kF32); },
                        ErrorCode::kIo),
               Contains("exists and is not a directory"));
  }

  SECTION("inconsistent adapters are refused before anything is written") {
    const fs::path out = tmp / "out";
    const auto refused = [&](PeftAdapter a) {
      return error_of([&] { write_peft_adapter(a, out.string(), DType::kF32); }, ErrorCode::kInvalidArgument);
    };
    PeftAdapter a = adapter;
    a.modules[0].scale = 3;
    CHECK_THAT(refused(a), Contains("module \"layers.0.q_proj\": scale 3 does not follow from alpha 4 and rank 2"));
    a = adapter;
    a.modules[1].b.shape = {4, 3};
    CHECK_THAT(refused(a), Contains("lora_B has shape (4 x 3), expected (d_out x 2)"));
    a = adapter;
    a.modules[1].a.values.pop_back();
    CHECK_THAT(refused(a), Contains("lora_A holds 5 values"));
    a = adapter;
    a.modules[1].name = a.modules[0].name;
    CHECK_THAT(refused(a), Contains("appears twice"));
    a = adapter;
    a.target_modules = {"k_proj"};
    CHECK_THAT(refused(a), Contains("module \"layers.0.q_proj\" is not matched by target_modules"));
    a = adapter;
    a.modules.clear();
    CHECK_THAT(refused(a), Contains("no modules"));
    CHECK_THAT(error_of([&] { write_peft_adapter(adapter, out.string(), DType::kI8); },
                        ErrorCode::kInvalidArgument),
               Contains("cannot store LoRA weights as I8"));
    CHECK(entries_of(tmp.path()).empty());
  }
}
