# Configures rankwise with a FindCUDAToolkit that fails (broken-cuda-toolkit/)
# and checks what RANKWISE_CUDA does about it:
#   MODE=auto  the configure succeeds, warns, and builds the CPU backend only
#   MODE=on    the configure fails, saying why
# Inputs: SOURCE_DIR, BINARY_DIR, GENERATOR, MODE.
file(REMOVE_RECURSE "${BINARY_DIR}")
if(MODE STREQUAL "auto")
  set(_cuda AUTO)
else()
  set(_cuda ON)
endif()
execute_process(
  COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}"
          "-DCMAKE_MODULE_PATH=${CMAKE_CURRENT_LIST_DIR}/broken-cuda-toolkit"
          -DRANKWISE_CUDA=${_cuda} -DRANKWISE_BUILD_TESTS=OFF -DRANKWISE_BUILD_BENCH=OFF
          -DRANKWISE_BUILD_EXAMPLES=OFF
  RESULT_VARIABLE _result OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
set(_log "${_out}${_err}")
if(MODE STREQUAL "auto")
  if(NOT _result EQUAL 0)
    message(FATAL_ERROR "RANKWISE_CUDA=AUTO did not fall back to the CPU backend:\n${_log}")
  endif()
  if(NOT _log MATCHES "only the CPU backend is built")
    message(FATAL_ERROR "no fallback message in the configure output:\n${_log}")
  endif()
  if(EXISTS "${BINARY_DIR}/rankwiseCudaTargets.cmake")
    message(FATAL_ERROR "the fallback configure still exported CUDA targets")
  endif()
else()
  if(_result EQUAL 0)
    message(FATAL_ERROR "RANKWISE_CUDA=ON configured although the toolkit cannot be:\n${_log}")
  endif()
  if(NOT _log MATCHES "RANKWISE_CUDA=ON but the CUDA toolkit cannot be configured")
    message(FATAL_ERROR "RANKWISE_CUDA=ON failed without saying why:\n${_log}")
  endif()
endif()
message(STATUS "configure_fallback ${MODE}: ok")
