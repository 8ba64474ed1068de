// The ops of fastdiff._C (CPU). Semantics: fastdiff/ops/reference.py and fastdiff/ops/philox.py.
#pragma once

#include <stdint.h>

#include <optional>
#include <vector>

#include <ATen/ATen.h>

namespace fastdiff {

// One row of a coefficient program, in place on x, y, hist, model_in (and bad_row); arguments:
// fastdiff/program/layout.py STEP_ARGS. flags: the row's bitmask (program_layout.h FLAG_*; unknown
// bits are a ValueError, raised before any write). hist_writes: the bitmask of the history slots the
// row writes (slot j from its own out block; 0 <= hist_writes < 2^K, else a ValueError before any
// write); a history term with a zero coefficient is absent (the slot is not read). philox: draw the noise in the kernel from
// (seed, noise_id) (only when noise is absent and noise_id >= 0; the caller passes seed = 0 otherwise).
void fused_step(const at::Tensor& table, int64_t row, const at::Tensor& x, const std::optional<at::Tensor>& y,
                const std::optional<at::Tensor>& cond, const std::optional<at::Tensor>& uncond,
                const std::optional<at::Tensor>& hist, int64_t hist_writes, int64_t flags,
                const std::optional<at::Tensor>& noise, uint64_t seed, int64_t noise_id,
                const std::optional<at::Tensor>& model_in, const std::optional<at::Tensor>& bad_row,
                const std::optional<at::Tensor>& guidance);

// D = uncond + g * (cond - uncond) (D = cond if uncond is absent), float32 math (float64 for
// float64 inputs), as a new contiguous tensor of out_dtype.
at::Tensor cfg_combine(const at::Tensor& cond, const std::optional<at::Tensor>& uncond, double g,
                       at::ScalarType out_dtype);

// Standard normal float32 noise of `shape`: element i (row-major) = z_(i % 4) of group i / 4.
at::Tensor philox_normal(const std::vector<int64_t>& shape, uint64_t seed, int64_t noise_id);

// The raw words: int64 tensor [ceil(numel / 4), 4] of uint32 values; row t is group
// first_group + t (first_group > 0 only to test counters past 2**32 groups).
at::Tensor philox_uint32(int64_t numel, uint64_t seed, int64_t noise_id, uint64_t first_group = 0);

// Per-sample reductions (csrc/cpu/reductions.cpp; semantics: fastdiff/ops/reductions.py). Math in
// float32 (float64 for float64 inputs); each returns a new contiguous tensor of the math dtype.
// D = uncond + g (cond - uncond), then D * (rescale * std(cond) / std(D) + 1 - rescale) per sample.
at::Tensor cfg_rescale(const at::Tensor& cond, const at::Tensor& uncond, double g, double rescale);
// s = the ratio-quantile of |x0| per sample, clamped to [1, max_value]; clamp(x0, -s, s) / s.
at::Tensor dynamic_threshold(const at::Tensor& x0, double ratio, double max_value);
// sqrt(mean(((a - b) / max(atol, rtol * max(|a|, |ref|)))^2)) over the whole batch, a 0-d tensor.
at::Tensor error_norm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ref, double rtol, double atol);
// The L2 norm of each sample, a [B] tensor.
at::Tensor per_sample_norm(const at::Tensor& x);

// Build facts for `fastdiff info`: compiler flags, OpenMP, SIMD width.
std::vector<std::pair<std::string, std::string>> build_info();

}  // namespace fastdiff
