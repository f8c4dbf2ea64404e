"""DynamiCtrl fine-tuning: the SFT objective against the equations (diffusers' CogVideoX scheduler as the
oracle of x_t and x0), the trainable set and per-block remat, the FSDP step on 8 devices == 1 device, and a
tiny DynamiCtrl overfitting a tiny fixed batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from oracle import FAST_COMPILE, rel_err
from oracle_cogvideox import TINY_COGVIDEOX_10_I2V, TINY_COGVIDEOX_15

from configs import train_dynamictrl
from configs.sharding import sharding_section
from xdyna_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer3DModel
from xdyna_jax.models.dynamictrl import DynamiCtrlBlock, DynamiCtrlTransformerModel
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model
from xdyna_jax.sharding import logical_spec, make_mesh, param_shardings, rules_from_config
from xdyna_jax.training.dynamictrl_objective import (
    DynamiCtrlObjectiveConfig,
    draw_dynamictrl,
    dynamictrl_loss,
    noise_reference_frame,
)
from xdyna_jax.training.objective import check_batch
from xdyna_jax.training.optimizer import OptimizerConfig
from xdyna_jax.training.remat import apply_remat
from xdyna_jax.training.step import StepConfig, Trainer, step_key
from xdyna_jax.training.trainable import trainable_paths

COMPUTE = Compute(precision="highest", attention="xla")
B, F, HW, C = 8, 2, 8, 4  # latents (B, F', h, w, C): 1 x 4 x 4 video tokens in the tiny 1.5 config
TEXT = (TINY_COGVIDEOX_15["max_text_seq_length"], TINY_COGVIDEOX_15["text_embed_dim"])


def no_null_tokens():
    """The trainer's X-Dyna CFG target, unused (DynamiCtrl drops to zero latents); fresh, as it is donated."""
    return jnp.zeros((1, 1))


@functools.cache
def _tiny_dynamictrl_parts(seed: int, compute: Compute):
    model = DynamiCtrlTransformerModel(
        CogVideoXConfig.from_diffusers(TINY_COGVIDEOX_15, compute), rngs=nnx.Rngs(seed)
    )
    rng = np.random.default_rng(100 + seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(
        model, jax.tree_util.tree_map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), params)
    )
    return nnx.split(model)


def tiny_dynamictrl(seed=0, compute=COMPUTE):
    """The tiny 1.5 DynamiCtrl with every parameter perturbed: no zero bias (whose first Adam steps are
    +-lr, the sign of a near-zero gradient) or unit norm scale hides a difference. Fresh buffers each call
    (train steps donate them)."""
    graphdef, state = _tiny_dynamictrl_parts(seed, compute)
    return nnx.merge(graphdef, jax.tree_util.tree_map(jnp.copy, state))


def tiny_batch(seed=0, b=B):
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return dict(
        latents=normal(b, F, HW, HW, C),
        image_latents=normal(b, 1, HW, HW, C),
        pose_latents=normal(b, F, HW, HW, C),
        text=normal(b, *TEXT),
    )


def test_objective_equals_the_release_equations():
    """x_t and x0_hat by diffusers' CogVideoXDPMScheduler (the release's training schedule, float64), the
    image latent in frame 0 of the input's second half, zeros for the dropped examples, the 1 / (1 - abar)
    weighting; timesteps 0 and 999 (the schedule's ends) included. The model is a stand-in reading every
    input."""
    import torch
    from diffusers import CogVideoXDPMScheduler

    cfg = DynamiCtrlObjectiveConfig(image_dropout=0.5)
    batch = tiny_batch(1)
    draws = draw_dynamictrl(jax.random.key(7), batch["latents"].shape, cfg)
    assert 0 < int(draws.drop_image.sum()) < B
    draws = draws._replace(timesteps=draws.timesteps.at[:2].set(jnp.array([0, 999], jnp.int32)))
    w = jnp.asarray(np.random.default_rng(3).standard_normal((2 * C, C)), jnp.float32)
    seen = {}

    def stand_in(hidden, text, t, pose, *, ofs):
        seen.update(ofs=ofs)
        ctx = text.mean(axis=(1, 2))[:, None, None, None, None]
        return jnp.tanh(hidden @ w) * (1 + ctx) + 0.5 * pose + 1e-3 * t[:, None, None, None, None]

    loss = float(dynamictrl_loss(stand_in, batch, draws, cfg))
    assert seen["ofs"] == 2.0

    sched = CogVideoXDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )
    abar = sched.alphas_cumprod.double()
    assert float(abar[999]) == 0.0 and float(abar[0]) < 1.0
    x0 = torch.from_numpy(np.array(batch["latents"], np.float64))
    noise = torch.from_numpy(np.array(draws.noise, np.float64))
    t = torch.from_numpy(np.array(draws.timesteps)).long()
    noisy = sched.add_noise(x0, noise, t)
    drop = np.asarray(draws.drop_image)
    image = np.zeros((B, F, HW, HW, C))
    image[:, :1] = np.where(drop[:, None, None, None, None], 0.0, np.asarray(batch["image_latents"]))
    hidden = np.concatenate([noisy.numpy(), image], axis=-1)
    v_hat = np.asarray(
        stand_in(
            jnp.asarray(hidden, jnp.float32), batch["text"], draws.timesteps, batch["pose_latents"], ofs=2.0
        ),
        np.float64,
    )
    x0_hat = sched.get_velocity(torch.from_numpy(v_hat), noisy, t).numpy()  # sqrt(a) x_t - sqrt(1-a) v
    weights = (1.0 / (1.0 - abar[t])).numpy()[:, None, None, None, None]
    expected = np.mean(weights * (x0_hat - x0.numpy()) ** 2)
    assert rel_err(loss, expected) < 1e-5
    # the weighting makes it the v-prediction MSE
    velocity = sched.get_velocity(x0, noise, t).numpy()
    assert rel_err(loss, np.mean((v_hat - velocity) ** 2)) < 1e-4


def test_draws_reference_noise_and_batch_errors():
    cfg = DynamiCtrlObjectiveConfig()
    key = jax.random.key(4)
    a, b = draw_dynamictrl(key, (256, F, 2, 2, C), cfg), draw_dynamictrl(key, (256, F, 2, 2, C), cfg)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert 2 <= int(a.drop_image.sum()) <= 30  # p = 0.05 of 256
    t = np.asarray(a.timesteps)
    assert t.min() >= 0 and t.max() <= 999 and len(set(t)) > 100
    # reference pixel noise: log sigma ~ N(-3, 0.5) per example
    frames = jnp.zeros((4096, 4, 4, 3))
    noised = np.asarray(noise_reference_frame(frames, key, cfg))
    log_sigma = np.log(noised.reshape(4096, -1).std(axis=1))
    assert abs(log_sigma.mean() + 3.0) < 0.1 and abs(log_sigma.std() - 0.5) < 0.1
    bad = tiny_batch(b=2)
    with pytest.raises(ValueError, match="image_latents"):
        check_batch({**bad, "image_latents": bad["latents"]})
    with pytest.raises(ValueError, match="3 latent frames.*even"):
        check_batch({k: v if k == "text" else jnp.concatenate([v, v[:, :1]], 1) for k, v in bad.items()})
    with pytest.raises(ValueError, match="no 'text'"):
        check_batch({k: v for k, v in bad.items() if k != "text"})


def test_release_recipe_config():
    step, opt, objective = train_dynamictrl.training_configs(train_dynamictrl.get_config())
    assert step.trainable == "transformer" and step.remat == {"transformer_blocks": "full"}
    assert (opt.learning_rate, opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.clip_norm) == (
        5e-6,
        0.9,
        0.95,
        1e-8,
        1e-3,
        1.0,
    )
    assert (opt.warmup_steps, opt.decay, opt.decay_steps, opt.final_lr_fraction) == (
        1000,
        "cosine",
        50_000,
        0.0,
    )
    assert objective == DynamiCtrlObjectiveConfig()
    assert (objective.image_dropout, objective.beta_schedule, objective.rescale_betas_zero_snr) == (
        0.05,
        "scaled_linear",
        True,
    )
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        train_dynamictrl.get_config("huge")


def test_transformer_set_and_block_remat():
    """The set is the whole DiT but a 1.0 config's learned position table; DynamiCtrl blocks checkpoint as
    DynamiCtrl blocks (control stream kept), CogVideoX blocks as theirs."""
    model = shape_only_model(DynamiCtrlTransformerModel, CogVideoXConfig.from_diffusers(TINY_COGVIDEOX_15))
    every = [tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert trainable_paths("transformer", model) == every
    assert any("control_norm1" in p for p in every)
    i2v = shape_only_model(CogVideoXTransformer3DModel, CogVideoXConfig.from_diffusers(TINY_COGVIDEOX_10_I2V))
    every = [tuple(p) for p, _ in nnx.to_flat_state(nnx.state(i2v, nnx.Param))]
    assert ("patch_embed", "pos_embedding") in every
    assert trainable_paths("transformer", i2v) == [p for p in every if p[-1] != "pos_embedding"]
    apply_remat(model, {"transformer_blocks": "full"})
    apply_remat(i2v, {"transformer_blocks": "dots"})
    for block in model.transformer_blocks:
        assert isinstance(block, DynamiCtrlBlock) and type(block).__name__ == "FullRematDynamiCtrlBlock"
    assert {type(b).__name__ for b in i2v.transformer_blocks} == {"DotsRematCogVideoXBlock"}


def _run(step_cfg, mesh, steps=2, **compile_kw):
    """(trainer, state after `steps` steps, metrics) of the tiny DynamiCtrl on `mesh`."""
    model = tiny_dynamictrl()
    opt = OptimizerConfig(learning_rate=1e-4, warmup_steps=2, b1=0.9, b2=0.95, weight_decay=1e-3)
    trainer = Trainer(model, step_cfg, opt, DynamiCtrlObjectiveConfig(image_dropout=0.5))
    trainable, frozen = trainer.split(model)
    state = trainer.init_state(trainable, frozen, no_null_tokens(), jax.random.key(3))
    batch = tiny_batch()
    step = trainer.compile(state, batch, mesh, compiler_options=FAST_COMPILE, **compile_kw)
    state, metrics = step.place_state(state), []
    for _ in range(steps):
        state, m = step(state, batch, step_key(state))
        metrics.append({k: float(v) for k, v in m.items()})
    return trainer, state, metrics


def _flat(state) -> dict:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.mark.slow  # 25 s here: run with make test-slow until the DynamiCtrl training tests get their budget back
def test_fsdp_sharded_remat_step_equals_the_single_device_step():
    """8 devices (data 2 x fsdp 4): params and Adam moments placed by the config's rules, the batch over
    data x fsdp, every DiT block under full remat == 1 device without remat, fp32."""
    before = _flat(nnx.state(tiny_dynamictrl(), nnx.Param))
    _, single, single_metrics = _run(
        StepConfig(trainable="transformer"), make_mesh(devices=jax.devices()[:1])
    )
    mesh = make_mesh(data=2, fsdp=4)
    rules = rules_from_config(sharding_section().rules)
    names = {
        tuple(p): v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(nnx.state(tiny_dynamictrl()))
    }
    _, sharded, metrics = _run(
        StepConfig(trainable="transformer", remat={"transformer_blocks": "full"}),
        mesh,
        param_shardings=lambda tree: param_shardings(tree, mesh, rules),
        batch_sharding=lambda m: NamedSharding(m, PartitionSpec(("data", "fsdp"))),
        rules=rules,
    )
    split = 0
    for path, var in nnx.to_flat_state(sharded.trainable):
        value = var.get_value()
        expected = logical_spec(names[tuple(path)], value.shape, mesh, rules)
        assert value.sharding.spec == expected, (path, value.sharding.spec, expected)
        split += "fsdp" in jax.tree_util.tree_leaves(tuple(expected))
    assert split > 10
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    for a, b in zip(metrics, single_metrics, strict=True):
        assert rel_err(a["loss"], b["loss"]) < 1e-5 and rel_err(a["grad_norm"], b["grad_norm"]) < 1e-5
    one, eight = _flat(single.trainable), _flat(sharded.trainable)
    assert set(one) == set(before) and not _flat(single.frozen)  # every parameter trains
    for path in one:
        assert not np.array_equal(one[path], before[path]), path
        # A bias shared by every key moves all of a query's scores alike, which softmax ignores: the k-norm
        # bias's gradient is a near-cancelling sum (left only by RoPE's rotation), summed in another order on
        # 8 devices, and Adam's first steps scale it to +-lr whatever its size. Measured 2.8e-5 / 5.6e-5.
        tol = 2e-4 if path[-2:] == ("norm_k", "bias") else 1e-5
        assert rel_err(eight[path], one[path]) < tol, path


# Random draws every step (the real objective), measured on 16 fixed draws before and after: 6.95x, 6.45x and
# 6.74x at model seeds 1, 2, 3 with the tiny config's constant 2e-2 (1e-2: 6.3-6.7x with other eval draws; a
# cosine decay 4.8-6.1x); at lr 1e-6 the ratio is 1.007x, so a step that does not learn fails.
OVERFIT_STEPS, OVERFIT_LR, OVERFIT_RATIO, EVAL_DRAWS = 150, 2e-2, 5.0, 16


@pytest.mark.slow  # CI time (the suite is near 20 min): make test-slow
def test_tiny_dynamictrl_overfits_a_fixed_batch():
    """Two fixed examples, new t / noise / dropout every step: the loss on fixed draws falls >= 5x in 150.
    Step, optimizer and objective are configs/train_dynamictrl.py's `tiny` variant."""
    cfg = train_dynamictrl.get_config("tiny")
    assert cfg.model.transformer.to_dict() == TINY_COGVIDEOX_15
    step_cfg, opt, objective = train_dynamictrl.training_configs(cfg)
    assert (opt.learning_rate, cfg.train.steps) == (OVERFIT_LR, OVERFIT_STEPS)
    assert ((cfg.frames - 1) // 4 + 1, cfg.height // 8, cfg.width // 8) == (F, HW, HW)  # the batch's latents
    model = tiny_dynamictrl(seed=1, compute=Compute(precision="default", attention="xla"))
    trainer = Trainer(model, step_cfg, opt, objective)
    trainable, frozen = trainer.split(model)
    state = trainer.init_state(trainable, frozen, no_null_tokens(), jax.random.key(0))
    batch = tiny_batch(seed=2, b=2)
    step = trainer.compile(state, batch, make_mesh(devices=jax.devices()[:1]), compiler_options=FAST_COMPILE)
    keys = jax.random.split(jax.random.key(1000), EVAL_DRAWS)
    losses = (
        jax.jit(lambda st: jax.lax.map(lambda k: trainer.loss(st, batch, k), keys))
        .lower(state)
        .compile(FAST_COMPILE)
    )
    state = step.place_state(state)
    before = float(losses(state).mean())
    for _ in range(OVERFIT_STEPS):
        state, metrics = step(state, batch, step_key(state))
    after = float(losses(state).mean())
    assert np.isfinite(float(metrics["loss"])) and before / after >= OVERFIT_RATIO, (before, after)
