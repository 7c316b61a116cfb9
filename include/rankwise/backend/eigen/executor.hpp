// How the CPU backend runs independent tasks on several threads: the
// interface an engine implements over its own thread pool, and rankwise's own
// pool for everyone else.
//
// Kernels split their work into tasks whose boundaries depend on the problem
// and on the thread count only, never on timing, and every task writes its own
// part of the output: which thread ran which task never changes a bit.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "rankwise/core/error.hpp"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#endif

namespace rankwise {

/// Runs a batch of independent tasks. Implement it over an engine's own pool
/// to let rankwise's CPU kernels use that pool's threads.
class CpuExecutor {
 public:
  /// One task: `context` is the caller's, `task` in [0, count).
  using TaskFn = void (*)(void* context, std::int64_t task);

  virtual ~CpuExecutor() = default;

  /// Threads that may run tasks at once, the calling thread included (≥ 1).
  /// Kernels split work into about this many tasks.
  virtual int num_threads() const = 0;

  /// Calls fn(context, i) once for every i in [0, count) and returns when all
  /// have returned. Tasks do not throw and do not call run() themselves. One
  /// call at a time per executor (rankwise never overlaps two).
  virtual void run(std::int64_t count, TaskFn fn, void* context) = 0;
};

/// A fixed set of worker threads; the calling thread takes tasks too, so
/// `threads` = 2 starts one worker. A task goes to whichever thread claims it
/// first, and run() returns once every task has finished: a worker that is
/// asleep or descheduled (another process on the core) delays nothing, the
/// caller takes its share. Workers spin briefly after a batch (a layer's next
/// kernel follows within microseconds), then sleep. run() allocates nothing.
class ThreadPool final : public CpuExecutor {
 public:
  /// Throws rankwise::error (kInvalidArgument) unless 1 <= threads <= 1024.
  explicit ThreadPool(int threads) : threads_(threads) {
    RANKWISE_CHECK(threads >= 1 && threads <= kMaxThreads,
                   "ThreadPool: threads must be in [1, ", kMaxThreads, "], got ", threads);
    workers_.reserve(static_cast<std::size_t>(threads - 1));
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  ~ThreadPool() override {
    stop_.store(true);
    {
      std::lock_guard<std::mutex> lock(mutex_);
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  int num_threads() const override { return threads_; }

  void run(std::int64_t count, TaskFn fn, void* context) override {
    if (workers_.empty() || count <= 1) {
      for (std::int64_t i = 0; i < count; ++i) fn(context, i);
      return;
    }
    // A batch's task index has 32 bits; larger counts go in several batches.
    for (std::int64_t first = 0; first < count; first += kMaxBatch) {
      const std::int64_t n = std::min<std::int64_t>(kMaxBatch, count - first);
      run_batch(n, first, fn, context);
    }
  }

 private:
  static constexpr int kMaxThreads = 1024;
  static constexpr int kSpins = 1 << 14;
  static constexpr std::int64_t kMaxBatch = std::int64_t(1) << 31;

  // Batch descriptors alternate between two slots, so a late worker reading a
  // finished batch's slot never meets a half-written current one; the fields
  // are atomics because such a worker may still read them while run() writes
  // the slot two batches later (it then fails to claim and looks again).
  struct Batch {
    std::atomic<TaskFn> fn{nullptr};
    std::atomic<void*> context{nullptr};
    std::atomic<std::int64_t> count{0};
    std::atomic<std::int64_t> first{0};
  };

  static void pause() {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
    _mm_pause();
#endif
  }

  static std::uint64_t generation_of(std::uint64_t state) { return state >> 32; }

  void run_batch(std::int64_t count, std::int64_t first, TaskFn fn, void* context) {
    const std::uint64_t gen = generation_of(state_.load(std::memory_order_relaxed)) + 1;
    Batch& b = slots_[gen & 1];
    b.fn.store(fn, std::memory_order_relaxed);
    b.context.store(context, std::memory_order_relaxed);
    b.count.store(count, std::memory_order_relaxed);
    b.first.store(first, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    state_.store(gen << 32);  // publishes the slot; seq_cst against sleepers_
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> lock(mutex_); }
      wake_.notify_all();
    }
    take_tasks(gen);
    for (int spins = 0; done_.load(std::memory_order_acquire) < count; ++spins) {
      if (spins < kSpins)
        pause();
      else
        std::this_thread::yield();
    }
  }

  // Claims and runs tasks of batch `gen` until none is left (or the batch is over).
  void take_tasks(std::uint64_t gen) {
    const Batch& b = slots_[gen & 1];
    std::uint64_t s = state_.load(std::memory_order_acquire);
    while (generation_of(s) == gen) {
      const auto i = static_cast<std::int64_t>(s & 0xffffffffu);
      if (i >= b.count.load(std::memory_order_relaxed)) return;
      const TaskFn fn = b.fn.load(std::memory_order_relaxed);
      void* const context = b.context.load(std::memory_order_relaxed);
      const std::int64_t first = b.first.load(std::memory_order_relaxed);
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel,
                                        std::memory_order_acquire))
        continue;  // s now holds the current state
      fn(context, first + i);
      done_.fetch_add(1, std::memory_order_release);
      s = state_.load(std::memory_order_acquire);
    }
  }

  void work() {
    std::uint64_t seen = 0;
    for (;;) {
      std::uint64_t gen = generation_of(state_.load(std::memory_order_acquire));
      for (int spins = 0; gen == seen && spins < kSpins && !stop_.load(); ++spins) {
        pause();
        gen = generation_of(state_.load(std::memory_order_acquire));
      }
      if (gen == seen && !stop_.load()) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_of(state_.load()) != seen || stop_.load(); });
        sleepers_.fetch_sub(1);
        gen = generation_of(state_.load(std::memory_order_acquire));
      }
      if (stop_.load()) return;
      seen = gen;
      take_tasks(gen);
    }
  }

  const int threads_;
  std::vector<std::thread> workers_;
  Batch slots_[2];
  // generation << 32 | index of the next unclaimed task of that batch.
  std::atomic<std::uint64_t> state_{0};
  std::atomic<std::int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace rankwise
