// Owning device storage (cudaMalloc), released on destruction.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <utility>

#include "rankwise/backend/cuda/check.hpp"
#include "rankwise/backend/tags.hpp"
#include "rankwise/core/matrix_view.hpp"

namespace rankwise {

/// `size` elements of T on the current device. cudaMalloc aligns to 256 bytes,
/// which is what workspaces need. Move-only.
template <class T>
class Buffer<CudaBackend, T> {
 public:
  Buffer() = default;
  explicit Buffer(std::int64_t size) { resize(size); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  ~Buffer() { release(); }

  /// Reallocates to `size` elements; contents are not preserved.
  void resize(std::int64_t size) {
    RANKWISE_CHECK(size >= 0, "Buffer<CudaBackend>: size must be non-negative, got ", size);
    if (size == size_) return;
    release();
    if (size > 0) {
      void* p = nullptr;
      RANKWISE_CUDA_CHECK(cudaMalloc(&p, checked_bytes(size, sizeof(T), "Buffer<CudaBackend>")));
      data_ = static_cast<T*>(p);
    }
    size_ = size;
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::int64_t size() const { return size_; }

  MatrixView<T> view(std::int64_t rows, std::int64_t cols) {
    RANKWISE_CHECK(rows * cols == size_, "Buffer::view: shape (", rows, " x ", cols,
                   ") does not match ", size_, " elements");
    return device_view(data_, rows, cols);
  }
  MatrixView<const T> view(std::int64_t rows, std::int64_t cols) const {
    RANKWISE_CHECK(rows * cols == size_, "Buffer::view: shape (", rows, " x ", cols,
                   ") does not match ", size_, " elements");
    return device_view(static_cast<const T*>(data_), rows, cols);
  }

 private:
  void release() noexcept {
    if (data_ != nullptr) cudaFree(data_);
    data_ = nullptr;
    size_ = 0;
  }
  T* data_ = nullptr;
  std::int64_t size_ = 0;
};

}  // namespace rankwise
