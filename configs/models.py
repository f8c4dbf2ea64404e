"""ConfigDict <-> model config dataclasses, so configs stay plain data that CLI overrides can edit."""

from __future__ import annotations

import ml_collections

from xdyna_jax.models.clip_text import CLIPTextConfig
from xdyna_jax.models.clip_vision import CLIPVisionConfig
from xdyna_jax.models.controlnet import ControlNetConfig
from xdyna_jax.models.resampler import ResamplerConfig
from xdyna_jax.models.unet import UNetConfig
from xdyna_jax.models.vae import VAEConfig
from xdyna_jax.nn.compute import Compute

_CLASSES = {
    "unet": UNetConfig,
    "vae": VAEConfig,
    "controlnet_pose": ControlNetConfig,
    "controlnet_face": ControlNetConfig,
    # the image-prompt and text encoders (configs/synthetic.py builds every part from its config)
    "image_encoder": CLIPVisionConfig,
    "resampler": ResamplerConfig,
    "text_encoder": CLIPTextConfig,
}


def model_configs(cfg: ml_collections.ConfigDict) -> dict:
    """{name: dataclass config} for every entry of cfg.model, all sharing cfg.compute."""
    compute = Compute(**cfg.compute.to_dict())
    out = {}
    for name, section in cfg.model.items():
        if name not in _CLASSES:
            raise ValueError(f"config.model.{name}: unknown model (known: {sorted(_CLASSES)})")
        out[name] = _CLASSES[name].from_dict({**section.to_dict(), "compute": compute.__dict__})
    return out


def compute_section(**overrides) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({**Compute().__dict__, **overrides})
