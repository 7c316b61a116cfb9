// How errors about a safetensors file name the file and the tensor, with names from
// the file cut so that a message stays bounded.
#pragma once

#include <cstddef>
#include <string>

#include "rankwise/core/error.hpp"

namespace rankwise {
namespace io {

namespace detail {

inline std::string file_where(const std::string& label) {
  return ::rankwise::detail::concat("safetensors file \"", label, "\"");
}
// A name from a file, cut so that an error message stays bounded.
inline std::string name_brief(const std::string& name) {
  constexpr std::size_t kLimit = 200;
  if (name.size() <= kLimit) return name;
  return ::rankwise::detail::concat(name.substr(0, kLimit), "... (", name.size(), " bytes)");
}
inline std::string tensor_where(const std::string& label, const std::string& tensor) {
  return ::rankwise::detail::concat("safetensors file \"", label, "\", tensor \"",
                                    name_brief(tensor), "\"");
}

}  // namespace detail

}  // namespace io
}  // namespace rankwise
