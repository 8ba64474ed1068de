// pybind11 module fastdiff._cuda: the CUDA kernels (launch.h) for CUDA tensors. Built by setup.py
// only against a CUDA build of torch. Signatures mirror fastdiff._C (csrc/bindings.cpp) and the
// semantics fastdiff/ops/reference.py; fastdiff.ops validates the arguments before they get here,
// so this file checks only what keeps the launch memory-safe, and says which tensor is wrong.
//
// Layout: the kernels address every tensor as [B, M] rows with its own batch stride. A tensor
// whose samples are each dense (contiguous, a batch slice, one CFG half, one history slot) is used
// in place; any other layout (channels-last, transposed) runs on a contiguous copy, and outputs
// are copied back afterwards.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../program_layout.h"  // the row flags (FLAG_*)
#include "launch.h"

namespace py = pybind11;

namespace {

using OptTensor = std::optional<at::Tensor>;

fastdiff_dtype dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return FASTDIFF_FLOAT32;
    case at::kHalf: return FASTDIFF_FLOAT16;
    case at::kBFloat16: return FASTDIFF_BFLOAT16;
    case at::kDouble: return FASTDIFF_FLOAT64;
    default:
      TORCH_CHECK_TYPE(false, "fastdiff._cuda: ", name, " must be float32, float16, bfloat16 or float64, got ",
                       t.scalar_type());
  }
}

void check_on(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, "fastdiff._cuda: ", name, " must be on ", device, ", got ", t.device());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "fastdiff._cuda: ", name, " must have shape ", shape, ", got ", t.sizes());
}

int64_t sample_size(const at::Tensor& t) {
  int64_t m = 1;
  for (int64_t d = 1; d < t.dim(); ++d) m *= t.size(d);
  return m;
}

// The stride between samples if every sample t[b] is dense (row-major), else -1.
int64_t batch_stride(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return -1;
    expected *= t.size(d);
  }
  return t.size(0) > 1 ? t.stride(0) : expected;
}

// A tensor as the kernels' [B, M] rows: the tensor itself, or a contiguous copy of it.
struct Operand {
  at::Tensor used;   // undefined: absent
  fastdiff_rows rows{nullptr, 0, FASTDIFF_FLOAT32};
};

Operand operand(const OptTensor& t, const char* name) {
  Operand o;
  if (!t) return o;
  o.used = batch_stride(*t) >= 0 ? *t : t->contiguous();
  o.rows = fastdiff_rows{o.used.data_ptr(), batch_stride(o.used), dtype_code(o.used, name)};
  return o;
}

void write_back(const at::Tensor& original, const at::Tensor& used) {
  if (used.defined() && !used.is_same(original)) original.copy_(used);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastdiff._cuda.", op, ": ", cudaGetErrorString(err));
}

// seed is read only when the kernel draws Philox noise (as fastdiff._C).
uint64_t seed_arg(const py::handle& seed, bool used) {
  if (!used) return 0;
  if (!PyLong_Check(seed.ptr())) throw py::type_error("fastdiff._cuda: seed must be an int");
  const unsigned long long v = PyLong_AsUnsignedLongLong(seed.ptr());
  if (v == (unsigned long long)-1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error("fastdiff._cuda: seed must be an int in [0, 2**64)");
  }
  return (uint64_t)v;
}

void fused_step(const at::Tensor& table, int64_t row, const at::Tensor& x, const OptTensor& y, const OptTensor& cond,
                const OptTensor& uncond, const OptTensor& hist, int64_t hist_writes, int64_t flags,
                const OptTensor& noise, uint64_t seed, int64_t noise_id, const OptTensor& model_in,
                const OptTensor& bad_row, const OptTensor& guidance) {
  namespace L = fastdiff::layout;
  // ---- checks that keep the launch memory-safe (every other rule: launch.h's check) ----
  // The row flags (one bitmask, program_layout.h): a bit no flag names is an error, before any write.
  const uint64_t unknown_bits = (uint64_t)flags & ~(uint64_t)L::FLAG_ALL;
  TORCH_CHECK_VALUE(unknown_bits == 0, "fastdiff._cuda.fused_step: flags has unknown row flag bits 0x", std::hex,
                    unknown_bits, std::dec, " (got ", flags, "; the row flags are FLAG_EVAL_Y | FLAG_WRITE_X | "
                    "FLAG_WRITE_Y | FLAG_MODEL_IN_FROM_Y = 0x", std::hex, L::FLAG_ALL, std::dec, ")");
  const bool write_x = flags & L::FLAG_WRITE_X, write_y = flags & L::FLAG_WRITE_Y;
  TORCH_CHECK_VALUE(x.is_cuda(), "fastdiff._cuda.fused_step: x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "fastdiff._cuda.fused_step: x (the state) must be float32, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "fastdiff._cuda.fused_step: x must have a batch dimension");
  const at::Device dev = x.device();
  check_on(table, "table", dev);
  TORCH_CHECK_TYPE(table.scalar_type() == at::kDouble, "fastdiff._cuda.fused_step: table must be float64, got ",
                   table.scalar_type());
  TORCH_CHECK_VALUE(table.dim() == 2, "fastdiff._cuda.fused_step: table must be 2-D, got shape ", table.sizes());
  const std::pair<const OptTensor*, const char*> like_x[] = {
      {&y, "y"}, {&cond, "model output (cond)"}, {&uncond, "model output (uncond)"}, {&noise, "noise"}};
  for (const auto& [t, name] : like_x) {
    if (!*t) continue;
    check_on(**t, name, dev);
    check_shape(**t, name, x.sizes());
  }
  const int64_t B = x.size(0);
  int64_t K = 0;
  if (hist && hist->numel() > 0) {
    check_on(*hist, "hist", dev);
    TORCH_CHECK_VALUE(hist->dim() == x.dim() + 1 && hist->sizes().slice(1) == x.sizes(),
                      "fastdiff._cuda.fused_step: hist must have shape [K, *x.shape], got ", hist->sizes());
    K = hist->size(0);
  }
  // The written slots (one bitmask): a bit outside [0, K) is an error, before any write.
  TORCH_CHECK_VALUE(L::hist_writes_valid(hist_writes, (int)std::min<int64_t>(K, 62)),
                    "fastdiff._cuda.fused_step: hist_writes must be a bitmask of history slots in [0, K) (K = ", K,
                    "; 0: no write; 0 <= hist_writes < 2**K), got ", hist_writes);
  int halves = 0;
  if (model_in) {
    check_on(*model_in, "model_in", dev);
    TORCH_CHECK_VALUE(model_in->dim() == x.dim() && model_in->sizes().slice(1) == x.sizes().slice(1) &&
                          (model_in->size(0) == B || model_in->size(0) == 2 * B),
                      "fastdiff._cuda.fused_step: model_in must have shape [B or 2B, *x.shape[1:]], got ",
                      model_in->sizes());
    halves = B == 0 ? 1 : (int)(model_in->size(0) / B);
  }
  if (bad_row) {
    check_on(*bad_row, "bad_row", dev);
    TORCH_CHECK_VALUE(bad_row->scalar_type() == at::kInt && bad_row->numel() == 1,
                      "fastdiff._cuda.fused_step: bad_row must be an int32 tensor of shape [1]");
  }
  at::Tensor S;   // the per-sample scale vector, contiguous
  if (guidance) {
    check_on(*guidance, "guidance", dev);
    TORCH_CHECK_TYPE(guidance->scalar_type() == at::kFloat || guidance->scalar_type() == at::kDouble,
                     "fastdiff._cuda.fused_step: guidance (per-sample scale vector) must be float32 or float64");
    TORCH_CHECK_VALUE(guidance->dim() == 1 && guidance->size(0) == B,
                      "fastdiff._cuda.fused_step: guidance must have shape [B] (one scale per sample), got ",
                      guidance->sizes());
    S = guidance->contiguous();
  }
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(dev);

  // ---- operands ----
  const Operand X = operand(x, "x"), Y = operand(y, "y"), C = operand(cond, "cond"), U = operand(uncond, "uncond"),
                N = operand(noise, "noise"), MI = operand(model_in, "model_in");
  at::Tensor H;   // the history stack: in place if slot 0's samples are dense, else a copy
  if (K > 0) H = batch_stride(hist->select(0, 0)) >= 0 ? *hist : hist->contiguous();

  fastdiff_step_args a{};
  a.table = table.data_ptr<double>();
  a.table_rows = table.size(0);
  a.table_cols = table.size(1);
  a.table_row_stride = table.stride(0);
  a.table_col_stride = table.stride(1);
  a.row = row;
  a.batch = B;
  a.sample_size = sample_size(x);
  a.x = X.rows;
  a.y = Y.rows;
  a.cond = C.rows;
  a.uncond = U.rows;
  a.noise = N.rows;
  if (K > 0) {
    const at::Tensor slot0 = H.select(0, 0);
    a.hist = fastdiff_rows{H.data_ptr(), batch_stride(slot0), dtype_code(H, "hist")};
    a.hist_slot_stride = H.stride(0);
  }
  a.num_slots = (int32_t)K;
  a.hist_writes = hist_writes;
  a.flags = (uint32_t)flags;
  a.seed = seed;
  a.noise_id = noise_id;
  a.model_in = MI.rows;
  a.model_in_halves = halves;
  a.model_in_half_stride = B * MI.rows.batch_stride;
  a.bad_row = bad_row ? bad_row->data_ptr<int32_t>() : nullptr;
  a.guidance = S.defined() ? S.data_ptr() : nullptr;
  a.guidance_dtype = S.defined() && S.scalar_type() == at::kDouble ? FASTDIFF_FLOAT64 : FASTDIFF_FLOAT32;
  if (const char* e = fastdiff_cuda_fused_step_error(&a)) TORCH_CHECK_VALUE(false, "fastdiff._cuda.fused_step: ", e);
  check_launch(fastdiff_cuda_fused_step(&a, c10::cuda::getCurrentCUDAStream()), "fused_step");

  // ---- outputs that ran on copies ----
  if (write_x) write_back(x, X.used);
  if (write_y) write_back(*y, Y.used);
  if (K > 0 && !H.is_same(*hist))
    for (int64_t j = 0; j < K; ++j)
      if (hist_writes >> j & 1) hist->select(0, j).copy_(H.select(0, j));
  if (model_in) write_back(*model_in, MI.used);
}

fastdiff_cfg_args cfg_args(const at::Tensor& cond, double g, const Operand& C, const Operand& U,
                           const at::Tensor& out) {
  fastdiff_cfg_args a{};
  a.batch = cond.dim() == 0 ? 1 : cond.size(0);
  a.sample_size = sample_size(cond);
  a.cond = C.rows;
  a.uncond = U.rows;
  a.g = g;
  a.out = out.data_ptr();
  a.out_dtype = dtype_code(out, "out");
  return a;
}

void check_cfg_inputs(const at::Tensor& cond, const OptTensor& uncond, const char* op) {
  TORCH_CHECK_VALUE(cond.is_cuda(), "fastdiff._cuda.", op, ": cond must be a CUDA tensor, got one on ", cond.device());
  if (uncond) {
    check_on(*uncond, "uncond", cond.device());
    check_shape(*uncond, "uncond", cond.sizes());
    TORCH_CHECK_TYPE(uncond->scalar_type() == cond.scalar_type(), "fastdiff._cuda.", op,
                     ": uncond must have the dtype of cond (", cond.scalar_type(), "), got ", uncond->scalar_type());
  }
}

at::Tensor cfg_combine(const at::Tensor& cond_in, const OptTensor& uncond_in, double g, at::ScalarType out_dtype) {
  check_cfg_inputs(cond_in, uncond_in, "cfg_combine");
  const at::Tensor cond = cond_in.dim() == 0 ? cond_in.reshape({1}) : cond_in;
  const OptTensor uncond = uncond_in ? OptTensor(uncond_in->reshape(cond.sizes())) : std::nullopt;
  at::Tensor out = at::empty(cond_in.sizes(), cond_in.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(cond.device());
  const Operand C = operand(cond, "cond"), U = operand(uncond, "uncond");
  const fastdiff_cfg_args a = cfg_args(cond, g, C, U, out);
  if (const char* e = fastdiff_cuda_cfg_combine_error(&a)) TORCH_CHECK_VALUE(false, "fastdiff._cuda.cfg_combine: ", e);
  check_launch(fastdiff_cuda_cfg_combine(&a, c10::cuda::getCurrentCUDAStream()), "cfg_combine");
  return out;
}

at::Tensor cfg_rescale(const at::Tensor& cond, const at::Tensor& uncond, double g, double rescale) {
  check_cfg_inputs(cond, uncond, "cfg_rescale");
  TORCH_CHECK_VALUE(cond.dim() >= 1, "fastdiff._cuda.cfg_rescale: cond must have a batch dimension");
  at::Tensor out = at::empty(cond.sizes(), cond.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(cond.device());
  const Operand C = operand(cond, "cond"), U = operand(uncond, "uncond");
  const fastdiff_cfg_args a = cfg_args(cond, g, C, U, out);
  const size_t bytes = fastdiff_cuda_cfg_rescale_workspace_bytes(a.batch, a.sample_size);
  const at::Tensor ws = at::empty({(int64_t)(bytes / 8 + 1)}, cond.options().dtype(at::kDouble));
  if (const char* e = fastdiff_cuda_cfg_rescale_error(&a, rescale, ws.data_ptr(), bytes))
    TORCH_CHECK_VALUE(false, "fastdiff._cuda.cfg_rescale: ", e);
  check_launch(fastdiff_cuda_cfg_rescale(&a, rescale, ws.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()),
               "cfg_rescale");
  return out;
}

void check_noise_id(int64_t noise_id, const char* op) {
  TORCH_CHECK_VALUE(noise_id >= 0 && noise_id < (int64_t(1) << 32), "fastdiff._cuda.", op,
                    ": noise_id must be in [0, 2**32), got ", noise_id);
}

at::Tensor philox_normal(const std::vector<int64_t>& shape, uint64_t seed, int64_t noise_id, int64_t device_index) {
  check_noise_id(noise_id, "philox_normal");
  const at::Device dev(at::kCUDA, (c10::DeviceIndex)device_index);
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(at::kFloat).device(dev));
  check_launch(fastdiff_cuda_philox_normal(out.data_ptr<float>(), out.numel(), seed, (uint32_t)noise_id,
                                           c10::cuda::getCurrentCUDAStream()),
               "philox_normal");
  return out;
}

at::Tensor philox_uint32(int64_t numel, uint64_t seed, int64_t noise_id, uint64_t first_group, int64_t device_index) {
  check_noise_id(noise_id, "philox_uint32");
  TORCH_CHECK_VALUE(numel >= 0, "fastdiff._cuda.philox_uint32: numel must be non-negative, got ", numel);
  const at::Device dev(at::kCUDA, (c10::DeviceIndex)device_index);
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty({(numel + 3) / 4, 4}, at::TensorOptions().dtype(at::kLong).device(dev));
  check_launch(fastdiff_cuda_philox_uint32(out.data_ptr<int64_t>(), numel, seed, (uint32_t)noise_id, first_group,
                                           c10::cuda::getCurrentCUDAStream()),
               "philox_uint32");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff CUDA kernels: fused solver step, CFG (+ rescale), Philox noise";
  m.def(
      "fused_step",
      [](const at::Tensor& table, int64_t row, const at::Tensor& x, const OptTensor& y, const OptTensor& cond,
         const OptTensor& uncond, const OptTensor& hist, int64_t hist_writes, int64_t flags, const OptTensor& noise,
         py::handle seed, int64_t noise_id, const OptTensor& model_in, const OptTensor& bad_row,
         const OptTensor& guidance) {
        const uint64_t s = seed_arg(seed, !noise && noise_id >= 0);
        py::gil_scoped_release nogil;
        fused_step(table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, s, noise_id, model_in, bad_row,
                   guidance);
      },
      py::arg("table"), py::arg("row"), py::arg("x"), py::arg("y"), py::arg("cond"), py::arg("uncond"),
      py::arg("hist"), py::arg("hist_writes"), py::arg("flags"), py::arg("noise"), py::arg("seed"),
      py::arg("noise_id"), py::arg("model_in"), py::arg("bad_row"), py::arg("guidance") = py::none(),
      "One row of a coefficient program (fastdiff.ops.reference.fused_step), on CUDA tensors.");
  m.def(
      "cfg_combine",
      [](const at::Tensor& cond, const OptTensor& uncond, double g, at::ScalarType out_dtype) {
        py::gil_scoped_release nogil;
        return cfg_combine(cond, uncond, g, out_dtype);
      },
      py::arg("cond"), py::arg("uncond"), py::arg("g"), py::arg("out_dtype"),
      "uncond + g * (cond - uncond) (cond if uncond is None) as a new contiguous tensor of out_dtype.");
  m.def(
      "cfg_rescale",
      [](const at::Tensor& cond, const at::Tensor& uncond, double g, double rescale) {
        py::gil_scoped_release nogil;
        return cfg_rescale(cond, uncond, g, rescale);
      },
      py::arg("cond"), py::arg("uncond"), py::arg("g"), py::arg("rescale"),
      "CFG with the per-sample std rescale (fastdiff.ops.reductions.cfg_rescale), float32 result.");
  m.def(
      "philox_normal",
      [](const std::vector<int64_t>& shape, py::handle seed, int64_t noise_id, int64_t device_index) {
        const uint64_t s = seed_arg(seed, true);
        py::gil_scoped_release nogil;
        return philox_normal(shape, s, noise_id, device_index);
      },
      py::arg("shape"), py::arg("seed"), py::arg("noise_id"), py::arg("device_index"),
      "Standard normal float32 noise on cuda:device_index (fastdiff.ops.philox.philox_normal).");
  m.def(
      "philox_uint32",
      [](int64_t numel, py::handle seed, int64_t noise_id, uint64_t first_group, int64_t device_index) {
        const uint64_t s = seed_arg(seed, true);
        py::gil_scoped_release nogil;
        return philox_uint32(numel, s, noise_id, first_group, device_index);
      },
      py::arg("numel"), py::arg("seed"), py::arg("noise_id"), py::arg("first_group"), py::arg("device_index"),
      "The raw Philox words, int64 [ceil(numel/4), 4] (fastdiff.ops.philox.philox_uint32).");
  m.def(
      "build_info",
      []() {
        int runtime = 0;
        cudaRuntimeGetVersion(&runtime);
        return std::vector<std::pair<std::string, std::string>>{
            {"kernels", fastdiff_cuda_build_info()}, {"cuda_runtime", std::to_string(runtime)}};
      },
      "What was built: nvcc version and archs of the kernels, the CUDA runtime version.");
}
