// The CUDA kernels run on the host: every launch of fused_step.cu / cfg.cu / philox.cu replayed
// serially, thread by thread, calling the same kernel_bodies.h functions the __global__ wrappers
// call. A shared library for tests/test_cuda_emulated.py (ctypes), which compares it with the
// reference ops on CPU tensors: the kernels' indexing, layouts, coefficient reading, dtype
// conversions, noise and bad_row logic are tested without a GPU. Not emulated: the device-only
// code (the block reductions of cfg_rescale, __syncthreads_or, atomics), whose math pieces
// (merge, rescale_factor) are the shared ones used here.
//
// Build (as the test does): g++ -std=c++17 -O2 -ffp-contract=off -shared -fPIC -I<cuda>/include
//   <torch's half flags> csrc/cuda/tools/emulate.cpp -o libfastdiff_cuda_emulate.so
#include <math.h>

#include <vector>

#include "../kernel_bodies.h"

using namespace fastdiff::cuda;

extern "C" {

// Layout facts for the ctypes mirror of the argument structs.
size_t fastdiff_emulate_sizeof_step_args(void) { return sizeof(fastdiff_step_args); }
size_t fastdiff_emulate_sizeof_cfg_args(void) { return sizeof(fastdiff_cfg_args); }
size_t fastdiff_emulate_offsetof_bad_row(void) { return offsetof(fastdiff_step_args, bad_row); }
size_t fastdiff_emulate_offsetof_out_dtype(void) { return offsetof(fastdiff_cfg_args, out_dtype); }

// The launch plan the GPU launcher would choose: {dense, vec, groups, variant (KT), shared bytes}.
const char* fastdiff_emulate_step_plan(const fastdiff_step_args* a, int64_t* out5) {
  if (const char* e = step_args_error(a)) return e;
  const StepPlan p = make_step_plan(*a);
  out5[0] = p.geo.dense;
  out5[1] = p.geo.vec;
  out5[2] = p.geo.groups;
  out5[3] = p.variant;
  out5[4] = (int64_t)step_shared_floats(a->num_slots, a->hist_writes) * (int64_t)sizeof(float);
  return nullptr;
}

const char* fastdiff_emulate_fused_step(const fastdiff_step_args* a) {
  if (const char* e = step_args_error(a)) return e;
  const StepPlan p = make_step_plan(*a);
  if (p.geo.numel == 0) return nullptr;
  // One block's shared memory, as the launcher sizes it: the row, then the pending area.
  std::vector<float> coefs(step_shared_floats(a->num_slots, a->hist_writes));
  load_row_coefs(*a, coefs.data(), 0, 1);
  float* pending = coefs.data() + columns(a->num_slots).width;
  const int64_t blocks = blocks_for(p.geo.groups);
  with_step_variant(p, [&](auto kt, auto vec) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      uint32_t bad = 0;   // __syncthreads_or over the block
      for (int64_t t = blk * kThreads; t < (blk + 1) * kThreads && t < p.geo.groups; ++t)
        bad |= step_group<decltype(kt)::value, decltype(vec)::value>(*a, p, coefs.data(), pending, t);
      if (p.check && bad && *a->bad_row == 0) *a->bad_row = (int32_t)(a->row + 1);   // atomicCAS(flag, 0, row + 1)
    }
  });
  return nullptr;
}

static void emulate_cfg(const fastdiff_cfg_args& a, const float* factor) {
  const Plan p = make_cfg_plan(a);
  for (int64_t t = 0; t < p.groups; ++t) {
    if (p.vec) cfg_group<true>(a, p, factor, t);
    else cfg_group<false>(a, p, factor, t);
  }
}

const char* fastdiff_emulate_cfg_combine(const fastdiff_cfg_args* a) {
  if (const char* e = cfg_args_error(a)) return e;
  emulate_cfg(*a, nullptr);
  return nullptr;
}

// cfg_rescale with the workspace layout of the GPU launcher; per chunk, the statistics are the
// kernel's two passes (sum -> mean -> squared deviations) summed serially instead of as a tree.
const char* fastdiff_emulate_cfg_rescale(const fastdiff_cfg_args* args, double rescale, void* workspace,
                                         size_t workspace_bytes) {
  if (const char* e = rescale_args_error(args, rescale, workspace, workspace_bytes)) return e;
  const fastdiff_cfg_args& a = *args;
  if (a.batch * a.sample_size == 0) return nullptr;
  if (rescale == 0.0) {
    emulate_cfg(a, nullptr);
    return nullptr;
  }
  const int64_t M = a.sample_size, chunks = chunks_per_sample(M);
  double* part = static_cast<double*>(workspace);
  float* factor = reinterpret_cast<float*>(part + a.batch * chunks * kMomentFields);
  const float g = (float)a.g;
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t m0 = ch * kChunk, m1 = m0 + kChunk < M ? m0 + kChunk : M;
      std::vector<float> c, d;
      double sc = 0.0, sd = 0.0;
      for (int64_t mm = m0; mm < m1; ++mm) {
        c.push_back(load1(a.cond.data, b * a.cond.batch_stride + mm, a.cond.dtype));
        d.push_back(fastdiff::math::cfg_combine(c.back(), load1(a.uncond.data, b * a.uncond.batch_stride + mm, a.uncond.dtype), g));
        sc += c.back();
        sd += d.back();
      }
      const double n = (double)(m1 - m0), mean_c = sc / n, mean_d = sd / n;
      double qc = 0.0, qd = 0.0;
      for (size_t k = 0; k < c.size(); ++k) {
        qc += (c[k] - mean_c) * (c[k] - mean_c);
        qd += (d[k] - mean_d) * (d[k] - mean_d);
      }
      double* o = part + (b * chunks + ch) * kMomentFields;
      o[0] = n; o[1] = mean_c; o[2] = qc; o[3] = mean_d; o[4] = qd;
    }
    Moments mc{0.0, 0.0, 0.0}, md{0.0, 0.0, 0.0};
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const double* q = part + (b * chunks + ch) * kMomentFields;
      mc = merge(mc, Moments{q[0], q[1], q[2]});
      md = merge(md, Moments{q[0], q[3], q[4]});
    }
    factor[b] = rescale_factor(mc, md, rescale);
  }
  emulate_cfg(a, factor);
  return nullptr;
}

void fastdiff_emulate_philox_normal(float* out, int64_t numel, uint64_t seed, uint32_t noise_id) {
  for (int64_t t = 0; t < (numel + kGroup - 1) / kGroup; ++t) philox_normal_group(out, numel, seed, noise_id, t);
}

void fastdiff_emulate_philox_uint32(int64_t* out, int64_t numel, uint64_t seed, uint32_t noise_id,
                                    uint64_t first_group) {
  for (int64_t t = 0; t < (numel + kGroup - 1) / kGroup; ++t) philox_uint32_group(out, seed, noise_id, first_group, t);
}

}  // extern "C"
