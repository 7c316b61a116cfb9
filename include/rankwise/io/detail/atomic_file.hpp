// Writing a file through a temporary sibling renamed over it, so that readers never
// see it half written.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <system_error>

#include "rankwise/core/error.hpp"

namespace rankwise {
namespace io {

namespace detail {

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

}  // namespace io
}  // namespace rankwise
