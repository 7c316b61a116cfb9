# LoRA-LEGO and the baseline merges (test_merge).
add_executable(test_merge ${CMAKE_CURRENT_LIST_DIR}/test_merge.cpp)
target_link_libraries(test_merge PRIVATE rankwise_catch_main rankwise::rankwise rankwise_warnings Threads::Threads)
add_test(NAME test_merge COMMAND test_merge --warn NoAssertions)
set_tests_properties(test_merge PROPERTIES LABELS cpu TIMEOUT 300)
