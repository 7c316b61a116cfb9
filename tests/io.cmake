# File I/O tests: safetensors and PEFT adapter directories (test_io). Included
# from tests/CMakeLists.txt; paths are relative to this file so it works from
# any including directory.
find_package(nlohmann_json 3 REQUIRED)

add_executable(test_io ${CMAKE_CURRENT_LIST_DIR}/test_io.cpp)
target_link_libraries(test_io PRIVATE
  rankwise_catch_main rankwise::io nlohmann_json::nlohmann_json Catch2::Catch2 rankwise_warnings)
# The fixture is read in place; the tests copy it before writing anything.
target_compile_definitions(test_io PRIVATE
  RANKWISE_TEST_DATA_DIR="${CMAKE_CURRENT_LIST_DIR}/data")
add_test(NAME test_io COMMAND test_io --warn NoAssertions)
set_tests_properties(test_io PROPERTIES LABELS cpu TIMEOUT 300)

# Hostile inputs to the readers and matcher (issue 13) and the NaN adapter (issue 14).
# Also the NaN adapter's refusal by the merge (merge/peft_merge.hpp): rankwise::merge.
add_executable(test_io_hardening ${CMAKE_CURRENT_LIST_DIR}/test_io_hardening.cpp)
target_link_libraries(test_io_hardening PRIVATE
  rankwise_catch_main rankwise::merge nlohmann_json::nlohmann_json Catch2::Catch2 rankwise_warnings)
target_compile_definitions(test_io_hardening PRIVATE
  RANKWISE_TEST_DATA_DIR="${CMAKE_CURRENT_LIST_DIR}/data")
add_test(NAME test_io_hardening COMMAND test_io_hardening --warn NoAssertions)
# RUN_SERIAL: its [timing] cases compare the run times of two input sizes, so
# they run alone even under `ctest -j`.
set_tests_properties(test_io_hardening PROPERTIES LABELS cpu TIMEOUT 600 RUN_SERIAL ON)

# Unit pools filled from PEFT adapter directories (io/pool_loader.hpp, issue 10).
add_executable(test_pool_io ${CMAKE_CURRENT_LIST_DIR}/test_pool_io.cpp)
target_link_libraries(test_pool_io PRIVATE
  rankwise_catch_main rankwise::io nlohmann_json::nlohmann_json Catch2::Catch2 rankwise_warnings)
target_compile_definitions(test_pool_io PRIVATE
  RANKWISE_TEST_DATA_DIR="${CMAKE_CURRENT_LIST_DIR}/data")
add_test(NAME test_pool_io COMMAND test_pool_io --warn NoAssertions)
set_tests_properties(test_pool_io PROPERTIES LABELS cpu TIMEOUT 300)
