"""DynamiCtrlPipeline: its loop against a diffusers CogVideoX image-to-video stepping written here (torch DPM
scheduler, same stand-in network, same injected noise), then the whole pipeline on a tiny bundle of random
modules: every frame count (padding and trimming), reproducible by seed, one compile of the step, T5 never
beside the transformer, the Mask variants' input and the latent scaling rule, and the input errors."""

import contextlib
import dataclasses
import types

import diffusers.schedulers.scheduling_dpm_cogvideox as torch_dpm_module
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDPMScheduler as TorchDPM
from flax import nnx
from oracle import rel_err
from oracle_dynamictrl import dancing_inputs, tiny_dynamictrl_bundle
from oracle_dynamictrl_release import SCHEDULER

import xdyna_jax.sampling.dynamictrl as pipeline_module
from xdyna_jax.models.dynamictrl import DynamiCtrlTransformerModel
from xdyna_jax.models.vae_cogvideox import CogVideoXTiling
from xdyna_jax.nn.compute import Compute
from xdyna_jax.sampling.dynamictrl import Draws, DynamiCtrlPipeline
from xdyna_jax.sampling.dynamictrl_frames import (
    FramePlan,
    masked_reference,
    pad_frames,
    resize_reference,
    signed_pixels,
)
from xdyna_jax.sampling.dynamictrl_loop import DynamiCtrlConditions, compiled_dpm_step, denoise
from xdyna_jax.schedulers.cogvideox import CogVideoXDPMScheduler, CogVideoXSchedulerConfig


@contextlib.contextmanager
def step_compiles():
    """Collects one entry per XLA compile of a loop step (`compiled_dpm_step`'s `step`)."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and kwargs.get("fun_name") == "jit(step)":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture
def compiles():
    with step_compiles() as log:
        yield log


# -- the loop ------------------------------------------------------------------------------------------

F, h, w, C, L, D = 4, 2, 3, 4, 5, 6
STEPS, GUIDANCE = 6, 3.0
RNG = np.random.default_rng(0)
PARAMS = {"mix": RNG.standard_normal((2 * C, C)).astype(np.float32) * 0.5,
          "text": RNG.standard_normal((D, C)).astype(np.float32) * 0.5}  # fmt: skip


def stand_in(params, hidden, text, t, control, rope, xp=jnp):
    """A fixed function of every input, channels last: the noisy and image channels mixed differently, the
    text (which differs between the CFG halves), the timestep and the pose latents."""
    mixed = xp.tanh(hidden @ params["mix"]) * (t.astype(xp.float32) / 1000.0)[:, None, None, None, None]
    text_term = (text.mean(axis=1) @ params["text"])[:, None, None, None, :]
    return mixed + 0.3 * hidden[..., :C] - 0.2 * control + text_term


def torch_stand_in(hidden, text, t, control):
    """The stand-in on the torch pipeline's (B, F, C, h, w) tensors."""
    last = lambda x: x.permute(0, 1, 3, 4, 2).numpy()
    v = stand_in(PARAMS, last(hidden), text.numpy(), t.numpy(), last(control), None, xp=np)
    return torch.from_numpy(np.ascontiguousarray(v.transpose(0, 1, 4, 2, 3)))


def diffusers_style_loop(monkeypatch, latents, image, pose, text, step_noises, guidance):
    """CogVideoXImageToVideoPipeline's loop (DynamiCtrl's: pose latents as control in both CFG halves) with
    diffusers' DPM scheduler; its generator replaced by draws handed out in order, the last of each step's
    draws being the noise our loop gets (the others are discarded by diffusers' second-order step)."""
    scheduler = TorchDPM(**SCHEDULER)
    scheduler.set_timesteps(STEPS)
    per_step = CogVideoXDPMScheduler(CogVideoXSchedulerConfig(**SCHEDULER)).noise_draws_per_step(STEPS)
    junk = np.random.default_rng(9)
    queue = []
    for count, noise in zip(per_step, step_noises, strict=True):
        queue += [junk.standard_normal(noise.shape).astype(np.float32) for _ in range(count - 1)] + [noise]
    queue = iter([torch.from_numpy(np.ascontiguousarray(q[0].transpose(0, 3, 1, 2)))[None] for q in queue])
    monkeypatch.setattr(torch_dpm_module, "randn_tensor", lambda *a, **k: next(queue))
    first = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 1, 4, 2, 3)))
    x, image, pose, text = first(latents), first(image), first(pose), torch.from_numpy(np.asarray(text))
    cfg = text.shape[0] == 2
    old, out = None, []
    for i, t in enumerate(scheduler.timesteps):
        model_input = torch.cat([x] * 2) if cfg else x
        model_input = scheduler.scale_model_input(model_input, t)
        model_input = torch.cat([model_input, torch.cat([image] * 2) if cfg else image], dim=2)
        control = torch.cat([pose] * 2) if cfg else pose
        v = torch_stand_in(model_input, text, t.expand(model_input.shape[0]), control).float()
        if cfg:
            v_uncond, v_text = v.chunk(2)
            v = v_uncond + guidance * (v_text - v_uncond)
        x, old = scheduler.step(
            v, old, t, scheduler.timesteps[i - 1] if i > 0 else None, x, return_dict=False
        )
        out.append(x.permute(0, 1, 3, 4, 2).numpy())
    assert next(queue, None) is None  # every draw consumed: the per-step counts match diffusers'
    return out


def loop_inputs(halves=2):
    rng = np.random.default_rng(1)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)
    image = np.concatenate([n(1, 1, h, w, C), np.zeros((1, F - 1, h, w, C), np.float32)], axis=1)
    return n(1, F, h, w, C), image, n(1, F, h, w, C), n(halves, L, D), n(STEPS, 1, F, h, w, C)


@pytest.mark.parametrize("halves", [2, 1], ids=["cfg", "no-cfg"])
def test_loop_equals_a_diffusers_image_to_video_stepping_in_one_compile(monkeypatch, halves):
    latents, image, pose, text, noises = loop_inputs(halves)
    traces = []

    def denoiser(params, hidden, text, t, control, rope):
        traces.append(hidden.shape)  # runs once per trace
        return stand_in(params, hidden, text, t, control, rope)

    scheduler = CogVideoXDPMScheduler(CogVideoXSchedulerConfig(**SCHEDULER))
    conditions = DynamiCtrlConditions(jnp.asarray(image), jnp.asarray(pose), jnp.asarray(text))
    timesteps = scheduler.timesteps(STEPS)
    step = compiled_dpm_step(denoiser, scheduler, STEPS)
    ours, calls = [], []

    def run(noises, conditions=conditions, **kwargs):
        ours.clear()
        return denoise(
            None, PARAMS, jnp.asarray(latents), conditions, scheduler, timesteps, noises, guidance=GUIDANCE,
            on_step=lambda i, x: ours.append(np.asarray(x)), compiled_step=step, **kwargs,
        )  # fmt: skip

    with step_compiles() as compiles:
        final = run(jnp.asarray(noises), progress=calls.append)
    assert len(compiles) == 1 and calls == [1] * STEPS  # one compile for every step
    assert traces == [(halves, F, h, w, 2 * C)]
    want = diffusers_style_loop(monkeypatch, latents, image, pose, text, noises, GUIDANCE)
    for i, (got, expected) in enumerate(zip(ours, want, strict=True)):
        assert rel_err(got, expected) < 1e-5, f"step {i}"
    np.testing.assert_array_equal(np.asarray(final), ours[-1])
    if halves == 1:
        return
    # keys instead of values: each step draws its noise from its key, in the same compiled step
    keys = jax.random.split(jax.random.key(3), STEPS)
    drawn = jnp.stack([jax.random.normal(k, latents.shape, jnp.float32) for k in keys])
    with step_compiles() as compiles:
        np.testing.assert_array_equal(run(keys), run(drawn))
    assert not compiles
    # the halves one after the other give the same latents
    sequential = denoise(
        denoiser, PARAMS, jnp.asarray(latents), conditions, scheduler, timesteps, drawn, guidance=GUIDANCE,
        sequential_cfg=True,
    )  # fmt: skip
    assert rel_err(sequential, np.asarray(run(drawn))) < 1e-6
    with pytest.raises(ValueError, match="one noise key per step"):
        run(keys[:2])
    with pytest.raises(ValueError, match="noises must be"):
        run(drawn[:, 0])
    with pytest.raises(ValueError, match="pose_latents must have the latents' shape"):
        run(keys, dataclasses.replace(conditions, pose_latents=conditions.pose_latents[:, :2]))
    with pytest.raises(ValueError, match="conditions.text must be"):
        run(keys, dataclasses.replace(conditions, text=conditions.text[None]))


# -- the pipeline on a tiny bundle ---------------------------------------------------------------------

H, W = 16, 24  # latents 4 x 6 (the tiny VAE downsamples by 4): a 2 x 3 token grid
RUN = dict(steps=2, height=H, width=W, dtype="float32", progress=False)
PROMPT = "a woman in a red dress dances"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dynamictrl") / "bundle"
    return tiny_dynamictrl_bundle(folder, transformer=dict(num_layers=1))


@pytest.fixture(scope="module")
def pipe(bundle):
    return DynamiCtrlPipeline.load(bundle, compute=Compute(precision="highest"))


@pytest.mark.slow  # CI time (the suite is near 20 min): make test-slow
def test_frame_counts_padding_trimming_seeds_and_one_compile(pipe, monkeypatch, compiles):
    traces, encoded, prepared, decoded = [], [], [], []
    original_call = DynamiCtrlTransformerModel.__call__

    def counted(self, hidden_states, *args, **kwargs):
        traces.append(hidden_states.shape)  # runs when the step is traced
        return original_call(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(DynamiCtrlTransformerModel, "__call__", counted)
    for name, log in (("_posterior_sample", encoded), ("prepare", prepared)):
        method = getattr(pipe, name)
        monkeypatch.setattr(
            pipe, name, lambda *a, _m=method, _log=log, **k: _log.append((a, _m(*a, **k))) or _log[-1][1]
        )
    vae_decode = pipe.vae.decode
    monkeypatch.setattr(
        type(pipe.vae),
        "decode",
        lambda self, z, **k: decoded.append((z.shape, k, vae_decode(z, **k))) or decoded[-1][2],
    )

    ref, poses = dancing_inputs(21, H, W)
    results = {}
    pipeline_module._transformer_step.cache_clear()  # a fresh step, whatever ran before
    compiles.clear()
    # 13 -> 4 latent frames; 17 -> 5, padded to 6; 21 -> 6; 9 -> 3, padded to 4
    expected = {13: (13, 4, 4, 16), 17: (17, 5, 6, 17), 21: (21, 6, 6, 24), 9: (9, 3, 4, 9)}
    for n, (pixels, latent, padded, decoded_frames) in expected.items():
        encoded.clear(), prepared.clear(), decoded.clear()
        out = pipe(ref, poses, PROMPT, num_frames=n, **RUN)
        assert out.shape == (n, H, W, 3) and out.dtype == np.uint8
        results[n] = out
        plan = FramePlan.for_count(n, pipe.vae.config, 2)
        assert (plan.pixel_frames, plan.latent_frames, plan.padded_latent_frames) == (pixels, latent, padded)
        assert plan.decoded_frames == decoded_frames
        # the pose video sent to the VAE: the first n pose frames, the last one repeated up to 1 + 4k
        video = encoded[1][0][0][0]
        assert video.shape == (pixels, H, W, 3)
        np.testing.assert_array_equal(video, (pad_frames(poses[:n], pixels) / np.float32(255) - 0.5) / 0.5)
        image, pose, initial = map(np.asarray, prepared[0][1])
        assert image.shape == pose.shape == initial.shape == (1, padded, H // 4, W // 4, 4)
        assert np.abs(image[:, 0]).max() > 0 and not image[:, 1:].any()  # reference latent, then zeros
        if padded > latent:  # the pose latents' last frame repeated
            np.testing.assert_array_equal(
                pose[:, latent:], np.repeat(pose[:, latent - 1 : latent], padded - latent, 1)
            )
        # the padded latent frame dropped before decoding, tiles asked for as the release decodes
        [(shape, kwargs, video)] = decoded
        assert shape == (1, latent, H // 4, W // 4, 4) and kwargs == dict(use_tiling=True, tiling=None)
        # the first n decoded frames are returned
        assert video.shape[1] == decoded_frames
        np.testing.assert_array_equal(out, np.round(np.clip(np.asarray(video[0, :n]) / 2 + 0.5, 0, 1) * 255))
    # one compiled step per latent shape: 4 latent frames (13 and 9) and 6 (17 and 21), 2 steps each
    assert len(compiles) == 2 and traces == [(2, 4, 4, 6, 8), (2, 6, 4, 6, 8)]
    np.testing.assert_array_equal(pipe(ref, poses, PROMPT, num_frames=13, **RUN), results[13])
    other = pipe(ref, poses, PROMPT, num_frames=13, seed=1, **RUN)
    assert np.abs(other.astype(int) - results[13]).max() > 0
    assert len(compiles) == 2  # the reruns reused the compiled step

    # explicit draws: those of the seed give the same video; one other draw changes it
    draws = Draws.from_seed(0, 2)
    np.testing.assert_array_equal(pipe(ref, poses, PROMPT, num_frames=13, draws=draws, **RUN), results[13])
    values = dataclasses.replace(draws, initial=jax.random.normal(draws.initial, (1, 4, H // 4, W // 4, 4)))
    np.testing.assert_array_equal(pipe(ref, poses, PROMPT, num_frames=13, draws=values, **RUN), results[13])
    moved = dataclasses.replace(draws, steps=jax.random.split(jax.random.key(5), 2))
    assert (
        np.abs(pipe(ref, poses, PROMPT, num_frames=13, draws=moved, **RUN).astype(int) - results[13]).max()
        > 0
    )
    assert len(compiles) == 2


def test_text_encoder_never_beside_the_transformer(bundle, monkeypatch):
    pipe = DynamiCtrlPipeline.load(bundle, compute=Compute(precision="highest"))
    assert pipe.resident_parts() == {"vae"}  # neither T5 nor the transformer read yet
    at_encoding, encoders = [], []
    encode = pipeline_module._encode_text

    def watched(encoder, ids):
        at_encoding.append(pipe.resident_parts())
        encoders.append(encoder)
        return encode(encoder, ids)

    monkeypatch.setattr(pipeline_module, "_encode_text", watched)
    ref, poses = dancing_inputs(13, H, W)
    steps = []
    first = pipe(ref, poses, PROMPT, **{**RUN, "progress": steps.append})
    assert steps == [1, 1]
    assert pipe.resident_parts() == {"vae", "transformer"}
    assert all(a.is_deleted() for a in jax.tree_util.tree_leaves(nnx.state(encoders[0])))  # T5 freed
    pipe(ref, poses, PROMPT, **RUN)  # same prompts: no T5 at all
    assert len(at_encoding) == 1
    # other prompts: the transformer goes to host memory while T5 is read and used, then comes back intact
    pipe(ref, poses, "a man walks on a beach", **RUN)
    again = pipe(ref, poses, PROMPT, **RUN)
    assert at_encoding == [{"vae", "text_encoder"}] * 3
    np.testing.assert_array_equal(again, first)


def test_mask_variant_input_and_latent_scaling(pipe, monkeypatch):
    ref, poses = dancing_inputs(13, H, W)
    mask = np.zeros(ref.shape[:2], np.uint8)
    mask[5:30, 4:20] = 255  # keep the person's box
    masked = pipe(ref, poses, PROMPT, reference_mask=mask, **RUN)
    blacked = np.where(mask[..., None] > 0, ref, 0).astype(np.uint8)
    np.testing.assert_array_equal(pipe(ref, poses, PROMPT, reference_mask=mask > 0, **RUN), masked)
    np.testing.assert_array_equal(pipe(blacked, poses, PROMPT, **RUN), masked)
    assert np.abs(pipe(ref, poses, PROMPT, **RUN).astype(int) - masked).max() > 0

    # image latents x scaling_factor only when invert_scale_latents is false; pose latents always
    sample = lambda video, draw, dtype: jnp.ones((1, video.shape[1] if video.shape[1] == 1 else 4, 4, 6, 4))
    monkeypatch.setattr(pipe, "_posterior_sample", sample)
    plan = FramePlan.for_count(13, pipe.vae.config, 2)
    sf = pipe.vae.config.scaling_factor
    for invert, image_scale in ((True, 1.0), (False, sf)):
        config = dataclasses.replace(pipe.vae.config, invert_scale_latents=invert)
        monkeypatch.setattr(pipe, "vae", types.SimpleNamespace(config=config))
        image, pose, _ = pipe.prepare(
            np.zeros((H, W, 3), np.uint8), poses, plan, Draws.from_seed(0, 2), "float32"
        )
        np.testing.assert_allclose(np.asarray(image[:, 0]), image_scale)
        np.testing.assert_allclose(np.asarray(pose), sf)


def test_errors_before_anything_compiles(bundle, monkeypatch):
    pipe = DynamiCtrlPipeline.load(bundle)
    ref, poses = dancing_inputs(9, H, W)
    tall = dancing_inputs(9, 48, W)[1]
    call = lambda **k: pipe(k.pop("ref", ref), k.pop("poses", poses), k.pop("prompt", PROMPT), **{**RUN, **k})
    cases = [
        (dict(poses=poses[:, :8]), ValueError, r"pose_frames must be uint8 \(F, 16, 24, 3\)"),
        (dict(poses=poses.astype(np.float32)), ValueError, "pose_frames must be uint8"),
        (dict(num_frames=10), ValueError, r"num_frames must be in \[1, 9\]"),
        (dict(num_frames=0), ValueError, "num_frames must be in"),
        (dict(prompt=["a", "b"]), TypeError, "prompt must be a string"),
        (dict(negative_prompt=None), TypeError, "negative_prompt must be a string"),
        (dict(guidance=0.5), ValueError, "guidance must be a finite number >= 1"),
        (dict(guidance=float("nan")), ValueError, "guidance must be"),
        (dict(steps=0), ValueError, "steps must be an integer >= 1"),
        (dict(steps=2.5), ValueError, "steps must be an integer"),
        (dict(steps=1001), ValueError, "steps must be at most 1000"),
        (dict(reference_mask=np.ones((5, 5), np.uint8)), ValueError, r"reference_mask must be .* \(37, 23\)"),
        (
            dict(reference_mask=np.ones(ref.shape[:2], np.float32)),
            ValueError,
            "reference_mask must be bool or uint8",
        ),
        (dict(ref=ref.astype(np.float32)), ValueError, "reference_image must be a uint8"),
        (dict(height=20), ValueError, "height must be a positive multiple of 8"),
        (dict(height=48, poses=tall), ValueError, "exceeds max_size"),  # a token grid beyond the RoPE tables
        (dict(dtype="float16"), ValueError, "dtype must be one of"),
        (dict(draws=Draws.from_seed(0, 3)), ValueError, r"draws.steps must be \(2,\) keys"),
        (dict(progress="yes"), TypeError, "progress must be a bool or a callable"),
    ]

    def never(*args, **kwargs):
        raise AssertionError("an input error was found only after the work began")

    for where, name in ((pipeline_module, "_encode_text"), (pipeline_module, "denoise"), (pipe, "prepare")):
        monkeypatch.setattr(where, name, never)
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            call(**kwargs)
    assert pipe.resident_parts() == {"vae"} and pipe._text_cache is None  # nothing read either
    # tiles that do not fit the frames (diffusers' tiled encoding would make 5x7 latents of 16x24)
    tiled = DynamiCtrlPipeline.load(bundle, tiling=CogVideoXTiling(8, 8))
    monkeypatch.setattr(tiled, "prepare", never)
    with pytest.raises(ValueError, match="tiles .* do not fit 16x24 frames: tiled encoding gives 5x7"):
        tiled(ref, poses, PROMPT, **RUN)


def test_reference_preprocessing_is_the_release_lanczos_resize():
    from diffusers.video_processor import VideoProcessor
    from PIL import Image

    ref, _ = dancing_inputs(1, H, W)
    mask = np.zeros(ref.shape[:2], bool)
    mask[3:20, 2:15] = True
    blacked = masked_reference(ref, mask)
    assert not blacked[~mask].any() and np.array_equal(blacked[mask], ref[mask])
    # what CogVideoX's image-to-video pipelines do to a PIL reference (the release's load_image)
    want = VideoProcessor(vae_scale_factor=8).preprocess(Image.fromarray(blacked), height=H, width=W)
    got = signed_pixels(resize_reference(blacked, H, W))
    np.testing.assert_allclose(got, want[0].permute(1, 2, 0).numpy(), atol=1e-6)


def test_trailing_dpm_sampler_whatever_the_bundle_names(pipe):
    assert pipe.scheduler_class == "CogVideoXDDIMScheduler"  # the release's scheduler config says DDIM
    assert isinstance(pipe.scheduler, CogVideoXDPMScheduler)
    assert pipe.scheduler.timesteps(25).tolist() == list(range(999, 0, -40))
