// The CPU backend's untyped memory moves (backend/memory_decl.hpp): host
// memory on both sides.
#pragma once

#include <cstddef>
#include <cstring>

#include "rankwise/backend/eigen/context.hpp"
#include "rankwise/backend/memory_decl.hpp"

namespace rankwise {

template <>
struct Memory<CpuBackend> {
  using Ctx = Context<CpuBackend>;

  static void copy(Ctx&, void* dst, const void* src, std::size_t bytes) {
    if (bytes > 0) std::memmove(dst, src, bytes);
  }
  static void fill(Ctx&, void* dst, unsigned char byte, std::size_t bytes) {
    if (bytes > 0) std::memset(dst, byte, bytes);
  }
  static void upload(Ctx&, void* dst, const void* host, std::size_t bytes) {
    if (bytes > 0) std::memcpy(dst, host, bytes);
  }
  static void download(Ctx&, void* host, const void* src, std::size_t bytes) {
    if (bytes > 0) std::memcpy(host, src, bytes);
  }
};

}  // namespace rankwise
