"""Diffusion samplers."""

from xdyna_jax.schedulers.ddim import DDIMConfig, DDIMScheduler

__all__ = ["DDIMConfig", "DDIMScheduler"]
