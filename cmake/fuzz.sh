#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz (safetensors bytes, PEFT directory, PEFT patterns)
# with clang, ASan and UBSan into build-fuzz; with "run SECONDS", also runs all three at once
# for that long, each on a copy of its seed corpus, and prints each one's summary.
#
#   bash cmake/fuzz.sh            # build only
#   bash cmake/fuzz.sh run 600    # build, then fuzz each target for 10 minutes
#
# clang and its fuzzer runtime are installed with apt when missing (as root or through sudo);
# they are needed only here, not by the library or its tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

have_fuzzer_runtime() {
  command -v clang++ >/dev/null 2>&1 &&
    echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' |
      clang++ -x c++ -fsanitize=fuzzer,address,undefined -o /dev/null - >/dev/null 2>&1
}
if ! have_fuzzer_runtime; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # Debian 12 / Ubuntu 22.04: clang 14 keeps libFuzzer and the sanitizer runtimes in libclang-rt-14-dev.
  $sudo apt-get install -y -qq clang libclang-rt-14-dev ||
    $sudo apt-get install -y -qq clang
fi
have_fuzzer_runtime || { echo "fuzz.sh: clang++ cannot link -fsanitize=fuzzer" >&2; exit 1; }
bash cmake/install-deps.sh >/dev/null

cmake -S tests/fuzz -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=
cmake --build build-fuzz -j"$(nproc)"

if [ "${1:-}" = "run" ]; then
  seconds="${2:-600}"
  export ASAN_OPTIONS="allocator_may_return_null=1:detect_leaks=1"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  out=build-fuzz/runs
  mkdir -p "$out"
  pids=()
  for target in safetensors peft pattern; do
    rm -rf "$out/corpus-$target" && mkdir -p "$out/corpus-$target" "$out/artifacts-$target"
    # Each target starts from a copy of the committed seeds; what it finds stays in build-fuzz.
    ./build-fuzz/fuzz_"$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -max_len=65536 -print_final_stats=1 -artifact_prefix="$out/artifacts-$target/" \
      "$out/corpus-$target" "tests/fuzz/corpus/$target" >"$out/$target.log" 2>&1 &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  for target in safetensors peft pattern; do
    echo "== fuzz_$target"
    grep -E "^(stat::|#[0-9]+ +DONE)|ERROR|SUMMARY|timeout|out-of-memory" "$out/$target.log" | tail -8
    echo "   artifacts: $(ls "$out/artifacts-$target" | wc -l)"
  done
  exit "$status"
fi
