# One package-test step, run as `cmake -D... -P consume.cmake`.
#
#   STEP=install   install BUILD_DIR into a fresh PREFIX
#   STEP=consume   configure the consumer project from scratch in
#                  CONSUMER_BINARY_DIR (cache seeded from SETTINGS, MODE,
#                  optional PACKAGE_DIR / PREFIX / RANKWISE_SOURCE_DIR /
#                  CONSUMER_CUDA / CONSUMER_COMPONENTS), build it and run its
#                  ctest. CORE_ONLY=ON: the consumer of rankwise::rankwise alone
#                  (CONSUMER_IO=OFF), with nlohmann_json made unfindable.
#                  NO_IO=ON: the io and merge consumers are left out (they
#                  are built by one test only, package.find_package). With
#                  EXPECT_CONFIGURE_ERROR set, the configure must instead fail
#                  with output matching it.
#
# CONFIG is the build configuration ($<CONFIG>, may be empty).

cmake_minimum_required(VERSION 3.25)

if(STEP STREQUAL "install")
  file(REMOVE_RECURSE "${PREFIX}")
  execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}"
                  COMMAND_ERROR_IS_FATAL ANY)
  return()
endif()

set(configure_args -S "${CONSUMER_SOURCE_DIR}" -B "${CONSUMER_BINARY_DIR}"
                   -G "${GENERATOR}" -C "${SETTINGS}" "-DCONSUMER_MODE=${MODE}")
if(PACKAGE_DIR)
  list(APPEND configure_args "-Drankwise_DIR=${PACKAGE_DIR}")
endif()
if(PREFIX)
  list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${PREFIX}")
endif()
if(RANKWISE_SOURCE_DIR)
  list(APPEND configure_args "-DRANKWISE_SOURCE_DIR=${RANKWISE_SOURCE_DIR}")
endif()
if(DEFINED CONSUMER_CUDA)
  list(APPEND configure_args "-DCONSUMER_CUDA=${CONSUMER_CUDA}")
endif()
if(CORE_ONLY)
  # Any find_package(nlohmann_json), REQUIRED or not, then finds nothing.
  list(APPEND configure_args -DCONSUMER_IO=OFF -DCONSUMER_CORE_ONLY=ON
       -DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON)
elseif(NO_IO)
  list(APPEND configure_args -DCONSUMER_IO=OFF)
endif()
if(CONSUMER_COMPONENTS)
  list(APPEND configure_args "-DCONSUMER_EXTRA_COMPONENTS=${CONSUMER_COMPONENTS}")
endif()

# From scratch each time: a stale cache would hide configuration problems.
file(REMOVE_RECURSE "${CONSUMER_BINARY_DIR}")

if(EXPECT_CONFIGURE_ERROR)
  execute_process(COMMAND "${CMAKE_COMMAND}" ${configure_args}
                  RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
  if(result EQUAL 0)
    message(FATAL_ERROR "configure succeeded, expected it to fail with '${EXPECT_CONFIGURE_ERROR}'")
  endif()
  # CMake wraps messages; compare with all whitespace runs as single spaces.
  string(REGEX REPLACE "[ \t\r\n]+" " " output "${output}")
  if(NOT output MATCHES "${EXPECT_CONFIGURE_ERROR}")
    message(FATAL_ERROR "configure failed, but without '${EXPECT_CONFIGURE_ERROR}':\n${output}")
  endif()
  message(STATUS "configure failed as expected")
  return()
endif()

set(config_args)
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" ${configure_args} COMMAND_ERROR_IS_FATAL ANY)
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${CONSUMER_BINARY_DIR}" ${config_args}
                COMMAND_ERROR_IS_FATAL ANY)
if(CONFIG)
  set(config_args -C "${CONFIG}")
endif()
execute_process(COMMAND "${CTEST}" --test-dir "${CONSUMER_BINARY_DIR}" ${config_args}
                        --output-on-failure --no-tests=error
                COMMAND_ERROR_IS_FATAL ANY)
