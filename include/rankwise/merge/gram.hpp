// The hook through which LoRA-LEGO's distance computations can run elsewhere
// (the GPU): a function computing the Gram matrix of the units.
#pragma once

#include <cstdint>
#include <functional>

namespace rankwise {
namespace merge {

/// gram (n x n) = U Uᵀ for units U (n x d); both host arrays, row-major, double.
using GramFunction =
    std::function<void(const double* units, std::int64_t n, std::int64_t d, double* gram)>;

}  // namespace merge
}  // namespace rankwise
