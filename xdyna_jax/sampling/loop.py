"""The denoising loop of a long video: DDIM over context windows with classifier-free guidance.

A pure function of (window function, latents, scheduler, timesteps, guidance, the per-step window offsets,
the DDIM noise keys): every random draw is an argument, so a run is reproducible and can be compared step
by step with another implementation driven by the same stand-in network.

Per step, as X-Dyna's release does it: the driven frames are cut into context windows (`windows.py`), each
window is denoised together with the clean reference frame in front of it, the two CFG halves' predictions
are averaged per frame over the windows that contain it, guidance `u + s (c - u)` is applied to the
averages, and one DDIM step moves every driven frame (the reference is never stepped).

One compiled window step serves every window batch of every step: window indices are data, not shapes, and
a last, partial batch of windows is padded with copies whose predictions are masked out.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xdyna_jax.sampling.windows import context_windows, frame_counts
from xdyna_jax.schedulers import DDIMScheduler
from xdyna_jax.sharding import activate, along, replicated

# Logical axis rules of a window step on a mesh: the networks' batch (windows x CFG halves x frames) over
# `data`, attention heads whole. Tracing under them makes the chunked attention run per device on its own
# windows (shard_map) instead of every device looping over all of them.
WINDOW_RULES = (("batch", "data"), ("heads", None))

# window_fn(params, windows (W, 1 + L, h, w, C), timestep () int32, frames (W, L) int32)
#   -> (2, W, 1 + L, h, w, C): the unconditional and conditional noise predictions. `params` is any pytree
# (weights, conditions) passed to every call as an argument, so it is never baked into the compiled program;
# `frames` says which driven frames each window holds (to pick their conditions); position 0 is the reference.
WindowFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def window_batches(windows: np.ndarray, window_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(batches, window_batch, L) indices and (batches, window_batch) validity; padding repeats the last window."""
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    n = len(windows)
    total = -(-n // window_batch) * window_batch
    padded = np.concatenate([windows, np.repeat(windows[-1:], total - n, axis=0)])
    valid = np.arange(total) < n
    return padded.reshape(-1, window_batch, windows.shape[1]), valid.reshape(-1, window_batch)


def compiled_window_step(window_fn: WindowFn, compiler_options: dict | None = None):
    """The compiled window step: gather the windows, predict, add the valid predictions per frame.

    Build it once and pass it to every `denoise` call (`compiled_step=`) so later videos of the same shapes
    reuse it; the caller owns it (a global cache would keep the caller's weights alive).
    compiler_options: XLA options of its compile (`nn.bf16_weights.compiler_options_for(weights)`).
    """

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def step(params, latents, timestep, frames, valid, total):
        reference = jnp.broadcast_to(latents[:1], (frames.shape[0], 1, *latents.shape[1:]))
        windows = jnp.concatenate([reference, latents[1:][frames]], axis=1)
        eps = window_fn(params, windows, timestep, frames)[
            :, :, 1:
        ]  # the reference's prediction is discarded
        eps = eps * valid[None, :, None, None, None, None].astype(eps.dtype)
        flat = eps.reshape(2, -1, *eps.shape[3:]).astype(total.dtype)
        return total.at[:, frames.reshape(-1)].add(flat)

    return step


def draw_window_offsets(key: jax.Array, steps: int, window: int = 16) -> np.ndarray:
    """The per-step window shift in [0, window), one per step (the release draws it unseeded)."""
    return np.asarray(jax.random.randint(key, (steps,), 0, window), np.int32)


def denoise(
    window_fn: WindowFn,
    params: Any,
    latents: jax.Array,
    scheduler: DDIMScheduler,
    timesteps: Sequence[int],
    *,
    guidance: float,
    offsets: Sequence[int],
    window: int = 16,
    overlap: int = 4,
    window_batch: int = 1,
    eta: float = 0.0,
    noise_keys: jax.Array | None = None,
    progress: Callable[[int], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    compiled_step: Callable | None = None,
) -> jax.Array:
    """latents (1 + N, h, w, C) with frame 0 the clean reference -> the denoised latents, same shape.

    offsets: one window shift per step (`draw_window_offsets`); noise_keys: (steps,) keys when eta > 0.
    progress: called with the number of window batches done after each batch (e.g. a tqdm update).
    mesh: the windows of a batch are split over its `data` axis (window_batch must be a multiple of its
    size); weights, conditions and latents are replicated. The windows are independent, so the video is
    the same on any number of devices.
    compiled_step: `compiled_window_step(window_fn)` made once by the caller, reused across calls.
    """
    timesteps = [int(t) for t in timesteps]
    if latents.ndim != 4 or latents.shape[0] < 2:
        raise ValueError(f"latents must be (1 + N, h, w, C) with N >= 1 driven frames, got {latents.shape}")
    if len(offsets) != len(timesteps):
        raise ValueError(
            f"need one window offset per step: {len(offsets)} offsets for {len(timesteps)} steps"
        )
    if eta > 0 and (noise_keys is None or len(noise_keys) != len(timesteps)):
        raise ValueError("eta > 0 needs one noise key per step (noise_keys)")
    num_frames = latents.shape[0] - 1
    step_fn = compiled_step or compiled_window_step(window_fn)
    place_windows = place = lambda x: x
    if mesh is not None:
        devices = mesh.shape["data"]
        if window_batch % devices:
            raise ValueError(
                f"window_batch {window_batch} must be a multiple of the mesh's data axis ({devices})"
            )
        place = lambda x: jax.device_put(x, replicated(mesh))
        place_windows = lambda x: jax.device_put(x, along(mesh, "data"))
        params, latents = place(params), place(latents)
    for i, t in enumerate(timesteps):
        windows = context_windows(
            num_frames, window=window, overlap=overlap, offset=int(offsets[i]) if num_frames > window else 0
        )
        counts = jnp.asarray(frame_counts(windows, num_frames), jnp.float32)
        total = place(jnp.zeros((2, num_frames, *latents.shape[1:]), jnp.float32))
        for frames, valid in zip(*window_batches(windows, window_batch), strict=True):
            frames, valid = place_windows(jnp.asarray(frames)), place_windows(jnp.asarray(valid))
            with activate(mesh, WINDOW_RULES) if mesh is not None else contextlib.nullcontext():
                total = step_fn(params, latents, jnp.int32(t), frames, valid, total)
            if progress is not None:
                progress(1)
        uncond, cond = total / counts[None, :, None, None, None]
        eps = uncond + guidance * (cond - uncond)
        key = None if noise_keys is None else noise_keys[i]
        driven, _ = scheduler.step(eps, t, latents[1:], len(timesteps), eta=eta, key=key)
        latents = jnp.concatenate([latents[:1], driven.astype(latents.dtype)])
    return latents
