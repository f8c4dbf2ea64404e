"""Model bundles: a directory holding `model.json` (kind + config) and the weights (orbax).

    xdyna_jax.save(module, "out/unet")
    unet = xdyna_jax.load("out/unet")                                   # host-local arrays
    unet = xdyna_jax.load("out/unet", sharding=NamedSharding(mesh, P()))  # every param on that sharding
    unet = xdyna_jax.load("out/unet", sharding=lambda path, shape: ...)  # per-parameter placement

A bundle appears atomically: it is written to a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from xdyna_jax.nn.shape_only import shape_only_model
from xdyna_jax.nn.compute import Compute

FORMAT_VERSION = 1

# kind -> (module path, config class, model class); imported lazily so loading a VAE needs no UNet code.
KINDS: dict[str, tuple[str, str, str]] = {
    "unet": ("xdyna_jax.models.unet", "UNetConfig", "UNet"),
    # the same class with a video config (adapter, motion modules, GroupNorm over frames)
    "video_unet": ("xdyna_jax.models.unet", "UNetConfig", "UNet"),
    "vae": ("xdyna_jax.models.vae", "VAEConfig", "AutoencoderKL"),
    "clip_text": ("xdyna_jax.models.clip_text", "CLIPTextConfig", "CLIPTextModel"),
    "clip_vision": ("xdyna_jax.models.clip_vision", "CLIPVisionConfig", "CLIPVisionModelWithProjection"),
    "resampler": ("xdyna_jax.models.resampler", "ResamplerConfig", "Resampler"),
    "controlnet": ("xdyna_jax.models.controlnet", "ControlNetConfig", "ControlNetModel"),
}

Sharding = jax.sharding.Sharding | Callable[[tuple, tuple], jax.sharding.Sharding] | None


class BundleError(Exception):
    """A bundle directory that cannot be read (missing, wrong kind, corrupt)."""


def _classes(kind: str):
    if kind not in KINDS:
        raise BundleError(f"unknown bundle kind {kind!r}; known kinds: {sorted(KINDS)}")
    mod, cfg_name, model_name = KINDS[kind]
    module = importlib.import_module(mod)
    return getattr(module, cfg_name), getattr(module, model_name)


def kind_of(module: nnx.Module) -> str:
    if type(module).__name__ == "UNet" and getattr(module.config, "is_video", False):
        return "video_unet"
    for kind, (mod, _, model_name) in KINDS.items():
        if type(module).__module__ == mod and type(module).__name__ == model_name:
            return kind
    raise BundleError(
        f"cannot save a {type(module).__name__}: not a registered bundle kind ({sorted(KINDS)})"
    )


def save(module: nnx.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `module` (config + float32 params) as a bundle at `path`; returns the path."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    meta = {"format_version": FORMAT_VERSION, "kind": kind_of(module), "config": module.config.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "weights", params)
        checkpointer.wait_until_finished()
        (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | os.PathLike) -> dict:
    meta_file = Path(path) / "model.json"
    if not meta_file.is_file():
        raise BundleError(f"{path} is not a model bundle: {meta_file} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{meta_file} is not valid JSON: {e}") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{meta_file}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return meta


def build_abstract(path: str | os.PathLike, compute: Compute | None = None) -> nnx.Module:
    """The bundle's module with shapes only (no weights allocated), e.g. to plan shardings."""
    meta = read_meta(path)
    cfg_cls, model_cls = _classes(meta["kind"])
    config = cfg_cls.from_dict(meta["config"])
    if compute is not None:
        config = dataclasses.replace(config, compute=compute)
    return shape_only_model(model_cls, config)


def _target(abstract_params: dict, sharding: Sharding) -> dict:
    def leaf(path, x):
        names = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        s = sharding(names, x.shape) if callable(sharding) else sharding
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    if sharding is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), abstract_params
        )
    return jax.tree_util.tree_map_with_path(leaf, abstract_params)


def load(
    path: str | os.PathLike,
    *,
    sharding: Sharding = None,
    compute: Compute | None = None,
    expected_kind: str | None = None,
) -> nnx.Module:
    """Rebuild the module saved at `path` and restore its weights.

    sharding: None (first device), one Sharding for every param, or `f(param_path, shape) -> Sharding`.
    compute:  override the saved compute settings (dtype, precision, attention backend).
    """
    path = Path(path).absolute()
    meta = read_meta(path)
    if expected_kind is not None and meta["kind"] != expected_kind:
        raise BundleError(f"{path} holds a {meta['kind']!r} bundle, expected {expected_kind!r}")
    model = build_abstract(path, compute)
    state = nnx.state(model, nnx.Param)
    abstract = nnx.to_pure_dict(state)
    try:
        restored = ocp.StandardCheckpointer().restore(path / "weights", _target(abstract, sharding))
    except Exception as e:  # orbax raises many types; one message naming the bundle is what users need
        raise BundleError(f"cannot restore weights of {path}: {e}") from e
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model
