"""Noise schedules and timestep spacings, all in float64 on the host.

Every schedule describes the forward process ``x_t = alpha_t * x0 + sigma_t * eps`` by a time
variable ``t`` (its own convention: a training-step index for discrete schedules, [0, 1] for
continuous ones, the noise level itself for VE/EDM). Everything else derives from (alpha, sigma):

* k-diffusion's noise level   ``ksigma = sigma / alpha``      (= sqrt((1 - abar) / abar) for VP)
* half log-SNR                ``lam    = log(alpha / sigma)`` (= -log ksigma)

A sampling *grid* (``Grid``) is the sequence of points a solver visits, from the noisiest to the
cleanest; the last point may be the clean data (sigma = 0). Spacings build grids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "Schedule", "DiscreteVP", "ContinuousVP", "VESchedule", "FlowMatching", "Grid", "make_grid",
    "SPACINGS", "COMFY_SPACINGS", "ksigma_to_lambda", "lambda_to_ksigma", "rescale_zero_terminal_snr", "time_shift",
]

SPACINGS = ("uniform", "quadratic", "cosine", "leading", "trailing", "linspace", "karras",
            "exponential", "logsnr")

#: ComfyUI's schedulers under their ComfyUI names (fastdiff.comfy_schedulers; make_grid dispatches there).
#: Kept apart from SPACINGS: several read a model's own sigma table or a model-specific published table.
COMFY_SPACINGS = ("simple", "sgm_uniform", "normal", "ddim_uniform", "beta", "linear_quadratic", "kl_optimal",
                  "laplace", "polyexponential", "sd_turbo", "align_your_steps", "gits", "optimal_steps",
                  "flux", "flux2")


def ksigma_to_lambda(ks):
    return -np.log(ks)


def lambda_to_ksigma(lam):
    return np.exp(-np.asarray(lam, dtype=np.float64))


def _as_f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _real(name: str, v, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
          hi_open: bool = False, why: str = "") -> float:
    """A schedule/grid parameter as a float in the interval (NaN never is); a number (Python,
    numpy, 0-d array) or TypeError, else ValueError naming the parameter and its valid range."""
    if isinstance(v, (str, bytes, bool, np.bool_, complex)) or v is None:
        raise TypeError(f"{name} must be a real number, got {type(v).__name__} {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__} {v!r}") from None
    ok = (f > lo if lo_open else f >= lo) and (f < hi if hi_open else f <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {v!r}{why}")
    return f


def _integer(name: str, v, lo: int) -> int:
    """A Python or numpy integer >= lo (bools and floats raise TypeError)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v}")
    return int(v)


class Schedule:
    """Base class. Subclasses define ``alpha_sigma(t)`` and ``t_from_ksigma(ks)``."""

    #: Coordinates in which Euler/Heun/RK/LMS integrate the probability-flow ODE by default:
    #: "ve" (y = x/alpha, s = sigma/alpha: k-diffusion, EDM) or "flow" (y = x/(alpha+sigma),
    #: s = sigma/(alpha+sigma): rectified flow). See fastdiff.solvers.base.ode_scale.
    ode_space = "ve"
    t_min: float
    t_max: float

    def alpha_sigma(self, t):
        raise NotImplementedError

    def t_from_ksigma(self, ks):
        raise NotImplementedError

    def ksigma(self, t):
        a, s = self.alpha_sigma(t)
        return s / a

    def alpha_from_ksigma(self, ks):
        """alpha at the noise level ksigma; VP schedules keep alpha^2 + sigma^2 = 1."""
        return 1.0 / np.sqrt(1.0 + ks * ks)

    def point_at_ksigma(self, ks):
        """(t, alpha, sigma) of the point whose k-diffusion noise level is ``ks`` (ks = 0: clean).

        alpha and sigma follow from ks exactly; only t (what the model is told) is interpolated,
        as diffusers and k-diffusion do for Karras grids on discrete schedules."""
        ks = _as_f64(ks)
        with np.errstate(invalid="ignore"):
            alpha = self.alpha_from_ksigma(ks)
            sigma = np.where(np.isinf(ks), 1.0, ks * alpha)
        return self.t_from_ksigma(ks), alpha, sigma

    @property
    def ksigma_min(self) -> float:
        return float(self.ksigma(self.t_min))

    @property
    def ksigma_max(self) -> float:
        return float(self.ksigma(self.t_max))

    def model_time(self, t):
        """The value passed to the model as its time/noise-level argument."""
        return _as_f64(t)

    def init_noise_scale(self, alpha: float, sigma: float) -> float:
        """Std of x at the first grid point when the data are negligible: sqrt(alpha^2 + sigma^2),
        i.e. 1 for VP schedules (diffusers' init_noise_sigma); VE and flow use sigma itself."""
        return math.sqrt(alpha * alpha + sigma * sigma)

    def t_from_model_time(self, mt):
        return _as_f64(mt)


class DiscreteVP(Schedule):
    """A DDPM-style schedule of ``num_train_timesteps`` betas (diffusers' ``beta_schedule``).

    ``t`` runs over [0, T-1]; at integer t the values are exact, between them log(ksigma) is
    interpolated linearly (as k-diffusion's DiscreteSchedule and diffusers' ``_sigma_to_t`` do).
    """

    def __init__(self, betas: Sequence[float] = None, *, beta_schedule: str = "scaled_linear",
                 beta_start: float = 0.00085, beta_end: float = 0.012,
                 num_train_timesteps: int = 1000, zero_terminal_snr: bool = False):
        if betas is None:
            n = _integer("num_train_timesteps", num_train_timesteps, 2)
            one = (": beta = 1 leaves no signal at the last step (alpha_cumprod = 0), which an epsilon model "
                   "cannot be sampled from; for a zero-terminal-SNR schedule pass zero_terminal_snr=True "
                   "and use a v-prediction model")
            beta_start = _real("beta_start", beta_start, 0.0, 1.0, lo_open=True, hi_open=True, why=one)
            beta_end = _real("beta_end", beta_end, 0.0, 1.0, lo_open=True, hi_open=True, why=one)
            betas = make_betas(beta_schedule, n, beta_start, beta_end)
        betas = _as_f64(betas)
        if betas.ndim != 1 or betas.size < 2:
            raise ValueError(f"betas must be a 1-D array of at least 2 values, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            bad = betas[~((betas > 0) & (betas <= 1))][0]
            raise ValueError(f"betas must lie in (0, 1], got {bad}")
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self.num_train_timesteps = betas.size
        self.t_min, self.t_max = 0.0, float(betas.size - 1)
        with np.errstate(divide="ignore"):
            self._log_ks = 0.5 * np.log((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    def alpha_sigma(self, t):
        t = _as_f64(t)
        if np.any(t < self.t_min) or np.any(t > self.t_max):
            raise ValueError(f"t must lie in [{self.t_min}, {self.t_max}], got {t}")
        lo = np.floor(t).astype(np.int64)
        hi = np.minimum(lo + 1, self.num_train_timesteps - 1)
        w = t - lo
        abar_lo, abar_hi = self.alphas_cumprod[lo], self.alphas_cumprod[hi]
        exact = (w == 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            log_ks = (1 - w) * self._log_ks[lo] + w * self._log_ks[hi]
            ks = np.exp(log_ks)
            alpha = np.where(exact, np.sqrt(abar_lo), 1.0 / np.sqrt(1.0 + ks * ks))
            sigma = np.where(exact, np.sqrt(1.0 - abar_lo), ks / np.sqrt(1.0 + ks * ks))
        del abar_hi
        return alpha, sigma

    def t_from_ksigma(self, ks):
        ks = _as_f64(ks)
        with np.errstate(divide="ignore"):
            log_ks = np.log(ks)
        # _log_ks is increasing in t; np.interp clamps outside the table.
        finite = np.isfinite(self._log_ks)
        return np.interp(log_ks, self._log_ks[finite], np.arange(self.num_train_timesteps)[finite])


def make_betas(beta_schedule: str, n: int, beta_start: float, beta_end: float) -> np.ndarray:
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":  # Stable Diffusion
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
    if beta_schedule in ("squaredcos_cap_v2", "cosine"):  # Nichol & Dhariwal (2021)
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float64)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of "
                     "'linear', 'scaled_linear', 'squaredcos_cap_v2'")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2023), Algorithm 1: shift and scale sqrt(abar) so the last step has SNR 0."""
    abar_sqrt = np.sqrt(np.cumprod(1.0 - _as_f64(betas)))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


class ContinuousVP(Schedule):
    """Song et al.'s VP-SDE with linear beta(t) on t in [eps, 1]: log alpha = -∫beta/2."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        beta_min = _real("beta_min", beta_min, 0.0, math.inf, lo_open=True, hi_open=True)
        beta_max = _real("beta_max", beta_max, beta_min, math.inf, lo_open=True, hi_open=True)
        t_min = _real("t_min", t_min, 0.0, math.inf, lo_open=True, hi_open=True)
        t_max = _real("t_max", t_max, t_min, math.inf, lo_open=True, hi_open=True)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def log_alpha(self, t):
        t = _as_f64(t)
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha_sigma(self, t):
        la = self.log_alpha(t)
        return np.exp(la), np.sqrt(-np.expm1(2.0 * la))

    def t_from_ksigma(self, ks):
        # Invert lambda = log(alpha/sigma): log alpha = -0.5 log(1 + ks^2) = -L, and
        # db/4 t^2 + beta_min/2 t - L = 0, solved in the form without cancellation.
        L = 0.5 * np.log1p(_as_f64(ks) ** 2)
        db = self.beta_max - self.beta_min
        return 4.0 * L / (np.sqrt(self.beta_min ** 2 + 4.0 * db * L) + self.beta_min)


class VESchedule(Schedule):
    """Variance-exploding / EDM noise levels: alpha = 1, sigma = t (t *is* the noise level)."""

    def alpha_from_ksigma(self, ks):
        return np.ones_like(ks)

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        sigma_min = _real("sigma_min", sigma_min, 0.0, math.inf, lo_open=True, hi_open=True)
        sigma_max = _real("sigma_max", sigma_max, sigma_min, math.inf, lo_open=True, hi_open=True)
        sigma_data = _real("sigma_data", sigma_data, 0.0, math.inf, lo_open=True, hi_open=True)
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        self.t_min, self.t_max = self.sigma_min, self.sigma_max

    def alpha_sigma(self, t):
        t = _as_f64(t)
        return np.ones_like(t), t

    def t_from_ksigma(self, ks):
        return _as_f64(ks)

    def init_noise_scale(self, alpha, sigma):
        return sigma  # k-diffusion / EDM: x_T = sigma_max * noise


class FlowMatching(Schedule):
    """Rectified flow: alpha = 1 - t, sigma = t on t in [0, 1]; the model sees ``1000 t``."""

    ode_space = "flow"

    def alpha_from_ksigma(self, ks):
        return np.where(np.isinf(ks), 0.0, 1.0 / (1.0 + np.where(np.isinf(ks), 0.0, ks)))

    def __init__(self, num_train_timesteps: int = 1000, t_min: Optional[float] = None, t_max: float = 1.0):
        # diffusers' FlowMatchEulerDiscrete samples down to t = 1/T before the final jump to 0.
        num_train_timesteps = _integer("num_train_timesteps", num_train_timesteps, 1)
        t_max = _real("t_max", t_max, 0.0, 1.0, lo_open=True)
        t_min = 1.0 / num_train_timesteps if t_min is None else t_min
        t_min = _real("t_min", t_min, 0.0, t_max, lo_open=True, hi_open=True)
        self.num_train_timesteps = num_train_timesteps
        self.t_min, self.t_max = float(t_min), float(t_max)

    def alpha_sigma(self, t):
        t = _as_f64(t)
        return 1.0 - t, t

    def t_from_ksigma(self, ks):
        ks = _as_f64(ks)
        return np.where(np.isinf(ks), 1.0, ks / (1.0 + np.where(np.isinf(ks), 0.0, ks)))

    def init_noise_scale(self, alpha, sigma):
        return sigma

    def model_time(self, t):
        return _as_f64(t) * self.num_train_timesteps

    def t_from_model_time(self, mt):
        return _as_f64(mt) / self.num_train_timesteps


def time_shift(t, shift: float = 1.0, *, mu: Optional[float] = None):
    """SD3's static shift ``s t / (1 + (s-1) t)``; with ``mu`` the resolution-dependent (Flux)
    exponential shift ``e^mu / (e^mu + 1/t - 1)``."""
    t = _as_f64(t)
    shift = _shift_factor(shift, mu)
    return shift * t / (1.0 + (shift - 1.0) * t)


# Shifts beyond this collapse a float64 time grid near t = 1 (and e^mu for |mu| > ~700 overflows).
MAX_SHIFT = 1e6


def _shift_factor(shift, mu) -> float:
    if mu is not None:
        lim = math.log(MAX_SHIFT)
        mu = _real("mu", mu, -lim, lim, why=f" (the shift factor e^mu must lie in [1/{MAX_SHIFT:g}, {MAX_SHIFT:g}])")
        return math.exp(mu)
    return _real("shift", shift, 1.0 / MAX_SHIFT, MAX_SHIFT)


@dataclass
class Grid:
    """The points a sampler visits: index 0 is the noisiest, index N the last (often clean).

    ``t`` is the schedule time, ``model_t`` the value given to the model (may be rounded, as
    diffusers rounds timesteps of Karras grids while keeping the exact sigmas)."""

    schedule: Schedule
    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    model_t: np.ndarray

    def __post_init__(self):
        n = len(self.t)
        for name in ("alpha", "sigma", "model_t"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Grid.{name} has {len(getattr(self, name))} points, t has {n}")
        if n < 2:
            raise ValueError("a grid needs at least 2 points (1 step)")
        for name in ("t", "alpha", "sigma", "model_t"):
            if np.any(np.isnan(_as_f64(getattr(self, name)))):
                raise ValueError(f"Grid.{name} contains NaN: {getattr(self, name)}")
        ks = self.ksigma
        if not np.all(ks[1:] < ks[:-1]):
            raise ValueError(f"grid noise levels must strictly decrease, got ksigma={ks}")

    @property
    def steps(self) -> int:
        return len(self.t) - 1

    @property
    def ksigma(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return self.sigma / self.alpha

    @property
    def lam(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.alpha) - np.log(self.sigma)

    def point_at_ksigma(self, ks):
        """(t, alpha, sigma, model_t) of an off-grid point (a midpoint of a 2-stage solver)."""
        t, a, s = self.schedule.point_at_ksigma(ks)
        return t, a, s, self.schedule.model_time(t)

    @classmethod
    def from_ksigmas(cls, schedule: Schedule, ksigmas, model_t=None, final: str = "none") -> "Grid":
        ks = _as_f64(ksigmas)
        t, a, s = schedule.point_at_ksigma(ks)
        clean = ks == 0
        a = np.where(clean, 1.0, a)
        s = np.where(clean, 0.0, s)
        mt = schedule.model_time(t) if model_t is None else _as_f64(model_t)
        return cls._with_final(schedule, t, a, s, mt, final)

    @classmethod
    def from_times(cls, schedule: Schedule, t, final: str = "zero") -> "Grid":
        t = _as_f64(t)
        a, s = schedule.alpha_sigma(t)
        return cls._with_final(schedule, t, a, s, schedule.model_time(t), final)

    def with_final(self, final: str) -> "Grid":
        """Append the last point: ``"zero"`` (clean data, sigma = 0), ``"sigma_min"`` (the
        schedule's smallest noise level) or ``"none"`` (the grid already ends where it should)."""
        return self._with_final(self.schedule, self.t, self.alpha, self.sigma, self.model_t, final)

    @classmethod
    def _with_final(cls, schedule: Schedule, t, alpha, sigma, model_t, final: str) -> "Grid":
        # Appends before building, so a 1-point grid plus its final point is a valid 1-step grid.
        if final == "none":
            return cls(schedule, t, alpha, sigma, model_t)
        if final == "zero":
            t_f, a_f, s_f = schedule.t_min, 1.0, 0.0
        elif final == "sigma_min":
            t_f = schedule.t_min
            a_f, s_f = (float(v) for v in schedule.alpha_sigma(t_f))
        else:
            raise ValueError(f"final must be 'zero', 'sigma_min' or 'none', got {final!r}")
        return cls(schedule, np.append(t, t_f), np.append(alpha, a_f),
                   np.append(sigma, s_f), np.append(model_t, schedule.model_time(t_f)))


def karras_ksigmas(n: int, ks_min: float, ks_max: float, rho: float = 7.0) -> np.ndarray:
    rho = _real("rho", rho, 0.0, math.inf, lo_open=True, hi_open=True)
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = ks_min ** (1.0 / rho), ks_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_ksigmas(n: int, ks_min: float, ks_max: float) -> np.ndarray:
    return np.exp(np.linspace(math.log(ks_max), math.log(ks_min), n))


def make_grid(schedule: Schedule, steps: int, spacing: str = "auto", *, final: str = "zero",
              rho: Optional[float] = None, shift: float = 1.0, mu: Optional[float] = None,
              steps_offset: int = 0, t_max: Optional[float] = None, t_min: Optional[float] = None,
              **options) -> Grid:
    """Build the sampling grid of ``steps`` steps.

    spacing: ``uniform`` / ``quadratic`` / ``cosine`` (in the schedule's time), ``leading`` /
    ``trailing`` / ``linspace`` (diffusers' integer timesteps), ``karras`` (rho-spaced ksigma),
    ``exponential`` = ``logsnr`` (uniform in log ksigma, i.e. in logSNR). ``auto`` picks
    ``leading`` for DiscreteVP, ``karras`` for VE, ``uniform`` otherwise.
    ``shift``/``mu`` apply the flow-matching time shift (FlowMatching only). ``rho``: karras' rho
    (default 7).

    ComfyUI's schedulers, under ComfyUI's names (``COMFY_SPACINGS``): ``simple``, ``sgm_uniform``,
    ``normal``, ``ddim_uniform``, ``beta``, ``linear_quadratic``, ``kl_optimal``, ``laplace``,
    ``polyexponential``, ``sd_turbo``, ``align_your_steps``, ``gits``, ``optimal_steps``, ``flux``,
    ``flux2``; their keyword ``options`` (``alpha``/``beta``, ``model``, ``coeff``,
    ``image_seq_len`` ...) and what they mean on each schedule: ``fastdiff.comfy_schedulers``.
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastdiff Schedule, got {type(schedule).__name__}")
    if spacing in COMFY_SPACINGS:
        from .comfy_schedulers import comfy_grid
        return comfy_grid(schedule, steps, spacing, final=final, rho=rho, shift=shift, mu=mu, t_min=t_min,
                          t_max=t_max, **options)
    if options:
        raise TypeError(f"make_grid() got unexpected keyword argument(s) {', '.join(map(repr, sorted(options)))} "
                        f"(spacing options belong to the ComfyUI spacings: {', '.join(COMFY_SPACINGS)})")
    rho = _real("rho", 7.0 if rho is None else rho, 0.0, math.inf, lo_open=True, hi_open=True)
    steps_offset = _integer("steps_offset", steps_offset, 0)
    shifted = mu is not None or _real("shift", shift, 0.0, math.inf, lo_open=True, hi_open=True) != 1.0
    if shifted:
        _shift_factor(shift, mu)
    if spacing == "auto":
        spacing = {DiscreteVP: "leading", VESchedule: "karras"}.get(type(schedule), "uniform")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {', '.join(SPACINGS + COMFY_SPACINGS)}")
    if shifted and not (isinstance(schedule, FlowMatching)
                                                 and spacing in ("uniform", "quadratic", "cosine")):
        raise ValueError(f"shift/mu apply to FlowMatching schedules with the uniform, quadratic or cosine "
                         f"spacing, got {type(schedule).__name__} with {spacing!r}")
    hi = schedule.t_max if t_max is None else _real("t_max", t_max)
    lo = schedule.t_min if t_min is None else _real("t_min", t_min)
    if not schedule.t_min <= lo < hi <= schedule.t_max:
        which = "t_min" if not schedule.t_min <= lo < hi else "t_max"
        raise ValueError(f"{which}: need {schedule.t_min} <= t_min < t_max <= {schedule.t_max} (the schedule's "
                         f"range), got t_min={lo}, t_max={hi}")

    if spacing in ("leading", "trailing", "linspace"):
        if not isinstance(schedule, DiscreteVP):
            raise ValueError(f"spacing {spacing!r} is for discrete schedules (DiscreteVP)")
        T = schedule.num_train_timesteps
        if steps > T:
            raise ValueError(f"steps={steps} exceeds num_train_timesteps={T}")
        if spacing == "leading":
            ratio = T // steps
            t = (np.arange(steps) * ratio).round()[::-1].astype(np.float64) + steps_offset
        elif spacing == "trailing":
            t = np.round(np.arange(T, 0, -T / steps)) - 1.0
        else:
            t = np.linspace(0, T - 1, steps).round()[::-1].copy()
        return Grid.from_times(schedule, t, final)

    if spacing in ("karras", "exponential", "logsnr"):
        ks_hi, ks_lo = float(schedule.ksigma(hi)), float(schedule.ksigma(lo))
        if not np.isfinite(ks_hi):
            raise ValueError("karras/exponential spacing needs a finite largest noise level "
                             "(zero-terminal-SNR and flow t=1 have none; pass t_max)")
        n = steps if final != "none" else steps + 1
        ks = (karras_ksigmas(n, ks_lo, ks_hi, rho) if spacing == "karras"
              else exponential_ksigmas(n, ks_lo, ks_hi))
        return Grid.from_ksigmas(schedule, ks, final=final)

    n = steps if final != "none" else steps + 1
    u = np.linspace(0.0, 1.0, n)
    if spacing == "quadratic":
        t = (math.sqrt(hi) + u * (math.sqrt(lo) - math.sqrt(hi))) ** 2
    elif spacing == "cosine":  # dense at both ends
        t = hi + (lo - hi) * 0.5 * (1.0 - np.cos(math.pi * u))
    else:
        t = hi + u * (lo - hi)
    if shifted:
        t = time_shift(t, shift, mu=mu)
        if not np.all(t[1:] < t[:-1]):
            what = f"mu={mu}" if mu is not None else f"shift={shift}"
            raise ValueError(f"{what} maps the {n} grid times onto fewer distinct values in float64 (the grid "
                             "collapses near t = 1); use a smaller shift or fewer steps")
    return Grid.from_times(schedule, t, final)
