// libFuzzer target: the PEFT pattern matcher. The input is a pattern, a NUL
// byte, and a module name. Compiling and matching must return or throw a
// rankwise::error, in time linear in the name. Two invariants are checked: a
// full match is also a prefix match, and the direct comparison used for plain
// keys agrees with the compiled pattern.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "rankwise/io/peft_adapter.hpp"
#include "rankwise/io/regex.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace detail = rankwise::io::detail;
  const std::string input(reinterpret_cast<const char*>(data), size);
  const std::size_t nul = input.find('\0');
  const std::string pattern = input.substr(0, nul);
  const std::string subject = nul == std::string::npos ? std::string() : input.substr(nul + 1);

  std::string why;
  const auto re = detail::Regex::compile(pattern, why);
  if (re) {
    const auto full = re->matches(subject, detail::Regex::Anchor::kFull);
    const auto prefix = re->matches(subject, detail::Regex::Anchor::kPrefix);
    if (full.has_value() != prefix.has_value()) std::abort();
    if (full && *full && !*prefix) std::abort();
  } else if (why.empty()) {
    std::abort();  // a refusal must say why
  }

  try {
    const detail::PatternMatcher matcher(pattern, "fuzz");
    const bool matched = matcher.matches(subject);
    if (detail::plain_pattern(pattern)) {
      std::string ignored;
      const auto wrapped = detail::Regex::compile("(.*\\.)?(" + pattern + ")$", ignored);
      if (!wrapped) std::abort();
      if (wrapped->matches(subject, detail::Regex::Anchor::kPrefix) != matched) std::abort();
    }
  } catch (const rankwise::error&) {
  }
  return 0;
}
