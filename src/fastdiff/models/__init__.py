"""Models fastdiff ships: the analytic Gaussian mixture (exact denoiser, the accuracy oracle)."""
from .gaussian_mixture import GaussianMixture  # noqa: F401
