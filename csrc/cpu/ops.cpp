// CPU kernels of fastdiff._C: the fused step, CFG and Philox noise, OpenMP over blocks + SIMD
// loops inside a block. The per-element math is csrc/step_math.h; this file only moves data.
//
// Layout: the kernels run over flat float32 pointers. A call whose tensors are all contiguous
// (the common case) runs in place directly. If every tensor is dense with the same strides as
// x (e.g. all channels-last) and no Philox noise is drawn, the kernel runs in memory order,
// which is valid for an elementwise op. Any other mix of layouts runs on contiguous copies, and
// the in-place outputs are copied back through their strides. Philox noise is indexed by the
// logical row-major index, so it runs only on contiguous (or copied) data.
//
// Blocks: BLK elements (a multiple of 4, so a block holds whole Philox groups). Inside a block
// every input is read (and converted to float32 in L1 buffers) before any output element is
// stored, so in-place updates see the old values. Threads take contiguous runs of blocks;
// tensors with fewer than SERIAL_MAX elements run on the calling thread (no OpenMP fork). The
// thread count is torch's (torch.set_num_threads); both share torch's libgomp.
#include "../ops.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "../program_layout.h"
#include "../step_math.h"
#include "convert.h"
#include "half_bits.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastdiff {
namespace cpu {

namespace m = fastdiff::math;

constexpr int64_t BLK = 512;            // elements per block (multiple of 4 and of 16)
constexpr int64_t SERIAL_MAX = 32768;   // below this, no OpenMP fork
constexpr int64_t CHUNK_BLOCKS = 16;    // blocks per OpenMP work item (8K elements)
constexpr int MAX_K_STACK = 8;          // history slots whose coefficients are kept on the stack
constexpr int64_t SUB = 128;            // elements per conversion chunk of the one-pass kernel
constexpr int64_t BIG_BLK = 4096;       // one-pass kernel blocks that use no block buffer: at least
constexpr int64_t MAX_BIG_BLK = 65536;  //   ... and at most (see StepKernel::big_block)
constexpr int64_t STREAM_MIN_BYTES = int64_t(8) << 20;   // model inputs streamed past the cache from here

alignas(64) static const float kZeros[BLK] = {};

// ---------------------------------------------------------------------------------------------
// dtype dispatch helpers
// ---------------------------------------------------------------------------------------------
static bool to_dt(at::ScalarType s, DT& dt) {
  switch (s) {
    case at::kFloat: dt = DT::F32; return true;
    case at::kHalf: dt = DT::F16; return true;
    case at::kBFloat16: dt = DT::BF16; return true;
    case at::kDouble: dt = DT::F64; return true;
    default: return false;
  }
}

static int64_t dt_size(DT dt) { return dt == DT::F64 ? 8 : dt == DT::F32 ? 4 : 2; }

using LoadFn = void (*)(const void* src, float* dst, int64_t n);
using StoreFn = void (*)(const float* src, void* dst, int64_t n);

template <class T>
static void load_t(const void* s, float* d, int64_t n) { Conv<T>::load(static_cast<const T*>(s), d, n); }
template <class T>
static void store_t(const float* s, void* d, int64_t n) { Conv<T>::store(s, static_cast<T*>(d), n); }

static LoadFn load_fn(DT dt) {
  switch (dt) {
    case DT::F32: return load_t<float>;
    case DT::F16: return load_t<c10::Half>;
    case DT::BF16: return load_t<c10::BFloat16>;
    default: return load_t<double>;
  }
}
static StoreFn store_fn(DT dt) {
  switch (dt) {
    case DT::F32: return store_t<float>;
    case DT::F16: return store_t<c10::Half>;
    case DT::BF16: return store_t<c10::BFloat16>;
    default: return store_t<double>;
  }
}

// float16 groups of the one-pass kernel through the hardware converter (AVX-512: 16 lanes,
// F16C: 8); without either, the kernel converts in software (half_bits.h). -DFASTDIFF_SOFT_F16
// forces the software path (to test it on a machine that has F16C).
#if defined(FASTDIFF_SOFT_F16)
#define FASTDIFF_F16_GROUP 0
#elif defined(__AVX512F__)
#define FASTDIFF_F16_GROUP 64
static inline void f16_widen_group(const uint16_t* src, float* dst) {
  for (int v = 0; v < FASTDIFF_F16_GROUP; v += 16)
    _mm512_store_ps(dst + v, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + v))));
}
static inline void f16_narrow_group(const float* src, uint16_t* dst) {
  for (int v = 0; v < FASTDIFF_F16_GROUP; v += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + v),
                        _mm512_cvtps_ph(_mm512_load_ps(src + v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#elif defined(__F16C__) && defined(__AVX__)
#define FASTDIFF_F16_GROUP 8
static inline void f16_widen_group(const uint16_t* src, float* dst) {
  _mm256_store_ps(dst, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
}
static inline void f16_narrow_group(const float* src, uint16_t* dst) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm256_cvtps_ph(_mm256_load_ps(src), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
#define FASTDIFF_F16_GROUP 0
#endif

// Inlined conversions for the one-pass kernel (a switch the branch predictor resolves, no call).
static inline void load_as(DT dt, const void* src, float* dst, int64_t n) {
  switch (dt) {
    case DT::F16: Conv<c10::Half>::load(static_cast<const c10::Half*>(src), dst, n); break;
    case DT::BF16: Conv<c10::BFloat16>::load(static_cast<const c10::BFloat16*>(src), dst, n); break;
    case DT::F32: Conv<float>::load(static_cast<const float*>(src), dst, n); break;
    default: Conv<double>::load(static_cast<const double*>(src), dst, n); break;
  }
}
static inline void store_as(DT dt, const float* src, void* dst, int64_t n) {
  switch (dt) {
    case DT::F16: Conv<c10::Half>::store(src, static_cast<c10::Half*>(dst), n); break;
    case DT::BF16: Conv<c10::BFloat16>::store(src, static_cast<c10::BFloat16*>(dst), n); break;
    case DT::F32: Conv<float>::store(src, static_cast<float*>(dst), n); break;
    default: Conv<double>::store(src, static_cast<double*>(dst), n); break;
  }
}

// D of n elements from typed cond/uncond (offset in elements). float64 inputs combine in float64
// (as the reference does: the combine runs in the inputs' precision), others in float32.
static void cfg_block(const void* c, const void* u, DT dt, int64_t off, int64_t n, float g, double g64,
                      LoadFn load, float* d, float* tmp) {
  if (dt == DT::F64) {
    const double* cp = static_cast<const double*>(c) + off;
    if (u == nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) d[i] = (float)cp[i];
      return;
    }
    const double* up = static_cast<const double*>(u) + off;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = (float)(up[i] + g64 * (cp[i] - up[i]));
    return;
  }
  const int64_t es = dt_size(dt);
  load(static_cast<const char*>(c) + off * es, d, n);
  if (u == nullptr) return;
  load(static_cast<const char*>(u) + off * es, tmp, n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = m::cfg_combine(d[i], tmp[i], g);
}

// Philox words of groups g0 .. g0+G-1 into SoA arrays w0..w3. The 32x32->64 multiplies of
// m::philox_round, written with vpmuludq on even/odd lanes (gcc vectorizes the portable form
// with 64-bit lanes and vpmullq, ~2.5x slower); the result is bit-identical (tested against
// fastdiff.ops.philox), and the tail uses the portable code.
#if defined(__AVX512F__)
static inline void mulhilo_v(__m512i a, __m512i M, __m512i& hi, __m512i& lo) {
  const __m512i pe = _mm512_mul_epu32(a, M);                          // even lanes: a * M
  const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), M);   // odd lanes
  lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
}
static void philox_words(uint64_t g0, int64_t G, uint64_t seed, uint32_t nid, uint32_t* w0, uint32_t* w1,
                         uint32_t* w2, uint32_t* w3) {
  const __m512i M0 = _mm512_set1_epi32((int)m::PHILOX_M0), M1 = _mm512_set1_epi32((int)m::PHILOX_M1);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t t = 0;
  for (; t + 16 <= G; t += 16) {
    const uint64_t g = g0 + (uint64_t)t;
    const __m512i glo = _mm512_set1_epi32((int)(uint32_t)g), ghi = _mm512_set1_epi32((int)(uint32_t)(g >> 32));
    __m512i c0 = _mm512_add_epi32(glo, lane);                           // counter = g + lane, 64-bit
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, glo);
    __m512i c1 = _mm512_mask_add_epi32(ghi, carry, ghi, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_set1_epi32((int)nid), c3 = _mm512_setzero_si512();
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      if (r) { k0 += m::PHILOX_W0; k1 += m::PHILOX_W1; }
      __m512i hi0, lo0, hi1, lo1;
      mulhilo_v(c0, M0, hi0, lo0);
      mulhilo_v(c2, M1, hi1, lo1);
      const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32((int)k0));
      const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32((int)k1));
      c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    }
    _mm512_storeu_si512(w0 + t, c0);
    _mm512_storeu_si512(w1 + t, c1);
    _mm512_storeu_si512(w2 + t, c2);
    _mm512_storeu_si512(w3 + t, c3);
  }
  for (; t < G; ++t) m::philox_group(g0 + (uint64_t)t, seed, nid, w0[t], w1[t], w2[t], w3[t]);
}
#elif defined(__AVX2__)
static inline void mulhilo_v(__m256i a, __m256i M, __m256i& hi, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(a, M);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), M);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}
static void philox_words(uint64_t g0, int64_t G, uint64_t seed, uint32_t nid, uint32_t* w0, uint32_t* w1,
                         uint32_t* w2, uint32_t* w3) {
  const __m256i M0 = _mm256_set1_epi32((int)m::PHILOX_M0), M1 = _mm256_set1_epi32((int)m::PHILOX_M1);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
  int64_t t = 0;
  for (; t + 8 <= G; t += 8) {
    const uint64_t g = g0 + (uint64_t)t;
    const __m256i glo = _mm256_set1_epi32((int)(uint32_t)g), ghi = _mm256_set1_epi32((int)(uint32_t)(g >> 32));
    __m256i c0 = _mm256_add_epi32(glo, lane);
    // unsigned c0 < glo  <=>  signed (c0 ^ sign) < (glo ^ sign); the mask is -1 where it carried
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(glo, sign), _mm256_xor_si256(c0, sign));
    __m256i c1 = _mm256_sub_epi32(ghi, carry);
    __m256i c2 = _mm256_set1_epi32((int)nid), c3 = _mm256_setzero_si256();
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      if (r) { k0 += m::PHILOX_W0; k1 += m::PHILOX_W1; }
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_v(c0, M0, hi0, lo0);
      mulhilo_v(c2, M1, hi1, lo1);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)k0));
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)k1));
      c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + t), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + t), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + t), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3 + t), c3);
  }
  for (; t < G; ++t) m::philox_group(g0 + (uint64_t)t, seed, nid, w0[t], w1[t], w2[t], w3[t]);
}
#else
static void philox_words(uint64_t g0, int64_t G, uint64_t seed, uint32_t nid, uint32_t* w0, uint32_t* w1,
                         uint32_t* w2, uint32_t* w3) {
#pragma omp simd
  for (int64_t t = 0; t < G; ++t) m::philox_group(g0 + (uint64_t)t, seed, nid, w0[t], w1[t], w2[t], w3[t]);
}
#endif

// Philox normals of the n elements starting at logical index s (s % 4 == 0), into z[0 .. 4G).
static void philox_block(int64_t s, int64_t n, uint64_t seed, uint32_t noise_id, float* z) {
  alignas(64) uint32_t w0[BLK / 4], w1[BLK / 4], w2[BLK / 4], w3[BLK / 4];
  const int64_t G = (n + 3) >> 2;
  philox_words((uint64_t)s >> 2, G, seed, noise_id, w0, w1, w2, w3);
#pragma omp simd
  for (int64_t t = 0; t < G; ++t) {
    float a, b, c, d;
    m::box_muller(w0[t], w1[t], a, b);
    m::box_muller(w2[t], w3[t], c, d);
    z[4 * t + 0] = a;
    z[4 * t + 1] = b;
    z[4 * t + 2] = c;
    z[4 * t + 3] = d;
  }
}

// Run blocks [0, nblocks) of fn(block_index) -> uint32 flags, serial for small work, else
// contiguous runs of blocks per thread; returns the OR of the flags.
template <class F>
static uint32_t for_blocks(int64_t numel, int64_t block, F fn) {
  const int64_t nblocks = (numel + block - 1) / block;
  const int nt = at::get_num_threads();
  uint32_t flags = 0;
  if (numel < SERIAL_MAX || nt <= 1 || nblocks < 2) {
    for (int64_t b = 0; b < nblocks; ++b) flags |= fn(b);
    return flags;
  }
  // Dynamic chunks of CHUNK_BLOCKS consecutive blocks: as fast as static on an idle machine, and
  // a thread that is descheduled (a busy or oversubscribed machine) does not hold back half of
  // the work. The result does not depend on the schedule (Philox is indexed by element).
#pragma omp parallel for num_threads(nt) schedule(dynamic, CHUNK_BLOCKS) reduction(| : flags)
  for (int64_t b = 0; b < nblocks; ++b) flags |= fn(b);
  return flags;
}

// ---------------------------------------------------------------------------------------------
// The fused step over flat pointers
// ---------------------------------------------------------------------------------------------
struct StepKernel {
  int64_t numel;
  int64_t M;                      // elements per sample (per-sample guidance)
  float* x;
  float* y;                       // nullptr if absent
  const void* cond;               // nullptr: the row does not use the model
  const void* uncond;             // nullptr: no CFG (u = c)
  DT cdt;
  LoadFn cload;
  const float* gs;                // per-sample g (B floats), or nullptr: k.g for every sample
  const void* noise;              // nullptr: none, or Philox if philox
  DT ndt;
  LoadFn nload;
  bool philox;
  uint64_t seed;
  uint32_t noise_id;
  float* hist;                    // slot j at hist + j * hist_slot
  int64_t hist_slot;
  int K;
  uint64_t hist_writes;           // bit j: the row writes slot j
  const m::OutCoefs* oslot;       // slot j's out block (valid for the written slots)
  // The one-pass loop's slots (fast_plan): the ones it reads (a computed output's coefficient is
  // not zero), ascending, and the ones it writes.
  int nread = 0, nwrite = 0;
  int rslot[3] = {}, wslot[2] = {};
  bool eval_y, write_x, write_y;
  void* model_in;                 // half h at model_in + h * mi_half (elements of mdt)
  DT mdt;
  StoreFn mstore;
  int halves;
  int64_t mi_half;
  bool mi_from_y;
  bool check;
  bool reverse = false;           // the one-pass vector loop runs backward (reverse_order)
  bool stream_mi = false;         // ... and streams the model input past the cache (run())
  m::RowCoefs k;

  // Calls f(i0, i1, g) for the runs of elements [s + i0, s + i1) of one sample (one g).
  // (One call site of f: the per-sample and the single-g cases compile to the same loop.)
  template <class F>
  inline void per_sample(int64_t s, int64_t n, F f) const {
    const float* gp = gs != nullptr ? gs : &k.g;
    const int64_t run = gs != nullptr ? M : numel;   // elements sharing one g
    int64_t i = 0;
    while (i < n) {
      const int64_t b = gs != nullptr ? (s + i) / M : 0;
      const int64_t end = std::min(n, (b + 1) * run - s);
      f(i, end, gp[b]);
      i = end;
    }
  }

  // One output (coefficients o) of n elements into dst (dst may be x itself: read in place).
  inline void output(const m::OutCoefs& o, float* dst, const float* X, const float* E, const float* Hm,
                     const float* HU, const float* Z, int64_t s, int64_t n) const {
    const float ax = o.x, ay = o.y, ah = o.h, ahu = o.hu, az = o.z;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = m::out_model(ax, X[i], ay, E[i], ah, Hm[i], ahu, HU[i]);
    if (Z != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = m::out_add(dst[i], az, Z[i]);
    }
    for (int j = 0; j < K; ++j) {
      const float a = o.hist[j];
      if (a == 0.0f) continue;   // an absent term: the slot is not read (it may hold NaN)
      const float* Hj = hist + j * hist_slot + s;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dst[i] = m::out_add(dst[i], a, Hj[i]);
    }
  }

  static inline uint32_t nonfinite_any(const float* v, int64_t n) {
    uint32_t acc = 0;
#pragma omp simd reduction(| : acc)
    for (int64_t i = 0; i < n; ++i) acc |= m::nonfinite(v[i]);
    return acc;
  }

  // Block b: elements [s, s + n). Returns 1 if a written x/y value is not finite (if check).
  uint32_t block(int64_t b) const {
    const int64_t s = b * BLK;
    const int64_t n = std::min(BLK, numel - s);
    alignas(64) float cb[BLK];
    alignas(64) float ub[BLK];
    alignas(64) float db[BLK];
    alignas(64) float zb[BLK];
    alignas(64) float yb[BLK];
    alignas(64) float hb[2][BLK];   // the values of the first two written history slots
    alignas(64) float mh[BLK];      // h
    alignas(64) float mhu[BLK];     // hu

    float* X = x + s;
    const float* E = eval_y ? y + s : X;

    // c, u (= c without CFG), D = u + g (c - u), h = q_y E + q_d D, hu = q_y E + q_d u (h and hu
    // 0 without a model call)
    const float* C = kZeros;
    const float* U = kZeros;
    const float* D = kZeros;
    const float* Hm = kZeros;
    const float* HU = kZeros;
    if (cond != nullptr) {
      const int64_t es = dt_size(cdt);
      if (cdt == DT::F32) {
        C = static_cast<const float*>(cond) + s;
        U = uncond != nullptr ? static_cast<const float*>(uncond) + s : C;
      } else {
        cload(static_cast<const char*>(cond) + s * es, cb, n);
        C = cb;
        U = C;
        if (uncond != nullptr) {
          cload(static_cast<const char*>(uncond) + s * es, ub, n);
          U = ub;
        }
      }
      D = C;
      if (uncond != nullptr) {
        if (cdt == DT::F64) {   // combined in float64 (the inputs' precision), as the reference
          const double* cp = static_cast<const double*>(cond) + s;
          const double* up = static_cast<const double*>(uncond) + s;
          per_sample(s, n, [&](int64_t i0, int64_t i1, float g) {
            const double g64 = (double)g;
            for (int64_t i = i0; i < i1; ++i) db[i] = g == 1.0f ? (float)cp[i] : (float)(up[i] + g64 * (cp[i] - up[i]));
          });
        } else {
          per_sample(s, n, [&](int64_t i0, int64_t i1, float g) {
#pragma omp simd
            for (int64_t i = i0; i < i1; ++i) db[i] = m::guided(C[i], U[i], g);
          });
        }
        D = db;
      }
      const float qy = k.qy, qd = k.qd;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) mh[i] = m::step_h(qy, E[i], qd, D[i]);
      Hm = mh;
      HU = mh;
      if (uncond != nullptr) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) mhu[i] = m::step_h(qy, E[i], qd, U[i]);
        HU = mhu;
      }
    }

    // z: the given noise, Philox, or none
    const float* Z = nullptr;
    if (noise != nullptr) {
      if (ndt == DT::F32) {
        Z = static_cast<const float*>(noise) + s;
      } else {
        nload(static_cast<const char*>(noise) + s * dt_size(ndt), zb, n);
        Z = zb;
      }
    } else if (philox) {
      philox_block(s, n, seed, noise_id, zb);
      Z = zb;
    }

    // Outputs: y and the history values into buffers first (they read the old x and the old
    // slots), then x in place (its base pass reads X and E element by element before writing that
    // element; E is the old y, not yet stored).
    const int nw = __builtin_popcountll(hist_writes);
    std::vector<float> hb_more(nw > 2 ? (size_t)(nw - 2) * BLK : 0);   // rows writing 3+ slots (rare)
    auto slot_buf = [&](int w) { return w < 2 ? hb[w] : hb_more.data() + (w - 2) * BLK; };
    if (write_y) output(k.oy, yb, X, E, Hm, HU, Z, s, n);
    for (int j = 0, w = 0; j < K; ++j)
      if (hist_writes >> j & 1) output(oslot[j], slot_buf(w++), X, E, Hm, HU, Z, s, n);
    if (write_x) output(k.ox, X, X, E, Hm, HU, Z, s, n);

    // Stores
    for (int j = 0, w = 0; j < K; ++j) {
      if (!(hist_writes >> j & 1)) continue;
      float* Hw = hist + j * hist_slot + s;
      const float* src = slot_buf(w++);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) Hw[i] = src[i];
    }
    float* Y = write_y ? y + s : nullptr;
    if (write_y) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) Y[i] = yb[i];
    }
    uint32_t bad = 0;
    if (check) {
      if (write_x) bad |= nonfinite_any(X, n);
      if (write_y) bad |= nonfinite_any(yb, n);
    }
    if (model_in != nullptr) {
      const float* src = mi_from_y ? yb : X;
      const float s_in = k.s_in;
      if (mdt == DT::F32) {
        for (int hh = 0; hh < halves; ++hh) {
          float* dst = static_cast<float*>(model_in) + hh * mi_half + s;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) dst[i] = m::model_input(s_in, src[i]);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) db[i] = m::model_input(s_in, src[i]);
        const int64_t es = dt_size(mdt);
        for (int hh = 0; hh < halves; ++hh) mstore(db, static_cast<char*>(model_in) + (hh * mi_half + s) * es, n);
      }
    }
    return bad;
  }

  // The one-pass kernel's coefficients as plain floats, and its element math: a plain
  // always-inline function of scalars, so that every loop that calls it vectorizes (a capturing
  // lambda inside `omp simd` was vectorized with gathers of its closure). The history terms are
  // those of the read slots (rslot: 0 <-> rslot[0], ...); a zero one is absent (hist_term), as is
  // every term of an output no slot receives (NW: the loop stores only the written ones).
  struct FastCoefs {
    float qy, qd;
    float xx, xy, xh, xhu, xz, x0, x1, x2;   // the stored value (new x, or new y)
    float hx, hy, hh, hhu, hz, h0, h1, h2;   // the first written slot's value
    float vx, vy, vh, vhu, vz, v0, v1, v2;   // the second written slot's value (two-write rows)
  };
  FastCoefs fast_coefs() const {
    const m::OutCoefs& ox = write_x ? k.ox : k.oy;   // the stored value's block (fast_plan)
    const m::OutCoefs none{0.f, 0.f, 0.f, 0.f, 0.f, nullptr};
    const m::OutCoefs& oh = nwrite > 0 ? oslot[wslot[0]] : none;
    const m::OutCoefs& ov = nwrite > 1 ? oslot[wslot[1]] : none;
    auto hc = [&](const m::OutCoefs& o, int r) { return r < nread && o.hist != nullptr ? o.hist[rslot[r]] : 0.f; };
    return FastCoefs{k.qy, k.qd,
                     ox.x, ox.y, ox.h, ox.hu, ox.z, hc(ox, 0), hc(ox, 1), hc(ox, 2),
                     oh.x, oh.y, oh.h, oh.hu, oh.z, hc(oh, 0), hc(oh, 1), hc(oh, 2),
                     ov.x, ov.y, ov.h, ov.hu, ov.z, hc(ov, 0), hc(ov, 1), hc(ov, 2)};
  }
  FastCoefs fq{};   // fast_plan's, made once per call (a row of BLK blocks ran ~6% slower making them per block)

  // o + a * v, or o where a == 0 (the term is absent: v may be NaN).
  static inline __attribute__((always_inline)) float hist_term(float o, float a, float v) {
    return a != 0.0f ? m::out_add(o, a, v) : o;
  }
  // The stored value of one element (the written slots' values into hv_out, hv2_out), in block()'s
  // order of operations.
  template <bool HAS_U, bool HAS_Z, int KT, int NW>
  static inline __attribute__((always_inline)) float fast_elem(const FastCoefs& q, float e, float xi, float c,
                                                               float u, float g, float z, float H0, float H1,
                                                               float H2, float& hv_out, float& hv2_out) {
    const float d = HAS_U ? m::guided(c, u, g) : c;
    const float h = m::step_h(q.qy, e, q.qd, d);
    const float hu = HAS_U ? m::step_h(q.qy, e, q.qd, u) : h;
    float o = m::out_model(q.xx, xi, q.xy, e, q.xh, h, q.xhu, hu);
    float hv = m::out_model(q.hx, xi, q.hy, e, q.hh, h, q.hhu, hu);
    float hv2 = (NW == 2) ? m::out_model(q.vx, xi, q.vy, e, q.vh, h, q.vhu, hu) : 0.f;
    if (HAS_Z) {
      o = m::out_add(o, q.xz, z);
      hv = m::out_add(hv, q.hz, z);
      if (NW == 2) hv2 = m::out_add(hv2, q.vz, z);
    }
    if (KT > 0) { o = hist_term(o, q.x0, H0); hv = hist_term(hv, q.h0, H0); if (NW == 2) hv2 = hist_term(hv2, q.v0, H0); }
    if (KT > 1) { o = hist_term(o, q.x1, H1); hv = hist_term(hv, q.h1, H1); if (NW == 2) hv2 = hist_term(hv2, q.v1, H1); }
    if (KT > 2) { o = hist_term(o, q.x2, H2); hv = hist_term(hv, q.h2, H2); if (NW == 2) hv2 = hist_term(hv2, q.v2, H2); }
    hv_out = hv;
    hv2_out = hv2;
    return o;
  }

#if defined(__AVX512F__)
  // AVX-512: the loop written on 16-lane vectors (gcc vector extensions, the same
  // operations in the same order as fast_elem / step_math.h; -ffp-contract=off keeps them unfused).
  // Each stream is loaded once into a register (the empty asm pins it): the auto-vectorized loop
  // re-read x, E and the model output from L1 for every use (12 loads per 16 elements instead of
  // 5), which made the L1 load ports, not memory, the limit. Returns where the vectors stopped.
  typedef float v16f __attribute__((vector_size(64)));
  typedef uint32_t v16u __attribute__((vector_size(64)));
  typedef int32_t v16i __attribute__((vector_size(64)));
  static inline v16f vld(const float* p) { v16f v; memcpy(&v, p, 64); return v; }
  static inline void vst(float* p, v16f v) { memcpy(p, &v, 64); }
#define FASTDIFF_PIN(v) asm("" : "+v"(v))

  // 16 lanes of a model dtype <-> float32 (widening exact; narrowing rounds to nearest even, as
  // half_bits.h and torch).
  static inline v16f load16(const float* p) { return vld(p); }
  static inline v16f load16(const uint16_t* p, bits::F16) {
    return (v16f)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline v16f load16(const uint16_t* p, bits::BF16) {
    return (v16f)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  }
  // Narrowing to 16-bit lanes (rounds to nearest even; bf16 NaN -> 0x7fc0, as half_bits.h).
  static inline __m256i narrow16(v16f v, bits::F16) {
    return _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static inline __m256i narrow16_bf16_bits(v16f v) {
    const v16u u = (v16u)v;
    v16u r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const v16u nan = (v16u)((u & 0x7fffffffu) > 0x7f800000u);
    r = (r & ~nan) | (0x7fc0u & nan);
    return _mm512_cvtepi32_epi16((__m512i)r);
  }
  static inline __m256i narrow16(v16f v, bits::BF16) {
#if defined(__AVX512BF16__)
    // vcvtneps2bf16 rounds to nearest even like the bit formula (1 instruction instead of ~8), but
    // flushes denormal inputs to zero and keeps NaN payloads: those lanes take the bit formula.
    const __m256i r = (__m256i)_mm512_cvtneps_pbh((__m512)v);
    const __mmask16 odd = _mm512_fpclass_ps_mask((__m512)v, 0xa1);   // NaN, denormal
    if (__builtin_expect(odd != 0, 0)) return _mm256_mask_blend_epi16(odd, r, narrow16_bf16_bits(v));
    return r;
#else
    return narrow16_bf16_bits(v);
#endif
  }
  template <class MT>
  static inline v16f mload(const typename MT::T* p) {
    if constexpr (std::is_same<MT, bits::F32>::value) return load16(p);
    else return load16(p, MT{});
  }
  // STREAM: a non-temporal store (p aligned to the vector: 64 bytes for float32, 32 for 16-bit).
  template <class MT, bool STREAM>
  static inline void mstore16(typename MT::T* p, v16f v) {
    if constexpr (std::is_same<MT, bits::F32>::value) {
      if constexpr (STREAM) _mm512_stream_ps(p, (__m512)v);
      else vst(p, v);
    } else {
      if constexpr (STREAM) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow16(v, MT{}));
      else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow16(v, MT{}));
    }
  }

  // The coefficients as 16-lane broadcasts, made once per call and pinned in registers: loaded
  // from the FastCoefs struct inside the loop they were 12 broadcast loads per 16 elements (the
  // stores to X / Hw may alias the struct, so gcc re-read them every iteration), which with the
  // model output's conversions kept the fp16/bf16 loop from overlapping its memory traffic.
  struct VecCoefs {
    v16f qy, qd, g, xx, xy, xh, xhu, xz, x0, x1, x2, hx, hy, hh, hhu, hz, h0, h1, h2, s_in;
    v16f vx, vy, vh, vhu, vz, v0, v1, v2;   // the second written slot (NW == 2)
    // The history terms present (coefficient != 0: all lanes, else none): the dense loop adds each
    // under its mask (a masked vaddps, no extra instruction), so an absent term leaves its sum
    // untouched whatever the slot holds.
    __mmask16 mx0, mx1, mx2, mh0, mh1, mh2, mv0, mv1, mv2;
  };
  static inline v16f bcast(float v) { return (v16f)_mm512_set1_ps(v); }
  static inline __mmask16 present(float a) { return a != 0.0f ? (__mmask16)0xffff : (__mmask16)0; }
  // o + a * t where the term is present (m::out_add), o elsewhere.
  static inline __attribute__((always_inline)) v16f add_term(v16f o, __mmask16 on, v16f a, v16f t) {
    return (v16f)_mm512_mask_add_ps((__m512)o, on, (__m512)o, (__m512)(a * t));
  }

  // Sparse rows. Nearly every solver's row has a_y = 0 and a_hu = 0 in the new x, and a history
  // value that is h itself (a_h = 1, every other term 0): the dense loop spends 7 of its 14
  // multiplications per 16 elements on such terms, and at the video latent its arithmetic left too
  // little slack to overlap the memory traffic of fp16/bf16 model outputs. The sparse loop leaves the terms with a
  // zero coefficient out and takes h for 1 * h. That is exact wherever the skipped terms are
  // finite and the result is not zero: a + 0 * v == a for finite v and a != 0, and otherwise the
  // two sums can differ only in the sign of a zero. So a vector whose new x or h is zero or not
  // finite, or whose hu (computed: the only skipped value that reaches no kept term) is not
  // finite, is recomputed by the dense formula; every other skipped value (x, E, z) is in a
  // kept term, so its non-finite value makes that result non-finite too. History terms: the loop
  // reads only slots some output uses, and here that is the new x (every written value is h), so
  // each one read is a kept term of the new x.
  static bool sparse_ok(const FastCoefs& q, bool has_z, int kt, int nw) {
    if (q.xy != 0.0f || q.xhu != 0.0f) return false;
    if ((kt > 0 && q.x0 == 0.0f) || (kt > 1 && q.x1 == 0.0f) || (kt > 2 && q.x2 == 0.0f)) return false;
    auto is_h = [&](float x, float y, float h, float hu, float z, float a0, float a1, float a2) {
      return x == 0.0f && y == 0.0f && h == 1.0f && hu == 0.0f && (!has_z || z == 0.0f) && (kt < 1 || a0 == 0.0f) &&
             (kt < 2 || a1 == 0.0f) && (kt < 3 || a2 == 0.0f);
    };
    // (no written slot: no history value is stored, any value will do)
    return (nw < 1 || is_h(q.hx, q.hy, q.hh, q.hhu, q.hz, q.h0, q.h1, q.h2)) &&
           (nw < 2 || is_h(q.vx, q.vy, q.vh, q.vhu, q.vz, q.v0, q.v1, q.v2));
  }

  template <bool HAS_U, bool HAS_Z, int KT, bool HAS_MI, class MT, bool G_ONE, bool E_IS_X, bool SPARSE, int NW,
            bool STREAM = false>
  static inline __attribute__((always_inline)) void lanes16_loop(
      const VecCoefs& vc, int64_t i, int64_t step, int64_t nvec, const float* E, float* X,
      const typename MT::T* C, const typename MT::T* U, const float* Z, const float* H0, const float* H1,
      const float* H2, float* Hw, float* Hw2, typename MT::T* M0, typename MT::T* M1, uint32_t& flags) {
    // Registers: each coefficient once per call (pinned: gcc may not turn them back into loads).
    v16f qy = vc.qy, qd = vc.qd, g = vc.g, xx = vc.xx, xy = vc.xy, xh = vc.xh, xhu = vc.xhu;
    v16f hx = vc.hx, hy = vc.hy, hh = vc.hh, hhu = vc.hhu;
    FASTDIFF_PIN(qy); FASTDIFF_PIN(qd); FASTDIFF_PIN(xx); FASTDIFF_PIN(xh);
    if (!SPARSE) { FASTDIFF_PIN(xy); FASTDIFF_PIN(hx); FASTDIFF_PIN(hy); FASTDIFF_PIN(hh); }
    if (HAS_U && !SPARSE) { FASTDIFF_PIN(xhu); FASTDIFF_PIN(hhu); }
    if (HAS_U && !G_ONE) FASTDIFF_PIN(g);
    v16f xz = vc.xz, hz = vc.hz, x0 = vc.x0, h0 = vc.h0, x1 = vc.x1, h1 = vc.h1, x2 = vc.x2, h2 = vc.h2;
    if (HAS_Z) { FASTDIFF_PIN(xz); if (!SPARSE) FASTDIFF_PIN(hz); }
    if (KT > 0) { FASTDIFF_PIN(x0); if (!SPARSE) FASTDIFF_PIN(h0); }
    if (KT > 1) { FASTDIFF_PIN(x1); if (!SPARSE) FASTDIFF_PIN(h1); }
    if (KT > 2) { FASTDIFF_PIN(x2); if (!SPARSE) FASTDIFF_PIN(h2); }
    v16f s_in = vc.s_in;
    if (HAS_MI) FASTDIFF_PIN(s_in);
    // (the second written slot's coefficients are left to the compiler: registers or reloads)
    const v16f vx = vc.vx, vy = vc.vy, vh = vc.vh, vhu = vc.vhu, vz = vc.vz, v0 = vc.v0, v1 = vc.v1, v2 = vc.v2;
    const __mmask16 mx0 = vc.mx0, mx1 = vc.mx1, mx2 = vc.mx2, mh0 = vc.mh0, mh1 = vc.mh1, mh2 = vc.mh2;
    const __mmask16 mv0 = vc.mv0, mv1 = vc.mv1, mv2 = vc.mv2;
    // Non-finite flag (dense loop): the largest exponent field seen (and + max: 2 integer ops).
    const v16u exp_mask = (v16u)_mm512_set1_epi32(0x7f800000);
    v16u top = {};
    uint32_t sparse_bad = 0;
    // The loop's form is gcc's register allocation of it (inlined into the block's per-sample
    // lambda, beside the lambda's own values and a frame pointer): with a trip counter it kept the
    // step in a vector register and moved it back every iteration in the bf16/fp16 loops (SD-1.5
    // step ~9% slower); without one (i runs to its end) it reloaded the store pointers from the
    // stack every iteration in the fp32 loop with a model input (~10% slower). Each takes the form
    // measured level with 502b6fb. (An out-of-line loop, or the masks tested with kortest, came
    // out slower in both.)
    constexpr bool COUNTED = HAS_MI && std::is_same<MT, bits::F32>::value;
    const int64_t i_end = i + nvec * step;
    for (int64_t t = 0; COUNTED ? t < nvec : i != i_end; ++t, i += step) {
      v16f e = vld(E + i);
      FASTDIFF_PIN(e);
      v16f xi = e;
      if (!E_IS_X) {
        xi = vld(X + i);
        FASTDIFF_PIN(xi);
      }
      v16f c = mload<MT>(C + i);
      FASTDIFF_PIN(c);
      v16f u = c;
      if (HAS_U) {
        u = mload<MT>(U + i);
        FASTDIFF_PIN(u);
      }
      v16f z = {}, t0 = {}, t1 = {}, t2 = {};
      if (HAS_Z) { z = vld(Z + i); FASTDIFF_PIN(z); }
      if (KT > 0) { t0 = vld(H0 + i); FASTDIFF_PIN(t0); }
      if (KT > 1) { t1 = vld(H1 + i); FASTDIFF_PIN(t1); }
      if (KT > 2) { t2 = vld(H2 + i); FASTDIFF_PIN(t2); }
      const v16f d = HAS_U && !G_ONE ? u + g * (c - u) : c;                  // m::guided
      const v16f h = qy * e + qd * d;                                         // m::step_h
      const v16f hu = HAS_U ? qy * e + qd * u : h;
      // The dense formula, in the reference's order (m::out_model, m::out_add per term; a history
      // term only where present).
      auto dense = [&](v16f& o, v16f& hv, v16f& hv2) __attribute__((always_inline)) {
        o = ((xx * xi + xy * e) + xh * h) + xhu * hu;
        hv = ((hx * xi + hy * e) + hh * h) + hhu * hu;
        if (NW == 2) hv2 = ((vx * xi + vy * e) + vh * h) + vhu * hu;
        if (HAS_Z) {
          o = o + xz * z;
          hv = hv + hz * z;
          if (NW == 2) hv2 = hv2 + vz * z;
        }
        if constexpr (SPARSE) {   // (sparse_ok: every term of the new x present, none of a written value)
          if (KT > 0) o = o + x0 * t0;
          if (KT > 1) o = o + x1 * t1;
          if (KT > 2) o = o + x2 * t2;
        } else {
          if (KT > 0) { o = add_term(o, mx0, x0, t0); hv = add_term(hv, mh0, h0, t0); if (NW == 2) hv2 = add_term(hv2, mv0, v0, t0); }
          if (KT > 1) { o = add_term(o, mx1, x1, t1); hv = add_term(hv, mh1, h1, t1); if (NW == 2) hv2 = add_term(hv2, mv1, v1, t1); }
          if (KT > 2) { o = add_term(o, mx2, x2, t2); hv = add_term(hv, mh2, h2, t2); if (NW == 2) hv2 = add_term(hv2, mv2, v2, t2); }
        }
      };
      v16f o, hv, hv2 = {};
      if constexpr (SPARSE) {
        o = xx * xi + xh * h;
        if (HAS_Z) o = o + xz * z;
        if (KT > 0) o = o + x0 * t0;
        if (KT > 1) o = o + x1 * t1;
        if (KT > 2) o = o + x2 * t2;
        hv = h;
        hv2 = h;
        // 0x9f: NaN, +-0, +-inf; 0x99: NaN, +-inf (vfpclassps categories)
        __mmask16 redo = _mm512_fpclass_ps_mask((__m512)o, 0x9f) | _mm512_fpclass_ps_mask((__m512)h, 0x9f);
        if (HAS_U) redo |= _mm512_fpclass_ps_mask((__m512)hu, 0x99);
        if (__builtin_expect(redo != 0, 0)) {
          dense(o, hv, hv2);
          sparse_bad |= _mm512_fpclass_ps_mask((__m512)o, 0x99) != 0;       // m::nonfinite
        }
      } else {
        dense(o, hv, hv2);
        top = (v16u)_mm512_max_epu32((__m512i)top, (__m512i)((v16u)o & exp_mask));   // m::nonfinite
      }
      if (NW >= 1) vst(Hw + i, hv);
      if (NW == 2) vst(Hw2 + i, hv2);
      vst(X + i, o);
      if (HAS_MI) {
        const v16f mi = s_in * o;                                             // m::model_input
        mstore16<MT, STREAM>(M0 + i, mi);
        mstore16<MT, STREAM>(M1 + i, mi);
      }
    }
    if (!SPARSE) sparse_bad = _mm512_cmpeq_epi32_mask((__m512i)top, (__m512i)exp_mask) != 0;
    flags |= sparse_bad;
  }

  // The streams of one call of the vector loop.
  template <class T>
  struct Streams {
    const float* E;
    float* X;
    const T* C;
    const T* U;
    const float* Z;
    const float *H0, *H1, *H2;
    float *Hw, *Hw2;
    T *M0, *M1;
  };

  // (this and lanes16 inlined into their block function, as gcc did before the two-write variants
  // outgrew its inlining budget: out of line, the SD-1.5 bf16 loop measured 3-5% slower)
  template <bool HAS_U, bool HAS_Z, int KT, bool HAS_MI, class MT, bool G_ONE, bool E_IS_X, int NW>
  static inline __attribute__((always_inline)) void lanes16_pick(bool sparse, const VecCoefs& vc, int64_t i, int64_t step, int64_t nvec,
                           const Streams<typename MT::T>& p, uint32_t& flags) {
    if (sparse)
      lanes16_loop<HAS_U, HAS_Z, KT, HAS_MI, MT, G_ONE, E_IS_X, true, NW>(vc, i, step, nvec, p.E, p.X, p.C, p.U, p.Z, p.H0,
                                                                         p.H1, p.H2, p.Hw, p.Hw2, p.M0, p.M1, flags);
    else
      lanes16_loop<HAS_U, HAS_Z, KT, HAS_MI, MT, G_ONE, E_IS_X, false, NW>(vc, i, step, nvec, p.E, p.X, p.C, p.U, p.Z, p.H0,
                                                                          p.H1, p.H2, p.Hw, p.Hw2, p.M0, p.M1, flags);
  }

  // The same loops with the model input streamed past the cache (non-temporal stores), for model
  // inputs of STREAM_MIN_BYTES or more: a line only written then costs no read-for-ownership (at
  // the video latent the step with an fp16 model input ran ~10% faster). A separate, never inlined
  // function: a run-time choice inside the one loop changed its code enough to make the SD-1.5
  // step ~25% slower in the placements that run it backward. (Rows writing two slots take the
  // cached stores: one variant fewer to compile.)
  template <bool HAS_U, bool HAS_Z, int KT, bool HAS_MI, class MT, bool G_ONE, bool E_IS_X, int NW>
  static __attribute__((noinline)) void lanes16_pick_stream(bool sparse, const VecCoefs& vc, int64_t i, int64_t step,
                                                            int64_t nvec, const Streams<typename MT::T>& p,
                                                            uint32_t& flags) {
    if (sparse)
      lanes16_loop<HAS_U, HAS_Z, KT, HAS_MI, MT, G_ONE, E_IS_X, true, NW, true>(
          vc, i, step, nvec, p.E, p.X, p.C, p.U, p.Z, p.H0, p.H1, p.H2, p.Hw, p.Hw2, p.M0, p.M1, flags);
    else
      lanes16_loop<HAS_U, HAS_Z, KT, HAS_MI, MT, G_ONE, E_IS_X, false, NW, true>(
          vc, i, step, nvec, p.E, p.X, p.C, p.U, p.Z, p.H0, p.H1, p.H2, p.Hw, p.Hw2, p.M0, p.M1, flags);
    _mm_sfence();   // the streamed stores are weakly ordered: complete before the call returns
  }

  template <bool HAS_U, bool HAS_Z, int KT, bool HAS_MI, class MT, int NW>
  static inline __attribute__((always_inline)) void lanes16(const FastCoefs& q, int nw, bool e_is_x, int64_t& lo, int64_t& hi, bool reverse, float g,
                      float s_in, const Streams<typename MT::T>& p, bool stream_mi, uint32_t& flags) {
    // Whole vectors of [lo, hi), forward or backward (see reverse_order); on return [lo, hi) is
    // the remainder (< 16 elements) for the scalar loop.
    const int64_t nvec = (hi - lo) / 16, rem = (hi - lo) - 16 * nvec;
    const int64_t first = reverse ? lo + rem : lo;
    const int64_t start = reverse ? first + 16 * (nvec - 1) : first, step = reverse ? -16 : 16;
    const VecCoefs vc{bcast(q.qy), bcast(q.qd), bcast(g),    bcast(q.xx), bcast(q.xy), bcast(q.xh), bcast(q.xhu),
                      bcast(q.xz), bcast(q.x0), bcast(q.x1), bcast(q.x2), bcast(q.hx), bcast(q.hy), bcast(q.hh),
                      bcast(q.hhu), bcast(q.hz), bcast(q.h0), bcast(q.h1), bcast(q.h2), bcast(s_in),
                      // (made per block: only where they are used)
                      (NW == 2) ? bcast(q.vx) : v16f{}, (NW == 2) ? bcast(q.vy) : v16f{}, (NW == 2) ? bcast(q.vh) : v16f{},
                      (NW == 2) ? bcast(q.vhu) : v16f{}, (NW == 2) ? bcast(q.vz) : v16f{}, (NW == 2) ? bcast(q.v0) : v16f{},
                      (NW == 2) ? bcast(q.v1) : v16f{}, (NW == 2) ? bcast(q.v2) : v16f{},
                      present(q.x0), present(q.x1), present(q.x2), present(q.h0), present(q.h1), present(q.h2),
                      present(q.v0), present(q.v1), present(q.v2)};
    const bool sparse = sparse_ok(q, HAS_Z, KT, nw);
    // Unswitched: g == 1 (D = c, m::guided) and E == x (e_is_x: the loop reads x as E and only
    // stores to X, which for a row that writes only y is y) are loop invariants.
    const bool g_one = HAS_U && g == 1.0f;
    if constexpr (HAS_MI && !(NW == 2)) {
      // Streamed model-input stores need both halves aligned to the vector at the first one.
      constexpr uintptr_t vec_bytes = 16 * sizeof(typename MT::T);
      if (stream_mi && nvec > 0 &&
          ((reinterpret_cast<uintptr_t>(p.M0 + start) | reinterpret_cast<uintptr_t>(p.M1 + start)) % vec_bytes) == 0) {
        if (g_one) {
          if (e_is_x) lanes16_pick_stream<HAS_U, HAS_Z, KT, HAS_MI, MT, HAS_U, true, NW>(sparse, vc, start, step, nvec, p, flags);
          else lanes16_pick_stream<HAS_U, HAS_Z, KT, HAS_MI, MT, HAS_U, false, NW>(sparse, vc, start, step, nvec, p, flags);
        } else {
          if (e_is_x) lanes16_pick_stream<HAS_U, HAS_Z, KT, HAS_MI, MT, false, true, NW>(sparse, vc, start, step, nvec, p, flags);
          else lanes16_pick_stream<HAS_U, HAS_Z, KT, HAS_MI, MT, false, false, NW>(sparse, vc, start, step, nvec, p, flags);
        }
        if (reverse) hi = first;
        else lo = first + 16 * nvec;
        return;
      }
    }
    if (nvec > 0) {
      if constexpr (HAS_U) {
        if (g == 1.0f) {
          if (e_is_x) lanes16_pick<HAS_U, HAS_Z, KT, HAS_MI, MT, true, true, NW>(sparse, vc, start, step, nvec, p, flags);
          else lanes16_pick<HAS_U, HAS_Z, KT, HAS_MI, MT, true, false, NW>(sparse, vc, start, step, nvec, p, flags);
        } else {
          if (e_is_x) lanes16_pick<HAS_U, HAS_Z, KT, HAS_MI, MT, false, true, NW>(sparse, vc, start, step, nvec, p, flags);
          else lanes16_pick<HAS_U, HAS_Z, KT, HAS_MI, MT, false, false, NW>(sparse, vc, start, step, nvec, p, flags);
        }
      } else {
        if (e_is_x) lanes16_pick<HAS_U, HAS_Z, KT, HAS_MI, MT, false, true, NW>(sparse, vc, start, step, nvec, p, flags);
        else lanes16_pick<HAS_U, HAS_Z, KT, HAS_MI, MT, false, false, NW>(sparse, vc, start, step, nvec, p, flags);
      }
    }
    if (reverse) hi = first;
    else lo = first + 16 * nvec;
  }
#undef FASTDIFF_PIN
#endif

#if FASTDIFF_F16_GROUP && !defined(__AVX512F__)
  // float16 through the hardware converter, G lanes at a time: widen the group's c/u into an L1
  // local, run the element math vectorized over the group, narrow the model input the same way.
  // Elements [i, end) in whole groups; returns where the groups stopped (the caller's loop takes
  // the tail). A function of plain pointers: inside the caller's lambda gcc vectorized this loop
  // with gathers.
  template <bool HAS_U, bool HAS_Z, int KT, bool HAS_MI, int NW>
  static int64_t f16_groups(const FastCoefs& q, int64_t i, int64_t end, float g, float s_in,
                            const float* E, const float* XR, float* X, const uint16_t* __restrict C,
                            const uint16_t* __restrict U, const float* __restrict Z, const float* H0,
                            const float* H1, const float* H2, float* Hw, float* Hw2, uint16_t* M0,
                            uint16_t* M1, uint32_t& flags) {
    constexpr int G = FASTDIFF_F16_GROUP;
    const FastCoefs qq = q;
    uint32_t a = 0;
    for (; i + G <= end; i += G) {
      alignas(64) float cg[G], ug[G], mg[G];
      f16_widen_group(C + i, cg);
      if (HAS_U) f16_widen_group(U + i, ug);
      const float* e = E + i;
      const float* xr = XR + i;
      float* x = X + i;
      float* hw = Hw + i;
      float* hw2 = (NW == 2) ? Hw2 + i : nullptr;
      const float* z = HAS_Z ? Z + i : nullptr;
      const float* h0 = KT > 0 ? H0 + i : nullptr;
      const float* h1 = KT > 1 ? H1 + i : nullptr;
      const float* h2 = KT > 2 ? H2 + i : nullptr;
#pragma omp simd reduction(| : a)
      for (int l = 0; l < G; ++l) {
        float hv, hv2;
        const float o = fast_elem<HAS_U, HAS_Z, KT, NW>(qq, e[l], xr[l], cg[l], HAS_U ? ug[l] : cg[l], g,
                                                         HAS_Z ? z[l] : 0.f, KT > 0 ? h0[l] : 0.f, KT > 1 ? h1[l] : 0.f,
                                                         KT > 2 ? h2[l] : 0.f, hv, hv2);
        if (NW >= 1) hw[l] = hv;
        if (NW == 2) hw2[l] = hv2;
        x[l] = o;
        a |= m::nonfinite(o);
        mg[l] = m::model_input(s_in, o);
      }
      if (HAS_MI) {
        f16_narrow_group(mg, M0 + i);
        f16_narrow_group(mg, M1 + i);
      }
    }
    flags |= a;
    return i;
  }
#endif

  // ---- the common case in one pass: writes x only (or only y, see fast_plan) ----
  // (cond with or without uncond, no / given / Philox noise, at most 3 history slots read and 2
  // written, model_in or none.) Same operations in the same order as block(); the number of
  // written slots is a template parameter (NW), so the loop has no branches. float64 model outputs
  // combine in float64 (block()).
  //
  // Model dtypes: MT (bits::F32/F16/BF16) is the dtype of the model output and of model_in (when
  // present); the loop widens and narrows inline (half_bits.h, vectorized), so every tensor is
  // read and written once, all streams advancing together. Other mixes (model_in in another
  // dtype than the model output, low-precision given noise) run with MT = F32 on float32 L1
  // buffers converted SUB elements at a time right beside the loop (converting a whole block
  // first streams one tensor at a time, which measured slower at the video latent than fp32).
  // A row that writes only y (evaluated at x: the diffusers drop-ins read the caller's sample as x
  // and write the step's result into the returned tensor as y) runs the same loop, its y-out
  // coefficients in place of the x-out ones and y as the stored stream.
  //
  // Slots: the loop reads the slots some output it computes (the stored value, each written slot's
  // value) has a nonzero coefficient for (rslot, at most 3: KT), and stores one or two written
  // slots (NW: 0, 1, 2); an unread slot may hold anything (NaN, a buffer only written).
  bool fast_plan() {
    if (!((write_x ? !write_y : (write_y && !eval_y)) && cond != nullptr && cdt != DT::F64 &&
          (noise == nullptr || ndt != DT::F64) && (model_in == nullptr || mdt != DT::F64)))
      return false;
    if (__builtin_popcountll(hist_writes) > 2) return false;
    const m::OutCoefs& ostored = write_x ? k.ox : k.oy;
    nread = nwrite = 0;
    for (int j = 0; j < K; ++j)
      if (hist_writes >> j & 1) wslot[nwrite++] = j;
    for (int j = 0; j < K; ++j) {
      bool read = ostored.hist[j] != 0.0f;
      for (int w = 0; w < nwrite; ++w) read = read || oslot[wslot[w]].hist[j] != 0.0f;
      if (!read) continue;
      if (nread == 3) return false;
      rslot[nread++] = j;
    }
    fq = fast_coefs();
    return true;
  }

  template <bool HAS_U, bool HAS_Z, int KT, class MT, bool HAS_MI, int NW>
  uint32_t block_fast(int64_t b, int64_t blk) const {
    using T = typename MT::T;
    const int64_t s = b * blk;
    const int64_t n = std::min(blk, numel - s);
    alignas(64) float zb[BLK];
    alignas(64) float cb[BLK];
    alignas(64) float ub[BLK];
    alignas(64) float mb[BLK];      // model_in in float32, before it is narrowed to mdt (buffered mode)
    const float* XR = x + s;                   // the state read
    float* X = (write_x ? x : y) + s;          // the value stored (x, or y for a row writing only y)
    const float* E = eval_y ? y + s : XR;
    // Buffered conversions happen only with MT = F32 (dispatch in run()).
    const bool c_buf = cdt != DT::F32 && std::is_same<MT, bits::F32>::value;
    const T* C = c_buf ? reinterpret_cast<const T*>(cb) : static_cast<const T*>(cond) + s;
    const T* U = HAS_U ? (c_buf ? reinterpret_cast<const T*>(ub) : static_cast<const T*>(uncond) + s) : C;
    const bool z_buf = HAS_Z && noise != nullptr && ndt != DT::F32;
    const float* Z = nullptr;
    if (HAS_Z) {
      if (noise == nullptr) {
        philox_block(s, n, seed, noise_id, zb);
        Z = zb;
      } else {
        Z = z_buf ? zb : static_cast<const float*>(noise) + s;
      }
    }
    const float* H0 = KT > 0 ? hist + rslot[0] * hist_slot + s : nullptr;
    const float* H1 = KT > 1 ? hist + rslot[1] * hist_slot + s : nullptr;
    const float* H2 = KT > 2 ? hist + rslot[2] * hist_slot + s : nullptr;
    float* Hw = NW >= 1 ? hist + wslot[0] * hist_slot + s : nullptr;   // (NW = 0: nothing stored)
    float* Hw2 = (NW == 2) ? hist + wslot[1] * hist_slot + s : nullptr;
    const bool m_buf = halves > 0 && mdt != DT::F32 && std::is_same<MT, bits::F32>::value;
    // Without a model input nothing is stored (HAS_MI); one half: both stores go to it.
    T* M0 = HAS_MI ? (m_buf ? reinterpret_cast<T*>(mb) : static_cast<T*>(model_in) + s) : nullptr;
    T* M1 = HAS_MI && halves > 1 && !m_buf ? static_cast<T*>(model_in) + mi_half + s : M0;
    const float s_in = k.s_in;
    const FastCoefs q = fq;
    const bool buffered = c_buf || z_buf || m_buf;
    const int64_t sub = buffered ? SUB : n;
    const int64_t ces = dt_size(cdt), nes = dt_size(ndt), mes = dt_size(mdt);
    uint32_t acc = 0;
    for (int64_t j0 = 0; j0 < n; j0 += sub) {
      const int64_t len = std::min(sub, n - j0);
      if (c_buf) {
        load_as(cdt, static_cast<const char*>(cond) + (s + j0) * ces, cb + j0, len);
        if (HAS_U) load_as(cdt, static_cast<const char*>(uncond) + (s + j0) * ces, ub + j0, len);
      }
      if (z_buf) load_as(ndt, static_cast<const char*>(noise) + (s + j0) * nes, zb + j0, len);
      per_sample(s + j0, len, [&](int64_t i0, int64_t i1, float g) {
        uint32_t a = 0;
        int64_t i = j0 + i0;
        int64_t end = j0 + i1;
#if defined(__AVX512F__)
#if defined(FASTDIFF_SOFT_F16)
        if (!buffered && !std::is_same<MT, bits::F16>::value)
#else
        if (!buffered)
#endif
          lanes16<HAS_U, HAS_Z, KT, HAS_MI, MT, NW>(q, nwrite, !eval_y, i, end, reverse, g, s_in,
                                                    Streams<T>{E, X, C, U, Z, H0, H1, H2, Hw, Hw2, M0, M1}, stream_mi, a);
#endif
#if FASTDIFF_F16_GROUP && !defined(__AVX512F__)
        if (std::is_same<MT, bits::F16>::value)
          i = f16_groups<HAS_U, HAS_Z, KT, HAS_MI, NW>(q, i, end, g, s_in, E, XR, X, reinterpret_cast<const uint16_t*>(C),
                                                       reinterpret_cast<const uint16_t*>(U), Z, H0, H1, H2, Hw, Hw2,
                                                   reinterpret_cast<uint16_t*>(M0), reinterpret_cast<uint16_t*>(M1), a);
#endif
#pragma omp simd reduction(| : a)
        for (int64_t k = i; k < end; ++k) {
          const float c = MT::load(C[k]);
          float hv, hv2;
          const float o = fast_elem<HAS_U, HAS_Z, KT, NW>(q, E[k], XR[k], c, HAS_U ? MT::load(U[k]) : c, g,
                                                           HAS_Z ? Z[k] : 0.f, KT > 0 ? H0[k] : 0.f,
                                                           KT > 1 ? H1[k] : 0.f, KT > 2 ? H2[k] : 0.f, hv, hv2);
          if (NW >= 1) Hw[k] = hv;
          if (NW == 2) Hw2[k] = hv2;
          X[k] = o;
          a |= m::nonfinite(o);
          if (HAS_MI) {
            const T mi = MT::store(m::model_input(s_in, o));
            M0[k] = mi;
            M1[k] = mi;
          }
        }
        acc |= a;
      });
      if (m_buf)
        for (int hh = 0; hh < halves; ++hh)
          store_as(mdt, mb + j0, static_cast<char*>(model_in) + (hh * mi_half + s + j0) * mes, len);
    }
    return check ? acc : 0u;
  }

  // Blocks of the one-pass kernel: BLK elements where it uses its block buffers (Philox noise,
  // buffered conversions), else from BIG_BLK up to
  // MAX_BIG_BLK: with no buffer to fill, a longer run of the loop per call saves per-block work
  // (at the video latent 4K -> 16K elements was 4-6% of the step, 16K -> 64K 1-4% more). With
  // several threads, blocks grow only while each thread keeps >= 8 chunks of CHUNK_BLOCKS blocks
  // (OpenMP hands out whole chunks: fewer, larger ones would leave threads idle at the end).
  int64_t big_block() const {
    const int nt = at::get_num_threads();
    if (nt <= 1) return MAX_BIG_BLK;
    int64_t blk = BIG_BLK;
    while (blk < MAX_BIG_BLK && numel >= 2 * blk * CHUNK_BLOCKS * 8 * nt) blk *= 2;
    return blk;
  }

  template <bool HAS_U, bool HAS_Z, class MT, bool HAS_MI, int NW>
  uint32_t run_fast_k() const {
    const bool buffered = (cdt != DT::F32 && std::is_same<MT, bits::F32>::value) ||
                          (HAS_Z && (noise == nullptr || ndt != DT::F32)) ||
                          (HAS_MI && mdt != DT::F32 && std::is_same<MT, bits::F32>::value);
    const int64_t blk = buffered ? BLK : big_block();
    // A backward vector loop takes the blocks backward too: a sawtooth (backward inside blocks,
    // forward across them) defeated the hardware prefetcher (the video step ran 1.6x slower).
    const int64_t last = (numel + blk - 1) / blk - 1;
    const bool rev = reverse;
    auto order = [last, rev](int64_t b) { return rev ? last - b : b; };
    switch (nread) {
      case 0: return for_blocks(numel, blk, [=](int64_t b) { return block_fast<HAS_U, HAS_Z, 0, MT, HAS_MI, NW>(order(b), blk); });
      case 1: return for_blocks(numel, blk, [=](int64_t b) { return block_fast<HAS_U, HAS_Z, 1, MT, HAS_MI, NW>(order(b), blk); });
      case 2: return for_blocks(numel, blk, [=](int64_t b) { return block_fast<HAS_U, HAS_Z, 2, MT, HAS_MI, NW>(order(b), blk); });
      default: return for_blocks(numel, blk, [=](int64_t b) { return block_fast<HAS_U, HAS_Z, 3, MT, HAS_MI, NW>(order(b), blk); });
    }
  }

  template <class MT, bool HAS_MI, int NW>
  uint32_t run_fast_mi() const {
    const bool has_z = noise != nullptr || philox;
    if (uncond != nullptr)
      return has_z ? run_fast_k<true, true, MT, HAS_MI, NW>() : run_fast_k<true, false, MT, HAS_MI, NW>();
    return has_z ? run_fast_k<false, true, MT, HAS_MI, NW>() : run_fast_k<false, false, MT, HAS_MI, NW>();
  }

  template <class MT>
  uint32_t run_fast() const {
    // NW: the written slots (a row writing none stores no history value: no scratch buffer, big blocks)
    if (nwrite == 2) return halves > 0 ? run_fast_mi<MT, true, 2>() : run_fast_mi<MT, false, 2>();
    if (nwrite == 1) return halves > 0 ? run_fast_mi<MT, true, 1>() : run_fast_mi<MT, false, 1>();
    return halves > 0 ? run_fast_mi<MT, true, 0>() : run_fast_mi<MT, false, 0>();
  }

  // 4K aliasing: a load whose address equals an earlier, still buffered store's modulo 4096 waits
  // for it. In a forward streaming loop that happens when a store stream starts 64-384 bytes (1-6
  // vectors) after a load stream modulo 4096: the next vectors' loads match the last stores (the
  // SD-1.5 step measured 1.5-1.85x slower with the model input 64 bytes after the model output;
  // the faster the loop, the more vectors' stores are still buffered: with the sparse loop a store
  // 256-320 bytes ahead still cost 7-10%).
  // Running the loop backward turns exactly those placements harmless (and the mirror ones
  // harmful), so the kernel picks the direction with fewer such pairs, the closest weighted most. Streams of the same element
  // size keep their offsets mod 4096 along the loop, so one decision per call holds.
  bool reverse_order() const {
    const char* loads[8];
    int64_t lsize[8];
    int nl = 0;
    const char* stores[5];
    int64_t ssize[5];
    int ns = 0;
    auto load = [&](const void* p, int64_t es) { if (p) { loads[nl] = static_cast<const char*>(p); lsize[nl++] = es; } };
    auto store = [&](const void* p, int64_t es) { if (p) { stores[ns] = static_cast<const char*>(p); ssize[ns++] = es; } };
    load(eval_y ? y : x, 4);
    load(cond, dt_size(cdt));
    load(uncond, dt_size(cdt));
    if (noise != nullptr) load(noise, dt_size(ndt));
    for (int r = 0; r < nread; ++r) load(hist + rslot[r] * hist_slot, 4);
    store(write_x ? x : y, 4);
    for (int w = 0; w < nwrite; ++w) store(hist + wslot[w] * hist_slot, 4);
    if (halves > 0) store(model_in, dt_size(mdt));
    if (halves > 1) store(static_cast<const char*>(model_in) + mi_half * dt_size(mdt), dt_size(mdt));
    int fwd = 0, bwd = 0;
    for (int a = 0; a < ns; ++a)
      for (int b = 0; b < nl; ++b) {
        if (ssize[a] != lsize[b]) continue;
        const int64_t d = (int64_t)((reinterpret_cast<uintptr_t>(stores[a]) - reinterpret_cast<uintptr_t>(loads[b])) & 4095);
        // weighted by how close the pair is (measured with the dense loop: 64 B 1.5-1.85x, 128 B
        // ~1.13x, 192 B ~1.02x; with the sparse loop 256-320 B still 7-10%)
        auto weight = [](int64_t dist) { return dist <= 0 || dist > 384 ? 0 : dist <= 64 ? 4 : dist <= 128 ? 2 : 1; };
        fwd += weight(d);
        bwd += weight(4096 - d);
      }
    return fwd > bwd;
  }

  uint32_t run() {
    if (fast_plan()) {
      reverse = reverse_order();
      stream_mi = halves > 0 && halves * (numel * dt_size(mdt)) >= STREAM_MIN_BYTES;
      // Inline conversion when model_in (if any) has the model output's dtype and any given noise is
      // float32; anything else converts through float32 buffers.
      const bool inline_ok = (model_in == nullptr || mdt == cdt) && (noise == nullptr || ndt == DT::F32);
      if (inline_ok && cdt == DT::F16) return run_fast<bits::F16>();
      if (inline_ok && cdt == DT::BF16) return run_fast<bits::BF16>();
      return run_fast<bits::F32>();
    }
    return for_blocks(numel, BLK, [this](int64_t b) { return block(b); });
  }
};

}  // namespace cpu

// ---------------------------------------------------------------------------------------------
// at::Tensor entry points: checks, layout, coefficients
// ---------------------------------------------------------------------------------------------
using cpu::DT;

static std::string shape_str(at::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

static void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastdiff._C: ", name, " must be a CPU tensor, got a tensor on ", t.device());
}

static DT check_model_dtype(const at::Tensor& t, const char* name) {
  DT dt;
  TORCH_CHECK_TYPE(cpu::to_dt(t.scalar_type(), dt), "fastdiff._C: ", name,
                   " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  return dt;
}

static void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "fastdiff._C: ", name, " must have the shape of x ", shape_str(x.sizes()),
                    ", got ", shape_str(t.sizes()));
}

static bool same_strides_as(const at::Tensor& t, at::IntArrayRef xs) { return t.strides() == xs; }

void fused_step(const at::Tensor& table, int64_t row, const at::Tensor& x, const std::optional<at::Tensor>& y,
                const std::optional<at::Tensor>& cond, const std::optional<at::Tensor>& uncond,
                const std::optional<at::Tensor>& hist, int64_t hist_writes, int64_t flags,
                const std::optional<at::Tensor>& noise, uint64_t seed, int64_t noise_id,
                const std::optional<at::Tensor>& model_in, const std::optional<at::Tensor>& bad_row,
                const std::optional<at::Tensor>& guidance) {
  namespace L = fastdiff::layout;
  // ---- checks (all before any write) ----
  // The row flags (one bitmask, program_layout.h), decoded once; a bit no flag names is an error.
  const uint64_t unknown_bits = (uint64_t)flags & ~(uint64_t)L::FLAG_ALL;
  TORCH_CHECK_VALUE(unknown_bits == 0, "fastdiff._C.fused_step: flags has unknown row flag bits 0x", std::hex,
                    unknown_bits, std::dec, " (got ", flags, "; the row flags are FLAG_EVAL_Y | FLAG_WRITE_X | "
                    "FLAG_WRITE_Y | FLAG_MODEL_IN_FROM_Y = 0x", std::hex, L::FLAG_ALL, std::dec, ")");
  const bool eval_y = flags & L::FLAG_EVAL_Y, write_x = flags & L::FLAG_WRITE_X, write_y = flags & L::FLAG_WRITE_Y,
             model_in_from_y = flags & L::FLAG_MODEL_IN_FROM_Y;
  check_cpu(x, "x");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "fastdiff._C.fused_step: x (the state) must be float32 on the cpu "
                   "backend, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "fastdiff._C.fused_step: x must have a batch dimension, got a 0-d tensor");
  check_cpu(table, "table");
  TORCH_CHECK_TYPE(table.scalar_type() == at::kDouble, "fastdiff._C.fused_step: table must be float64, got ",
                   table.scalar_type());
  TORCH_CHECK_VALUE(table.dim() == 2, "fastdiff._C.fused_step: table must be 2-D [rows, columns], got shape ",
                    shape_str(table.sizes()));
  TORCH_CHECK_VALUE(row >= 0 && row < table.size(0), "fastdiff._C.fused_step: row must be in [0, ", table.size(0),
                    "), got ", row);
  int64_t K = 0;
  if (hist) {
    const at::Tensor& H = *hist;
    check_cpu(H, "hist");
    TORCH_CHECK_TYPE(H.scalar_type() == at::kFloat, "fastdiff._C.fused_step: hist must be float32 (the state dtype), got ",
                     H.scalar_type());
    TORCH_CHECK_VALUE(H.dim() == x.dim() + 1 && H.sizes().slice(1) == x.sizes(),
                      "fastdiff._C.fused_step: hist must have shape [K, ", shape_str(x.sizes()).substr(1), ", got ",
                      shape_str(H.sizes()));
    K = H.size(0);
  }
  const int64_t width = L::table_width((int)K);
  TORCH_CHECK_VALUE(table.size(1) == width, "fastdiff._C.fused_step: table has ", table.size(1), " columns; ", K,
                    " history slots need ", width);
  // (the wording of layout.hist_writes_error)
  TORCH_CHECK_VALUE(L::hist_writes_valid(hist_writes, (int)K), "fastdiff._C.fused_step: hist_writes must be a bitmask "
                    "of history slots in [0, ", K, ") (0: no write; 0 <= hist_writes < ",
                    K < 63 ? std::to_string(int64_t(1) << K) : "2**" + std::to_string(K), "), got ", hist_writes);
  if (y) {
    check_cpu(*y, "y");
    TORCH_CHECK_TYPE(y->scalar_type() == at::kFloat, "fastdiff._C.fused_step: y must be float32 (the state dtype), got ",
                     y->scalar_type());
    check_same_shape(*y, "y", x);
    TORCH_CHECK_VALUE(x.numel() == 0 || y->data_ptr() != x.data_ptr(),
                      "fastdiff._C.fused_step: y must be a different buffer from x");
  }
  TORCH_CHECK_VALUE(y || !(eval_y || write_y || model_in_from_y),
                    "fastdiff._C.fused_step: this row reads or writes y (eval_y/write_y/model_in_from_y), but y is None");
  TORCH_CHECK_VALUE(write_x || write_y, "fastdiff._C.fused_step: a row must write x or y");
  DT cdt = DT::F32;
  if (cond) {
    check_cpu(*cond, "cond");
    cdt = check_model_dtype(*cond, "model output (cond)");
    check_same_shape(*cond, "model output (cond)", x);
  }
  if (uncond) {
    TORCH_CHECK_VALUE(cond.has_value(), "fastdiff._C.fused_step: uncond given without cond");
    check_cpu(*uncond, "uncond");
    TORCH_CHECK_TYPE(uncond->scalar_type() == cond->scalar_type(), "fastdiff._C.fused_step: uncond must have the dtype of "
                     "cond (", cond->scalar_type(), "), got ", uncond->scalar_type());
    check_same_shape(*uncond, "model output (uncond)", x);
  }
  DT ndt = DT::F32;
  if (noise) {
    check_cpu(*noise, "noise");
    ndt = check_model_dtype(*noise, "noise");
    check_same_shape(*noise, "noise", x);
  }
  const bool philox = !noise && noise_id >= 0;
  if (philox)
    TORCH_CHECK_VALUE(noise_id < (int64_t(1) << 32), "fastdiff._C.fused_step: noise_id must be < 2**32, got ", noise_id);
  DT mdt = DT::F32;
  int halves = 0;
  const int64_t B = x.size(0);
  if (model_in) {
    const at::Tensor& M = *model_in;
    check_cpu(M, "model_in");
    mdt = check_model_dtype(M, "model_in");
    TORCH_CHECK_VALUE(M.dim() == x.dim() && M.sizes().slice(1) == x.sizes().slice(1) && (M.size(0) == B || M.size(0) == 2 * B),
                      "fastdiff._C.fused_step: model_in must have shape [", B, " or ", 2 * B, ", ",
                      shape_str(x.sizes().slice(1)).substr(1), ", got ", shape_str(M.sizes()));
    TORCH_CHECK_VALUE(model_in_from_y ? write_y : write_x, "fastdiff._C.fused_step: model_in is computed from the new ",
                      model_in_from_y ? "y" : "x", ", but the row does not write it");
    halves = B == 0 ? 0 : (int)(M.size(0) / B);
  }
  if (bad_row) {
    check_cpu(*bad_row, "bad_row");
    TORCH_CHECK_TYPE(bad_row->scalar_type() == at::kInt, "fastdiff._C.fused_step: bad_row must be int32, got ",
                     bad_row->scalar_type());
    TORCH_CHECK_VALUE(bad_row->numel() == 1 && bad_row->dim() == 1, "fastdiff._C.fused_step: bad_row must have shape [1], got ",
                      shape_str(bad_row->sizes()));
  }
  if (guidance) {
    check_cpu(*guidance, "guidance");
    TORCH_CHECK_TYPE(guidance->scalar_type() == at::kFloat || guidance->scalar_type() == at::kDouble,
                     "fastdiff._C.fused_step: guidance (per-sample scale vector) must be float32 or float64, got ",
                     guidance->scalar_type());
    TORCH_CHECK_VALUE(guidance->dim() == 1 && guidance->size(0) == B, "fastdiff._C.fused_step: guidance must have "
                      "shape [", B, "] (one scale per sample), got ", shape_str(guidance->sizes()));
  }
  const int64_t numel = x.numel();
  if (numel == 0) return;

  // ---- coefficients: table[row] rounded to float32 ----
  const double* trow = table.data_ptr<double>() + row * table.stride(0);
  const int64_t ts = table.stride(1);
  auto col = [&](int64_t c) { return (float)trow[c * ts]; };
  // History coefficients: K of the x-out block, K of the y-out block, K of each slot's block;
  // the slots' out blocks (only the written ones are read).
  float hc_stack[(2 + cpu::MAX_K_STACK) * cpu::MAX_K_STACK];
  math::OutCoefs os_stack[cpu::MAX_K_STACK];
  std::vector<float> hc_heap;
  std::vector<math::OutCoefs> os_heap;
  float* hc = hc_stack;
  math::OutCoefs* os = os_stack;
  if (K > cpu::MAX_K_STACK) {
    hc_heap.resize((2 + K) * K);
    os_heap.resize(K);
    hc = hc_heap.data();
    os = os_heap.data();
  }
  float* hx = hc;
  float* hy = hc + K;
  const L::Columns cols = L::columns((int)K);
  for (int64_t j = 0; j < K; ++j) {
    hx[j] = col(cols.out_x + L::OUT_FIXED + j);
    hy[j] = col(cols.out_y + L::OUT_FIXED + j);
  }
  auto out_coefs = [&](int64_t b, const float* hist) {
    return math::OutCoefs{col(b + L::OUT_X), col(b + L::OUT_Y), col(b + L::OUT_H), col(b + L::OUT_HU),
                          col(b + L::OUT_Z), hist};
  };
  cpu::StepKernel kr{};
  kr.k.g = col(cols.g);
  kr.k.g0 = col(cols.g0);
  kr.k.g1 = col(cols.g1);
  kr.k.qy = col(cols.qy);
  kr.k.qd = col(cols.qd);
  kr.k.s_in = col(cols.s_in);
  kr.k.ox = out_coefs(cols.out_x, hx);
  kr.k.oy = out_coefs(cols.out_y, hy);
  kr.k.K = (int)K;
  for (int64_t j = 0; j < K; ++j) {
    if (!(hist_writes >> j & 1)) continue;
    const int64_t b = L::col_out_slot((int)K, (int)j);
    float* hj = hc + (2 + j) * K;
    for (int64_t i = 0; i < K; ++i) hj[i] = col(b + L::OUT_FIXED + i);
    os[j] = out_coefs(b, hj);
  }
  kr.oslot = os;
  // Per-sample g = g0 + g1 * s[b] (s rounded to float32, as the reference rounds it)
  std::vector<float> gs;
  if (guidance) {
    const at::Tensor G = guidance->to(at::kFloat).contiguous();
    const float* sp = G.data_ptr<float>();
    gs.resize(B);
    for (int64_t b = 0; b < B; ++b) gs[b] = math::sample_g(kr.k.g0, kr.k.g1, sp[b]);
  }

  // ---- layout ----
  const at::IntArrayRef xs = x.strides();
  bool all_contig = x.is_contiguous();
  bool same_dense = x.is_non_overlapping_and_dense() && !philox;
  auto consider = [&](const std::optional<at::Tensor>& t) {
    if (!t) return;
    all_contig = all_contig && t->is_contiguous();
    same_dense = same_dense && same_strides_as(*t, xs);
  };
  consider(y);
  consider(cond);
  consider(uncond);
  consider(noise);
  if (hist) {
    all_contig = all_contig && hist->is_contiguous();
    same_dense = same_dense && hist->strides().slice(1) == xs;
  }
  if (model_in) {
    all_contig = all_contig && model_in->is_contiguous();
    same_dense = same_dense && same_strides_as(*model_in, xs);
  }
  const bool direct = all_contig || same_dense;

  // Operands the kernel runs on: the tensors themselves, or contiguous copies.
  auto rd = [&](const std::optional<at::Tensor>& t) -> at::Tensor {
    if (!t) return at::Tensor();
    return direct ? *t : t->contiguous();
  };
  at::Tensor X = direct ? x : x.contiguous();
  at::Tensor Y = rd(y), C = rd(cond), U = rd(uncond), N = rd(noise), H = rd(hist);
  at::Tensor M;
  if (model_in) M = (direct || model_in->is_contiguous()) ? *model_in : at::empty(model_in->sizes(), model_in->options());

  kr.numel = numel;
  kr.M = numel / B;
  kr.gs = guidance ? gs.data() : nullptr;
  kr.x = X.data_ptr<float>();
  kr.y = Y.defined() ? Y.data_ptr<float>() : nullptr;
  kr.cond = C.defined() ? C.data_ptr() : nullptr;
  kr.uncond = U.defined() ? U.data_ptr() : nullptr;
  kr.cdt = cdt;
  kr.cload = cpu::load_fn(cdt);
  kr.noise = N.defined() ? N.data_ptr() : nullptr;
  kr.ndt = ndt;
  kr.nload = cpu::load_fn(ndt);
  kr.philox = philox;
  kr.seed = philox ? seed : 0;
  kr.noise_id = philox ? (uint32_t)noise_id : 0u;
  kr.hist = H.defined() ? H.data_ptr<float>() : nullptr;
  kr.hist_slot = H.defined() ? H.stride(0) : 0;
  kr.K = (int)K;
  kr.hist_writes = (uint64_t)hist_writes;
  kr.eval_y = eval_y;
  kr.write_x = write_x;
  kr.write_y = write_y;
  kr.model_in = M.defined() ? M.data_ptr() : nullptr;
  kr.mdt = mdt;
  kr.mstore = cpu::store_fn(mdt);
  kr.halves = halves;
  kr.mi_half = M.defined() ? B * M.stride(0) : 0;
  kr.mi_from_y = model_in_from_y;
  kr.check = bad_row.has_value();

  const uint32_t bad = kr.run();

  // ---- write back what ran on copies ----
  if (!direct) {
    if (write_x && !x.is_contiguous()) x.copy_(X);
    if (write_y && !y->is_contiguous()) y->copy_(Y);
    if (hist_writes != 0 && !hist->is_contiguous())
      for (int64_t j = 0; j < K; ++j)
        if (hist_writes >> j & 1) hist->select(0, j).copy_(H.select(0, j));
  }
  if (model_in && !M.is_same(*model_in)) model_in->copy_(M);
  if (bad && bad_row) {
    int32_t* br = bad_row->data_ptr<int32_t>();
    if (*br == 0) *br = (int32_t)(row + 1);
  }
}

at::Tensor cfg_combine(const at::Tensor& cond, const std::optional<at::Tensor>& uncond, double g,
                       at::ScalarType out_dtype) {
  check_cpu(cond, "cond");
  const DT cdt = check_model_dtype(cond, "cond");
  if (uncond) {
    check_cpu(*uncond, "uncond");
    TORCH_CHECK_TYPE(uncond->scalar_type() == cond.scalar_type(), "fastdiff._C.cfg_combine: uncond must have the dtype of cond (",
                     cond.scalar_type(), "), got ", uncond->scalar_type());
    TORCH_CHECK_VALUE(uncond->sizes() == cond.sizes(), "fastdiff._C.cfg_combine: uncond must have the shape of cond ",
                      shape_str(cond.sizes()), ", got ", shape_str(uncond->sizes()));
  }
  DT odt;
  TORCH_CHECK_TYPE(cpu::to_dt(out_dtype, odt), "fastdiff._C.cfg_combine: out_dtype must be float32, float16, bfloat16 or "
                   "float64, got ", out_dtype);
  at::Tensor C = cond.contiguous();
  at::Tensor U = uncond ? uncond->contiguous() : at::Tensor();
  at::Tensor out = at::empty(cond.sizes(), cond.options().dtype(out_dtype));
  const int64_t numel = cond.numel();
  if (numel == 0) return out;
  const void* cp = C.data_ptr();
  const void* up = U.defined() ? U.data_ptr() : nullptr;
  void* op = out.data_ptr();
  const int64_t oes = cpu::dt_size(odt);
  const cpu::LoadFn load = cpu::load_fn(cdt);
  const cpu::StoreFn store = cpu::store_fn(odt);
  const float gf = (float)g;
  cpu::for_blocks(numel, cpu::BLK, [&](int64_t b) -> uint32_t {
    const int64_t s = b * cpu::BLK, n = std::min(cpu::BLK, numel - s);
    alignas(64) float d[cpu::BLK];
    alignas(64) float tmp[cpu::BLK];
    if (cdt == DT::F64 && odt == DT::F64) {   // float64 end to end, as the reference
      const double* c = static_cast<const double*>(cp) + s;
      const double* u = up ? static_cast<const double*>(up) + s : nullptr;
      double* o = static_cast<double*>(op) + s;
      if (u) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) o[i] = u[i] + g * (c[i] - u[i]);
      } else {
        for (int64_t i = 0; i < n; ++i) o[i] = c[i];
      }
      return 0;
    }
    cpu::cfg_block(cp, up, cdt, s, n, gf, g, load, d, tmp);
    store(d, static_cast<char*>(op) + s * oes, n);
    return 0;
  });
  return out;
}

static void check_seed(int64_t noise_id, const char* op) {
  TORCH_CHECK_VALUE(noise_id >= 0 && noise_id < (int64_t(1) << 32), "fastdiff._C.", op,
                    ": noise_id must be in [0, 2**32), got ", noise_id);
}

at::Tensor philox_normal(const std::vector<int64_t>& shape, uint64_t seed, int64_t noise_id) {
  check_seed(noise_id, "philox_normal");
  for (int64_t s : shape) TORCH_CHECK_VALUE(s >= 0, "fastdiff._C.philox_normal: shape must be non-negative, got ", shape_str(shape));
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  const int64_t numel = out.numel();
  float* o = out.data_ptr<float>();
  const uint32_t nid = (uint32_t)noise_id;
  cpu::for_blocks(numel, cpu::BLK, [&](int64_t b) -> uint32_t {
    const int64_t s = b * cpu::BLK, n = std::min(cpu::BLK, numel - s);
    if (n == cpu::BLK) {
      cpu::philox_block(s, n, seed, nid, o + s);
    } else {   // the last block: whole groups into a buffer, then the n elements
      alignas(64) float z[cpu::BLK];
      cpu::philox_block(s, n, seed, nid, z);
      std::copy(z, z + n, o + s);
    }
    return 0;
  });
  return out;
}

at::Tensor philox_uint32(int64_t numel, uint64_t seed, int64_t noise_id, uint64_t first_group) {
  check_seed(noise_id, "philox_uint32");
  TORCH_CHECK_VALUE(numel >= 0, "fastdiff._C.philox_uint32: numel must be non-negative, got ", numel);
  const int64_t G = (numel + 3) / 4;
  at::Tensor out = at::empty({G, 4}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const uint32_t nid = (uint32_t)noise_id;
  constexpr int64_t GB = cpu::BLK / 4;   // groups per block, through the same word generator as the kernels
  cpu::for_blocks(G, GB, [&](int64_t b) -> uint32_t {
    const int64_t s = b * GB, n = std::min<int64_t>(GB, G - s);
    alignas(64) uint32_t w0[GB], w1[GB], w2[GB], w3[GB];
    cpu::philox_words(first_group + (uint64_t)s, n, seed, nid, w0, w1, w2, w3);
    for (int64_t t = 0; t < n; ++t) {
      o[4 * (s + t)] = w0[t];
      o[4 * (s + t) + 1] = w1[t];
      o[4 * (s + t) + 2] = w2[t];
      o[4 * (s + t) + 3] = w3[t];
    }
    return 0;
  });
  return out;
}

#define FASTDIFF_STR2(x) #x
#define FASTDIFF_STR(x) FASTDIFF_STR2(x)

std::vector<std::pair<std::string, std::string>> build_info() {
  std::vector<std::pair<std::string, std::string>> r;
  r.emplace_back("compiler", "gcc " __VERSION__);
#ifdef FASTDIFF_CPU_ARCH
  r.emplace_back("march", FASTDIFF_STR(FASTDIFF_CPU_ARCH));
#else
  r.emplace_back("march", "none");
#endif
#if defined(__AVX512F__)
  r.emplace_back("simd", "avx512");
#elif defined(__AVX2__)
  r.emplace_back("simd", "avx2");
#else
  r.emplace_back("simd", "sse2");
#endif
#ifdef _OPENMP
  r.emplace_back("openmp", std::to_string(_OPENMP));
#else
  r.emplace_back("openmp", "no");
#endif
  r.emplace_back("block", std::to_string(cpu::BLK));
  r.emplace_back("serial_max", std::to_string(cpu::SERIAL_MAX));
  return r;
}

}  // namespace fastdiff
