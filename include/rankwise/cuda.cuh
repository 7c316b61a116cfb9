// rankwise on the GPU: the core, the CUDA backend and every layer. Include it
// from a .cu file compiled by nvcc; it brings no Eigen.
#pragma once

#if !defined(__CUDACC__)
#error \
    "<rankwise/cuda.cuh> is the CUDA backend: include it from a .cu file compiled by nvcc. CPU-only code includes <rankwise/rankwise.hpp>."
#endif

#include "rankwise/backend/cuda/buffer.hpp"
#include "rankwise/backend/cuda/check.hpp"
#include "rankwise/backend/cuda/context.hpp"
#include "rankwise/backend/cuda/kernels.cuh"
#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/backend/tags.hpp"
#include "rankwise/core/adam_rule.hpp"
#include "rankwise/core/config.hpp"
#include "rankwise/core/error.hpp"
#include "rankwise/core/lora_config.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/numeric.hpp"
#include "rankwise/core/parameter.hpp"
#include "rankwise/core/random.hpp"
#include "rankwise/core/router_config.hpp"
#include "rankwise/core/routing.hpp"
#include "rankwise/core/shard_config.hpp"
#include "rankwise/core/shard_indices.hpp"
#include "rankwise/core/tensor_map.hpp"
#include "rankwise/core/tiling.hpp"
#include "rankwise/core/unit_pages.hpp"
#include "rankwise/core/workspace.hpp"
#include "rankwise/layers/lego.hpp"
#include "rankwise/layers/lora.hpp"
#include "rankwise/layers/lora_ops.hpp"
#include "rankwise/layers/mos.hpp"
#include "rankwise/layers/rank_units.hpp"
#include "rankwise/layers/router.hpp"
#include "rankwise/layers/shard_pool.hpp"
#include "rankwise/layers/smora.hpp"
#include "rankwise/layers/unit_pool.hpp"
#include "rankwise/optim/adam.hpp"
