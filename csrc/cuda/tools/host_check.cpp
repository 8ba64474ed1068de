// Host-side unit test of the CUDA kernels' shared code, against known values: Philox-4x32-10's
// published test vectors, [B, M] addressing and launch plans, argument checks, dtype conversions,
// the moment merge and the rescale factor, and one hand-computed step. Built and run with g++ by
// tests/test_cuda_compile.py; prints every failure and exits 1 if there was one.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "../kernel_bodies.h"

using namespace fastdiff::cuda;
using namespace fastdiff::layout;  // the table's columns (csrc/program_layout.h; tests/test_row_abi.py diffs them)
namespace fm = fastdiff::math;

static int failures = 0;
#define CHECK(cond)                                                    \
  do {                                                                 \
    if (!(cond)) {                                                     \
      ++failures;                                                      \
      fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
    }                                                                  \
  } while (0)

static uint16_t bits16(const void* p) { uint16_t u; memcpy(&u, p, 2); return u; }

static void philox_known_answers() {
  // Random123's kat_vectors for philox4x32_10: (counter, key) -> output.
  const uint32_t kat[3][10] = {
      {0, 0, 0, 0, 0, 0, 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u},
      {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu,
       0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu},
      {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u,
       0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}};
  for (const auto& v : kat) {
    uint32_t c0 = v[0], c1 = v[1], c2 = v[2], c3 = v[3];
    fm::philox4x32_10(c0, c1, c2, c3, v[4], v[5]);
    CHECK(c0 == v[6] && c1 == v[7] && c2 == v[8] && c3 == v[9]);
  }
  // The kernels' word layout: group 1 of (seed 0, noise_id 0) is counter (1, 0, 0, 0).
  int64_t words[8];
  for (int t = 0; t < 2; ++t) philox_uint32_group(words, 0, 0, 0, t);
  uint32_t c0 = 1, c1 = 0, c2 = 0, c3 = 0;
  fm::philox4x32_10(c0, c1, c2, c3, 0, 0);
  CHECK(words[4] == c0 && words[5] == c1 && words[6] == c2 && words[7] == c3);
  // A partial last group writes only numel elements.
  float z[8] = {7, 7, 7, 7, 7, 7, 7, 7};
  philox_normal_group(z, 6, 5, 3, 1);
  CHECK(z[4] != 7.0f && z[5] != 7.0f && z[6] == 7.0f && z[7] == 7.0f);
}

static fastdiff_rows rows(void* p, int64_t sb, fastdiff_dtype dt = FASTDIFF_FLOAT32) { return fastdiff_rows{p, sb, dt}; }

static void addressing_and_plans() {
  CHECK(row_offset(13, 5, 8) == 2 * 8 + 3);
  CHECK(row_offset(4, 5, 8) == 4);
  // Kernel variants: K fixed with at most 2 slots written, else the any-K loop, whose shared memory
  // (the row, then 128 threads x 4 values per written slot) fits 48 KB up to K = 16, every slot written.
  CHECK(written_slots(0) == 0 && written_slots(0b1011) == 3);
  CHECK(step_variant(0, 0) == 0 && step_variant(4, 0b1001) == 4 && step_variant(3, 0b111) == -1);
  CHECK(step_variant(5, 0) == -1 && pending_floats(5, 0) == 0 && pending_floats(4, 0b11) == 0);
  CHECK(pending_floats(3, 0b111) == 3 * kGroup * kThreads);
  CHECK(step_shared_floats(kMaxSlots, (int64_t(1) << kMaxSlots) - 1) * 4 <= 48 * 1024);
  alignas(16) static float buf[4096];
  // Contiguous [2, 16]: dense, vectors.
  fastdiff_rows x = rows(buf, 16);
  Plan p = make_plan(2, 16, {&x}, {});
  CHECK(p.dense && p.vec && p.numel == 32 && p.groups == 8);
  // Batch slices of a bigger buffer (stride 24 per sample, M = 16): in place, vectors.
  fastdiff_rows s = rows(buf, 24);
  p = make_plan(2, 16, {&x, &s}, {});
  CHECK(!p.dense && p.vec);
  // Misaligned pointer, or a stride that breaks 4-alignment: scalar path.
  fastdiff_rows mis = rows(buf + 1, 16);
  CHECK(!make_plan(2, 16, {&x, &mis}, {}).vec);
  fastdiff_rows odd = rows(buf, 18);
  CHECK(!make_plan(2, 16, {&x, &odd}, {}).vec);
  CHECK(!make_plan(2, 16, {&x}, {6}).vec);     // e.g. a history slot stride of 6
  // float16 needs 8-byte alignment only.
  fastdiff_rows h = rows(buf + 2, 16, FASTDIFF_FLOAT16);
  CHECK(make_plan(2, 16, {&x, &h}, {}).vec);
  // M = 5 contiguous: dense, so every group is adjacent and aligned, vectors allowed.
  fastdiff_rows x5 = rows(buf, 5);
  p = make_plan(3, 5, {&x5}, {});
  CHECK(p.dense && p.vec && p.groups == 4);
  // M = 5 with a batch stride of 8: groups straddle samples, scalar path.
  fastdiff_rows s5 = rows(buf, 8);
  p = make_plan(3, 5, {&x5, &s5}, {});
  CHECK(!p.dense && !p.vec);
  const Group g = make_group(p, 1);   // elements 4..7: (b0, m4), (b1, m0..2)
  CHECK(g.n == 4 && g.b == 0 && g.m == 4 && !g.one_row);
  CHECK(g.at(8, 0) == 4 && g.at(8, 1) == 8 && g.at(8, 3) == 10 && g.sample(1) == 1);
  const Group last = make_group(p, 3);   // elements 12..14
  CHECK(last.n == 3 && last.b == 2 && last.m == 2 && last.one_row && last.at(8, 2) == 20);
  // One sample: the batch stride is irrelevant.
  fastdiff_rows any = rows(buf, 12345);
  CHECK(make_plan(1, 16, {&x, &any}, {}).dense);
}

static fastdiff_step_args valid_args(double* table, float* x, float* y, float* hist, int32_t* flag) {
  fastdiff_step_args a;
  memset(&a, 0, sizeof a);
  a.table = table;
  a.table_rows = 2;
  a.table_cols = columns(1).width;
  a.table_row_stride = a.table_cols;
  a.table_col_stride = 1;
  a.row = 1;
  a.batch = 2;
  a.sample_size = 4;
  a.x = rows(x, 4);
  a.y = rows(y, 4);
  a.hist = rows(hist, 4);
  a.hist_slot_stride = 8;
  a.num_slots = 1;
  a.hist_writes = 1;
  a.flags = FLAG_WRITE_X;
  a.noise_id = -1;
  a.bad_row = flag;
  return a;
}

static void argument_checks() {
  double table[2 * table_width(1)] = {};
  float x[8] = {}, y[8] = {}, hist[8] = {};
  int32_t flag = 0;
  const fastdiff_step_args ok = valid_args(table, x, y, hist, &flag);
  CHECK(step_args_error(&ok) == nullptr);
  CHECK(step_args_error(nullptr) != nullptr);
  fastdiff_step_args a = ok;
  a.flags = 0;
  CHECK(step_args_error(&a) != nullptr);                 // writes nothing
  for (uint32_t unknown : {FLAG_ALL + 1, 1u << 31, ~0u}) {
    a = ok; a.flags |= unknown;
    CHECK(step_args_error(&a) != nullptr);               // a flag bit no FLAG_* names
  }
  a = ok; a.y.data = x;
  CHECK(step_args_error(&a) != nullptr);                 // y aliases x
  a = ok; a.table_cols = 13;
  CHECK(step_args_error(&a) != nullptr);                 // width does not match K
  a = ok; a.row = 2;
  CHECK(step_args_error(&a) != nullptr);                 // row outside the table
  for (int64_t mask : {int64_t(2), int64_t(3), int64_t(-1), int64_t(1) << 40}) {
    a = ok; a.hist_writes = mask;
    CHECK(step_args_error(&a) != nullptr);               // a slot outside [0, K), or negative
  }
  a = ok; a.hist_writes = 0;
  CHECK(step_args_error(&a) == nullptr);                 // no write
  a = ok; a.noise_id = int64_t(1) << 32;
  CHECK(step_args_error(&a) != nullptr);
  a = ok; a.noise.data = x; a.noise_id = int64_t(1) << 32;
  CHECK(step_args_error(&a) == nullptr);                 // noise given: noise_id unused
  a = ok; a.y.data = nullptr; a.flags |= FLAG_EVAL_Y;
  CHECK(step_args_error(&a) != nullptr);                 // reads y, none given
  a = ok; a.model_in = rows(y, 4); a.model_in_halves = 1; a.flags |= FLAG_MODEL_IN_FROM_Y;
  CHECK(step_args_error(&a) != nullptr);                 // model_in from y, y not written
  a.model_in_halves = 3; a.flags &= ~FLAG_MODEL_IN_FROM_Y;
  CHECK(step_args_error(&a) != nullptr);
  a = ok; a.uncond = rows(y, 4);
  CHECK(step_args_error(&a) != nullptr);                 // uncond without cond
  a = ok; a.cond = rows(y, 4, (fastdiff_dtype)7);
  CHECK(step_args_error(&a) != nullptr);                 // unknown dtype
  a = ok; a.x.batch_stride = -4;
  CHECK(step_args_error(&a) != nullptr);
  a = ok; a.batch = int64_t(1) << 40; a.sample_size = int64_t(1) << 40;
  CHECK(step_args_error(&a) != nullptr);                 // B * M overflows

  fastdiff_cfg_args c;
  memset(&c, 0, sizeof c);
  c.batch = 2; c.sample_size = 4; c.cond = rows(x, 4); c.uncond = rows(y, 4); c.g = 2.0; c.out = hist;
  CHECK(cfg_args_error(&c) == nullptr);
  alignas(8) static unsigned char ws[4096];
  CHECK(rescale_args_error(&c, 0.7, ws, rescale_workspace_bytes(2, 4)) == nullptr);
  CHECK(rescale_args_error(&c, 0.7, ws, rescale_workspace_bytes(2, 4) - 1) != nullptr);
  CHECK(rescale_args_error(&c, 1.5, ws, sizeof ws) != nullptr);
  CHECK(rescale_args_error(&c, 0.0, nullptr, 0) == nullptr);   // phi = 0: no statistics needed
  c.uncond.dtype = FASTDIFF_FLOAT16;
  CHECK(cfg_args_error(&c) != nullptr);
}

static void conversions() {
  alignas(16) uint16_t h[4];
  // float16 round to nearest even: 1 + 2^-11 is a tie -> 1.0; 1 + 3 * 2^-11 -> 1 + 2^-9.
  store1(h, 0, FASTDIFF_FLOAT16, 1.0f + ldexpf(1.0f, -11));
  store1(h, 1, FASTDIFF_FLOAT16, 1.0f + 3.0f * ldexpf(1.0f, -11));
  CHECK(bits16(&h[0]) == 0x3c00 && bits16(&h[1]) == 0x3c02);
  // bfloat16: 1 + 2^-8 is a tie -> 1.0 (0x3f80); 1 + 3 * 2^-8 -> 0x3f82; 70000 overflows float16.
  store1(h, 2, FASTDIFF_BFLOAT16, 1.0f + ldexpf(1.0f, -8));
  store1(h, 3, FASTDIFF_BFLOAT16, 1.0f + 3.0f * ldexpf(1.0f, -8));
  CHECK(bits16(&h[2]) == 0x3f80 && bits16(&h[3]) == 0x3f82);
  store1(h, 0, FASTDIFF_FLOAT16, 70000.0f);
  CHECK(isinf(load1(h, 0, FASTDIFF_FLOAT16)));
  // 4-vectors (float32/16/bf16) round-trip like 4 scalars.
  const float v[4] = {0.1f, -2.5f, 3.0e-3f, 1234.5f};
  for (int dt = FASTDIFF_FLOAT32; dt <= FASTDIFF_BFLOAT16; ++dt) {
    alignas(16) unsigned char vec[16], one[16];
    float back[4];
    store4(vec, 0, (fastdiff_dtype)dt, v);
    for (int e = 0; e < 4; ++e) store1(one, e, (fastdiff_dtype)dt, v[e]);
    CHECK(memcmp(vec, one, 4 * dtype_size((fastdiff_dtype)dt)) == 0);
    decode4(fetch4(vec, 0, (fastdiff_dtype)dt), (fastdiff_dtype)dt, back);
    for (int e = 0; e < 4; ++e) CHECK(back[e] == load1(one, e, (fastdiff_dtype)dt));
  }
  // A float64 operand sends the plan to the scalar path.
  alignas(16) static double d64[16];
  fastdiff_rows r64{d64, 4, FASTDIFF_FLOAT64};
  CHECK(!make_plan(2, 4, {&r64}, {}).vec);
}

static void moments_and_factor() {
  // {1, 2} merged with {3, 4}: n 4, mean 2.5, M2 5 (variance 5/3).
  const Moments a{2, 1.5, 0.5}, b{2, 3.5, 0.5};
  const Moments m = merge(a, b);
  CHECK(m.n == 4 && m.mean == 2.5 && m.m2 == 5.0);
  const Moments e{0, 0, 0};
  const Moments me = merge(e, a);
  CHECK(me.n == 2 && me.mean == 1.5 && me.m2 == 0.5);
  // D = 2 * cond: std ratio 1/2; phi = 0.7 -> fl(fl(0.7) * 0.5) + fl(0.3).
  const Moments d = Moments{4, 5.0, 20.0};
  CHECK(rescale_factor(m, d, 0.7) == fm::fadd(fm::fmul(0.7f, 0.5f), 0.3f));
  // std(D) = 0 or one element (NaN std): ratio 1, factor fl(phi) + fl(1 - phi).
  CHECK(rescale_factor(m, Moments{4, 1.0, 0.0}, 0.7) == fm::fadd(0.7f, 0.3f));
  CHECK(rescale_factor(Moments{1, 1, 0}, Moments{1, 2, 0}, 0.25) == 1.0f);
}

static void one_step_by_hand() {
  // K = 1: D = 1 + 3 (2 - 1) = 4; h = 0.5 x + 0.25 D = 1.5; x' = 2 x + h + 0.5 H0 = 5.5;
  // model_in = s_in x' = 11 in float16; H0 <- h (the h-out block: 1 * h).
  constexpr int W = table_width(1);
  double table[2 * W] = {};
  double* r = table + W;
  const Columns col = columns(1);
  r[col.g] = 3.0; r[col.qy] = 0.5; r[col.qd] = 0.25;
  r[col.out_x + OUT_X] = 2.0; r[col.out_x + OUT_H] = 1.0; r[col.out_x + OUT_FIXED] = 0.5;
  r[col.out_h + OUT_H] = 1.0;
  r[col.s_in] = 2.0;
  float x[5] = {1, 1, 1, 1, 1}, cond[5] = {2, 2, 2, 2, 2}, uncond[5] = {1, 1, 1, 1, 1}, hist[5] = {4, 4, 4, 4, 4};
  uint16_t mi[5] = {};
  int32_t flag = 0;
  fastdiff_step_args a = valid_args(table, x, nullptr, hist, &flag);
  a.batch = 1; a.sample_size = 5;
  a.x = rows(x, 5); a.y = fastdiff_rows{}; a.hist = rows(hist, 5);
  a.cond = rows(cond, 5); a.uncond = rows(uncond, 5);
  a.model_in = rows(mi, 5, FASTDIFF_FLOAT16); a.model_in_halves = 1;
  CHECK(step_args_error(&a) == nullptr);
  const StepPlan p = make_step_plan(a);
  float coefs[W];
  load_row_coefs(a, coefs, 0, 1);
  static float pending[kGroup * kThreads];   // the any-K loop's pending area for one written slot
  uint32_t bad = 0;
  for (int64_t t = 0; t < p.geo.groups; ++t) bad |= step_group<1, false>(a, p, coefs, nullptr, t);
  for (int i = 0; i < 5; ++i) CHECK(x[i] == 5.5f && hist[i] == 1.5f && bits16(&mi[i]) == 0x4980);   // 11.0 in float16
  CHECK(bad == 0);
  // An infinite history value makes x' infinite: flagged.
  hist[4] = INFINITY;
  bad = 0;
  for (int64_t t = 0; t < p.geo.groups; ++t) bad |= step_group<-1, false>(a, p, coefs, pending, t);
  CHECK(bad == 1);
}

int main() {
  philox_known_answers();
  addressing_and_plans();
  argument_checks();
  conversions();
  moments_and_factor();
  one_step_by_hand();
  if (failures) {
    fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  printf("host_check: all checks passed\n");
  return 0;
}
