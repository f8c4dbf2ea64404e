"""Diffusion samplers."""

from xdyna_jax.schedulers.cogvideox import (
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXSchedulerConfig,
)
from xdyna_jax.schedulers.ddim import DDIMConfig, DDIMScheduler

__all__ = [
    "CogVideoXDDIMScheduler",
    "CogVideoXDPMScheduler",
    "CogVideoXSchedulerConfig",
    "DDIMConfig",
    "DDIMScheduler",
]
