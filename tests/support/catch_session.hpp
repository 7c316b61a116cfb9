// Entry point into Catch2's session, which support/catch_session.cpp compiles
// once: test binaries that need their own main (the CUDA one skips without a
// device) call it instead of defining CATCH_CONFIG_RUNNER again.
#pragma once

namespace rwtest {

/// Runs every registered test case with Catch's command line; returns the exit code.
int run_catch(int argc, char** argv);

}  // namespace rwtest
