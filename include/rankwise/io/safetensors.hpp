// Safetensors files: a validating reader, a deterministic writer, and bit-exact F16/BF16
// conversions. One include for all of it; each job has its header alongside.
#pragma once

#include "rankwise/io/dtype.hpp"
#include "rankwise/io/float_bits.hpp"
#include "rankwise/io/safetensors_file.hpp"
#include "rankwise/io/safetensors_reader.hpp"
#include "rankwise/io/safetensors_values.hpp"
#include "rankwise/io/safetensors_writer.hpp"
