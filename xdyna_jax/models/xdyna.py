"""X-Dyna's denoiser: one UNet call on a window (reference frame 0 + N driven frames) with the pose and
S-Face ControlNets.

Each ControlNet runs per driven frame (frames 1..N) on the text tokens only; the pose and face residuals are
summed, a zero residual is prepended for the reference frame, and the result is added to the UNet's skips,
as the release does. Loading a converted bundle lives in `xdyna_jax.sampling.bundles`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class XDynaDenoiser(nnx.Module):
    """eps = UNet(latents, t, [text ; image tokens], ControlNet residuals of frames 1..N)."""

    def __init__(self, unet, pose_controlnet=None, face_controlnet=None):
        self.unet = unet
        self.pose_controlnet = pose_controlnet
        self.face_controlnet = face_controlnet

    def control_residuals(self, latents, timesteps, text, pose, face, pose_scale, face_scale):
        """Summed residuals of the ControlNets present, per window frame (B, F, ...), zero on frame 0."""
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
