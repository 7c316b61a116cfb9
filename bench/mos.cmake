# MoS (Mixture of Shards) benchmarks. Included from bench/CMakeLists.txt
# (include(mos.cmake)), which provides find_package(benchmark); the top level
# provides rankwise::rankwise,
# rankwise::cuda (when RANKWISE_HAS_CUDA) and rankwise_warnings.
#
#   ./build/bench/bench_mos            full CPU run (3-4 minutes on 2 cores), then the tables
#   ./build/bench/bench_mos --quick    smoke run, seconds (also RANKWISE_BENCH_QUICK=1)
#   ./build/bench/bench_mos_cuda       the same on the GPU (float and __half); exits 0 with
#                                      "no CUDA device: skipping" when there is none
#
# Both binaries share mos/ (sizes.hpp: shapes and result names; suite.hpp: the
# model and the benchmark bodies; tables.hpp: the tables).

if(NOT TARGET benchmark::benchmark)
  find_package(benchmark REQUIRED)
endif()

add_executable(bench_mos "${CMAKE_CURRENT_LIST_DIR}/bench_mos.cpp")
target_include_directories(bench_mos PRIVATE "${CMAKE_CURRENT_LIST_DIR}")
target_link_libraries(bench_mos PRIVATE rankwise::rankwise benchmark::benchmark rankwise_warnings)

# Smoke test: runs every benchmark body and prints the tables in seconds; the
# numbers of such a short run mean nothing. A failed body prints "benchmark
# error:" (the exit status is 0 whatever the PASS/MISS counts).
add_test(NAME bench.mos_cpu.smoke COMMAND bench_mos)
set_tests_properties(bench.mos_cpu.smoke PROPERTIES
  ENVIRONMENT "RANKWISE_BENCH_QUICK=1"
  LABELS "bench;smoke"
  TIMEOUT 300
  PASS_REGULAR_EXPRESSION "targets: [0-9]+ PASS, [0-9]+ MISS"
  FAIL_REGULAR_EXPRESSION "benchmark error:")

if(RANKWISE_HAS_CUDA)
  add_executable(bench_mos_cuda "${CMAKE_CURRENT_LIST_DIR}/bench_mos_cuda.cu")
  target_include_directories(bench_mos_cuda PRIVATE "${CMAKE_CURRENT_LIST_DIR}")
  target_link_libraries(bench_mos_cuda PRIVATE rankwise::cuda benchmark::benchmark
                                               rankwise_warnings)

  add_test(NAME bench.mos_cuda.smoke COMMAND bench_mos_cuda)
  set_tests_properties(bench.mos_cuda.smoke PROPERTIES
    ENVIRONMENT "RANKWISE_BENCH_QUICK=1"
    LABELS "bench;smoke;cuda"
    TIMEOUT 300
    PASS_REGULAR_EXPRESSION "no CUDA device: skipping|targets: [0-9]+ PASS, [0-9]+ MISS"
    FAIL_REGULAR_EXPRESSION "benchmark error:")
endif()
