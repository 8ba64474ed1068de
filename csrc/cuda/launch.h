/* The CUDA kernels of fastdiff, as plain C functions over raw device pointers: no torch headers,
 * so this folder compiles with nvcc anywhere (the torch binding, torch_binding.cpp, is the only
 * file that needs a CUDA build of torch). Semantics: fastdiff/ops/reference.py (the spec),
 * fastdiff/ops/philox.py, and fastdiff/ops/reductions.py for cfg_rescale.
 *
 * Layout. Every tensor is addressed as B rows ("samples") of M elements: element i of the logical
 * row-major order lives at data + (i / M) * batch_stride + i % M (in elements). So each sample must
 * be dense, but batch slices, the two CFG halves of one model output and the slots of a history
 * stack are read in place. Other layouts (channels-last, transposed) are the caller's to copy:
 * the torch binding passes contiguous copies and copies outputs back.
 *
 * Errors. Each op has a pure-host check, fastdiff_cuda_*_error(), returning NULL or a static
 * message naming the bad argument; the launch functions run the same check and return
 * cudaErrorInvalidValue without launching if it fails, else the launch's cudaGetLastError(). */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h> /* cudaStream_t, cudaError_t */

#ifdef __cplusplus
extern "C" {
#endif

typedef enum fastdiff_dtype {
  FASTDIFF_FLOAT32 = 0,
  FASTDIFF_FLOAT16 = 1,
  FASTDIFF_BFLOAT16 = 2,
  FASTDIFF_FLOAT64 = 3
} fastdiff_dtype;

/* A tensor addressed as [B, M] rows (see the layout note above). data == NULL: absent. */
typedef struct fastdiff_rows {
  void* data;
  int64_t batch_stride; /* elements from sample b to sample b + 1 */
  fastdiff_dtype dtype;
} fastdiff_rows;

/* One row of a coefficient program (fastdiff/program), in place on x, y, hist, model_in and
 * bad_row; argument for argument fastdiff.reference.fused_step (fastdiff/program/layout.py STEP_ARGS).
 * A history slot whose coefficient (rounded to float32) is zero in every output the row computes is
 * not read, so it may hold anything (uninitialized memory, NaN), e.g. a slot the row only writes. */
typedef struct fastdiff_step_args {
  const double* table;      /* [table_rows, table_cols] float64 on the device; columns: ../program_layout.h */
  int64_t table_rows;
  int64_t table_cols;
  int64_t table_row_stride; /* in elements */
  int64_t table_col_stride;
  int64_t row;              /* the kernel reads table[row] on the device: no host copy */
  int64_t batch;            /* B */
  int64_t sample_size;      /* M: elements per sample */
  fastdiff_rows x;          /* float32 state (required) */
  fastdiff_rows y;          /* float32 second buffer, or absent */
  fastdiff_rows cond;       /* model output (float32/16/bf16/64), or absent: no model term */
  fastdiff_rows uncond;     /* the other CFG half (cond's dtype), or absent: no CFG */
  fastdiff_rows noise;      /* given noise, or absent: Philox if noise_id >= 0, else no noise */
  fastdiff_rows hist;       /* float32 history slot 0; slot j at data + j * hist_slot_stride */
  int64_t hist_slot_stride;
  int32_t num_slots;        /* K (0: hist unused) */
  int64_t hist_writes;      /* bitmask of the slots the row writes (bit j: slot j gets its own out block,
                               layout::col_out_slot(K, j)); 0: none; 0 <= hist_writes < 2^K */
  uint32_t flags;           /* the row's bitmask, ../program_layout.h: FLAG_EVAL_Y (E, the point the
                               model saw, is y, else x), FLAG_WRITE_X, FLAG_WRITE_Y, FLAG_MODEL_IN_FROM_Y
                               (model_in = s_in * new y, else s_in * new x); other bits: an error */
  uint64_t seed;            /* Philox key */
  int64_t noise_id;         /* Philox counter word 2; < 0: no Philox noise */
  fastdiff_rows model_in;   /* next model input (any model dtype), or absent */
  int32_t model_in_halves;  /* 1 or 2 CFG halves; half h at data + h * model_in_half_stride */
  int64_t model_in_half_stride;
  int32_t* bad_row;         /* int32 [1] or NULL: set to row + 1 if it is 0 and a written x/y is non-finite */
  const void* guidance;     /* per-sample scale vector s [B] (contiguous), or NULL: sample b uses
                               g = g0 + g1 * s[b] (table columns COL_G0, COL_G1) instead of COL_G */
  fastdiff_dtype guidance_dtype; /* FASTDIFF_FLOAT32 or FASTDIFF_FLOAT64 */
} fastdiff_step_args;

const char* fastdiff_cuda_fused_step_error(const fastdiff_step_args* args);
cudaError_t fastdiff_cuda_fused_step(const fastdiff_step_args* args, cudaStream_t stream);

/* CFG: out = uncond + g * (cond - uncond) (out = cond without uncond), float32 math (float64 for
 * float64 inputs), into a contiguous [B * M] buffer of out_dtype. */
typedef struct fastdiff_cfg_args {
  int64_t batch;
  int64_t sample_size;
  fastdiff_rows cond;
  fastdiff_rows uncond;     /* absent: out = cond */
  double g;
  void* out;                /* contiguous */
  fastdiff_dtype out_dtype;
} fastdiff_cfg_args;

const char* fastdiff_cuda_cfg_combine_error(const fastdiff_cfg_args* args);
cudaError_t fastdiff_cuda_cfg_combine(const fastdiff_cfg_args* args, cudaStream_t stream);

/* CFG with the std rescale of Lin et al. (fastdiff.ops.reductions.cfg_rescale): cond and uncond
 * float32/16/bf16 (one dtype), out float32; the per-sample statistics go through `workspace`
 * (device memory of fastdiff_cuda_cfg_rescale_workspace_bytes(B, M) bytes, 8-byte aligned). */
size_t fastdiff_cuda_cfg_rescale_workspace_bytes(int64_t batch, int64_t sample_size);
const char* fastdiff_cuda_cfg_rescale_error(const fastdiff_cfg_args* args, double rescale, const void* workspace,
                                            size_t workspace_bytes);
cudaError_t fastdiff_cuda_cfg_rescale(const fastdiff_cfg_args* args, double rescale, void* workspace,
                                      size_t workspace_bytes, cudaStream_t stream);

/* Philox-4x32-10 standard normals (fastdiff.ops.philox.philox_normal): out[i] = z_(i % 4) of group
 * i / 4 of the stream (seed, noise_id); out contiguous float32. */
cudaError_t fastdiff_cuda_philox_normal(float* out, int64_t numel, uint64_t seed, uint32_t noise_id,
                                        cudaStream_t stream);
/* The raw words: out[4 * t + w] = word w of group first_group + t, for t < ceil(numel / 4). */
cudaError_t fastdiff_cuda_philox_uint32(int64_t* out, int64_t numel, uint64_t seed, uint32_t noise_id,
                                        uint64_t first_group, cudaStream_t stream);

/* "nvcc <version>, archs <__CUDA_ARCH_LIST__>": what the kernels were compiled by and for. */
const char* fastdiff_cuda_build_info(void);

#ifdef __cplusplus
}
#endif
