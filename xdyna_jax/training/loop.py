"""The training run: models from the init bundles, the step compiled ahead, then steps, logs, validation and
checkpoints until `train.steps`, and an X-Dyna bundle at the end. With the `vae` trainable set the run trains
the init bundle's VAE alone, on frames, and exports the bundle with the trained VAE (training/vae_stage.py).
A config of kind "dynamictrl" (configs/train_dynamictrl.py) fine-tunes a DynamiCtrl transformer on precomputed
latents and exports a DynamiCtrl bundle (training/dynamictrl_run.py).

Host syncs happen only at log steps, validation steps and saves: there the metrics of the steps since the
last check are copied to the host and checked for NaN/Inf (loss and gradient norm). A bad value stops the
run with `TrainingDiverged`, naming the first bad step and the range checked, before anything is saved, so
the newest checkpoint is always one of a good state. SIGTERM (pre-emption) saves at the next step boundary
and ends the run normally; `--resume` continues it exactly: the state (weights, optimizer, EMA, step, base
key) and the data position come back, every step draws its randomness from `step_key(state)`, so a resumed
run computes what an uninterrupted one does, bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from xdyna_jax.nn.compute import Compute
from xdyna_jax.sharding import LogicalSharding, mesh_from_config, param_shardings, rules_from_config
from xdyna_jax.training import dynamictrl_run
from xdyna_jax.training.batch import BatchBuilder, Layout, batch_sharding, empty_prompt_embedding
from xdyna_jax.training.checkpoint import Checkpoints, StopRequest, abstract_state
from xdyna_jax.training.export import CHECKPOINTS, export_bundle
from xdyna_jax.training.init import TrainingModels
from xdyna_jax.training.logs import MetricsLog, step_flops
from xdyna_jax.training.preview import preview_for_run
from xdyna_jax.training.sections import training_configs
from xdyna_jax.training.sources import open_source
from xdyna_jax.training.start import build_models, load_tokenizer, parse_init
from xdyna_jax.training.step import Trainer, step_key
from xdyna_jax.training.vae_stage import VAEBatchBuilder, export_vae_bundle, load_vae

log = logging.getLogger("train")

BUNDLE = "bundle"  # the exported X-Dyna bundle, under --output
TENSORBOARD = "tensorboard"
# fold_in tags: the batch's VAE posterior draws and the validation keys, apart from the step's own draws
_BATCH_TAG, _VALIDATION_TAG = 1, 2


class RunError(ValueError):
    """A run that cannot start as asked (output already used, nothing to resume)."""


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/Inf; the run stopped without saving the bad state."""


@dataclasses.dataclass
class RunSpec:
    config: ml_collections.ConfigDict
    init: dict[str, str] | list[str]
    data: str
    output: str | Path
    scene_data: str | None = None
    val_data: str | None = None
    resume: bool = False
    devices: int | None = None  # use only the first N devices (default: all)


def distributed_launch() -> bool:
    """Whether this process is one of several (a TPU pod slice, a SLURM job, or JAX_COORDINATOR_ADDRESS set):
    then `jax.distributed.initialize()` must run before anything touches the devices."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed() -> None:
    if distributed_launch():
        jax.distributed.initialize()  # reads the coordinator, process count and id from the environment
        log.info("process %d of %d", jax.process_index(), jax.process_count())


def _take(source, n: int) -> list[dict]:
    return [next(source) for _ in range(n)]


def _host(tree):
    """Full host copies of (possibly not fully addressable) global arrays."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _check_finite(pending: list[tuple[int, dict]], checkpoints: Checkpoints) -> list[dict]:
    """Host copies of the pending metrics; TrainingDiverged at the first NaN/Inf (see the module docstring)."""
    metrics = jax.device_get([m for _, m in pending])
    for (step, _), m in zip(pending, metrics, strict=True):
        for name in ("loss", "grad_norm"):
            if not np.isfinite(m[name]):
                checkpoints.wait()
                last = checkpoints.latest_step()
                kept = f"step {last} in {checkpoints.directory}" if last is not None else "none saved yet"
                raise TrainingDiverged(
                    f"{name} is {float(m[name])} at step {step} (steps {pending[0][0]}..{pending[-1][0]} "
                    f"checked here): stopped without saving; last good checkpoint: {kept}"
                )
    return metrics


def train(spec: RunSpec) -> int:
    """Run `spec` (see the module docstring); returns the step the run ended at."""
    cfg = spec.config
    step_cfg, opt_cfg, obj_cfg = training_configs(cfg)  # names are checked before anything is built
    init = parse_init(spec.init)
    dynamictrl = cfg.get("kind", "xdyna") == "dynamictrl"  # DynamiCtrl SFT (training/dynamictrl_run.py)
    if dynamictrl:  # its bundle and datasets checked before anything is created or compiled
        if spec.scene_data:
            raise RunError("--scene-data: a DynamiCtrl run reads prepared examples only (no scene mixing)")
        bundle = dynamictrl_run.init_bundle(init)
        shapes_of = dynamictrl_run.example_shapes(cfg, bundle)
        for folder, what in ((spec.data, "--data"), (spec.val_data, "--val-data")):
            if folder:
                dynamictrl_run.check_dataset(folder, shapes_of, what)
    output = Path(spec.output).absolute()
    ckpts = Checkpoints(output / CHECKPOINTS, keep=int(cfg.train.keep))
    latest = ckpts.latest_step()
    if latest is not None and not spec.resume:
        raise RunError(
            f"{output} already holds checkpoints (up to step {latest}): pass --resume or a new --output"
        )
    total, every = int(cfg.train.steps), int(cfg.train.save_every)
    pid, nproc = jax.process_index(), jax.process_count()
    data = cfg.data.to_dict() if "data" in cfg else {}
    clips = dict(num_frames=int(cfg.frames), **{k: v for k, v in data.items() if k != "scene_ratio"})
    source = open_source(
        spec.data, seed=int(cfg.seed), process_index=pid, process_count=nproc, scene=spec.scene_data,
        scene_ratio=float(data.get("scene_ratio", 0.1)), clips=clips,
    )  # fmt: skip

    devices = jax.devices() if spec.devices is None else jax.devices()[: spec.devices]
    mesh = mesh_from_config(cfg.sharding.mesh, devices)
    rules = rules_from_config(cfg.sharding.rules)

    def shard(tree):
        return param_shardings(tree, mesh, rules)

    # every model restored straight onto its shards: a pod-size model never sits whole on one device
    sharding = LogicalSharding(mesh, rules)
    vae_stage = step_cfg.trainable == "vae"  # the VAE alone, on frames (training/vae_stage.py)
    layout = Layout(
        int(cfg.batch_size), int(cfg.frames), int(cfg.height), int(cfg.width), pose=False, face=False
    )  # fmt: skip
    built = None
    if dynamictrl:
        model = dynamictrl_run.load_transformer(bundle, Compute(**cfg.compute), sharding)
        builder = dynamictrl_run.DynamiCtrlBatchBuilder(layout.global_batch, shapes_of, mesh)
        null_tokens = jnp.zeros((1, 1), jnp.float32)  # no image prompt: the state's slot goes unused
        frames_per_step = layout.global_batch * int(cfg.frames)
    elif vae_stage:
        model = load_vae(init, Compute(**cfg.compute), sharding)
        builder = VAEBatchBuilder(layout, mesh)
        null_tokens = jnp.zeros((1, 1), jnp.float32)  # no image prompt: the state's slot goes unused
        frames_per_step = layout.global_batch * (layout.frames + 1)  # a VAE reads every frame
    else:
        built = build_models(init, step_cfg.trainable, Compute(**cfg.compute), int(cfg.seed), sharding)
        model = built.models.denoiser
        text = empty_prompt_embedding(built.text_encoder, load_tokenizer(built.tokenizer))
        layout = dataclasses.replace(
            layout, pose=model.pose_controlnet is not None, face=model.face_controlnet is not None
        )
        builder = BatchBuilder(
            layout,
            vae=built.vae,
            image_encoder=built.models.image_encoder,
            resampler=built.models.resampler,
            text_embedding=text,
            mesh=mesh,
            param_shardings=shard,
        )
        null_tokens = nnx.jit(  # one program, not an eager op per layer
            lambda enc, res: TrainingModels(None, enc, res).null_image_tokens()
        )(built.models.image_encoder, built.models.resampler)
        frames_per_step = layout.global_batch * layout.frames
    trainer = Trainer(model, step_cfg, opt_cfg, obj_cfg)
    trainable, frozen = trainer.split(model)
    base_key = jax.random.key(int(cfg.seed))
    shapes = jax.eval_shape(trainer.init_state, trainable, frozen, null_tokens, base_key)
    state_sh = trainer.state_shardings(shapes, mesh, shard)
    record = {"config": cfg.to_dict(), "init": init, "data": str(spec.data)}
    if latest is not None:
        state, position, _ = ckpts.restore(abstract_state(shapes, state_sh))
        source.set_state(position)
        log.info("resumed from step %d of %s", latest, ckpts.directory)
    else:
        state = jax.jit(trainer.init_state, out_shardings=state_sh)(trainable, frozen, null_tokens, base_key)
    preview = None
    if built is not None:
        preview = preview_for_run(  # None unless train.sample_every > 0
            cfg, data=spec.val_data or spec.data, clips=clips, trainer=trainer, state=state,
            encoders=builder.encoders(), text_encoder=built.text_encoder, tokenizer=built.tokenizer,
        )  # fmt: skip
    del built, model, trainable, frozen  # the state holds what training needs; export rebuilds the rest
    step = int(state.step)

    val_batches = []
    if spec.val_data and int(cfg.train.val_every) > 0:
        val_source = open_source(
            spec.val_data, seed=int(cfg.seed), process_index=pid, process_count=nproc,
            clips={**clips, "flip_prob": 0.0, "max_scale": 1.0},
        )  # fmt: skip
        val_key = jax.random.fold_in(base_key, _VALIDATION_TAG)
        for i in range(int(cfg.train.val_batches)):
            val_batches.append(
                builder(_take(val_source, builder.local_batch), jax.random.fold_in(val_key, i))
            )
    options = {k: v for k, v in cfg.compiler_options.to_dict().items()}
    val_loss = jax.jit(trainer.loss, compiler_options=options or None)  # the step's XLA options here too

    key = step_key(state)
    batch = builder(_take(source, builder.local_batch), jax.random.fold_in(key, _BATCH_TAG))
    # the VAE stage's export measures the latents' scale on these frames (training/vae_stage.py)
    calibration = [_host(b["images"]) for b in (batch, *val_batches)] if vae_stage else []
    compiled = trainer.compile(
        shapes,
        batch,
        mesh,
        param_shardings=shard,
        batch_sharding=batch_sharding,
        rules=rules,
        compiler_options=options,
    )
    flops = step_flops(trainer, shapes, batch, jax.ShapeDtypeStruct((), key.dtype)) if cfg.train.mfu else None
    logs = MetricsLog(
        output / TENSORBOARD,
        start=step,
        total=total,
        frames_per_step=frames_per_step,
        flops_per_step=flops,
        devices=list(mesh.devices.flat),
    )

    def validate(step: int) -> None:
        losses = [val_loss(state, b, jax.random.fold_in(val_key, i)) for i, b in enumerate(val_batches)]
        logs.scalars(step, {"val/loss": float(np.mean(jax.device_get(losses)))})
        logs.restart_clock(step)

    pending: list[tuple[int, dict]] = []
    stopping = False
    if val_batches and step == 0:  # the untrained model's loss on the same clips and draws: the baseline
        validate(0)
    try:
        with StopRequest() as stop:
            while step < total:
                if batch is None:
                    key = step_key(state)
                    batch = builder(_take(source, builder.local_batch), jax.random.fold_in(key, _BATCH_TAG))
                if step + 1 == int(cfg.debug.nan_at_step):
                    batch = dict(batch, latents=batch["latents"] * jnp.nan)
                state, metrics = compiled(state, batch, key)
                batch = None
                step += 1
                pending.append((step, metrics))
                logs.advance()
                stopping = stop.requested(step, ckpts)
                saving = step % every == 0 or step == total or stopping
                if saving or step % int(cfg.train.log_every) == 0:
                    logs.train(step, _check_finite(pending, ckpts))
                    pending = []
                if saving:
                    ckpts.save(step, state, data_state=source.get_state(), config=record)
                if val_batches and step % int(cfg.train.val_every) == 0:
                    validate(step)
                if preview is not None and not stopping and step % int(cfg.train.sample_every) == 0:
                    logs.frames(step, "sample/frames", preview(state))
                    logs.restart_clock(step)
                if stopping:
                    log.warning("SIGTERM: saved step %d; resume with --resume", step)
                    break
    finally:
        ckpts.wait()
        logs.close()
    if not stopping and step == total and cfg.train.export:
        ema = bool(cfg.train.export_ema) and state.ema is not None
        weights = _host(state.ema if ema else state.trainable)
        if pid == 0:
            if dynamictrl:
                path = dynamictrl_run.export_dynamictrl_bundle(
                    weights, record, output / BUNDLE, step=step, ema=ema, overwrite=True
                )
            elif vae_stage:
                path = export_vae_bundle(
                    weights, record, output / BUNDLE, step=step, ema=ema, images=calibration, overwrite=True
                )
            else:
                path = export_bundle(weights, record, output / BUNDLE, step=step, ema=ema, overwrite=True)
            log.info("wrote the %s weights of step %d as %s", "EMA" if ema else "trained", step, path)
        if nproc > 1:
            multihost_utils.sync_global_devices("export")
    ckpts.close()
    return step
