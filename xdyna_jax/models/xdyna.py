"""X-Dyna's denoiser: one UNet call on a window (reference frame 0 + N driven frames) with the pose and
S-Face ControlNets, and the loader of a converted X-Dyna bundle (a folder of bundles).

ControlNets (per frame, frames 1..N only, text tokens only) -> residuals of pose + face summed, a zero
residual prepended for the reference frame -> added to the UNet skips (xdyna_official_code.md section b).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.bundle import BundleError, load
from xdyna_jax.models.clip_tokenizer import CLIPTokenizer
from xdyna_jax.nn.compute import Compute
from xdyna_jax.schedulers import DDIMConfig

# The release's sampler (xdyna_official_code.md section i): linear betas, steps_offset 1, no clipping;
# set_alpha_to_one keeps diffusers' default (True), as the release never overrides it.
XDYNA_SCHEDULER = DDIMConfig(
    beta_schedule="linear",
    beta_start=0.00085,
    beta_end=0.012,
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=True,
)


class XDynaDenoiser(nnx.Module):
    """eps = UNet(latents, t, [text ; image tokens], ControlNet residuals of frames 1..N)."""

    def __init__(self, unet, pose_controlnet=None, face_controlnet=None):
        self.unet = unet
        self.pose_controlnet = pose_controlnet
        self.face_controlnet = face_controlnet

    def control_residuals(self, latents, timesteps, text, pose, face, pose_scale, face_scale):
        """Summed residuals of the ControlNets present, per clip frame (B, F, ...), zero on frame 0."""
        b, f = latents.shape[:2]
        n = f - 1
        sample = latents[:, 1:].reshape(b * n, *latents.shape[2:])
        t = jnp.repeat(jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,)), n)
        context = jnp.repeat(text, n, axis=0)
        total = None
        for net, cond, scale, name in (
            (self.pose_controlnet, pose, pose_scale, "pose"),
            (self.face_controlnet, face, face_scale, "face"),
        ):
            if net is None or cond is None:
                continue
            if cond.shape[:2] != (b, n):
                raise ValueError(
                    f"{name} condition must cover the {n} driven frames (B={b}), got {tuple(cond.shape)}"
                )
            down, mid = net(sample, t, context, cond.reshape(b * n, *cond.shape[2:]), scale)
            res = [*down, mid]
            total = res if total is None else [a + r for a, r in zip(total, res, strict=True)]
        if total is None:
            return None, None
        with_ref = [
            jnp.concatenate([jnp.zeros((b, 1, *r.shape[1:]), r.dtype), r.reshape(b, n, *r.shape[1:])], axis=1)
            for r in total
        ]
        return with_ref[:-1], with_ref[-1]

    def __call__(
        self,
        latents: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
        pose: jax.Array | None = None,
        face: jax.Array | None = None,
        *,
        pose_scale: float = 1.0,
        face_scale: float = 1.0,
        ip_scale: float = 1.0,
    ) -> jax.Array:
        """latents (B, F, h, w, 4) with frame 0 the clean reference; context (B, 77 [+ 16 image tokens], D);
        pose (B, F-1, 8h, 8w, 3) and face (B, F-1, 8h, 8w, 6) conditions for frames 1..F-1, either optional."""
        if latents.ndim != 5 or latents.shape[1] < 2:
            raise ValueError(
                f"latents must be a window (B, 1 + N, h, w, C) with N >= 1, got {tuple(latents.shape)}"
            )
        ip_tokens = self.unet.config.ip_adapter_tokens
        text = context[:, : context.shape[1] - ip_tokens] if ip_tokens else context
        down, mid = self.control_residuals(latents, timesteps, text, pose, face, pose_scale, face_scale)
        return self.unet(latents, timesteps, context, down, mid, ip_scale=ip_scale)


@dataclasses.dataclass
class XDyna:
    """Every part of a converted X-Dyna bundle (`python -m convert xdyna`); absent optional parts are None."""

    denoiser: XDynaDenoiser
    vae: nnx.Module
    text_encoder: nnx.Module
    tokenizer: CLIPTokenizer | None
    image_encoder: nnx.Module | None
    resampler: nnx.Module | None
    scheduler: DDIMConfig
    manifest: dict

    def image_tokens(self, pixel_values: jax.Array) -> jax.Array:
        """IP-Adapter-plus tokens: Resampler(CLIP vision penultimate hidden states) of CLIP-preprocessed images."""
        if self.image_encoder is None or self.resampler is None:
            raise ValueError("this X-Dyna bundle has no image_encoder/resampler (IP-Adapter) parts")
        return self.resampler(self.image_encoder(pixel_values).hidden_states[-2])


def load_xdyna(path: str | Path, *, compute: Compute | None = None) -> XDyna:
    """Load the folder written by `python -m convert xdyna` (compute overrides every model's settings)."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise BundleError(f"{path} is not an X-Dyna bundle: {path / 'manifest.json'} is missing")

    def part(name, kind, required=True):
        if not (path / name).is_dir():
            if required:
                raise BundleError(f"{path} is missing its {name}/ bundle")
            return None
        return load(path / name, compute=compute, expected_kind=kind)

    denoiser = XDynaDenoiser(
        part("unet", "video_unet"),
        part("controlnet_pose", "controlnet", False),
        part("controlnet_face", "controlnet", False),
    )
    tokenizer = CLIPTokenizer.from_folder(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    scheduler = DDIMConfig.from_diffusers(
        json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    )
    return XDyna(
        denoiser=denoiser,
        vae=part("vae", "vae"),
        text_encoder=part("text_encoder", "clip_text"),
        tokenizer=tokenizer,
        image_encoder=part("image_encoder", "clip_vision", False),
        resampler=part("resampler", "resampler", False),
        scheduler=scheduler,
        manifest=json.loads((path / "manifest.json").read_text()),
    )
