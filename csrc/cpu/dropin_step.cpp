// The diffusers drop-ins' step() for their plain calls, in C++: fastdiff._C.DropinStep.
//
// A drop-in scheduler's step (fastdiff/integrations/diffusers/base.py, FastdiffScheduler._fd_step)
// spends ~7 us of Python at the SD-1.5 latent around a ~4 us kernel pass: argument checks, the
// timestep check, buffer allocation, the call of the bound kernel, pred_original_sample, the
// output. For the calls that need none of the Python path's other work this object does the same,
// operation for operation, in one C++ call:
//  * model_output and sample exactly torch.Tensor, float32, on the CPU, of the run's shape, the
//    sample contiguous (then prev_sample and pred_original_sample are float32 too);
//  * a timestep given as a Python float/int or a one-element CPU tensor equal to the call's;
//  * the call's noise, where it draws any, drawn by the scheduler's own _draw_noise (diffusers'
//    generator), called from here, and no variance_noise given (the Python path checks one);
//  * each of the three ways a call reads its sample (base.py, _sample_binding): in place as x
//    (the result written as y into the returned tensor), in place as y (E), or copied into the run's
//    state; pred_original_sample by the same pass as a write-only history slot where the run has no
//    history and the row allows, otherwise formed as the Python path forms it (the same torch op,
//    or the x0 pass of the kernel);
//  * the two-stage classes' stage flag kept by calling their _set_stage.
// Anything else (a CFG-tagged output, another dtype or device, a wrong shape or timestep, ...)
// returns None and the caller runs the Python path, which converts, or raises its own error.
// tests/test_dropin_native.py compares the two paths bit for bit.
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

// How a call reads its sample (base.py's _VIA_STATE, _SAMPLE_AS_X, _SAMPLE_AS_Y).
enum Binding : int { VIA_STATE = 0, SAMPLE_AS_X = 1, SAMPLE_AS_Y = 2 };
// How it forms pred_original_sample: none, by its own pass (a write-only slot), x0 = A_x E + A_d D
// by torch's ops (as the Python path: add for A_x = 1, mul for A_x = 0, else mul + add_), or by
// the kernel's x0 pass (the in-place-as-y call with any other A_x).
enum X0Mode : int { X0_NONE = 0, X0_SLOT = 1, X0_TORCH = 2, X0_PASS = 3 };

struct DropinCall {
  bool served = false;
  int binding = VIA_STATE;
  at::Tensor table;          // the table of its pass (with the x0 slot for X0_SLOT)
  int64_t hist_writes = 0;   // the row's written slots (the run's history), flags as the call runs it
  int64_t flags = 0;
  int x0_mode = X0_NONE;
  double a_x = 0.0, a_d = 0.0;
  py::object noise_dtype;    // None: no draw; else the dtype _draw_noise draws in
  bool second_next = false;  // the next call is a second stage (the stage flag)
};

class DropinStep {
 public:
  // shape, timesteps (the run's, as floats), start (the step index of its first call); x, y, hist:
  // the run's state buffers; x0_pass: the table of the kernel's x0 pass (or None); calls: per call
  // from `start`, None (not served here) or (binding, table, hist_writes, flags, x0_mode, a_x, a_d,
  // noise dtype or None, second_next); float_timesteps: the class refuses integer timesteps;
  // stage: the class keeps a stage flag (_set_stage is called); make_output(prev_sample[, x0]):
  // diffusers' output for return_dict=True.
  DropinStep(std::vector<int64_t> shape, std::vector<double> timesteps, int64_t start, at::Tensor x,
             std::optional<at::Tensor> y, std::optional<at::Tensor> hist, std::optional<at::Tensor> x0_pass,
             const py::list& calls, bool float_timesteps, bool stage, py::object make_output)
      : shape_(std::move(shape)), timesteps_(std::move(timesteps)), start_(start), x_(std::move(x)),
        y_(std::move(y)), hist_(std::move(hist)), x0_pass_(std::move(x0_pass)), float_timesteps_(float_timesteps),
        stage_(stage), make_output_(std::move(make_output)) {
    for (const py::handle c : calls) {
      DropinCall call;
      if (!c.is_none()) {
        py::tuple t = c.cast<py::tuple>();
        TORCH_CHECK_VALUE(t.size() == 9, "DropinStep: a call is (binding, table, hist_writes, flags, x0_mode, a_x, "
                          "a_d, noise dtype, second_next)");
        call.served = true;
        call.binding = t[0].cast<int>();
        call.table = t[1].cast<at::Tensor>();
        call.hist_writes = t[2].cast<int64_t>();
        call.flags = t[3].cast<int64_t>();
        call.x0_mode = t[4].cast<int>();
        call.a_x = t[5].cast<double>();
        call.a_d = t[6].cast<double>();
        call.noise_dtype = t[7];
        call.second_next = t[8].cast<bool>();
        TORCH_CHECK_VALUE(call.binding >= VIA_STATE && call.binding <= SAMPLE_AS_Y && call.x0_mode >= X0_NONE &&
                          call.x0_mode <= X0_PASS && (call.x0_mode != X0_PASS || x0_pass_.has_value()) &&
                          (call.x0_mode != X0_SLOT || call.binding != SAMPLE_AS_Y) &&
                          (call.x0_mode != X0_PASS || call.binding != VIA_STATE),
                          "DropinStep: call ", calls_.size(), " has an unknown binding or x0 mode");
      }
      calls_.push_back(std::move(call));
    }
  }

  // scheduler.step(model_output, timestep, sample, ...) for a served call; None for any other
  // (nothing read or written then).
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
    const at::Tensor& s = THPVariable_Unpack(sample.ptr());
    if (cond.scalar_type() != at::kFloat || s.scalar_type() != at::kFloat || !cond.device().is_cpu() ||
        !s.device().is_cpu() || !s.is_contiguous() || cond.sizes() != at::IntArrayRef(shape_) ||
        s.sizes() != at::IntArrayRef(shape_) || cond.requires_grad() || s.requires_grad())
      return py::none();
    if (!timestep_matches(timestep, timesteps_[i])) return py::none();
    const DropinCall& call = calls_[k];
    const bool draws = !call.noise_dtype.is_none();
    if (draws && !variance_noise.is_none()) return py::none();

    // From here on the call runs (as the Python path: a failure leaves the step index as it was).
    std::optional<at::Tensor> noise;
    if (draws) {
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
    if (call.binding == VIA_STATE) {
      at::Tensor& E = (call.flags & layout::FLAG_EVAL_Y) ? *y_ : x_;
      E.copy_(s);                       // (read every call: no cached copy of the caller's tensor is trusted)
      if (call.x0_mode == X0_TORCH) x0 = torch_x0(call, E, cond);   // (before the pass, which overwrites E)
      if (call.x0_mode == X0_SLOT) {    // (a run without history: x0 is the pass's write-only slot)
        x0 = at::empty(shape_, opts);
        run_pass(call.table, k, x_, y_, cond, x0->unsqueeze(0), 1, call.flags, noise, out);
      } else {
        run_pass(call.table, k, x_, y_, cond, hist_, call.hist_writes, call.flags, noise, out);
      }
    } else {
      if (call.binding == SAMPLE_AS_Y) {
        run_pass(call.table, k, x_, s, cond, hist_, call.hist_writes, call.flags, noise, out);
      } else {                          // the sample as x (read only), the result written as y
        if (call.x0_mode == X0_SLOT) {
          x0 = at::empty(shape_, opts);
          slot = x0->unsqueeze(0);
        }
        run_pass(call.table, k, s, out, cond, slot, slot ? 1 : 0, layout::FLAG_WRITE_Y, noise, std::nullopt);
      }
      if (call.x0_mode == X0_TORCH) x0 = torch_x0(call, s, cond);
      if (call.x0_mode == X0_PASS) {    // (the x0 pass: the sample as x, x0 written as y)
        x0 = at::empty(shape_, opts);
        run_pass(*x0_pass_, k, s, *x0, cond, std::nullopt, 0, layout::FLAG_WRITE_Y, std::nullopt, std::nullopt);
      }
    }
    scheduler.attr("_step_index") = py::int_(i + 1);
    if (stage_) scheduler.attr("_set_stage")(k, call.second_next, sample);
    py::object prev = py::reinterpret_steal<py::object>(THPVariable_Wrap(out));
    if (call.x0_mode == X0_NONE) return return_dict ? make_output_(prev) : py::make_tuple(prev);
    py::object pred = py::reinterpret_steal<py::object>(THPVariable_Wrap(*x0));
    return return_dict ? make_output_(prev, pred) : py::make_tuple(prev, pred);
  }

 private:
  // One pass of the fused step: the row on the given buffers (the model input slot used as the
  // returned tensor where the pass updates the state); the GIL released as the Python binding does.
  void run_pass(const at::Tensor& table, int64_t row, const at::Tensor& x, const std::optional<at::Tensor>& y,
                const at::Tensor& cond, const std::optional<at::Tensor>& hist, int64_t hist_writes, int64_t flags,
                const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& model_in) {
    std::optional<py::gil_scoped_release> nogil;
    if (x.numel() >= kReleaseGilElements) nogil.emplace();
    fused_step(table, row, x, y, cond, std::nullopt, hist, hist_writes, flags, noise, 0, -1, model_in, std::nullopt,
               std::nullopt);
  }

  // x0 = A_x E + A_d D with torch's ops, as base.py's _x0_now / _x0_in_place form it (float32, no CFG).
  static at::Tensor torch_x0(const DropinCall& c, const at::Tensor& E, const at::Tensor& d) {
    if (c.a_x == 1.0) return at::add(E, d, c.a_d);
    if (c.a_x == 0.0) return at::mul(d, c.a_d);
    at::Tensor x0 = at::mul(E, c.a_x);
    x0.add_(d, c.a_d);
    return x0;
  }

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
    const at::ScalarType st = tt.scalar_type();
    if (st == at::kDouble || st == at::kFloat) return tt.item<double>() == want;
    if (float_timesteps_ || !(st == at::kLong || st == at::kInt)) return false;
    const int64_t v = tt.item<int64_t>();
    return (double)v == want && (int64_t)want == v;
  }

  const py::object& device() {
    if (!device_) device_ = py::module_::import("torch").attr("device")("cpu");
    return *device_;
  }

  std::vector<int64_t> shape_;
  std::vector<double> timesteps_;
  int64_t start_;
  at::Tensor x_;
  std::optional<at::Tensor> y_, hist_, x0_pass_;
  bool float_timesteps_, stage_;
  py::object make_output_;
  std::optional<py::object> device_;
  std::vector<DropinCall> calls_;
};

}  // namespace

void bind_dropin_step(py::module& m) {
  py::class_<DropinStep>(m, "DropinStep",
                         "The diffusers drop-ins' step() for their plain calls, in C++ (fastdiff.integrations."
                         "diffusers.base: FastdiffScheduler._fd_step); step() returns None for any other call.")
      .def(py::init<std::vector<int64_t>, std::vector<double>, int64_t, at::Tensor, std::optional<at::Tensor>,
                    std::optional<at::Tensor>, std::optional<at::Tensor>, const py::list&, bool, bool, py::object>(),
           py::arg("shape"), py::arg("timesteps"), py::arg("start"), py::arg("x"), py::arg("y"), py::arg("hist"),
           py::arg("x0_pass"), py::arg("calls"), py::arg("float_timesteps"), py::arg("stage"),
           py::arg("make_output"))
      .def("step", &DropinStep::step, py::arg("scheduler"), py::arg("model_output"), py::arg("timestep"),
           py::arg("sample"), py::arg("return_dict"), py::arg("generator"), py::arg("variance_noise"));
}

}  // namespace fastdiff
