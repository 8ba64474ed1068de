// Per-sample reductions beside the fused step, on the CPU (semantics and reference
// implementations: fastdiff/ops/reductions.py). "Per sample" = over every dimension but the first.
//
//   cfg_rescale        CFG, then the std rescale of Lin et al. (per-sample std of cond and of D)
//   dynamic_threshold  Imagen's dynamic thresholding (per-sample quantile of |x0|, clamp, divide)
//   error_norm         the scaled RMS error norm of adaptive step-size control (a 0-d tensor)
//   per_sample_norm    per-sample L2 norms
//
// Math dtype as the reference's: float32 for float32/float16/bfloat16 inputs (converted to
// float32 in L1 block buffers, convert.h), float64 for float64 inputs; results are new contiguous
// tensors of that dtype. Non-contiguous inputs are read through a contiguous copy.
//
// Work split: each sample is cut into pieces of a fixed number of elements; OpenMP runs over the
// pieces of all samples (dynamic schedule), and per-sample results merge the pieces' partial
// results in order. The piece size does not depend on the thread count, so neither do the
// floating-point sums: results are bitwise reproducible across runs and thread counts.
//
// Exactness against the reference:
// * cfg_rescale: D = u + g (c - u) in the reference's float32 operations. The stds come from
//   float64 block means and squared deviations merged with Chan et al.'s formula (a large mean does
//   not cancel the variance away), rounded once to the math dtype, as torch.std (which accumulates
//   float32 in float64) does; the factor rescale * std_c / std_d + (1 - rescale) and D * factor are
//   the reference's float32 operations. Equal to the reference bit for bit unless two float64 sums
//   of different order straddle a float32 rounding boundary.
// * dynamic_threshold: exact, bit for bit. For non-negative floats (including inf and NaN) the bit
//   pattern orders like the value, NaN largest as in torch.kthvalue; a histogram of the top 12
//   bits of |x|'s pattern finds the bucket(s) holding the two order statistics torch.quantile
//   interpolates, std::nth_element selects inside them, and ATen's own lerp and clamp turn the
//   [B] order statistics into the threshold, as the reference does.
// * error_norm, per_sample_norm: the reference's elementwise float32 operations; the sums of
//   squares run in float64 (torch sums in float32), so results agree to about 1 ulp.
#include "../ops.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "convert.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastdiff {
namespace {

constexpr int64_t BLK = 512;                  // elements per L1 block buffer
constexpr int64_t PIECE = 32 * BLK;           // elements per work item (floating-point sums)
constexpr int64_t HIST_PIECE = 128 * BLK;     // elements per work item of the quantile histogram
constexpr int64_t SERIAL_MAX = 32768;         // below this many elements, no OpenMP fork
constexpr int HIST_BITS = 12;                 // histogram of the top 12 bits of |x|'s pattern
constexpr int64_t HIST_BINS = int64_t(1) << HIST_BITS;

// ---------------------------------------------------------------------------------------------
// Work split and loads
// ---------------------------------------------------------------------------------------------

// Piece i covers elements [begin(i), end(i)) of sample sample(i); samples are n elements apart.
struct Pieces {
  int64_t B, n, size, per_sample;
  Pieces(int64_t B_, int64_t n_, int64_t size_) : B(B_), n(n_), size(size_), per_sample((n_ + size_ - 1) / size_) {}
  int64_t count() const { return B * per_sample; }
  int64_t sample(int64_t i) const { return i / per_sample; }
  int64_t begin(int64_t i) const { return (i % per_sample) * size; }
  int64_t end(int64_t i) const { return std::min(begin(i) + size, n); }
};

// fn(i) for every piece; fn must not throw (it runs inside an OpenMP region).
template <class F>
void for_pieces(const Pieces& P, F fn) {
  const int64_t items = P.count();
  const int nt = at::get_num_threads();
  if (P.B * P.n < SERIAL_MAX || nt <= 1 || items < 2) {
    for (int64_t i = 0; i < items; ++i) fn(i);
    return;
  }
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t i = 0; i < items; ++i) fn(i);
}

// fn(b) for every sample, in parallel when the work is large enough.
template <class F>
void for_samples(int64_t B, int64_t work, F fn) {
  const int nt = at::get_num_threads();
  if (work < SERIAL_MAX || nt <= 1 || B < 2) {
    for (int64_t b = 0; b < B; ++b) fn(b);
    return;
  }
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) fn(b);
}

// k elements of In at src in the math dtype M: src itself if In is M, else converted into buf.
template <class In, class M>
inline const M* load_block(const In* src, M* buf, int64_t k) {
  if constexpr (std::is_same<In, M>::value) {
    (void)buf;
    (void)k;
    return src;
  } else {
    static_assert(std::is_same<M, float>::value, "reduced-precision inputs are converted to float32");
    cpu::Conv<In>::load(src, buf, k);
    return buf;
  }
}

// Calls f(In*, M*) (null pointers as type tags) for the input dtype: float32/float16/bfloat16
// inputs with float32 math, float64 with float64 math.
template <class F>
void dispatch_dtype(at::ScalarType st, F f) {
  switch (st) {
    case at::kFloat: f((const float*)nullptr, (float*)nullptr); break;
    case at::kHalf: f((const c10::Half*)nullptr, (float*)nullptr); break;
    case at::kBFloat16: f((const c10::BFloat16*)nullptr, (float*)nullptr); break;
    case at::kDouble: f((const double*)nullptr, (double*)nullptr); break;
    default: TORCH_CHECK(false, "fastdiff._C: unchecked dtype ", st);   // inputs are checked before
  }
}

at::ScalarType math_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// ---------------------------------------------------------------------------------------------
// Checks (all before any work; the messages name the op and the tensor)
// ---------------------------------------------------------------------------------------------
void check_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastdiff._C.", op, ": ", name, " must be a CPU tensor, got a tensor on ",
                    t.device());
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, "fastdiff._C.", op,
                   ": ", name, " must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) >= 1 && t.numel() > 0, "fastdiff._C.", op, ": ", name,
                    " must have a non-empty batch dimension and elements, got shape ", t.sizes());
}

void check_like(const at::Tensor& t, const char* op, const char* name, const at::Tensor& like, const char* like_name) {
  check_input(t, op, name);
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "fastdiff._C.", op, ": ", name, " must have the dtype of ",
                   like_name, " (", like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), "fastdiff._C.", op, ": ", name, " must have the shape of ", like_name, " ",
                    like.sizes(), ", got ", t.sizes());
}

// ---------------------------------------------------------------------------------------------
// cfg_rescale
// ---------------------------------------------------------------------------------------------

// Count, mean and sum of squared deviations of a sequence; blocks are added two-pass (mean,
// then deviations) and merged with Chan et al.'s pairwise formula, all in float64.
struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;

  void merge(const Moments& o) {
    if (o.n == 0.0) return;
    const double N = n + o.n, delta = o.mean - mean;
    mean += delta * (o.n / N);
    m2 += o.m2 + delta * delta * (n * o.n / N);
    n = N;
  }

  template <class M>
  void add_block(const M* v, int64_t k) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < k; ++j) s += (double)v[j];
    const double mb = s / (double)k;
    double q = 0.0;
#pragma omp simd reduction(+ : q)
    for (int64_t j = 0; j < k; ++j) {
      const double d = (double)v[j] - mb;
      q += d * d;
    }
    merge(Moments{(double)k, mb, q});
  }

  // torch.std's value: Bessel's correction (NaN for one element, as torch), sqrt in float64.
  double std_dev() const { return std::sqrt(m2 / (n - 1.0)); }
};

template <class In, class M>
void cfg_rescale_kernel(const In* c, const In* u, M* out, int64_t B, int64_t n, double g, double rescale) {
  const M gm = (M)g;
  const bool rescaled = rescale != 0.0;
  const Pieces P(B, n, PIECE);
  std::vector<Moments> mc(rescaled ? P.count() : 0), md(rescaled ? P.count() : 0);
  for_pieces(P, [&](int64_t i) {
    const int64_t off = P.sample(i) * n;
    alignas(64) M cb[BLK];
    alignas(64) M ub[BLK];
    for (int64_t s = P.begin(i); s < P.end(i); s += BLK) {
      const int64_t k = std::min(BLK, P.end(i) - s);
      const M* C = load_block(c + off + s, cb, k);
      const M* U = load_block(u + off + s, ub, k);
      M* D = out + off + s;
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) D[j] = U[j] + gm * (C[j] - U[j]);   // = reference's u + g * (c - u)
      if (rescaled) {
        mc[i].add_block(C, k);
        md[i].add_block(D, k);
      }
    }
  });
  if (!rescaled) return;

  // factor = rescale * ratio + (1 - rescale), ratio = std_c / std_d (1 where std_d is not > 0),
  // in the reference's math-dtype operations.
  const M phi = (M)rescale, keep = (M)(1.0 - rescale);
  std::vector<M> factor(B);
  for (int64_t b = 0; b < B; ++b) {
    Moments sc, sd;
    for (int64_t p = 0; p < P.per_sample; ++p) {
      sc.merge(mc[b * P.per_sample + p]);
      sd.merge(md[b * P.per_sample + p]);
    }
    const M std_c = (M)sc.std_dev(), std_d = (M)sd.std_dev();
    const M ratio = std_d > (M)0 ? std_c / std_d : (M)1;
    factor[b] = phi * ratio + keep;
  }
  for_pieces(P, [&](int64_t i) {
    const M f = factor[P.sample(i)];
    M* D = out + P.sample(i) * n;
#pragma omp simd
    for (int64_t j = P.begin(i); j < P.end(i); ++j) D[j] = D[j] * f;
  });
}

// ---------------------------------------------------------------------------------------------
// dynamic_threshold
// ---------------------------------------------------------------------------------------------
template <class M>
struct Magnitude;   // the bit pattern of |v| as an unsigned integer that orders like |v|
template <>
struct Magnitude<float> {
  using U = uint32_t;
  static constexpr int BITS = 31;
};
template <>
struct Magnitude<double> {
  using U = uint64_t;
  static constexpr int BITS = 63;
};

template <class M>
inline typename Magnitude<M>::U magnitude_key(M v) {
  using U = typename Magnitude<M>::U;
  U bits;
  std::memcpy(&bits, &v, sizeof(U));
  return bits & (~U(0) >> 1);
}

template <class M>
inline M from_key(typename Magnitude<M>::U key) {
  M v;
  std::memcpy(&v, &key, sizeof(M));
  return v;
}

// Appends the keys of v[0 .. k) whose bin (key >> SHIFT) is bl or bh to dst; returns the new end.
template <class M, int SHIFT>
inline typename Magnitude<M>::U* collect_keys(const M* v, int64_t k, typename Magnitude<M>::U bl,
                                              typename Magnitude<M>::U bh, typename Magnitude<M>::U* dst) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same<M, float>::value) {   // compress-store: no branch per element (~3x faster)
    const __m512i vbl = _mm512_set1_epi32((int)bl), vbh = _mm512_set1_epi32((int)bh);
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    for (; j + 16 <= k; j += 16) {
      const __m512i key = _mm512_and_si512(_mm512_loadu_si512(v + j), magnitude);
      const __m512i bin = _mm512_srli_epi32(key, SHIFT);
      const __mmask16 hit = _mm512_cmpeq_epi32_mask(bin, vbl) | _mm512_cmpeq_epi32_mask(bin, vbh);
      _mm512_mask_compressstoreu_epi32(dst, hit, key);
      dst += __builtin_popcount((unsigned)hit);
    }
  }
#endif
  for (; j < k; ++j) {
    const typename Magnitude<M>::U key = magnitude_key(v[j]), bin = key >> SHIFT;
    if (bin == bl || bin == bh) *dst++ = key;
  }
  return dst;
}

// The (lo, hi) order statistics (0-based ranks) of |x| in each sample, exactly; hi = lo when
// no interpolation is needed.
template <class In, class M>
void abs_order_statistics(const In* x, int64_t B, int64_t n, int64_t lo, int64_t hi, M* v_lo, M* v_hi) {
  using U = typename Magnitude<M>::U;
  constexpr int SHIFT = Magnitude<M>::BITS - HIST_BITS;
  const Pieces P(B, n, HIST_PIECE);

  // Pass 1: a histogram of the top bits per piece (integers: any split gives the same counts).
  // Counted into 4 interleaved uint16 sub-histograms (32 KB, in L1): increments of the same bin
  // by consecutive elements go to different counters instead of waiting on each other.
  static_assert(HIST_PIECE / 4 <= 65535, "a uint16 sub-histogram counts at most HIST_PIECE / 4 elements");
  std::vector<int64_t> hist(P.count() * HIST_BINS, 0);
  for_pieces(P, [&](int64_t i) {
    const In* xs = x + P.sample(i) * n;
    alignas(64) uint16_t h0[4 * HIST_BINS] = {};
    alignas(64) M buf[BLK];
    alignas(64) uint32_t bins[BLK];
    for (int64_t s = P.begin(i); s < P.end(i); s += BLK) {
      const int64_t k = std::min(BLK, P.end(i) - s);
      const M* v = load_block(xs + s, buf, k);
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) bins[j] = (uint32_t)(magnitude_key(v[j]) >> SHIFT) + (uint32_t)(j & 3) * HIST_BINS;
      for (int64_t j = 0; j < k; ++j) ++h0[bins[j]];
    }
    int64_t* h = hist.data() + i * HIST_BINS;
    for (int64_t r = 0; r < HIST_BINS; ++r) h[r] = (int64_t)h0[r] + h0[r + HIST_BINS] + h0[r + 2 * HIST_BINS] + h0[r + 3 * HIST_BINS];
  });

  // Per sample: the bins holding ranks lo and hi, and the rank of lo among their elements.
  std::vector<int64_t> bin_lo(B), bin_hi(B), rank_in(B), cand_begin(B + 1, 0);
  std::vector<int64_t> piece_offset(P.count());   // where piece i's candidates go
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> total(HIST_BINS, 0);
    for (int64_t p = 0; p < P.per_sample; ++p) {
      const int64_t* h = hist.data() + (b * P.per_sample + p) * HIST_BINS;
      for (int64_t r = 0; r < HIST_BINS; ++r) total[r] += h[r];
    }
    int64_t below = 0, r = 0;
    while (below + total[r] <= lo) below += total[r++];
    bin_lo[b] = r;
    rank_in[b] = lo - below;
    int64_t below_hi = below, rh = r;
    while (below_hi + total[rh] <= hi) below_hi += total[rh++];
    bin_hi[b] = rh;
    int64_t count = 0;
    for (int64_t p = 0; p < P.per_sample; ++p) {
      const int64_t* h = hist.data() + (b * P.per_sample + p) * HIST_BINS;
      piece_offset[b * P.per_sample + p] = cand_begin[b] + count;
      count += h[r] + (rh != r ? h[rh] : 0);
    }
    cand_begin[b + 1] = cand_begin[b] + count;
  }

  // Pass 2: the elements of those bins, each piece into its own slice.
  std::vector<U> cand(cand_begin[B]);
  for_pieces(P, [&](int64_t i) {
    const int64_t b = P.sample(i);
    const In* xs = x + b * n;
    const U bl = (U)bin_lo[b], bh = (U)bin_hi[b];
    U* dst = cand.data() + piece_offset[i];
    alignas(64) M buf[BLK];
    for (int64_t s = P.begin(i); s < P.end(i); s += BLK) {
      const int64_t k = std::min(BLK, P.end(i) - s);
      dst = collect_keys<M, SHIFT>(load_block(xs + s, buf, k), k, bl, bh, dst);
    }
  });

  // Selection inside the candidates: rank lo is rank_in[b] among them, hi the next one.
  for_samples(B, cand_begin[B], [&](int64_t b) {
    U* first = cand.data() + cand_begin[b];
    U* last = cand.data() + cand_begin[b + 1];
    U* nth = first + rank_in[b];
    std::nth_element(first, nth, last);
    v_lo[b] = from_key<M>(*nth);
    v_hi[b] = hi == lo ? v_lo[b] : from_key<M>(*std::min_element(nth + 1, last));
  });
}

template <class In, class M>
void clamp_divide_kernel(const In* x, const M* thr, M* out, int64_t B, int64_t n) {
  const Pieces P(B, n, PIECE);
  for_pieces(P, [&](int64_t i) {
    const int64_t off = P.sample(i) * n;
    const M s = thr[P.sample(i)], ns = -s;
    alignas(64) M buf[BLK];
    for (int64_t b0 = P.begin(i); b0 < P.end(i); b0 += BLK) {
      const int64_t k = std::min(BLK, P.end(i) - b0);
      const M* v = load_block(x + off + b0, buf, k);
      M* o = out + off + b0;
      if (std::isnan(s)) {   // torch.minimum/maximum propagate a NaN threshold
        std::fill(o, o + k, std::numeric_limits<M>::quiet_NaN());
        continue;
      }
      // torch.maximum(torch.minimum(x, s), -s) / s; a NaN x stays NaN (the operand order matters)
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) {
        const M m = s < v[j] ? s : v[j];
        o[j] = (m < ns ? ns : m) / s;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Sums of squares (error_norm, per_sample_norm)
// ---------------------------------------------------------------------------------------------

// Per-sample float64 sums of v^2, v = x (scaled = false) or the scaled difference
// (a - b) / max(rtol * max(|a|, |ref|), atol) in the math dtype (scaled = true).
template <class In, class M>
std::vector<double> sum_squares(const In* a, const In* bq, const In* ref, int64_t B, int64_t n, bool scaled, double rtol,
                                double atol) {
  const Pieces P(B, n, PIECE);
  std::vector<double> part(P.count(), 0.0);
  const M rt = (M)rtol, at_ = (M)atol;
  for_pieces(P, [&](int64_t i) {
    const int64_t off = P.sample(i) * n;
    alignas(64) M ab[BLK];
    alignas(64) M bb[BLK];
    alignas(64) M rb[BLK];
    alignas(64) M vb[BLK];
    double acc = 0.0;
    for (int64_t s = P.begin(i); s < P.end(i); s += BLK) {
      const int64_t k = std::min(BLK, P.end(i) - s);
      const M* A = load_block(a + off + s, ab, k);
      const M* v = A;
      if (scaled) {
        const M* Bv = load_block(bq + off + s, bb, k);
        const M* R = load_block(ref + off + s, rb, k);
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) {
          const M aa = std::abs(A[j]), ar = std::abs(R[j]);
          const M m = aa > ar ? aa : ar;                // torch.maximum (NaN |ref| propagates)
          const M t = rt * m;
          const M delta = t < at_ ? at_ : t;            // clamp(min=atol) (NaN propagates)
          vb[j] = (A[j] - Bv[j]) / delta;
        }
        v = vb;
      }
      double q = 0.0;
#pragma omp simd reduction(+ : q)
      for (int64_t j = 0; j < k; ++j) q += (double)v[j] * (double)v[j];
      acc += q;
    }
    part[i] = acc;
  });
  std::vector<double> sums(B, 0.0);
  for (int64_t i = 0; i < P.count(); ++i) sums[P.sample(i)] += part[i];
  return sums;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------
at::Tensor cfg_rescale(const at::Tensor& cond, const at::Tensor& uncond, double g, double rescale) {
  check_input(cond, "cfg_rescale", "cond");
  check_like(uncond, "cfg_rescale", "uncond", cond, "cond");
  TORCH_CHECK_VALUE(std::isfinite(g), "fastdiff._C.cfg_rescale: g must be finite, got ", g);
  TORCH_CHECK_VALUE(rescale >= 0.0 && rescale <= 1.0, "fastdiff._C.cfg_rescale: rescale must lie in [0, 1], got ",
                    rescale);
  const at::Tensor C = cond.contiguous(), U = uncond.contiguous();
  at::Tensor out = at::empty(cond.sizes(), cond.options().dtype(math_dtype(cond)));
  const int64_t B = cond.size(0), n = cond.numel() / B;
  dispatch_dtype(cond.scalar_type(), [&](auto in_tag, auto m_tag) {
    using In = std::remove_const_t<std::remove_pointer_t<decltype(in_tag)>>;
    using M = std::remove_pointer_t<decltype(m_tag)>;
    cfg_rescale_kernel<In, M>(static_cast<const In*>(C.data_ptr()), static_cast<const In*>(U.data_ptr()),
                              static_cast<M*>(out.data_ptr()), B, n, g, rescale);
  });
  return out;
}

at::Tensor dynamic_threshold(const at::Tensor& x0, double ratio, double max_value) {
  check_input(x0, "dynamic_threshold", "x0");
  TORCH_CHECK_VALUE(ratio > 0.0 && ratio <= 1.0, "fastdiff._C.dynamic_threshold: ratio must lie in (0, 1], got ", ratio);
  TORCH_CHECK_VALUE(max_value > 0.0, "fastdiff._C.dynamic_threshold: max_value must be > 0, got ", max_value);
  const at::Tensor X = x0.contiguous();
  const at::ScalarType md = math_dtype(x0);
  const int64_t B = x0.size(0), n = x0.numel() / B;
  // The interpolation of torch.quantile (as reference_per_sample_abs_quantile): float64 position.
  const double pos = ratio * (double)(n - 1);
  const int64_t lo = (int64_t)std::floor(pos);
  const int64_t hi = std::min(lo + 1, n - 1);
  const bool interpolate = !(hi == lo || pos == (double)lo);
  at::Tensor v_lo = at::empty({B}, x0.options().dtype(md));
  at::Tensor v_hi = at::empty({B}, x0.options().dtype(md));
  at::Tensor out = at::empty(x0.sizes(), x0.options().dtype(md));
  dispatch_dtype(x0.scalar_type(), [&](auto in_tag, auto m_tag) {
    using In = std::remove_const_t<std::remove_pointer_t<decltype(in_tag)>>;
    using M = std::remove_pointer_t<decltype(m_tag)>;
    abs_order_statistics<In, M>(static_cast<const In*>(X.data_ptr()), B, n, lo, interpolate ? hi : lo,
                                static_cast<M*>(v_lo.data_ptr()), static_cast<M*>(v_hi.data_ptr()));
  });
  // The threshold with ATen's own lerp and clamp on the [B] order statistics (the reference's
  // operations on tensors of the same shape, hence its rounding).
  at::Tensor s = interpolate ? at::lerp(v_lo, v_hi, pos - (double)lo) : v_lo;
  s = at::clamp(s, 1.0, max_value).contiguous();
  dispatch_dtype(x0.scalar_type(), [&](auto in_tag, auto m_tag) {
    using In = std::remove_const_t<std::remove_pointer_t<decltype(in_tag)>>;
    using M = std::remove_pointer_t<decltype(m_tag)>;
    clamp_divide_kernel<In, M>(static_cast<const In*>(X.data_ptr()), static_cast<const M*>(s.data_ptr()),
                               static_cast<M*>(out.data_ptr()), B, n);
  });
  return out;
}

at::Tensor error_norm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ref, double rtol, double atol) {
  check_input(a, "error_norm", "a");
  check_like(b, "error_norm", "b", a, "a");
  check_like(ref, "error_norm", "ref", a, "a");
  TORCH_CHECK_VALUE(rtol > 0.0 && std::isfinite(rtol), "fastdiff._C.error_norm: rtol must be finite and > 0, got ", rtol);
  TORCH_CHECK_VALUE(atol > 0.0 && std::isfinite(atol), "fastdiff._C.error_norm: atol must be finite and > 0, got ", atol);
  const at::Tensor A = a.contiguous(), Bt = b.contiguous(), R = ref.contiguous();
  const int64_t B = a.size(0), n = a.numel() / B;
  at::Tensor out = at::empty({}, a.options().dtype(math_dtype(a)));
  dispatch_dtype(a.scalar_type(), [&](auto in_tag, auto m_tag) {
    using In = std::remove_const_t<std::remove_pointer_t<decltype(in_tag)>>;
    using M = std::remove_pointer_t<decltype(m_tag)>;
    const std::vector<double> sums =
        sum_squares<In, M>(static_cast<const In*>(A.data_ptr()), static_cast<const In*>(Bt.data_ptr()),
                           static_cast<const In*>(R.data_ptr()), B, n, true, rtol, atol);
    double total = 0.0;
    for (double v : sums) total += v;
    // the reference: vector_norm (rounded to M), then / sqrt(numel) in M
    *static_cast<M*>(out.data_ptr()) = (M)std::sqrt(total) / (M)std::sqrt((double)a.numel());
  });
  return out;
}

at::Tensor per_sample_norm(const at::Tensor& x) {
  check_input(x, "per_sample_norm", "x");
  const at::Tensor X = x.contiguous();
  const int64_t B = x.size(0), n = x.numel() / B;
  at::Tensor out = at::empty({B}, x.options().dtype(math_dtype(x)));
  dispatch_dtype(x.scalar_type(), [&](auto in_tag, auto m_tag) {
    using In = std::remove_const_t<std::remove_pointer_t<decltype(in_tag)>>;
    using M = std::remove_pointer_t<decltype(m_tag)>;
    const std::vector<double> sums =
        sum_squares<In, M>(static_cast<const In*>(X.data_ptr()), nullptr, nullptr, B, n, false, 0.0, 0.0);
    M* o = static_cast<M*>(out.data_ptr());
    for (int64_t b = 0; b < B; ++b) o[b] = (M)std::sqrt(sums[b]);
  });
  return out;
}

}  // namespace fastdiff
