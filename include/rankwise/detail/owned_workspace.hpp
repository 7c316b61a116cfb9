// The workspace a layer object owns: grows to the largest request and never
// shrinks, so steady-state calls allocate nothing.
#pragma once

#include <cstddef>
#include <cstdint>

#include "rankwise/backend/tags.hpp"
#include "rankwise/core/numeric.hpp"
#include "rankwise/core/workspace.hpp"

namespace rankwise {
namespace detail {

template <class Backend>
class OwnedWorkspace {
 public:
  /// Makes room for at least `bytes`; contents are not preserved on growth.
  void reserve(std::size_t bytes) {
    const auto words =
        ceil_div(static_cast<std::int64_t>(bytes), static_cast<std::int64_t>(sizeof(Word)));
    if (words > words_.size()) words_.resize(words);
  }
  void* data() { return words_.data(); }
  std::size_t bytes() const { return static_cast<std::size_t>(words_.size()) * sizeof(Word); }

 private:
  // Whole 256-byte words keep the workspace aligned as WorkspaceCarver requires.
  struct alignas(kWorkspaceAlignment) Word {
    unsigned char bytes[kWorkspaceAlignment];
  };
  Buffer<Backend, Word> words_;
};

/// Grows `buffer` to at least `size` elements (never shrinks).
template <class Backend, class U>
void grow(Buffer<Backend, U>& buffer, std::int64_t size) {
  if (size > buffer.size()) buffer.resize(size);
}

/// The first rows x cols elements of a buffer as a contiguous matrix.
template <class Backend, class U>
MatrixView<U> prefix(Buffer<Backend, U>& buffer, std::int64_t rows, std::int64_t cols) {
  RANKWISE_CHECK(rows * cols <= buffer.size(), "prefix: (", rows, " x ", cols,
                 ") exceeds a buffer of ", buffer.size(), " elements");
  return MatrixView<U>(buffer.data(), rows, cols, Backend::kMemorySpace);
}

}  // namespace detail
}  // namespace rankwise
