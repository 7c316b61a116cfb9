// The one exception type of rankwise and the check macro that throws it.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace rankwise {

/// What kind of failure an `error` reports.
enum class ErrorCode {
  kInvalidArgument,  ///< a shape, pointer or value given by the caller is wrong
  kMemorySpace,      ///< a host pointer where a device one was expected, or the reverse
  kCuda,             ///< a CUDA runtime call failed
  kCublas,           ///< a cuBLAS call failed
  kIo,               ///< a file could not be read or written, or is malformed
  kOutOfMemory,      ///< an allocation of a size that is valid failed; the message names the bytes
};

/// Thrown for every failure rankwise reports. `what()` names the argument and
/// the expected and actual shapes or values.
class error : public std::runtime_error {
 public:
  error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

namespace detail {

// Streams every argument into one string, so checks can build messages from
// shapes and numbers without a formatting dependency.
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

[[noreturn]] inline void throw_error(ErrorCode code, const char* file, int line,
                                     const std::string& message) {
  throw error(code, concat("rankwise: ", message, " [", file, ":", line, "]"));
}

}  // namespace detail
}  // namespace rankwise

/// Throws rankwise::error(kInvalidArgument) with the streamed message when
/// `cond` is false. The message should name the argument and the shapes.
#define RANKWISE_CHECK(cond, ...)                                                                  \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      ::rankwise::detail::throw_error(::rankwise::ErrorCode::kInvalidArgument, __FILE__, __LINE__, \
                                      ::rankwise::detail::concat(__VA_ARGS__));                    \
    }                                                                                              \
  } while (false)

/// As RANKWISE_CHECK with an explicit error code.
#define RANKWISE_CHECK_CODE(cond, code, ...)                                    \
  do {                                                                          \
    if (!(cond)) {                                                              \
      ::rankwise::detail::throw_error((code), __FILE__, __LINE__,               \
                                      ::rankwise::detail::concat(__VA_ARGS__)); \
    }                                                                           \
  } while (false)
