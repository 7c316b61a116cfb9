// A trainable tensor as optimisers see it: its value and gradient, same shape.
#pragma once

#include <string>

#include "rankwise/core/matrix_view.hpp"

namespace rankwise {

/// One trainable tensor of a layer, in the layer's internal layout.
template <class T>
struct ParameterRef {
  std::string name;
  MatrixView<T> value;
  MatrixView<T> grad;
};

}  // namespace rankwise
