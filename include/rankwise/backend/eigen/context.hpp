// CPU execution context: how many threads the kernels may use, through
// rankwise's own pool or a caller's executor. Layers borrow one.
#pragma once

#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "rankwise/backend/eigen/executor.hpp"
#include "rankwise/backend/tags.hpp"

namespace rankwise {

template <>
class Context<CpuBackend> {
 public:
  /// One thread: every kernel runs on the calling thread.
  Context() = default;

  /// `threads` threads (the caller's included) from a pool this context owns.
  /// Throws rankwise::error unless 1 <= threads <= 1024.
  explicit Context(int threads) {
    RANKWISE_CHECK(threads >= 1 && threads <= 1024,
                   "CpuContext: threads must be in [1, 1024], got ", threads);
    if (threads > 1) {
      owned_ = std::make_unique<ThreadPool>(threads);
      executor_ = owned_.get();
    }
  }

  /// Runs the kernels' tasks on the caller's executor, which must outlive this
  /// context and must not be used by anyone else during a rankwise call.
  explicit Context(CpuExecutor& executor) : executor_(&executor) {
    RANKWISE_CHECK(executor.num_threads() >= 1,
                   "CpuContext: the executor's num_threads() must be at least 1, got ",
                   executor.num_threads());
  }

  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  Context(Context&&) = default;
  Context& operator=(Context&&) = default;

  int num_threads() const { return executor_ == nullptr ? 1 : executor_->num_threads(); }

  /// Calls f(i) for every i in [0, count), spread over the threads; returns
  /// when all are done. f must not throw.
  template <class F>
  void parallel_for(std::int64_t count, F&& f) {
    using Fn = std::remove_reference_t<F>;
    if (executor_ == nullptr || count <= 1) {
      for (std::int64_t i = 0; i < count; ++i) f(i);
      return;
    }
    executor_->run(
        count, [](void* c, std::int64_t i) { (*static_cast<Fn*>(c))(i); },
        const_cast<void*>(static_cast<const void*>(&f)));
  }

  void synchronize() {}

  /// At least `count` elements of U, 64-byte aligned, for the kernel running
  /// on the calling thread: grown to the largest request and kept, so
  /// steady-state calls allocate nothing. Valid until the next scratch call.
  template <class U>
  U* scratch(std::int64_t count) {
    const std::size_t bytes = static_cast<std::size_t>(count) * sizeof(U);
    const std::size_t lines = (bytes + sizeof(Line) - 1) / sizeof(Line);
    if (scratch_.size() < lines) scratch_.resize(lines);
    return reinterpret_cast<U*>(scratch_.data());
  }

 private:
  struct alignas(64) Line {
    unsigned char bytes[64];
  };
  std::unique_ptr<ThreadPool> owned_;
  CpuExecutor* executor_ = nullptr;
  std::vector<Line> scratch_;
};

using CpuContext = Context<CpuBackend>;

}  // namespace rankwise
