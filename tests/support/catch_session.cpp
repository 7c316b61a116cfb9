// Catch2's implementation, compiled once for every test binary.
#define CATCH_CONFIG_RUNNER
#include "support/catch_session.hpp"

#include <catch2/catch.hpp>

namespace rwtest {

int run_catch(int argc, char** argv) { return Catch::Session().run(argc, argv); }

}  // namespace rwtest
