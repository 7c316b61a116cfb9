# Stands in for a FindCUDAToolkit that cannot configure the installed toolkit,
# failing the way Debian 12's CMake 3.25.1 module does with CUDA 13: a
# non-fatal error on a missing target, so the configure fails at its end.
set_property(TARGET CUDA::nvToolsExt PROPERTY DEPRECATION "stand-in")
set(CUDAToolkit_FOUND FALSE)
