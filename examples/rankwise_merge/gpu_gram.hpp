// The merge tool's door to the GPU, free of CUDA types so main.cpp (Eigen)
// can include it.
#pragma once

#include <rankwise/merge/gram.hpp>

/// LoRA-LEGO's Gram computations on the first CUDA device; throws
/// rankwise::error when there is none.
rankwise::merge::GramFunction gpu_gram();
