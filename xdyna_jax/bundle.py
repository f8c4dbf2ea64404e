"""Model bundles: a directory holding `model.json` (kind + config) and the weights (orbax).

    xdyna_jax.save(module, "out/unet")
    unet = xdyna_jax.load("out/unet")                                   # host-local arrays
    unet = xdyna_jax.load("out/unet", sharding=NamedSharding(mesh, P()))  # every param on that sharding
    unet = xdyna_jax.load("out/unet", sharding=lambda path, shape: ...)  # per-parameter placement
    unet = xdyna_jax.load("out/unet", sharding=LogicalSharding(mesh, rules))  # by logical axis names
    unet = xdyna_jax.load("out/unet", sharding=param_shardings(abstract, mesh, rules))  # a tree of them
    unet = xdyna_jax.load("out/unet", param_dtype="bfloat16")         # cast while restoring

A bundle appears atomically: it is written to a temporary sibling directory and renamed into place.
`model.json` records the stored parameter dtype (`param_dtype`, float32 when absent).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from xdyna_jax.io.atomic import atomic_folder
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model
from xdyna_jax.sharding import LogicalSharding

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
    # CogVideoX / DynamiCtrl (convert cogvideox / convert dynamictrl)
    "cogvideox_transformer": ("xdyna_jax.models.cogvideox", "CogVideoXConfig", "CogVideoXTransformer3DModel"),
    "dynamictrl_transformer": (
        "xdyna_jax.models.dynamictrl",
        "CogVideoXConfig",
        "DynamiCtrlTransformerModel",
    ),
    "cogvideox_vae": ("xdyna_jax.models.vae_cogvideox", "CogVideoXVAEConfig", "AutoencoderKLCogVideoX"),
    "t5_encoder": ("xdyna_jax.models.t5", "T5Config", "T5EncoderModel"),
}

# One sharding for all, a function of (param path, shape), a tree of shardings shaped like the params (a
# nested dict or an nnx.State), or the logical-axis rules on a mesh.
Sharding = (
    jax.sharding.Sharding
    | Callable[[tuple, tuple], jax.sharding.Sharding]
    | dict
    | nnx.State
    | LogicalSharding
    | None
)

PARAM_DTYPES = ("float32", "bfloat16", "float16")
# Bytes orbax may hold in flight while writing / reading: bounds the transient copies of a multi-GB model
# (a restore that casts reads each tensor in its stored dtype before casting it).
_CONCURRENT_GB = 1
# numpy params are written in batches of about this many bytes (see _HostArrayHandler)
_WRITE_BATCH_BYTES = 256 * 2**20


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


class _HostArrayHandler(ocp.type_handlers.NumpyHandler):
    """Writes numpy params in place and a bounded batch at a time.

    orbax's numpy handler deep-copies every array first and then writes all of them at once, each write
    holding its own encoded copy: a full second copy of the model, where the converters need one (their
    params are views of the checkpoint's tensors). Writing batch after batch bounds the extra memory by the
    batch size. orbax-checkpoint is pinned, so reusing its per-batch writer is safe.
    """

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def _background_serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        batch, size = [], 0
        for item in zip(values, infos, args, strict=True):
            batch.append(item)
            size += item[0].nbytes
            if size >= _WRITE_BATCH_BYTES:
                await super()._background_serialize(*map(list, zip(*batch, strict=True)))
                batch, size = [], 0
        if batch:
            await super()._background_serialize(*map(list, zip(*batch, strict=True)))


def _checkpointer() -> ocp.Checkpointer:
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, _HostArrayHandler()),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )
    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=_CONCURRENT_GB,
        restore_concurrent_gb=_CONCURRENT_GB,
        type_handler_registry=registry,
    )
    return ocp.Checkpointer(handler)


def _check_dtype(param_dtype: str, what: str) -> str:
    if param_dtype not in PARAM_DTYPES:
        raise BundleError(f"{what}: param_dtype {param_dtype!r} is not one of {list(PARAM_DTYPES)}")
    return param_dtype


def _stored_dtype(params: dict) -> str:
    """The one floating dtype the params hold (a bundle records a single param_dtype)."""
    dtypes = {jnp.dtype(x.dtype).name for x in jax.tree_util.tree_leaves(params)}
    if len(dtypes) != 1:
        raise BundleError(f"params hold several dtypes {sorted(dtypes)}; pass param_dtype= to store one")
    return _check_dtype(dtypes.pop(), "save")


def save(
    module: nnx.Module,
    path: str | os.PathLike,
    *,
    param_dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `module` (config + params) as a bundle at `path`; returns the path.

    Params are stored in the dtype they hold, or cast to `param_dtype` tensor by tensor while writing.
    numpy params (what the converters build) are written without a device copy.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    stored = _check_dtype(param_dtype, f"save {path}") if param_dtype else _stored_dtype(params)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind_of(module),
        "param_dtype": stored,
        "config": module.config.to_dict(),
    }
    save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(dtype=jnp.dtype(stored)), params)
    with atomic_folder(path, overwrite=overwrite) as tmp:
        checkpointer = _checkpointer()
        checkpointer.save(tmp / "weights", args=ocp.args.PyTreeSave(params, save_args=save_args))
        (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_bundle_json(path: str | os.PathLike, name: str, what: str) -> dict:
    """`path/name` as a JSON object; a missing or malformed file is one BundleError naming it."""
    file = Path(path) / name
    if not file.is_file():
        raise BundleError(f"{path} is not a {what}: {file} is missing")
    try:
        obj = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise BundleError(f"{file} holds a JSON {type(obj).__name__}, not an object")
    return obj


def read_meta(path: str | os.PathLike) -> dict:
    meta_file = Path(path) / "model.json"
    meta = read_bundle_json(path, "model.json", "model bundle")
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


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def _sharding_tree(tree: dict | nnx.State, abstract_params: dict, where: Path) -> dict:
    """A tree of shardings as {param path: sharding}, checked to cover exactly the bundle's params."""
    pure = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
    flat = {_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(pure)[0]}
    wanted = {_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    missing, extra = sorted(wanted - set(flat), key=str), sorted(set(flat) - wanted, key=str)
    if missing or extra:
        raise BundleError(
            f"load {where}: the sharding tree does not match the bundle's params "
            f"(missing {['.'.join(map(str, k)) for k in missing[:3]]}, "
            f"unexpected {['.'.join(map(str, k)) for k in extra[:3]]})"
        )
    for keys, s in flat.items():
        if not isinstance(s, jax.sharding.Sharding):
            raise BundleError(
                f"load {where}: sharding for {'.'.join(map(str, keys))} is a {type(s).__name__}"
            )
    return flat


def _target(abstract_params: dict, sharding: Sharding, dtype: str, where: Path) -> dict:
    """What each param is restored as: its shape, the wanted dtype (orbax casts on read), its placement."""
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if sharding is None else None
    per_leaf = (
        _sharding_tree(sharding, abstract_params, where) if isinstance(sharding, dict | nnx.State) else None
    )

    def leaf(path, x):
        if single is not None:
            s = single
        elif per_leaf is not None:
            s = per_leaf[_keys(path)]
        elif callable(sharding):
            s = sharding(_keys(path), x.shape)
        else:
            s = sharding
        return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=s)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params)


def _restore(path: Path, target: dict, restore_args: dict) -> dict:
    try:
        return _checkpointer().restore(
            path / "weights", args=ocp.args.PyTreeRestore(target, restore_args=restore_args)
        )
    except Exception as e:  # orbax raises many types; one message naming the bundle is what users need
        raise BundleError(f"cannot restore weights of {path}: {e}") from e


def _dtypes(path: Path, meta: dict, param_dtype: str | None) -> str:
    stored = _check_dtype(meta.get("param_dtype", "float32"), str(path / "model.json"))
    return _check_dtype(param_dtype, f"load {path}") if param_dtype else stored


def _checked_meta(path: Path, expected_kind: str | None) -> dict:
    meta = read_meta(path)
    if expected_kind is not None and meta["kind"] != expected_kind:
        raise BundleError(f"{path} holds a {meta['kind']!r} bundle, expected {expected_kind!r}")
    return meta


def load(
    path: str | os.PathLike,
    *,
    sharding: Sharding = None,
    compute: Compute | None = None,
    expected_kind: str | None = None,
    param_dtype: str | None = None,
) -> nnx.Module:
    """Rebuild the module saved at `path` and restore its weights.

    sharding:    None (first device), one Sharding for every param, `f(param_path, shape) -> Sharding`, a
                 tree of Shardings with the params' structure (`xdyna_jax.sharding.param_shardings`), or
                 `LogicalSharding(mesh, rules)`: each param placed by its logical axis names. Each device
                 reads only its own shards, so a model larger than one host's memory restores directly.
    compute:     override the saved compute settings (dtype, precision, attention backend).
    param_dtype: the params' dtype after loading (default: as stored); each tensor is cast as it is read,
                 so a float32 bundle loaded as bfloat16 never holds a float32 copy of the whole model.
    """
    path = Path(path).absolute()
    wanted = _dtypes(path, _checked_meta(path, expected_kind), param_dtype)
    model = build_abstract(path, compute)
    state = nnx.state(model, nnx.Param)
    if isinstance(sharding, LogicalSharding):
        sharding = sharding.shardings(state)
    target = _target(nnx.to_pure_dict(state), sharding, wanted, path)
    restored = _restore(path, target, ocp.checkpoint_utils.construct_restore_args(target))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def read_params(
    path: str | os.PathLike, *, expected_kind: str | None = None, param_dtype: str | None = None
) -> dict[tuple, np.ndarray]:
    """The bundle's params as host numpy arrays, `{param path: array}`, with no module and no device copy.

    For tools that rewrite weights (exporters): they can drop each array as soon as it is written out.
    """
    path = Path(path).absolute()
    wanted = np.dtype(jnp.dtype(_dtypes(path, _checked_meta(path, expected_kind), param_dtype)))
    abstract = nnx.to_pure_dict(nnx.state(build_abstract(path), nnx.Param))
    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=wanted), abstract)
    restored = _restore(path, abstract, args)
    return {
        tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keys): leaf
        for keys, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]
    }
