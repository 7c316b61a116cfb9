#!/usr/bin/env bash
# Installs what is missing, then builds and tests three trees: the main one
# (CUDA targets too when a toolkit is usable), a CPU-only one
# (-DRANKWISE_CUDA=OFF, so that configuration cannot rot) and an ASan + UBSan
# one of the CPU tests (cmake/sanitize.sh). Stops at the first failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash cmake/install-deps.sh
# The CPU-only tree compiles every CPU source with the same command as the main tree:
# ccache (a cache private to this checkout) serves those compiles from the first tree,
# which keeps the whole run well inside CI's time limit. CMake reads the variable for
# the nested consumer projects of the package tests too. ctest -j2: the package tests
# (which build consumer projects) overlap the rest; tests that time themselves are
# RUN_SERIAL.
if command -v ccache >/dev/null 2>&1; then
  export CMAKE_CXX_COMPILER_LAUNCHER=ccache
  export CCACHE_DIR="$PWD/build-ccache" CCACHE_BASEDIR="$PWD" CCACHE_MAXSIZE=4G
fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j2
ctest --test-dir build --output-on-failure -j2
cmake -S . -B build-cpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DRANKWISE_CUDA=OFF
cmake --build build-cpu -j2
ctest --test-dir build-cpu --output-on-failure -j2
bash cmake/sanitize.sh
