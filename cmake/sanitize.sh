#!/usr/bin/env bash
# Builds the CPU tests of the readers, the size and index checks and the core under
# AddressSanitizer and UndefinedBehaviorSanitizer (CPU only, into build-asan) and runs them:
# test_core, test_api_hardening, test_io, test_io_hardening (without its [timing] cases, whose
# ratios instrumentation distorts), test_peft_merge and the rankwise-merge command-line tests;
# then test_cpu_threads (the thread pool and the threaded kernels) under ThreadSanitizer, into
# build-tsan. Any sanitizer report fails the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash cmake/install-deps.sh

flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1 -g"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE= -DRANKWISE_CUDA=OFF \
  -DRANKWISE_BUILD_BENCH=OFF -DRANKWISE_BUILD_EXAMPLES=ON \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined"
cmake --build build-asan -j2 --target test_core test_api_hardening test_io test_io_hardening \
  test_peft_merge rankwise_merge

# allocator_may_return_null: a huge request must surface as std::bad_alloc (which rankwise
# reports), not as an ASan abort.
export ASAN_OPTIONS="allocator_may_return_null=1:detect_leaks=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ctest --test-dir build-asan --output-on-failure -j2 \
  -R '^(test_core|test_api_hardening|test_io|test_peft_merge|rankwise_merge\..*)$'
./build-asan/tests/test_io_hardening --warn NoAssertions '~[timing]'

tsan="-fsanitize=thread -O1 -g"
cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE= -DRANKWISE_CUDA=OFF \
  -DRANKWISE_BUILD_BENCH=OFF -DRANKWISE_BUILD_EXAMPLES=OFF \
  -DCMAKE_CXX_FLAGS="$tsan" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=thread"
cmake --build build-tsan -j2 --target test_cpu_threads
TSAN_OPTIONS="halt_on_error=1" ./build-tsan/tests/test_cpu_threads --warn NoAssertions
