// Owning host storage, 256-byte aligned: vector loads line up and any
// buffer can serve as a workspace.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#include "rankwise/backend/eigen/context.hpp"
#include "rankwise/backend/tags.hpp"
#include "rankwise/core/error.hpp"
#include "rankwise/core/numeric.hpp"
#include "rankwise/core/workspace.hpp"

namespace rankwise {

template <class T>
class Buffer<CpuBackend, T> {
 public:
  Buffer() = default;
  explicit Buffer(std::int64_t size) { resize(size); }

  /// Reallocates to `size` elements; contents are not preserved.
  void resize(std::int64_t size) {
    RANKWISE_CHECK(size >= 0, "Buffer: size must be non-negative, got ", size);
    if (size == size_) return;
    data_.reset();
    size_ = 0;
    if (size > 0) {
      const std::size_t bytes = align_up(static_cast<std::size_t>(size) * sizeof(T), kAlignment);
      void* p = std::aligned_alloc(kAlignment, bytes);
      if (p == nullptr) throw std::bad_alloc();
      data_.reset(static_cast<T*>(p));
    }
    size_ = size;
  }

  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  std::int64_t size() const { return size_; }

  /// The buffer as a contiguous rows x cols matrix; rows * cols must equal size().
  MatrixView<T> view(std::int64_t rows, std::int64_t cols) {
    RANKWISE_CHECK(rows * cols == size_, "Buffer::view: shape (", rows, " x ", cols,
                   ") does not match ", size_, " elements");
    return host_view(data(), rows, cols);
  }
  MatrixView<const T> view(std::int64_t rows, std::int64_t cols) const {
    RANKWISE_CHECK(rows * cols == size_, "Buffer::view: shape (", rows, " x ", cols,
                   ") does not match ", size_, " elements");
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
