// main() for test binaries that need nothing before Catch runs.
#include "support/catch_session.hpp"

int main(int argc, char** argv) { return rwtest::run_catch(argc, argv); }
