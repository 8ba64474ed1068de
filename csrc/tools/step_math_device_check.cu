// Compile check: step_math.h as CUDA device code (no torch headers). Built by tests/test_ops_cpu.py
// with nvcc -arch=sm_80 and warnings as errors when nvcc is on the PATH; nothing is run.
#include "step_math.h"
using namespace fastdiff::math;
struct HistPtr { const float* h; long long stride; long long i; __device__ float operator()(int j) const { return h[j * stride + i]; } };
// x and one written history slot w (its own out block, as RowCoefs keeps none): both outputs are
// formed before either store, so the slot may be read and written by the row.
__global__ void k(float* x, const float* c, const float* u, float* H, int K, long long n, RowCoefs rc, OutCoefs slot_w,
                  int w, unsigned long long seed, unsigned nid) {
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  float z0, z1, z2, z3;
  philox_normal4((unsigned long long)(i / 4), seed, nid, z0, z1, z2, z3);
  float z = (i % 4 == 0) ? z0 : (i % 4 == 1) ? z1 : (i % 4 == 2) ? z2 : z3;
  float d = guided(c[i], u[i], rc.g);
  float h = step_h(rc.qy, x[i], rc.qd, d), hu = step_h(rc.qy, x[i], rc.qd, u[i]);
  const float nx = step_output(rc.ox, x[i], x[i], h, hu, true, z, K, HistPtr{H, n, i});
  const float nh = step_output(slot_w, x[i], x[i], h, hu, true, z, K, HistPtr{H, n, i});
  if (w >= 0) H[w * n + i] = nh;
  x[i] = nonfinite(nx) ? 0.0f : nx;
}
