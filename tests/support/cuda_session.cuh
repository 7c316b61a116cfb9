// The main of every CUDA test binary: without a usable device it exits 77,
// which CTest reports as a skip. Listing runs nothing, so it works without one.
#pragma once

#include <cstdio>
#include <cstring>

#include "rankwise/backend/cuda/context.hpp"
#include "support/catch_session.hpp"

namespace rwtest {

inline int run_catch_on_device(int argc, char** argv) {
  bool listing = false;
  for (int i = 1; i < argc; ++i) listing = listing || std::strncmp(argv[i], "--list", 6) == 0;
  if (!listing && rankwise::cuda_device_count() == 0) {
    std::printf("no CUDA device: skipping\n");
    return 77;
  }
  return run_catch(argc, argv);
}

}  // namespace rwtest
