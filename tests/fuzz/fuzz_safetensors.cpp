// libFuzzer target: arbitrary bytes as a safetensors file. Any outcome but a
// parsed file or a rankwise::error (a crash, a sanitizer report, another
// exception, a hang) is a bug. A file that parses must serialize and parse
// back to the same tensors, and its value tensors must convert.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "rankwise/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace io = rankwise::io;
  io::SafetensorsFile file;
  try {
    file = io::parse_safetensors(data, size, "fuzz");
  } catch (const rankwise::error&) {
    return 0;
  }
  const std::vector<std::uint8_t> bytes = io::serialize_safetensors(file);
  const io::SafetensorsFile back = io::parse_safetensors(bytes.data(), bytes.size(), "round trip");
  if (back.tensors.size() != file.tensors.size() || back.metadata != file.metadata) std::abort();
  for (const auto& kv : file.tensors) {
    const auto it = back.tensors.find(kv.first);
    if (it == back.tensors.end() || it->second.data != kv.second.data ||
        it->second.shape != kv.second.shape || it->second.dtype != kv.second.dtype) {
      std::abort();
    }
    if (io::dtype_has_values(kv.second.dtype)) io::to_host_tensor(kv.second, kv.first);
  }
  return 0;
}
