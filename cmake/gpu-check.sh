#!/usr/bin/env bash
# One-shot GPU check in two steps.
#
#   bash cmake/gpu-check.sh build [DIR]   here (nvcc, Eigen, Catch2, Google Benchmark):
#       configures DIR (default build-gpu) for sm_80 and sm_90 (A100, H100/H200)
#       with static cudart, builds every CUDA test and benchmark, and stages
#       them with the shared libraries the GPU machine may lack into
#       DIR/stage (binaries, lib/, manifest). Carry DIR/stage to the GPU machine.
#   bash cmake/gpu-check.sh run [DIR]     on the GPU machine (driver, CUDA 13's
#       cuBLAS; no Eigen, Catch2 or Google Benchmark needed): runs every staged
#       binary under a timeout, continues past failures, and writes
#       gpu-<date>-<device>.md (device, driver, date, commit, pass/fail per
#       test, benchmark tables) and a full log into $OUT if set, else
#       bench/results/. DIR may also be a plain build tree.
#
# Run step knobs (environment): GPU_CHECK_DEADLINE (seconds for the whole
# run, default 540), GPU_CHECK_TEST_TIMEOUT (per test binary, default 240),
# GPU_CHECK_BENCH_TIMEOUT (per benchmark run, default 240). Benchmarks run in
# quick mode first (a table for sure), then in full while time is left.
# Exit status of run: 0 all passed, 1 something failed or timed out, 77 no
# CUDA device (everything reported skipped).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STEP="${1:-}"
DIR_ARG="${2:-build-gpu}"
DIR="$DIR_ARG"
case "$DIR" in /*) ;; *) DIR="$ROOT/$DIR" ;; esac

usage() {
  sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
}

# Libraries every Linux machine with a driver has; anything else a binary
# needs is copied next to it, except cuBLAS (over 500 MiB, part of the GPU
# machine's CUDA toolkit).
is_system_lib() {
  case "$1" in
    linux-vdso* | ld-linux* | libc.so* | libm.so* | libdl.so* | libpthread.so* | librt.so* | \
      libcuda.so* | libcublas.so* | libcublasLt.so*) return 0 ;;
    *) return 1 ;;
  esac
}

build() {
  command -v cmake >/dev/null || { echo "gpu-check: cmake not found" >&2; exit 1; }
  local archs="${GPU_CHECK_ARCHS:-80;90}"
  cmake -S "$ROOT" -B "$DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DRANKWISE_CUDA=ON \
    "-DCMAKE_CUDA_ARCHITECTURES=$archs" -DRANKWISE_BUILD_TESTS=ON -DRANKWISE_BUILD_BENCH=ON \
    -DRANKWISE_BUILD_EXAMPLES=OFF || exit 1
  # Every target named test_*_cuda or bench_*_cuda, so new ones are picked up.
  local targets="${GPU_CHECK_TARGETS:-}"
  if [ -z "$targets" ]; then
    targets="$(ninja -C "$DIR" -t targets all 2>/dev/null |
      sed -n 's/^\(\(test\|bench\)_[a-z0-9_]*_cuda\): .*/\1/p' | sort -u | tr '\n' ' ')"
  fi
  [ -n "$targets" ] || { echo "gpu-check: no CUDA targets (is nvcc found?)" >&2; exit 1; }
  echo "gpu-check: building $targets"
  # shellcheck disable=SC2086
  cmake --build "$DIR" --target $targets -j "${GPU_CHECK_JOBS:-2}" || exit 1

  local stage="$DIR/stage"
  rm -rf "$stage"
  mkdir -p "$stage/lib"
  local t bin lib path
  for t in $targets; do
    bin="$(find "$DIR" -path "$stage" -prune -o -type f -name "$t" -perm -u+x -print | head -n1)"
    [ -n "$bin" ] || { echo "gpu-check: built $t but cannot find it" >&2; exit 1; }
    cp "$bin" "$stage/"
    # Shared libraries the binary resolves here that the GPU machine may lack.
    while read -r lib path; do
      is_system_lib "$lib" && continue
      [ -f "$path" ] && cp -L -n "$path" "$stage/lib/$lib"
    done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}')
  done
  local commit="unknown"
  if git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
    commit="$(git -C "$ROOT" rev-parse HEAD)"
    [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] &&
      commit="$commit (with uncommitted changes)"
  fi
  {
    echo "commit: $commit"
    echo "built: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n)"
    echo "nvcc: $(nvcc --version 2>/dev/null | sed -n 's/.*release \([^,]*\),.*/\1/p' ||
      echo unknown)"
    echo "architectures: $archs (static cudart)"
    echo "binaries: $targets"
    echo "copied libraries: $(ls "$stage/lib" | tr '\n' ' ')"
  } >"$stage/manifest.txt"
  echo "gpu-check: staged $(du -sh "$stage" | cut -f1) in $stage:"
  ls -l "$stage" "$stage/lib"
  echo "gpu-check: on the GPU machine: bash cmake/gpu-check.sh run $DIR_ARG" \
    "(carry $DIR_ARG/stage)"
}

# ---------------------------------------------------------------------------

START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }

LOG=""
MD=""
FAILED=0
LAST_OUT=""

# Runs one binary under a timeout, its output into $LAST_OUT and the log;
# prints "status seconds". Status: pass, fail(exit-N), skip (77), timeout.
run_one() {
  local limit="$1"
  shift
  local t0 out="$LAST_OUT" rc
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >"$out" 2>&1 </dev/null
  rc=$?
  {
    echo "===== $* (exit $rc, $(($(date +%s) - t0)) s)"
    cat "$out"
  } >>"$LOG"
  case $rc in
    0) echo "pass $(($(date +%s) - t0))" ;;
    77) echo "skip $(($(date +%s) - t0))" ;;
    124 | 137) echo "timeout $(($(date +%s) - t0))" ;;
    *) echo "fail(exit-$rc) $(($(date +%s) - t0))" ;;
  esac
}

run() {
  local stage="$DIR"
  [ -d "$DIR/stage" ] && stage="$DIR/stage"
  [ -d "$stage" ] || { echo "gpu-check: $stage does not exist (run the build step first)" >&2; exit 2; }
  local deadline="${GPU_CHECK_DEADLINE:-540}"
  local test_limit="${GPU_CHECK_TEST_TIMEOUT:-240}"
  local bench_limit="${GPU_CHECK_BENCH_TIMEOUT:-240}"

  # Copied libraries first, then the toolkit's cuBLAS.
  local ldpath="$stage/lib"
  local d
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && ldpath="$ldpath:$d"
  done
  export LD_LIBRARY_PATH="$ldpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

  local name="no device" driver="-" memory="-" devices=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    local q
    q="$(timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total \
      --format=csv,noheader 2>/dev/null)"
    if [ -n "$q" ]; then
      devices=$(printf '%s\n' "$q" | wc -l)
      q="$(printf '%s\n' "$q" | head -n1)"
      name="$(printf '%s' "$q" | cut -d, -f1 | sed 's/^ *//;s/ *$//')"
      driver="$(printf '%s' "$q" | cut -d, -f2 | sed 's/^ *//;s/ *$//')"
      memory="$(printf '%s' "$q" | cut -d, -f3 | sed 's/^ *//;s/ *$//')"
    fi
  fi
  local slug date_
  slug="$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9]\{1,\}/-/g;s/^-//;s/-$//')"
  date_="$(date -u +%Y-%m-%d)"
  local outdir="${OUT:-$ROOT/bench/results}"
  mkdir -p "$outdir"
  MD="$outdir/gpu-$date_-$slug.md"
  LOG="$outdir/gpu-$date_-$slug.log"
  : >"$LOG"
  LAST_OUT="$(mktemp)"
  trap 'rm -f "$LAST_OUT"' EXIT

  local tests=() benches=() f
  for f in "$stage"/test_*_cuda "$stage"/tests/test_*_cuda; do [ -x "$f" ] && tests+=("$f"); done
  for f in "$stage"/bench_*_cuda "$stage"/bench/bench_*_cuda; do [ -x "$f" ] && benches+=("$f"); done
  if [ ${#tests[@]} -eq 0 ] && [ ${#benches[@]} -eq 0 ]; then
    echo "gpu-check: no test_*_cuda or bench_*_cuda binaries in $stage" >&2
    exit 2
  fi

  {
    echo "# GPU check: $name"
    echo
    echo "| | |"
    echo "| --- | --- |"
    echo "| device | $name ($devices visible, $memory) |"
    echo "| driver | $driver |"
    echo "| date | $(date -u '+%Y-%m-%d %H:%M UTC') on $(uname -n) |"
    if [ -f "$stage/manifest.txt" ]; then
      sed 's/^\([^:]*\): \(.*\)$/| \1 | \2 |/' "$stage/manifest.txt"
    else
      echo "| build | $stage (plain build tree, no manifest) |"
    fi
    echo
    echo "Produced by \`bash cmake/gpu-check.sh run\`; the full output is in \`$(basename "$LOG")\`."
    echo
  } >"$MD"
  if [ "$name" = "no device" ]; then
    echo "gpu-check: no device: nvidia-smi found no GPU; the binaries run and report skipped"
    printf '**No CUDA device was found** (nvidia-smi missing or reporting none): every test reports skipped and every benchmark skips. Nothing here ran on a GPU.\n\n' >>"$MD"
  fi

  # Missing shared libraries show up before anything runs.
  local missing
  missing="$(for f in "${tests[@]}" "${benches[@]}"; do ldd "$f" 2>/dev/null | grep 'not found'; done | sort -u)"
  if [ -n "$missing" ]; then
    printf 'Unresolved shared libraries (LD_LIBRARY_PATH=%s):\n\n```\n%s\n```\n\n' "$ldpath" "$missing" >>"$MD"
  fi

  local res status secs summary
  printf '## Tests\n\n| binary | result | seconds | summary |\n| --- | --- | --- | --- |\n' >>"$MD"
  for f in "${tests[@]}"; do
    if [ "$(elapsed)" -ge "$deadline" ]; then
      printf '| %s | not run (deadline) | - | - |\n' "$(basename "$f")" >>"$MD"
      FAILED=1
      continue
    fi
    echo "gpu-check: $(basename "$f")"
    res="$(run_one "$test_limit" "$f" --warn NoAssertions)"
    status="${res% *}"
    secs="${res##* }"
    summary="$(grep -E 'All tests passed|test cases:|assertions:|no CUDA device' "$LAST_OUT" | tail -n2 |
      tr '\n' ' ' | sed 's/|/\\|/g')"
    printf '| %s | %s | %s | %s |\n' "$(basename "$f")" "$status" "$secs" "$summary" >>"$MD"
    case "$status" in pass | skip) ;; *) FAILED=1 ;; esac
  done
  echo >>"$MD"

  # Benchmarks: quick runs of all first, then full runs while time is left.
  printf '## Benchmarks\n\nEach binary prints its own ratio tables (baselines measured in the same run).\n\n' >>"$MD"
  local mode args remaining limit label
  for mode in quick full; do
    for f in "${benches[@]}" "crossover"; do
      if [ "$f" = "crossover" ]; then
        f="$(printf '%s\n' "${benches[@]}" | grep '/bench_smora_cuda$' | head -n1)"
        [ -n "$f" ] || continue
        args=(--crossover)
        label="$(basename "$f") --crossover"
      else
        args=()
        label="$(basename "$f")"
      fi
      [ "$mode" = quick ] && args+=(--quick)
      remaining=$((deadline - $(elapsed)))
      if [ "$remaining" -lt 20 ]; then
        printf '### %s (%s)\n\nnot run: the deadline (%s s) was reached.\n\n' "$label" "$mode" "$deadline" >>"$MD"
        [ "$mode" = quick ] && FAILED=1
        continue
      fi
      limit=$bench_limit
      [ "$remaining" -lt "$limit" ] && limit=$remaining
      echo "gpu-check: $label ($mode)"
      res="$(run_one "$limit" "$f" "${args[@]}")"
      status="${res% *}"
      secs="${res##* }"
      {
        printf '### %s (%s): %s, %s s\n\n```\n' "$label" "$mode" "$status" "$secs"
        sed "s/\x1b\[[0-9;]*m//g" "$LAST_OUT"
        printf '```\n\n'
      } >>"$MD"
      case "$status" in pass | skip) ;; timeout) [ "$mode" = quick ] && FAILED=1 ;; *) FAILED=1 ;; esac
    done
  done

  echo "gpu-check: wrote $MD and $LOG ($(elapsed) s)"
  if [ "$name" = "no device" ]; then
    echo "gpu-check: no device: nothing ran on a GPU"
    exit 77
  fi
  exit "$FAILED"
}

case "$STEP" in
  build) build ;;
  run) run ;;
  *) usage ;;
esac
