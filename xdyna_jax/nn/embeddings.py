"""Sinusoidal timestep features and the two-layer timestep MLP of the SD UNet."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import linear


def timestep_features(
    timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
    """(B,) timesteps -> (B, dim) float32 [sin | cos] features (cos first when flip_sin_to_cos)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_dim: int, dim: int, compute: Compute, rngs: nnx.Rngs):
        self.linear_1 = linear(in_dim, dim, compute, rngs)
        self.linear_2 = linear(dim, dim, compute, rngs, names=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))
