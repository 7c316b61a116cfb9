# The rank-expert router and SMoRA tests (test_smora, and test_smora_cuda when
# the CUDA backend is built), included from tests/CMakeLists.txt after the
# rankwise_catch targets exist. One CTest test per binary, as the others.

# --warn NoAssertions: a test case that checks nothing fails.
add_executable(test_smora ${CMAKE_CURRENT_LIST_DIR}/test_smora.cpp)
target_link_libraries(test_smora PRIVATE rankwise_catch_main rankwise::rankwise rankwise_warnings)
add_test(NAME test_smora COMMAND test_smora --warn NoAssertions)
set_tests_properties(test_smora PROPERTIES LABELS cpu TIMEOUT 300)

if(RANKWISE_HAS_CUDA)
  # No Eigen: rankwise::cuda and the Eigen-free support headers only. Exits 77
  # on a machine without a CUDA device; CTest reports a skip.
  add_executable(test_smora_cuda ${CMAKE_CURRENT_LIST_DIR}/test_smora_cuda.cu)
  target_link_libraries(test_smora_cuda PRIVATE rankwise_catch rankwise::cuda rankwise_warnings)
  add_test(NAME test_smora_cuda COMMAND test_smora_cuda --warn NoAssertions)
  set_tests_properties(test_smora_cuda PROPERTIES LABELS cuda TIMEOUT 300 SKIP_RETURN_CODE 77)
endif()
