"""DynamiCtrl's denoising loop: CogVideoX DPM steps with classifier-free guidance on the text only.

A pure function of (denoiser, its params, latents, conditions, scheduler, timesteps, noises): every random
draw is an argument, so a run is reproducible and can be compared step by step with another implementation
driven by the same stand-in network. Per step, as the release (after diffusers' CogVideoX image-to-video
pipeline) does it:

    model input = [x_t ; image latents] on channels, twice (the unconditional and the conditional half)
    control     = the pose latents, twice      (pose and image condition both halves: CFG is on text only)
    text        = [negative prompt ; prompt] embeddings
    v           = denoiser(...) in float32;  v = v_u + s (v_c - v_u)
    x_t, x0     = DPM step(v, t, x_t, noise_t, x0 of the previous step, the previous timestep)

and the latents are cast back to their dtype after each step (the release keeps them in its pipeline dtype).
With a single text embedding (guidance off) the halves are not doubled and v is used as it is.

One compiled step serves every step of a run (timesteps, guidance and noise are traced arguments, not
constants), and every later run of the same shapes when the caller keeps it (`compiled_dpm_step`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xdyna_jax.schedulers.cogvideox import CogVideoXDPMScheduler

# denoiser(params, hidden_states (B, F', h, w, 2C), text (B, L, D), timestep (B,) int32,
#          control (B, F', h, w, C), rope (cos, sin) or None) -> v (B, F', h, w, C)
# `params` is any pytree (the weights) passed to every call as an argument, so it is never baked into the
# compiled program.
DenoiserFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array, Any], jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DynamiCtrlConditions:
    """What conditions every step, batch 1 (the loop doubles image and pose latents for the CFG halves)."""

    image_latents: jax.Array  # (1, F', h, w, C): the reference's latent in frame 0, zeros after it
    pose_latents: jax.Array  # (1, F', h, w, C)
    text: jax.Array  # (2, L, D) [negative ; prompt] embeddings, or (1, L, D) without guidance
    rope: tuple[jax.Array, jax.Array] | None = None  # (cos, sin) tables of the token grid, or None


def _is_key_array(x) -> bool:
    return jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def compiled_dpm_step(
    denoiser: DenoiserFn,
    scheduler: CogVideoXDPMScheduler,
    num_inference_steps: int,
    *,
    sequential_cfg: bool = False,
    compiler_options: dict | None = None,
):
    """The jitted step `(params, x, x0_back, t_back, t, noise, conditions, guidance) -> (x, x0)`.

    noise: the step's standard-normal draw, shaped like x (float32).
    sequential_cfg: run the two CFG halves one after the other (`lax.map`, half the activations) instead of
    as one batch of 2 (the release). Build the step once and pass it to every `denoise` call of the same
    step count (`compiled_step=`) so later videos reuse its compile; the caller owns it.
    """

    def predict(params, x, t, conditions: DynamiCtrlConditions):
        hidden = jnp.concatenate([x, conditions.image_latents.astype(x.dtype)], axis=-1)
        control = conditions.pose_latents.astype(x.dtype)
        text, halves = conditions.text, conditions.text.shape[0]
        timestep = jnp.full((1,), t, jnp.int32)
        if halves == 1:
            return denoiser(params, hidden, text, timestep, control, conditions.rope).astype(jnp.float32)
        if sequential_cfg:
            one = lambda e: denoiser(params, hidden, e[None], timestep, control, conditions.rope)[0]
            return jax.lax.map(one, text).astype(jnp.float32)
        both = lambda a: jnp.concatenate([a] * halves)
        v = denoiser(
            params, both(hidden), text, jnp.full((halves,), t, jnp.int32), both(control), conditions.rope
        )
        return v.astype(jnp.float32)

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def step(params, x, x0_back, t_back, t, noise, conditions, guidance):
        v = predict(params, x, t, conditions)
        if v.shape[0] == 2:
            v_uncond, v_cond = v[:1], v[1:]
            v = v_uncond + guidance * (v_cond - v_uncond)
        prev, x0 = scheduler.step(v, t, x, num_inference_steps, noise, x0_back, t_back)
        return prev.astype(x.dtype), x0

    return step


def denoise(
    denoiser: DenoiserFn,
    params: Any,
    latents: jax.Array,
    conditions: DynamiCtrlConditions,
    scheduler: CogVideoXDPMScheduler,
    timesteps: Sequence[int],
    noises: jax.Array,
    *,
    guidance: float,
    sequential_cfg: bool = False,
    progress: Callable[[int], None] | None = None,
    on_step: Callable[[int, jax.Array], None] | None = None,
    compiled_step: Callable | None = None,
) -> jax.Array:
    """latents (1, F', h, w, C) at the first timestep (pure noise) -> the denoised latents, same shape/dtype.

    timesteps: the scheduler's `timesteps(n)`; noises: one draw per step, (n, 1, F', h, w, C) standard
    normals, or (n,) PRNG keys each step draws its noise from. guidance s is used when conditions.text
    holds two embeddings. progress is called with 1 after each step (e.g. a tqdm update); on_step with
    (step index, latents after it). compiled_step: `compiled_dpm_step(...)` made once for these steps.
    """
    timesteps = [int(t) for t in timesteps]
    n = len(timesteps)
    latents = jnp.asarray(latents)
    if latents.ndim != 5 or latents.shape[0] != 1:
        raise ValueError(f"latents must be (1, F', h, w, C), got {tuple(latents.shape)}")
    for name in ("image_latents", "pose_latents"):
        got = tuple(getattr(conditions, name).shape)
        if got != tuple(latents.shape):
            raise ValueError(
                f"conditions.{name} must have the latents' shape {tuple(latents.shape)}, got {got}"
            )
    if conditions.text.ndim != 3 or conditions.text.shape[0] not in (1, 2):
        raise ValueError(
            f"conditions.text must be (2, L, D) [negative ; prompt] or (1, L, D), got {conditions.text.shape}"
        )
    if _is_key_array(noises):
        if tuple(noises.shape) != (n,):
            raise ValueError(f"need one noise key per step: keys of shape {noises.shape} for {n} steps")
    elif tuple(noises.shape) != (n, *latents.shape):
        raise ValueError(
            f"noises must be (steps, *latents.shape) = {(n, *latents.shape)} or ({n},) keys, got {noises.shape}"
        )
    step = compiled_step or compiled_dpm_step(denoiser, scheduler, n, sequential_cfg=sequential_cfg)
    guidance = jnp.float32(guidance)
    # committed to the latents' placement, as every step's outputs are: an uncommitted first input would
    # compile the step a second time for the later steps
    x = jax.device_put(latents, latents.sharding)
    x0_back, t_back = jax.device_put(jnp.zeros(latents.shape, jnp.float32), latents.sharding), -1
    draw_keys = _is_key_array(noises)
    for i, t in enumerate(timesteps):
        # keys are drawn outside the step, so keys and values share its one compile
        noise = jax.random.normal(noises[i], latents.shape, jnp.float32) if draw_keys else noises[i]
        x, x0_back = step(params, x, x0_back, jnp.int32(t_back), jnp.int32(t), noise, conditions, guidance)
        t_back = t
        if progress is not None:
            progress(1)
        if on_step is not None:
            on_step(i, x)
    return x
