#!/usr/bin/env bash
# Builds and runs the LoRA demo (examples/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash cmake/install-deps.sh && cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2 --target multitask && ./build/examples/multitask
