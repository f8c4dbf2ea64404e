"""The training core: trainable sets by path, the objective against a reference written from the equations,
CFG dropout, and the compiled step (frozen weights untouched, exactly the named set trained, 8 devices =
1 device)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from oracle import FAST_COMPILE, TINY_UNET, random_torch_state, rel_err

from configs import train_xdyna
from configs.sharding import sharding_section
from convert.state import load_torch_state
from xdyna_jax.models.controlnet import ControlNetConfig, ControlNetModel
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.models.xdyna import XDynaDenoiser
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model
from xdyna_jax.sharding import logical_spec, make_mesh, param_shardings, rules_from_config
from xdyna_jax.training.objective import ObjectiveConfig, diffusion_loss, draw, drop_image_tokens
from xdyna_jax.training.optimizer import OptimizerConfig
from xdyna_jax.training.step import StepConfig, Trainer, step_key
from xdyna_jax.training.trainable import TrainableSetError, trainable_filter, trainable_paths

# XLA's cheapest CPU pipeline: the same fp32 numbers, about half the compile time of these small steps.
COMPUTE = Compute(precision="highest", attention="xla")
# One resolution, attention only in the mid block: the smallest UNet with every X-Dyna part.
ENCODER = dict(
    block_out_channels=(8,),
    down_block_types=("DownBlock2D",),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=8,
    attention_head_dim=2,
    compute=COMPUTE,
)
VIDEO = dict(
    dynamics_adapter=True,
    ip_adapter_tokens=2,
    motion_modules=True,
    motion_max_len=24,
    motion_norm_groups=4,
    motion_heads=2,
    groupnorm_over_frames=True,
    skip_reference_frame=True,
)
B, N, H = 8, 2, 4


def _random(cls, cfg, seed):
    return load_torch_state(shape_only_model(cls, cfg), random_torch_state(cls, cfg, seed), source="test")


def tiny_denoiser(*, video=True, pose=True, face=True):
    unet = UNetConfig(**ENCODER, up_block_types=("UpBlock2D",), **(VIDEO if video else {}))
    cn = lambda c: ControlNetConfig(
        **ENCODER, conditioning_channels=c, conditioning_embedding_out_channels=(4,)
    )  # noqa: E731
    return XDynaDenoiser(
        _random(UNet, unet, 0),
        _random(ControlNetModel, cn(3), 1) if pose else None,
        _random(ControlNetModel, cn(6), 2) if face else None,
    )


def tiny_batch(seed=0, face=True):
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    batch = dict(
        latents=normal(B, 1 + N, H, H, 4),
        text=normal(B, 3, 8),
        image_tokens=normal(B, 2, 8),
        pose=normal(B, N, H, H, 3),
    )
    if face:
        batch["face"] = normal(B, N, H, H, 6)
    return batch


def _flat(state) -> dict:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _run(denoiser, step_cfg, steps=2, mesh=None, batch=None, **compile_kw):
    """(trainer, params before, state after `steps` steps, metrics of each step) on `mesh` (default 1 device)."""
    trainer = Trainer(denoiser, step_cfg, OptimizerConfig(learning_rate=1e-4, warmup_steps=4, ema_decay=0.5))
    before = _flat(nnx.state(denoiser, nnx.Param))
    trainable, frozen = trainer.split(denoiser)
    state = trainer.init_state(trainable, frozen, jnp.full((2, 8), 0.5), jax.random.key(3))
    batch = tiny_batch() if batch is None else batch
    mesh = mesh or make_mesh(devices=jax.devices()[:1])
    step = trainer.compile(state, batch, mesh, compiler_options=FAST_COMPILE, **compile_kw)
    assert step.memory["peak"] > 0
    state, metrics = step.place_state(state), []
    for _ in range(steps):
        state, m = step(state, batch, step_key(state))
        metrics.append({k: float(v) for k, v in m.items()})
    return trainer, before, state, metrics


@pytest.fixture(scope="module")
def stage1_run():
    return _run(tiny_denoiser(face=False), StepConfig(trainable="stage1"), batch=tiny_batch(face=False))


def test_unknown_trainable_set_is_one_clear_error_before_anything_is_built():
    cfg = train_xdyna.get_config("stage3")
    with pytest.raises(TrainableSetError, match=r"unknown trainable set 'stage3'.*stage1.*stage2.*all.*vae"):
        train_xdyna.training_configs(cfg)
    abstract = XDynaDenoiser(shape_only_model(UNet, UNetConfig(**TINY_UNET, **VIDEO)))
    with pytest.raises(TrainableSetError, match="'vae'.*vae model.*not to a XDynaDenoiser"):
        trainable_filter("vae", abstract)
    with pytest.raises(TrainableSetError, match="'stage2'.*selects no parameter"):
        trainable_filter("stage2", abstract)  # no face ControlNet to train


def test_trainable_sets_name_exactly_their_parameters():
    """By path on the two-block tiny X-Dyna (shapes only): the sets as the paper describes them."""
    cn = lambda c: ControlNetConfig(  # noqa: E731
        **{k: v for k, v in TINY_UNET.items() if k != "up_block_types"}, conditioning_channels=c
    )
    den = XDynaDenoiser(
        shape_only_model(UNet, UNetConfig(**TINY_UNET, **VIDEO)),
        shape_only_model(ControlNetModel, cn(3)),
        shape_only_model(ControlNetModel, cn(6)),
    )
    keys = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(den, nnx.Param))}
    stage1 = {
        k
        for k in keys
        if k.startswith("pose_controlnet.")
        or (
            k.startswith("unet.")
            and (".motion_modules." in k or ".attn1.to_q_ff." in k or ".attn1.to_out_ff." in k)
        )
    }
    got = {
        name: {".".join(map(str, p)) for p in trainable_paths(name, den)}
        for name in ("stage1", "stage2", "all")
    }
    assert got["stage1"] == stage1
    assert sum(".to_q_ff." in k for k in stage1) == 4 and sum(".to_out_ff." in k for k in stage1) == 8
    assert got["stage2"] == {k for k in keys if k.startswith("face_controlnet.")}
    assert got["all"] == keys
    # SD's spatial attention and the IP-Adapter projections stay frozen (motion modules have their own to_q)
    spatial = [k for k in got["stage1"] if k.startswith("unet.") and ".attentions." in k]
    assert spatial and not any(".to_q." in k or "_ip." in k for k in spatial)


def test_objective_equals_the_equations():
    """eps-MSE on frames 1..N, x_t by diffusers' DDPMScheduler.add_noise (linear betas), frame 0 clean,
    the dropped examples' image tokens replaced; the denoiser is a stand-in that reads every input."""
    import torch
    from diffusers import DDPMScheduler

    cfg = ObjectiveConfig(image_dropout=0.5)
    batch = tiny_batch(1)
    null = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(3).standard_normal((4, 4)), jnp.float32)

    def stand_in(window, t, context, pose, face):
        ctx = context.mean(axis=(1, 2))[:, None, None, None, None]
        cond = jnp.concatenate(
            [jnp.zeros_like(window[:, :1, ..., :1]), pose.mean(-1, keepdims=True)[:, :, :H, :H]], 1
        )
        return (
            jnp.tanh(window @ w + window[:, :1] * 0.3) * (1 + ctx)
            + cond
            + 1e-3 * t[:, None, None, None, None]
        )

    draws = draw(jax.random.key(7), batch["latents"].shape, cfg)
    assert 0 < int(draws.drop_image.sum()) < B
    loss = float(diffusion_loss(stand_in, batch, null, draws, cfg.alphas_cumprod()))

    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear"
    )
    lat = torch.from_numpy(np.asarray(batch["latents"]))
    noise = torch.from_numpy(np.asarray(draws.noise))
    t = torch.from_numpy(np.asarray(draws.timesteps)).long()
    noisy = torch.stack([sched.add_noise(lat[i, 1:], noise[i], t[i].repeat(N)) for i in range(B)])
    window = np.concatenate([lat[:, :1].numpy(), noisy.numpy()], axis=1)
    drop = np.asarray(draws.drop_image)
    image = np.where(drop[:, None, None], np.asarray(null)[None], np.asarray(batch["image_tokens"]))
    context = np.concatenate([np.asarray(batch["text"]), image], axis=1)
    eps = np.asarray(
        stand_in(jnp.asarray(window), draws.timesteps, jnp.asarray(context), batch["pose"], None)
    )
    per_example = ((eps[:, 1:] - noise.numpy()) ** 2).mean(axis=(1, 2, 3, 4))
    assert rel_err(loss, per_example.mean()) < 1e-5
    # Min-SNR-5: each example's error times min(SNR_t, 5) / SNR_t, SNR from diffusers' alphas_cumprod
    ab = sched.alphas_cumprod.numpy().astype(np.float64)[t.numpy()]
    snr = ab / (1 - ab)
    assert (snr > 5).any() and (snr < 5).any()  # the draws exercise both sides of the minimum
    weighted = float(diffusion_loss(stand_in, batch, null, draws, cfg.alphas_cumprod(), snr_gamma=5.0))
    assert rel_err(weighted, np.mean(np.minimum(snr, 5) / snr * per_example)) < 1e-5
    # a floor of 1 as well: the clean-frame error weighted by at least 1 (max(SNR, 1) / SNR on the eps error)
    assert (snr < 1).any()
    both = float(
        diffusion_loss(stand_in, batch, null, draws, cfg.alphas_cumprod(), snr_gamma=5.0, snr_floor=1.0)
    )
    assert rel_err(both, np.mean(np.clip(snr, 1, 5) / snr * per_example)) < 1e-5
    with pytest.raises(ValueError, match="snr_floor 6.0 is above objective.snr_gamma 5.0"):
        ObjectiveConfig(snr_gamma=5.0, snr_floor=6.0)


def test_dropout_replaces_exactly_the_chosen_examples_image_tokens():
    cfg = ObjectiveConfig(image_dropout=0.5)
    key = jax.random.key(11)
    draws = draw(key, (64, 3, 2, 2, 4), cfg)
    chosen = np.asarray(draws.drop_image)
    assert 10 < chosen.sum() < 54
    # the choice is the step key's: the same key draws the same examples, another key others
    assert (np.asarray(draw(key, (64, 3, 2, 2, 4), cfg).drop_image) == chosen).all()
    assert (np.asarray(draw(jax.random.key(12), (64, 3, 2, 2, 4), cfg).drop_image) != chosen).any()
    tokens = jnp.asarray(np.random.default_rng(0).standard_normal((64, 4, 8)), jnp.float32)
    null = jnp.asarray(np.random.default_rng(1).standard_normal((4, 8)), jnp.float32)
    out = np.asarray(drop_image_tokens(tokens, null, draws.drop_image))
    np.testing.assert_array_equal(out[chosen], np.broadcast_to(np.asarray(null), out[chosen].shape))
    np.testing.assert_array_equal(out[~chosen], np.asarray(tokens)[~chosen])
    never = draw(key, (64, 3, 2, 2, 4), ObjectiveConfig(image_dropout=0.0)).drop_image
    assert not np.asarray(never).any()


def _changed(before: dict, state) -> set:
    after = {**_flat(state.trainable), **_flat(state.frozen)}
    assert set(after) == set(before)
    return {p for p in before if not np.array_equal(before[p], after[p])}


def test_stage1_step_trains_its_set_and_leaves_frozen_weights_bit_identical(stage1_run):
    trainer, before, state, metrics = stage1_run
    frozen = _flat(state.frozen)
    for path, value in frozen.items():
        assert value.dtype == np.float32 and np.array_equal(value, before[path]), path
    named = {tuple(p) for p in trainable_paths("stage1", trainer.model(state))}
    assert _changed(before, state) == named == set(_flat(state.trainable))
    assert int(state.step) == 2 and all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    assert [m["lr"] for m in metrics] == pytest.approx([1e-4 / 4, 2e-4 / 4])
    ema = _flat(state.ema)  # 0.5 * (0.5 * p0 + 0.5 * p1) + 0.5 * p2: strictly between start and end
    assert set(ema) == named and all(not np.array_equal(ema[p], before[p]) for p in named)


@pytest.fixture(scope="module")
def stage2_run():
    """A plain UNet + the S-Face ControlNet (cheap to compile), frozen weights held in bf16."""
    den = tiny_denoiser(video=False, pose=False)
    return _run(den, StepConfig(trainable="stage2", frozen_dtype="bfloat16"))


def test_stage2_trains_exactly_the_face_controlnet_with_bf16_frozen_weights(stage2_run):
    trainer, before, state, _ = stage2_run
    named = {tuple(p) for p in trainable_paths("stage2", trainer.model(state))}
    assert named == {p for p in before if p[0] == "face_controlnet"} == set(_flat(state.trainable))
    assert _changed(before, state) >= named
    for path, value in _flat(state.frozen).items():  # held in bf16: rounded once, never moved
        assert value.dtype == jnp.bfloat16
        np.testing.assert_array_equal(value, before[path].astype(jnp.bfloat16))
    assert all(v.dtype == np.float32 for v in _flat(state.trainable).values())


def test_fsdp_sharded_rematerialised_step_equals_the_single_device_step(stage2_run):
    """8 devices (data 2 x fsdp 4): params, EMA and Adam moments placed by the config's rules, the batch over
    data x fsdp, every block under full remat with checkpointed layers inside == 1 device."""
    _, _, single, single_metrics = stage2_run
    mesh = make_mesh(data=2, fsdp=4)
    rules = rules_from_config(sharding_section().rules)
    remat = dict(down_blocks="full", mid_block="full", up_blocks="full", resnets="full", attentions="dots")
    denoiser = tiny_denoiser(video=False, pose=False)
    names = {tuple(p): v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(nnx.state(denoiser))}
    _, _, sharded, metrics = _run(
        denoiser,
        StepConfig(trainable="stage2", frozen_dtype="bfloat16", remat=remat),
        mesh=mesh,
        param_shardings=lambda tree: param_shardings(tree, mesh, rules),
        batch_sharding=lambda m: NamedSharding(m, PartitionSpec(("data", "fsdp"))),
        rules=rules,  # traced under the rules: the models' activation constraints apply
    )

    def placed_by_rules(tree, what):
        split = 0
        for path, var in nnx.to_flat_state(tree):
            value = var.get_value()
            expected = logical_spec(names[tuple(path)], value.shape, mesh, rules)
            assert value.sharding.spec == expected, (what, path, value.sharding.spec, expected)
            split += "fsdp" in jax.tree_util.tree_leaves(tuple(expected))
        assert split, f"no {what} is split over fsdp"

    adam = next(s for s in jax.tree_util.tree_leaves(sharded.opt_state, is_leaf=lambda x: hasattr(x, "mu")))
    for tree, what in (
        (sharded.trainable, "param"),
        (sharded.ema, "EMA"),
        (adam.mu, "Adam mu"),
        (adam.nu, "Adam nu"),
    ):
        placed_by_rules(tree, what)
    placed_by_rules(sharded.frozen, "frozen param")
    for a, b in zip(metrics, single_metrics, strict=True):
        assert rel_err(a["loss"], b["loss"]) < 1e-5 and rel_err(a["grad_norm"], b["grad_norm"]) < 1e-5
    one, eight = _flat(single.trainable), _flat(sharded.trainable)
    for path in one:
        assert rel_err(eight[path], one[path]) < 1e-5, path
