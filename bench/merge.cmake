# Merge benchmark: 7 adapters x 224 modules of 4096 x 4096 with every method.
add_executable(bench_merge ${CMAKE_CURRENT_LIST_DIR}/bench_merge.cpp)
target_include_directories(bench_merge PRIVATE "${CMAKE_CURRENT_LIST_DIR}")
target_link_libraries(bench_merge PRIVATE rankwise::merge benchmark::benchmark rankwise_warnings)
add_test(NAME bench.merge.smoke COMMAND bench_merge --quick)
set_tests_properties(bench.merge.smoke PROPERTIES
  LABELS "bench;smoke"
  TIMEOUT 300
  PASS_REGULAR_EXPRESSION "targets: [0-9]+ PASS, [0-9]+ MISS")
