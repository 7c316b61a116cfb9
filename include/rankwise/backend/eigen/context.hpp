// CPU execution context: nothing to hold, present so layers take one context
// argument whatever the backend.
#pragma once

#include "rankwise/backend/tags.hpp"

namespace rankwise {

template <>
class Context<CpuBackend> {
 public:
  Context() = default;
  void synchronize() {}
};

using CpuContext = Context<CpuBackend>;

}  // namespace rankwise
