"""ResNet block and the 2x down/up samplers of the SD UNet and VAE (NHWC)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import conv, linear
from xdyna_jax.nn.norms import GroupNorm


class ResnetBlock2D(nnx.Module):
    """norm1-silu-conv1 (+ time_emb_proj(silu(temb))) -norm2-silu-conv2, plus a (1x1 conv) shortcut.

    `norm_fn` lets a caller change how GroupNorm statistics are pooled (e.g. over the frames of a window):
    it receives the norm module and the activation and returns the normalised activation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        compute: Compute,
        rngs: nnx.Rngs,
        output_scale_factor: float = 1.0,
    ):
        self.norm1 = GroupNorm(in_channels, groups, eps)
        self.conv1 = conv(in_channels, out_channels, 3, compute, rngs)
        self.time_emb_proj = linear(temb_channels, out_channels, compute, rngs) if temb_channels else None
        self.norm2 = GroupNorm(out_channels, groups, eps)
        self.conv2 = conv(out_channels, out_channels, 3, compute, rngs)
        self.conv_shortcut = (
            conv(in_channels, out_channels, 1, compute, rngs) if in_channels != out_channels else None
        )
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array | None = None, norm_fn=None) -> jax.Array:
        norm = norm_fn or (lambda n, h: n(h))
        h = self.conv1(jax.nn.silu(norm(self.norm1, x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :].astype(h.dtype)
        h = self.conv2(jax.nn.silu(norm(self.norm2, h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """3x3 stride-2 conv. padding=1: symmetric (UNet); padding=0: pad right/bottom by 1 first (VAE)."""

    def __init__(self, channels: int, out_channels: int | None, *, padding: int, compute, rngs):
        self.padding = padding
        self.conv = conv(channels, out_channels or channels, 3, compute, rngs, stride=2, padding=padding)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour resize of (B, H, W, C) to `size` (default 2x), indexing like torch's 'nearest'."""
    h, w = x.shape[1], x.shape[2]
    th, tw = size or (2 * h, 2 * w)
    if (th, tw) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = jnp.floor(jnp.arange(th) * (h / th)).astype(jnp.int32)
    cols = jnp.floor(jnp.arange(tw) * (w / tw)).astype(jnp.int32)
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    def __init__(self, channels: int, out_channels: int | None, *, compute, rngs):
        self.conv = conv(channels, out_channels or channels, 3, compute, rngs)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        return self.conv(upsample_nearest(x, size))
