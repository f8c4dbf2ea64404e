"""The VAE stage of training from scratch: train.py with the `vae` trainable set trains an X-Dyna bundle's
VAE on its own, on frames, before any denoiser stage.

    python train.py --config configs/train_xdyna.py:synthetic_vae --init xdyna=bundles/synthetic_init \\
        --data data/synth_human --output runs/vae          # -> runs/vae/bundle: the init with the new vae/

The run reads the VAE of `--init xdyna=DIR`; batches are the examples' frames (every frame of each window
is an image; objective.vae_loss). The exported bundle is the init's folder with vae/ replaced by the
trained VAE, whose `scaling_factor` is measured on the run's frames: 1 / the standard deviation of the
posterior means, so the latents the denoiser learns have unit variance, as SD's 0.18215 was chosen for
its VAE. The denoiser stages then start from that bundle (`--init xdyna=runs/vae/bundle`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import xdyna_jax
from xdyna_jax.bundle import BundleError
from xdyna_jax.io.atomic import atomic_folder
from xdyna_jax.nn.compute import Compute
from xdyna_jax.sampling.bundles import MANIFEST
from xdyna_jax.sharding import LogicalSharding
from xdyna_jax.training.batch import BATCH_AXES, BatchError, Layout, batch_sharding
from xdyna_jax.training.init import InitError

VAE = "vae"


def load_vae(init: dict[str, str], compute: Compute, sharding: LogicalSharding | None = None) -> nnx.Module:
    """The VAE to train: vae/ of the `--init xdyna=` bundle (the only init a VAE stage takes)."""
    if set(init) != {"xdyna"}:
        raise InitError(f"the vae stage trains the VAE of --init xdyna=DIR alone; got --init {sorted(init)}")
    try:
        return xdyna_jax.load(
            Path(init["xdyna"]) / VAE, sharding=sharding, compute=compute, expected_kind="vae"
        )
    except BundleError as e:
        raise InitError(f"--init xdyna={init['xdyna']}: {e}") from e


class VAEBatchBuilder:
    """`builder(examples, key) -> {"images": (B, 1 + N, H, W, 3) float32 in [-1, 1]}` for the VAE stage,
    split over the mesh's batch axes like the denoiser's batches (training/batch.py)."""

    def __init__(self, layout: Layout, mesh: Mesh):
        self.layout, self.mesh = layout, mesh
        self.sharding = batch_sharding(mesh)
        shards = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)
        if layout.global_batch % shards or layout.global_batch % jax.process_count():
            raise BatchError(
                f"batch_size {layout.global_batch} does not split over the mesh's {shards} batch shards "
                f"(axes {BATCH_AXES}) and {jax.process_count()} processes"
            )
        self.local_batch = layout.global_batch // jax.process_count()
        self._program = jax.jit(lambda f: f.astype(jnp.float32) / 127.5 - 1.0, out_shardings=self.sharding)

    def host_arrays(self, examples: Sequence[dict]) -> np.ndarray:
        lay = self.layout
        if len(examples) != self.local_batch:
            raise BatchError(f"got {len(examples)} examples, this process's share is {self.local_batch}")
        want = (lay.frames + 1, lay.height, lay.width, 3)
        out = []
        for i, ex in enumerate(examples):
            if "frames" not in ex:
                raise BatchError(
                    f"example {i} of the batch has no 'frames' (keys {sorted(ex)}): the VAE stage trains on "
                    "pixels (prepare the dataset without --latents)"
                )
            frames = np.asarray(ex["frames"])
            if frames.dtype != np.uint8 or frames.shape != want:
                raise BatchError(
                    f"example {i} of the batch: frames must be uint8 {want}, got {frames.dtype} {frames.shape}"
                )
            out.append(frames)
        return np.stack(out)

    def __call__(self, examples: Sequence[dict], key: jax.Array | None = None) -> dict[str, jax.Array]:
        local = self.host_arrays(examples)
        shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        frames = jax.make_array_from_process_local_data(self.sharding, local, shape)
        return {"images": self._program(frames)}


def scaling_factor(vae: nnx.Module, images: Sequence[np.ndarray]) -> float:
    """1 / std of the posterior means of `images` (arrays (..., H, W, 3) in [-1, 1]) under `vae`."""
    encode = nnx.jit(lambda m, x: m.encode(x)[0])
    means = [np.asarray(encode(vae, jnp.asarray(x).reshape(-1, *x.shape[-3:]))) for x in images]
    std = float(np.concatenate([m.ravel() for m in means]).std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"the trained VAE's latents have standard deviation {std}: cannot scale them")
    return 1.0 / std


def export_vae_bundle(
    weights: nnx.State,
    run: dict,
    output: str | Path,
    *,
    step: int,
    ema: bool,
    images: Sequence[np.ndarray],
    overwrite: bool = False,
) -> Path:
    """The init's X-Dyna folder with vae/ replaced by the init's VAE holding `weights` (the trained set)
    and its scaling factor measured on `images` (see the module docstring); written atomically."""
    output = Path(output).absolute()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists")
    source = Path(run["init"]["xdyna"])
    with jax.default_device(jax.devices("cpu")[0]):
        vae = xdyna_jax.load(source / VAE, compute=Compute(), expected_kind="vae")
        params = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}
        flat = [(tuple(p), v) for p, v in nnx.to_flat_state(weights)]
        unknown = [".".join(map(str, p)) for p, _ in flat if p not in params]
        if unknown or len(flat) != len(params):
            raise ValueError(f"the checkpoint's weights do not fit {source / VAE}: {unknown[:5]}")
        for path, value in flat:
            value = value.get_value() if isinstance(value, nnx.Variable) else value
            params[path].set_value(jnp.asarray(np.asarray(jax.device_get(value), np.float32)))
        factor = scaling_factor(vae, images)
        vae.config = dataclasses.replace(vae.config, scaling_factor=factor)
    with atomic_folder(output, overwrite=overwrite) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(VAE))
        xdyna_jax.save(vae, tmp / VAE)
        manifest = json.loads((source / MANIFEST).read_text())
        manifest.update(
            converter="xdyna_jax.training", step=int(step), weights="ema" if ema else "trained",
            trainable="vae", init=run["init"], vae_scaling_factor=factor,
        )  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return output
