# Tests of the multitask example (examples/multitask), included by
# tests/CMakeLists.txt. The binary is built by examples/, so these exist only
# with RANKWISE_BUILD_EXAMPLES (the target is defined after tests/;
# $<TARGET_FILE:multitask> is resolved at generation).
#
#   examples.multitask.quick        `multitask --quick --backend cpu`: every row of the
#                                   table and the CSV, every method's loss decreasing,
#                                   a complete SVG (tests/multitask/check_multitask.cmake)
#   examples.multitask.rejects_*    the checker fails on broken CSVs (a missing row, a
#                                   loss that does not decrease, a NaN): it can fail
#   examples.multitask.cuda         CUDA builds: the same on the GPU, and the GPU's mean
#                                   test MSE within 5 % of the CPU's per row (skipped
#                                   without a device)
set(_multitask_example "${CMAKE_CURRENT_LIST_DIR}/../examples/multitask/CMakeLists.txt")
if(RANKWISE_BUILD_EXAMPLES AND EXISTS "${_multitask_example}")
  set(_multitask_check "${CMAKE_CURRENT_LIST_DIR}/multitask/check_multitask.cmake")
  set(_multitask_work "${CMAKE_CURRENT_BINARY_DIR}/multitask")

  add_test(NAME examples.multitask.quick
    COMMAND "${CMAKE_COMMAND}" "-DMULTITASK=$<TARGET_FILE:multitask>"
            "-DWORK_DIR=${_multitask_work}/cpu" -DBACKEND=cpu -P "${_multitask_check}")
  set_tests_properties(examples.multitask.quick PROPERTIES
    LABELS "examples;cpu" TIMEOUT 300)

  foreach(_case missing_row no_decrease nan)
    add_test(NAME examples.multitask.rejects_${_case}
      COMMAND "${CMAKE_COMMAND}" "-DCSV=${CMAKE_CURRENT_LIST_DIR}/multitask/bad_${_case}.csv"
              -P "${_multitask_check}")
  endforeach()
  # Passes only when the checker reports the expected failure.
  set_tests_properties(examples.multitask.rejects_missing_row PROPERTIES
    LABELS "examples;cpu" PASS_REGULAR_EXPRESSION "FAILED: .* is missing the row 'SMoRA r=64 k=8'")
  set_tests_properties(examples.multitask.rejects_no_decrease PROPERTIES
    LABELS "examples;cpu"
    PASS_REGULAR_EXPRESSION "FAILED: the training loss of 'MoS v=8 r=12' did not decrease")
  set_tests_properties(examples.multitask.rejects_nan PROPERTIES
    LABELS "examples;cpu"
    PASS_REGULAR_EXPRESSION "FAILED: 'MoE-LoRA 8x8 top-2' has mean test MSE 'nan'")

  if(RANKWISE_HAS_CUDA)
    # The GPU run checked as the CPU's, then both compared: the GPU's float
    # sums differ in order, so the numbers agree within 5 %, not bit for bit.
    add_test(NAME examples.multitask.cuda
      COMMAND "${CMAKE_COMMAND}" "-DMULTITASK=$<TARGET_FILE:multitask>"
              "-DWORK_DIR=${_multitask_work}/both" -DBACKEND=both -DTOLERANCE=0.05
              -P "${_multitask_check}")
    set_tests_properties(examples.multitask.cuda PROPERTIES
      LABELS "examples;cuda" TIMEOUT 300 SKIP_REGULAR_EXPRESSION "SKIP: no CUDA device")
  endif()
endif()
