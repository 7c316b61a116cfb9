# Adapter files for every layer (issue 12): SMoRA, MoS, GGUF, rankwise-inspect and the real
# adapters of data/real-adapters (test_adapter_files). Included from tests/CMakeLists.txt.
find_package(nlohmann_json 3 REQUIRED)

add_executable(test_adapter_files ${CMAKE_CURRENT_LIST_DIR}/test_adapter_files.cpp)
target_link_libraries(test_adapter_files PRIVATE
  rankwise_catch_main rankwise::io nlohmann_json::nlohmann_json Catch2::Catch2 rankwise_warnings)
target_compile_definitions(test_adapter_files PRIVATE
  RANKWISE_TEST_DATA_DIR="${CMAKE_CURRENT_LIST_DIR}/data")
# The merge tool is run on adapters with modules_to_save (defined later, by examples/).
if(RANKWISE_BUILD_EXAMPLES)
  target_compile_definitions(test_adapter_files PRIVATE
    RANKWISE_MERGE_TOOL="$<TARGET_FILE:rankwise_merge>")
  add_dependencies(test_adapter_files rankwise_merge)
endif()
add_test(NAME test_adapter_files COMMAND test_adapter_files --warn NoAssertions)
set_tests_properties(test_adapter_files PROPERTIES LABELS cpu TIMEOUT 300)

# The tools on the real adapters: a usable one exits 0, a broken one 1 with its reason.
if(RANKWISE_BUILD_EXAMPLES)  # the target is defined later, by examples/
  add_test(NAME rankwise_inspect.ok
    COMMAND rankwise_inspect ${CMAKE_CURRENT_LIST_DIR}/data/real-adapters/SGOD-UTH__math-latex)
  set_tests_properties(rankwise_inspect.ok PROPERTIES LABELS cpu PASS_REGULAR_EXPRESSION "status: ok")
  add_test(NAME rankwise_inspect.truncated
    COMMAND rankwise_inspect --json ${CMAKE_CURRENT_LIST_DIR}/data/real-adapters/yongshuaiy__LLMs-final)
  set_tests_properties(rankwise_inspect.truncated PROPERTIES LABELS cpu WILL_FAIL TRUE)
endif()
