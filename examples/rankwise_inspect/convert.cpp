// rankwise-convert: adapter directories to other forms: a PEFT LoRA to llama.cpp's GGUF, a
// rankwise MoS adapter to a plain PEFT LoRA.
#include <exception>
#include <iostream>
#include <rankwise/io/gguf.hpp>
#include <rankwise/io/module_names.hpp>
#include <rankwise/io/mos_adapter.hpp>
#include <rankwise/io/peft_adapter.hpp>
#include <string>
#include <vector>

namespace {

const char* kUsage =
    "usage: rankwise-convert gguf [--arch llama|qwen2|gemma|gpt2|opt] [--type f32|f16|bf16]\n"
    "                             [--map HF_PATTERN=GGUF_PATTERN]... LORA_DIR OUT.gguf\n"
    "       rankwise-convert mos-to-lora [--dtype f32|f16|bf16] [--overwrite] MOS_DIR OUT_DIR\n"
    "\n"
    "gguf         a PEFT LoRA directory as a llama.cpp LoRA adapter (--arch defaults to a guess\n"
    "             from base_model_name_or_path; --map adds a name rule, {bid} = layer number,\n"
    "             e.g. --map 'model.layers.{bid}.mlp.fc=blk.{bid}.ffn_up.weight')\n"
    "mos-to-lora  a rankwise MoS directory as a PEFT LoRA of each layer's assembled A and B\n"
    "Exit status: 0 written; 1 an input was refused (nothing written); 2 usage error.\n";

[[noreturn]] void usage(const std::string& message) {
  std::cerr << "rankwise-convert: " << message << "\n\n" << kUsage;
  std::exit(2);
}

rankwise::io::DType parse_dtype(const std::string& s) {
  if (s == "f32") return rankwise::io::DType::kF32;
  if (s == "f16") return rankwise::io::DType::kF16;
  if (s == "bf16") return rankwise::io::DType::kBF16;
  usage("unknown dtype \"" + s + "\" (f32, f16, bf16)");
}

}  // namespace

int main(int argc, char** argv) {
  namespace io = rankwise::io;
  if (argc < 2) usage("no command given");
  const std::string command = argv[1];
  std::string arch, type = "f32";
  std::vector<std::pair<std::string, std::string>> maps;
  std::vector<std::string> positional;
  bool overwrite = false;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--arch") {
      arch = value();
    } else if (arg == "--type" || arg == "--dtype") {
      type = value();
    } else if (arg == "--map") {
      const std::string m = value();
      const auto eq = m.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == m.size()) usage("--map needs HF=GGUF");
      maps.emplace_back(m.substr(0, eq), m.substr(eq + 1));
    } else if (arg == "--overwrite") {
      overwrite = true;
    } else if (!arg.empty() && arg[0] == '-') {
      usage("unknown flag \"" + arg + "\"");
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 2) usage("expected an input and an output");
  const io::DType dtype = parse_dtype(type);
  try {
    if (command == "gguf") {
      const io::PeftAdapter adapter = io::read_peft_adapter(positional[0]);
      if (arch.empty()) {
        const auto guess = io::guess_architecture(adapter.base_model_name_or_path);
        if (!guess)
          usage("cannot guess the architecture of \"" + adapter.base_model_name_or_path +
                "\"; pass --arch");
        arch = *guess;
      }
      io::GgufLoraOptions options;
      options.names = io::module_name_map(arch);
      for (const auto& m : maps) options.names.add(m.first, m.second);
      options.type = dtype == io::DType::kF32   ? io::GgmlType::kF32
                     : dtype == io::DType::kF16 ? io::GgmlType::kF16
                                                : io::GgmlType::kBF16;
      io::write_gguf_lora(adapter, positional[1], options);
      // Read back and validated as llama.cpp does before reporting success.
      const auto modules =
          io::gguf_lora_modules(io::read_gguf(positional[1]), arch, nullptr, positional[1]);
      std::cout << "wrote " << positional[1] << ": " << modules.size() << " LoRA pairs, " << arch
                << ", " << type << "\n";
    } else if (command == "mos-to-lora") {
      const io::PeftAdapter lora = io::mos_to_peft_lora(io::read_mos_adapter(positional[0]));
      io::write_peft_adapter(lora, positional[1], dtype, overwrite);
      std::cout << "wrote " << positional[1] << ": " << lora.modules.size() << " modules\n";
    } else {
      usage("unknown command \"" + command + "\"");
    }
  } catch (const std::exception& e) {
    std::cerr << "rankwise-convert: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
