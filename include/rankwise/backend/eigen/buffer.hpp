// Owning host storage, 256-byte aligned: vector loads line up and any
// buffer can serve as a workspace.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "rankwise/backend/eigen/context.hpp"
#include "rankwise/backend/tags.hpp"
#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/error.hpp"
#include "rankwise/core/numeric.hpp"
#include "rankwise/core/workspace.hpp"

namespace rankwise {

template <class T>
class Buffer<CpuBackend, T> {
 public:
  Buffer() = default;
  explicit Buffer(std::int64_t size) { resize(size); }

  /// Reallocates to `size` elements; contents are not preserved. Throws
  /// rankwise::error: kInvalidArgument for a negative size or one whose bytes
  /// overflow int64, kOutOfMemory naming the bytes when the allocation fails.
  void resize(std::int64_t size) {
    RANKWISE_CHECK(size >= 0, "Buffer: size must be non-negative, got ", size);
    if (size == size_) return;
    const std::size_t bytes =
        checked_align_up(checked_bytes(size, sizeof(T), "Buffer"), kAlignment, "Buffer");
    data_.reset();
    size_ = 0;
    if (size > 0) {
      void* p = std::aligned_alloc(kAlignment, bytes);
      RANKWISE_CHECK_CODE(p != nullptr, ErrorCode::kOutOfMemory,
                          "Buffer: out of memory allocating ", bytes, " bytes (", size,
                          " elements of ", sizeof(T), " bytes)");
      data_.reset(static_cast<T*>(p));
    }
    size_ = size;
  }

  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  std::int64_t size() const { return size_; }

  /// The buffer as a contiguous rows x cols matrix; rows * cols must equal size().
  MatrixView<T> view(std::int64_t rows, std::int64_t cols) {
    RANKWISE_CHECK(checked_elements(rows, cols, "Buffer::view") == size_, "Buffer::view: shape (",
                   rows, " x ", cols, ") does not match ", size_, " elements");
    return host_view(data(), rows, cols);
  }
  MatrixView<const T> view(std::int64_t rows, std::int64_t cols) const {
    RANKWISE_CHECK(checked_elements(rows, cols, "Buffer::view") == size_, "Buffer::view: shape (",
                   rows, " x ", cols, ") does not match ", size_, " elements");
    return host_view(data(), rows, cols);
  }

 private:
  // Any buffer can hold a workspace, which needs kWorkspaceAlignment.
  static constexpr std::size_t kAlignment = alignof(T) > kWorkspaceAlignment ? alignof(T)
                                                                             : kWorkspaceAlignment;
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  std::int64_t size_ = 0;
};

}  // namespace rankwise
