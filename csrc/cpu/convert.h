// Loads and stores between the model dtypes (float32/float16/bfloat16/float64) and float32
// block buffers. Conversions round to nearest even, as torch's Tensor.to does.
#pragma once

#include <stdint.h>
#include <string.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../step_math.h"

namespace fastdiff {
namespace cpu {

enum class DT : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

// bfloat16 <-> float32 in integer ops (vectorizes).
inline float bf16_to_f32(uint16_t b) { return math::as_f32((uint32_t)b << 16); }
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = math::as_u32(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return (uint16_t)(nan ? 0x7fc0u : rounded);
}

template <class T>
struct Conv;

template <>
struct Conv<float> {
  static void load(const float* s, float* d, int64_t n) { memcpy(d, s, n * sizeof(float)); }
  static void store(const float* s, float* d, int64_t n) { memcpy(d, s, n * sizeof(float)); }
};

template <>
struct Conv<double> {
  static void load(const double* s, float* d, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = (float)s[i];
  }
  static void store(const float* s, double* d, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = (double)s[i];
  }
};

template <>
struct Conv<c10::BFloat16> {
  static void load(const c10::BFloat16* s, float* d, int64_t n) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(s);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(p[i]);
  }
  static void store(const float* s, c10::BFloat16* d, int64_t n) {
    uint16_t* p = reinterpret_cast<uint16_t*>(d);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) p[i] = f32_to_bf16(s[i]);
  }
};

template <>
struct Conv<c10::Half> {
  static void load(const c10::Half* s, float* d, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
    for (; i < n; ++i) d[i] = static_cast<float>(s[i]);
  }
  static void store(const float* s, c10::Half* d, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                          _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < n; ++i) d[i] = c10::Half(s[i]);
  }
};

}  // namespace cpu
}  // namespace fastdiff
