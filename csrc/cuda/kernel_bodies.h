// What one thread of each elementwise CUDA kernel does, as FASTDIFF_HD functions: the __global__
// wrappers in fused_step.cu / cfg.cu / philox.cu call them on the GPU, and tools/emulate.cpp calls
// the very same code on the host (serially, grid by grid), which is how this code is tested on a
// machine without a GPU. The per-element math is ../step_math.h, shared with the CPU backend.
//
// A thread owns one group of 4 consecutive logical elements (4t .. 4t+3): one Philox call gives
// its 4 normals, and where the plan allows (layout.h: Plan::vec) every operand is read and
// written as one 4-vector (16 bytes of float32, 8 of float16/bfloat16).
//
// Every value a thread writes depends only on the same element's inputs, and a thread reads all
// of its inputs before its first store, so in-place updates (x, y, any set of history slots) are safe.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "../step_math.h"
#include "launch.h"
#include "layout.h"

namespace fastdiff {
namespace cuda {

namespace m = fastdiff::math;

// ---------------------------------------------------------------------------------------------
// Loads and stores: any model dtype in memory, float32 in registers. Conversions round to
// nearest even (torch's Tensor.to); explicit intrinsics, as torch's no-implicit-half flags require.
// ---------------------------------------------------------------------------------------------
FASTDIFF_HD inline float load1(const void* p, int64_t off, fastdiff_dtype dt) {
  switch (dt) {
    case FASTDIFF_FLOAT16: return __half2float(static_cast<const __half*>(p)[off]);
    case FASTDIFF_BFLOAT16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[off]);
    case FASTDIFF_FLOAT64: return (float)static_cast<const double*>(p)[off];
    default: return static_cast<const float*>(p)[off];
  }
}

FASTDIFF_HD inline void store1(void* p, int64_t off, fastdiff_dtype dt, float v) {
  switch (dt) {
    case FASTDIFF_FLOAT16: static_cast<__half*>(p)[off] = __float2half_rn(v); break;
    case FASTDIFF_BFLOAT16: static_cast<__nv_bfloat16*>(p)[off] = __float2bfloat16_rn(v); break;
    case FASTDIFF_FLOAT64: static_cast<double*>(p)[off] = (double)v; break;
    default: static_cast<float*>(p)[off] = v; break;
  }
}

// 4-vectors (plans with a float64 operand never take the vector path: layout.h). Reading is split
// into fetch4 (the load only, raw words) and decode4 (the conversion), so that a thread issues all
// its loads before the first conversion has to wait for one: memory-level parallelism despite the
// run-time dtype switch around each load.
struct Raw4 {
  uint32_t w[4];   // 4 float32, or 4 halves packed in w[0], w[1]
};

FASTDIFF_HD inline Raw4 fetch4(const void* p, int64_t off, fastdiff_dtype dt) {
  Raw4 r;
  if (dt == FASTDIFF_FLOAT32) {
    const uint4 v = *reinterpret_cast<const uint4*>(static_cast<const float*>(p) + off);
    r.w[0] = v.x; r.w[1] = v.y; r.w[2] = v.z; r.w[3] = v.w;
  } else {   // float16 / bfloat16: 8 bytes
    const uint2 v = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p) + off);
    r.w[0] = v.x; r.w[1] = v.y; r.w[2] = 0u; r.w[3] = 0u;
  }
  return r;
}

FASTDIFF_HD inline float half_bits_to_float(uint32_t bits16, fastdiff_dtype dt) {
  if (dt == FASTDIFF_BFLOAT16) return m::as_f32(bits16 << 16);   // bfloat16 is float32's high half: exact
  return __half2float(__ushort_as_half((unsigned short)bits16));
}

FASTDIFF_HD inline void decode4(const Raw4& r, fastdiff_dtype dt, float v[4]) {
  if (dt == FASTDIFF_FLOAT32) {
    for (int e = 0; e < 4; ++e) v[e] = m::as_f32(r.w[e]);
    return;
  }
  for (int e = 0; e < 4; ++e) v[e] = half_bits_to_float((r.w[e >> 1] >> (16 * (e & 1))) & 0xffffu, dt);
}

FASTDIFF_HD inline void store4(void* p, int64_t off, fastdiff_dtype dt, const float v[4]) {
  switch (dt) {
    case FASTDIFF_FLOAT16: {
      const __half2 a = __floats2half2_rn(v[0], v[1]), b = __floats2half2_rn(v[2], v[3]);
      uint2 w;
      memcpy(&w.x, &a, 4);
      memcpy(&w.y, &b, 4);
      *reinterpret_cast<uint2*>(static_cast<__half*>(p) + off) = w;
      break;
    }
    case FASTDIFF_BFLOAT16: {
      const __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]), b = __floats2bfloat162_rn(v[2], v[3]);
      uint2 w;
      memcpy(&w.x, &a, 4);
      memcpy(&w.y, &b, 4);
      *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(p) + off) = w;
      break;
    }
    default:
      *reinterpret_cast<float4*>(static_cast<float*>(p) + off) = make_float4(v[0], v[1], v[2], v[3]);
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// The group of a thread and where its elements live
// ---------------------------------------------------------------------------------------------
struct Group {
  int64_t t;        // group index: elements 4t .. 4t + n - 1; also the Philox counter
  int n;            // valid elements (< 4 only in the last group)
  int64_t b, m;     // sample and in-sample position of element 4t
  bool dense;       // offset of element i = i in every operand
  bool one_row;     // the n elements are adjacent in sample b
  int64_t M;

  // Offset of element e of the group in an operand with this batch stride.
  FASTDIFF_HD int64_t at(int64_t batch_stride, int e) const {
    if (dense) return kGroup * t + e;
    if (one_row) return b * batch_stride + m + e;
    return row_offset(kGroup * t + e, M, batch_stride);   // straddles samples (M % 4 != 0)
  }
  FASTDIFF_HD int64_t sample(int e) const { return one_row ? b : (kGroup * t + e) / M; }
};

FASTDIFF_HD inline Group make_group(const Plan& p, int64_t t) {
  Group g;
  g.t = t;
  const int64_t i = kGroup * t;
  const int64_t left = p.numel - i;
  g.n = left < kGroup ? (int)left : kGroup;
  g.M = p.M;
  g.dense = p.dense;
  // 32-bit division when it suffices (64-bit division is a long instruction sequence on a GPU)
  g.b = (i <= 0xffffffffll && p.M <= 0xffffffffll) ? (int64_t)((uint32_t)i / (uint32_t)p.M) : i / p.M;
  g.m = i - g.b * p.M;
  g.one_row = g.m + g.n <= p.M;
  return g;
}

// The group's values of one operand in two phases (see fetch4): fetch() issues the load(s),
// decode() converts to float32; elements past n read as 0. The scalar path (unaligned or
// sample-straddling groups) converts as it loads.
struct Fetched {
  Raw4 raw;
  fastdiff_dtype dtype;
  bool vector;
};

template <bool VEC>
FASTDIFF_HD inline Fetched fetch(const Group& g, const fastdiff_rows& r) {
  Fetched f;
  f.dtype = r.dtype;
  f.vector = VEC && g.n == kGroup;
  if (f.vector) {
    f.raw = fetch4(r.data, g.at(r.batch_stride, 0), r.dtype);
  } else {
    for (int e = 0; e < kGroup; ++e) f.raw.w[e] = m::as_u32(e < g.n ? load1(r.data, g.at(r.batch_stride, e), r.dtype) : 0.0f);
  }
  return f;
}

FASTDIFF_HD inline void decode(const Fetched& f, float v[4]) {
  if (f.vector) {
    decode4(f.raw, f.dtype, v);
  } else {
    for (int e = 0; e < kGroup; ++e) v[e] = m::as_f32(f.raw.w[e]);
  }
}

template <bool VEC>
FASTDIFF_HD inline void gather(const Group& g, const fastdiff_rows& r, float v[4]) {
  decode(fetch<VEC>(g, r), v);
}

template <bool VEC>
FASTDIFF_HD inline void scatter(const Group& g, const fastdiff_rows& r, const float v[4]) {
  if (VEC && g.n == kGroup) {
    store4(r.data, g.at(r.batch_stride, 0), r.dtype, v);
    return;
  }
  for (int e = 0; e < kGroup; ++e)
    if (e < g.n) store1(r.data, g.at(r.batch_stride, e), r.dtype, v[e]);
}

// The same rows, `elems` elements further on (a history slot, the second CFG half).
FASTDIFF_HD inline fastdiff_rows advanced(const fastdiff_rows& r, int64_t elems) {
  fastdiff_rows o = r;
  o.data = static_cast<char*>(r.data) + elems * dtype_size(r.dtype);
  return o;
}

// ---------------------------------------------------------------------------------------------
// CFG: D = u + g (c - u), float32 (float64 for float64 model outputs, as the reference computes
// the combine in the inputs' precision, then rounds D to float32). Rounded operations, never
// contracted into FMA (the build passes --fmad=false as well).
// ---------------------------------------------------------------------------------------------
#if defined(__CUDA_ARCH__)
FASTDIFF_HD inline float fdiv(float a, float b) { return __fdiv_rn(a, b); }
FASTDIFF_HD inline double dmul(double a, double b) { return __dmul_rn(a, b); }
FASTDIFF_HD inline double dadd(double a, double b) { return __dadd_rn(a, b); }
FASTDIFF_HD inline double dsub(double a, double b) { return __dsub_rn(a, b); }
#else
inline float fdiv(float a, float b) { return a / b; }
inline double dmul(double a, double b) { return a * b; }
inline double dadd(double a, double b) { return a + b; }
inline double dsub(double a, double b) { return a - b; }
#endif

// D of the group: from fetched float32/16/bf16 model outputs (u: the fetched uncond if has_u)...
FASTDIFF_HD inline void combine(const Fetched& c, bool has_u, const Fetched& u, float g, float D[4]) {
  decode(c, D);
  if (!has_u) return;
  float U[4];
  decode(u, U);
  for (int e = 0; e < kGroup; ++e) D[e] = m::cfg_combine(D[e], U[e], g);
}

// ... or from float64 ones, combined in float64 with g64 (scalar loads).
FASTDIFF_HD inline void combine_f64(const Group& g, const fastdiff_rows& cond, const fastdiff_rows& uncond, double g64,
                                    float D[4]) {
  const double* c = static_cast<const double*>(cond.data);
  const double* u = static_cast<const double*>(uncond.data);
  for (int e = 0; e < kGroup; ++e) {
    if (e >= g.n) {
      D[e] = 0.0f;
      continue;
    }
    const double ce = c[g.at(cond.batch_stride, e)];
    if (u == nullptr) {
      D[e] = (float)ce;
    } else {
      const double ue = u[g.at(uncond.batch_stride, e)];
      D[e] = (float)dadd(ue, dmul(g64, dsub(ce, ue)));
    }
  }
}

// The fused step's CFG terms of the group: c, u (= c without uncond) and D = u + g_e (c - u),
// g_e the g of element e's sample (g == 1: D = c). float64 outputs combine in float64 (scalar
// loads), as the reference.
FASTDIFF_HD inline void model_terms(const Group& g, const fastdiff_rows& cond, const fastdiff_rows& uncond, bool f64,
                                    const Fetched& fc, const Fetched& fu, const float G[4], float C[4], float U[4],
                                    float D[4]) {
  const bool has_u = uncond.data != nullptr;
  if (f64) {
    const double* c = static_cast<const double*>(cond.data);
    const double* u = static_cast<const double*>(uncond.data);
    for (int e = 0; e < kGroup; ++e) {
      if (e >= g.n) {
        C[e] = U[e] = D[e] = 0.0f;
        continue;
      }
      const double ce = c[g.at(cond.batch_stride, e)];
      C[e] = (float)ce;
      if (!has_u) {
        U[e] = D[e] = C[e];
        continue;
      }
      const double ue = u[g.at(uncond.batch_stride, e)];
      U[e] = (float)ue;
      D[e] = G[e] == 1.0f ? C[e] : (float)dadd(ue, dmul((double)G[e], dsub(ce, ue)));
    }
    return;
  }
  decode(fc, C);
  if (!has_u) {
    for (int e = 0; e < kGroup; ++e) U[e] = D[e] = C[e];
    return;
  }
  decode(fu, U);
  for (int e = 0; e < kGroup; ++e) D[e] = m::guided(C[e], U[e], G[e]);
}

// ---------------------------------------------------------------------------------------------
// The fused step (fastdiff/program; reference: fastdiff.ops.reference.fused_step)
// ---------------------------------------------------------------------------------------------

// coefs[c] = float(table[row, c]) for c in [first, width), every `step`-th (a block's threads).
FASTDIFF_HD inline void load_row_coefs(const fastdiff_step_args& a, float* coefs, int first, int step) {
  const int width = columns(a.num_slots).width;
  const double* r = a.table + a.row * a.table_row_stride;
  for (int c = first; c < width; c += step) coefs[c] = (float)r[c * a.table_col_stride];
}

// The per-sample scale s[b] (float32 or float64), rounded to float32 as the reference rounds it.
FASTDIFF_HD inline float guidance_at(const fastdiff_step_args& a, int64_t b) {
  return a.guidance_dtype == FASTDIFF_FLOAT64 ? (float)static_cast<const double*>(a.guidance)[b]
                                              : static_cast<const float*>(a.guidance)[b];
}

FASTDIFF_HD inline fastdiff_rows hist_slot(const fastdiff_step_args& a, int j) {
  return advanced(a.hist, (int64_t)j * a.hist_slot_stride);
}

// Does an output the row computes read history slot j? An output reads the slots whose
// coefficient (rounded to float32) is non-zero; the outputs are the x-out block if the row writes
// x, the y-out block if it writes y, and the block of every slot it writes. The same answer in
// every thread (one row), so the branches on it do not diverge.
FASTDIFF_HD inline bool slot_is_read(const float* coefs, const Columns& col, int K, const StepPlan& p, int64_t writes,
                                     int j) {
  using namespace layout;
  if (p.write_x && coefs[col.out_x + OUT_FIXED + j] != 0.0f) return true;
  if (p.write_y && coefs[col.out_y + OUT_FIXED + j] != 0.0f) return true;
  for (int w = 0; w < K; ++w)
    if ((writes >> w & 1) && coefs[col_out_slot(K, w) + OUT_FIXED + j] != 0.0f) return true;
  return false;
}

// The element terms of one output, in m::step_output's order (the model terms, then the noise);
// the history terms are added after, slot by slot.
FASTDIFF_HD inline void output_base(const float* o, bool has_z, const float X[4], const float E[4], const float Hm[4],
                                    const float HU[4], const float Z[4], float v[4]) {
  using namespace layout;
  for (int e = 0; e < kGroup; ++e) {
    v[e] = m::out_model(o[OUT_X], X[e], o[OUT_Y], E[e], o[OUT_H], Hm[e], o[OUT_HU], HU[e]);
    if (has_z) v[e] = m::out_add(v[e], o[OUT_Z], Z[e]);
  }
}

// One group of the step; KT = K fixed at compile time (history values in registers; at most
// kRegisterWrites slots written), or -1 (any K and any mask, slots read inside the slot loop). coefs: the row, rounded to float32; pending: the block's pending
// area (step_shared_floats beyond the row; used by KT = -1 only). Returns 1 if the row checks for
// non-finite values and a written x/y value of the group is NaN or infinite.
template <int KT, bool VEC>
FASTDIFF_HD inline uint32_t step_group(const fastdiff_step_args& a, const StepPlan& p, const float* coefs,
                                       float* pending, int64_t t) {
  const Group g = make_group(p.geo, t);
  const int K = KT >= 0 ? KT : a.num_slots;
  // The row's coefficients are read from shared memory where they are used (no copy in registers).
  using namespace layout;
  const Columns col = columns(K);
  const float* ox = coefs + col.out_x;
  const float* oy = coefs + col.out_y;
  const int64_t writes = a.hist_writes;

  // Phase 1: every load of the group (fetch), phase 2: conversions and math. A slot no output
  // reads (every coefficient of it zero) is not loaded: it may hold anything.
  const bool model = a.cond.data != nullptr, model_f64 = model && a.cond.dtype == FASTDIFF_FLOAT64;
  const bool cfg = a.uncond.data != nullptr;
  const Fetched fx = fetch<VEC>(g, a.x);
  const Fetched fy = p.eval_y ? fetch<VEC>(g, a.y) : Fetched{};
  const Fetched fc = model && !model_f64 ? fetch<VEC>(g, a.cond) : Fetched{};
  const Fetched fu = cfg && !model_f64 ? fetch<VEC>(g, a.uncond) : Fetched{};
  const Fetched fz = a.noise.data != nullptr ? fetch<VEC>(g, a.noise) : Fetched{};
  constexpr int KH = KT > 0 ? KT : 1;
  Fetched fh[KH];
  for (int j = 0; j < KT; ++j)
    fh[j] = slot_is_read(coefs, col, K, p, writes, j) ? fetch<VEC>(g, hist_slot(a, j)) : Fetched{};

  float X[4], E[4], Hm[4], HU[4], Z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  decode(fx, X);
  if (p.eval_y) decode(fy, E);
  else for (int e = 0; e < kGroup; ++e) E[e] = X[e];

  if (model) {
    // g per element: the row's g, or g0 + g1 * s[b] with a per-sample scale vector (one load
    // when the group lies in one sample)
    float G[4];
    if (a.guidance == nullptr) {
      for (int e = 0; e < kGroup; ++e) G[e] = coefs[col.g];
    } else if (g.one_row) {
      const float gb = m::sample_g(coefs[col.g0], coefs[col.g1], guidance_at(a, g.b));
      for (int e = 0; e < kGroup; ++e) G[e] = gb;
    } else {
      for (int e = 0; e < kGroup; ++e)
        G[e] = m::sample_g(coefs[col.g0], coefs[col.g1], e < g.n ? guidance_at(a, g.sample(e)) : 0.0f);
    }
    float C[4], U[4], D[4];
    model_terms(g, a.cond, a.uncond, model_f64, fc, fu, G, C, U, D);
    for (int e = 0; e < kGroup; ++e) {
      Hm[e] = m::step_h(coefs[col.qy], E[e], coefs[col.qd], D[e]);
      HU[e] = cfg ? m::step_h(coefs[col.qy], E[e], coefs[col.qd], U[e]) : Hm[e];
    }
  } else {
    for (int e = 0; e < kGroup; ++e) Hm[e] = HU[e] = 0.0f;
  }

  if (a.noise.data != nullptr) decode(fz, Z);
  else if (p.philox) m::philox_normal4((uint64_t)t, a.seed, (uint32_t)a.noise_id, Z[0], Z[1], Z[2], Z[3]);

  // Outputs in m::step_output's order: the element terms, then the slots in order, a slot whose
  // coefficient is zero being absent (not 0 * H: NaN for a NaN slot, +0 for a -0 sum).
  float NX[4] = {0.0f, 0.0f, 0.0f, 0.0f}, NY[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if constexpr (KT >= 0) {
    // The slots are in registers (fetched above); as in the any-K loop below, the element terms of
    // every output first (then X, E, h, hu, z are dead), then the slot loop outside the element
    // loop, so one slot's 4 values are live at a time. At most kRegisterWrites written slots
    // (p.reg_slot; the host runs a row writing more through the any-K loop).
    const int wa = KT >= 1 ? p.reg_slot[0] : -1, wb = KT >= 2 ? p.reg_slot[1] : -1;   // (K < 2: fewer to keep)
    static_assert(kRegisterWrites == 2, "one accumulator per register-resident written slot below");
    const float* oa = wa >= 0 ? coefs + col_out_slot(K, wa) : ox;   // (a block inside the row either way)
    const float* ob = wb >= 0 ? coefs + col_out_slot(K, wb) : ox;
    // Outputs the row does not write are formed too (no branches; their values are not used): a
    // slot not fetched decodes as zeros and only such outputs can have a non-zero coefficient of it.
    float NA[4], NB[4];
    output_base(ox, p.has_z, X, E, Hm, HU, Z, NX);
    output_base(oy, p.has_z, X, E, Hm, HU, Z, NY);
    output_base(oa, p.has_z, X, E, Hm, HU, Z, NA);
    output_base(ob, p.has_z, X, E, Hm, HU, Z, NB);
    for (int j = 0; j < KT; ++j) {
      float Hj[4];
      decode(fh[j], Hj);
      const float cx = ox[OUT_FIXED + j], cy = oy[OUT_FIXED + j], ca = oa[OUT_FIXED + j], cb = ob[OUT_FIXED + j];
      for (int e = 0; e < kGroup; ++e) {   // a zero coefficient: the term is absent
        if (cx != 0.0f) NX[e] = m::out_add(NX[e], cx, Hj[e]);
        if (cy != 0.0f) NY[e] = m::out_add(NY[e], cy, Hj[e]);
        if (ca != 0.0f) NA[e] = m::out_add(NA[e], ca, Hj[e]);
        if (cb != 0.0f) NB[e] = m::out_add(NB[e], cb, Hj[e]);
      }
    }
    if (wa >= 0) scatter<VEC>(g, hist_slot(a, wa), NA);   // every read of the group is done
    if (wb >= 0) scatter<VEC>(g, hist_slot(a, wb), NB);
  } else {
    // Any K: each slot is loaded once, inside the slot loop, and added to every output that reads
    // it; the written slots' values wait in the block's pending area ([slot][element][thread],
    // shared memory) until the last read, then are stored.
    const int tid = (int)(t & (kThreads - 1));
    auto pend = [&](int n, int e) -> float& { return pending[(n * kGroup + e) * kThreads + tid]; };
    if (p.write_x) output_base(ox, p.has_z, X, E, Hm, HU, Z, NX);
    if (p.write_y) output_base(oy, p.has_z, X, E, Hm, HU, Z, NY);
    for (int w = 0, n = 0; w < K; ++w) {
      if (!(writes >> w & 1)) continue;
      float NW[4];
      output_base(coefs + col_out_slot(K, w), p.has_z, X, E, Hm, HU, Z, NW);
      for (int e = 0; e < kGroup; ++e) pend(n, e) = NW[e];
      ++n;
    }
    for (int j = 0; j < K; ++j) {
      if (!slot_is_read(coefs, col, K, p, writes, j)) continue;
      float Hj[4];
      gather<VEC>(g, hist_slot(a, j), Hj);
      const float cx = ox[OUT_FIXED + j], cy = oy[OUT_FIXED + j];
      if (p.write_x && cx != 0.0f)
        for (int e = 0; e < kGroup; ++e) NX[e] = m::out_add(NX[e], cx, Hj[e]);
      if (p.write_y && cy != 0.0f)
        for (int e = 0; e < kGroup; ++e) NY[e] = m::out_add(NY[e], cy, Hj[e]);
      for (int w = 0, n = 0; w < K; ++w) {
        if (!(writes >> w & 1)) continue;
        const float c = coefs[col_out_slot(K, w) + OUT_FIXED + j];
        if (c != 0.0f)
          for (int e = 0; e < kGroup; ++e) pend(n, e) = m::out_add(pend(n, e), c, Hj[e]);
        ++n;
      }
    }
    for (int w = 0, n = 0; w < K; ++w) {   // every read of the group is done
      if (!(writes >> w & 1)) continue;
      float NW[4];
      for (int e = 0; e < kGroup; ++e) NW[e] = pend(n, e);
      scatter<VEC>(g, hist_slot(a, w), NW);
      ++n;
    }
  }
  uint32_t bad = 0;
  for (int e = 0; e < kGroup; ++e) {
    const uint32_t valid = e < g.n;
    if (p.write_x) bad |= valid & m::nonfinite(NX[e]);
    if (p.write_y) bad |= valid & m::nonfinite(NY[e]);
  }

  // Stores of x, y and the model input (the written slots are stored above, after every read).
  if (p.write_x) scatter<VEC>(g, a.x, NX);
  if (p.write_y) scatter<VEC>(g, a.y, NY);
  if (a.model_in.data != nullptr) {
    float MI[4];
    for (int e = 0; e < kGroup; ++e) MI[e] = m::model_input(coefs[col.s_in], p.mi_from_y ? NY[e] : NX[e]);
    for (int half = 0; half < a.model_in_halves; ++half)
      scatter<VEC>(g, advanced(a.model_in, half * a.model_in_half_stride), MI);
  }
  return p.check ? bad : 0u;
}

// Calls f(std::integral_constant<int, KT>, std::integral_constant<bool, VEC>) for the compiled
// variant the plan chose (StepPlan::variant: K, or -1 for the any-K loop) and its vector flag.
template <int KT, class F>
inline void with_vec(bool vec, F&& f) {
  if (vec) f(std::integral_constant<int, KT>{}, std::true_type{});
  else f(std::integral_constant<int, KT>{}, std::false_type{});
}

template <class F>
inline void with_step_variant(const StepPlan& p, F&& f) {
  static_assert(kMaxFixedSlots == 4, "list every fixed K below");
  const bool vec = p.geo.vec;
  switch (p.variant) {
    case 0: with_vec<0>(vec, f); break;
    case 1: with_vec<1>(vec, f); break;
    case 2: with_vec<2>(vec, f); break;
    case 3: with_vec<3>(vec, f); break;
    case 4: with_vec<4>(vec, f); break;
    default: with_vec<-1>(vec, f); break;
  }
}

// ---------------------------------------------------------------------------------------------
// CFG combine (and cfg_rescale's final scaling): out = D [* factor[sample]]
// ---------------------------------------------------------------------------------------------
template <bool VEC>
FASTDIFF_HD inline void cfg_group(const fastdiff_cfg_args& a, const Plan& p, const float* factor, int64_t t) {
  const Group g = make_group(p, t);
  const fastdiff_rows out{a.out, a.sample_size, a.out_dtype};
  if (a.cond.dtype == FASTDIFF_FLOAT64 && a.out_dtype == FASTDIFF_FLOAT64) {   // float64 end to end
    const double* c = static_cast<const double*>(a.cond.data);
    const double* u = static_cast<const double*>(a.uncond.data);
    double* o = static_cast<double*>(a.out);
    for (int e = 0; e < kGroup; ++e) {
      if (e >= g.n) break;
      const double ce = c[g.at(a.cond.batch_stride, e)];
      o[g.at(out.batch_stride, e)] =
          u == nullptr ? ce : dadd(u[g.at(a.uncond.batch_stride, e)], dmul(a.g, dsub(ce, u[g.at(a.uncond.batch_stride, e)])));
    }
    return;
  }
  float D[4];
  if (a.cond.dtype == FASTDIFF_FLOAT64) {
    combine_f64(g, a.cond, a.uncond, a.g, D);
  } else {
    const Fetched fc = fetch<VEC>(g, a.cond);
    const Fetched fu = a.uncond.data != nullptr ? fetch<VEC>(g, a.uncond) : Fetched{};
    combine(fc, a.uncond.data != nullptr, fu, (float)a.g, D);
  }
  if (factor != nullptr)
    for (int e = 0; e < kGroup; ++e) D[e] = m::fmul(D[e], e < g.n ? factor[g.sample(e)] : 0.0f);
  scatter<VEC>(g, out, D);
}

// ---------------------------------------------------------------------------------------------
// cfg_rescale's statistics: (count, mean, sum of squared deviations), merged pairwise
// (Chan, Golub & LeVeque 1979) in float64 so a large mean does not cancel the variance away
// ---------------------------------------------------------------------------------------------
struct Moments {
  double n, mean, m2;
};

FASTDIFF_HD inline Moments merge(const Moments& a, const Moments& b) {
  const double n = a.n + b.n;
  if (n == 0.0) return a;
  const double delta = b.mean - a.mean;
  return Moments{n, a.mean + delta * (b.n / n), a.m2 + b.m2 + delta * delta * (a.n * b.n / n)};
}

// phi * std(cond) / std(D) + (1 - phi) in float32, as the reference: the stds (Bessel-corrected,
// as torch.std) rounded to float32, ratio 1 where std(D) is not > 0 (0, or NaN for one element).
FASTDIFF_HD inline float rescale_factor(const Moments& c, const Moments& d, double phi) {
  const float std_c = (float)sqrt(c.m2 / (c.n - 1.0));
  const float std_d = (float)sqrt(d.m2 / (d.n - 1.0));
  const float ratio = std_d > 0.0f ? fdiv(std_c, std_d) : 1.0f;
  return m::fadd(m::fmul((float)phi, ratio), (float)(1.0 - phi));
}

// ---------------------------------------------------------------------------------------------
// Philox noise
// ---------------------------------------------------------------------------------------------
FASTDIFF_HD inline void philox_normal_group(float* out, int64_t numel, uint64_t seed, uint32_t noise_id, int64_t t) {
  float z[4];
  m::philox_normal4((uint64_t)t, seed, noise_id, z[0], z[1], z[2], z[3]);
  const int64_t i = kGroup * t;
  if (i + kGroup <= numel) {   // out is a fresh contiguous tensor: 16-byte aligned groups
    *reinterpret_cast<float4*>(out + i) = make_float4(z[0], z[1], z[2], z[3]);
  } else {
    for (int e = 0; e < kGroup; ++e)
      if (i + e < numel) out[i + e] = z[e];
  }
}

FASTDIFF_HD inline void philox_uint32_group(int64_t* out, uint64_t seed, uint32_t noise_id, uint64_t first_group,
                                            int64_t t) {
  uint32_t r[4];
  m::philox_group(first_group + (uint64_t)t, seed, noise_id, r[0], r[1], r[2], r[3]);
  for (int w = 0; w < 4; ++w) out[kGroup * t + w] = (int64_t)r[w];
}

}  // namespace cuda
}  // namespace fastdiff
