// libFuzzer target: a PEFT adapter directory in memory. The input's first two
// bytes (little-endian) give the length of adapter_config.json, the rest is
// adapter_model.safetensors. Reading must give an adapter or a rankwise::error;
// an adapter read must then go through the writer's checks (which may refuse
// it, e.g. a target_modules list that misses a module, but only by a
// rankwise::error).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "rankwise/io/peft_adapter.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace io = rankwise::io;
  if (size < 2) return 0;
  const std::size_t config_size =
      std::min<std::size_t>(size - 2, static_cast<std::size_t>(data[0] | (data[1] << 8)));
  const std::string config(reinterpret_cast<const char*>(data + 2), config_size);
  const std::uint8_t* weights = data + 2 + config_size;
  const std::size_t weights_size = size - 2 - config_size;
  io::PeftAdapter adapter;
  try {
    adapter = io::detail::peft_adapter_from(
        config, [&] { return io::parse_safetensors(weights, weights_size, "weights"); }, "config",
        "weights");
  } catch (const rankwise::error&) {
    return 0;
  }
  try {
    io::detail::prepare_peft_config(adapter);
  } catch (const rankwise::error&) {
  }
  return 0;
}
