// Classifier-free guidance on the GPU: the CFG combine (one thread per 4 elements, cfg_group in
// kernel_bodies.h) and cfg_rescale, whose per-sample standard deviations take three launches:
//
//   1. cfg_moments_kernel: block (chunk, sample) reduces kChunk elements to (n, mean, M2) of cond
//      and of D, two passes over values held in registers (sum -> mean -> squared deviations),
//      float64 block sums in a fixed order;
//   2. cfg_factor_kernel: one block per sample merges its chunks pairwise (Chan et al.), in a
//      fixed tree order, and writes the sample's factor;
//   3. cfg_kernel again, multiplying D by the factor.
//
// Deterministic (no floating-point atomics; the same launch configuration sums in the same
// order) and no host synchronisation: the statistics stay in a caller-provided workspace.
#include "kernel_bodies.h"

namespace fastdiff {
namespace cuda {

template <bool VEC>
__global__ void __launch_bounds__(kThreads) cfg_kernel(const fastdiff_cfg_args a, const Plan p, const float* factor) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t < p.groups) cfg_group<VEC>(a, p, factor, t);
}

// Sums of a and b over the block (kMomentThreads threads), returned to every thread.
__device__ inline void block_sum2(double& a, double& b) {
  constexpr int kWarps = kMomentThreads / 32;
  __shared__ double sa[kWarps], sb[kWarps];
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, o);
    b += __shfl_down_sync(0xffffffffu, b, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double ta = 0.0, tb = 0.0;
    for (int w = 0; w < kWarps; ++w) {
      ta += sa[w];
      tb += sb[w];
    }
    sa[0] = ta;
    sb[0] = tb;
  }
  __syncthreads();
  a = sa[0];
  b = sb[0];
  __syncthreads();   // the next call reuses sa/sb
}

__global__ void __launch_bounds__(kMomentThreads) cfg_moments_kernel(const fastdiff_cfg_args a, double* part) {
  const int64_t chunk = blockIdx.x, b = blockIdx.y, chunks = gridDim.x;
  const int64_t M = a.sample_size;
  const int64_t m0 = chunk * kChunk;
  const float g = (float)a.g;
  float c[kMomentPerThread], d[kMomentPerThread];
  double sc = 0.0, sd = 0.0;
  for (int k = 0; k < kMomentPerThread; ++k) {
    const int64_t m = m0 + k * kMomentThreads + threadIdx.x;   // coalesced
    c[k] = d[k] = 0.0f;
    if (m >= M) continue;
    c[k] = load1(a.cond.data, b * a.cond.batch_stride + m, a.cond.dtype);
    d[k] = m::cfg_combine(c[k], load1(a.uncond.data, b * a.uncond.batch_stride + m, a.uncond.dtype), g);
    sc += c[k];
    sd += d[k];
  }
  const double n = (double)(M - m0 < kChunk ? M - m0 : kChunk);
  block_sum2(sc, sd);
  const double mean_c = sc / n, mean_d = sd / n;
  double qc = 0.0, qd = 0.0;
  for (int k = 0; k < kMomentPerThread; ++k) {
    if (m0 + k * kMomentThreads + threadIdx.x >= M) continue;
    const double dc = c[k] - mean_c, dd = d[k] - mean_d;
    qc += dc * dc;
    qd += dd * dd;
  }
  block_sum2(qc, qd);
  if (threadIdx.x == 0) {
    double* o = part + (b * chunks + chunk) * kMomentFields;
    o[0] = n;
    o[1] = mean_c;
    o[2] = qc;
    o[3] = mean_d;
    o[4] = qd;
  }
}

__global__ void __launch_bounds__(kMomentThreads) cfg_factor_kernel(const double* part, int64_t chunks, double phi,
                                                                    float* factor) {
  __shared__ Moments sc[kMomentThreads], sd[kMomentThreads];
  const int64_t b = blockIdx.x;
  Moments c{0.0, 0.0, 0.0}, d{0.0, 0.0, 0.0};
  for (int64_t j = threadIdx.x; j < chunks; j += kMomentThreads) {
    const double* p = part + (b * chunks + j) * kMomentFields;
    c = merge(c, Moments{p[0], p[1], p[2]});
    d = merge(d, Moments{p[0], p[3], p[4]});
  }
  sc[threadIdx.x] = c;
  sd[threadIdx.x] = d;
  __syncthreads();
  for (int s = kMomentThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      sc[threadIdx.x] = merge(sc[threadIdx.x], sc[threadIdx.x + s]);
      sd[threadIdx.x] = merge(sd[threadIdx.x], sd[threadIdx.x + s]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) factor[b] = rescale_factor(sc[0], sd[0], phi);
}

static cudaError_t launch_cfg(const fastdiff_cfg_args& a, const float* factor, cudaStream_t stream) {
  const Plan plan = make_cfg_plan(a);
  if (plan.numel == 0) return cudaSuccess;
  const int64_t blocks = blocks_for(plan.groups);
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  if (plan.vec) cfg_kernel<true><<<(unsigned)blocks, kThreads, 0, stream>>>(a, plan, factor);
  else cfg_kernel<false><<<(unsigned)blocks, kThreads, 0, stream>>>(a, plan, factor);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastdiff

extern "C" const char* fastdiff_cuda_cfg_combine_error(const fastdiff_cfg_args* args) {
  return fastdiff::cuda::cfg_args_error(args);
}

extern "C" cudaError_t fastdiff_cuda_cfg_combine(const fastdiff_cfg_args* args, cudaStream_t stream) {
  if (fastdiff::cuda::cfg_args_error(args) != nullptr) return cudaErrorInvalidValue;
  return fastdiff::cuda::launch_cfg(*args, nullptr, stream);
}

extern "C" size_t fastdiff_cuda_cfg_rescale_workspace_bytes(int64_t batch, int64_t sample_size) {
  return fastdiff::cuda::rescale_workspace_bytes(batch, sample_size);
}

extern "C" const char* fastdiff_cuda_cfg_rescale_error(const fastdiff_cfg_args* args, double rescale,
                                                       const void* workspace, size_t workspace_bytes) {
  return fastdiff::cuda::rescale_args_error(args, rescale, workspace, workspace_bytes);
}

extern "C" cudaError_t fastdiff_cuda_cfg_rescale(const fastdiff_cfg_args* args, double rescale, void* workspace,
                                                 size_t workspace_bytes, cudaStream_t stream) {
  using namespace fastdiff::cuda;
  if (rescale_args_error(args, rescale, workspace, workspace_bytes) != nullptr) return cudaErrorInvalidValue;
  const fastdiff_cfg_args& a = *args;
  if (a.batch * a.sample_size == 0) return cudaSuccess;
  if (rescale == 0.0) return launch_cfg(a, nullptr, stream);   // the reference returns D itself
  const int64_t chunks = chunks_per_sample(a.sample_size);
  double* part = static_cast<double*>(workspace);
  float* factor = reinterpret_cast<float*>(part + a.batch * chunks * kMomentFields);
  cfg_moments_kernel<<<dim3((unsigned)chunks, (unsigned)a.batch), kMomentThreads, 0, stream>>>(a, part);
  cfg_factor_kernel<<<(unsigned)a.batch, kMomentThreads, 0, stream>>>(part, chunks, rescale, factor);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_cfg(a, factor, stream);
}
