// pybind11 module fastdiff._C. Signatures mirror fastdiff.ops.reference (see csrc/ops.h).
#include <torch/extension.h>

#include "ops.h"

namespace py = pybind11;

namespace {

// seed is only read when the kernel draws Philox noise; any Python int is accepted otherwise
// (as the reference does), and a seed outside [0, 2**64) is a ValueError when it is used.
uint64_t seed_arg(const py::handle& seed, bool used) {
  if (!used) return 0;
  if (!PyLong_Check(seed.ptr())) throw py::type_error("fastdiff._C: seed must be an int");
  const unsigned long long v = PyLong_AsUnsignedLongLong(seed.ptr());
  if (v == (unsigned long long)-1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error("fastdiff._C: seed must be an int in [0, 2**64)");
  }
  return (uint64_t)v;
}

}  // namespace

namespace fastdiff {
void bind_row_loop(py::module& m);     // csrc/cpu/row_loop.cpp
void bind_dropin_step(py::module& m);  // csrc/cpu/dropin_step.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff C++ CPU kernels (OpenMP + SIMD): fused solver step, CFG, Philox noise, per-sample reductions";

  m.def(
      "fused_step",
      [](const at::Tensor& table, int64_t row, const at::Tensor& x, const std::optional<at::Tensor>& y,
         const std::optional<at::Tensor>& cond, const std::optional<at::Tensor>& uncond,
         const std::optional<at::Tensor>& hist, int64_t hist_writes, int64_t flags,
         const std::optional<at::Tensor>& noise, py::handle seed, int64_t noise_id,
         const std::optional<at::Tensor>& model_in, const std::optional<at::Tensor>& bad_row,
         const std::optional<at::Tensor>& guidance) {
        const uint64_t s = seed_arg(seed, !noise && noise_id >= 0);
        py::gil_scoped_release nogil;
        fastdiff::fused_step(table, row, x, y, cond, uncond, hist, hist_writes, flags, noise, s, noise_id, model_in,
                             bad_row, guidance);
      },
      py::arg("table"), py::arg("row"), py::arg("x"), py::arg("y"), py::arg("cond"), py::arg("uncond"),
      py::arg("hist"), py::arg("hist_writes"), py::arg("flags"), py::arg("noise"), py::arg("seed"),
      py::arg("noise_id"), py::arg("model_in"), py::arg("bad_row"), py::arg("guidance") = py::none(),
      "One row of a coefficient program, in place on x, y, hist, model_in and bad_row "
      "(semantics: fastdiff.reference.fused_step). flags: the row's bitmask (fastdiff.program.layout FLAG_*); "
      "hist_writes: the bitmask of the history slots it writes (bit j: slot j, from its own out block; "
      "0 <= hist_writes < 2**K); a history term with a zero coefficient is absent (its slot is not read). "
      "x, y, hist: float32; cond/uncond/noise/model_in: "
      "float32, float16, bfloat16 or float64; guidance: optional per-sample scale vector [B] (float32/float64).");

  m.def(
      "cfg_combine",
      [](const at::Tensor& cond, const std::optional<at::Tensor>& uncond, double g, at::ScalarType out_dtype) {
        py::gil_scoped_release nogil;
        return fastdiff::cfg_combine(cond, uncond, g, out_dtype);
      },
      py::arg("cond"), py::arg("uncond"), py::arg("g"), py::arg("out_dtype"),
      "uncond + g * (cond - uncond) (cond if uncond is None) in float32 (float64 for float64 inputs), "
      "as a new contiguous tensor of out_dtype.");

  m.def(
      "philox_normal",
      [](const std::vector<int64_t>& shape, py::handle seed, int64_t noise_id) {
        const uint64_t s = seed_arg(seed, true);
        py::gil_scoped_release nogil;
        return fastdiff::philox_normal(shape, s, noise_id);
      },
      py::arg("shape"), py::arg("seed"), py::arg("noise_id"),
      "Standard normal float32 noise (fastdiff.ops.philox.philox_normal).");

  m.def(
      "philox_uint32",
      [](int64_t numel, py::handle seed, int64_t noise_id, uint64_t first_group) {
        const uint64_t s = seed_arg(seed, true);
        py::gil_scoped_release nogil;
        return fastdiff::philox_uint32(numel, s, noise_id, first_group);
      },
      py::arg("numel"), py::arg("seed"), py::arg("noise_id"), py::arg("first_group") = 0,
      "The raw Philox words: int64 [ceil(numel/4), 4] (fastdiff.ops.philox.philox_uint32); row t is "
      "group first_group + t.");

  m.def(
      "cfg_rescale",
      [](const at::Tensor& cond, const at::Tensor& uncond, double g, double rescale) {
        py::gil_scoped_release nogil;
        return fastdiff::cfg_rescale(cond, uncond, g, rescale);
      },
      py::arg("cond"), py::arg("uncond"), py::arg("g"), py::arg("rescale"),
      "CFG with the per-sample std rescale (fastdiff.ops.reductions.reference_cfg_rescale).");

  m.def(
      "dynamic_threshold",
      [](const at::Tensor& x0, double ratio, double max_value) {
        py::gil_scoped_release nogil;
        return fastdiff::dynamic_threshold(x0, ratio, max_value);
      },
      py::arg("x0"), py::arg("ratio"), py::arg("max_value"),
      "Imagen's dynamic thresholding, exact quantile (fastdiff.ops.reductions.reference_dynamic_threshold).");

  m.def(
      "error_norm",
      [](const at::Tensor& a, const at::Tensor& b, const at::Tensor& ref, double rtol, double atol) {
        py::gil_scoped_release nogil;
        return fastdiff::error_norm(a, b, ref, rtol, atol);
      },
      py::arg("a"), py::arg("b"), py::arg("ref"), py::arg("rtol"), py::arg("atol"),
      "The scaled RMS error norm (fastdiff.ops.reductions.reference_error_norm), a 0-d tensor.");

  m.def(
      "per_sample_norm",
      [](const at::Tensor& x) {
        py::gil_scoped_release nogil;
        return fastdiff::per_sample_norm(x);
      },
      py::arg("x"), "Per-sample L2 norms (fastdiff.ops.reductions.reference_per_sample_norm), a [B] tensor.");

  m.def(
      "build_info", []() { return fastdiff::build_info(); },
      "What was built: compiler, -march, SIMD width, OpenMP, block sizes.");

  fastdiff::bind_row_loop(m);
  fastdiff::bind_dropin_step(m);
}
