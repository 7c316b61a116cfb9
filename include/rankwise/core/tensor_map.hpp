// A plain in-memory map of named host tensors: how layers save and load state.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "rankwise/core/error.hpp"

namespace rankwise {

/// A row-major host tensor. Values are held as double, which represents every
/// float, half and bfloat16 exactly, so a save/load round trip keeps the bits.
struct HostTensor {
  std::vector<std::int64_t> shape;
  std::vector<double> values;

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

using TensorMap = std::map<std::string, HostTensor>;

/// The tensor `name` of `map`, checked to have exactly `shape`. Throws
/// rankwise::error naming the key and both shapes.
inline const HostTensor& require_tensor(const TensorMap& map, const std::string& name,
                                        const std::vector<std::int64_t>& shape) {
  const auto it = map.find(name);
  RANKWISE_CHECK(it != map.end(), "tensor map: missing key \"", name, "\"");
  const HostTensor& t = it->second;
  auto show = [](const std::vector<std::int64_t>& s) {
    std::string out = "(";
    for (std::size_t i = 0; i < s.size(); ++i) out += (i ? " x " : "") + std::to_string(s[i]);
    return out + ")";
  };
  RANKWISE_CHECK(t.shape == shape, "tensor map: \"", name, "\" has shape ", show(t.shape),
                 ", expected ", show(shape));
  RANKWISE_CHECK(static_cast<std::int64_t>(t.values.size()) == t.numel(), "tensor map: \"", name,
                 "\" holds ", t.values.size(), " values for shape ", show(t.shape));
  return t;
}

}  // namespace rankwise
