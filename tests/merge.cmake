# LoRA-LEGO and the baseline merges (test_merge).
add_executable(test_merge ${CMAKE_CURRENT_LIST_DIR}/test_merge.cpp)
target_link_libraries(test_merge PRIVATE rankwise_catch_main rankwise::rankwise rankwise_warnings)
add_test(NAME test_merge COMMAND test_merge --warn NoAssertions)
set_tests_properties(test_merge PROPERTIES LABELS cpu TIMEOUT 300)

# Merging the GPT-2 fixture (tests/data) through the PEFT reader and writer.
add_executable(test_peft_merge ${CMAKE_CURRENT_LIST_DIR}/test_peft_merge.cpp)
target_link_libraries(test_peft_merge PRIVATE rankwise_catch_main rankwise::rankwise rankwise_warnings)
target_compile_definitions(test_peft_merge PRIVATE
  RANKWISE_TEST_DATA_DIR="${CMAKE_CURRENT_LIST_DIR}/data")
add_test(NAME test_peft_merge COMMAND test_peft_merge --warn NoAssertions)
set_tests_properties(test_peft_merge PROPERTIES LABELS cpu TIMEOUT 300)

# The command-line tool end to end: merge, refuse to overwrite, refuse a bad method.
if(RANKWISE_BUILD_EXAMPLES)
  set(_merge_out ${CMAKE_CURRENT_BINARY_DIR}/merged-gpt2)
  add_test(NAME rankwise_merge.svd
    COMMAND $<TARGET_FILE:rankwise_merge> --method svd --rank 8 --report ${_merge_out}.json
            --overwrite -o ${_merge_out} ${CMAKE_CURRENT_LIST_DIR}/data/gpt2-lora-r8
            ${CMAKE_CURRENT_LIST_DIR}/data/gpt2-lora-r8)
  set_tests_properties(rankwise_merge.svd PROPERTIES
    FIXTURES_SETUP merged_gpt2 PASS_REGULAR_EXPRESSION "wrote .*: 36 modules, mean relative error")
  add_test(NAME rankwise_merge.no_overwrite
    COMMAND $<TARGET_FILE:rankwise_merge> --method lego --rank 4 -o ${_merge_out}
            ${CMAKE_CURRENT_LIST_DIR}/data/gpt2-lora-r8)
  set_tests_properties(rankwise_merge.no_overwrite PROPERTIES
    FIXTURES_REQUIRED merged_gpt2 PASS_REGULAR_EXPRESSION "refusing to overwrite")
  add_test(NAME rankwise_merge.bad_method
    COMMAND $<TARGET_FILE:rankwise_merge> --method average --rank 4 -o ${_merge_out}-x
            ${CMAKE_CURRENT_LIST_DIR}/data/gpt2-lora-r8)
  set_tests_properties(rankwise_merge.bad_method PROPERTIES
    PASS_REGULAR_EXPRESSION "unknown merge method 'average'")
endif()

if(RANKWISE_HAS_CUDA)
  # LoRA-LEGO's GPU distance computations; exits 77 without a device.
  add_executable(test_merge_cuda ${CMAKE_CURRENT_LIST_DIR}/test_merge_cuda.cu)
  target_link_libraries(test_merge_cuda PRIVATE rankwise_catch rankwise::cuda rankwise_warnings)
  add_test(NAME test_merge_cuda COMMAND test_merge_cuda --warn NoAssertions)
  set_tests_properties(test_merge_cuda PROPERTIES LABELS cuda TIMEOUT 300 SKIP_RETURN_CODE 77)
endif()
