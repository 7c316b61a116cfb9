// Hostile inputs to the readers (issue 13, items 1-8): deep or huge JSON, long names, patterns
// that defeat backtracking matchers, huge headers; and the refusal of a NaN adapter (issue 14, 7).
// Each must give a rankwise::error naming the file and the limit, in bounded time; linear time is
// checked as the ratio of the times of two sizes, never as an absolute time.
// Those cases carry the tag [timing]; the sanitizer run (cmake/sanitize.sh)
// skips them, since instrumentation distorts the ratios.
#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "rankwise/io/peft_adapter.hpp"
#include "rankwise/io/regex.hpp"
#include "rankwise/io/safetensors.hpp"
#include "rankwise/merge/peft_merge.hpp"
#include "support/temp_dir.hpp"

#ifndef RANKWISE_TEST_DATA_DIR
#error "RANKWISE_TEST_DATA_DIR must name tests/data"
#endif

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using rankwise::ErrorCode;
using rankwise::HostTensor;
using namespace rankwise::io;
using rankwise::io::detail::Regex;

namespace {

const fs::path kData = fs::path(RANKWISE_TEST_DATA_DIR);

using rwtest::TempDir;

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
}

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

// The best of three runs of `f`, in seconds: the minimum is the least noisy
// estimate on a shared machine.
double seconds_of(const std::function<void()>& f) {
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    const auto start = std::chrono::steady_clock::now();
    f();
    best = std::min(
        best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

// time(2n) / time(n) for `work(n)`: about 2 when linear, 4 when quadratic.
double doubling_ratio(std::size_t n, const std::function<void(std::size_t)>& work) {
  const double small = seconds_of([&] { work(n); });
  const double large = seconds_of([&] { work(2 * n); });
  const double ratio = large / std::max(small, 1e-6);
  INFO("n = " << n << ": " << small << " s, 2n: " << large << " s, ratio " << ratio);
  CHECK(ratio < 3.5);
  return ratio;
}

std::vector<std::uint8_t> make_file(const std::string& header, std::size_t data_bytes) {
  std::vector<std::uint8_t> out;
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(n >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.resize(out.size() + data_bytes, 0);
  return out;
}

// A header of `n` one-element F32 tensors, optionally repeating the first name at the end.
std::string many_tensors_header(std::size_t n, bool duplicate_last = false) {
  std::string h = "{";
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t name = duplicate_last && i + 1 == n ? 0 : i;
    if (i) h += ',';
    h += "\"model.layers." + std::to_string(name) +
         ".weight\":{\"dtype\":\"F32\",\"shape\":[1],"
         "\"data_offsets\":[" +
         std::to_string(4 * i) + "," + std::to_string(4 * i + 4) + "]}";
  }
  return h + "}";
}

HostTensor filled(std::vector<std::int64_t> shape, double value) {
  HostTensor t;
  t.shape = std::move(shape);
  t.values.assign(static_cast<std::size_t>(t.numel()), value);
  return t;
}

LoraModule make_module(const std::string& name, std::int64_t rank) {
  LoraModule m;
  m.name = name;
  m.rank = rank;
  m.alpha = 2.0 * static_cast<double>(rank);
  m.scale = 2.0;
  m.a = filled({rank, 3}, 0.25);
  m.b = filled({2, rank}, 0.5);
  return m;
}

// A minimal adapter directory: the config text as given, one module's weights.
fs::path adapter_dir(const TempDir& tmp, const std::string& name, const std::string& config,
                     const std::string& module = "layers.0.q_proj", std::int64_t rank = 2) {
  const fs::path dir = tmp / name;
  fs::create_directories(dir);
  SafetensorsFile weights;
  weights.tensors.emplace("base_model.model." + module + ".lora_A.weight",
                          from_host_tensor(filled({rank, 3}, 0.25), DType::kF32));
  weights.tensors.emplace("base_model.model." + module + ".lora_B.weight",
                          from_host_tensor(filled({2, rank}, 0.5), DType::kF32));
  write_safetensors(weights, (dir / kPeftWeightsFile).string());
  write_text(dir / kPeftConfigFile, config);
  return dir;
}

const char* kBaseConfig = R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4)";

std::string config_with(const std::string& extra) {
  return std::string(kBaseConfig) + (extra.empty() ? "" : ", " + extra) + "}";
}

}  // namespace

// ---------------------------------------------------------------------------
// The matcher
// ---------------------------------------------------------------------------

TEST_CASE("regex: agrees with Python's re.fullmatch and re.match", "[io][hardening][regex]") {
  struct Case {
    const char* pattern;
    const char* subject;
    bool full;
    bool prefix;
  };
  // Expected values from CPython 3.11's re.
  const Case cases[] = {
      {R"(model\.layers\.\d+\.self_attn\.(q|k|v)_proj)", "model.layers.12.self_attn.k_proj", true,
       true},
      {R"(model\.layers\.\d+\.self_attn\.(q|k|v)_proj)", "model.layers.x.self_attn.k_proj", false,
       false},
      {R"(.*\.(q_proj|v_proj)$)", "model.layers.0.self_attn.v_proj", true, true},
      {R"(.*(q_proj|v_proj))", "model.layers.0.self_attn.o_proj", false, false},
      {R"((a|a)*b)", "aaaaaaaaaaaaaaaaaaaaaaaaaaaa", false, false},
      {R"((a|a)*b)", "aaaaaaaaaaaaaaaaaaaaaaaaaaaab", true, true},
      {R"((a*)*c)", "aaaa", false, false},
      {R"((?:ab){2,3})", "ababab", true, true},
      {R"((?:ab){2,3})", "abababab", false, true},
      {R"(x{,2}y)", "xxy", true, true},
      {R"(x{,2}y)", "xxxy", false, false},
      {R"(a{)", "a{", true, true},
      {R"(a{1)", "a{1", true, true},
      {R"(a{,})", "a{,}", false, true},
      {R"([]a]+)", "]a]", true, true},
      {R"([^]]+)", "ab", true, true},
      {R"([a\-z]+)", "-az", true, true},
      {R"([\d.]+)", "1.2", true, true},
      {R"(\w+\b)", "abc", true, true},
      {R"(a$)", "a\n", false, true},
      {R"(a\Z)", "a\n", false, false},
      {R"(^a|b)", "b", true, true},
      {R"((?P<n>q)_proj)", "q_proj", true, true},
      {"\xc3\xa9.", "\xc3\xa9\xc3\xbc", true, true},  // one code point each
      {R"(a.c)", "a\nc", false, false},
      {R"(a*?b)", "aab", true, true},
      {R"(\x41)", "A", true, true},
      {R"(\\)", "\\", true, true},
      {R"((?:))", "", true, true},
      {R"(a|)", "", true, true},
      {R"([\s])", "\t", true, true},
      {R"(\B)", "", false, false},
  };
  for (const Case& c : cases) {
    CAPTURE(c.pattern, c.subject);
    std::string why;
    const auto re = Regex::compile(c.pattern, why);
    REQUIRE(re.has_value());
    CHECK(re->matches(c.subject, Regex::Anchor::kFull) == c.full);
    CHECK(re->matches(c.subject, Regex::Anchor::kPrefix) == c.prefix);
  }
}

TEST_CASE("regex: unsupported and invalid patterns are refused with the reason",
          "[io][hardening][regex]") {
  const auto refusal = [](const std::string& pattern) {
    std::string why;
    CHECK_FALSE(Regex::compile(pattern, why).has_value());
    return why;
  };
  CHECK_THAT(refusal("(?=a)"), Contains("lookaround"));
  CHECK_THAT(refusal("(?<!a)b"), Contains("lookaround"));
  CHECK_THAT(refusal("(?i)a"), Contains("inline flags"));
  CHECK_THAT(refusal("(a)\\1"), Contains("backreferences"));
  CHECK_THAT(refusal("a++"), Contains("possessive"));
  CHECK_THAT(refusal("a**"), Contains("multiple repeat"));
  CHECK_THAT(refusal("*a"), Contains("nothing to repeat"));
  CHECK_THAT(refusal("^*"), Contains("nothing to repeat"));
  CHECK_THAT(refusal("a{2,1}"), Contains("min repeat greater than max repeat"));
  CHECK_THAT(refusal("[b-a]"), Contains("bad character range"));
  CHECK_THAT(refusal("[a"), Contains("unterminated character set"));
  CHECK_THAT(refusal("(a"), Contains("missing )"));
  CHECK_THAT(refusal("a)"), Contains("unbalanced parenthesis"));
  CHECK_THAT(refusal("\\q"), Contains("bad or unsupported escape \\q"));
  CHECK_THAT(refusal("a{1001}"), Contains("repeat count over the limit of 1000"));
  CHECK_THAT(refusal("(a{1000}){1000}"), Contains("instructions"));
  CHECK_THAT(refusal(std::string(5000, 'a')), Contains("4096-byte limit"));
  CHECK_THAT(refusal(std::string(65, '(') + std::string(65, ')')),
             Contains("groups nested deeper than 64"));
  std::string why;
  CHECK(Regex::compile(std::string(64, '(') + "a" + std::string(64, ')'), why).has_value());
}

// Item 5: "(a|a)*b" is exponential for a backtracking matcher.
TEST_CASE("issue 13.5: (a|a)*b takes linear time", "[io][hardening][regex][timing]") {
  using rankwise::io::detail::PatternMatcher;
  const PatternMatcher m("(a|a)*b", "test");
  CHECK_FALSE(m.matches(std::string(28, 'a')));
  CHECK(m.matches(std::string(28, 'a') + "b"));
  CHECK(m.matches("x." + std::string(28, 'a') + "b"));
  // Twenty matches per measurement, so that the times are well above timer noise.
  doubling_ratio(8000, [&](std::size_t n) {
    const std::string subject(n, 'a');
    bool any = false;
    for (int i = 0; i < 20; ++i) any = any || m.matches(subject);
    CHECK_FALSE(any);
  });
}

// Item 3: a module name of 50,000+ characters against any pattern.
TEST_CASE("issue 13.3: long module names are matched linearly or refused by length",
          "[io][hardening][regex]") {
  using rankwise::io::detail::PatternMatcher;
  const PatternMatcher plain("q_proj", "config \"c.json\"");
  const PatternMatcher regex("layers\\.\\d+\\.q_proj", "config \"c.json\"");
  const std::string long_name = std::string(16000, 'x') + ".layers.7.q_proj";
  CHECK(plain.matches(long_name));
  CHECK(regex.matches(long_name));
  CHECK_FALSE(regex.matches(std::string(16000, 'x')));

  const std::string huge(50000, 'a');
  const std::string message = error_of([&] { regex.matches(huge); }, ErrorCode::kIo);
  CHECK_THAT(message, Contains("config \"c.json\"") && Contains("module name of 50000 bytes") &&
                          Contains("16384-byte limit") && Contains("layers\\\\.\\\\d+\\\\.q_proj"));
  CHECK(message.size() < 400);

  // Through the reader: a 50,000-character module with a rank_pattern.
  TempDir tmp;
  const fs::path dir =
      adapter_dir(tmp, "long", config_with(R"("rank_pattern": {"q_.*": 2})"), huge);
  CHECK_THAT(error_of([&] { read_peft_adapter(dir.string()); }, ErrorCode::kIo),
             Contains((dir / kPeftConfigFile).string()) && Contains("module name of 50000 bytes"));

  // Through the writer: target_modules as a regular expression.
  PeftAdapter adapter;
  adapter.r = 2;
  adapter.lora_alpha = 4;
  adapter.target_modules_regex = ".*a+";
  adapter.modules = {make_module(huge, 2)};
  CHECK_THAT(error_of([&] { write_peft_adapter(adapter, (tmp / "out").string(), DType::kF32); },
                      ErrorCode::kInvalidArgument),
             Contains("module name of 50000 bytes") && Contains("target_modules"));
  CHECK_FALSE(fs::exists(tmp / "out"));
  adapter.modules = {make_module(std::string(10000, 'a'), 2)};
  write_peft_adapter(adapter, (tmp / "out").string(), DType::kF32);
  CHECK(read_peft_adapter((tmp / "out").string()).modules.size() == 1);
}

// Item 4: a pattern key of 200,000 nested "(".
TEST_CASE("issue 13.4: deeply nested pattern keys are refused", "[io][hardening][regex]") {
  using rankwise::io::detail::PatternMatcher;
  const std::string huge(200000, '(');
  std::string message =
      error_of([&] { PatternMatcher(huge, "config \"c.json\""); }, ErrorCode::kIo);
  CHECK_THAT(message, Contains("config \"c.json\"") && Contains("4096-byte limit"));
  CHECK(message.size() < 400);  // the key is quoted cut
  message = error_of([&] { PatternMatcher(std::string(1000, '(') + "a", "c"); }, ErrorCode::kIo);
  CHECK_THAT(message, Contains("groups nested deeper than 64"));

  TempDir tmp;
  const fs::path dir =
      adapter_dir(tmp, "deep", config_with("\"rank_pattern\": {\"" + huge + "\": 2}"));
  CHECK_THAT(error_of([&] { read_peft_adapter(dir.string()); }, ErrorCode::kIo),
             Contains((dir / kPeftConfigFile).string()) && Contains("4096-byte limit"));
}

// Item 6: module names are not regular expressions.
TEST_CASE("issue 13.6: the writer escapes module names that are not plain",
          "[io][hardening][regex]") {
  TempDir tmp;
  PeftAdapter adapter;
  adapter.r = 2;
  adapter.lora_alpha = 4;
  adapter.target_modules = {"q_proj", "k_proj"};
  const std::string stars(1000, '*');
  adapter.modules = {make_module("layers.0.q_proj", 2),
                     make_module("layers." + stars + ".q_proj", 3),
                     make_module("layers.(a|a)*.k_proj", 4), make_module("layers.1.k_proj", 2)};
  const auto start = std::chrono::steady_clock::now();
  write_peft_adapter(adapter, (tmp / "out").string(), DType::kF32);
  const PeftAdapter back = read_peft_adapter((tmp / "out").string());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(seconds < 30);  // a hang guard only (std::regex did not finish in 120 s)
  REQUIRE(back.modules.size() == 4);
  for (const auto& m : adapter.modules) {
    const LoraModule* read = back.find_module(m.name);
    REQUIRE(read != nullptr);
    CHECK(read->rank == m.rank);
  }
  const auto config = nlohmann::json::parse(std::ifstream(tmp / "out" / kPeftConfigFile));
  CHECK(config["rank_pattern"].contains("layers\\.\\(a\\|a\\)\\*\\.k_proj"));
}

// ---------------------------------------------------------------------------
// Config files
// ---------------------------------------------------------------------------

// Item 1: a value nested 100,000 deep.
TEST_CASE("issue 13.1: a config nested 100,000 deep is refused", "[io][hardening][config]") {
  TempDir tmp;
  const std::string deep = "\"x\": " + std::string(100000, '[') + std::string(100000, ']');
  const fs::path dir = adapter_dir(tmp, "deep", config_with(deep));
  const std::string message = error_of([&] { read_peft_adapter(dir.string()); }, ErrorCode::kIo);
  CHECK_THAT(message, Contains((dir / kPeftConfigFile).string()) &&
                          Contains("nests JSON deeper than the limit of 32 levels"));
  // Within the limit, unknown keys are ignored as before.
  const fs::path ok =
      adapter_dir(tmp, "ok", config_with("\"x\": " + std::string(30, '[') + std::string(30, ']')));
  CHECK(read_peft_adapter(ok.string()).r == 2);
}

// Item 2: no error message prints an unbounded value.
TEST_CASE("issue 13.2: error messages quote values cut short", "[io][hardening][config]") {
  TempDir tmp;
  const auto message_for = [&](const std::string& config) {
    const fs::path dir = adapter_dir(tmp, "m", config);
    const std::string message = error_of([&] { read_peft_adapter(dir.string()); }, ErrorCode::kIo);
    fs::remove_all(dir);
    CHECK(message.size() < 600);
    return message;
  };
  const std::string deep_r = std::string(31, '[') + std::string(31, ']');
  CHECK_THAT(message_for(R"({"peft_type": "LORA", "r": )" + deep_r + "}"),
             Contains("\"r\" must be a positive integer, got [[[[...]]]]"));
  CHECK_THAT(message_for(R"({"peft_type": "LORA", "r": )" + std::string(100000, '[') + "}"),
             Contains("nests JSON deeper"));
  std::string wide = "[";
  for (int i = 0; i < 200000; ++i) wide += (i ? ",1" : "1");
  wide += "]";
  CHECK_THAT(message_for(R"({"peft_type": "LORA", "r": )" + wide + "}"),
             Contains("got [1, 1, 1") && Contains("more)"));
  const std::string long_string = "\"" + std::string(1000000, 'z') + "\"";
  CHECK_THAT(message_for(R"({"peft_type": )" + long_string + R"(, "r": 2})"),
             Contains("peft_type is \"zzzz") && Contains("(1000000 bytes)"));
  CHECK_THAT(
      message_for(config_with(R"("rank_pattern": {")" + std::string(100000, 'k') + R"(": "x"})")),
      Contains("rank_pattern[\"kkkk") && Contains("(100000 bytes)] must be a positive"));
  CHECK_THAT(message_for(R"({"peft_type": "LORA", "r": 2, "x": ")" + std::string(100000, 'q')),
             Contains("not valid JSON"));
}

// Item 7: 100,000 keys.
TEST_CASE("issue 13.7: config parsing is linear in the number of keys",
          "[io][hardening][config][timing]") {
  const auto config_of = [](std::size_t n) {
    std::string text = config_with("");
    text.pop_back();
    text += ", \"rank_pattern\": {";
    for (std::size_t i = 0; i < n; ++i) {
      text += (i ? ",\"" : "\"") + std::to_string(n - i) + "_proj\": " + std::to_string(i % 7 + 1);
    }
    return text + "}}";
  };
  const auto parse = [&](std::size_t n) {
    PeftAdapter out;
    rankwise::io::detail::parse_peft_config(config_of(n), "c", out);
    REQUIRE(out.rank_pattern.size() == n);
    // File order, not sorted order: PEFT takes the first key that matches.
    CHECK(out.rank_pattern.front().first == std::to_string(n) + "_proj");
    CHECK(out.rank_pattern.back().first == "1_proj");
  };
  parse(100000);
  doubling_ratio(50000, parse);

  // Python's json keeps a repeated key where it first came, with the last value.
  PeftAdapter out;
  rankwise::io::detail::parse_peft_config(
      config_with(R"("rank_pattern": {"b": 1, "a": 2, "b": 3})"), "c", out);
  REQUIRE(out.rank_pattern.size() == 2);
  CHECK(out.rank_pattern[0] == std::make_pair(std::string("b"), std::int64_t{3}));
  CHECK(out.rank_pattern[1] == std::make_pair(std::string("a"), std::int64_t{2}));
}

// ---------------------------------------------------------------------------
// Safetensors headers
// ---------------------------------------------------------------------------

// Item 8: 200,000 entries.
TEST_CASE("issue 13.8: safetensors headers parse in linear time",
          "[io][hardening][safetensors][timing]") {
  const auto parse = [](std::size_t n) {
    const auto bytes = make_file(many_tensors_header(n), 4 * n);
    const SafetensorsFile file = parse_safetensors(bytes.data(), bytes.size(), "big");
    CHECK(file.tensors.size() == n);
  };
  const auto start = std::chrono::steady_clock::now();
  parse(200000);
  INFO("200,000 entries: "
       << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() << " s");
  doubling_ratio(50000, parse);

  // The duplicate-key check stays, at any size.
  const auto dup = make_file(many_tensors_header(200000, true), 4 * 200000);
  CHECK_THAT(error_of([&] { parse_safetensors(dup.data(), dup.size(), "big"); }, ErrorCode::kIo),
             Contains("safetensors file \"big\"") &&
                 Contains("duplicate key \"model.layers.0.weight\" in header"));
}

TEST_CASE("safetensors: messages about names and values stay short",
          "[io][hardening][safetensors]") {
  const std::string name(1000000, 'n');
  auto bytes =
      make_file("{\"" + name + "\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,8]}}", 4);
  std::string message =
      error_of([&] { parse_safetensors(bytes.data(), bytes.size(), "f"); }, ErrorCode::kIo);
  CHECK_THAT(message, Contains("(1000000 bytes)") && Contains("data_offsets"));
  CHECK(message.size() < 800);
  bytes = make_file("{\"w\":{\"dtype\":\"" + name + "\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
  message = error_of([&] { parse_safetensors(bytes.data(), bytes.size(), "f"); }, ErrorCode::kIo);
  CHECK_THAT(message, Contains("unknown dtype \"nnnn") && Contains("(1000000 bytes)"));
  CHECK(message.size() < 800);
  bytes = make_file(
      "{\"w\":{\"dtype\":\"F32\",\"shape\":[\"" + name + "\"],\"data_offsets\":[0,4]}}", 4);
  message = error_of([&] { parse_safetensors(bytes.data(), bytes.size(), "f"); }, ErrorCode::kIo);
  CHECK_THAT(message, Contains("shape must hold non-negative integers, found \"nnnn"));
  CHECK(message.size() < 800);
  bytes = make_file("{\"w\":\"" + name, 0);
  message = error_of([&] { parse_safetensors(bytes.data(), bytes.size(), "f"); }, ErrorCode::kIo);
  CHECK_THAT(message, Contains("header is not valid JSON"));
  CHECK(message.size() < 800);
  bytes = make_file(std::string(100000, '[') + std::string(100000, ']'), 0);
  CHECK_THAT(error_of([&] { parse_safetensors(bytes.data(), bytes.size(), "f"); }, ErrorCode::kIo),
             Contains("nests JSON deeper"));
}

// ---------------------------------------------------------------------------
// Issue 14, item 7: a published adapter whose every value is NaN
// ---------------------------------------------------------------------------

TEST_CASE("issue 14.7: a NaN adapter is refused naming the path, the tensor and the count",
          "[io][hardening][merge]") {
  const fs::path nan_dir = kData / "gemma-2b-lora-nan";
  const PeftAdapter nan = read_peft_adapter(nan_dir.string());  // well formed: reads
  REQUIRE(nan.modules.size() == 36);
  std::vector<std::string> names;
  std::vector<rankwise::merge::MergeInput> inputs;
  const std::vector<std::string> labels = {nan_dir.string()};
  const std::string message =
      error_of([&] { rankwise::merge::collect_modules({nan}, {}, names, inputs, labels); },
               ErrorCode::kInvalidArgument);
  CHECK_THAT(
      message,
      Contains("adapter 0 (\"" + nan_dir.string() + "\")") &&
          Contains("tensor \"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight\"") &&
          Contains("holds 32768 non-finite values (NaN or infinity) of 32768") &&
          Contains("72 of the adapter's 72 tensors"));
  // Second in the list, it is named as such; without labels, by index.
  const PeftAdapter gpt2 = read_peft_adapter((kData / "gpt2-lora-r8").string());
  CHECK_THAT(error_of([&] { rankwise::merge::collect_modules({nan}, {}, names, inputs); },
                      ErrorCode::kInvalidArgument),
             Contains("merge: adapter 0: tensor"));
  PeftAdapter one_bad = gpt2;
  one_bad.modules[3].b.values[5] = std::numeric_limits<double>::infinity();
  CHECK_THAT(error_of(
                 [&] {
                   rankwise::merge::collect_modules({gpt2, one_bad}, {}, names, inputs, {"x", "y"});
                 },
                 ErrorCode::kInvalidArgument),
             Contains("adapter 1 (\"y\")") &&
                 Contains(one_bad.modules[3].name + ".lora_B.weight") &&
                 Contains("holds 1 non-finite values") && Contains("1 of the adapter's 72"));
}
