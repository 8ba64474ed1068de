// float16 / bfloat16 <-> float32 conversions written as branch-free integer and float32
// operations on one element, so that they vectorize inside the one-pass kernel's
// `#pragma omp simd` loop (gcc does not vectorize _Float16 or c10::Half conversions, and a
// separate conversion pass through an L1 buffer costs a second loop per chunk).
//
// Exactness: f16_to_f32 is exact for every one of the 65536 inputs (it equals vcvtph2ps; NaNs stay
// NaN with their payload); f32_to_f16 rounds to nearest even, overflows to +-inf and maps NaN to
// the quiet NaN 0x7e00 | sign, and equals vcvtps2ph (round to nearest) on every non-NaN float32
// (checked exhaustively when written). bfloat16 is the top half of a float32: widening is a shift,
// narrowing rounds to nearest even with NaN -> 0x7fc0 (as convert.h's f32_to_bf16 and torch).
// Selections are bit masks, not ?:, so that gcc if-converts them.
#pragma once

#include <stdint.h>

#include "../step_math.h"

namespace fastdiff {
namespace cpu {
namespace bits {

inline uint32_t mask_if(bool c) { return 0u - (uint32_t)c; }

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t em = (uint32_t)(h & 0x7fffu);
  const uint32_t normal = (em << 13) + 0x38000000u;               // exponent rebias 127 - 15
  const uint32_t infnan = (em << 13) | 0x7f800000u;
  const float subnormal = (float)(int32_t)em * 5.9604644775390625e-08f;   // em * 2^-24, exact
  const uint32_t m_inf = mask_if(em >= 0x7c00u), m_sub = mask_if(em < 0x0400u);
  uint32_t r = (infnan & m_inf) | (normal & ~m_inf);
  r = (math::as_u32(subnormal) & m_sub) | (r & ~m_sub);
  return math::as_f32(r | sign);
}

inline uint16_t f32_to_f16(float x) {
  uint32_t f = math::as_u32(x);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  // |x| >= 65520 rounds to inf (NaN -> quiet NaN); below 2^-14 the result is subnormal: adding
  // 0.5f aligns the bits so that the float32 adder rounds to nearest even at 2^-24.
  const uint32_t big = 0x7c00u | (mask_if(f > 0x7f800000u) & 0x0200u);
  const uint32_t subnormal = math::as_u32(math::fadd(math::as_f32(f), 0.5f)) - 0x3f000000u;
  const uint32_t normal = (f + 0xc8000fffu + ((f >> 13) & 1u)) >> 13;   // rebias 15 - 127, round to even
  const uint32_t m_big = mask_if(f >= 0x47800000u), m_sub = mask_if(f < 0x38800000u);
  uint32_t o = (big & m_big) | (normal & ~m_big);
  o = (subnormal & m_sub) | (o & ~m_sub);
  return (uint16_t)(o | (sign >> 16));
}

inline float bf16_to_f32(uint16_t b) { return math::as_f32((uint32_t)b << 16); }

inline uint16_t f32_to_bf16(float x) {
  const uint32_t u = math::as_u32(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t m_nan = mask_if((u & 0x7fffffffu) > 0x7f800000u);
  return (uint16_t)((0x7fc0u & m_nan) | (rounded & ~m_nan));
}

// The model dtypes the one-pass kernel reads and writes inline: storage type, DT tag, conversions.
struct F32 {
  using T = float;
  static inline float load(float v) { return v; }
  static inline float store(float v) { return v; }
};
struct F16 {
  using T = uint16_t;
  static inline float load(uint16_t v) { return f16_to_f32(v); }
  static inline uint16_t store(float v) { return f32_to_f16(v); }
};
struct BF16 {
  using T = uint16_t;
  static inline float load(uint16_t v) { return bf16_to_f32(v); }
  static inline uint16_t store(float v) { return f32_to_bf16(v); }
};

}  // namespace bits
}  // namespace cpu
}  // namespace fastdiff
