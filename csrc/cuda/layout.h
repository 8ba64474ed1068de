// Host-side planning for the CUDA kernels, free of device code: [B, M] row addressing, argument
// checks, and the launch plan (may the kernel use 4-wide vector loads? are all operands dense?). Plain C++ (no nvcc needed), so
// tools/host_check.cpp tests it with g++; the kernels include it for the shared definitions.
#pragma once

#include <stdint.h>

#include <initializer_list>

#include "../program_layout.h"  // the table's columns (the row ABI)
#include "../step_math.h"       // FASTDIFF_HD
#include "launch.h"

namespace fastdiff {
namespace cuda {

constexpr int kThreads = 128;     // threads per block of the elementwise kernels
constexpr int kGroup = 4;         // elements per thread: one Philox group, one 4-wide vector
constexpr int kMaxFixedSlots = 4; // K = 0..4 compile with K fixed (registers); larger K loops
// Shared memory of a fused-step block: the row (layout::table_width(K) floats, quadratic in K: one
// out block per slot) and, for the any-K loop, the values of the slots the row writes while the
// slot loop still reads (kThreads * kGroup floats each). K <= 16 keeps the worst case (every slot
// written: 1.5 KB + 32 KB) within the default 48 KB.
constexpr int kMaxSlots = 16;
static_assert((kThreads & (kThreads - 1)) == 0, "a thread's index in its block is t & (kThreads - 1)");

// The coefficient table's columns: csrc/program_layout.h (fastdiff/program/layout.py).
using layout::Columns;
using layout::columns;

FASTDIFF_HD inline int dtype_size(fastdiff_dtype dt) {
  return dt == FASTDIFF_FLOAT64 ? 8 : dt == FASTDIFF_FLOAT32 ? 4 : 2;
}

inline bool valid_dtype(int dt) { return dt >= FASTDIFF_FLOAT32 && dt <= FASTDIFF_FLOAT64; }

// Offset (in elements) of logical element i of a tensor addressed as [B, M] rows.
FASTDIFF_HD inline int64_t row_offset(int64_t i, int64_t M, int64_t batch_stride) {
  const int64_t b = i / M;
  return b * batch_stride + (i - b * M);
}

// ---------------------------------------------------------------------------------------------
// Launch plan
// ---------------------------------------------------------------------------------------------
struct Plan {
  int64_t numel;   // B * M
  int64_t groups;  // ceil(numel / 4): one thread each
  int64_t M;
  bool dense;      // every operand has batch stride M (or B == 1): element i is at offset i
  bool vec;        // every full group is one aligned 4-vector in every operand
};

// The number of history slots a hist_writes mask names.
FASTDIFF_HD inline int written_slots(int64_t hist_writes) {
  int n = 0;
  for (; hist_writes > 0; hist_writes >>= 1) n += (int)(hist_writes & 1);
  return n;
}

// The kernel variant of a row: K itself (K fixed at compile time, the slots in registers) for
// K <= kMaxFixedSlots and at most kRegisterWrites written slots, else -1 (the any-K loop, whose
// written slot values wait in shared memory).
constexpr int kRegisterWrites = 2;   // written slots the fixed-K variants accumulate in registers
inline int step_variant(int K, int64_t hist_writes) {
  return K <= kMaxFixedSlots && written_slots(hist_writes) <= kRegisterWrites ? K : -1;
}

// Floats of one block's pending area (the any-K loop's written slot values, [slot][element][thread])
// and of its whole dynamic shared memory (the row's coefficients first).
inline int pending_floats(int K, int64_t hist_writes) {
  return step_variant(K, hist_writes) < 0 ? written_slots(hist_writes) * kGroup * kThreads : 0;
}
inline int step_shared_floats(int K, int64_t hist_writes) { return columns(K).width + pending_floats(K, hist_writes); }

struct StepPlan {
  int variant;     // step_variant(K, hist_writes)
  int reg_slot[kRegisterWrites];   // fixed-K variants: the written slots, ascending; -1 past the last
  Plan geo;
  bool philox;     // draw the noise in the kernel
  bool has_z;      // the outputs have a noise term (given or Philox), as in the reference
  bool check;      // raise bad_row
  // The row flags (args.flags), decoded once on the host
  bool eval_y;     // E is y, else x
  bool write_x;
  bool write_y;
  bool mi_from_y;  // model_in = s_in * new y, else s_in * new x
};

inline int64_t blocks_for(int64_t groups) { return (groups + kThreads - 1) / kThreads; }

// Bytes a 4-vector of dt is aligned to (float64 operands take the scalar path).
inline int vector_alignment(fastdiff_dtype dt) { return 4 * dtype_size(dt); }

// operands: the [B, M] tensors (absent ones are skipped); extra_strides: further element strides
// a thread adds to an operand's offset (history slots, the second CFG half of model_in).
inline Plan make_plan(int64_t B, int64_t M, std::initializer_list<const fastdiff_rows*> operands,
                      std::initializer_list<int64_t> extra_strides) {
  Plan p{};
  p.numel = B * M;
  p.groups = (p.numel + kGroup - 1) / kGroup;
  p.M = M;
  p.dense = true;
  for (const fastdiff_rows* r : operands)
    if (r->data != nullptr && B > 1 && r->batch_stride != M) p.dense = false;
  // A group of 4 logical elements is 4 adjacent elements of one sample if the tensors are dense
  // (offset = index) or M % 4 == 0 (groups never straddle samples); it is a vector if, besides,
  // every operand's first group is aligned and every stride keeps it so. float64 operands (test
  // and oracle use, not a GPU model's dtype) take the scalar path.
  p.vec = p.dense || M % kGroup == 0;
  for (const fastdiff_rows* r : operands) {
    if (r->data == nullptr) continue;
    if (r->dtype == FASTDIFF_FLOAT64) p.vec = false;
    if ((uintptr_t)r->data % (uintptr_t)vector_alignment(r->dtype) != 0) p.vec = false;
    if (!p.dense && B > 1 && r->batch_stride % kGroup != 0) p.vec = false;
  }
  for (int64_t s : extra_strides)
    if (s % kGroup != 0) p.vec = false;
  return p;
}

// ---------------------------------------------------------------------------------------------
// Argument checks (NULL: valid). The torch binding checks tensors with their names first; these
// guard the C API itself, so nothing out of bounds is ever launched.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kMaxElements = int64_t(1) << 62;

inline const char* rows_error(const fastdiff_rows& r) {
  if (r.data == nullptr) return nullptr;
  if (!valid_dtype((int)r.dtype)) return "a tensor has an unknown dtype (expected FASTDIFF_FLOAT32/16/BFLOAT16/64)";
  if (r.batch_stride < 0) return "a batch stride is negative";
  return nullptr;
}

inline const char* geometry_error(int64_t B, int64_t M) {
  if (B < 0 || M < 0) return "batch and sample_size must be non-negative";
  if (M > 0 && B > kMaxElements / M) return "batch * sample_size overflows";
  return nullptr;
}

inline const char* step_args_error(const fastdiff_step_args* a) {
  if (a == nullptr) return "args is NULL";
  if (const char* e = geometry_error(a->batch, a->sample_size)) return e;
  for (const fastdiff_rows* r : {&a->x, &a->y, &a->cond, &a->uncond, &a->noise, &a->hist, &a->model_in})
    if (const char* e = rows_error(*r)) return e;
  if (a->table == nullptr) return "table is NULL";
  if (a->table_row_stride < 0 || a->table_col_stride < 0) return "table strides must be non-negative";
  if (a->row < 0 || a->row >= a->table_rows) return "row is outside the table";
  if (a->row >= INT32_MAX) return "row + 1 does not fit the int32 bad_row flag";
  if (a->num_slots < 0 || a->num_slots > kMaxSlots) return "num_slots (K) must be in [0, 16]";
  if (a->table_cols != columns(a->num_slots).width) return "table_cols does not match num_slots (layout::table_width(K))";
  if (a->x.data == nullptr || a->x.dtype != FASTDIFF_FLOAT32) return "x must be a float32 tensor";
  if (a->flags & ~layout::FLAG_ALL)
    return "flags has unknown row flag bits (the row flags are layout::FLAG_EVAL_Y | FLAG_WRITE_X | "
           "FLAG_WRITE_Y | FLAG_MODEL_IN_FROM_Y)";
  const bool eval_y = a->flags & layout::FLAG_EVAL_Y, write_x = a->flags & layout::FLAG_WRITE_X,
             write_y = a->flags & layout::FLAG_WRITE_Y, mi_from_y = a->flags & layout::FLAG_MODEL_IN_FROM_Y;
  if (!write_x && !write_y) return "a row must write x or y";
  if ((eval_y || write_y || (a->model_in.data && mi_from_y)) && a->y.data == nullptr)
    return "this row reads or writes y, but y is absent";
  if (a->y.data != nullptr && (a->y.dtype != FASTDIFF_FLOAT32 || a->y.data == a->x.data))
    return "y must be a float32 tensor other than x";
  if (a->uncond.data != nullptr && (a->cond.data == nullptr || a->uncond.dtype != a->cond.dtype))
    return "uncond needs cond, with cond's dtype";
  if (a->noise.data == nullptr && a->noise_id >= (int64_t(1) << 32)) return "noise_id must be < 2**32";
  if (a->num_slots > 0 && (a->hist.data == nullptr || a->hist.dtype != FASTDIFF_FLOAT32 || a->hist_slot_stride < 0))
    return "K > 0 needs a float32 hist with a non-negative slot stride";
  if (!layout::hist_writes_valid(a->hist_writes, a->num_slots))
    return "hist_writes must be a bitmask of history slots in [0, K) (0: no write; 0 <= hist_writes < 2**K)";
  if (a->guidance != nullptr && a->guidance_dtype != FASTDIFF_FLOAT32 && a->guidance_dtype != FASTDIFF_FLOAT64)
    return "guidance (the per-sample scale vector) must be float32 or float64";
  if (a->model_in.data != nullptr) {
    if (a->model_in_halves != 1 && a->model_in_halves != 2) return "model_in_halves must be 1 or 2";
    if (a->model_in_half_stride < 0) return "model_in_half_stride must be non-negative";
    if (mi_from_y ? !write_y : !write_x) return "model_in is computed from an output the row does not write";
  }
  return nullptr;
}

inline StepPlan make_step_plan(const fastdiff_step_args& a) {
  StepPlan s{};
  const fastdiff_rows hist = a.num_slots > 0 ? a.hist : fastdiff_rows{};   // K = 0: never read
  const int64_t slot_stride = a.num_slots > 1 ? a.hist_slot_stride : 0;
  const int64_t half_stride = a.model_in.data && a.model_in_halves > 1 ? a.model_in_half_stride : 0;
  s.geo = make_plan(a.batch, a.sample_size, {&a.x, &a.y, &a.cond, &a.uncond, &a.noise, &hist, &a.model_in},
                    {slot_stride, half_stride});
  s.philox = a.noise.data == nullptr && a.noise_id >= 0;
  s.has_z = a.noise.data != nullptr || s.philox;
  s.check = a.bad_row != nullptr;
  s.eval_y = a.flags & layout::FLAG_EVAL_Y;
  s.write_x = a.flags & layout::FLAG_WRITE_X;
  s.write_y = a.flags & layout::FLAG_WRITE_Y;
  s.mi_from_y = a.flags & layout::FLAG_MODEL_IN_FROM_Y;
  s.variant = step_variant(a.num_slots, a.hist_writes);
  int n = 0;
  for (int w = 0; w < a.num_slots && w < 63; ++w)
    if ((a.hist_writes >> w & 1) && n < kRegisterWrites) s.reg_slot[n++] = w;
  for (; n < kRegisterWrites; ++n) s.reg_slot[n] = -1;
  return s;
}

inline const char* cfg_args_error(const fastdiff_cfg_args* a) {
  if (a == nullptr) return "args is NULL";
  if (const char* e = geometry_error(a->batch, a->sample_size)) return e;
  if (const char* e = rows_error(a->cond)) return e;
  if (const char* e = rows_error(a->uncond)) return e;
  if (a->cond.data == nullptr) return "cond is NULL";
  if (a->uncond.data != nullptr && a->uncond.dtype != a->cond.dtype) return "uncond must have cond's dtype";
  if (a->out == nullptr || !valid_dtype((int)a->out_dtype)) return "out must be a tensor of a known dtype";
  return nullptr;
}

inline Plan make_cfg_plan(const fastdiff_cfg_args& a) {
  const fastdiff_rows out{a.out, a.sample_size, a.out_dtype};
  return make_plan(a.batch, a.sample_size, {&a.cond, &a.uncond, &out}, {});
}

// cfg_rescale's per-sample statistics: partial moments of chunks of kChunk elements.
constexpr int kMomentThreads = 256;
constexpr int kMomentPerThread = 8;
constexpr int64_t kChunk = kMomentThreads * kMomentPerThread;
constexpr int kMomentFields = 5;  // n, mean(cond), M2(cond), mean(D), M2(D)

inline int64_t chunks_per_sample(int64_t M) { return (M + kChunk - 1) / kChunk; }

// Workspace: [B, chunks, 5] float64 partial moments, then [B] float32 factors.
inline size_t rescale_workspace_bytes(int64_t B, int64_t M) {
  return (size_t)(B * chunks_per_sample(M) * kMomentFields) * sizeof(double) + (size_t)B * sizeof(float);
}

inline const char* rescale_args_error(const fastdiff_cfg_args* a, double rescale, const void* workspace,
                                      size_t workspace_bytes) {
  if (const char* e = cfg_args_error(a)) return e;
  if (a->cond.dtype == FASTDIFF_FLOAT64) return "cfg_rescale takes float32, float16 or bfloat16 model outputs";
  if (a->uncond.data == nullptr) return "cfg_rescale needs uncond";
  if (a->out_dtype != FASTDIFF_FLOAT32) return "cfg_rescale writes float32 (out_dtype FASTDIFF_FLOAT32)";
  if (!(rescale >= 0.0 && rescale <= 1.0)) return "rescale must lie in [0, 1]";
  if (a->batch > 65535) return "cfg_rescale takes at most 65535 samples (one grid row each)";
  if (chunks_per_sample(a->sample_size) > INT32_MAX) return "cfg_rescale: samples too large";
  if (rescale != 0.0 && a->batch * a->sample_size > 0 &&
      (workspace == nullptr || (uintptr_t)workspace % 8 != 0 ||
       workspace_bytes < rescale_workspace_bytes(a->batch, a->sample_size)))
    return "cfg_rescale needs an 8-byte aligned workspace of fastdiff_cuda_cfg_rescale_workspace_bytes(B, M) bytes";
  return nullptr;
}

}  // namespace cuda
}  // namespace fastdiff
