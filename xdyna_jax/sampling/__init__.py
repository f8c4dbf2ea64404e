"""Sampling: pipeline bundles (model bundles composed into one denoiser plus its encoders) and the
pipelines that run them (`sampling.xdyna.XDynaPipeline`, `sampling.dynamictrl.DynamiCtrlPipeline`)."""

from xdyna_jax.sampling.bundles import (
    PIPELINE_KINDS,
    CogVideoX,
    DynamiCtrl,
    XDyna,
    load_cogvideox,
    load_dynamictrl,
    load_pipeline,
    load_xdyna,
)

__all__ = [
    "PIPELINE_KINDS",
    "CogVideoX",
    "DynamiCtrl",
    "XDyna",
    "load_cogvideox",
    "load_dynamictrl",
    "load_pipeline",
    "load_xdyna",
]
