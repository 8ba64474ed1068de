// The Sampler's host work in C++ for the CPU backend (fastdiff/sampler.py): fastdiff._C.RowLoop,
// the row loop, and fastdiff._C.all_finite, the check of the initial noise.
//
// RowLoop runs the rows of Sampler._loop. Per row: at most one model call (the Python callable,
// called from here) and one fused step, with no Python bytecode, argument parsing or view creation
// in Python between them. At 1x4x8x8 the Python loop spent ~1.3 us a row around a ~1 us model call + kernel; this
// loop runs the same rows at the cost of the model call and the kernel alone.
//
// The loop does exactly what the Python loop does for a run without a non-linear guidance hook,
// callback, noise sampler or inpainting (the Sampler uses the Python loop for those), and stops,
// handing back to Python, wherever the Python loop would do more than a plain call:
//  * a model output that is not exactly a torch.Tensor of the expected shape and one of the
//    model dtypes: returned as `pending`; Python converts or rejects it (with its error message)
//    and resumes the loop at the same row with the converted tensor (`given`);
//  * a time budget (the progress bar): the loop returns after the step during which it ran out.
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <vector>

#include "../ops.h"
#include "../program_layout.h"

namespace py = pybind11;

namespace fastdiff {
namespace {

struct LoopRow {
  bool needs_model;      // the row calls the model first
  bool cfg;              // ... on both CFG halves (model_in, t_full), else on the cond half
  int64_t hist_writes;   // bitmask of the history slots the row writes
  int64_t flags;         // the kernel's row flags (program_layout.h)
  int64_t noise_id;
  bool writes_next;      // the epilogue writes the next model input
  bool step_done;        // the last row of a solver step
};

// Above this many elements the kernel runs without the GIL (it may use several threads and take
// long enough for other Python threads to matter); below, dropping and retaking it costs more
// than the kernel.
constexpr int64_t kReleaseGilElements = 1 << 15;

bool is_model_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

class RowLoop {
 public:
  RowLoop(at::Tensor table, std::optional<at::Tensor> y, std::optional<at::Tensor> hist, at::Tensor model_in,
          std::optional<at::Tensor> bad_row, std::optional<at::Tensor> guidance, int64_t batch,
          const py::list& rows, const py::list& t_full, const py::list& t_half)
      : table_(std::move(table)), y_(std::move(y)), hist_(std::move(hist)), model_in_(std::move(model_in)),
        bad_row_(std::move(bad_row)), guidance_(std::move(guidance)), batch_(batch) {
    TORCH_CHECK_VALUE(batch > 0 && (model_in_.size(0) == batch || model_in_.size(0) == 2 * batch),
                      "RowLoop: model_in must hold 1 or 2 batches of ", batch, " samples, got ", model_in_.size(0));
    TORCH_CHECK_VALUE(py::len(t_full) == py::len(rows) && py::len(t_half) == py::len(rows),
                      "RowLoop: one model time per row expected");
    both_ = model_in_.size(0) == 2 * batch;
    py::object cond_in_obj = py::reinterpret_steal<py::object>(
        THPVariable_Wrap(both_ ? model_in_.narrow(0, batch, batch) : model_in_));
    py::object model_in_obj = py::reinterpret_steal<py::object>(THPVariable_Wrap(model_in_));
    const int64_t n = (int64_t)py::len(rows);
    rows_.reserve(n);
    call_args_.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      py::tuple r = rows[i].cast<py::tuple>();
      TORCH_CHECK_VALUE(r.size() == 7, "RowLoop: a row is 7 values, got ", r.size());
      LoopRow row{r[0].cast<bool>(), r[1].cast<bool>(), r[2].cast<int64_t>(), r[3].cast<int64_t>(),
                  r[4].cast<int64_t>(), r[5].cast<bool>(), r[6].cast<bool>()};
      TORCH_CHECK_VALUE(!row.cfg || both_, "RowLoop: row ", i, " calls the model on both CFG halves, but model_in "
                        "holds one batch");
      rows_.push_back(row);
      // The positional arguments of the row's model call, built once: (input, t).
      call_args_.push_back(row.needs_model ? py::make_tuple(row.cfg ? model_in_obj : cond_in_obj,
                                                            row.cfg ? t_full[i] : t_half[i])
                                           : py::tuple());
    }
  }

  // Rows [start, stop) on the state x. `ready`: model_in already holds the first row's input.
  // `budget_s` < 0: no time limit; otherwise return after the first step that ends once budget_s
  // seconds have passed (0: after every step). `given`: the model output of row `start`, already
  // checked by Python (after a `pending` return). Returns (next row, steps completed, pending,
  // ready): pending is the unchecked model output of row `next row` (which has not run), or None;
  // ready is what to pass back with the next call.
  py::tuple run(const at::Tensor& x, const py::object& model, const py::object& kw_both, const py::object& kw_cond,
                int64_t start, int64_t stop, uint64_t seed, bool ready, double budget_s, const py::object& given) {
    const int64_t n = (int64_t)rows_.size();
    TORCH_CHECK_VALUE(0 <= start && start <= stop && stop <= n, "RowLoop.run: rows [", start, ", ", stop,
                      ") outside [0, ", n, "]");
    PyObject* kwb = (kw_both.is_none() || py::len(kw_both) == 0) ? nullptr : kw_both.ptr();
    PyObject* kwc = (kw_cond.is_none() || py::len(kw_cond) == 0) ? nullptr : kw_cond.ptr();
    const bool release_gil = x.numel() >= kReleaseGilElements;
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<int64_t> one(x.sizes().begin(), x.sizes().end());
    std::vector<int64_t> two = one;
    two[0] = 2 * batch_;
    int64_t steps = 0;
    for (int64_t i = start; i < stop; ++i) {
      const LoopRow& r = rows_[i];
      std::optional<at::Tensor> cond, uncond;
      if (r.needs_model) {
        at::Tensor out;
        if (i == start && !given.is_none()) {
          TORCH_CHECK_TYPE(THPVariable_Check(given.ptr()), "RowLoop.run: given must be a tensor");
          out = THPVariable_Unpack(given.ptr());
        } else {
          if (!ready) {
            const at::Tensor& E = (r.flags & layout::FLAG_EVAL_Y) ? *y_ : x;
            model_in_.narrow(0, 0, batch_).copy_(E);
            if (both_) model_in_.narrow(0, batch_, batch_).copy_(E);
          }
          PyObject* res = PyObject_Call(model.ptr(), call_args_[i].ptr(), r.cfg ? kwb : kwc);
          if (res == nullptr) throw py::error_already_set();
          py::object obj = py::reinterpret_steal<py::object>(res);
          const at::IntArrayRef want = r.cfg ? at::IntArrayRef(two) : at::IntArrayRef(one);
          if (!THPVariable_CheckExact(res)) return py::make_tuple(i, steps, obj, true);
          out = THPVariable_Unpack(res);
          if (out.sizes() != want || !is_model_dtype(out.scalar_type())) return py::make_tuple(i, steps, obj, true);
        }
        if (r.cfg) {
          uncond = out.narrow(0, 0, batch_);
          cond = out.narrow(0, batch_, batch_);
        } else {
          cond = out;
        }
      }
      const std::optional<at::Tensor> next_in = r.writes_next ? std::optional<at::Tensor>(model_in_) : std::nullopt;
      const uint64_t s = (r.noise_id >= 0) ? seed : 0;
      {
        std::optional<py::gil_scoped_release> nogil;
        if (release_gil) nogil.emplace();
        fused_step(table_, i, x, y_, cond, uncond, hist_, r.hist_writes, r.flags, std::nullopt, s, r.noise_id, next_in,
                   bad_row_, guidance_);
      }
      ready = r.writes_next;
      if (r.step_done) {
        ++steps;
        if (budget_s >= 0 && i + 1 < stop &&
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() >= budget_s)
          return py::make_tuple(i + 1, steps, py::none(), ready);
      }
    }
    return py::make_tuple(stop, steps, py::none(), ready);
  }

 private:
  at::Tensor table_;
  std::optional<at::Tensor> y_, hist_;
  at::Tensor model_in_;
  std::optional<at::Tensor> bad_row_, guidance_;
  int64_t batch_;
  bool both_ = false;
  std::vector<LoopRow> rows_;
  std::vector<py::tuple> call_args_;
};

// Whether a contiguous tensor holds no NaN or Inf: one pass over the bits (exponent all ones),
// no temporaries, stopping at the first block that has one. The check every Sampler call makes of
// its noise (aminmax + two host reads cost ~5 us at 1x4x8x8, this ~0.3 us).
template <class U>
bool bits_finite(const U* p, int64_t n, U exponent) {
  constexpr int64_t kBlock = 4096;
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t e = std::min(n, s + kBlock);
    U top = 0;          // the largest exponent field: all ones only for NaN / Inf (a max vectorizes)
    for (int64_t i = s; i < e; ++i) {
      const U f = p[i] & exponent;
      top = f > top ? f : top;
    }
    if (top == exponent) return false;
  }
  return true;
}

bool all_finite(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous(), "fastdiff._C.all_finite: a contiguous cpu tensor "
                    "expected, got ", t.device(), t.is_contiguous() ? "" : " (non-contiguous)");
  const int64_t n = t.numel();
  switch (t.scalar_type()) {
    case at::kFloat: return bits_finite(static_cast<const uint32_t*>(t.const_data_ptr()), n, uint32_t(0x7f800000u));
    case at::kDouble:
      return bits_finite(static_cast<const uint64_t*>(t.const_data_ptr()), n, uint64_t(0x7ff0000000000000ull));
    case at::kHalf: return bits_finite(static_cast<const uint16_t*>(t.const_data_ptr()), n, uint16_t(0x7c00u));
    case at::kBFloat16: return bits_finite(static_cast<const uint16_t*>(t.const_data_ptr()), n, uint16_t(0x7f80u));
    default: TORCH_CHECK_TYPE(false, "fastdiff._C.all_finite: float32, float64, float16 or bfloat16 expected, got ",
                              t.scalar_type());
  }
  return true;
}

}  // namespace

void bind_row_loop(py::module& m) {
  m.def("all_finite", &all_finite, py::arg("t"),
        "Whether a contiguous CPU float tensor holds no NaN or Inf (one pass, no temporaries).");
  py::class_<RowLoop>(m, "RowLoop",
                      "The Sampler's row loop for the CPU kernel: model call + fused step per row, in C++ "
                      "(fastdiff.sampler; semantics: Sampler._loop's Python loop).")
      .def(py::init<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>, at::Tensor,
                    std::optional<at::Tensor>, std::optional<at::Tensor>, int64_t, const py::list&, const py::list&,
                    const py::list&>(),
           py::arg("table"), py::arg("y"), py::arg("hist"), py::arg("model_in"), py::arg("bad_row"),
           py::arg("guidance"), py::arg("batch"), py::arg("rows"), py::arg("t_full"), py::arg("t_half"))
      .def("run", &RowLoop::run, py::arg("x"), py::arg("model"), py::arg("kw_both"), py::arg("kw_cond"),
           py::arg("start"), py::arg("stop"), py::arg("seed"), py::arg("ready"), py::arg("budget_s"),
           py::arg("given"));
}

}  // namespace fastdiff
