// The diffusers drop-ins' step() for their plain calls, in C++: fastdiff._C.DropinStep.
//
// A drop-in scheduler's step (fastdiff/integrations/diffusers/base.py, FastdiffScheduler._fd_step)
// spends ~7 us of Python at the SD-1.5 latent around a ~4 us kernel pass: argument checks, the
// timestep check, buffer allocation, the call of the bound kernel, the output tuple. For the calls
// that need none of the Python path's other work, this object does the same in one C++ call:
//  * a call whose row reads the sample where it lies and writes the result into a fresh tensor
//    (the binding _SAMPLE_AS_X: Euler, Euler ancestral, LCM, flow matching Euler, ...); its noise,
//    where it draws any, drawn by the scheduler's own _draw_noise (diffusers' generator), called
//    from here, and no variance_noise given (the Python path checks a given one);
//  * model_output and sample exactly torch.Tensor, float32, on the CPU, of the run's shape, the
//    sample contiguous (then prev_sample and pred_original_sample are float32 too);
//  * a timestep given as a Python float/int or a one-element CPU tensor equal to the call's.
// Anything else (a CFG-tagged output, another dtype or device, a wrong shape or timestep, ...) returns
// None and the caller runs the Python path, which converts, or raises its own error. Where pred_
// original_sample is returned it is written by the same pass, as a write-only history slot (the
// row ABI: a history term with a zero coefficient is not read). The tests compare the two paths
// bit for bit (tests/test_dropin_native.py).
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

#include "../ops.h"
#include "../program_layout.h"

namespace py = pybind11;

namespace fastdiff {
namespace {

// As the C++ row loop (row_loop.cpp): below this many elements dropping the GIL costs more than the pass.
constexpr int64_t kReleaseGilElements = 1 << 15;

struct DropinCall {
  bool served = false;     // the call runs here
  at::Tensor table;        // the table of its pass (with the x0 slot where returns_x0)
  bool returns_x0 = false; // pred_original_sample written by the pass into history slot 0
  py::object noise_dtype;  // None: no draw; else the dtype _draw_noise draws in
};

class DropinStep {
 public:
  // timesteps: the run's (scheduler.timesteps as floats); start: the step index of its first call;
  // calls: per call from `start`, None (not served) or (table, returns_x0, noise dtype or None: no
  // draw); float_timesteps: the
  // class rejects integer timesteps (the Python path raises); make_output(prev_sample[, x0]):
  // diffusers' output class for return_dict=True.
  DropinStep(std::vector<int64_t> shape, std::vector<double> timesteps, int64_t start, const py::list& calls,
             bool float_timesteps, py::object make_output)
      : shape_(std::move(shape)), timesteps_(std::move(timesteps)), start_(start),
        float_timesteps_(float_timesteps), make_output_(std::move(make_output)) {
    for (const py::handle c : calls) {
      DropinCall call;
      if (!c.is_none()) {
        py::tuple t = c.cast<py::tuple>();
        TORCH_CHECK_VALUE(t.size() == 3, "DropinStep: a call is (table, returns_x0, noise dtype or None)");
        call.served = true;
        call.table = t[0].cast<at::Tensor>();
        call.returns_x0 = t[1].cast<bool>();
        call.noise_dtype = t[2];
      }
      calls_.push_back(std::move(call));
    }
  }

  // scheduler.step(model_output, timestep, sample, return_dict=...) for a served call; None for
  // any other (nothing read or written then).
  py::object step(const py::object& scheduler, const py::handle& model_output, const py::handle& timestep,
                  const py::handle& sample, bool return_dict, const py::object& generator,
                  const py::object& variance_noise) {
    py::object index = scheduler.attr("_step_index");
    if (!PyLong_CheckExact(index.ptr())) return py::none();
    const int64_t i = PyLong_AsLongLong(index.ptr());
    const int64_t k = i - start_;
    if (k < 0 || k >= (int64_t)calls_.size() || !calls_[k].served) return py::none();
    if (!THPVariable_CheckExact(model_output.ptr()) || !THPVariable_CheckExact(sample.ptr())) return py::none();
    const at::Tensor& cond = THPVariable_Unpack(model_output.ptr());
    const at::Tensor& x = THPVariable_Unpack(sample.ptr());
    if (cond.scalar_type() != at::kFloat || x.scalar_type() != at::kFloat || !cond.device().is_cpu() ||
        !x.device().is_cpu() || !x.is_contiguous() || cond.sizes() != at::IntArrayRef(shape_) ||
        x.sizes() != at::IntArrayRef(shape_) || cond.requires_grad() || x.requires_grad())
      return py::none();
    if (!timestep_matches(timestep, timesteps_[i])) return py::none();

    const DropinCall& call = calls_[k];
    const bool draws = !call.noise_dtype.is_none();
    if (draws && !variance_noise.is_none()) return py::none();
    std::optional<at::Tensor> noise;
    if (draws) {   // (the scheduler's own draw; from here on the call runs: the generator has moved)
      py::object z = scheduler.attr("_draw_noise")(k, py::tuple(py::cast(shape_)), call.noise_dtype, device(),
                                                   generator, variance_noise);
      TORCH_CHECK_VALUE(THPVariable_Check(z.ptr()), "DropinStep: _draw_noise returned no tensor");
      noise = THPVariable_Unpack(z.ptr());
      TORCH_CHECK_VALUE(noise->sizes() == at::IntArrayRef(shape_) && noise->is_floating_point() &&
                        noise->device().is_cpu(), "DropinStep: _draw_noise returned a tensor of shape ",
                        noise->sizes(), " on ", noise->device(), "; a floating-point CPU tensor of shape ",
                        at::IntArrayRef(shape_), " expected");
    }
    const auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
    at::Tensor out = at::empty(shape_, opts);
    std::optional<at::Tensor> x0, slot;
    if (call.returns_x0) {
      x0 = at::empty(shape_, opts);
      slot = x0->unsqueeze(0);
    }
    {
      // The row as the Python path runs it: the sample as x (read only), the result written as y.
      // (The GIL released as the Python binding does, where the pass is long enough to matter.)
      std::optional<py::gil_scoped_release> nogil;
      if (x.numel() >= kReleaseGilElements) nogil.emplace();
      fused_step(call.table, k, x, out, cond, std::nullopt, slot, call.returns_x0 ? 1 : 0, layout::FLAG_WRITE_Y,
                 noise, 0, -1, std::nullopt, std::nullopt, std::nullopt);
    }
    scheduler.attr("_step_index") = py::int_(i + 1);
    py::object prev = py::reinterpret_steal<py::object>(THPVariable_Wrap(out));
    if (!call.returns_x0) return return_dict ? make_output_(prev) : py::make_tuple(prev);
    py::object pred = py::reinterpret_steal<py::object>(THPVariable_Wrap(*x0));
    return return_dict ? make_output_(prev, pred) : py::make_tuple(prev, pred);
  }

 private:
  // The Python path's timestep check, where it can pass: a Python float or int (not bool, and not
  // int where the class rejects integer timesteps) or a one-element CPU tensor of a float dtype
  // (or an integer one where integers are allowed) equal to the call's timestep.
  bool timestep_matches(const py::handle& t, double want) const {
    PyObject* p = t.ptr();
    if (PyFloat_CheckExact(p)) return PyFloat_AS_DOUBLE(p) == want;
    if (PyLong_CheckExact(p)) {
      if (float_timesteps_) return false;
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(p, &overflow);
      return overflow == 0 && (double)v == want && (long long)want == v;
    }
    if (!THPVariable_CheckExact(p)) return false;
    const at::Tensor& tt = THPVariable_Unpack(p);
    if (!tt.device().is_cpu() || tt.numel() != 1) return false;
    const at::ScalarType s = tt.scalar_type();
    if (s == at::kDouble || s == at::kFloat) return tt.item<double>() == want;
    if (float_timesteps_ || !(s == at::kLong || s == at::kInt)) return false;
    const int64_t v = tt.item<int64_t>();
    return (double)v == want && (int64_t)want == v;
  }

  const py::object& device() {
    if (!device_) device_ = py::module_::import("torch").attr("device")("cpu");
    return *device_;
  }

  std::vector<int64_t> shape_;
  std::optional<py::object> device_;
  std::vector<double> timesteps_;
  int64_t start_;
  bool float_timesteps_;
  py::object make_output_;
  std::vector<DropinCall> calls_;
};

}  // namespace

void bind_dropin_step(py::module& m) {
  py::class_<DropinStep>(m, "DropinStep",
                         "The diffusers drop-ins' step() for their plain calls, in C++ (fastdiff.integrations."
                         "diffusers.base: FastdiffScheduler._fd_step); step() returns None for any other call.")
      .def(py::init<std::vector<int64_t>, std::vector<double>, int64_t, const py::list&, bool, py::object>(),
           py::arg("shape"), py::arg("timesteps"), py::arg("start"), py::arg("calls"), py::arg("float_timesteps"),
           py::arg("make_output"))
      .def("step", &DropinStep::step, py::arg("scheduler"), py::arg("model_output"), py::arg("timestep"),
           py::arg("sample"), py::arg("return_dict"), py::arg("generator"), py::arg("variance_noise"));
}

}  // namespace fastdiff
