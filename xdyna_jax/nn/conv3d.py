"""Causal 3-D convolution over channels-last video (B, T, H, W, C), run chunk by chunk along time.

A causal conv never looks at later frames: its kt-1 frames of temporal context come before the chunk. At
the start of a video they are copies of the first frame; when a long video is processed in frame chunks
they are the last kt-1 (already padded) input frames of the previous chunk, handed over as a cache.
Running the chunks one after another with the cache therefore gives exactly the conv of the whole video.
Spatially the padding is zeros, kh//2 and kw//2 on each side (PyTorch's Conv3d `padding`).

A cache is a pair (frames, at_start): `at_start` is a boolean scalar that, when true, makes the conv
ignore `frames` and repeat the first frame instead. So the first chunk of a video can run the program
compiled for the later chunks of the same shape (`start_cache`) instead of a second one of its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import conv3d

Cache = tuple[jax.Array, jax.Array]


class CausalConv3d(nnx.Module):
    """A cubic `kernel`-sized conv, stride 1; the parameters sit in `conv` (leaves kernel [kt,kh,kw,I,O], bias)."""

    def __init__(self, din: int, dout: int, kernel: int, *, compute: Compute, rngs: nnx.Rngs):
        self.time_kernel = kernel
        pad = (kernel - 1) // 2
        self.conv = conv3d(din, dout, (kernel,) * 3, compute, rngs, padding=((0, 0), (pad, pad), (pad, pad)))

    def __call__(self, x: jax.Array, cache: Cache | None = None) -> tuple[jax.Array, Cache | None]:
        """x (B, T, H, W, I) -> (y (B, T, H, W, O), the cache for the next chunk; None for a 1-frame kernel).

        `cache`: what the previous chunk returned, or None (or a `start_cache`) at the start of the video.
        """
        context = self.time_kernel - 1
        if context == 0:
            return self.conv(x), None
        first = jnp.repeat(x[:, :1], context, axis=1)
        if cache is None:
            head = first
        else:
            frames, at_start = cache
            if frames.shape[1] != context or frames.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"CausalConv3d: cache of shape {tuple(frames.shape)} does not fit input {tuple(x.shape)} "
                    f"(needs {context} frames of the same (H, W, C))"
                )
            head = jnp.where(at_start, first, frames.astype(x.dtype))
        padded = jnp.concatenate([head, x], axis=1)
        return self.conv(padded), (padded[:, -context:], jnp.zeros((), jnp.bool_))


def start_cache(cache_shapes):
    """A cache pytree that starts a video: zero frames flagged `at_start`, from the shapes of a real cache
    (the `jax.ShapeDtypeStruct`s that `jax.eval_shape` gives for the cache a chunk returns)."""

    def leaf(s):
        return jnp.ones(s.shape, s.dtype) if s.dtype == jnp.bool_ else jnp.zeros(s.shape, s.dtype)

    return jax.tree.map(leaf, cache_shapes)
