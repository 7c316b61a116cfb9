// A downstream program of rankwise::io: a tensor written to a safetensors file
// in BF16 and read back. Exits nonzero on a wrong result.
#include <cstdio>
#include <map>
#include <rankwise/io.hpp>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::printf("usage: consumer_io <file.safetensors>\n");
    return 2;
  }
  const std::string path = argv[1];
  const rankwise::HostTensor w{{2, 3}, {1, -2, 0.5, 3, 0.25, -1.5}};  // exact in BF16

  rankwise::io::SafetensorsFile file;
  file.metadata = std::map<std::string, std::string>{{"format", "pt"}};
  file.tensors.emplace("w", rankwise::io::from_host_tensor(w, rankwise::io::DType::kBF16, "w"));
  rankwise::io::write_safetensors(file, path);

  const rankwise::io::SafetensorsFile back = rankwise::io::read_safetensors(path);
  int failures = 0;
  const auto it = back.tensors.find("w");
  if (it == back.tensors.end() || it->second.dtype != rankwise::io::DType::kBF16) {
    std::printf("tensor w missing or not BF16\n");
    ++failures;
  } else {
    const rankwise::HostTensor values = rankwise::io::to_host_tensor(it->second, "w");
    if (values.shape != w.shape || values.values != w.values) {
      std::printf("tensor w does not read back as written\n");
      ++failures;
    }
  }
  if (!back.metadata || back.metadata->at("format") != "pt") {
    std::printf("__metadata__ does not read back as written\n");
    ++failures;
  }
  std::printf("rankwise io consumer: %s\n", failures == 0 ? "ok" : "WRONG");
  return failures == 0 ? 0 : 1;
}
