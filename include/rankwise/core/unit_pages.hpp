// The page allocator of a unit pool: rank units are handed out in pages of a
// fixed number of units, so removing an adapter frees whole pages that any
// later adapter can take, whatever its rank, without moving anyone else's
// units (no fragmentation a copy would have to undo). Host bookkeeping only.
#pragma once

#include <cstdint>
#include <vector>

#include "rankwise/core/error.hpp"

namespace rankwise {

/// A maximal stretch of an adapter's units that are consecutive in the pool:
/// local units [local, local + length) are pool units [pool, pool + length).
struct UnitRun {
  std::int64_t local = 0;
  std::int64_t pool = 0;
  std::int64_t length = 0;
};

/// Pages of `page_units` units over a pool of `capacity` units.
class UnitPages {
 public:
  UnitPages(std::int64_t capacity, std::int64_t page_units)
      : page_units_(page_units), capacity_(capacity) {
    RANKWISE_CHECK(page_units > 0, "UnitPool: page_units must be positive, got ", page_units);
    RANKWISE_CHECK(capacity > 0, "UnitPool: capacity_units must be positive, got ", capacity);
    RANKWISE_CHECK(capacity % page_units == 0, "UnitPool: capacity_units = ", capacity,
                   " is not a multiple of page_units = ", page_units);
    used_.assign(static_cast<std::size_t>(capacity / page_units), false);
    free_pages_ = static_cast<std::int64_t>(used_.size());
  }

  std::int64_t page_units() const { return page_units_; }
  std::int64_t capacity() const { return capacity_; }
  std::int64_t pages() const { return static_cast<std::int64_t>(used_.size()); }
  std::int64_t free_pages() const { return free_pages_; }
  std::int64_t free_units() const { return free_pages_ * page_units_; }
  std::int64_t pages_for(std::int64_t rank) const { return (rank + page_units_ - 1) / page_units_; }

  /// The lowest-numbered free pages for `rank` units (deterministic: the same
  /// sequence of adds and removes gives the same layout). Throws, changing
  /// nothing, when too few are free.
  std::vector<std::int64_t> allocate(std::int64_t rank, const char* fn) {
    RANKWISE_CHECK(rank > 0, fn, ": rank must be positive, got ", rank);
    const std::int64_t need = pages_for(rank);
    RANKWISE_CHECK(need <= free_pages_, fn, ": capacity exhausted: rank ", rank, " needs ", need,
                   " pages of ", page_units_, " units but ", free_pages_, " of ", pages(),
                   " are free (", free_units(), " of ", capacity_,
                   " units); remove an adapter or build a larger pool");
    std::vector<std::int64_t> taken;
    taken.reserve(static_cast<std::size_t>(need));
    for (std::size_t p = 0; p < used_.size() && static_cast<std::int64_t>(taken.size()) < need;
         ++p) {
      if (!used_[p]) taken.push_back(static_cast<std::int64_t>(p));
    }
    for (const std::int64_t p : taken) used_[static_cast<std::size_t>(p)] = true;
    free_pages_ -= need;
    return taken;
  }

  void release(const std::vector<std::int64_t>& pages) {
    for (const std::int64_t p : pages) {
      RANKWISE_CHECK(p >= 0 && p < this->pages() && used_[static_cast<std::size_t>(p)],
                     "UnitPages::release: page ", p, " is not allocated");
    }
    for (const std::int64_t p : pages) used_[static_cast<std::size_t>(p)] = false;
    free_pages_ += static_cast<std::int64_t>(pages.size());
  }

  /// The runs of an adapter of `rank` units on `pages` (in its order).
  std::vector<UnitRun> runs(const std::vector<std::int64_t>& pages, std::int64_t rank) const {
    std::vector<UnitRun> out;
    for (std::size_t i = 0; i < pages.size(); ++i) {
      const std::int64_t local = static_cast<std::int64_t>(i) * page_units_;
      const std::int64_t length = rank - local < page_units_ ? rank - local : page_units_;
      const std::int64_t pool = pages[i] * page_units_;
      if (!out.empty() && out.back().pool + out.back().length == pool) {
        out.back().length += length;
      } else {
        out.push_back({local, pool, length});
      }
    }
    return out;
  }

 private:
  std::int64_t page_units_;
  std::int64_t capacity_;
  std::vector<bool> used_;
  std::int64_t free_pages_ = 0;
};

}  // namespace rankwise
