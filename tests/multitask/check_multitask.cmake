# Checks the multitask example (examples/multitask). Three modes:
#
#   cmake -DMULTITASK=<binary> -DWORK_DIR=<dir> [-DBACKEND=cpu|cuda|both] [-DTOLERANCE=t]
#         -P check_multitask.cmake
#       runs `multitask --quick --backend BACKEND` in WORK_DIR, then checks the
#       printed table, the CSV and the SVG; `both` runs the GPU and the CPU and
#       also compares them as below. A run that reports no CUDA device (exit
#       77) prints "SKIP: no CUDA device" and stops (the test's
#       SKIP_REGULAR_EXPRESSION turns that into a skip).
#   cmake -DCSV=<file> -P check_multitask.cmake
#       checks an existing CSV only (the checker's own tests feed it broken ones).
#   cmake -DCSV=<file> -DCSV_OTHER=<file> [-DTOLERANCE=<relative>] -P check_multitask.cmake
#       checks both, then that every row's mean test MSE agrees within
#       TOLERANCE (default 0.05): the CPU and GPU runs of the same study.
#
# The CSV checks: a row for every method and reference, every number finite,
# and for every method the training loss falls (last logged interval below
# the first) and the mean test MSE ends below the frozen base's (the test
# MSE before training: every adapter starts as zero).
cmake_minimum_required(VERSION 3.25)

set(expected_methods
  "LoRA r=8" "LoRA r=64" "MoE-LoRA 8x8 top-1" "MoE-LoRA 8x8 top-2" "SMoRA r=64 k=8"
  "MoS v=8 r=12")
set(expected_references "frozen base" "task-blind Bayes floor")

# Prints the reason on one unwrapped line (tests match it), then stops.
function(fail)
  string(CONCAT text ${ARGN})
  message("multitask check FAILED: ${text}")
  message(FATAL_ERROR "multitask check failed")
endfunction()

set(number_regex "^-?[0-9]+(\\.[0-9]*)?([eE][-+]?[0-9]+)?$")

# Checks one CSV; sets <prefix>_names (the rows' names, in order) and
# <prefix>_mean_<name> (each row's mean test MSE) in the caller's scope.
function(check_csv csv prefix)
  if(NOT EXISTS "${csv}")
    fail("${csv} was not written")
  endif()
  file(STRINGS "${csv}" lines)
  list(LENGTH lines line_count)
  if(line_count LESS 2)
    fail("${csv} has no rows")
  endif()
  list(GET lines 0 header)
  string(REPLACE "," ";" columns "${header}")
  list(LENGTH columns column_count)
  foreach(name kind method mean_test_mse train_loss_first train_loss_last)
    list(FIND columns "${name}" index_${name})
    if(index_${name} LESS 0)
      fail("${csv} has no column '${name}' (header: ${header})")
    endif()
  endforeach()

  set(names "")
  set(base_mean "")
  math(EXPR last_line "${line_count} - 1")
  foreach(i RANGE 1 ${last_line})
    list(GET lines ${i} line)
    string(REPLACE "," ";" fields "${line}")
    # An empty last field vanishes from the list; pad so counts compare.
    string(REGEX MATCHALL "," commas "${line}")
    list(LENGTH commas comma_count)
    math(EXPR field_count "${comma_count} + 1")
    if(NOT field_count EQUAL column_count)
      fail("row ${i} of ${csv} has ${field_count} fields, "
                          "the header ${column_count}: ${line}")
    endif()
    list(GET fields ${index_kind} kind)
    list(GET fields ${index_method} method)
    list(GET fields ${index_mean_test_mse} mean)
    if(NOT mean MATCHES "${number_regex}")
      fail("'${method}' has mean test MSE '${mean}', not a finite number")
    endif()
    list(APPEND names "${method}")
    set(${prefix}_mean_${method} "${mean}" PARENT_SCOPE)
    if(method STREQUAL "frozen base")
      set(base_mean "${mean}")
    endif()
    if(kind STREQUAL "method")
      list(GET fields ${index_train_loss_first} first)
      list(GET fields ${index_train_loss_last} last)
      if(NOT first MATCHES "${number_regex}" OR NOT last MATCHES "${number_regex}")
        fail("'${method}' has training losses '${first}' -> "
                            "'${last}', not finite numbers")
      endif()
      if(NOT last LESS first)
        fail("the training loss of '${method}' did not decrease: "
                            "${first} -> ${last}")
      endif()
      set(method_mean_${i} "${mean}")
      set(method_name_${i} "${method}")
      list(APPEND method_rows ${i})
    endif()
  endforeach()

  foreach(name IN LISTS expected_methods expected_references)
    list(FIND names "${name}" found)
    if(found LESS 0)
      fail("${csv} is missing the row '${name}' "
                          "(rows: ${names})")
    endif()
  endforeach()
  foreach(i IN LISTS method_rows)
    if(NOT method_mean_${i} LESS base_mean)
      fail("the mean test MSE of '${method_name_${i}}' "
                          "(${method_mean_${i}}) is not below the frozen base's (${base_mean})")
    endif()
  endforeach()
  set(${prefix}_names "${names}" PARENT_SCOPE)
  message(STATUS "multitask check: ${csv}: every row present, every method's loss decreased")
endfunction()

# Runs `multitask --quick --backend <backend>` in <dir> and checks the printed
# table and the SVG; sets <out_csv> to its CSV, or to "" when the run
# reported no CUDA device.
function(run_quick backend dir out_csv)
  file(REMOVE_RECURSE "${dir}")
  file(MAKE_DIRECTORY "${dir}")
  set(csv "${dir}/multitask_results.csv")
  set(svg "${dir}/multitask_loss.svg")
  execute_process(
    COMMAND "${MULTITASK}" --quick --backend ${backend} --csv "${csv}" --svg "${svg}"
    WORKING_DIRECTORY "${dir}"
    OUTPUT_VARIABLE out
    ERROR_VARIABLE err
    RESULT_VARIABLE rc)
  message("${out}")
  if(err)
    message("stderr: ${err}")
  endif()
  if(rc EQUAL 77)
    set(${out_csv} "" PARENT_SCOPE)
    return()
  endif()
  if(NOT rc EQUAL 0)
    fail("`multitask --quick --backend ${backend}` exited with ${rc}")
  endif()

  # The printed table: a line starting with each row's name.
  foreach(name IN LISTS expected_methods expected_references)
    string(FIND "${out}" "\n${name} " found)
    if(found LESS 0)
      fail("the printed table has no row '${name}'")
    endif()
  endforeach()

  # The plot: a whole SVG with one curve and one legend entry per method.
  if(NOT EXISTS "${svg}")
    fail("${svg} was not written")
  endif()
  file(READ "${svg}" svg_text)
  if(NOT svg_text MATCHES "^<svg " OR NOT svg_text MATCHES "</svg>\n$")
    fail("${svg} is not a complete SVG document")
  endif()
  string(REGEX MATCHALL "<polyline " curves "${svg_text}")
  list(LENGTH curves curve_count)
  list(LENGTH expected_methods method_count)
  if(NOT curve_count EQUAL method_count)
    fail("${svg} has ${curve_count} curves, expected ${method_count}")
  endif()
  foreach(name IN LISTS expected_methods)
    string(FIND "${svg_text}" ">${name}</text>" found)
    if(found LESS 0)
      fail("the legend of ${svg} has no '${name}'")
    endif()
  endforeach()
  set(${out_csv} "${csv}" PARENT_SCOPE)
endfunction()

if(DEFINED MULTITASK)
  if(NOT DEFINED WORK_DIR)
    fail("set WORK_DIR with MULTITASK")
  endif()
  if(NOT DEFINED BACKEND)
    set(BACKEND cpu)
  endif()
  if(BACKEND STREQUAL "both")
    run_quick(cuda "${WORK_DIR}/cuda" CSV_OTHER)
    if(CSV_OTHER STREQUAL "")
      message("SKIP: no CUDA device")
      return()
    endif()
    run_quick(cpu "${WORK_DIR}/cpu" CSV)
  else()
    run_quick(${BACKEND} "${WORK_DIR}" CSV)
    if(CSV STREQUAL "")
      message("SKIP: no CUDA device")
      return()
    endif()
  endif()
endif()

if(NOT DEFINED CSV)
  fail("set MULTITASK and WORK_DIR, or CSV")
endif()
check_csv("${CSV}" first)

if(DEFINED CSV_OTHER)
  check_csv("${CSV_OTHER}" other)
  if(NOT DEFINED TOLERANCE)
    set(TOLERANCE 0.05)
  endif()
  # CMake has only integer math: plain decimals become integers of 1e-6 units.
  function(to_micro text out)
    if(text MATCHES "^([0-9]+)(\\.([0-9]*))?$")
      set(whole "${CMAKE_MATCH_1}")
      set(frac "${CMAKE_MATCH_3}000000")
      string(SUBSTRING "${frac}" 0 6 frac)
      string(REGEX REPLACE "^0+([0-9])" "\\1" frac "${frac}")
      string(REGEX REPLACE "^0+([0-9])" "\\1" whole "${whole}")
      math(EXPR value "${whole} * 1000000 + ${frac}")
      set(${out} ${value} PARENT_SCOPE)
    else()
      fail("comparing needs plain non-negative decimals, got '${text}'")
    endif()
  endfunction()
  to_micro("${TOLERANCE}" tolerance_micro)
  foreach(name IN LISTS first_names)
    set(a "${first_mean_${name}}")
    set(b "${other_mean_${name}}")
    if(b STREQUAL "")
      fail("${CSV_OTHER} has no row '${name}'")
    endif()
    to_micro("${a}" micro_a)
    to_micro("${b}" micro_b)
    # |a - b| <= TOLERANCE * max(a, b)
    math(EXPR diff "${micro_a} - ${micro_b}")
    if(diff LESS 0)
      math(EXPR diff "0 - ${diff}")
    endif()
    set(larger ${micro_a})
    if(micro_b GREATER micro_a)
      set(larger ${micro_b})
    endif()
    math(EXPR allowed "${larger} * ${tolerance_micro} / 1000000")
    if(diff GREATER allowed)
      fail("'${name}': mean test MSE ${a} (${CSV}) and ${b} "
                          "(${CSV_OTHER}) differ by more than ${TOLERANCE} relative")
    endif()
    message(STATUS "multitask check: '${name}': ${a} vs ${b}, within ${TOLERANCE} relative")
  endforeach()
endif()
