# SMoRA benchmarks (Google Benchmark). Included from bench/CMakeLists.txt
# (its loop over <layer>.cmake files), which provides rankwise::rankwise, rankwise::cuda
# (when RANKWISE_HAS_CUDA), rankwise_warnings and, usually, benchmark::benchmark
# and rankwise_bench_openblas (when OpenBLAS is found).
#
#   ./build/bench/bench_smora               layer table: SMoRA vs LoRA r=64 / r=8 and OpenBLAS,
#                                           cached and uncached, at 1 and 2 threads (about 5
#                                           minutes on 2 cores), then ratios
#   ./build/bench/bench_smora --crossover   sparse vs dense rank-unit paths, and the fitted
#                                           prefer_dense rule (a few minutes)
#   ./build/bench/bench_smora --quick       smoke run (also RANKWISE_BENCH_QUICK=1)
#   ./build/bench/bench_smora_cuda [...]    the same on the GPU (float and half); exits 0
#                                           with "no CUDA device: skipping" when there is none

if(NOT TARGET benchmark::benchmark)
  find_package(benchmark REQUIRED)
endif()

add_executable(bench_smora "${CMAKE_CURRENT_LIST_DIR}/bench_smora.cpp")
target_include_directories(bench_smora PRIVATE "${CMAKE_CURRENT_LIST_DIR}")
target_link_libraries(bench_smora PRIVATE rankwise::rankwise benchmark::benchmark rankwise_warnings)
if(TARGET rankwise_bench_openblas)
  target_link_libraries(bench_smora PRIVATE rankwise_bench_openblas)
endif()

# Smoke tests: run the benchmark code paths and print the tables in seconds;
# the numbers of such short runs mean nothing.
add_test(NAME bench.smora_cpu.smoke
  COMMAND bench_smora --quick --benchmark_filter=/N:1/)
set_tests_properties(bench.smora_cpu.smoke PROPERTIES
  LABELS "bench;smoke"
  TIMEOUT 300
  PASS_REGULAR_EXPRESSION "targets: [0-9]+ PASS, [0-9]+ MISS"
  FAIL_REGULAR_EXPRESSION "benchmark error:")

add_test(NAME bench.smora_cpu.crossover_smoke COMMAND bench_smora --quick --crossover)
set_tests_properties(bench.smora_cpu.crossover_smoke PROPERTIES
  LABELS "bench;smoke"
  TIMEOUT 300
  PASS_REGULAR_EXPRESSION "crossover done"
  FAIL_REGULAR_EXPRESSION "benchmark error:")

if(RANKWISE_HAS_CUDA)
  add_executable(bench_smora_cuda "${CMAKE_CURRENT_LIST_DIR}/bench_smora_cuda.cu")
  target_include_directories(bench_smora_cuda PRIVATE "${CMAKE_CURRENT_LIST_DIR}")
  target_link_libraries(bench_smora_cuda PRIVATE rankwise::cuda benchmark::benchmark
                                                 rankwise_warnings)

  add_test(NAME bench.smora_cuda.smoke COMMAND bench_smora_cuda --quick)
  set_tests_properties(bench.smora_cuda.smoke PROPERTIES
    LABELS "bench;smoke;cuda"
    TIMEOUT 300
    PASS_REGULAR_EXPRESSION "no CUDA device: skipping|targets: [0-9]+ PASS, [0-9]+ MISS"
    FAIL_REGULAR_EXPRESSION "benchmark error:")
endif()
