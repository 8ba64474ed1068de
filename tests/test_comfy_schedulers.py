"""ComfyUI's schedulers (issue 13, "Schedulers"): every name as a make_grid spacing and as
fastdiff.integrations.k_diffusion.get_sigmas_<name>, each equal to an oracle written here from
ComfyUI's formula (plain Python / math, not the implementation) or to the published table typed
in here from ComfyUI's source, to 1e-6."""
import math

import numpy as np
import pytest
import torch

from fastdiff.comfy_schedulers import loglinear_interp, published_table, table_names
from fastdiff.integrations import k_diffusion as K
from fastdiff.schedules import (COMFY_SPACINGS, SPACINGS, ContinuousVP, DiscreteVP, FlowMatching, VESchedule,
                                make_grid)

# Every scheduler name of issue 13's "Schedulers" section (ComfyUI's names; the published tables
# and Flux's shifts under the names fastdiff gives them).
ISSUE_NAMES = ("simple", "sgm_uniform", "normal", "ddim_uniform", "beta", "linear_quadratic", "kl_optimal", "laplace",
               "polyexponential", "sd_turbo", "align_your_steps", "gits", "optimal_steps", "flux", "flux2")

RTOL = 1e-6


@pytest.mark.parametrize("name", ISSUE_NAMES)
def test_every_issue_name_is_a_spacing_and_a_get_sigmas_function(name):
    assert name in COMFY_SPACINGS
    fn = getattr(K, f"get_sigmas_{name}", None)
    assert callable(fn), f"fastdiff.integrations.k_diffusion.get_sigmas_{name} is missing"
    assert f"get_sigmas_{name}" in K.__all__


def test_the_name_table_is_complete_and_apart_from_the_old_spacings():
    assert set(COMFY_SPACINGS) == set(ISSUE_NAMES)
    assert not set(COMFY_SPACINGS) & set(SPACINGS)


# ---------------------------------------------------------------------------------------------
# Oracles, from ComfyUI's code read as formulas


def sd_table():
    """Stable Diffusion's 1000 training sigmas: scaled-linear betas 0.00085 .. 0.012."""
    betas = [(math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2 for i in range(1000)]
    out, abar = [], 1.0
    for b in betas:
        abar *= 1.0 - b
        out.append(math.sqrt((1.0 - abar) / abar))
    return out


SD = sd_table()


def interp_log(table, t):
    """ModelSamplingDiscrete.sigma(t): log sigma linear between the integer timesteps."""
    t = min(max(t, 0.0), len(table) - 1)
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    return math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[hi]))


def linspace(a, b, n):
    return [a + (b - a) * i / (n - 1) for i in range(n)] if n > 1 else [a]


def oracle_simple(table, steps):
    ss = len(table) / steps
    return [table[-(1 + int(x * ss))] for x in range(steps)] + [0.0]


def oracle_ddim_uniform(table, steps):
    sigs, x, ss = [], 1, max(len(table) // steps, 1)
    while x < len(table):
        sigs.append(table[x])
        x += ss
    return sigs[::-1] + [0.0]


def oracle_normal(table, steps, sgm=False):
    ts = linspace(len(table) - 1, 0, steps + 1)[:-1] if sgm else linspace(len(table) - 1, 0, steps)
    return [interp_log(table, t) for t in ts] + [0.0]


def oracle_beta(table, steps, a=0.6, b=0.6):
    from scipy.stats import beta as beta_dist
    out, last = [], -1
    for i in range(steps):
        t = int(np.rint(float(beta_dist.ppf(1 - i / steps, a, b)) * (len(table) - 1)))
        if t != last:
            out.append(table[t])
        last = t
    return out + [0.0]


def oracle_linear_quadratic(steps, sigma_max, thr=0.025, ls=None):
    if steps == 1:
        return [sigma_max, 0.0]
    ls = steps // 2 if ls is None else ls
    sched = [i * thr / ls for i in range(ls)]
    d = ls - thr * steps
    q = steps - ls
    qc = d / (ls * q * q)
    lc = thr / ls - 2 * d / (q * q)
    c = qc * ls * ls
    sched += [qc * i * i + lc * i + c for i in range(ls, steps)] + [1.0]
    return [(1.0 - s) * sigma_max for s in sched]


def oracle_kl_optimal(n, smin, smax):
    return [math.tan((i / max(n - 1, 1)) * math.atan(smin) + (1 - i / max(n - 1, 1)) * math.atan(smax))
            for i in range(n)] + [0.0]


def oracle_laplace(n, smin, smax, mu=0.0, beta=0.5):
    out = []
    for x in linspace(0.0, 1.0, n):
        sign = (0.5 - x > 0) - (0.5 - x < 0)
        lmb = mu - beta * sign * math.log(1 - 2 * abs(0.5 - x) + 1e-5)
        out.append(min(max(math.exp(lmb), smin), smax))
    return out


def oracle_polyexponential(n, smin, smax, rho=1.0):
    return [math.exp(r ** rho * (math.log(smax) - math.log(smin)) + math.log(smin))
            for r in linspace(1.0, 0.0, n)] + [0.0]


def oracle_sd_turbo(table, steps):
    return [table[t] for t in (999, 899, 799, 699, 599, 499, 399, 299, 199, 99)[:steps]] + [0.0]


def flux_shift(mu, t):
    return 0.0 if t == 0 else math.exp(mu) / (math.exp(mu) + 1 / t - 1)


def oracle_flux(steps, seq_len=4096, base=0.5, mx=1.15):
    mu = base + (mx - base) * (seq_len - 256) / (4096 - 256)  # diffusers' calculate_shift
    return [flux_shift(mu, t) for t in linspace(1.0, 0.0, steps + 1)]


def oracle_flux2(steps, seq_len=4096):
    if seq_len > 4300:
        mu = 0.00016927 * seq_len + 0.45666666
    else:
        m200 = 0.00016927 * seq_len + 0.45666666
        m10 = 8.73809524e-05 * seq_len + 1.89833333
        mu = m10 + (m200 - m10) * (steps - 10) / 190.0
    return [flux_shift(mu, t) for t in linspace(1.0, 0.0, steps + 1)]


def flow_t(grid):
    """The flow time of each grid point (sigma / (alpha + sigma)); 0 at the clean end."""
    return grid.sigma / (grid.alpha + grid.sigma)


def close(got, want, rtol=RTOL):
    got = np.asarray(got.tolist() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got, want)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-12)


@pytest.fixture(autouse=True)
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


STEPS = (1, 2, 3, 7, 10, 20, 33, 999)


@pytest.mark.parametrize("steps", STEPS)
def test_table_schedulers_match_comfyui_formulas_on_stable_diffusion(steps):
    close(K.get_sigmas_simple(steps), oracle_simple(SD, steps))
    close(K.get_sigmas_ddim_uniform(steps), oracle_ddim_uniform(SD, steps))
    close(K.get_sigmas_normal(steps), oracle_normal(SD, steps))
    close(K.get_sigmas_sgm_uniform(steps), oracle_normal(SD, steps, sgm=True))
    close(K.get_sigmas_beta(steps), oracle_beta(SD, steps))
    close(K.get_sigmas_beta(steps, alpha=0.3, beta=2.0), oracle_beta(SD, steps, 0.3, 2.0))
    close(K.get_sigmas_linear_quadratic(steps), oracle_linear_quadratic(steps, SD[-1]))
    if steps <= 10:
        close(K.get_sigmas_sd_turbo(steps), oracle_sd_turbo(SD, steps))


@pytest.mark.parametrize("steps", STEPS)
def test_range_schedulers_match_their_formulas(steps):
    lo, hi = 0.0291675, 14.614642
    close(K.get_sigmas_kl_optimal(steps, lo, hi), oracle_kl_optimal(steps, lo, hi))
    close(K.get_sigmas_laplace(steps, lo, hi), oracle_laplace(steps, lo, hi))
    close(K.get_sigmas_laplace(steps, 0.002, 80.0, mu=0.5, beta=1.5), oracle_laplace(steps, 0.002, 80.0, 0.5, 1.5))
    close(K.get_sigmas_polyexponential(steps, lo, hi, rho=2.0), oracle_polyexponential(steps, lo, hi, 2.0))
    close(K.get_sigmas_flux(steps), oracle_flux(steps))
    close(K.get_sigmas_flux(steps, image_seq_len=1024, base_shift=0.3, max_shift=1.3),
          oracle_flux(steps, 1024, 0.3, 1.3))
    close(K.get_sigmas_flux2(steps), oracle_flux2(steps))
    close(K.get_sigmas_flux2(steps, image_seq_len=9000), oracle_flux2(steps, 9000))


def test_linear_quadratic_options_and_a_given_table():
    close(K.get_sigmas_linear_quadratic(12, threshold_noise=0.1, linear_steps=3),
          oracle_linear_quadratic(12, SD[-1], 0.1, 3))
    table = [0.01 * 1.01 ** k for k in range(500)]
    close(K.get_sigmas_simple(9, torch.tensor(table)), oracle_simple(table, 9))
    close(K.get_sigmas_normal(9, np.array(table)), oracle_normal(table, 9))
    close(K.get_sigmas_linear_quadratic(9, table), oracle_linear_quadratic(9, table[-1]))

    class ModelSampling:  # ComfyUI's model_sampling: read through its .sigmas table
        sigmas = torch.tensor(table, dtype=torch.float32)
    t32 = [float(v) for v in ModelSampling.sigmas]
    close(K.get_sigmas_ddim_uniform(9, ModelSampling()), oracle_ddim_uniform(t32, 9))


def test_flow_tables_follow_comfyui_shifted_flow_model_sampling():
    """On FlowMatching the table is shift(k / T), k = 1..T (ComfyUI's ModelSamplingDiscreteFlow)."""
    shift = 3.0
    sh = lambda t: shift * t / (1 + (shift - 1) * t)  # noqa: E731
    table = [sh(k / 1000) for k in range(1, 1001)]
    for steps in (1, 4, 9, 30):
        g = make_grid(FlowMatching(), steps, "simple", shift=shift)
        close(flow_t(g), oracle_simple(table, steps))
        # ComfyUI's flow timestep(sigma) = 1000 sigma does not undo the shift; sigma(timestep) applies it
        ts = linspace(1000 * table[-1], 1000 * table[0], steps)
        close(flow_t(make_grid(FlowMatching(), steps, "normal", shift=shift)), [sh(t / 1000) for t in ts] + [0.0])
        close(flow_t(make_grid(FlowMatching(), steps, "beta", shift=shift)), oracle_beta(table, steps))


def test_ve_normal_is_uniform_in_comfyui_edm_timestep():
    s = VESchedule(0.002, 80.0)
    g = make_grid(s, 8, "normal")
    close(g.ksigma[:-1], [math.exp(v) for v in linspace(math.log(80.0), math.log(0.002), 8)])


# ---------------------------------------------------------------------------------------------
# Published tables: typed in from ComfyUI's nodes_align_your_steps.py / nodes_gits.py / nodes_optimalsteps.py

AYS = {"SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
               0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
       "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
                0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
       "SVD": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002]}
OPTIMAL = {"FLUX": [0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001],
           "Wan": [1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968, 0.96, 0.946, 0.927,
                   0.902, 0.864, 0.776, 0.539, 0.208, 0.001]}
GITS = {(1.20, 2): [14.61464119, 0.803307, 0.02916753],
        (1.20, 10): [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823,
                     0.19894916, 0.09824532, 0.02916753],
        (1.50, 20): [14.61464119, 2.45070267, 1.41535246, 0.95350921, 0.72133851, 0.57119018, 0.4783645, 0.43325692,
                     0.38853383, 0.36617002, 0.34370604, 0.32104823, 0.29807833, 0.27464288, 0.25053367, 0.22545385,
                     0.19894916, 0.17026083, 0.13792117, 0.09824532, 0.02916753],
        (0.80, 2): [14.61464119, 7.49001646, 0.02916753]}


def test_published_tables_are_stored_exactly():
    for model, values in AYS.items():
        assert published_table("align_your_steps", model).tolist() == values
    for model, values in OPTIMAL.items():
        assert published_table("optimal_steps", model).tolist() == values
    assert len(published_table("optimal_steps", "Chroma")) == 41
    for (coeff, steps), values in GITS.items():
        assert published_table("gits", coeff, steps).tolist() == values
    assert table_names("gits") == tuple(f"{0.80 + 0.05 * i:.2f}" for i in range(15))
    assert table_names("align_your_steps") == ("SD1", "SDXL", "SVD")
    assert table_names("optimal_steps") == ("FLUX", "Wan", "Chroma")


def test_at_the_published_count_the_functions_return_the_table_with_a_final_zero():
    for model, values in AYS.items():
        close(K.get_sigmas_align_your_steps(10, model), values[:-1] + [0.0], rtol=0)
    close(K.get_sigmas_optimal_steps(10, "FLUX"), OPTIMAL["FLUX"][:-1] + [0.0], rtol=0)
    close(K.get_sigmas_optimal_steps(20, "Wan"), OPTIMAL["Wan"][:-1] + [0.0], rtol=0)
    for (coeff, steps), values in GITS.items():
        close(K.get_sigmas_gits(steps, coeff), values[:-1] + [0.0], rtol=0)


def oracle_loglinear(levels, num):
    """AYS's recipe: log sigma interpolated linearly against a uniform ramp, from the clean end."""
    ys = [math.log(v) for v in levels[::-1]]
    out = []
    for j in range(num):
        x = j / (num - 1) * (len(ys) - 1)
        i = min(int(x), len(ys) - 2)
        out.append(math.exp(ys[i] + (x - i) * (ys[i + 1] - ys[i])))
    return out[::-1]


@pytest.mark.parametrize("num", [2, 3, 5, 11, 12, 26, 101])
def test_loglinear_interpolation_keeps_ends_decreases_and_is_the_table_at_its_count(num):
    for values in list(AYS.values()) + list(OPTIMAL.values()):
        out = loglinear_interp(values, num)
        close(out, oracle_loglinear(values, num), rtol=1e-12)
        assert out[0] == pytest.approx(values[0], rel=1e-15) and out[-1] == pytest.approx(values[-1], rel=1e-15)
        assert np.all(np.diff(out) < 0)
        if num == len(values):
            close(out, values, rtol=1e-14)


@pytest.mark.parametrize("steps", [1, 4, 10, 13, 25])
def test_tables_at_other_counts_are_the_interpolation(steps):
    for model, values in AYS.items():
        close(K.get_sigmas_align_your_steps(steps, model), oracle_loglinear(values, steps + 1)[:-1] + [0.0])
    close(K.get_sigmas_optimal_steps(steps, "Wan"), oracle_loglinear(OPTIMAL["Wan"], steps + 1)[:-1] + [0.0])
    if steps > 20:  # GITS beyond 20 steps: its 20-step table interpolated
        close(K.get_sigmas_gits(steps, 1.5), oracle_loglinear(GITS[(1.50, 20)], steps + 1)[:-1] + [0.0])


# ---------------------------------------------------------------------------------------------
# As make_grid spacings


SCHEDULES = {"sd": DiscreteVP(), "cvp": ContinuousVP(), "ve": VESchedule(), "flow": FlowMatching()}


def test_make_grid_spacings_equal_the_get_sigmas_values():
    sd, flow, ve = DiscreteVP(), FlowMatching(), VESchedule(0.002, 700.0)
    for steps in (1, 2, 5, 10, 17):
        for name in ("simple", "sgm_uniform", "normal", "ddim_uniform", "beta", "linear_quadratic"):
            g = make_grid(sd, steps, name)
            close(g.ksigma, getattr(K, f"get_sigmas_{name}")(steps))
        close(make_grid(sd, steps, "kl_optimal").ksigma, oracle_kl_optimal(steps, SD[0], SD[-1]))
        close(make_grid(sd, steps, "polyexponential").ksigma, oracle_polyexponential(steps, SD[0], SD[-1]))
        close(make_grid(sd, steps, "polyexponential", rho=3.0).ksigma, oracle_polyexponential(steps, SD[0], SD[-1], 3.0))
        close(make_grid(sd, steps, "align_your_steps", model="SDXL").ksigma, K.get_sigmas_align_your_steps(steps, "SDXL"))
        close(make_grid(ve, steps, "align_your_steps", model="SVD").ksigma, K.get_sigmas_align_your_steps(steps, "SVD"))
        close(flow_t(make_grid(flow, steps, "optimal_steps", model="Chroma")), K.get_sigmas_optimal_steps(steps, "Chroma"))
        close(flow_t(make_grid(flow, steps, "flux", image_seq_len=1024)), K.get_sigmas_flux(steps, image_seq_len=1024))
        close(flow_t(make_grid(flow, steps, "flux2")), oracle_flux2(steps))
        if steps >= 2:
            close(make_grid(sd, steps, "gits", coeff=0.95).ksigma, K.get_sigmas_gits(steps, 0.95))
        if steps <= 10:
            g = make_grid(sd, steps, "sd_turbo")
            assert g.t[:-1].tolist() == [999.0, 899.0, 799.0, 699.0, 599.0, 499.0, 399.0, 299.0, 199.0, 99.0][:steps]
            close(g.ksigma, oracle_sd_turbo(SD, steps))
        lap = oracle_laplace(steps, SD[0], SD[-1], 0.5, 0.3)
        if all(a > b for a, b in zip(lap, lap[1:])):
            close(make_grid(sd, steps, "laplace", mu=0.5, beta=0.3).ksigma, lap + [0.0])


def test_table_indices_are_exact_training_timesteps():
    g = make_grid(DiscreteVP(), 10, "simple")
    assert g.t[:-1].tolist() == [999.0 - 100 * i for i in range(10)]
    assert np.all(g.model_t[:-1] == g.t[:-1])


def test_final_none_keeps_the_last_table_level():
    g = make_grid(DiscreteVP(), 10, "align_your_steps", final="none")
    close(g.ksigma, AYS["SD1"])
    g = make_grid(FlowMatching(), 10, "optimal_steps", final="none")
    close(flow_t(g), OPTIMAL["FLUX"])
    g = make_grid(DiscreteVP(), 6, "simple", final="none")
    close(g.ksigma, oracle_simple(SD, 7)[:-1])


@pytest.mark.parametrize("name", COMFY_SPACINGS)
@pytest.mark.parametrize("where", list(SCHEDULES))
def test_every_spacing_gives_a_decreasing_grid_inside_the_schedule_or_a_clear_error(name, where):
    schedule = SCHEDULES[where]
    built = 0
    for steps in (1, 2, 3, 8, 10, 21):
        for final in ("zero", "none", "sigma_min"):
            try:
                g = make_grid(schedule, steps, name, final=final)
            except ValueError as e:
                assert str(e)
                continue
            built += 1
            with np.errstate(divide="ignore"):
                ks, ks_min, ks_max = g.ksigma, schedule.ksigma_min, schedule.ksigma_max
            assert np.all(ks[1:] < ks[:-1])
            assert np.all(g.t >= schedule.t_min - 1e-12) and np.all(g.t <= schedule.t_max + 1e-12)
            inner = ks[:-1] if final != "none" else ks
            assert np.all(inner >= ks_min * (1 - 1e-9))
            assert np.all(inner <= ks_max * (1 + 1e-9))
            if final == "zero":
                assert g.sigma[-1] == 0.0 and g.alpha[-1] == 1.0
            if name not in ("ddim_uniform", "beta"):  # ComfyUI's own counts there (see the module docstring)
                assert g.steps == steps
    expected_to_build = {  # where each spacing is meant to be used
        "sd_turbo": ("sd",), "flux": ("flow",), "flux2": ("flow",), "optimal_steps": ("flow",),
        "laplace": ("sd", "cvp", "ve")}
    if where in expected_to_build.get(name, tuple(SCHEDULES)):
        assert built > 0, (name, where)


def test_ddim_uniform_and_beta_counts_are_comfyuis():
    assert make_grid(DiscreteVP(), 7, "ddim_uniform").steps == len(oracle_ddim_uniform(SD, 7)) - 1 == 8
    g = make_grid(DiscreteVP(), 200, "beta")
    assert g.steps == len(oracle_beta(SD, 200)) - 1 < 200


# ---------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("call, match", [
    (lambda: K.get_sigmas_align_your_steps(10, "SD3"), "unknown align_your_steps model"),
    (lambda: K.get_sigmas_optimal_steps(10, "Kolors"), "unknown optimal_steps model"),
    (lambda: K.get_sigmas_gits(10, coeff=1.23), "GITS has tables for coeff"),
    (lambda: K.get_sigmas_gits(1), "steps"),
    (lambda: K.get_sigmas_simple(0), "n "),
    (lambda: K.get_sigmas_align_your_steps(0), "n "),
    (lambda: K.get_sigmas_beta(10, alpha=0.0), "alpha"),
    (lambda: K.get_sigmas_beta(10, beta=-1.0), "beta"),
    (lambda: K.get_sigmas_beta(10, alpha=float("nan")), "alpha"),
    (lambda: K.get_sigmas_laplace(10, 0.03, 14.6, beta=0.0), "beta"),
    (lambda: K.get_sigmas_kl_optimal(10, 14.6, 0.03), "sigma_max"),
    (lambda: K.get_sigmas_kl_optimal(10, 0.0, 14.6), "sigma_min"),
    (lambda: K.get_sigmas_sd_turbo(11), "steps <= 10"),
    (lambda: K.get_sigmas_sd_turbo(4, VESchedule()), "discrete"),
    (lambda: K.get_sigmas_linear_quadratic(10, threshold_noise=1.5), "threshold_noise"),
    (lambda: K.get_sigmas_linear_quadratic(10, linear_steps=10), "linear_steps"),
    (lambda: K.get_sigmas_flux(10, image_seq_len=0), "image_seq_len"),
    (lambda: K.get_sigmas_flux2(10, image_seq_len=-5), "image_seq_len"),
    (lambda: K.get_sigmas_simple(5, [3.0, 2.0, 1.0]), "increasing"),
    (lambda: K.get_sigmas_simple(5, DiscreteVP(zero_terminal_snr=True)), "zero terminal SNR"),
    (lambda: make_grid(DiscreteVP(), 0, "simple"), "steps"),
    (lambda: make_grid(DiscreteVP(), 10, "align_your_steps", model="nope"), "unknown align_your_steps model"),
    (lambda: make_grid(DiscreteVP(), 10, "align_your_steps", model="SVD"), "outside the schedule's range"),
    (lambda: make_grid(DiscreteVP(), 10, "optimal_steps"), "outside the schedule's range"),
    (lambda: make_grid(DiscreteVP(), 10, "beta", alpha=0.0), "alpha"),
    (lambda: make_grid(DiscreteVP(), 10, "flux"), "flow-matching"),
    (lambda: make_grid(VESchedule(), 4, "sd_turbo"), "discrete"),
    (lambda: make_grid(DiscreteVP(), 11, "sd_turbo"), "steps <= 10"),
    (lambda: make_grid(DiscreteVP(), 10, "simple", shift=3.0), "shift/mu apply to FlowMatching"),
    (lambda: make_grid(DiscreteVP(), 10, "gits", mu=0.5), "mu does not apply"),
    (lambda: make_grid(DiscreteVP(), 10, "simple", rho=2.0), "rho applies"),
    (lambda: make_grid(DiscreteVP(), 10, "simple", t_max=500.0), "t_min/t_max apply"),
    (lambda: make_grid(DiscreteVP(), 10, "simple", final="end"), "final"),
    (lambda: make_grid(FlowMatching(), 10, "laplace"), "strictly decrease"),
    (lambda: make_grid(DiscreteVP(), 1001, "simple"), "would repeat levels"),
])
def test_bad_arguments_raise_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_options_raise_type_errors():
    with pytest.raises(TypeError, match="no option 'coeff'"):
        make_grid(DiscreteVP(), 10, "beta", coeff=1.2)
    with pytest.raises(TypeError, match="unexpected keyword"):
        make_grid(DiscreteVP(), 10, "karras", alpha=0.6)
    with pytest.raises(TypeError, match="model must be a string"):
        K.get_sigmas_align_your_steps(10, 1)


def test_existing_spacings_keep_their_defaults():
    a = make_grid(VESchedule(), 10, "karras")
    b = make_grid(VESchedule(), 10, "karras", rho=7.0)
    assert np.array_equal(a.ksigma, b.ksigma)
    assert make_grid(DiscreteVP(), 10).t[:-1].tolist() == [900.0 - 100 * i for i in range(10)]


def test_range_spacings_take_t_min_t_max_and_get_sigmas_take_a_schedule():
    close(make_grid(DiscreteVP(), 6, "kl_optimal", t_max=500.0).ksigma, oracle_kl_optimal(6, SD[0], SD[500]))
    close(make_grid(DiscreteVP(), 6, "polyexponential", t_min=20.0).ksigma, oracle_polyexponential(6, SD[20], SD[-1]))
    flow_table = [k / 1000 for k in range(1, 1001)]
    close(K.get_sigmas_simple(7, FlowMatching()), oracle_simple(flow_table, 7))
    close(K.get_sigmas_ddim_uniform(7, FlowMatching()), oracle_ddim_uniform(flow_table, 7))
    close(K.get_sigmas_simple(7, DiscreteVP()), K.get_sigmas_simple(7))


class FlowModelSampling:
    """Stands in for ComfyUI's ModelSamplingDiscreteFlow (SD3, shift 3): table shift(k / 1000),
    timestep(sigma) = 1000 sigma, sigma(timestep) = shift(timestep / 1000)."""
    shift = 3.0

    def __init__(self):
        self.sigmas = self.sigma(torch.arange(1, 1001, dtype=torch.float32))

    def sigma(self, timestep):
        t = timestep / 1000
        return self.shift * t / (1 + (self.shift - 1) * t)

    def timestep(self, sigma):
        return sigma * 1000

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]


def test_a_comfyui_model_sampling_is_used_through_its_own_methods():
    ms = FlowModelSampling()
    sh = lambda t: 3.0 * t / (1 + 2.0 * t)  # noqa: E731
    table = [float(v) for v in ms.sigmas]
    for steps in (1, 5, 12):
        ts = linspace(1000 * table[-1], 1000 * table[0], steps)
        close(K.get_sigmas_normal(steps, ms), [sh(t / 1000) for t in ts] + [0.0])
        ts = linspace(1000 * table[-1], 1000 * table[0], steps + 1)[:-1]
        close(K.get_sigmas_sgm_uniform(steps, ms), [sh(t / 1000) for t in ts] + [0.0])
        close(K.get_sigmas_simple(steps, ms), oracle_simple(table, steps))
        close(K.get_sigmas_beta(steps, ms), oracle_beta(table, steps))
    close(K.get_sigmas_sd_turbo(3, ms), [sh(0.999), sh(0.899), sh(0.799), 0.0])
