// The multi-adapter unit pool on the CUDA backend (float, __half,
// __nv_bfloat16): the same cases as the CPU (cases/multi_cases.hpp); and, since
// the pool's file already builds every layer kind for CUDA, the layer concept's
// cases (cases/layer_contract_cases.hpp, float). Exits 77 (CTest: skipped) when
// no CUDA device is usable.
#include <catch2/catch.hpp>

#include "cases/layer_contract_cases.hpp"
#include "cases/multi_cases.hpp"
#include "support/cuda_session.cuh"
#include "support/harness_cuda.cuh"

RWTEST_MULTI_TEST_CASES(rwtest::CudaHarness, "[cuda]", float, __half, __nv_bfloat16)
RWTEST_LAYER_CONTRACT_TEST_CASES(rwtest::CudaHarness, "[cuda]", float)

int main(int argc, char** argv) { return rwtest::run_catch_on_device(argc, argv); }
