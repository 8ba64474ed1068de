"""ComfyUI's schedulers (its SCHEDULER_HANDLERS and custom-sampling scheduler nodes) as fastdiff spacings.

Each is a float64 function of the step count that gives the noise levels ComfyUI gives, in
ComfyUI's "sigma" units: the k-diffusion noise level ``ksigma`` for VP / VE models, and the
flow-matching time ``t`` (alpha = 1 - t, sigma = t) for flow models. ``make_grid(schedule, steps,
name)`` turns them into a fastdiff ``Grid``; ``fastdiff.integrations.k_diffusion.get_sigmas_<name>``
returns them as ComfyUI does (a tensor of noise levels, with ComfyUI's final 0).

Several of ComfyUI's schedulers read the model's discrete table of training noise levels
(``model_sampling.sigmas``, ascending). On a fastdiff schedule that table is:

* ``DiscreteVP``: ``ksigma(t)`` at t = 0 .. T-1 (ComfyUI's ModelSamplingDiscrete); its
  ``timestep(sigma)`` is the nearest table index in log sigma, ``sigma(t)`` interpolates log sigma
  linearly (fastdiff's DiscreteVP does the same). A zero-terminal-SNR schedule has an infinite top
  level and is refused (ComfyUI replaces it by an arbitrary finite value).
* ``FlowMatching``: the shifted times ``time_shift(k / T)`` for k = 1 .. T (ComfyUI's
  ModelSamplingDiscreteFlow; ``shift`` / ``mu`` of make_grid give SD3's / Flux's shift). As in
  ComfyUI, its ``timestep(sigma) = T sigma`` does not undo the shift while ``sigma(timestep)``
  applies it, so ``normal`` / ``sgm_uniform`` on a shifted flow end at ``shift(shift(1/T))``.
* ``VESchedule`` / ``ContinuousVP``: 1000 levels uniform in log ksigma between the schedule's
  ends (ComfyUI's ModelSamplingContinuousEDM table). ``normal`` / ``sgm_uniform`` are uniform in
  ComfyUI's EDM timestep 0.25 log sigma for VE, and uniform in the schedule's own time for
  ContinuousVP (ComfyUI has no such model).

Sources (formulas and tables taken from ComfyUI's ``comfy/samplers.py``,
``comfy/k_diffusion/sampling.py``, ``comfy/model_sampling.py``, ``comfy_extras/nodes_custom_sampler.py``,
``nodes_align_your_steps.py``, ``nodes_gits.py``, ``nodes_optimalsteps.py``, ``nodes_flux.py``,
``nodes_model_advanced.py``; the published tables are in ``fastdiff/data/comfy_schedules.json``):

=================  ==========================================================================
simple             every (T / steps)-th table level from the top (``simple_scheduler``)
sgm_uniform        ``normal`` over steps + 1 points, the last dropped (SGM / SDXL-Turbo)
normal             uniform in the model's timestep between the table's ends (``normal_scheduler``)
ddim_uniform       every (T // steps)-th table level from index 1 (``ddim_scheduler``); ComfyUI's
                   count: ceil((T - 1) / (T // steps)) steps, e.g. 8 for steps = 7 at T = 1000
beta               table levels at the Beta(alpha, beta) quantiles of 1 - i / steps (Lee et al.,
                   arXiv 2407.12173; ``beta_scheduler``, alpha = beta = 0.6), rounded to table
                   indices, repeats dropped (so fewer steps where two quantiles round together)
linear_quadratic   Mochi's schedule: linear to threshold_noise over the first half, then quadratic
                   (``linear_quadratic_schedule``), times the table's largest level
kl_optimal         tan of a linear ramp in arctan(sigma) (``kl_optimal_scheduler``; AYS / A1111 #15608)
laplace            log sigma at Laplace(mu, beta) quantiles, clamped to the range
                   (``get_sigmas_laplace``, Tiankai et al. 2024)
polyexponential    log sigma a power rho of the ramp (k-diffusion's ``get_sigmas_polyexponential``)
sd_turbo           table levels at timesteps 999, 899, ..., 99 (``SDTurboScheduler``; steps <= 10)
align_your_steps   Align Your Steps tables SD1 / SDXL / SVD (Sabour et al., arXiv 2404.14507)
gits               GITS tables for coeff 0.80 .. 1.50 (Chen et al., arXiv 2405.11326; SD1.5 sigmas)
optimal_steps      OptimalSteps tables FLUX / Wan / Chroma (Pei et al., arXiv 2503.21774; flow t)
flux               Flux.1: linspace(1, 0, steps + 1) under the exponential shift e^mu, mu linear in
                   the image sequence length (diffusers' ``calculate_shift``, ComfyUI's ModelSamplingFlux)
flux2              Flux.2: the same with mu from the sequence length *and* the step count
                   (``compute_empirical_mu`` of ComfyUI's Flux2Scheduler / diffusers' Flux2 pipeline)
=================  ==========================================================================

The published tables hold n + 1 levels for their n-step schedule; another step count gets
``loglinear_interp`` (AYS's recipe: log sigma interpolated linearly on a uniform ramp), which keeps
both end points and is the table itself at the published count. As in ComfyUI, the table's last
(smallest) level is replaced by the grid's final point (0 by default); ``final="none"`` keeps it.
"""
from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from typing import Optional

import numpy as np

from .schedules import (COMFY_SPACINGS, DiscreteVP, FlowMatching, Grid, Schedule, VESchedule,
                        _integer, _real, _shift_factor, time_shift)

__all__ = [
    "COMFY_SPACINGS", "ComfySampling", "loglinear_interp", "published_table", "table_names",
    "simple_indices", "ddim_uniform_indices", "beta_indices", "normal_timesteps", "linear_quadratic_levels",
    "kl_optimal_levels", "laplace_levels", "polyexponential_levels", "SD_TURBO_TIMESTEPS", "sd_turbo_timesteps",
    "table_levels", "flux_mu", "flux2_mu", "flux_levels", "comfy_grid", "as_comfy_sampling", "comfy_sigmas",
]

_DATA = os.path.join(os.path.dirname(__file__), "data", "comfy_schedules.json")
TABLE_FAMILIES = ("align_your_steps", "gits", "optimal_steps")
DEFAULT_MODEL = {"align_your_steps": "SD1", "optimal_steps": "FLUX"}
GITS_DEFAULT_COEFF = 1.20


@lru_cache(maxsize=1)
def _tables() -> dict:
    with open(_DATA, "r", encoding="utf-8") as f:
        return json.load(f)


def table_names(family: str) -> tuple:
    """The model names (align_your_steps, optimal_steps) or coefficients (gits, as '0.80' ...) of a family."""
    if family not in TABLE_FAMILIES:
        raise ValueError(f"unknown table family {family!r}; expected one of {', '.join(TABLE_FAMILIES)}")
    return tuple(k for k in _tables()[family] if not k.startswith("_") and k != "units")


def _table_key(family: str, model) -> str:
    names = table_names(family)
    if family == "gits":
        c = _real("coeff", GITS_DEFAULT_COEFF if model is None else model)
        key = f"{round(c, 2):.2f}"
        if key not in names or abs(c - float(key)) > 1e-9:
            raise ValueError(f"GITS has tables for coeff {', '.join(names)} (ComfyUI's range 0.80-1.50 in steps of "
                             f"0.05), got {model!r}")
        return key
    model = DEFAULT_MODEL[family] if model is None else model
    if not isinstance(model, str):
        raise TypeError(f"model must be a string, one of {', '.join(names)}; got {type(model).__name__}")
    aliases = {"sd1.5": "SD1", "sd15": "SD1"}
    want = aliases.get(model.lower(), model).lower()
    for n in names:
        if n.lower() == want:
            return n
    raise ValueError(f"unknown {family} model {model!r}; expected one of {', '.join(names)}")


def published_table(family: str, model=None, steps: Optional[int] = None) -> np.ndarray:
    """A published table as float64, from the noisiest level to the cleanest (family ``gits``:
    ``model`` is the coeff and ``steps`` picks the row, 2..20; None gives the 20-step row)."""
    key = _table_key(family, model)
    entry = _tables()[family][key]
    if family == "gits":
        if steps is None:
            return np.array(entry[-1], dtype=np.float64)
        steps = _integer("steps", steps, 2)
        if steps - 2 >= len(entry):
            raise ValueError(f"GITS publishes 2..{len(entry) + 1} steps, got {steps}")
        return np.array(entry[steps - 2], dtype=np.float64)
    return np.array(entry, dtype=np.float64)


def loglinear_interp(levels, num: int) -> np.ndarray:
    """Log-linear interpolation of decreasing positive ``levels`` to ``num`` points (AYS's recipe):
    log sigma interpolated linearly against a uniform ramp; both ends are kept."""
    levels = np.asarray(levels, dtype=np.float64)
    num = _integer("num", num, 2)
    xs = np.linspace(0.0, 1.0, levels.size)
    ys = np.log(levels[::-1])
    return np.exp(np.interp(np.linspace(0.0, 1.0, num), xs, ys))[::-1].copy()


def table_levels(family: str, steps: int, model=None) -> np.ndarray:
    """The ``steps + 1`` levels (last = the table's smallest, not 0) of a published family for
    ``steps`` steps: the table at its published count, else its log-linear interpolation (GITS:
    the published row for 2..20 steps, the 20-step row interpolated beyond, as ComfyUI does)."""
    if family == "gits":
        steps = _integer("steps", steps, 2)
        if steps <= 20:
            return published_table("gits", model, steps)
        return loglinear_interp(published_table("gits", model), steps + 1)
    steps = _integer("steps", steps, 1)
    table = published_table(family, model)
    return table.copy() if table.size == steps + 1 else loglinear_interp(table, steps + 1)


# ---------------------------------------------------------------------------------------------
# ComfyUI's scheduler formulas (float64; "table" is the model's ascending discrete sigma table)


def simple_indices(table_len: int, steps: int) -> np.ndarray:
    """``simple``: indices -(1 + int(i * T / steps)) of the ascending table, i = 0..steps-1."""
    ss = table_len / steps
    return np.array([table_len - 1 - int(i * ss) for i in range(steps)], dtype=np.int64)


def ddim_uniform_indices(table_len: int, steps: int) -> np.ndarray:
    """``ddim_uniform``: indices 1, 1 + s, 1 + 2s, ... < T with s = max(T // steps, 1), descending."""
    ss = max(table_len // steps, 1)
    return np.arange(1, table_len, ss, dtype=np.int64)[::-1].copy()


def beta_indices(table_len: int, steps: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """``beta``: rint(Beta(alpha, beta).ppf(1 - i / steps) * (T - 1)), consecutive repeats dropped."""
    from scipy.stats import beta as beta_dist
    q = 1.0 - np.linspace(0.0, 1.0, steps, endpoint=False)
    ts = np.rint(beta_dist.ppf(q, alpha, beta) * (table_len - 1)).astype(np.int64)
    keep = np.ones(ts.size, dtype=bool)
    keep[1:] = ts[1:] != ts[:-1]
    return ts[keep]


def normal_timesteps(start: float, end: float, steps: int, sgm: bool = False) -> np.ndarray:
    """``normal`` / ``sgm_uniform``: timesteps linspace(start, end, steps) / (..., steps + 1)[:-1]."""
    if sgm:
        return np.linspace(start, end, steps + 1)[:-1]
    return np.linspace(start, end, steps)


def linear_quadratic_levels(steps: int, sigma_max: float, threshold_noise: float = 0.025,
                            linear_steps: Optional[int] = None) -> np.ndarray:
    """``linear_quadratic`` (Mochi): steps + 1 levels from sigma_max to 0."""
    if steps == 1:
        return np.array([1.0, 0.0]) * sigma_max
    if linear_steps is None:
        linear_steps = steps // 2
    lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold_noise * steps
    quad_steps = steps - linear_steps
    qc = diff / (linear_steps * quad_steps ** 2)
    lc = threshold_noise / linear_steps - 2 * diff / (quad_steps ** 2)
    const = qc * (linear_steps ** 2)
    quad = [qc * i * i + lc * i + const for i in range(linear_steps, steps)]
    return (1.0 - np.array(lin + quad + [1.0], dtype=np.float64)) * sigma_max


def kl_optimal_levels(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """``kl_optimal``: tan((1 - u) atan(sigma_max) + u atan(sigma_min)), u = i / (n - 1) (n = 1: sigma_max)."""
    u = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    return np.tan(u * math.atan(sigma_min) + (1.0 - u) * math.atan(sigma_max))


LAPLACE_EPS = 1e-5


def laplace_levels(n: int, sigma_min: float, sigma_max: float, mu: float = 0.0, beta: float = 0.5) -> np.ndarray:
    """``laplace``: exp(mu - beta sign(1/2 - x) log(1 - 2|1/2 - x| + 1e-5)), x = linspace(0, 1, n),
    clamped to [sigma_min, sigma_max] (n levels, no final 0, as ComfyUI's get_sigmas_laplace)."""
    i = np.arange(n, dtype=np.float64)
    d = (n - 1 - 2.0 * i) / (2.0 * (n - 1)) if n > 1 else np.array([0.5])  # 1/2 - x, exactly 0 at the middle
    lmb = mu - beta * np.sign(d) * np.log(1.0 - 2.0 * np.abs(d) + LAPLACE_EPS)
    return np.clip(np.exp(lmb), sigma_min, sigma_max)


def polyexponential_levels(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> np.ndarray:
    """``polyexponential``: exp(ramp^rho (log sigma_max - log sigma_min) + log sigma_min), ramp 1 -> 0."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return np.exp(np.linspace(1.0, 0.0, n) ** rho * (hi - lo) + lo)


SD_TURBO_TIMESTEPS = (999, 899, 799, 699, 599, 499, 399, 299, 199, 99)


def sd_turbo_timesteps(steps: int) -> np.ndarray:
    """``sd_turbo``: the first ``steps`` (<= 10) of timesteps 999, 899, ..., 99."""
    steps = _integer("steps", steps, 1)
    if steps > len(SD_TURBO_TIMESTEPS):
        raise ValueError(f"sd_turbo has {len(SD_TURBO_TIMESTEPS)} timesteps (999, 899, ..., 99), so steps <= 10; "
                         f"got {steps}")
    return np.array(SD_TURBO_TIMESTEPS[:steps], dtype=np.float64)


def flux_mu(image_seq_len, base_seq_len: float = 256, max_seq_len: float = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Flux.1's mu: linear in the image sequence length (base_shift at base_seq_len, max_shift at
    max_seq_len); the sequence length of a W x H image is (W / 16) (H / 16) (4096 at 1024 x 1024)."""
    seq = _real("image_seq_len", image_seq_len, 0.0, math.inf, lo_open=True, hi_open=True)
    base_seq_len = _real("base_seq_len", base_seq_len, 0.0, math.inf, lo_open=True, hi_open=True)
    max_seq_len = _real("max_seq_len", max_seq_len, base_seq_len, math.inf, lo_open=True, hi_open=True)
    base_shift = _real("base_shift", base_shift, -math.inf, math.inf, lo_open=True, hi_open=True)
    max_shift = _real("max_shift", max_shift, -math.inf, math.inf, lo_open=True, hi_open=True)
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq * m + (base_shift - m * base_seq_len)


def flux2_mu(image_seq_len, steps: int) -> float:
    """Flux.2's empirical mu: above 4300 tokens 0.00016927 L + 0.45666666; below, linear in the step
    count through the fits at 10 steps (8.73809524e-05 L + 1.89833333) and 200 steps."""
    seq = _real("image_seq_len", image_seq_len, 0.0, math.inf, lo_open=True, hi_open=True)
    steps = _integer("steps", steps, 1)
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if seq > 4300:
        return a2 * seq + b2
    m_200 = a2 * seq + b2
    m_10 = a1 * seq + b1
    a = (m_200 - m_10) / 190.0
    return a * steps + (m_200 - 200.0 * a)


def flux_levels(steps: int, mu: float) -> np.ndarray:
    """linspace(1, 0, steps + 1) under the exponential time shift e^mu / (e^mu + 1/t - 1) (0 stays 0)."""
    t = np.linspace(1.0, 0.0, steps + 1)
    return np.append(time_shift(t[:-1], mu=mu), 0.0)


# ---------------------------------------------------------------------------------------------
# A fastdiff schedule seen as ComfyUI's model_sampling


class ComfySampling:
    """ComfyUI's ``model_sampling`` of a fastdiff schedule: the ascending discrete table ``sigmas``
    (ComfyUI units: ksigma, or t for flow) with the schedule time of each level (``times``), and
    ComfyUI's ``timestep(sigma)`` / ``sigma(timestep)`` as (start, end, timestep -> schedule time)."""

    TABLE_LEN_CONTINUOUS = 1000

    def __init__(self, schedule: Schedule, shift: float = 1.0, mu: Optional[float] = None):
        self.schedule = schedule
        self.flow = isinstance(schedule, FlowMatching)
        self.shift, self.mu = shift, mu
        if isinstance(schedule, DiscreteVP):
            T = schedule.num_train_timesteps
            self.times = np.arange(T, dtype=np.float64)
            with np.errstate(divide="ignore"):
                self.sigmas = schedule.ksigma(self.times)
            if not np.all(np.isfinite(self.sigmas)):
                raise ValueError("this DiscreteVP has an infinite top noise level (zero terminal SNR); ComfyUI's "
                                 "sigma-table schedulers need a finite one")
        elif self.flow:
            T = schedule.num_train_timesteps
            self.times = self._flow_shift(np.arange(1, T + 1, dtype=np.float64) / T)
            self.sigmas = self.times
        else:
            lo, hi = schedule.ksigma_min, schedule.ksigma_max
            self.sigmas = np.exp(np.linspace(math.log(lo), math.log(hi), self.TABLE_LEN_CONTINUOUS))
            self.times = _as_times(schedule, self.sigmas)
            self.sigmas[0], self.sigmas[-1] = lo, hi

    @classmethod
    def from_table(cls, sigmas) -> "ComfySampling":
        """ComfyUI's ModelSamplingDiscrete over a given ascending table (e.g. ``model_sampling.sigmas``):
        timestep = the nearest index in log sigma, sigma(t) = log sigma interpolated linearly."""
        table = np.asarray(sigmas, dtype=np.float64)
        if table.ndim != 1 or table.size < 2:
            raise ValueError(f"a sigma table must be 1-D with at least 2 levels, got shape {table.shape}")
        if not (np.all(np.isfinite(table)) and np.all(table > 0) and np.all(table[1:] > table[:-1])):
            raise ValueError("a sigma table must hold finite positive levels in increasing order (ComfyUI's "
                             "model_sampling.sigmas)")
        self = cls.__new__(cls)
        self.schedule, self.flow, self.shift, self.mu = None, False, 1.0, None
        self.sigmas, self.times = table, np.arange(table.size, dtype=np.float64)
        return self

    def sigma_of_times(self, t) -> np.ndarray:
        """ComfyUI sigma (ksigma, or t for flow) at schedule times ``t`` (table: fractional indices)."""
        t = np.asarray(t, dtype=np.float64)
        if self.schedule is None:
            return np.exp(np.interp(t, self.times, np.log(self.sigmas)))
        if self.flow:
            return t.copy()
        return np.asarray(self.schedule.ksigma(t), dtype=np.float64)

    def _flow_shift(self, t):
        if self.mu is None and self.shift == 1.0:
            return np.asarray(t, dtype=np.float64)
        return time_shift(t, self.shift, mu=self.mu)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def normal_times(self, steps: int, sgm: bool) -> np.ndarray:
        """The schedule times of ComfyUI's normal / sgm_uniform levels."""
        s = self.schedule
        if s is None or isinstance(s, DiscreteVP):  # timestep(sigma_max) = T-1, timestep(sigma_min) = 0; sigma(t) log-interp
            return normal_timesteps(float(self.times[-1]), 0.0, steps, sgm)
        if self.flow:  # timestep = T sigma (unshifted), sigma(timestep) = shift(timestep / T)
            T = s.num_train_timesteps
            ts = normal_timesteps(self.sigma_max * T, self.sigma_min * T, steps, sgm)
            return self._flow_shift(np.clip(ts / T, 0.0, 1.0))
        if isinstance(s, VESchedule):  # EDM: timestep = 0.25 log sigma
            ts = normal_timesteps(0.25 * math.log(self.sigma_max), 0.25 * math.log(self.sigma_min), steps, sgm)
            return _as_times(s, np.exp(4.0 * ts))
        return normal_timesteps(s.t_max, s.t_min, steps, sgm)  # ContinuousVP: its own time

    def grid_from_times(self, t, final: str) -> Grid:
        return Grid.from_times(self.schedule, np.asarray(t, dtype=np.float64), final)

    def grid_from_sigmas(self, levels, final: str) -> Grid:
        """A grid through ComfyUI sigma ``levels`` (ksigma, or t for flow), checked to lie in the table's range."""
        levels = np.asarray(levels, dtype=np.float64)
        lo, hi = self.sigma_min, self.sigma_max
        if self.flow:
            lo, hi = min(lo, self.schedule.t_min), max(hi, self.schedule.t_max)
        tol = 1e-6
        if np.any(levels < lo * (1 - tol)) or np.any(levels > hi * (1 + tol)):
            unit = "t" if self.flow else "ksigma"
            raise ValueError(f"noise levels {unit} in [{levels.min():.6g}, {levels.max():.6g}] fall outside the "
                             f"schedule's range [{lo:.6g}, {hi:.6g}] ({type(self.schedule).__name__}); pick the "
                             "table of this model or a schedule that spans it")
        levels = np.clip(levels, lo, hi)
        if not np.all(levels[1:] < levels[:-1]):
            raise ValueError(f"the noise levels do not strictly decrease (ComfyUI would take zero-length steps): "
                             f"{levels}")
        if self.flow:
            return self.grid_from_times(levels, final)
        return Grid.from_ksigmas(self.schedule, levels, final=final)


def _as_times(schedule: Schedule, ks) -> np.ndarray:
    t = np.asarray(schedule.t_from_ksigma(np.asarray(ks, dtype=np.float64)), dtype=np.float64)
    return np.clip(t, schedule.t_min, schedule.t_max)


def _table_to_schedule_units(family: str, levels: np.ndarray, sampling: ComfySampling) -> np.ndarray:
    """Published levels (ksigma for AYS/GITS, flow t for OptimalSteps) in the schedule's ComfyUI units."""
    units = _tables()[family]["units"]
    if units == "flow" and not sampling.flow:
        return levels / (1.0 - levels)  # ksigma of the flow time (t = 1 has none)
    if units == "ksigma" and sampling.flow:
        return levels / (1.0 + levels)
    return levels


_OPTIONS = {
    "beta": {"alpha": 0.6, "beta": 0.6},
    "linear_quadratic": {"threshold_noise": 0.025, "linear_steps": None},
    "laplace": {"beta": 0.5},
    "align_your_steps": {"model": None},
    "optimal_steps": {"model": None},
    "gits": {"coeff": GITS_DEFAULT_COEFF},
    "flux": {"image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15},
    "flux2": {"image_seq_len": 4096},
}
_SHIFTABLE = ("simple", "sgm_uniform", "normal", "ddim_uniform", "beta", "linear_quadratic", "kl_optimal",
              "polyexponential")


def _positive(name, v) -> float:
    return _real(name, v, 0.0, math.inf, lo_open=True, hi_open=True)


def comfy_grid(schedule: Schedule, steps: int, spacing: str, *, final: str = "zero", rho: Optional[float] = None,
               shift: float = 1.0, mu: Optional[float] = None, t_min: Optional[float] = None,
               t_max: Optional[float] = None, **options) -> Grid:
    """The grid of ComfyUI's scheduler ``spacing`` (see the module docstring); make_grid calls this.

    ``final``: the point after the scheduler's levels ("zero": ComfyUI's final 0; "sigma_min"; or
    "none": the scheduler run for steps + 1 levels with no final 0 — for the tables, the published
    smallest level). Options: beta ``alpha``, ``beta``; linear_quadratic ``threshold_noise``,
    ``linear_steps``; laplace ``mu`` (make_grid's ``mu``), ``beta``; polyexponential ``rho``
    (default 1); align_your_steps / optimal_steps ``model``; gits ``coeff``; flux
    ``image_seq_len``, ``base_shift``, ``max_shift`` (or ``mu``); flux2 ``image_seq_len`` (or ``mu``)."""
    if spacing not in COMFY_SPACINGS:
        raise ValueError(f"unknown ComfyUI spacing {spacing!r}; expected one of {', '.join(COMFY_SPACINGS)}")
    if final not in ("zero", "sigma_min", "none"):
        raise ValueError(f"final must be 'zero', 'sigma_min' or 'none', got {final!r}")
    allowed = _OPTIONS.get(spacing, {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"spacing {spacing!r} takes no option {', '.join(map(repr, unknown))}"
                        + (f" (its options: {', '.join(allowed)})" if allowed else ""))
    opt = {**allowed, **options}
    if rho is not None and spacing != "polyexponential":
        raise ValueError(f"rho applies to the karras and polyexponential spacings, not {spacing!r}")
    if (t_min is not None or t_max is not None) and spacing not in ("kl_optimal", "laplace", "polyexponential"):
        raise ValueError(f"t_min/t_max apply to the kl_optimal, laplace and polyexponential ComfyUI spacings, "
                         f"not {spacing!r}")
    flow = isinstance(schedule, FlowMatching)
    shift = _real("shift", shift, 0.0, math.inf, lo_open=True, hi_open=True)
    flow_shift = spacing in _SHIFTABLE and (shift != 1.0 or mu is not None)
    if flow_shift:
        if not flow:
            raise ValueError(f"shift/mu apply to FlowMatching schedules (ComfyUI's shifted flow table), got "
                             f"{type(schedule).__name__} with {spacing!r}")
        _shift_factor(shift, mu)
    elif spacing not in _SHIFTABLE and shift != 1.0:
        raise ValueError(f"shift does not apply to the {spacing!r} spacing")
    elif mu is not None and spacing not in ("laplace", "flux", "flux2"):
        raise ValueError(f"mu does not apply to the {spacing!r} spacing")

    n = steps if final != "none" else steps + 1  # levels before the final point

    if spacing == "sd_turbo":
        if not isinstance(schedule, DiscreteVP):
            raise ValueError("sd_turbo picks timesteps 999, 899, ... of a discrete schedule (DiscreteVP)")
        if schedule.num_train_timesteps < 1000:
            raise ValueError(f"sd_turbo's timesteps 999, 899, ..., 99 need num_train_timesteps >= 1000, got "
                             f"{schedule.num_train_timesteps}")
        if final == "none" and steps >= len(SD_TURBO_TIMESTEPS):
            raise ValueError("sd_turbo with final='none' needs steps + 1 <= 10 timesteps")
        return Grid.from_times(schedule, sd_turbo_timesteps(n), final)

    if spacing in ("flux", "flux2"):
        if not flow:
            raise ValueError(f"the {spacing} spacing is for flow-matching schedules (FlowMatching), got "
                             f"{type(schedule).__name__}")
        if mu is None:
            mu = (flux_mu(opt["image_seq_len"], base_shift=opt["base_shift"], max_shift=opt["max_shift"])
                  if spacing == "flux" else flux2_mu(opt["image_seq_len"], n))
        _shift_factor(1.0, mu)
        t = flux_levels(n, mu)[:-1]
        if not np.all(t[1:] < t[:-1]):
            raise ValueError(f"mu={mu} maps the {n} grid times onto fewer distinct values in float64")
        return ComfySampling(schedule).grid_from_sigmas(t, final)

    if spacing in TABLE_FAMILIES:
        key = "coeff" if spacing == "gits" else "model"
        levels = table_levels(spacing, steps, opt[key])
        sampling = ComfySampling(schedule)
        levels = _table_to_schedule_units(spacing, levels, sampling)
        if final != "none":
            levels = levels[:-1]
        return sampling.grid_from_sigmas(levels, final)

    sampling = ComfySampling(schedule, shift=shift, mu=mu if flow_shift else None)
    T = sampling.sigmas.size
    if spacing in ("simple", "normal", "sgm_uniform") and n > T:
        raise ValueError(f"{spacing}: {n} levels from a table of {T} would repeat levels (steps <= {T})")
    if spacing == "simple":
        return sampling.grid_from_times(sampling.times[simple_indices(T, n)], final)
    if spacing == "ddim_uniform":
        return sampling.grid_from_times(sampling.times[ddim_uniform_indices(T, n)], final)
    if spacing == "beta":
        a, b = _positive("alpha", opt["alpha"]), _positive("beta", opt["beta"])
        return sampling.grid_from_times(sampling.times[beta_indices(T, n, a, b)], final)
    if spacing in ("normal", "sgm_uniform"):
        t = sampling.normal_times(n, spacing == "sgm_uniform")
        if not np.all(t[1:] < t[:-1]):
            raise ValueError(f"{spacing}: {n} levels collapse onto fewer distinct values")
        return sampling.grid_from_times(t, final)
    if spacing == "linear_quadratic":
        thr = _real("threshold_noise", opt["threshold_noise"], 0.0, 1.0, lo_open=True, hi_open=True)
        ls = opt["linear_steps"]
        if ls is not None:
            ls = _integer("linear_steps", ls, 1)
            if n > 1 and ls >= n:
                raise ValueError(f"linear_steps must be < steps ({n}), got {ls}")
        levels = linear_quadratic_levels(n, sampling.sigma_max, thr, ls)[:-1]
        return sampling.grid_from_sigmas(levels, final)

    # kl_optimal, laplace, polyexponential: ComfyUI calls them with the table's sigma_min / sigma_max
    lo, hi = sampling.sigma_min, sampling.sigma_max
    if t_min is not None or t_max is not None:
        t_lo = schedule.t_min if t_min is None else _real("t_min", t_min)
        t_hi = schedule.t_max if t_max is None else _real("t_max", t_max)
        if not schedule.t_min <= t_lo < t_hi <= schedule.t_max:
            raise ValueError(f"need {schedule.t_min} <= t_min < t_max <= {schedule.t_max}, got {t_lo}, {t_hi}")
        lo, hi = ((t_lo, t_hi) if flow else (float(schedule.ksigma(t_lo)), float(schedule.ksigma(t_hi))))
        lo, hi = max(lo, sampling.sigma_min), min(hi, sampling.sigma_max)
    if spacing == "kl_optimal":
        levels = kl_optimal_levels(n, lo, hi)
    elif spacing == "laplace":
        m = 0.0 if mu is None else _real("mu", mu, -math.inf, math.inf, lo_open=True, hi_open=True)
        levels = laplace_levels(n, lo, hi, m, _positive("beta", opt["beta"]))
    else:
        r = 1.0 if rho is None else _positive("rho", rho)
        levels = polyexponential_levels(n, lo, hi, r)
    return sampling.grid_from_sigmas(levels, final)


# ---------------------------------------------------------------------------------------------
# ComfyUI's outputs (what fastdiff.integrations.k_diffusion.get_sigmas_<name> return)


def as_comfy_sampling(model_sampling) -> ComfySampling:
    """None (Stable Diffusion's DiscreteVP: scaled-linear 0.00085 .. 0.012, 1000 steps), a fastdiff
    Schedule, ComfyUI's ``model_sampling`` (its ``.sigmas`` table; normal / sgm_uniform / sd_turbo
    call its own ``timestep()`` / ``sigma()``, so any ComfyUI model gives ComfyUI's values) or an
    ascending 1-D table of noise levels (read as ComfyUI's ModelSamplingDiscrete reads its table)."""
    if model_sampling is None:
        return ComfySampling(DiscreteVP())
    if isinstance(model_sampling, Schedule):
        return ComfySampling(model_sampling)
    table = getattr(model_sampling, "sigmas", model_sampling)
    if hasattr(table, "detach"):
        table = table.detach().cpu().double().numpy()
    try:
        table = np.asarray(table, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError("model_sampling must be None, a fastdiff Schedule, an object with a .sigmas table or a "
                        f"1-D table of noise levels, got {type(model_sampling).__name__}") from None
    return ComfySampling.from_table(table)


def comfy_sigmas(spacing: str, steps: int, model_sampling=None, **options) -> np.ndarray:
    """ComfyUI's output of scheduler ``spacing`` for ``steps`` (float64, with ComfyUI's final 0;
    laplace, as ComfyUI's get_sigmas_laplace, has none). ``model_sampling``: see as_comfy_sampling
    (for the schedulers that read the model's table); the others take their own options."""
    steps = _integer("steps", steps, 1)
    if spacing in ("kl_optimal", "laplace"):
        lo = _positive("sigma_min", options.pop("sigma_min"))
        hi = _real("sigma_max", options.pop("sigma_max"), lo, math.inf, hi_open=True)
        if spacing == "kl_optimal":
            return np.append(kl_optimal_levels(steps, lo, hi), 0.0)
        mu = _real("mu", options.pop("mu", 0.0), -math.inf, math.inf, lo_open=True, hi_open=True)
        return laplace_levels(steps, lo, hi, mu, _positive("beta", options.pop("beta", 0.5)))
    if spacing in TABLE_FAMILIES:
        levels = table_levels(spacing, steps, options.pop("coeff" if spacing == "gits" else "model", None))
        levels[-1] = 0.0
        return levels
    if spacing == "flux":
        return flux_levels(steps, flux_mu(options.pop("image_seq_len", 4096), base_shift=options.pop("base_shift", 0.5),
                                          max_shift=options.pop("max_shift", 1.15)))
    if spacing == "flux2":
        return flux_levels(steps, flux2_mu(options.pop("image_seq_len", 4096), steps))
    if spacing in ("normal", "sgm_uniform", "sd_turbo") and _has_comfy_methods(model_sampling):
        return _comfy_object_sigmas(spacing, steps, model_sampling)
    sampling = as_comfy_sampling(model_sampling)
    T = sampling.sigmas.size
    if spacing == "simple":
        out = sampling.sigmas[simple_indices(T, steps)]
    elif spacing == "ddim_uniform":
        out = sampling.sigmas[ddim_uniform_indices(T, steps)]
    elif spacing == "beta":
        a, b = _positive("alpha", options.pop("alpha", 0.6)), _positive("beta", options.pop("beta", 0.6))
        out = sampling.sigmas[beta_indices(T, steps, a, b)]
    elif spacing in ("normal", "sgm_uniform"):
        out = sampling.sigma_of_times(sampling.normal_times(steps, spacing == "sgm_uniform"))
    elif spacing == "sd_turbo":
        ts = np.clip(sd_turbo_timesteps(steps), 0, T - 1)
        if sampling.schedule is not None and not isinstance(sampling.schedule, DiscreteVP):
            raise ValueError("sd_turbo picks timesteps 999, 899, ... of a discrete schedule (DiscreteVP or a table)")
        out = sampling.sigma_of_times(ts)
    elif spacing == "linear_quadratic":
        thr = _real("threshold_noise", options.pop("threshold_noise", 0.025), 0.0, 1.0, lo_open=True, hi_open=True)
        ls = options.pop("linear_steps", None)
        if ls is not None:
            ls = _integer("linear_steps", ls, 1)
            if steps > 1 and ls >= steps:
                raise ValueError(f"linear_steps must be < steps ({steps}), got {ls}")
        return linear_quadratic_levels(steps, sampling.sigma_max, thr, ls)
    else:
        raise ValueError(f"unknown ComfyUI scheduler {spacing!r}; expected one of {', '.join(COMFY_SPACINGS)}")
    return np.append(out, 0.0)


def _has_comfy_methods(obj) -> bool:
    return (obj is not None and not isinstance(obj, Schedule) and callable(getattr(obj, "sigma", None))
            and callable(getattr(obj, "timestep", None)) and hasattr(obj, "sigma_min") and hasattr(obj, "sigma_max"))


def _comfy_object_sigmas(spacing: str, steps: int, ms) -> np.ndarray:
    """normal / sgm_uniform / sd_turbo through a ComfyUI model_sampling's own timestep() and sigma()
    (any ComfyUI model: discrete, flow with its shift, Flux, EDM), as ComfyUI calls them."""
    import torch

    def value(v) -> float:
        return float(v.detach().cpu().double().reshape(-1)[0]) if hasattr(v, "detach") else float(v)

    if spacing == "sd_turbo":
        ts = torch.tensor([int(t) for t in sd_turbo_timesteps(steps)])
        sig = ms.sigma(ts)
        return np.append(np.asarray(sig.detach().cpu().double().numpy() if hasattr(sig, "detach") else sig,
                                    dtype=np.float64).reshape(-1), 0.0)
    start = value(ms.timestep(torch.as_tensor(ms.sigma_max)))
    end = value(ms.timestep(torch.as_tensor(ms.sigma_min)))
    append_zero = True
    if spacing == "sgm_uniform":
        ts = normal_timesteps(start, end, steps, sgm=True)
    else:
        if math.isclose(value(ms.sigma(torch.tensor(end))), 0.0, abs_tol=1e-5):  # a table that reaches 0
            steps += 1
            append_zero = False
        ts = normal_timesteps(start, end, steps)
    out = np.array([value(ms.sigma(torch.tensor(float(t)))) for t in ts], dtype=np.float64)
    return np.append(out, 0.0) if append_zero else out
