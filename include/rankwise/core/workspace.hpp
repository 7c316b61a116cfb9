// Carves typed, aligned sub-buffers out of one caller-provided workspace.
#pragma once

#include <cstddef>
#include <cstdint>

#include "rankwise/core/checked_size.hpp"
#include "rankwise/core/error.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/numeric.hpp"

namespace rankwise {

/// Alignment of every carved block: enough for vector loads on CPU and GPU.
inline constexpr std::size_t kWorkspaceAlignment = 256;

/// Bytes a rows x cols block of T takes in a workspace, padding included.
/// Throws rankwise::error naming `what` and the shape when the size is
/// negative or does not fit in int64.
template <class T>
std::size_t workspace_block_bytes(std::int64_t rows, std::int64_t cols,
                                  const char* what = "workspace block") {
  const std::size_t bytes = checked_bytes(checked_elements(rows, cols, what), sizeof(T), what);
  return checked_align_up(bytes, kWorkspaceAlignment, what);
}

/// `count` workspace blocks of `block` bytes each, checked: for the
/// *_workspace_bytes functions that carve several blocks of one shape.
inline std::size_t workspace_blocks_bytes(std::int64_t count, std::size_t block, const char* what) {
  RANKWISE_CHECK(block <= static_cast<std::size_t>(kMaxSize), what, ": block of ", block,
                 " bytes overflows int64");
  return checked_bytes(count, block, what);
}

/// Hands out consecutive blocks of a workspace. The first `take` that would
/// overrun throws, naming the function whose workspace was too small.
///
/// A counting carver (WorkspaceCarver::counting) hands out views without
/// memory and only adds up their sizes: an op writes its workspace layout once,
/// as a plan function over a carver, and its *_workspace_bytes runs the same
/// plan through a counting carver (flashinfer's and CUB's two-phase pattern),
/// so the size can never drift from what the op carves.
class WorkspaceCarver {
 public:
  WorkspaceCarver(void* base, std::size_t bytes, MemorySpace space, const char* owner)
      : base_(static_cast<unsigned char*>(base)), bytes_(bytes), space_(space), owner_(owner) {
    RANKWISE_CHECK(reinterpret_cast<std::uintptr_t>(base) % kWorkspaceAlignment == 0, owner,
                   ": workspace must be ", kWorkspaceAlignment, "-byte aligned");
  }

  /// A carver that sizes a plan instead of carving: its views have no data.
  static WorkspaceCarver counting(MemorySpace space, const char* owner) {
    WorkspaceCarver carver(nullptr, static_cast<std::size_t>(kMaxSize), space, owner);
    carver.counting_ = true;
    return carver;
  }

  /// Bytes taken so far, padding included: a counting carver's result.
  std::size_t used() const { return used_; }

  /// The next rows x cols block of T. A counting carver names a size
  /// overflow after `what` (the block, as *_workspace_bytes reports it), a
  /// carving one after its owner (the op).
  template <class T>
  MatrixView<T> take(std::int64_t rows, std::int64_t cols, const char* what = nullptr) {
    const char* name = counting_ && what != nullptr ? what : owner_;
    const std::size_t need = workspace_block_bytes<T>(rows, cols, name);
    if (counting_) {
      used_ = checked_add_bytes(used_, need, name);
      return MatrixView<T>(nullptr, rows, cols, space_);
    }
    // need <= bytes_ - used_, not used_ + need <= bytes_: the sum may wrap.
    RANKWISE_CHECK(need <= bytes_ - used_, owner_, ": workspace of ", bytes_,
                   " bytes is too small, need at least ", checked_add_bytes(used_, need, owner_));
    RANKWISE_CHECK(need == 0 || base_ != nullptr, owner_, ": workspace is null");
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += need;
    return MatrixView<T>(p, rows, cols, space_);
  }

  /// Throws rankwise::error when `v` (a caller's view, usually an output)
  /// shares memory with the blocks taken so far: call after the last take,
  /// before any work. Memory past those blocks may hold anything.
  template <class U>
  void check_disjoint(const MatrixView<U>& v, const char* name) const {
    if (counting_) return;
    const ByteRange used{reinterpret_cast<std::uintptr_t>(base_),
                         reinterpret_cast<std::uintptr_t>(base_) + used_};
    RANKWISE_CHECK(v.space != space_ || !overlaps(byte_range(v), used), owner_, ": ", name, " ",
                   shape_of(v), " overlaps the ", used_,
                   " workspace bytes in use; the workspace must not share memory with the ",
                   "operands");
  }

 private:
  unsigned char* base_;
  std::size_t bytes_;
  std::size_t used_ = 0;
  MemorySpace space_;
  const char* owner_;
  bool counting_ = false;
};

/// The bytes a workspace plan takes: `plan(carver)` run through a counting
/// carver. Every *_workspace_bytes is this over the plan its op carves.
template <class Plan>
std::size_t planned_workspace_bytes(const char* owner, Plan&& plan) {
  WorkspaceCarver carver = WorkspaceCarver::counting(MemorySpace::kHost, owner);
  plan(carver);
  return carver.used();
}

}  // namespace rankwise
