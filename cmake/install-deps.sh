#!/usr/bin/env bash
# Installs, with apt-get, whichever of rankwise's build dependencies are
# missing. Fast and silent apart from one line when everything is present.
# The CUDA toolkit is not installed here: without it rankwise builds the CPU
# backend only. libopenblas-dev is optional to the build: it gives the CPU
# benchmarks their OpenBLAS baseline and rankwise::openblas (the OpenBLAS
# route for the large products) with its tests. ccache is used by cmake/test.sh
# only, to compile each CPU source once for its two trees.
set -euo pipefail

packages=(cmake ninja-build g++ libeigen3-dev catch2 libbenchmark-dev nlohmann-json3-dev
          libopenblas-dev ccache)

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "install-deps: not a Debian-like system; install these yourself if missing: ${packages[*]}" >&2
  exit 0
fi

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for pkg in "${packages[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all build dependencies are present"
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install-deps: missing ${missing[*]}, and not root and no sudo to install them" >&2
    exit 1
  fi
  sudo=(sudo)
fi

echo "install-deps: installing ${missing[*]}"
# Through env: sudo would drop an exported DEBIAN_FRONTEND.
${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -q
${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends "${missing[@]}"
