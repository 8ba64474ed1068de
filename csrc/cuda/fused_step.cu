// The fused solver step on the GPU: one row of a coefficient program per launch (launch.h,
// fastdiff_cuda_fused_step). The thread's work is step_group() in kernel_bodies.h.
//
// The row's coefficients are read from the float64 table on the device, once per block into
// shared memory (rounded to float32 as the reference rounds them): the host never reads them, so
// a captured CUDA graph replays current values. Variants: K = 0..4 history slots fixed at compile
// time (their values live in registers, up to kRegisterWrites slots written), any other row
// through a loop (the values of the slots it writes wait in shared memory behind the row until the
// loop's last read); 4-wide vector
// loads where the plan allows. Dtypes are run-time arguments (a warp-uniform switch per load).
//
// bad_row: the block ORs its threads' flags (__syncthreads_or), and one thread per block does the
// compare-and-swap, so the first bad row wins and at most one atomic per block is issued.
#include "kernel_bodies.h"

namespace fastdiff {
namespace cuda {

// kMinBlocks: each thread keeps its whole group's loads in flight at once (kernel_bodies.h: fetch,
// then decode), which takes registers; 5 resident blocks of 128 threads cap them at 102 (ptxas
// allocates <= 96, no spills: 31% occupancy, enough loads in flight to saturate DRAM on paper,
// benchmarks/results/cuda_compile_report.md). 6 blocks would cap them at 80 and spill.
constexpr int kMinBlocks = 5;

template <int KT, bool VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks) fused_step_kernel(const fastdiff_step_args a, const StepPlan p) {
  extern __shared__ float coefs[];   // step_shared_floats(K, hist_writes): the row, then the pending area
  load_row_coefs(a, coefs, threadIdx.x, blockDim.x);
  __syncthreads();
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  uint32_t bad = 0;
  if (t < p.geo.groups) bad = step_group<KT, VEC>(a, p, coefs, coefs + columns(a.num_slots).width, t);
  if (p.check && __syncthreads_or((int)bad) && threadIdx.x == 0) atomicCAS(a.bad_row, 0, (int32_t)(a.row + 1));
}

}  // namespace cuda
}  // namespace fastdiff

extern "C" const char* fastdiff_cuda_fused_step_error(const fastdiff_step_args* args) {
  return fastdiff::cuda::step_args_error(args);
}

extern "C" cudaError_t fastdiff_cuda_fused_step(const fastdiff_step_args* args, cudaStream_t stream) {
  using namespace fastdiff::cuda;
  if (step_args_error(args) != nullptr) return cudaErrorInvalidValue;
  const StepPlan plan = make_step_plan(*args);
  if (plan.geo.numel == 0) return cudaSuccess;
  const int64_t blocks = blocks_for(plan.geo.groups);
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  const size_t smem = (size_t)step_shared_floats(args->num_slots, args->hist_writes) * sizeof(float);
  with_step_variant(plan, [&](auto kt, auto vec) {
    auto kernel = fused_step_kernel<decltype(kt)::value, decltype(vec)::value>;
    kernel<<<(unsigned)blocks, kThreads, smem, stream>>>(*args, plan);
  });
  return cudaGetLastError();
}
