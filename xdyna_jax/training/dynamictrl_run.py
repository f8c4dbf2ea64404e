"""What a DynamiCtrl fine-tuning run adds to the training loop: the transformer from the init bundle, batches of
precomputed latents, and the exported pipeline bundle.

    python train.py --config dynamictrl --init dynamictrl=bundles/dynamictrl --data data/dynamictrl \\
        --output runs/dynamictrl

`--init dynamictrl=DIR` is a DynamiCtrl pipeline bundle (`python -m convert dynamictrl`, or one a run
exported). Its transformer is the starting point (read straight onto its FSDP shards, float32 master
weights); its VAE, T5 and tokenizer never enter training: `--data` is a dataset of precomputed latents and
text embeddings (`python -m xdyna_jax.data.prepare --model dynamictrl`, or any folder of `.npz` examples with
the keys of `training/dynamictrl_objective.py`). The examples' shapes are checked against the run's config
and the transformer before anything is compiled. The exported bundle is the init bundle with the transformer
replaced: vae/, text_encoder/, tokenizer/ and scheduler/ are copied from it, the trained transformer is
written in the dtype the init's was stored in (bf16 for the release), so `sample.py` and
`DynamiCtrlPipeline.load` read it as they read a converted release.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import xdyna_jax
from xdyna_jax.bundle import BundleError, read_meta
from xdyna_jax.io.atomic import atomic_folder
from xdyna_jax.models.cogvideox import CogVideoXConfig
from xdyna_jax.models.vae_cogvideox import CogVideoXVAEConfig
from xdyna_jax.nn.compute import Compute
from xdyna_jax.sharding import LogicalSharding
from xdyna_jax.training.batch import BATCH_AXES, BatchError, batch_sharding
from xdyna_jax.training.dynamictrl_objective import DYNAMICTRL_BATCH_KEYS
from xdyna_jax.training.init import InitError

TRANSFORMER_KIND = "dynamictrl_transformer"
# copied from the init bundle into the exported one (the frozen parts and the sampler's settings)
COPIED = ("vae", "text_encoder", "tokenizer", "scheduler")


def init_bundle(init: dict[str, str]) -> Path:
    """The `--init dynamictrl=` folder, checked to be a DynamiCtrl pipeline bundle with every part."""
    if "dynamictrl" not in init:
        raise InitError("a DynamiCtrl run starts from --init dynamictrl=DIR (a `convert dynamictrl` bundle)")
    path = Path(init["dynamictrl"])
    try:
        kind = json.loads((path / "manifest.json").read_text()).get("kind")
    except (OSError, ValueError) as e:
        raise InitError(f"--init dynamictrl={path}: no readable manifest.json ({e})") from e
    if kind != "dynamictrl":
        raise InitError(f"--init dynamictrl={path}: a {kind!r} pipeline bundle, expected 'dynamictrl'")
    for name in ("transformer", *COPIED):
        if not (path / name).is_dir():
            raise InitError(f"--init dynamictrl={path}: no {name}/ folder")
    return path


def _config(bundle: Path, part: str, kind: str, config_cls):
    try:
        meta = read_meta(bundle / part)
    except BundleError as e:
        raise InitError(str(e)) from e
    if meta["kind"] != kind:
        raise InitError(f"{bundle / part} holds a {meta['kind']!r} bundle, expected {kind!r}")
    return config_cls.from_dict(meta["config"])


def load_transformer(bundle: Path, compute: Compute, sharding: LogicalSharding | None):
    """The init bundle's transformer in float32 (the master weights), each parameter on its shards."""
    try:
        return xdyna_jax.load(
            bundle / "transformer",
            sharding=sharding,
            compute=compute,
            expected_kind=TRANSFORMER_KIND,
            param_dtype="float32",
        )
    except BundleError as e:
        raise InitError(str(e)) from e


def example_shapes(cfg, bundle: Path) -> dict[str, tuple[int, ...]]:
    """The shape of each key of one example for the run's frames, height and width and the bundle's
    transformer and VAE."""
    dit = _config(bundle, "transformer", TRANSFORMER_KIND, CogVideoXConfig)
    vae = _config(bundle, "vae", "cogvideox_vae", CogVideoXVAEConfig)
    frames, height, width = int(cfg.frames), int(cfg.height), int(cfg.width)
    s, t = vae.spatial_scale, vae.temporal_compression_ratio
    multiple = s * dit.patch_size
    if frames < 1 or (frames - 1) % t or height % multiple or width % multiple:
        raise BatchError(
            f"config frames={frames}, height={height}, width={width}: frames must be 1 + {t}k and the sizes "
            f"multiples of {multiple} (the VAE's {s} x the transformer's patch {dit.patch_size})"
        )
    latent = ((frames - 1) // t + 1, height // s, width // s, dit.out_channels)
    if latent[0] % (dit.patch_size_t or 1):
        raise BatchError(
            f"config frames={frames} gives {latent[0]} latent frames; the transformer's temporal patch "
            f"{dit.patch_size_t} needs a multiple of it (the release's 37 gives 10)"
        )
    return {
        "latents": latent,
        "image_latents": (1, *latent[1:]),
        "pose_latents": latent,
        "text": (dit.max_text_seq_length, dit.text_embed_dim),
    }


def check_dataset(folder: str | Path, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """A prepared dataset's recorded shapes against the run's (nothing read beyond dataset.json); folders of
    bare `.npz` examples are checked example by example as they are batched."""
    from xdyna_jax.data.prepare_dynamictrl import EXAMPLE_KEYS, read_dataset_info

    info = read_dataset_info(folder)
    if info is None:
        return
    recorded = {k: tuple(info["shapes"][k]) for k in EXAMPLE_KEYS}
    bad = [f"{k} {recorded[k]} vs {shapes[k]}" for k in EXAMPLE_KEYS if recorded[k] != shapes[k]]
    if bad:
        raise BatchError(
            f"{what} {folder} was prepared at {info['frames']} frames {info['height']}x{info['width']}; its "
            f"examples do not fit this run's config and transformer: {'; '.join(bad)}"
        )


class DynamiCtrlBatchBuilder:
    """`builder(examples, key) -> batch`: this process's examples stacked and assembled into global arrays
    split over the batch axes (`key` is unused: the examples were drawn when the dataset was prepared)."""

    def __init__(self, global_batch: int, shapes: dict[str, tuple[int, ...]], mesh):
        shards = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)
        if global_batch % shards or global_batch % jax.process_count():
            raise BatchError(
                f"batch_size {global_batch} does not split over the mesh's {shards} batch shards "
                f"(axes {BATCH_AXES}) and {jax.process_count()} processes"
            )
        self.global_batch, self.shapes = global_batch, shapes
        self.local_batch = global_batch // jax.process_count()
        self.sharding = batch_sharding(mesh)

    def host_arrays(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        if len(examples) != self.local_batch:
            raise BatchError(f"got {len(examples)} examples, this process's share is {self.local_batch}")
        out = {k: [] for k in DYNAMICTRL_BATCH_KEYS}
        for i, example in enumerate(examples):
            where = f"example {i} of the batch" + (f" ({example['name']})" if "name" in example else "")
            for k in DYNAMICTRL_BATCH_KEYS:
                if k not in example:
                    raise BatchError(f"{where}: no {k!r} (it has {sorted(example)})")
                value = np.asarray(example[k], np.float32)
                if value.shape != self.shapes[k]:
                    raise BatchError(f"{where}: {k} must be {self.shapes[k]}, got {value.shape}")
                out[k].append(value)
        return {k: np.stack(v) for k, v in out.items()}

    def __call__(self, examples: Sequence[dict], key=None) -> dict[str, jax.Array]:
        local = self.host_arrays(examples)
        p = jax.process_count()
        return {
            k: jax.make_array_from_process_local_data(self.sharding, v, (v.shape[0] * p, *v.shape[1:]))
            for k, v in local.items()
        }


def export_dynamictrl_bundle(
    weights: nnx.State, run: dict, output: str | Path, *, step: int, ema: bool, overwrite: bool = False
) -> Path:
    """The init bundle with its transformer's weights replaced by `weights` (host or device arrays), written
    atomically to `output` (see the module docstring)."""
    output = Path(output).absolute()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists")
    bundle = init_bundle(run["init"])
    stored = read_meta(bundle / "transformer").get("param_dtype", "float32")
    with jax.default_device(jax.devices("cpu")[0]):
        model = load_transformer(bundle, Compute(), None)
        params = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        flat = [(tuple(p), v) for p, v in nnx.to_flat_state(weights)]
        unknown = [".".join(map(str, p)) for p, _ in flat if p not in params]
        if unknown:
            raise ValueError(f"trained weights the init's transformer has no place for: {unknown[:5]}")
        for path, value in flat:
            value = value.get_value() if isinstance(value, nnx.Variable) else value
            params[path].set_value(np.asarray(jax.device_get(value), np.float32))
    with atomic_folder(output, overwrite=overwrite) as tmp:
        xdyna_jax.save(model, tmp / "transformer", param_dtype=stored)
        for name in COPIED:
            shutil.copytree(bundle / name, tmp / name)
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest.update(
            converter="xdyna_jax.training",
            step=int(step),
            weights="ema" if ema else "trained",
            trainable=run["config"]["step"]["trainable"],
            init=run["init"],
        )
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return output
