// rankwise on the CPU: the core, the Eigen backend and every layer.
#pragma once

#include "rankwise/backend/eigen/buffer.hpp"
#include "rankwise/backend/eigen/context.hpp"
#include "rankwise/backend/eigen/kernels.hpp"
#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/backend/tags.hpp"
#include "rankwise/core/config.hpp"
#include "rankwise/core/error.hpp"
#include "rankwise/core/lora_config.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/numeric.hpp"
#include "rankwise/core/parameter.hpp"
#include "rankwise/core/random.hpp"
#include "rankwise/core/tiling.hpp"
#include "rankwise/core/workspace.hpp"
#include "rankwise/layers/lora.hpp"
#include "rankwise/layers/lora_ops.hpp"
