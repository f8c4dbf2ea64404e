"""The windowed CFG + DDIM loop, driven by a stand-in network, against the release's loop written here with
diffusers' DDIMScheduler doing the steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as TorchDDIM
from oracle import rel_err, release_context_windows

from xdyna_jax.sampling.bundles import XDYNA_SCHEDULER
from xdyna_jax.sampling.loop import denoise, draw_window_offsets, window_batches
from xdyna_jax.schedulers import DDIMScheduler
from xdyna_jax.sharding import make_mesh

N, H, W, C = 40, 2, 3, 4
STEPS, GUIDANCE = 3, 7.5
PARAMS = {"a": np.float32(0.3)}  # a stand-in weight, passed as an argument


def stand_in(params, windows, t, frames, xp=jnp):
    """Depends on the whole window (like the motion modules), the timestep and which frames it holds (like the
    pose conditions), and differs between the CFG halves."""
    cond = xp.cos(frames.astype(xp.float32) * 0.7)[:, :, None, None, None]
    cond = xp.concatenate([xp.zeros_like(cond[:, :1]), cond], axis=1)  # position 0: the reference
    uncond = params["a"] * windows + 0.1 * windows.mean(axis=1, keepdims=True) + 0.01 * (t / 1000.0)
    return xp.stack([uncond, uncond + 0.2 * cond])


def release_loop(latents, offsets):
    """The release's per-step order: windows, per-frame mean of the predictions, CFG, one DDIM step."""
    torch_ddim = TorchDDIM(**XDYNA_SCHEDULER.to_diffusers())
    torch_ddim.set_timesteps(STEPS)
    x = latents.copy()
    for step, t in enumerate(torch_ddim.timesteps.numpy()):
        total, counts = np.zeros((2, N, H, W, C), np.float32), np.zeros(N, np.float32)
        for frames in release_context_windows(0, N, offset=int(offsets[step])):
            frames = np.array(frames)
            window = np.concatenate([x[:1], x[1:][frames]])[None]
            eps = stand_in(PARAMS, window, np.float32(t), frames[None], xp=np).astype(np.float32)
            np.add.at(total, (slice(None), frames), eps[:, 0, 1:])
            np.add.at(counts, frames, 1)
        uncond, cond = total / counts[None, :, None, None, None]
        eps = uncond + GUIDANCE * (cond - uncond)
        out = torch_ddim.step(torch.from_numpy(eps), int(t), torch.from_numpy(x[1:])).prev_sample
        x[1:] = out.numpy()
    return x


def test_loop_equals_the_release_loop_with_diffusers_ddim_in_one_compile():
    latents = np.random.default_rng(0).standard_normal((1 + N, H, W, C)).astype(np.float32)
    offsets = draw_window_offsets(jax.random.key(3), STEPS)
    traces = []

    def window_fn(params, windows, t, frames):
        traces.append(windows.shape)  # runs once per trace
        return stand_in(params, windows, t, frames)

    scheduler = DDIMScheduler(XDYNA_SCHEDULER)
    timesteps = scheduler.timesteps(STEPS)
    got = denoise(
        window_fn,
        PARAMS,
        jnp.asarray(latents),
        scheduler,
        timesteps,
        guidance=GUIDANCE,
        offsets=offsets,
        window_batch=3,
    )
    assert len(traces) == 1  # 4 windows -> 2 batches of 3 (one padded), 3 steps: one compiled window step
    want = release_loop(latents, offsets)
    np.testing.assert_array_equal(np.asarray(got[0]), latents[0])  # the reference is never stepped
    assert rel_err(np.asarray(got), want) < 1e-5
    # the padding windows add nothing: one window per call gives the same video
    one = denoise(
        stand_in, PARAMS, jnp.asarray(latents), scheduler, timesteps, guidance=GUIDANCE, offsets=offsets
    )
    assert float(jnp.abs(one - got).max()) <= 1e-6
    # and the offsets matter: another shift gives another result
    other = denoise(
        stand_in, PARAMS, jnp.asarray(latents), scheduler, timesteps, guidance=GUIDANCE, offsets=offsets + 1
    )
    assert float(jnp.abs(other - got).max()) > 1e-3


def test_window_batches_pad_with_masked_copies():
    windows = np.arange(12).reshape(4, 3)
    frames, valid = window_batches(windows, 3)
    assert frames.shape == (2, 3, 3) and valid.tolist() == [[True] * 3, [True, False, False]]
    np.testing.assert_array_equal(frames[1, 1], windows[-1])
    with pytest.raises(ValueError, match="window_batch must be >= 1"):
        window_batches(windows, 0)


def test_bad_loop_arguments_are_refused():
    scheduler = DDIMScheduler(XDYNA_SCHEDULER)
    x = jnp.zeros((5, H, W, C))
    with pytest.raises(ValueError, match="one window offset per step"):
        denoise(stand_in, PARAMS, x, scheduler, [961, 921], guidance=1.0, offsets=[0])
    with pytest.raises(ValueError, match="N >= 1 driven frames"):
        denoise(stand_in, PARAMS, x[:1], scheduler, [961], guidance=1.0, offsets=[0])


def test_windows_split_over_eight_devices_give_the_same_video():
    assert jax.device_count() == 8  # tests/conftest.py simulates 8 CPU devices
    latents = jnp.asarray(np.random.default_rng(4).standard_normal((1 + N, H, W, C)), jnp.float32)
    scheduler = DDIMScheduler(XDYNA_SCHEDULER)
    run = dict(guidance=GUIDANCE, offsets=draw_window_offsets(jax.random.key(5), STEPS))
    one = denoise(stand_in, PARAMS, latents, scheduler, scheduler.timesteps(STEPS), **run)
    mesh = make_mesh(data=8)
    eight = denoise(
        stand_in, PARAMS, latents, scheduler, scheduler.timesteps(STEPS), window_batch=8, mesh=mesh, **run
    )
    assert float(jnp.abs(eight - one).max()) <= 1e-6
    with pytest.raises(ValueError, match="multiple of the mesh's data axis"):
        denoise(
            stand_in, PARAMS, latents, scheduler, [961], guidance=1.0, offsets=[0], window_batch=3, mesh=mesh
        )
