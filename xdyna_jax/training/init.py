"""Where training starts: the converted bundles users already have, or an X-Dyna bundle to resume from.

Stage 1 starts as the release did (its UNet initialiser is SD 1.5 + AnimateDiff v1 + IP-Adapter-plus):

  * `motion_unet`: the video UNet bundle `python -m convert animatediff --unet <SD 1.5 unet>` writes
    (SD 1.5's weights with the AnimateDiff motion modules; the folder it writes or its unet/ bundle);
  * `ip_adapter`: the folder `python -m convert ip-adapter` writes: ip_attention.safetensors (the attn2
    `to_k_ip` / `to_v_ip` projections, PyTorch names and layout), ip_attention.json (the token count),
    resampler/ and image_encoder/ bundles;
  * the Dynamics-Adapter is new: `to_q_ff` starts as a copy of the same attn1's `to_q` and `to_out_ff` at
    zero, so the initialised UNet computes exactly SD 1.5 + AnimateDiff + IP-Adapter until it trains;
  * the pose ControlNet: a `controlnet` bundle (e.g. `convert controlnet` of control_v11p_sd15_openpose), or,
    without one, a ControlNet made from the UNet's own encoder the way ControlNets usually start (encoder
    weights copied, condition embedding fresh, zero convs at zero).

Stage 2 adds an S-Face ControlNet (6-channel condition) to a stage-1 result, from a bundle or the UNet.

Every function here takes `sharding=LogicalSharding(mesh, rules)`: then each parameter is born on its
shards (bundles restored shard by shard, each assembled value placed per parameter), so a model larger
than one device never sits whole on one; without it everything goes to the first device.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

import xdyna_jax
from xdyna_jax.bundle import BundleError, read_meta
from xdyna_jax.conditioning.clip_image import uncond_pixel_values
from xdyna_jax.models.controlnet import ControlNetConditioningEmbedding, ControlNetConfig, ControlNetModel
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.models.unet_encoder import UNetEncoderConfig
from xdyna_jax.models.xdyna import XDynaDenoiser
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model
from xdyna_jax.sampling.bundles import XDyna, load_xdyna
from xdyna_jax.sharding import LogicalSharding

IP_ATTENTION = "ip_attention.safetensors"
IP_INFO = "ip_attention.json"
# SD 1.5 ControlNets' condition embedding (pixel -> latent resolution, 8x)
SD_EMBEDDING_CHANNELS = (16, 32, 96, 256)
# The encoder fields a ControlNet shares with the UNet it feeds: its residuals are added to that UNet's skips.
ENCODER_FIELDS = tuple(f.name for f in dataclasses.fields(UNetEncoderConfig) if f.name != "compute")


class InitError(ValueError):
    """Bundles that cannot start a training run (wrong kind, missing parts, mismatched structure)."""


@dataclasses.dataclass
class TrainingModels:
    """The denoiser to train and the frozen image-prompt encoders (IP tokens, the CFG-dropout tokens)."""

    denoiser: XDynaDenoiser
    image_encoder: nnx.Module | None
    resampler: nnx.Module | None

    def null_image_tokens(self) -> jax.Array:
        """(T, D) IP tokens of the all-zero normalised image: the unconditional image prompt."""
        if self.image_encoder is None or self.resampler is None:
            raise InitError(
                "no image_encoder/resampler: cannot compute the zero-image tokens for CFG dropout"
            )
        pixels = jnp.asarray(uncond_pixel_values())
        return self.resampler(self.image_encoder(pixels).hidden_states[-2])[0]


def _bundle(path: str | Path, sub: str, what: str) -> Path:
    """A model bundle given as itself or as the converter's output folder holding it as `sub`/."""
    path = Path(path)
    for candidate in (path, path / sub):
        if (candidate / "model.json").is_file():
            return candidate
    raise InitError(f"{what}: {path} is not a model bundle and holds no {sub}/ bundle")


def _place(value, sharding: jax.sharding.Sharding | None, *, copy: bool = False) -> jax.Array:
    """`value` (numpy or a jax array) as a float32 array on `sharding` (None: the first device).

    A value already spread over devices is resharded there; a host or one-device value is cut into the
    shards this process holds, so no device receives more than its own part. `copy`: a new buffer even
    when the value already sits where it should (for weights another live module keeps using).
    """
    if sharding is None:
        return jnp.array(value, jnp.float32, copy=copy)
    if isinstance(value, jax.Array) and not isinstance(value.sharding, jax.sharding.SingleDeviceSharding):
        return jax.device_put(value.astype(jnp.float32), sharding, may_alias=not copy)
    host = np.asarray(value, np.float32)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _shardings(module: nnx.Module, sharding: LogicalSharding | None) -> dict[tuple, jax.sharding.Sharding]:
    """{param path: its sharding} of `module` (abstract is enough); empty without a sharding."""
    if sharding is None:
        return {}
    state = sharding.shardings(nnx.state(module, nnx.Param))
    return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def _set(
    module: nnx.Module,
    values: dict[tuple, np.ndarray | jax.Array],
    source: str,
    sharding: LogicalSharding | None = None,
    *,
    copy: bool = False,
) -> nnx.Module:
    """Fill every parameter of a shape-only `module` from `values` (by path), shapes checked, each placed
    on its shards (see `_place`; `copy` for values another module keeps)."""
    shardings = _shardings(module, sharding)
    missing, bad = [], []
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        path = tuple(path)
        if path not in values:
            missing.append(".".join(map(str, path)))
        elif tuple(values[path].shape) != tuple(var.shape):
            bad.append(f"{'.'.join(map(str, path))}: {tuple(values[path].shape)} vs model {tuple(var.shape)}")
    if missing or bad:
        raise InitError(f"{source}: cannot fill the model; missing {missing[:10]}; mis-shaped {bad[:10]}")
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        var.set_value(_place(values[tuple(path)], shardings.get(tuple(path)), copy=copy))
    return module


def read_ip_attention(folder: str | Path) -> tuple[dict[tuple, np.ndarray], int]:
    """The IP-Adapter's attn2 projections as {UNet param path: kernel [in, out]} and its token count."""
    folder = Path(folder)
    file, info = folder / IP_ATTENTION, folder / IP_INFO
    for f in (file, info):
        if not f.is_file():
            raise InitError(f"{folder} is not a `convert ip-adapter` output: {f.name} is missing")
    tokens = json.loads(info.read_text()).get("num_tokens")
    if not isinstance(tokens, int) or tokens < 1:
        raise InitError(f"{info}: num_tokens must be a positive int, got {tokens!r}")
    out = {}
    for key, value in load_file(str(file)).items():
        *head, leaf = key.split(".")
        if leaf != "weight" or value.ndim != 2 or head[-1] not in ("to_k_ip", "to_v_ip"):
            raise InitError(
                f"{file}: unexpected tensor {key!r} {value.shape} (only *.to_k_ip/to_v_ip.weight)"
            )
        path = tuple(int(p) if p.isdigit() else p for p in head) + ("kernel",)
        out[path] = value.T  # PyTorch Linear [out, in] -> Flax kernel [in, out]
    return out, tokens


def xdyna_unet(
    motion_unet: str | Path,
    ip_adapter: str | Path,
    *,
    compute: Compute | None = None,
    sharding: LogicalSharding | None = None,
) -> UNet:
    """SD 1.5 + AnimateDiff (the bundle) + IP-Adapter attn2 projections + a fresh Dynamics-Adapter."""
    src = _bundle(motion_unet, "unet", "motion_unet")
    try:
        meta = read_meta(src)
        if meta["kind"] != "video_unet":
            raise InitError(
                f"{src} holds a {meta['kind']!r} bundle; expected the video_unet of `convert animatediff`"
            )
        base_cfg = UNetConfig.from_dict(meta["config"])
    except BundleError as e:
        raise InitError(f"motion_unet: {e}") from e
    if not base_cfg.motion_modules:
        raise InitError(f"{src} has no motion modules; give the output of `convert animatediff`")
    if base_cfg.dynamics_adapter or base_cfg.ip_adapter_tokens:
        raise InitError(f"{src} already has an adapter / IP-Adapter: resume from an X-Dyna bundle instead")
    ip, tokens = read_ip_attention(ip_adapter)
    cfg = dataclasses.replace(
        base_cfg,
        dynamics_adapter=True,
        ip_adapter_tokens=tokens,
        skip_reference_frame=True,  # the reference frame bypasses the motion modules (X-Dyna)
        compute=compute or base_cfg.compute,
    )
    model = shape_only_model(UNet, cfg)
    paths = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    unused = sorted(".".join(map(str, p)) for p in ip if p not in paths)
    if unused:
        raise InitError(
            f"{Path(ip_adapter) / IP_ATTENTION}: tensors the UNet has no place for: {unused[:10]}"
        )
    try:  # restored shard by shard; the X-Dyna UNet takes these arrays over as they are
        loaded = xdyna_jax.load(src, sharding=sharding, expected_kind="video_unet")
    except BundleError as e:
        raise InitError(f"motion_unet: {e}") from e
    base = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(loaded, nnx.Param))}
    del loaded
    shardings = _shardings(model, sharding)
    values = {**base, **ip}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(path)
        if path[-2] == "to_q_ff":  # the adapter's query starts as the frozen query of the same attn1
            query = base[path[:-2] + ("to_q", "kernel")]
            values[path] = _place(query, shardings.get(path), copy=True)  # its own buffer: it trains
        elif path[-2] == "to_out_ff":  # ... and adds nothing until trained
            values[path] = np.zeros(var.shape, np.float32)
    return _set(model, values, f"{src} + {ip_adapter}", sharding)


def controlnet_from_unet(
    unet: UNet,
    conditioning_channels: int,
    *,
    embedding_channels: tuple[int, ...] = SD_EMBEDDING_CHANNELS,
    seed: int = 0,
    sharding: LogicalSharding | None = None,
) -> ControlNetModel:
    """A new ControlNet on `unet`'s encoder: conv_in, time embedding, down and mid blocks copied; the
    condition embedding freshly initialised (its conv_out at zero) and the zero convs at zero, so it adds
    nothing to the UNet until trained."""
    ucfg = unet.config
    cfg = ControlNetConfig(
        **{f: getattr(ucfg, f) for f in ENCODER_FIELDS},
        compute=ucfg.compute,
        conditioning_channels=conditioning_channels,
        conditioning_embedding_out_channels=tuple(embedding_channels),
    )
    model = shape_only_model(ControlNetModel, cfg)
    embedding = ControlNetConditioningEmbedding(
        conditioning_channels,
        cfg.conditioning_embedding_out_channels,
        cfg.block_out_channels[0],
        cfg.compute,
        nnx.Rngs(seed),
    )
    values = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(unet, nnx.Param))}
    for path, v in nnx.to_flat_state(nnx.state(embedding, nnx.Param)):
        zero = path[0] == "conv_out"
        values[("controlnet_cond_embedding", *path)] = np.zeros(v.shape) if zero else v.get_value()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[0] in ("controlnet_down_blocks", "controlnet_mid_block"):
            values[tuple(path)] = np.zeros(var.shape, np.float32)
    # copies: the UNet keeps its encoder weights (frozen) while the ControlNet's train
    return _set(model, values, "ControlNet from the UNet's encoder", sharding, copy=True)


def load_controlnet(
    path: str | Path,
    unet: UNet,
    *,
    compute: Compute | None = None,
    sharding: LogicalSharding | None = None,
) -> ControlNetModel:
    """A controlnet bundle, checked to fit `unet` (same encoder structure) before any weights are read."""
    path = _bundle(path, "controlnet", "controlnet")
    try:
        cfg = read_meta(path)["config"]
    except BundleError as e:
        raise InitError(str(e)) from e
    ucfg = unet.config.to_dict()
    bad = [f for f in ENCODER_FIELDS if f in cfg and _plain(cfg[f]) != _plain(ucfg[f])]
    if bad:
        raise InitError(
            f"{path} does not fit the UNet: "
            + "; ".join(f"{f}: ControlNet {cfg[f]} vs UNet {ucfg[f]}" for f in bad)
        )
    try:
        return xdyna_jax.load(
            path, sharding=sharding, compute=compute or unet.config.compute, expected_kind="controlnet"
        )
    except BundleError as e:
        raise InitError(str(e)) from e


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _image_parts(ip_adapter: Path, compute: Compute | None, sharding: LogicalSharding | None):
    parts = []
    for name, kind in (("image_encoder", "clip_vision"), ("resampler", "resampler")):
        folder = ip_adapter / name
        part = None
        if folder.is_dir():
            part = xdyna_jax.load(folder, sharding=sharding, compute=compute, expected_kind=kind)
        parts.append(part)
    return parts


def init_stage1(
    motion_unet: str | Path,
    ip_adapter: str | Path,
    *,
    pose_controlnet: str | Path | None = None,
    compute: Compute | None = None,
    pose_embedding_channels: tuple[int, ...] = SD_EMBEDDING_CHANNELS,
    seed: int = 0,
    sharding: LogicalSharding | None = None,
) -> TrainingModels:
    """Stage 1's starting point from converted bundles (see the module docstring)."""
    unet = xdyna_unet(motion_unet, ip_adapter, compute=compute, sharding=sharding)
    if pose_controlnet is not None:
        pose = load_controlnet(pose_controlnet, unet, compute=compute, sharding=sharding)
    else:
        pose = controlnet_from_unet(
            unet, 3, embedding_channels=pose_embedding_channels, seed=seed, sharding=sharding
        )
    image_encoder, resampler = _image_parts(Path(ip_adapter), compute, sharding)
    return TrainingModels(XDynaDenoiser(unet, pose, None), image_encoder, resampler)


def resume(
    xdyna: str | Path, *, compute: Compute | None = None, sharding: LogicalSharding | None = None
) -> tuple[TrainingModels, XDyna]:
    """Continue from an X-Dyna bundle (`convert xdyna`, or one exported from training); also returns the
    whole pipeline (VAE, text encoder) for validation sampling."""
    pipe = load_xdyna(xdyna, compute=compute, sharding=sharding)
    return TrainingModels(pipe.denoiser, pipe.image_encoder, pipe.resampler), pipe


def add_face_controlnet(
    models: TrainingModels,
    face_controlnet: str | Path | None = None,
    *,
    compute: Compute | None = None,
    embedding_channels: tuple[int, ...] = SD_EMBEDDING_CHANNELS,
    seed: int = 0,
    sharding: LogicalSharding | None = None,
) -> TrainingModels:
    """Stage 2's starting point: the stage-1 models plus an S-Face ControlNet (6-channel condition)."""
    unet = models.denoiser.unet
    if face_controlnet is not None:
        face = load_controlnet(face_controlnet, unet, compute=compute, sharding=sharding)
    else:
        face = controlnet_from_unet(
            unet, 6, embedding_channels=embedding_channels, seed=seed, sharding=sharding
        )
    if face.config.conditioning_channels != 6:
        raise InitError(
            f"the S-Face ControlNet needs 6 condition channels, {face_controlnet} has "
            f"{face.config.conditioning_channels}"
        )
    denoiser = XDynaDenoiser(unet, models.denoiser.pose_controlnet, face)
    return dataclasses.replace(models, denoiser=denoiser)
