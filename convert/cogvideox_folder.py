"""CogVideoX-family diffusers pipeline folders <-> pipeline bundles, streamed tensor by tensor.

Shared by `python -m convert cogvideox` (stock CogVideoX / CogVideoX1.5 (-I2V)) and `python -m convert
dynamictrl` (the same folder with a DynamiCtrl transformer). A folder holds model_index.json, transformer/,
vae/, text_encoder/ (config.json + `*.safetensors` or shards + index.json each), tokenizer/ and scheduler/.
The output holds one model bundle per network, the tokenizer files, the scheduler config and manifest.json
(pipeline kind, param dtype, source files, ignored and tied keys, the source's configs and model_index.json,
which export writes back).

Memory: a model is never materialised twice. Every part is first checked from its config and safetensors
headers alone (names, shapes, dtypes; no data read), so a wrong folder fails in seconds and before anything
is written. Then its tensors are read one at a time into the parameters of a shape-only model, kept in the
narrower of the stored and the requested dtype (a bf16 release stays bf16 in memory even for `--dtype fp32`:
the bundle writer widens each tensor as it writes it), and the bundle is written from those host arrays.
Each part is freed before the next is read, so the peak is about one transformer plus a few hundred MB.
Export reads a bundle's arrays in their stored dtype and writes each tensor out and drops it.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flax import nnx

import xdyna_jax
from convert.io import (
    ConversionError,
    SafetensorsWeights,
    atomic_output_dir,
    find_safetensors_weights,
    key_list,
    parse_size,
    read_json,
    release_memory,
    write_json,
    write_manifest,
    write_sharded_safetensors,
)
from convert.state import to_flax_layout, to_torch_layout, torch_key
from xdyna_jax.bundle import BundleError, build_abstract, read_meta, read_params
from xdyna_jax.nn.shape_only import shape_only_model

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
# diffusers' and transformers' default shard size when saving these models (the release's files)
DEFAULT_MAX_SHARD = "5GB"
_CONTROL_KEY = re.compile(r"\.control_norm1\.")


@dataclasses.dataclass(frozen=True)
class PartSpec:
    """How one network of the folder is read: where, as which bundle kind, which keys are not parameters."""

    folder: str  # sub-folder of the pipeline folder (transformer, vae, text_encoder)
    kind: str  # bundle kind (xdyna_jax.bundle.KINDS)
    stem: str  # weights file stem: diffusion_pytorch_model (diffusers) or model (transformers)
    foreign: str  # the config.json dialect: "diffusers" or "transformers"
    ignore: tuple[str, ...] = ()  # regexes of source keys that are not parameters
    tied: tuple[tuple[str, str], ...] = ()  # (alias, canonical): alias may repeat canonical's values

    def classes(self):
        from xdyna_jax.bundle import KINDS

        if self.kind not in KINDS:
            raise ConversionError(f"bundle kind {self.kind!r} is not registered in xdyna_jax.bundle.KINDS")
        module, config_name, model_name = KINDS[self.kind]
        mod = importlib.import_module(module)
        return getattr(mod, config_name), getattr(mod, model_name)


def _t5_tied() -> tuple[tuple[str, str], ...]:
    from xdyna_jax.models.t5 import SHARED_KEY, TIED_EMBEDDING_KEY

    return ((TIED_EMBEDDING_KEY, SHARED_KEY),)


def part_specs(kind: str) -> dict[str, PartSpec]:
    """The networks of a `kind` ("cogvideox" or "dynamictrl") pipeline folder."""
    transformer = "dynamictrl_transformer" if kind == "dynamictrl" else "cogvideox_transformer"
    return {
        "transformer": PartSpec("transformer", transformer, "diffusion_pytorch_model", "diffusers"),
        "vae": PartSpec("vae", "cogvideox_vae", "diffusion_pytorch_model", "diffusers"),
        "text_encoder": PartSpec("text_encoder", "t5_encoder", "model", "transformers", tied=_t5_tied()),
    }


# --------------------------------------------------------------------------------------------- planning


@dataclasses.dataclass
class PartPlan:
    """One network checked from its headers: the shape-only model and which source key fills which param."""

    name: str
    spec: PartSpec
    folder: Path
    source_config: dict
    model: nnx.Module
    weights: SafetensorsWeights
    targets: dict[str, tuple]  # source key -> param path
    ignored: list[str]
    aliases: dict[str, str]  # alias key present in the files -> its canonical key

    @property
    def source(self) -> str:
        return str(self.weights.path)


def read_foreign_config(spec: PartSpec, path: Path):
    config_cls, _ = spec.classes()
    raw = read_json(path, "config")
    try:
        if spec.foreign == "transformers" and hasattr(config_cls, "from_transformers"):
            return raw, config_cls.from_transformers(raw)
        if hasattr(config_cls, "from_diffusers"):
            return raw, config_cls.from_diffusers(raw)
        return raw, config_cls.from_foreign(raw, None)
    except (TypeError, ValueError, KeyError) as e:
        raise ConversionError(f"{path}: {e}") from e


def plan_part(name: str, spec: PartSpec, folder: Path, hints: Iterable = ()) -> PartPlan:
    """Check `folder` (config.json + safetensors) against spec's model without reading any tensor data.

    Every source key must fill a parameter of the same shape or be ignored / a tied alias, and every
    parameter must be filled; otherwise one ConversionError lists the missing, unexpected and mis-shaped
    keys. `hints` are callables (missing, unexpected) -> str | None that explain a typical mix-up.
    """
    if not folder.is_dir():
        raise ConversionError(f"missing part folder {folder} ({name}: config.json + safetensors weights)")
    raw, config = read_foreign_config(spec, folder / "config.json")
    weights = find_safetensors_weights(folder, spec.stem)
    _, model_cls = spec.classes()
    model = shape_only_model(model_cls, config)
    params = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    by_key = {torch_key(p): p for p in params}
    ignore = [re.compile(p) for p in spec.ignore]
    aliases = {a: c for a, c in spec.tied if a in weights.shapes}
    for alias, canonical in list(aliases.items()):
        if canonical not in weights.shapes:  # only the alias is stored: it is the table
            del aliases[alias]
            by_key[alias] = by_key.pop(canonical)
        else:
            _check_tied(weights, alias, canonical)
    missing, mis_shaped, targets = [], [], {}
    for key, path in by_key.items():
        if key not in weights.shapes:
            missing.append(key)
            continue
        target = params[path]
        file_shape = weights.shapes[key]
        flax_shape = to_flax_layout(path[-1], np.empty(file_shape, np.bool_), len(target.shape)).shape
        if tuple(flax_shape) != tuple(target.shape):
            model_shape = to_torch_layout(path[-1], np.empty(target.shape, np.bool_)).shape
            mis_shaped.append(f"{key}: file {file_shape} vs model {tuple(model_shape)}")
            continue
        if not np.issubdtype(weights.dtypes[key], np.floating) and weights.dtypes[key].name != "bfloat16":
            mis_shaped.append(f"{key}: file dtype {weights.dtypes[key]} is not floating point")
            continue
        targets[key] = path
    known = set(by_key) | set(aliases)
    unexpected = [k for k in weights.shapes if k not in known and not any(r.search(k) for r in ignore)]
    ignored = sorted(k for k in weights.shapes if k not in known and k not in unexpected)
    if missing or unexpected or mis_shaped:
        notes = [h(missing, unexpected) for h in hints]
        raise ConversionError(
            f"{weights.path} ({name}): the weights do not match the model of {folder / 'config.json'}"
            + "".join(f"\n  {n}" for n in notes if n)
            + _listing("missing keys", sorted(missing))
            + _listing("unexpected keys", sorted(unexpected))
            + _listing("mis-shaped keys", mis_shaped)
        )
    return PartPlan(name, spec, folder, raw, model, weights, targets, ignored, aliases)


def _check_tied(weights: SafetensorsWeights, alias: str, canonical: str) -> None:
    """Both copies of a tied table are stored: they must be the same (reads just these two tensors)."""
    same = (
        weights.shapes[alias] == weights.shapes[canonical]
        and weights.dtypes[alias] == weights.dtypes[canonical]
    )
    if same:
        tables = dict(weights.tensors([alias, canonical]))
        same = np.array_equal(tables[alias].view(np.uint8), tables[canonical].view(np.uint8))
    if not same:
        raise ConversionError(
            f"{weights.path}: {alias} and {canonical} are tied (one table in transformers) but hold "
            "different values; the file is inconsistent"
        )


def _listing(title: str, items: list[str]) -> str:
    return f"\n  {title}: {key_list(items)}" if items else ""


def control_hint(kind: str, transformer: Path):
    """Explain a stock transformer given to `convert dynamictrl`, or a DynamiCtrl one to `convert cogvideox`."""

    def hint(missing: list[str], unexpected: list[str]) -> str | None:
        if kind == "dynamictrl" and any(_CONTROL_KEY.search(k) for k in missing):
            return (
                f"the control_norm1 (Pose-adaptive LayerNorm) keys are missing from {transformer}: it looks like "
                "a stock CogVideoX transformer; convert that with `python -m convert cogvideox`"
            )
        if kind == "cogvideox" and any(_CONTROL_KEY.search(k) for k in unexpected):
            return (
                f"{transformer} holds control_norm1 (Pose-adaptive LayerNorm) keys: it is a DynamiCtrl "
                "transformer; convert it with `python -m convert dynamictrl`"
            )
        return None

    return hint


# --------------------------------------------------------------------------------------------- filling


def _hold_dtype(stored: np.dtype, wanted: np.dtype) -> np.dtype:
    """Keep the narrower dtype in memory: narrowing happens on read, widening when the bundle is written."""
    return stored if stored == wanted or stored.itemsize < wanted.itemsize else wanted


def fill(plan: PartPlan, param_dtype: str) -> nnx.Module:
    """Read the plan's tensors one at a time into its model's params (host numpy arrays)."""
    import jax.numpy as jnp

    wanted = np.dtype(jnp.dtype(param_dtype))
    params = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(plan.model, nnx.Param))}
    for key, value in plan.weights.tensors(list(plan.targets)):
        path = plan.targets[key]
        target = params[path]
        value = to_flax_layout(path[-1], value, len(target.shape))
        hold = _hold_dtype(value.dtype, wanted)
        if value.dtype != hold:
            value = value.astype(hold)
        target.set_value(value)
        del value
    return plan.model


def save_part(plan: PartPlan, out: Path, param_dtype: str) -> dict:
    """Fill the plan's model, write its bundle at `out`, free it; returns the part's manifest entry."""
    model = fill(plan, param_dtype)
    xdyna_jax.save(model, out, param_dtype=param_dtype)
    entry = {
        "files": [str(f.absolute()) for f in plan.weights.shard_files],
        "config": plan.source_config,
        "ignored_keys": plan.ignored,
        "tied_keys": sorted(plan.aliases),
    }
    del model
    plan.model = None  # the filled arrays go before the next part is read
    _release_if_large(sum(plan.weights.nbytes(k) for k in plan.weights.shapes))
    return entry


def _release_if_large(nbytes: int) -> None:
    """Hand a large part's freed memory back before the next part (gc over a big heap costs ~0.3 s)."""
    if nbytes > 2**28:
        release_memory()


# --------------------------------------------------------------------------------------------- folders


def _check_tokenizer(folder: Path) -> None:
    from xdyna_jax.conditioning.t5_tokenizer import T5Tokenizer

    try:
        T5Tokenizer.from_folder(folder)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConversionError(f"tokenizer {folder}: {e}") from e


def _check_scheduler(path: Path) -> dict:
    from xdyna_jax.schedulers.cogvideox import CogVideoXSchedulerConfig

    raw = read_json(path, "scheduler config")
    try:
        CogVideoXSchedulerConfig.from_diffusers(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise ConversionError(f"{path}: {e}") from e
    return raw


def convert_pipeline_folder(
    kind: str,
    input: str | Path,
    output: str | Path,
    *,
    transformer: str | Path | None = None,
    dtype: str = "bf16",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """A CogVideoX-family diffusers pipeline folder -> a `kind` pipeline bundle at `output`.

    transformer: a folder (config.json + weights at its root) used instead of input/transformer/
                 (DynamiCtrl's Mask variants ship only a transformer).
    dtype:       "bf16" (the release's dtype, the default) or "fp32" (every parameter widened exactly).
    """
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: use one of {sorted(DTYPES)}")
    param_dtype = DTYPES[dtype]
    src = Path(input)
    if not src.is_dir():
        raise ConversionError(f"--input: no such folder {src}")
    model_index = read_json(src / "model_index.json", "pipeline index (a diffusers pipeline folder's)")
    specs = part_specs(kind)
    folders = {name: src / spec.folder for name, spec in specs.items()}
    if transformer is not None:
        folders["transformer"] = Path(transformer)
        if not folders["transformer"].is_dir():
            raise ConversionError(f"--transformer: no such folder {transformer}")
    hints = {"transformer": [control_hint(kind, folders["transformer"])]}
    for extra in ("tokenizer", "scheduler"):
        if not (src / extra).is_dir():
            raise ConversionError(f"missing part folder {src / extra} of the pipeline folder {src}")
    # everything is checked before any tensor is read or any file written
    plans = {name: plan_part(name, specs[name], folders[name], hints.get(name, ())) for name in specs}
    _check_tokenizer(src / "tokenizer")
    scheduler = _check_scheduler(src / "scheduler" / "scheduler_config.json")

    manifest = {
        "kind": kind,
        "converter": kind,
        "source": str(src.absolute()),
        "param_dtype": param_dtype,
        "model_index": model_index,
        "parts": {},
    }
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        for name in tqdm(list(plans), desc=f"convert {kind}", disable=not progress):
            manifest["parts"][name] = save_part(plans.pop(name), tmp / name, param_dtype)
        shutil.copytree(src / "tokenizer", tmp / "tokenizer")
        manifest["parts"]["tokenizer"] = {"folder": str((src / "tokenizer").absolute())}
        write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
        manifest["parts"]["scheduler"] = {
            "file": str((src / "scheduler" / "scheduler_config.json").absolute())
        }
        write_manifest(tmp, manifest)
    return Path(output)


def add_arguments(p, *, transformer_option: bool) -> None:
    p.add_argument(
        "--input", required=True, help="the diffusers pipeline folder (model_index.json, transformer/, ...)"
    )
    if transformer_option:
        p.add_argument(
            "--transformer",
            help="a transformer folder (config.json + shards) replacing input/transformer/, e.g. Dynamictrl-Mask_C01/",
        )
    p.add_argument("--output", required=True, help="output folder (the pipeline bundle)")
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="bf16",
        help="parameter dtype of the bundles (default bf16, the release's; fp32 widens exactly)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


# --------------------------------------------------------------------------------------------- export

# bundle kind -> (sub-folder name, weights stem, config dialect, class name written when no source config)
EXPORT_KINDS = {
    "cogvideox_transformer": (
        "transformer",
        "diffusion_pytorch_model",
        "diffusers",
        "CogVideoXTransformer3DModel",
    ),
    "dynamictrl_transformer": (
        "transformer",
        "diffusion_pytorch_model",
        "diffusers",
        "DynamiCtrlTransformerModel",
    ),
    "cogvideox_vae": ("vae", "diffusion_pytorch_model", "diffusers", "AutoencoderKLCogVideoX"),
    "t5_encoder": ("text_encoder", "model", "transformers", "T5EncoderModel"),
}
PIPELINE_KINDS = ("cogvideox", "dynamictrl")


def bundle_state(bundle: Path) -> dict[str, np.ndarray]:
    """A bundle's params as a PyTorch-named, PyTorch-laid-out state dict in the bundle's stored dtype."""
    try:
        stored = read_meta(bundle).get("param_dtype", "float32")
        params = read_params(bundle, param_dtype=stored)
    except BundleError as e:
        raise ConversionError(str(e)) from e
    out = {}
    for path in list(params):
        value = params.pop(path)
        out[torch_key(path)] = np.ascontiguousarray(to_torch_layout(path[-1], value))
        del value
    return out


def _foreign_config(bundle: Path, kind: str, source_config: dict | None) -> dict:
    """The part's config.json: our config's fields over the source's (which keeps fields we do not model)."""
    config = build_abstract(bundle).config
    dialect, class_name = EXPORT_KINDS[kind][2], EXPORT_KINDS[kind][3]
    if dialect == "transformers":
        ours = config.to_transformers()
    else:
        ours = {**config.to_diffusers(), "_class_name": class_name}
    if source_config is None:
        return ours
    # the source's class name and version stay; every field we model is ours (they agree after a conversion)
    return {**source_config, **{k: v for k, v in ours.items() if not k.startswith("_")}}


def export_bundle(
    bundle: Path, out: Path, *, source_config: dict | None = None, max_shard: str = DEFAULT_MAX_SHARD
) -> str:
    """One CogVideoX-family model bundle -> config.json + safetensors (sharded past max_shard) in `out`."""
    try:
        kind = read_meta(bundle)["kind"]
    except BundleError as e:
        raise ConversionError(str(e)) from e
    if kind not in EXPORT_KINDS:
        raise ConversionError(f"{bundle} holds a {kind!r} bundle, not one of {sorted(EXPORT_KINDS)}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", _foreign_config(bundle, kind, source_config))
    state = bundle_state(bundle)
    nbytes = sum(v.nbytes for v in state.values())
    write_sharded_safetensors(state, out, EXPORT_KINDS[kind][1], parse_size(max_shard))
    _release_if_large(nbytes)
    return kind


def export_pipeline_folder(
    src: Path, output: Path, *, overwrite: bool = False, max_shard: str = DEFAULT_MAX_SHARD
) -> Path:
    """A `cogvideox` / `dynamictrl` pipeline bundle -> the diffusers pipeline folder it came from."""
    from xdyna_jax.sampling.bundles import read_manifest

    try:
        manifest = read_manifest(src)
    except BundleError as e:
        raise ConversionError(str(e)) from e
    kind = manifest["kind"]
    if kind not in PIPELINE_KINDS:
        raise ConversionError(f"{src} is a {kind!r} pipeline bundle, not one of {list(PIPELINE_KINDS)}")
    parts = manifest.get("parts", {})
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        for name in ("transformer", "vae", "text_encoder"):
            if not (src / name / "model.json").is_file():
                raise ConversionError(f"{src} is missing its {name}/ bundle")
            export_bundle(
                src / name, tmp / name, source_config=parts.get(name, {}).get("config"), max_shard=max_shard
            )
        for name in ("tokenizer", "scheduler"):
            if (src / name).is_dir():
                shutil.copytree(src / name, tmp / name)
        write_json(tmp / "model_index.json", manifest.get("model_index") or _MODEL_INDEX)
    return output


# written when a manifest carries no model_index.json of its source
_MODEL_INDEX = {
    "_class_name": "CogVideoXImageToVideoPipeline",
    "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLCogVideoX"],
}
