// A small regular-expression matcher for the patterns PEFT configs hold (target_modules strings,
// rank_pattern / alpha_pattern keys), with Python `re` semantics and linear-time matching.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {
namespace io {
namespace detail {

// Why not std::regex: it backtracks, so "(a|a)*b" takes exponential time, and it
// recurses per character matched and per nesting level compiled, so a long module
// name or a deep pattern from a downloaded config overflows the stack. This is a
// Thompson NFA run as a Pike VM (no captures): time O(len(subject) x len(program)),
// memory O(len(program)), no recursion except the parser's, whose depth is bounded
// by kMaxRegexNesting. Supported, as in Python's `re`: literals, `.`, classes
// `[...]` / `[^...]` with ranges and \d \w \s inside, `* + ? {m} {m,} {,n} {m,n}`
// (and their lazy forms, which match the same strings), `|`, `( )`, `(?: )`,
// `(?P<name> )`, `^ $ \A \Z \b \B`, \d \D \w \W \s \S and escaped punctuation,
// \n \t \r \f \v \xhh. Refused with a message: lookaround, backreferences,
// inline flags, possessive quantifiers, anything else. Classes are ASCII (\d is
// [0-9]); module names are ASCII in practice. Subjects and patterns are decoded
// as UTF-8, so `.` takes one code point as Python does; an invalid byte stands
// for itself.

/// The longest pattern compiled, in bytes.
inline constexpr std::size_t kMaxRegexLength = 4096;
/// The deepest group nesting compiled (bounds the parser's recursion).
inline constexpr int kMaxRegexNesting = 64;
/// The largest m or n in {m,n}; Python allows more, no PEFT config needs it.
inline constexpr int kMaxRegexRepeat = 1000;
/// The most instructions a compiled pattern may have (bounded repeats expand).
inline constexpr std::size_t kMaxRegexProgram = 20000;
/// The longest subject matched, in bytes; with the limits above one match costs
/// at most kMaxRegexSubject x kMaxRegexProgram steps.
inline constexpr std::size_t kMaxRegexSubject = 16384;

// Invalid UTF-8 bytes decode to kInvalidBase + byte, outside Unicode, so they
// match only themselves (and `.`).
inline constexpr std::uint32_t kInvalidBase = 0x110000;

inline std::vector<std::uint32_t> decode_utf8(const std::string& s) {
  std::vector<std::uint32_t> out;
  out.reserve(s.size());
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(s[i]); };
  for (std::size_t i = 0; i < s.size();) {
    const unsigned c = byte(i);
    int extra = c < 0x80           ? 0
                : (c >> 5) == 0x6  ? 1
                : (c >> 4) == 0xE  ? 2
                : (c >> 3) == 0x1E ? 3
                                   : -1;
    std::uint32_t cp = extra == 0   ? c
                       : extra == 1 ? (c & 0x1F)
                       : extra == 2 ? (c & 0x0F)
                                    : (c & 0x07);
    bool ok = extra >= 0;
    for (int k = 1; ok && k <= extra; ++k) {
      if (i + static_cast<std::size_t>(k) >= s.size() || (byte(i + k) & 0xC0) != 0x80) {
        ok = false;
      } else {
        cp = (cp << 6) | (byte(i + k) & 0x3F);
      }
    }
    // Overlong forms and surrogates are invalid too.
    static const std::uint32_t kMinOf[4] = {0, 0x80, 0x800, 0x10000};
    if (ok && extra > 0 &&
        (cp < kMinOf[extra] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))) {
      ok = false;
    }
    if (!ok) {
      out.push_back(kInvalidBase + c);
      ++i;
    } else {
      out.push_back(cp);
      i += static_cast<std::size_t>(extra) + 1;
    }
  }
  return out;
}

inline bool regex_is_word(std::uint32_t c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

/// A compiled pattern. compile() never throws for a bad pattern: it returns
/// nullopt and says why in `error`.
class Regex {
 public:
  /// How a match is anchored: kFull as re.fullmatch, kPrefix as re.match (the
  /// match starts at the beginning and may end anywhere).
  enum class Anchor { kFull, kPrefix };

  static std::optional<Regex> compile(const std::string& pattern, std::string& error) {
    if (pattern.size() > kMaxRegexLength) {
      error = "longer than the " + std::to_string(kMaxRegexLength) + "-byte limit for a pattern";
      return std::nullopt;
    }
    Parser parser{decode_utf8(pattern), 0, {}, {}};
    Node root;
    if (!parser.parse_alternation(root, 0)) {
      error = parser.error;
      return std::nullopt;
    }
    if (parser.pos != parser.text.size()) {
      error = "unbalanced parenthesis at position " + std::to_string(parser.pos);
      return std::nullopt;
    }
    Regex out;
    out.classes_ = std::move(parser.classes);
    if (!out.emit(root, error)) return std::nullopt;
    if (!out.push({Op::kMatch, 0, 0}, error)) return std::nullopt;
    return out;
  }

  /// Whether `subject` matches under `anchor`; nullopt when it is longer than
  /// kMaxRegexSubject (the caller reports that).
  std::optional<bool> matches(const std::string& subject, Anchor anchor) const {
    if (subject.size() > kMaxRegexSubject) return std::nullopt;
    const std::vector<std::uint32_t> s = decode_utf8(subject);
    const std::size_t n = s.size();
    ThreadList current(program_.size()), next(program_.size());
    std::vector<std::size_t> stack;
    add_thread(current, 0, s, 0, stack);
    for (std::size_t pos = 0;; ++pos) {
      for (std::size_t t = 0; t < current.size(); ++t) {
        const Inst& inst = program_[current.at(t)];
        if (inst.op == Op::kMatch && (anchor == Anchor::kPrefix || pos == n)) return true;
      }
      if (pos == n || current.size() == 0) return false;
      next.clear();
      const std::uint32_t c = s[pos];
      for (std::size_t t = 0; t < current.size(); ++t) {
        const std::size_t pc = current.at(t);
        if (step_matches(program_[pc], c)) add_thread(next, pc + 1, s, pos + 1, stack);
      }
      std::swap(current, next);
    }
  }

 private:
  enum class Op : std::uint8_t {
    kChar,         // a = code point
    kAny,          // any code point but '\n'
    kClass,        // a = class index
    kSplit,        // try a, then b
    kJump,         // a
    kBegin,        // ^ and \A: at position 0
    kEnd,          // $: at the end, or before a final '\n'
    kAbsoluteEnd,  // \Z
    kWordBoundary,
    kNotWordBoundary,
    kMatch,
  };
  struct Inst {
    Op op;
    std::uint32_t a;
    std::uint32_t b;
  };
  struct CharClass {
    std::vector<std::pair<std::uint32_t, std::uint32_t>> ranges;  // inclusive
    bool negated = false;
    bool matches(std::uint32_t c) const {
      bool in = false;
      for (const auto& r : ranges) in = in || (c >= r.first && c <= r.second);
      return in != negated;
    }
  };

  // Parse tree; children nest at most kMaxRegexNesting groups deep.
  struct Node {
    enum Kind { kEmpty, kAtom, kConcat, kAlternation, kRepeat } kind = kEmpty;
    Inst atom{Op::kChar, 0, 0};  // kAtom: one instruction
    int min = 0, max = 0;        // kRepeat; max < 0: unbounded
    std::vector<Node> children;
  };

  struct Parser {
    std::vector<std::uint32_t> text;
    std::size_t pos;
    std::vector<CharClass> classes;
    std::string error;

    bool fail(const std::string& why) {
      error = why + " at position " + std::to_string(pos);
      return false;
    }
    bool at_end() const { return pos >= text.size(); }
    std::uint32_t peek(std::size_t ahead = 0) const {
      return pos + ahead < text.size() ? text[pos + ahead] : 0xFFFFFFFFu;
    }

    bool parse_alternation(Node& out, int depth) {
      Node first;
      if (!parse_concat(first, depth)) return false;
      if (peek() != '|') {
        out = std::move(first);
        return true;
      }
      out.kind = Node::kAlternation;
      out.children.push_back(std::move(first));
      while (peek() == '|') {
        ++pos;
        Node branch;
        if (!parse_concat(branch, depth)) return false;
        out.children.push_back(std::move(branch));
      }
      return true;
    }

    bool parse_concat(Node& out, int depth) {
      out.kind = Node::kConcat;
      while (!at_end() && peek() != '|' && peek() != ')') {
        Node atom;
        bool is_assertion = false;
        if (!parse_atom(atom, depth, is_assertion)) return false;
        if (!parse_quantifiers(atom, is_assertion)) return false;
        out.children.push_back(std::move(atom));
      }
      return true;
    }

    // Reads digits into `value`; false when there are none.
    bool read_number(std::size_t& at, long long& value) const {
      const std::size_t start = at;
      value = 0;
      while (at < text.size() && text[at] >= '0' && text[at] <= '9') {
        if (value <= 1000000) value = value * 10 + (text[at] - '0');
        ++at;
      }
      return at > start;
    }

    // Python reads "{m,n}" as a quantifier only in that exact form; any other
    // "{" is a literal.
    bool brace_quantifier(int& min, int& max, bool& is_quantifier) {
      std::size_t at = pos + 1;
      long long lo = 0, hi = -1;
      const bool has_lo = read_number(at, lo);
      bool has_comma = false;
      bool has_hi = false;
      if (at < text.size() && text[at] == ',') {
        has_comma = true;
        ++at;
        has_hi = read_number(at, hi);
      }
      is_quantifier = at < text.size() && text[at] == '}' && (has_lo || has_comma);
      if (!is_quantifier) return true;
      if (!has_comma) hi = lo;
      if (lo > kMaxRegexRepeat || (has_hi && hi > kMaxRegexRepeat)) {
        return fail("repeat count over the limit of " + std::to_string(kMaxRegexRepeat));
      }
      if (has_hi && hi < lo) return fail("min repeat greater than max repeat");
      min = static_cast<int>(lo);
      max = (has_comma && !has_hi) ? -1 : static_cast<int>(hi);
      pos = at + 1;
      return true;
    }

    bool parse_quantifiers(Node& atom, bool is_assertion) {
      bool quantified = false;
      while (!at_end()) {
        int min = 0, max = 0;
        const std::uint32_t c = peek();
        if (c == '*' || c == '+' || c == '?') {
          min = c == '+' ? 1 : 0;
          max = c == '?' ? 1 : -1;
          ++pos;
        } else if (c == '{') {
          bool is_quantifier = false;
          if (!brace_quantifier(min, max, is_quantifier)) return false;
          if (!is_quantifier) return true;
        } else {
          return true;
        }
        if (quantified) return fail("multiple repeat");
        if (is_assertion) return fail("nothing to repeat");
        if (peek() == '?') {
          ++pos;  // lazy: same set of matches
        } else if (peek() == '+') {
          return fail("possessive quantifiers are not supported");
        }
        Node repeat;
        repeat.kind = Node::kRepeat;
        repeat.min = min;
        repeat.max = max;
        repeat.children.push_back(std::move(atom));
        atom = std::move(repeat);
        quantified = true;
      }
      return true;
    }

    // An escape outside or inside a class: a single code point in `cp`, or a
    // class shorthand (\d \w \s and their negations) appended to `ranges`.
    bool parse_escape(bool in_class, std::uint32_t& cp, CharClass* shorthand, bool& is_shorthand) {
      ++pos;  // the backslash
      if (at_end()) return fail("bad escape (end of pattern)");
      const std::uint32_t c = text[pos++];
      is_shorthand = false;
      const auto add_shorthand = [&](char kind, bool negate) {
        CharClass k;
        if (kind == 'd') k.ranges = {{'0', '9'}};
        if (kind == 'w') k.ranges = {{'0', '9'}, {'A', 'Z'}, {'a', 'z'}, {'_', '_'}};
        if (kind == 's') k.ranges = {{'\t', '\r'}, {' ', ' '}};
        k.negated = negate;
        *shorthand = std::move(k);
        is_shorthand = true;
      };
      switch (c) {
        case 'd':
        case 'D':
        case 'w':
        case 'W':
        case 's':
        case 'S':
          add_shorthand(static_cast<char>(c | 0x20), c < 'a');
          return true;
        case 'n':
          cp = '\n';
          return true;
        case 't':
          cp = '\t';
          return true;
        case 'r':
          cp = '\r';
          return true;
        case 'f':
          cp = '\f';
          return true;
        case 'v':
          cp = '\v';
          return true;
        case 'a':
          cp = '\a';
          return true;
        case 'x': {
          std::uint32_t v = 0;
          for (int k = 0; k < 2; ++k) {
            const std::uint32_t h = peek();
            const int d = (h >= '0' && h <= '9')   ? static_cast<int>(h - '0')
                          : (h >= 'a' && h <= 'f') ? static_cast<int>(h - 'a' + 10)
                          : (h >= 'A' && h <= 'F') ? static_cast<int>(h - 'A' + 10)
                                                   : -1;
            if (d < 0) return fail("bad \\x escape");
            v = v * 16 + static_cast<std::uint32_t>(d);
            ++pos;
          }
          cp = v;
          return true;
        }
        case 'b':
          if (in_class) {
            cp = '\b';
            return true;
          }
          break;
        default:
          break;
      }
      if (c >= '0' && c <= '9') return fail("backreferences and octal escapes are not supported");
      if (c < 0x80 && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))) {
        return fail(std::string("bad or unsupported escape \\") + static_cast<char>(c));
      }
      cp = c;  // escaped punctuation or a non-ASCII character: itself
      return true;
    }

    bool parse_class(Node& out) {
      ++pos;  // '['
      CharClass k;
      if (peek() == '^') {
        k.negated = true;
        ++pos;
      }
      bool first = true;
      while (true) {
        if (at_end()) return fail("unterminated character set");
        if (peek() == ']' && !first) {
          ++pos;
          break;
        }
        first = false;
        std::uint32_t lo = 0;
        if (peek() == '\\') {
          CharClass shorthand;
          bool is_shorthand = false;
          if (!parse_escape(true, lo, &shorthand, is_shorthand)) return false;
          if (is_shorthand) {
            if (shorthand.negated) {
              // A negated shorthand inside a class: its complement as ranges.
              std::uint32_t next = 0;
              for (const auto& r : shorthand.ranges) {
                if (r.first > next) k.ranges.emplace_back(next, r.first - 1);
                next = r.second + 1;
              }
              k.ranges.emplace_back(next, 0xFFFFFFFEu);
            } else {
              k.ranges.insert(k.ranges.end(), shorthand.ranges.begin(), shorthand.ranges.end());
            }
            continue;
          }
        } else {
          lo = text[pos++];
        }
        std::uint32_t hi = lo;
        if (peek() == '-' && peek(1) != ']' && pos + 1 < text.size()) {
          ++pos;
          if (peek() == '\\') {
            CharClass shorthand;
            bool is_shorthand = false;
            if (!parse_escape(true, hi, &shorthand, is_shorthand)) return false;
            if (is_shorthand) return fail("bad character range");
          } else {
            hi = text[pos++];
          }
          if (hi < lo) return fail("bad character range");
        }
        k.ranges.emplace_back(lo, hi);
        if (k.ranges.size() > kMaxRegexProgram) return fail("character set too large");
      }
      out.kind = Node::kAtom;
      out.atom = {Op::kClass, static_cast<std::uint32_t>(classes.size()), 0};
      classes.push_back(std::move(k));
      return true;
    }

    bool parse_atom(Node& out, int depth, bool& is_assertion) {
      is_assertion = false;
      const std::uint32_t c = peek();
      out.kind = Node::kAtom;
      switch (c) {
        case '(': {
          if (depth + 1 > kMaxRegexNesting) {
            return fail("groups nested deeper than " + std::to_string(kMaxRegexNesting));
          }
          ++pos;
          if (peek() == '?') {
            if (peek(1) == ':') {
              pos += 2;
            } else if (peek(1) == 'P' && peek(2) == '<') {
              pos += 3;
              const std::size_t start = pos;
              while (!at_end() && (regex_is_word(peek()) || peek() >= 0x80)) ++pos;
              if (pos == start || peek() != '>') return fail("bad group name");
              ++pos;
            } else {
              return fail("lookaround, inline flags and other (? groups are not supported");
            }
          }
          if (!parse_alternation(out, depth + 1)) return false;
          if (peek() != ')') return fail("missing ), unterminated subpattern");
          ++pos;
          return true;
        }
        case ')':
          return fail("unbalanced parenthesis");
        case '*':
        case '+':
        case '?':
          return fail("nothing to repeat");
        case '{': {
          int min = 0, max = 0;
          bool is_quantifier = false;
          if (!brace_quantifier(min, max, is_quantifier)) return false;
          if (is_quantifier) return fail("nothing to repeat");
          ++pos;
          out.atom = {Op::kChar, '{', 0};
          return true;
        }
        case '[':
          return parse_class(out);
        case '.':
          ++pos;
          out.atom = {Op::kAny, 0, 0};
          return true;
        case '^':
          ++pos;
          out.atom = {Op::kBegin, 0, 0};
          is_assertion = true;
          return true;
        case '$':
          ++pos;
          out.atom = {Op::kEnd, 0, 0};
          is_assertion = true;
          return true;
        case '\\': {
          const std::uint32_t e = peek(1);
          if (e == 'A' || e == 'Z' || e == 'b' || e == 'B') {
            pos += 2;
            out.atom = {e == 'A'   ? Op::kBegin
                        : e == 'Z' ? Op::kAbsoluteEnd
                        : e == 'b' ? Op::kWordBoundary
                                   : Op::kNotWordBoundary,
                        0, 0};
            is_assertion = true;
            return true;
          }
          std::uint32_t cp = 0;
          CharClass shorthand;
          bool is_shorthand = false;
          if (!parse_escape(false, cp, &shorthand, is_shorthand)) return false;
          if (is_shorthand) {
            out.atom = {Op::kClass, static_cast<std::uint32_t>(classes.size()), 0};
            classes.push_back(std::move(shorthand));
          } else {
            out.atom = {Op::kChar, cp, 0};
          }
          return true;
        }
        default:
          ++pos;
          out.atom = {Op::kChar, c, 0};
          return true;
      }
    }
  };

  bool push(Inst inst, std::string& error) {
    if (program_.size() >= kMaxRegexProgram) {
      error = "compiles to more than " + std::to_string(kMaxRegexProgram) +
              " instructions (bounded repeats expand)";
      return false;
    }
    program_.push_back(inst);
    return true;
  }

  // Thompson's construction; recursion follows the tree, whose depth the
  // parser bounded.
  bool emit(const Node& node, std::string& error) {
    switch (node.kind) {
      case Node::kEmpty:
        return true;
      case Node::kAtom:
        return push(node.atom, error);
      case Node::kConcat:
        for (const auto& child : node.children) {
          if (!emit(child, error)) return false;
        }
        return true;
      case Node::kAlternation: {
        std::vector<std::size_t> jumps;
        for (std::size_t i = 0; i < node.children.size(); ++i) {
          std::size_t split = 0;
          const bool last = i + 1 == node.children.size();
          if (!last) {
            split = program_.size();
            if (!push({Op::kSplit, static_cast<std::uint32_t>(split + 1), 0}, error)) return false;
          }
          if (!emit(node.children[i], error)) return false;
          if (!last) {
            jumps.push_back(program_.size());
            if (!push({Op::kJump, 0, 0}, error)) return false;
            program_[split].b = static_cast<std::uint32_t>(program_.size());
          }
        }
        for (const std::size_t j : jumps)
          program_[j].a = static_cast<std::uint32_t>(program_.size());
        return true;
      }
      case Node::kRepeat: {
        const Node& body = node.children.front();
        for (int i = 0; i < node.min; ++i) {
          if (!emit(body, error)) return false;
        }
        if (node.max < 0) {
          // L: split(L+1, out); body; jump L
          const std::size_t loop = program_.size();
          if (!push({Op::kSplit, static_cast<std::uint32_t>(loop + 1), 0}, error)) return false;
          if (!emit(body, error)) return false;
          if (!push({Op::kJump, static_cast<std::uint32_t>(loop), 0}, error)) return false;
          program_[loop].b = static_cast<std::uint32_t>(program_.size());
          return true;
        }
        std::vector<std::size_t> splits;
        for (int i = node.min; i < node.max; ++i) {
          splits.push_back(program_.size());
          if (!push({Op::kSplit, static_cast<std::uint32_t>(program_.size() + 1), 0}, error)) {
            return false;
          }
          if (!emit(body, error)) return false;
        }
        for (const std::size_t s : splits)
          program_[s].b = static_cast<std::uint32_t>(program_.size());
        return true;
      }
    }
    return false;
  }

  // A sparse set of program counters: O(1) insert, membership and clear.
  class ThreadList {
   public:
    explicit ThreadList(std::size_t capacity) : dense_(capacity), sparse_(capacity) {}
    bool contains(std::size_t pc) const { return sparse_[pc] < size_ && dense_[sparse_[pc]] == pc; }
    void insert(std::size_t pc) {
      sparse_[pc] = size_;
      dense_[size_++] = pc;
    }
    std::size_t size() const { return size_; }
    std::size_t at(std::size_t i) const { return dense_[i]; }
    void clear() { size_ = 0; }

   private:
    std::vector<std::size_t> dense_, sparse_;
    std::size_t size_ = 0;
  };

  bool step_matches(const Inst& inst, std::uint32_t c) const {
    switch (inst.op) {
      case Op::kChar:
        return c == inst.a;
      case Op::kAny:
        return c != '\n';
      case Op::kClass:
        return classes_[inst.a].matches(c);
      default:
        return false;
    }
  }

  // Follows splits, jumps and assertions from `pc` at `pos` with an explicit
  // stack, adding every instruction reached once.
  void add_thread(ThreadList& list, std::size_t pc, const std::vector<std::uint32_t>& s,
                  std::size_t pos, std::vector<std::size_t>& stack) const {
    const std::size_t n = s.size();
    stack.clear();
    stack.push_back(pc);
    while (!stack.empty()) {
      const std::size_t at = stack.back();
      stack.pop_back();
      if (list.contains(at)) continue;
      list.insert(at);
      const Inst& inst = program_[at];
      const bool word_before = pos > 0 && regex_is_word(s[pos - 1]);
      const bool word_after = pos < n && regex_is_word(s[pos]);
      switch (inst.op) {
        case Op::kSplit:
          stack.push_back(inst.b);
          stack.push_back(inst.a);
          break;
        case Op::kJump:
          stack.push_back(inst.a);
          break;
        case Op::kBegin:
          if (pos == 0) stack.push_back(at + 1);
          break;
        case Op::kEnd:
          if (pos == n || (pos + 1 == n && s[pos] == '\n')) stack.push_back(at + 1);
          break;
        case Op::kAbsoluteEnd:
          if (pos == n) stack.push_back(at + 1);
          break;
        case Op::kWordBoundary:
          if (word_before != word_after) stack.push_back(at + 1);
          break;
        case Op::kNotWordBoundary:
          // Python's \B never matches in an empty string.
          if (n > 0 && word_before == word_after) stack.push_back(at + 1);
          break;
        default:
          break;
      }
    }
  }

  std::vector<Inst> program_;
  std::vector<CharClass> classes_;
};

}  // namespace detail
}  // namespace io
}  // namespace rankwise
