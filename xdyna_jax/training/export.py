"""A training checkpoint -> an X-Dyna pipeline bundle that `sample.py` / `XDynaPipeline.load` read (or, for a
DynamiCtrl run, a DynamiCtrl bundle: `training/dynamictrl_run.py`).

    python -m xdyna_jax.training.export RUN/checkpoints --output bundles/xdyna_trained [--step N] [--no-ema]

The bundle has the layout `convert xdyna` writes (unet/, controlnet_pose/, controlnet_face/ when trained,
vae/, text_encoder/, image_encoder/, resampler/, tokenizer/, scheduler/, manifest.json). The trained
weights are the EMA when the run kept one (unless --no-ema), else the fp32 master weights. The frozen
weights are read again from the run's `--init` bundles rather than taken from the checkpoint, which may hold
them in bfloat16 (`step.frozen_dtype`): the exported model is the init's model with only the trained set
replaced. The models are rebuilt in host memory (the CPU device), so exporting never needs accelerator
memory. The bundle appears atomically (written to a temporary folder, then renamed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import xdyna_jax
from xdyna_jax.io.atomic import atomic_folder
from xdyna_jax.nn.compute import Compute
from xdyna_jax.sampling.bundles import MANIFEST, XDYNA_SCHEDULER
from xdyna_jax.training import dynamictrl_run
from xdyna_jax.training.checkpoint import Checkpoints, abstract_state
from xdyna_jax.training.sections import training_configs
from xdyna_jax.training.start import build_models
from xdyna_jax.training.step import Trainer

# the folder `xdyna_jax.training.loop` writes its checkpoints into, under the run's --output
CHECKPOINTS = "checkpoints"


class ExportError(ValueError):
    pass


def host_device() -> jax.Device:
    return jax.devices("cpu")[0]


def _path_name(path) -> str:
    return ".".join(map(str, path))


def export_bundle(
    weights: nnx.State, run: dict, output: str | Path, *, step: int, ema: bool, overwrite: bool = False
) -> Path:
    """Write the bundle: `weights` (the trained set's values, host or device arrays) into the models the
    run's init builds. `run` is what the loop saves as the checkpoint's config (config + init)."""
    output = Path(output).absolute()
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists")
    cfg = ml_collections.ConfigDict(run["config"])
    with jax.default_device(host_device()):
        built = build_models(run["init"], cfg.step.trainable, Compute(), int(cfg.seed))
        denoiser = built.models.denoiser
        params = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(denoiser, nnx.Param))}
        flat = [(tuple(p), v) for p, v in nnx.to_flat_state(weights)]
        unknown = [_path_name(p) for p, _ in flat if p not in params]
        if unknown:
            raise ExportError(f"checkpoint weights the init's model has no place for: {unknown[:5]}")
        for path, value in flat:
            value = value.get_value() if isinstance(value, nnx.Variable) else value
            value = np.asarray(jax.device_get(value), np.float32)
            if value.shape != tuple(params[path].shape):
                raise ExportError(
                    f"{_path_name(path)}: checkpoint {value.shape} vs model {params[path].shape}"
                )
            params[path].set_value(jnp.asarray(value))
    parts = {
        "unet": denoiser.unet,
        "controlnet_pose": denoiser.pose_controlnet,
        "controlnet_face": denoiser.face_controlnet,
        "vae": built.vae,
        "text_encoder": built.text_encoder,
        "image_encoder": built.models.image_encoder,
        "resampler": built.models.resampler,
    }
    with atomic_folder(output, overwrite=overwrite) as tmp:
        for name, module in parts.items():
            if module is not None:
                dtype = "float32" if name in ("unet", "controlnet_pose", "controlnet_face") else None
                xdyna_jax.save(module, tmp / name, param_dtype=dtype)
        shutil.copytree(built.tokenizer, tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(XDYNA_SCHEDULER.to_diffusers()))
        manifest = {
            "kind": "xdyna",
            "converter": "xdyna_jax.training",
            "step": int(step),
            "weights": "ema" if ema else "trained",
            "trainable": cfg.step.trainable,
            "init": run["init"],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return output


def checkpoint_folder(path: str | Path) -> Path:
    """A run's checkpoints folder, given as itself or as the run's --output folder."""
    path = Path(path)
    return path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path


def export_checkpoint(
    checkpoints: str | Path, output: str | Path, *, step: int | None = None, use_ema: bool = True
) -> Path:
    """Restore a checkpoint (onto the host) and export it (see the module docstring)."""
    ckpts = Checkpoints(checkpoint_folder(checkpoints), asynchronous=False)
    step = ckpts.latest_step() if step is None else step
    if step is None:
        raise ExportError(f"no checkpoint in {ckpts.directory}")
    run = ckpts.read_config(step)
    cfg = ml_collections.ConfigDict(run["config"])
    step_cfg, opt_cfg, obj_cfg = training_configs(cfg)
    dynamictrl = cfg.get("kind", "xdyna") == "dynamictrl"
    with jax.default_device(host_device()):
        if dynamictrl:  # the transformer alone; its run kept no image-prompt tokens
            model = dynamictrl_run.load_transformer(dynamictrl_run.init_bundle(run["init"]), Compute(), None)
            tokens = jax.ShapeDtypeStruct((1, 1), jnp.float32)
        else:
            models = build_models(run["init"], step_cfg.trainable, Compute(), int(cfg.seed)).models
            model, tokens = models.denoiser, jax.eval_shape(models.null_image_tokens)
            del models
        trainer = Trainer(model, step_cfg, opt_cfg, obj_cfg)
        trainable, frozen = trainer.split(model)
        shapes = jax.eval_shape(trainer.init_state, trainable, frozen, tokens, jax.random.key(0))
    del model, trainable, frozen
    host = jax.sharding.SingleDeviceSharding(host_device())
    state, _, _ = ckpts.restore(abstract_state(shapes, jax.tree_util.tree_map(lambda _: host, shapes)), step)
    ckpts.close()
    ema = use_ema and state.ema is not None
    weights = state.ema if ema else state.trainable
    write = dynamictrl_run.export_dynamictrl_bundle if dynamictrl else export_bundle
    return write(weights, run, output, step=step, ema=ema)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Export a training checkpoint as an X-Dyna (or DynamiCtrl) pipeline bundle."
    )
    p.add_argument("checkpoints", help="the run's --output folder or its checkpoints/ folder")
    p.add_argument("--output", required=True, help="the bundle folder to write (must not exist)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--no-ema", action="store_true", help="export the trained weights, not their EMA")
    args = p.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoints, args.output, step=args.step, use_ema=not args.no_ema)
    except (ExportError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
