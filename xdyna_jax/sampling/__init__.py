"""Sampling: pipeline bundles (model bundles composed into one denoiser plus its encoders)."""

from xdyna_jax.sampling.bundles import PIPELINE_KINDS, XDyna, load_pipeline, load_xdyna

__all__ = ["PIPELINE_KINDS", "XDyna", "load_pipeline", "load_xdyna"]
