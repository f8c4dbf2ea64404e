"""X-Dyna's initial latents: the reference latent in every frame, half of it blurred, then noised.

The release (after I2V-Adapter) does not start from pure noise. Every driven frame starts as the reference
latent, each element kept or replaced by a Gaussian-blurred copy (kernel 9, sigma 18, reflect padding, per
frame and channel) by a Bernoulli(0.5) mask, and is then noised to the first sampling timestep (at t = 961
about 5 % of the signal survives). Frame 0 stays the clean reference. The mask and the noise are explicit
arguments (or drawn from explicit keys), never a global RNG.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xdyna_jax.schedulers import DDIMScheduler


def gaussian_kernel(size: int = 9, sigma: float = 18.0) -> np.ndarray:
    """The normalised 1-D Gaussian taps of a size x size blur (the 2-D kernel is their outer product)."""
    x = np.linspace(-(size - 1) / 2, (size - 1) / 2, size)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def gaussian_blur(x: jax.Array, size: int = 9, sigma: float = 18.0) -> jax.Array:
    """Blur each frame and channel of (F, h, w, C) separably, with reflect padding (no edge repeated)."""
    if x.shape[1] <= size // 2 or x.shape[2] <= size // 2:
        raise ValueError(
            f"a {size}x{size} reflect-padded blur needs frames larger than {size // 2}, got {x.shape}"
        )
    taps, r = jnp.asarray(gaussian_kernel(size, sigma)), size // 2
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    h, w = x.shape[1] - 2 * r, x.shape[2] - 2 * r
    x = sum(taps[i] * x[:, i : i + h] for i in range(size))
    return sum(taps[i] * x[:, :, i : i + w] for i in range(size))


def initial_latents(
    reference: jax.Array,
    num_frames: int,
    scheduler: DDIMScheduler,
    timestep: int,
    *,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> jax.Array:
    """reference (h, w, C) -> (1 + num_frames, h, w, C): frame 0 clean, the rest blurred-mixed and noised.

    mask (num_frames, h, w, C) bool (True keeps the reference) and noise (num_frames, h, w, C) may be given;
    whichever is not is drawn from `key`.
    """
    if reference.ndim != 3:
        raise ValueError(f"reference latent must be (h, w, C), got {reference.shape}")
    if num_frames < 1:
        raise ValueError(f"need at least 1 driven frame, got {num_frames}")
    shape = (num_frames, *reference.shape)
    if (mask is None or noise is None) and key is None:
        raise ValueError("pass `key` to draw the blur mask and the initial noise, or pass both explicitly")
    mask_key, noise_key = jax.random.split(key) if key is not None else (None, None)
    mask = jax.random.bernoulli(mask_key, 0.5, shape) if mask is None else mask
    noise = jax.random.normal(noise_key, shape, jnp.float32) if noise is None else noise
    for name, value in (("mask", mask), ("noise", noise)):
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    repeated = jnp.broadcast_to(reference.astype(jnp.float32), shape)
    mixed = jnp.where(mask, repeated, gaussian_blur(repeated))
    driven = scheduler.add_noise(mixed, noise, timestep)
    return jnp.concatenate([reference[None].astype(driven.dtype), driven])
