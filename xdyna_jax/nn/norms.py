"""GroupNorm and LayerNorm computed in fp32 (parameters `scale`, `bias` as in Flax).

GroupNorm normalises each element of axis 0 over every other axis within a channel group, so the caller
decides the statistics' extent by the shape it passes: (B*F, H, W, C) for per-frame statistics,
(B, F, H, W, C) for statistics shared across the frames of a window (AnimateDiff v1 / X-Dyna release).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.nn.layers import param


class GroupNorm(nnx.Module):
    def __init__(self, num_channels: int, num_groups: int, eps: float, *, affine: bool = True):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_groups} groups do not divide {num_channels} channels")
        self.num_groups = num_groups
        self.eps = eps
        self.scale = param(jnp.ones((num_channels,), jnp.float32), ("norm",)) if affine else None
        self.bias = param(jnp.zeros((num_channels,), jnp.float32), ("norm",)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        c = x.shape[-1]
        xg = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        if self.scale is not None:
            y = y * self.scale[...] + self.bias[...]
        return y.astype(dtype)


class LayerNorm(nnx.Module):
    def __init__(self, num_channels: int, eps: float = 1e-5):
        self.eps = eps
        self.scale = param(jnp.ones((num_channels,), jnp.float32), ("norm",))
        self.bias = param(jnp.zeros((num_channels,), jnp.float32), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(dtype)
