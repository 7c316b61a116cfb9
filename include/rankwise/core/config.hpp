// Compiler glue shared by every header: host/device annotations and version.
#pragma once

#define RANKWISE_VERSION_MAJOR 0
#define RANKWISE_VERSION_MINOR 1
#define RANKWISE_VERSION_PATCH 0

// Functions marked RANKWISE_HOST_DEVICE hold index and tiling arithmetic that
// CUDA kernels call and CPU tests exercise; under a plain C++ compiler the
// annotation disappears.
#if defined(__CUDACC__)
#define RANKWISE_HOST_DEVICE __host__ __device__
#else
#define RANKWISE_HOST_DEVICE
#endif
