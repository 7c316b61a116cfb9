// rankwise's adapter merges on the CPU: LoRA-LEGO, the baselines and PEFT merges (rankwise::merge).
#pragma once

#include "rankwise/merge/baselines.hpp"
#include "rankwise/merge/gram.hpp"
#include "rankwise/merge/kmeans.hpp"
#include "rankwise/merge/lego.hpp"
#include "rankwise/merge/lora_factors.hpp"
#include "rankwise/merge/merge_modules.hpp"
#include "rankwise/merge/peft_merge.hpp"
#include "rankwise/merge/quality.hpp"
