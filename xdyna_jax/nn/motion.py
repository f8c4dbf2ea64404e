"""AnimateDiff motion module (temporal transformer) with the ORIGINAL AnimateDiff parameter names.

    VanillaTemporalModule.temporal_transformer.{norm, proj_in, transformer_blocks.k.{attention_blocks.{0,1},
    norms.{0,1}, ff, ff_norm}, proj_out}

These are the names of guoyww/AnimateDiff's mm_sd_v1x/v2/v3 files and of the X-Dyna release, so their keys
load as they are (convert/animatediff_keys.py maps diffusers' MotionAdapter names onto them). Per block:

    for i in (0, 1):  h = h + attention_blocks[i](norms[i](h) + pe[:F])     # self-attention over frames
    h = h + ff(ff_norm(h))

The sinusoidal table `pe` goes onto the normed input of each attention (so into q, k and v alike), never
onto the residual stream; diffusers' BasicTransformerBlock(positional_embeddings="sinusoidal") does the same
with one table per block. The only behavioural difference to diffusers' AnimateDiffTransformer3D is the input
GroupNorm's extent: per frame here by default (the original), across the frames of a window there
(`groupnorm_across_frames=True`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdyna_jax.nn.attention import Attention
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import linear
from xdyna_jax.nn.norms import GroupNorm, LayerNorm
from xdyna_jax.nn.transformer import FeedForward


@functools.lru_cache(maxsize=64)
def sinusoidal_table(length: int, channels: int) -> np.ndarray:
    """(length, channels) float32: sin on even, cos on odd channels, frequencies 10000^(-2i/channels).

    Computed in float32 step by step as AnimateDiff/diffusers build their `pe` buffer, so the table matches
    the one stored in checkpoints to float32 rounding. A constant (never a parameter): it depends only on the
    position and the width, which is also why a length-24 table is the first 24 rows of a length-32 one.
    """
    if channels % 2:
        raise ValueError(f"sinusoidal position encoding needs an even channel count, got {channels}")
    position = np.arange(length, dtype=np.float32)[:, None]
    freq = np.exp(np.arange(0, channels, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / channels))
    angle = position * freq
    table = np.zeros((length, channels), np.float32)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle)
    table.flags.writeable = False  # shared through the cache
    return table


@dataclasses.dataclass(frozen=True)
class MotionSpec:
    """Settings every motion module of a UNet shares (the defaults are AnimateDiff v1's).

    groupnorm_across_frames: False = the original, GroupNorm statistics per frame; True = statistics over all
    frames of a window, as diffusers' AnimateDiffTransformer3D computes them.
    """

    heads: int = 8
    max_len: int = 24
    norm_groups: int = 32
    num_layers: int = 1
    groupnorm_across_frames: bool = False


class TemporalTransformerBlock(nnx.Module):
    """Two temporal self-attentions (each with its LayerNorm and the position table) and a GEGLU FF."""

    def __init__(self, dim: int, heads: int, max_len: int, compute: Compute, rngs: nnx.Rngs):
        self.max_len = max_len
        self.attention_blocks = nnx.List(
            [Attention(dim, heads=heads, dim_head=dim // heads, compute=compute, rngs=rngs) for _ in range(2)]
        )
        self.norms = nnx.List([LayerNorm(dim) for _ in range(2)])
        self.ff = FeedForward(dim, compute, rngs)
        self.ff_norm = LayerNorm(dim)

    def __call__(self, h: jax.Array) -> jax.Array:
        """h: (N, F, C) with N = batch * pixels; attention runs along F."""
        pe = jnp.asarray(sinusoidal_table(self.max_len, h.shape[-1])[: h.shape[1]], h.dtype)
        for attn, norm in zip(self.attention_blocks, self.norms, strict=True):
            h = h + attn(norm(h) + pe)
        return h + self.ff(self.ff_norm(h))


class TemporalTransformer3DModel(nnx.Module):
    """GroupNorm -> proj_in -> temporal blocks on (B*H*W, F, C) -> proj_out, plus the input residual."""

    def __init__(self, channels: int, spec: MotionSpec, compute: Compute, rngs: nnx.Rngs):
        self.groupnorm_across_frames = spec.groupnorm_across_frames
        self.norm = GroupNorm(channels, spec.norm_groups, 1e-6)
        self.proj_in = linear(channels, channels, compute, rngs)
        self.transformer_blocks = nnx.List(
            [
                TemporalTransformerBlock(channels, spec.heads, spec.max_len, compute, rngs)
                for _ in range(spec.num_layers)
            ]
        )
        self.proj_out = linear(channels, channels, compute, rngs, names=("mlp", "embed"))

    def __call__(self, x: jax.Array, frames: int) -> jax.Array:
        bf, height, width, c = x.shape
        b = bf // frames
        # GroupNorm normalises each element of axis 0, so the shape passed picks the statistics' extent.
        h = self.norm(x.reshape(b, frames, height, width, c) if self.groupnorm_across_frames else x)
        # (B, F, H, W, C) -> (B*H*W, F, C): one length-F sequence per pixel of each window.
        h = (
            h.reshape(b, frames, height * width, c)
            .transpose(0, 2, 1, 3)
            .reshape(b * height * width, frames, c)
        )
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h)
        h = self.proj_out(h)
        h = h.reshape(b, height * width, frames, c).transpose(0, 2, 1, 3).reshape(bf, height, width, c)
        return h + x


class VanillaTemporalModule(nnx.Module):
    """AnimateDiff's motion module: `temporal_transformer` (the only child) with a zero-initialised proj_out."""

    def __init__(self, channels: int, spec: MotionSpec, *, compute: Compute, rngs: nnx.Rngs):
        if channels % spec.heads:
            raise ValueError(f"motion module: {spec.heads} heads do not divide {channels} channels")
        self.max_len = spec.max_len
        self.temporal_transformer = TemporalTransformer3DModel(channels, spec, compute, rngs)
        # Zero proj_out makes a freshly inserted module the identity, so training starts from the image model.
        proj_out = self.temporal_transformer.proj_out
        proj_out.kernel.set_value(jnp.zeros_like(proj_out.kernel.get_value()))
        proj_out.bias.set_value(jnp.zeros_like(proj_out.bias.get_value()))

    def __call__(self, x: jax.Array, frames: int, skip_reference: bool = False) -> jax.Array:
        """x: (B*F, H, W, C) frames folded into the batch (frame-major inside each window: index b*F + f).

        Temporal self-attention over the F axis at every pixel; returns the same shape.
        skip_reference: frame 0 of each window bypasses the module (X-Dyna's cross_id): slice it off, run on
        frames 1..F-1, put it back unchanged.
        """
        if x.ndim != 4 or frames < 1 or x.shape[0] % frames:
            raise ValueError(
                f"motion module expects (batch*frames, H, W, C) with a batch divisible by frames={frames}, "
                f"got shape {x.shape}"
            )
        if not skip_reference:
            self._check_length(frames)
            return self.temporal_transformer(x, frames)
        windows = x.reshape(x.shape[0] // frames, frames, *x.shape[1:])
        rest = frames - 1
        if rest == 0:  # only the reference: nothing to attend over
            return x
        self._check_length(rest)
        out = self.temporal_transformer(windows[:, 1:].reshape(-1, *x.shape[1:]), rest)
        out = jnp.concatenate([windows[:, :1], out.reshape(windows.shape[0], rest, *x.shape[1:])], axis=1)
        return out.reshape(x.shape)

    def _check_length(self, frames: int) -> None:
        if frames > self.max_len:
            raise ValueError(
                f"motion module attends over {frames} frames but its position encoding has max_len="
                f"{self.max_len}; use windows of at most {self.max_len} frames"
            )
