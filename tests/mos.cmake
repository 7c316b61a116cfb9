# The MoS (Mixture of Shards) tests: test_mos, and test_mos_cuda when the CUDA
# backend is built. Included from tests/CMakeLists.txt after the rankwise_catch
# targets exist. One CTest test per binary, as the others.

# --warn NoAssertions: a test case that checks nothing fails.
add_executable(test_mos ${CMAKE_CURRENT_LIST_DIR}/test_mos.cpp)
target_link_libraries(test_mos PRIVATE rankwise_catch_main rankwise::rankwise rankwise_warnings)
add_test(NAME test_mos COMMAND test_mos --warn NoAssertions)
set_tests_properties(test_mos PROPERTIES LABELS cpu TIMEOUT 300)

if(RANKWISE_HAS_CUDA)
  # No Eigen: rankwise::cuda and the Eigen-free support headers only. Exits 77
  # on a machine without a CUDA device; CTest reports a skip.
  add_executable(test_mos_cuda ${CMAKE_CURRENT_LIST_DIR}/test_mos_cuda.cu)
  target_link_libraries(test_mos_cuda PRIVATE rankwise_catch rankwise::cuda rankwise_warnings)
  add_test(NAME test_mos_cuda COMMAND test_mos_cuda --warn NoAssertions)
  set_tests_properties(test_mos_cuda PROPERTIES LABELS cuda TIMEOUT 300 SKIP_RETURN_CODE 77)
endif()
