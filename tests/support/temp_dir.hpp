// A fresh directory under the system temp dir for tests that write files,
// removed with everything in it when the object goes.
#pragma once

#include <chrono>
#include <filesystem>
#include <random>
#include <string>
#include <system_error>

namespace rwtest {

class TempDir {
 public:
  TempDir() {
    static unsigned counter = 0;
    // Ticks, a per-process counter and a random draw: unique across the test
    // binaries CTest runs in parallel.
    const auto ticks = std::chrono::steady_clock::now().time_since_epoch().count();
    path_ = std::filesystem::temp_directory_path() /
            ("rankwise-test-" + std::to_string(ticks) + "-" + std::to_string(++counter) + "-" +
             std::to_string(std::random_device{}()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

}  // namespace rwtest
