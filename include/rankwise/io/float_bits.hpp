// Bit-exact conversions between double and the F32, F16 and BF16 bit patterns,
// NaN payloads included, so that values read from a file write back unchanged.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace rankwise {
namespace io {

namespace detail {

// Rounds a double to the binary interchange format with `exp_bits` exponent
// and `man_bits` stored mantissa bits, to nearest, ties to even, straight from
// the double's bits: going through float first would round twice and could
// differ in the last bit. Overflow gives infinity, underflow gradual
// subnormals then zero. A NaN keeps its sign and the top of its payload; if
// that leaves no payload bit, the quiet bit is set so it stays a NaN.
inline std::uint64_t encode_float_bits(double value, int exp_bits, int man_bits) {
  std::uint64_t d = 0;
  std::memcpy(&d, &value, sizeof d);
  const std::uint64_t sign_bit = (d >> 63) << (exp_bits + man_bits);
  const int dexp = static_cast<int>((d >> 52) & 0x7FF);
  const std::uint64_t dman = d & ((std::uint64_t{1} << 52) - 1);
  const std::uint64_t exp_all = (std::uint64_t{1} << exp_bits) - 1;
  const std::uint64_t man_mask = (std::uint64_t{1} << man_bits) - 1;
  const std::uint64_t inf = exp_all << man_bits;

  if (dexp == 0x7FF) {
    if (dman == 0) return sign_bit | inf;
    std::uint64_t payload = dman >> (52 - man_bits);
    if (payload == 0) payload = std::uint64_t{1} << (man_bits - 1);
    return sign_bit | inf | payload;
  }
  if (dexp == 0 && dman == 0) return sign_bit;

  // value = sig * 2^(e - 52) with sig's leading one at bit 52.
  std::uint64_t sig = 0;
  int e = 0;
  if (dexp == 0) {
    sig = dman;
    e = -1022;
    while ((sig & (std::uint64_t{1} << 52)) == 0) {
      sig <<= 1;
      --e;
    }
  } else {
    sig = dman | (std::uint64_t{1} << 52);
    e = dexp - 1023;
  }

  const int bias = (1 << (exp_bits - 1)) - 1;
  const int emin = 1 - bias;
  int shift = 52 - man_bits;
  if (e < emin) shift += emin - e;  // subnormal in the target: fewer bits survive
  // shift >= 54 leaves less than half the smallest subnormal: rounds to zero.
  if (shift >= 54) return sign_bit;

  std::uint64_t q = sig >> shift;
  const std::uint64_t rem = sig & ((std::uint64_t{1} << shift) - 1);
  const std::uint64_t half = std::uint64_t{1} << (shift - 1);
  if (rem > half || (rem == half && (q & 1) != 0)) ++q;

  if (e < emin) {
    // q <= 2^man_bits; q == 2^man_bits is the smallest normal, whose encoding
    // (exponent field 1, mantissa 0) is exactly q.
    return sign_bit | q;
  }
  if ((q >> (man_bits + 1)) != 0) {  // rounding carried into the next binade
    q >>= 1;
    ++e;
  }
  if (e > bias) return sign_bit | inf;
  return sign_bit | (static_cast<std::uint64_t>(e + bias) << man_bits) | (q & man_mask);
}

// The exact double value of a binary interchange format value (every F32, F16
// and BF16 value is a double). NaN payloads are carried into the top of the
// double's mantissa, so encode_float_bits(decode_float_bits(x)) == x for every
// bit pattern x, NaNs included.
inline double decode_float_bits(std::uint64_t bits, int exp_bits, int man_bits) {
  const std::uint64_t exp_all = (std::uint64_t{1} << exp_bits) - 1;
  const std::uint64_t man_mask = (std::uint64_t{1} << man_bits) - 1;
  const std::uint64_t sign = (bits >> (exp_bits + man_bits)) & 1;
  const std::uint64_t exp = (bits >> man_bits) & exp_all;
  const std::uint64_t man = bits & man_mask;
  if (exp == exp_all) {
    const std::uint64_t d = (sign << 63) | (std::uint64_t{0x7FF} << 52) | (man << (52 - man_bits));
    double out = 0;
    std::memcpy(&out, &d, sizeof out);
    return out;
  }
  const int bias = (1 << (exp_bits - 1)) - 1;
  double magnitude = 0;
  if (exp == 0) {
    magnitude = std::ldexp(static_cast<double>(man), 1 - bias - man_bits);
  } else {
    magnitude = std::ldexp(static_cast<double>(man | (std::uint64_t{1} << man_bits)),
                           static_cast<int>(exp) - bias - man_bits);
  }
  return sign != 0 ? -magnitude : magnitude;
}

}  // namespace detail

/// IEEE binary16 bits of `value`, rounded to nearest, ties to even.
inline std::uint16_t double_to_half_bits(double value) {
  return static_cast<std::uint16_t>(detail::encode_float_bits(value, 5, 10));
}
/// The exact value of IEEE binary16 bits.
inline double half_bits_to_double(std::uint16_t bits) {
  return detail::decode_float_bits(bits, 5, 10);
}

/// bfloat16 bits of `value`, rounded to nearest, ties to even.
inline std::uint16_t double_to_bfloat16_bits(double value) {
  return static_cast<std::uint16_t>(detail::encode_float_bits(value, 8, 7));
}
/// The exact value of bfloat16 bits.
inline double bfloat16_bits_to_double(std::uint16_t bits) {
  return detail::decode_float_bits(bits, 8, 7);
}

/// IEEE binary32 bits of `value`, rounded to nearest, ties to even. Done on the
/// bits rather than by a cast so that signalling NaNs keep their bits too.
inline std::uint32_t double_to_float_bits(double value) {
  return static_cast<std::uint32_t>(detail::encode_float_bits(value, 8, 23));
}
/// The exact value of IEEE binary32 bits.
inline double float_bits_to_double(std::uint32_t bits) {
  return detail::decode_float_bits(bits, 8, 23);
}

}  // namespace io
}  // namespace rankwise
