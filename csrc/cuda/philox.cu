// Philox-4x32-10 noise on the GPU (fastdiff/ops/philox.py): one thread per group of 4 outputs,
// the same step_math.h code as the CPU backend, so the words are bit-identical and the normals
// too (the hand-written log/sincos are rounded operations, never contracted into FMA).
#include "kernel_bodies.h"

namespace fastdiff {
namespace cuda {

__global__ void __launch_bounds__(kThreads) philox_normal_kernel(float* out, int64_t numel, int64_t groups,
                                                                  uint64_t seed, uint32_t noise_id) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t < groups) philox_normal_group(out, numel, seed, noise_id, t);
}

__global__ void __launch_bounds__(kThreads) philox_uint32_kernel(int64_t* out, int64_t groups, uint64_t seed,
                                                                  uint32_t noise_id, uint64_t first_group) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t < groups) philox_uint32_group(out, seed, noise_id, first_group, t);
}

}  // namespace cuda
}  // namespace fastdiff

extern "C" cudaError_t fastdiff_cuda_philox_normal(float* out, int64_t numel, uint64_t seed, uint32_t noise_id,
                                                   cudaStream_t stream) {
  using namespace fastdiff::cuda;
  if (numel < 0 || (numel > 0 && (out == nullptr || (uintptr_t)out % 16 != 0))) return cudaErrorInvalidValue;
  const int64_t groups = (numel + kGroup - 1) / kGroup, blocks = blocks_for(groups);
  if (numel == 0) return cudaSuccess;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  philox_normal_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(out, numel, groups, seed, noise_id);
  return cudaGetLastError();
}

extern "C" cudaError_t fastdiff_cuda_philox_uint32(int64_t* out, int64_t numel, uint64_t seed, uint32_t noise_id,
                                                   uint64_t first_group, cudaStream_t stream) {
  using namespace fastdiff::cuda;
  if (numel < 0 || (numel > 0 && out == nullptr)) return cudaErrorInvalidValue;
  const int64_t groups = (numel + kGroup - 1) / kGroup, blocks = blocks_for(groups);
  if (numel == 0) return cudaSuccess;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  philox_uint32_kernel<<<(unsigned)blocks, kThreads, 0, stream>>>(out, groups, seed, noise_id, first_group);
  return cudaGetLastError();
}

#define FASTDIFF_STR2(...) #__VA_ARGS__
#define FASTDIFF_STR(...) FASTDIFF_STR2(__VA_ARGS__)

// What this object was compiled by and for (`python -m fastdiff info`).
extern "C" const char* fastdiff_cuda_build_info(void) {
  return "nvcc " FASTDIFF_STR(__CUDACC_VER_MAJOR__) "." FASTDIFF_STR(__CUDACC_VER_MINOR__)
#if defined(__CUDA_ARCH_LIST__)
         ", archs " FASTDIFF_STR(__CUDA_ARCH_LIST__)
#endif
      ;
}
