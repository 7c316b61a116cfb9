# Multi-adapter benchmarks (UnitPool, Google Benchmark). Included from
# bench/CMakeLists.txt, which provides rankwise::rankwise, rankwise::cuda (when
# RANKWISE_HAS_CUDA), rankwise_warnings and, usually, benchmark::benchmark and
# rankwise_bench_openblas (when OpenBLAS is found).
#
#   ./build/bench/bench_multi              64 adapters in one pool vs the per-adapter
#                                          loop, OpenBLAS, the rank-64-padded pool and the
#                                          byte floor, then ratios (a few minutes on 2 cores)
#   ./build/bench/bench_multi --quick      smoke run (also RANKWISE_BENCH_QUICK=1)
#   ./build/bench/bench_multi --threads=2  rankwise and OpenBLAS on 2 threads (default 1)
#   ./build/bench/bench_multi_cuda [...]   the same on the GPU; exits 0 with
#                                          "no CUDA device: skipping" when there is none

if(NOT TARGET benchmark::benchmark)
  find_package(benchmark REQUIRED)
endif()

add_executable(bench_multi "${CMAKE_CURRENT_LIST_DIR}/bench_multi.cpp")
target_include_directories(bench_multi PRIVATE "${CMAKE_CURRENT_LIST_DIR}")
target_link_libraries(bench_multi PRIVATE rankwise::rankwise benchmark::benchmark rankwise_warnings)
if(TARGET rankwise_bench_openblas)
  target_link_libraries(bench_multi PRIVATE rankwise_bench_openblas)
endif()

# Smoke tests: run every code path and print the tables in seconds; the
# numbers of such short runs mean nothing. They pass when the summary line is
# printed and nothing reported an error (the PASS/MISS counts do not matter).
add_test(NAME bench.multi_cpu.smoke COMMAND bench_multi --quick)
set_tests_properties(bench.multi_cpu.smoke PROPERTIES
  LABELS "bench;smoke"
  TIMEOUT 300
  PASS_REGULAR_EXPRESSION "targets[^:\n]*: [0-9]+ PASS, [0-9]+ MISS"
  FAIL_REGULAR_EXPRESSION "benchmark error:")

if(RANKWISE_HAS_CUDA)
  add_executable(bench_multi_cuda "${CMAKE_CURRENT_LIST_DIR}/bench_multi_cuda.cu")
  target_include_directories(bench_multi_cuda PRIVATE "${CMAKE_CURRENT_LIST_DIR}")
  target_link_libraries(bench_multi_cuda PRIVATE rankwise::cuda benchmark::benchmark
                                                 rankwise_warnings)

  add_test(NAME bench.multi_cuda.smoke COMMAND bench_multi_cuda --quick)
  set_tests_properties(bench.multi_cuda.smoke PROPERTIES
    LABELS "bench;smoke;cuda"
    TIMEOUT 300
    PASS_REGULAR_EXPRESSION "no CUDA device: skipping|targets[^:\n]*: [0-9]+ PASS, [0-9]+ MISS"
    FAIL_REGULAR_EXPRESSION "benchmark error:|unusable")
endif()
