// The math of one element of the fused step, written once for every C++/CUDA backend.
//
// Everything here is a FASTDIFF_HD inline function over plain scalars (no torch headers, no
// pointers into tensors), so the CPU loop (csrc/cpu/, OpenMP + SIMD) and a CUDA kernel include
// the same code. The spec is fastdiff/ops/reference.py and fastdiff/ops/philox.py.
//
// Floating-point contract: every operation below is one IEEE float32 operation, rounded to
// nearest, evaluated in the order written; no FMA contraction. The host build passes
// -ffp-contract=off; device code uses the __f*_rn intrinsics through fmul/fadd/fsub below (which
// nvcc never contracts). Then the CPU and a CUDA build give bit-identical results, and the
// elementwise step reproduces the order of operations of the PyTorch reference.
//
// logf/sinf/cosf are written out by hand (Cephes single-precision polynomials) rather than
// taken from libm/libmvec/CUDA: they are branch-free (gcc vectorizes them), identical on
// every backend, and within ~1 ulp of the true value over the whole Box-Muller input range
// (the uniforms are multiples of 2^-24, so this was checked exhaustively: see
// csrc/tools/check_math.cpp).
#pragma once

#include <stdint.h>
#include <string.h>

#ifndef FASTDIFF_HD  // (also defined, identically, by program_layout.h)
#if defined(__CUDACC__)
#define FASTDIFF_HD __host__ __device__
#else
#define FASTDIFF_HD
#endif
#endif

namespace fastdiff {
namespace math {

// ---------------------------------------------------------------------------------------------
// Rounded float32 operations (never contracted into FMA)
// ---------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__)
FASTDIFF_HD inline float fmul(float a, float b) { return __fmul_rn(a, b); }
FASTDIFF_HD inline float fadd(float a, float b) { return __fadd_rn(a, b); }
FASTDIFF_HD inline float fsub(float a, float b) { return __fsub_rn(a, b); }
FASTDIFF_HD inline float fsqrt(float a) { return __fsqrt_rn(a); }
FASTDIFF_HD inline uint32_t as_u32(float f) { return __float_as_uint(f); }
FASTDIFF_HD inline float as_f32(uint32_t u) { return __uint_as_float(u); }
#else
inline float fmul(float a, float b) { return a * b; }
inline float fadd(float a, float b) { return a + b; }
inline float fsub(float a, float b) { return a - b; }
inline float fsqrt(float a) { return __builtin_sqrtf(a); }  // correctly rounded; vsqrtps with -fno-math-errno
inline uint32_t as_u32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float as_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
#endif

// True if f is NaN or +-inf (bit test: valid under any math flags, vectorizes).
FASTDIFF_HD inline uint32_t nonfinite(float f) { return (as_u32(f) & 0x7f800000u) == 0x7f800000u; }

// ---------------------------------------------------------------------------------------------
// Philox-4x32-10 (Salmon et al. 2011), exactly as fastdiff/ops/philox.py
// ---------------------------------------------------------------------------------------------
constexpr uint32_t PHILOX_M0 = 0xD2511F53u, PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u, PHILOX_W1 = 0xBB67AE85u;

// One round on the counter (c0..c3) with key (k0, k1).
FASTDIFF_HD inline void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                     uint32_t k0, uint32_t k1) {
  const uint64_t p0 = (uint64_t)PHILOX_M0 * c0;   // mulhilo(M0, c0)
  const uint64_t p1 = (uint64_t)PHILOX_M1 * c2;   // mulhilo(M1, c2)
  const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
  const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
  const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
  c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
}

// Ten rounds; the key schedule bumps (k0, k1) by the Weyl constants before rounds 1..9.
FASTDIFF_HD inline void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                      uint32_t k0, uint32_t k1) {
  philox_round(c0, c1, c2, c3, k0, k1);
  for (int i = 1; i < 10; ++i) {
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
    philox_round(c0, c1, c2, c3, k0, k1);
  }
}

// The four words of group g of the stream (seed, noise_id):
// key = (seed lo, seed hi), counter = (g lo, g hi, noise_id, 0).
FASTDIFF_HD inline void philox_group(uint64_t g, uint64_t seed, uint32_t noise_id, uint32_t& r0,
                                     uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  r0 = (uint32_t)g;
  r1 = (uint32_t)(g >> 32);
  r2 = noise_id;
  r3 = 0u;
  philox4x32_10(r0, r1, r2, r3, (uint32_t)seed, (uint32_t)(seed >> 32));
}

// ---------------------------------------------------------------------------------------------
// logf / sincosf for the Box-Muller ranges (Cephes single precision, branch-free)
// ---------------------------------------------------------------------------------------------

// Natural log of a positive, normal, finite x (Box-Muller: x in [2^-24, 1]).
FASTDIFF_HD inline float log_pos(float x) {
  uint32_t b = as_u32(x);
  int32_t e = (int32_t)(b >> 23) - 127;
  uint32_t mb = (b & 0x007fffffu) | 0x3f800000u;      // m in [1, 2)
  const bool big = mb >= 0x3fb504f3u;                  // m >= 2 * float(sqrt(1/2))
  mb = big ? mb - 0x00800000u : mb;                    // m in [sqrt(1/2), sqrt(2))
  e = big ? e + 1 : e;
  const float f = fsub(as_f32(mb), 1.0f);              // exact
  const float z = fmul(f, f);
  float y = 7.0376836292E-2f;
  y = fsub(fmul(y, f), 1.1514610310E-1f);
  y = fadd(fmul(y, f), 1.1676998740E-1f);
  y = fsub(fmul(y, f), 1.2420140846E-1f);
  y = fadd(fmul(y, f), 1.4249322787E-1f);
  y = fsub(fmul(y, f), 1.6668057665E-1f);
  y = fadd(fmul(y, f), 2.0000714765E-1f);
  y = fsub(fmul(y, f), 2.4999993993E-1f);
  y = fadd(fmul(y, f), 3.3333331174E-1f);
  y = fmul(fmul(y, f), z);
  const float fe = (float)e;
  y = fadd(y, fmul(-2.12194440E-4f, fe));              // ln2 = 0.693359375 - 2.12194440e-4
  y = fadd(y, fmul(-0.5f, z));
  float r = fadd(f, y);
  r = fadd(r, fmul(0.693359375f, fe));
  return r;
}

// sin and cos of th in [0, 2*pi] (Box-Muller: th = 2*pi*u2, u2 in [0, 1)).
FASTDIFF_HD inline void sincos_0_2pi(float th, float& s, float& c) {
  // Octant j = floor(th * 4/pi), rounded up to even; the reduced r = th - j*pi/4 in [-pi/4, pi/4]
  // with pi/4 = P1 + P2 + P3 + P4, where P1..P3 have <= 20 significant bits, so P1*j..P3*j are
  // exact for j <= 8 and r is accurate to ~1e-20 even next to a multiple of pi/2.
  int32_t j = (int32_t)fmul(th, 1.27323954473516f);
  j = j + (j & 1);
  const float y = (float)j;
  float r = fsub(th, fmul(y, 0.78515625f));
  r = fsub(r, fmul(y, 0.00024191336706280708f));
  r = fsub(r, fmul(y, 3.0385471916360984e-11f));
  r = fsub(r, fmul(y, 3.0616171314629196e-17f));
  const float z = fmul(r, r);
  // sin(r), cos(r) on [-pi/4, pi/4]
  float sp = fadd(fmul(-1.9515295891E-4f, z), 8.3321608736E-3f);
  sp = fsub(fmul(sp, z), 1.6666654611E-1f);
  sp = fadd(fmul(fmul(sp, z), r), r);
  float cp = fsub(fmul(2.443315711809948E-5f, z), 1.388731625493765E-3f);
  cp = fadd(fmul(cp, z), 4.166664568298827E-2f);
  cp = fadd(fsub(fmul(fmul(cp, z), z), fmul(0.5f, z)), 1.0f);
  // Quadrant q = j/2: sin(r + q*pi/2), cos(r + q*pi/2).
  const int32_t q = (j >> 1) & 3;
  const bool swap = (q & 1) != 0;
  float ss = swap ? cp : sp;
  float cc = swap ? sp : cp;
  ss = (q & 2) ? -ss : ss;
  cc = ((q + 1) & 2) ? -cc : cc;
  s = ss;
  c = cc;
}

// ---------------------------------------------------------------------------------------------
// Box-Muller (philox.py): two words -> two standard normals
// ---------------------------------------------------------------------------------------------
constexpr float TWO_PI_F32 = 6.2831854820251465f;   // float32(2*pi), as philox.TWO_PI_F32
constexpr float TWO_M24 = 5.9604644775390625e-08f;  // 2^-24

FASTDIFF_HD inline float uniform_open0(uint32_t r) {   // ((r >> 8) + 1) * 2^-24, in (0, 1]
  return fmul((float)(int32_t)((r >> 8) + 1u), TWO_M24);
}
FASTDIFF_HD inline float uniform_open1(uint32_t r) {   // (r >> 8) * 2^-24, in [0, 1)
  return fmul((float)(int32_t)(r >> 8), TWO_M24);
}

// (ra, rb) -> (za, zb) = rad * (cos th, sin th), rad = sqrt(-2 log u1), th = 2 pi u2.
FASTDIFF_HD inline void box_muller(uint32_t ra, uint32_t rb, float& za, float& zb) {
  const float u1 = uniform_open0(ra);
  const float u2 = uniform_open1(rb);
  const float rad = fsqrt(fmul(-2.0f, log_pos(u1)));
  const float th = fmul(u2, TWO_PI_F32);
  float s, c;
  sincos_0_2pi(th, s, c);
  za = fmul(rad, c);
  zb = fmul(rad, s);
}

// The four normals of group g: element i of a tensor takes z_(i % 4) of group i / 4.
FASTDIFF_HD inline void philox_normal4(uint64_t g, uint64_t seed, uint32_t noise_id, float& z0,
                                       float& z1, float& z2, float& z3) {
  uint32_t r0, r1, r2, r3;
  philox_group(g, seed, noise_id, r0, r1, r2, r3);
  box_muller(r0, r1, z0, z1);
  box_muller(r2, r3, z2, z3);
}

// ---------------------------------------------------------------------------------------------
// The fused step of one element (fastdiff/program), in the reference's order of operations
// ---------------------------------------------------------------------------------------------

// CFG: D = u + g * (c - u)
FASTDIFF_HD inline float cfg_combine(float c, float u, float g) { return fadd(u, fmul(g, fsub(c, u))); }

// The fused step's D: g == 1 is D = c exactly (the same value as a run without the uncond pass).
FASTDIFF_HD inline float guided(float c, float u, float g) { return g == 1.0f ? c : cfg_combine(c, u, g); }

// The g of sample b with a per-sample scale s[b]: g0 + g1 * s[b].
FASTDIFF_HD inline float sample_g(float g0, float g1, float s) { return fadd(g0, fmul(g1, s)); }

// h = q_y * E + q_d * D (and hu = q_y * E + q_d * u)
FASTDIFF_HD inline float step_h(float qy, float e, float qd, float d) { return fadd(fmul(qy, e), fmul(qd, d)); }

// The first terms of an output: ((a_x x + a_y E) + a_h h) + a_hu hu; then out_add for the noise
// term and each history slot, in slot order.
FASTDIFF_HD inline float out_model(float ax, float x, float ay, float e, float ah, float h, float ahu, float hu) {
  return fadd(fadd(fadd(fmul(ax, x), fmul(ay, e)), fmul(ah, h)), fmul(ahu, hu));
}
FASTDIFF_HD inline float out_add(float o, float a, float v) { return fadd(o, fmul(a, v)); }

// The model input: s_in * new value (cast to the model dtype by the caller).
FASTDIFF_HD inline float model_input(float s_in, float v) { return fmul(s_in, v); }

// Coefficients of one output (x, y or the value of one history slot) of a row; hist points at K
// history coefficients.
struct OutCoefs {
  float x, y, h, hu, z;
  const float* hist;
};

// Coefficients of one row, rounded to float32 (read from the float64 table by the caller). The
// out blocks of the history slots the row writes (one per slot, layout::col_out_slot) are kept
// by each backend beside this, as many as it supports.
struct RowCoefs {
  float g, g0, g1, qy, qd, s_in;
  OutCoefs ox, oy;
  int K;
};

// One whole output for one element; H(j) returns history slot j of this element. has_z: the
// row has a noise tensor or Philox noise (else the z term is absent, as in the reference).
// h, hu: the model terms (hu = h without CFG; both 0 without a model call). A history term with
// a zero coefficient is absent (H(j) is not called: the slot is not read).
template <class HistAt>
FASTDIFF_HD inline float step_output(const OutCoefs& o, float x, float e, float h, float hu, bool has_z, float z,
                                     int K, HistAt H) {
  float v = out_model(o.x, x, o.y, e, o.h, h, o.hu, hu);
  if (has_z) v = out_add(v, o.z, z);
  for (int j = 0; j < K; ++j) {
    if (o.hist[j] != 0.0f) v = out_add(v, o.hist[j], H(j));
  }
  return v;
}

}  // namespace math
}  // namespace fastdiff
