# rankwise_find_cuda_toolkit([REQUIRED|QUIET]): find_package(CUDAToolkit)
# that also configures with CMake 3.25.0/3.25.1 (Debian 12's) and a CUDA
# toolkit without nvToolsExt (12.9 and later, 13). That FindCUDAToolkit sets a
# deprecation property on CUDA::nvToolsExt whenever the calling project's
# minimum version is >= 3.25, whether or not the target exists, and the
# configure fails. The variable only gates that deprecation notice there, so
# it is lowered for this one call, in this function's scope (policies are
# untouched: they come from cmake_minimum_required, not from the variable).
# Installed with the package config, which uses it for COMPONENTS cuda.
function(rankwise_find_cuda_toolkit)
  if(CMAKE_VERSION VERSION_LESS 3.26 AND
     CMAKE_MINIMUM_REQUIRED_VERSION VERSION_GREATER_EQUAL 3.25)
    set(CMAKE_MINIMUM_REQUIRED_VERSION 3.24)
  endif()
  find_package(CUDAToolkit ${ARGN})
  foreach(_var IN ITEMS FOUND VERSION VERSION_MAJOR VERSION_MINOR VERSION_PATCH BIN_DIR
                        INCLUDE_DIRS LIBRARY_DIR LIBRARY_ROOT TARGET_DIR NVCC_EXECUTABLE)
    set(CUDAToolkit_${_var} "${CUDAToolkit_${_var}}" PARENT_SCOPE)
  endforeach()
endfunction()
