# LoRA-LEGO and the baseline merges (test_merge).
add_executable(test_merge ${CMAKE_CURRENT_LIST_DIR}/test_merge.cpp)
target_link_libraries(test_merge PRIVATE rankwise_catch_main rankwise::merge rankwise_warnings)
add_test(NAME test_merge COMMAND test_merge --warn NoAssertions)
set_tests_properties(test_merge PROPERTIES LABELS cpu TIMEOUT 300)

# Merging the GPT-2 fixture (tests/data) through the PEFT reader and writer.
add_executable(test_peft_merge ${CMAKE_CURRENT_LIST_DIR}/test_peft_merge.cpp)
target_link_libraries(test_peft_merge PRIVATE rankwise_catch_main rankwise::merge rankwise_warnings)
target_compile_definitions(test_peft_merge PRIVATE
  RANKWISE_TEST_DATA_DIR="${CMAKE_CURRENT_LIST_DIR}/data")
add_test(NAME test_peft_merge COMMAND test_peft_merge --warn NoAssertions)
set_tests_properties(test_peft_merge PROPERTIES LABELS cpu TIMEOUT 300)

# The command-line tool end to end: merge, refuse to overwrite, refuse a bad method.
if(RANKWISE_BUILD_EXAMPLES)
  set(_merge_out ${CMAKE_CURRENT_BINARY_DIR}/merged-gpt2)
  add_test(NAME rankwise_merge.svd
    COMMAND $<TARGET_FILE:rankwise_merge> --method svd --rank 8 --report ${_merge_out}.json
            --overwrite --allow-duplicates -o ${_merge_out} ${CMAKE_CURRENT_LIST_DIR}/data/gpt2-lora-r8
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

  # Hardening (issue 13, item 14; issue 14, item 7): each refusal exits with a
  # message and the status the help text documents, and leaves nothing behind.
  set(_data ${CMAKE_CURRENT_LIST_DIR}/data)
  set(_gpt2 ${_data}/gpt2-lora-r8)
  set(_cli_out ${CMAKE_CURRENT_BINARY_DIR}/cli-hardening-out)
  set(_cli_report ${CMAKE_CURRENT_BINARY_DIR}/cli-hardening-report.json)
  function(rankwise_merge_cli_test name rc regex)
    add_test(NAME rankwise_merge.${name}
      COMMAND ${CMAKE_COMMAND} -DEXPECT_RC=${rc} "-DEXPECT_OUTPUT=${regex}"
              "-DABSENT=${_cli_out}-${name}$<SEMICOLON>${_cli_report}"
              -P ${CMAKE_CURRENT_FUNCTION_LIST_DIR}/merge_cli_check.cmake --
              $<TARGET_FILE:rankwise_merge> -o ${_cli_out}-${name} ${ARGN})
    set_tests_properties(rankwise_merge.${name} PROPERTIES LABELS cpu TIMEOUT 300)
  endfunction()
  rankwise_merge_cli_test(rank_overflow 2 "--rank must be between 1 and 1000000, got '99999999999999999999'"
    --method svd --rank 99999999999999999999 ${_gpt2})
  rankwise_merge_cli_test(rank_zero 2 "--rank must be between 1 and 1000000, got '0'"
    --method lego --rank 0 ${_gpt2})
  rankwise_merge_cli_test(rank_not_integer 2 "--rank expects an integer, got '8x'"
    --method svd --rank 8x ${_gpt2})
  rankwise_merge_cli_test(threads_overflow 2 "--threads must be between 1 and 1024, got '4294967296'"
    --method svd --rank 8 --threads 4294967296 ${_gpt2})
  rankwise_merge_cli_test(density_text 2 "--density expects a number, got 'abc'"
    --method ties --rank 8 --density abc ${_gpt2})
  rankwise_merge_cli_test(density_range 2 "--density must be in \\(0, 1\\], got '1.5'"
    --method ties --rank 8 --density 1.5 ${_gpt2})
  rankwise_merge_cli_test(seed_negative 2 "--seed expects a non-negative integer, got '-1'"
    --method lego --rank 4 --seed -1 ${_gpt2})
  rankwise_merge_cli_test(weights_count 2 "--weights has 3 values for 1 adapters"
    --method svd --rank 8 --weights 1,2,3 ${_gpt2})
  rankwise_merge_cli_test(duplicate_inputs 2 "are the same directory.*--allow-duplicates"
    --method svd --rank 8 ${_gpt2} ${_gpt2})
  rankwise_merge_cli_test(duplicate_spelled_differently 2 "adapters 0 .* and 1 .* are the same directory"
    --method svd --rank 8 ${_gpt2} ${_data}/./gpt2-lora-r8/)
  rankwise_merge_cli_test(huge_rank 1 "rank k = 1000000 exceeds"
    --method ties --rank 1000000 ${_gpt2})
  rankwise_merge_cli_test(report_unwritable 1 "cannot write report"
    --method svd --rank 8 --report ${CMAKE_CURRENT_BINARY_DIR}/no-such-dir/report.json ${_gpt2})
  rankwise_merge_cli_test(nan_adapter 1
    "adapter 0 \\(\"[^\"]*gemma-2b-lora-nan\"\\): tensor \"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight\" holds 32768 non-finite values"
    --method svd --rank 8 ${_data}/gemma-2b-lora-nan)
  # The success path: report and adapter both appear (--overwrite: reruns find them there).
  # Its report has a path of its own: the refusals above check that ${_cli_report} stays
  # absent, and ctest -j2 runs them next to this one.
  add_test(NAME rankwise_merge.report_and_adapter
    COMMAND $<TARGET_FILE:rankwise_merge> --method svd --rank 4 --allow-duplicates --overwrite
            --report ${_cli_out}-ok-report.json -o ${_cli_out}-ok ${_gpt2} ${_gpt2})
  set_tests_properties(rankwise_merge.report_and_adapter PROPERTIES
    LABELS cpu TIMEOUT 300 PASS_REGULAR_EXPRESSION "wrote .*: 36 modules")
endif()

if(RANKWISE_HAS_CUDA)
  # LoRA-LEGO's GPU distance computations; exits 77 without a device.
  add_executable(test_merge_cuda ${CMAKE_CURRENT_LIST_DIR}/test_merge_cuda.cu)
  target_link_libraries(test_merge_cuda PRIVATE rankwise_catch rankwise::cuda rankwise_warnings)
  add_test(NAME test_merge_cuda COMMAND test_merge_cuda --warn NoAssertions)
  set_tests_properties(test_merge_cuda PROPERTIES LABELS cuda TIMEOUT 300 SKIP_RETURN_CODE 77)
endif()
