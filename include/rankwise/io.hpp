// rankwise's adapter files on the CPU: every reader and writer of rankwise/io (rankwise::io).
#pragma once

#include "rankwise/io/adapter_dir.hpp"
#include "rankwise/io/gguf.hpp"
#include "rankwise/io/json_reader.hpp"
#include "rankwise/io/module_names.hpp"
#include "rankwise/io/modules_to_save.hpp"
#include "rankwise/io/mos_adapter.hpp"
#include "rankwise/io/peft_adapter.hpp"
#include "rankwise/io/pool_loader.hpp"
#include "rankwise/io/regex.hpp"
#include "rankwise/io/safetensors.hpp"
#include "rankwise/io/smora_adapter.hpp"
