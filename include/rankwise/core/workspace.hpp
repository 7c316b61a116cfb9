// Carves typed, aligned sub-buffers out of one caller-provided workspace.
#pragma once

#include <cstddef>
#include <cstdint>

#include "rankwise/core/error.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/numeric.hpp"

namespace rankwise {

/// Alignment of every carved block: enough for vector loads on CPU and GPU.
inline constexpr std::size_t kWorkspaceAlignment = 256;

/// Bytes a rows x cols block of T takes in a workspace, padding included.
template <class T>
constexpr std::size_t workspace_block_bytes(std::int64_t rows, std::int64_t cols) {
  return align_up(static_cast<std::size_t>(rows * cols) * sizeof(T), kWorkspaceAlignment);
}

/// Hands out consecutive blocks of a workspace. The first `take` that would
/// overrun throws, naming the function whose workspace was too small.
class WorkspaceCarver {
 public:
  WorkspaceCarver(void* base, std::size_t bytes, MemorySpace space, const char* owner)
      : base_(static_cast<unsigned char*>(base)), bytes_(bytes), space_(space), owner_(owner) {
    RANKWISE_CHECK(reinterpret_cast<std::uintptr_t>(base) % kWorkspaceAlignment == 0, owner,
                   ": workspace must be ", kWorkspaceAlignment, "-byte aligned");
  }

  template <class T>
  MatrixView<T> take(std::int64_t rows, std::int64_t cols) {
    const std::size_t need = workspace_block_bytes<T>(rows, cols);
    RANKWISE_CHECK(used_ + need <= bytes_, owner_, ": workspace of ", bytes_,
                   " bytes is too small, need at least ", used_ + need);
    RANKWISE_CHECK(need == 0 || base_ != nullptr, owner_, ": workspace is null");
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += need;
    return MatrixView<T>(p, rows, cols, space_);
  }

 private:
  unsigned char* base_;
  std::size_t bytes_;
  std::size_t used_ = 0;
  MemorySpace space_;
  const char* owner_;
};

}  // namespace rankwise
