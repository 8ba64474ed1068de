"""ComfyUI's full KSAMPLER list: every name is a fastdiff k-diffusion-signature function, and the
two kinds of alias (``*_gpu``, ``ddpm``) compute what ComfyUI computes."""
from __future__ import annotations

import pytest
import torch

from fastdiff.integrations import k_diffusion as K

# comfy/samplers.py KSAMPLER_NAMES (plus SAMPLER_NAMES' ddim, uni_pc, uni_pc_bh2)
KSAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]


@pytest.mark.parametrize("name", KSAMPLER_NAMES)
def test_every_ksampler_name_has_its_function(name):
    fn = getattr(K, f"sample_{name}", None)
    assert callable(fn) and f"sample_{name}" in K.__all__
    import inspect
    params = list(inspect.signature(fn).parameters)
    if name in ("dpm_fast", "dpm_adaptive"):        # k-diffusion's own form, which ComfyUI adapts
        assert params[:4] == ["model", "x", "sigma_min", "sigma_max"]
    else:
        assert params[:6] == ["model", "x", "sigmas", "extra_args", "callback", "disable"]


def _comfy_ddpm(model, x, sigmas, noises):
    """ComfyUI's generic_step_sampler with DDPMSampler_step, as written there (float64)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_prev = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * torch.ones(x.shape[0], dtype=x.dtype))
        eps = (x - denoised) / sigma
        xv = x / torch.sqrt(1.0 + sigma ** 2)
        ac, ac_prev = 1 / (sigma * sigma + 1), 1 / (sigma_prev * sigma_prev + 1)
        alpha = ac / ac_prev
        mu = (1.0 / alpha).sqrt() * (xv - (1 - alpha) * eps / (1 - ac).sqrt())
        if sigma_prev > 0:
            mu = mu + ((1 - alpha) * (1.0 - ac_prev) / (1.0 - ac)).sqrt() * noises[i]
        x = mu * torch.sqrt(1.0 + sigma_prev ** 2) if sigma_prev != 0 else mu
    return x


def test_ddpm_is_comfyuis_ddpm_step():
    sigmas = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.3, 0.05, 0.0], dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    noises = [torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + i))
              for i in range(len(sigmas) - 1)]

    def model(x, s):                    # a smooth denoiser
        return x / (1 + s.reshape(-1, 1) ** 2) + 0.1 * torch.tanh(x)

    calls = iter(range(len(noises)))
    ours = K.sample_ddpm(model, x.clone(), sigmas, disable=True,
                         noise_sampler=lambda s, s_next: noises[next(calls)])
    ref = _comfy_ddpm(model, x.clone(), sigmas, noises)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12), (ours - ref).abs().max()


def test_gpu_names_are_the_same_functions():
    for name in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):
        assert getattr(K, f"sample_{name}_gpu") is getattr(K, f"sample_{name}")
