# The multi-adapter unit pool tests (test_multi, and test_multi_cuda when the
# CUDA backend is built), included from tests/CMakeLists.txt after the
# rankwise_catch targets exist. One CTest test per binary, as the others.

# --warn NoAssertions: a test case that checks nothing fails.
add_executable(test_multi ${CMAKE_CURRENT_LIST_DIR}/test_multi.cpp)
target_link_libraries(test_multi PRIVATE rankwise_catch_main rankwise::rankwise rankwise_warnings)
add_test(NAME test_multi COMMAND test_multi --warn NoAssertions)
set_tests_properties(test_multi PROPERTIES LABELS cpu TIMEOUT 300)

if(RANKWISE_HAS_CUDA)
  # No Eigen: rankwise::cuda and the Eigen-free support headers only. Exits 77
  # on a machine without a CUDA device; CTest reports a skip.
  add_executable(test_multi_cuda ${CMAKE_CURRENT_LIST_DIR}/test_multi_cuda.cu)
  target_link_libraries(test_multi_cuda PRIVATE rankwise_catch rankwise::cuda rankwise_warnings)
  add_test(NAME test_multi_cuda COMMAND test_multi_cuda --warn NoAssertions)
  set_tests_properties(test_multi_cuda PROPERTIES LABELS cuda TIMEOUT 300 SKIP_RETURN_CODE 77)
endif()

# The segment kernels of multi-adapter serving (one shrink and one expand
# launch per forward on the GPU): their tiling and index arithmetic, and a CPU
# emulation of both kernels. test_multi_cuda instantiates the kernels for
# every storage type.
add_executable(test_segment_table ${CMAKE_CURRENT_LIST_DIR}/test_segment_table.cpp)
target_link_libraries(test_segment_table PRIVATE rankwise_catch_main rankwise::rankwise
                                                 rankwise_warnings)
add_test(NAME test_segment_table COMMAND test_segment_table --warn NoAssertions)
set_tests_properties(test_segment_table PROPERTIES LABELS cpu TIMEOUT 300)
