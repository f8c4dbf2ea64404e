"""`python -m convert ip-adapter`: IP-Adapter-plus (`ip-adapter-plus_sd15.bin`) + image encoder -> bundles.

The .bin holds two groups (read_state_dict flattens them to `image_proj.*` / `ip_adapter.*`):
  image_proj  the Resampler, original IP-Adapter names           -> bundle `resampler/`
  ip_adapter  `{n}.to_k_ip.weight`, `{n}.to_v_ip.weight`, n = 1, 3, 5, ...: the n-th processor of diffusers'
              `unet.attn_processors` (attn1, attn2 alternate, so odd n are the attn2 layers)
                                                                  -> `ip_attention.safetensors` (+ .json)
`ip_attention.safetensors` keeps PyTorch names and layout, renamed to the UNet's attn2 paths by the table in
convert.ip_adapter_keys (`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k_ip.weight`), so the UNet
converter can merge it into a UNet state dict. The image encoder (a transformers CLIPVisionModelWithProjection folder) becomes the
bundle `image_encoder/`. `export_ip_adapter` writes the original .bin back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import xdyna_jax
from convert.io import (
    ConversionError,
    atomic_file,
    atomic_output_dir,
    find_weights_file,
    key_list,
    read_json,
    read_state_dict,
    write_json,
    write_manifest,
    write_safetensors,
)
from convert.ip_adapter_keys import (
    IP_PROJECTIONS,
    attn2_channels,
    attn2_to_ip,
    ip_adapter_attn2_names,
    ip_to_attn2,
    processor_indices,
)
from convert.state import export_torch_state, load_torch_state, tensor_shape
from xdyna_jax.bundle import BundleError, read_meta
from xdyna_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from xdyna_jax.models.resampler import Resampler, ResamplerConfig
from xdyna_jax.models.unet import UNetConfig
from xdyna_jax.nn.shape_only import shape_only_model

IMAGE_PROJ, IP_ADAPTER = "image_proj.", "ip_adapter."
# Every released IP-Adapter Resampler uses 64-dim heads; the file only gives heads * dim_head.
DEFAULT_DIM_HEAD = 64
# A buffer older transformers saved with the weights; positions are implicit in our model.
_ENCODER_IGNORE = (r"^vision_model\.embeddings\.position_ids$",)


# ------------------------------------------------------------------------------------------ reading


def split_groups(state: Mapping[str, np.ndarray], source: str) -> tuple[dict, dict]:
    """(image_proj, ip_adapter) groups without their prefixes; refuses other IP-Adapter variants clearly."""
    image_proj = {k.removeprefix(IMAGE_PROJ): v for k, v in state.items() if k.startswith(IMAGE_PROJ)}
    ip = {k.removeprefix(IP_ADAPTER): v for k, v in state.items() if k.startswith(IP_ADAPTER)}
    other = sorted(k for k in state if not k.startswith((IMAGE_PROJ, IP_ADAPTER)))
    if not image_proj and not ip:
        raise ConversionError(
            f"{source}: not an IP-Adapter checkpoint: no image_proj.* or ip_adapter.* tensors "
            f"(it holds {key_list(other, limit=5)})"
        )
    if "latents" not in image_proj:
        if "proj.weight" in image_proj:
            variant = "plain IP-Adapter (image_proj.proj.weight)"
        elif "proj.3.weight" in image_proj:
            variant = "IP-Adapter full-face (image_proj.proj.3.weight)"
        elif any(k.startswith("perceiver_resampler.") for k in image_proj):
            variant = "IP-Adapter FaceID-plus (image_proj.perceiver_resampler.*)"
        elif "norm.weight" in image_proj:
            variant = "IP-Adapter FaceID (image_proj.norm.weight)"
        else:
            variant = ""
        what = "no image_proj group" if not image_proj else "no image_proj.latents"
        raise ConversionError(
            f"{source}: not an IP-Adapter-plus checkpoint: {what}"
            + (f"; {variant} is not supported" if variant else "")
        )
    if not ip:
        raise ConversionError(
            f"{source}: not an IP-Adapter-plus checkpoint: no ip_adapter group (to_k_ip/to_v_ip)"
        )
    if other:
        raise ConversionError(
            f"{source}: unexpected tensors outside image_proj / ip_adapter: {key_list(other)}"
        )
    return image_proj, ip


def resampler_config(image_proj: Mapping[str, np.ndarray], source: str, dim_head: int = DEFAULT_DIM_HEAD):
    """The Resampler's sizes read off its tensors (heads = to_q rows / dim_head)."""

    def _shape(key: str) -> tuple[int, ...]:
        return tensor_shape(image_proj, key, f"{source} (image_proj)")

    _, queries, dim = _shape("latents")
    inner = _shape("layers.0.0.to_q.weight")[0]
    ff_inner = _shape("layers.0.1.1.weight")[0]
    if inner % dim_head or ff_inner % dim:
        raise ConversionError(
            f"{source}: cannot infer the Resampler: to_q has {inner} rows (not a multiple of "
            f"dim_head={dim_head}) or the feed-forward width {ff_inner} is not a multiple of dim={dim}"
        )
    depth = 1 + max(int(k.split(".")[1]) for k in image_proj if k.startswith("layers."))
    return ResamplerConfig(
        dim=dim,
        depth=depth,
        dim_head=dim_head,
        heads=inner // dim_head,
        num_queries=queries,
        embedding_dim=_shape("proj_in.weight")[1],
        output_dim=_shape("proj_out.weight")[0],
        ff_mult=ff_inner // dim,
    )


def build_resampler(image_proj: Mapping[str, np.ndarray], source: str, dim_head: int = DEFAULT_DIM_HEAD):
    cfg = resampler_config(image_proj, source, dim_head)
    model = shape_only_model(Resampler, cfg)
    return load_torch_state(model, image_proj, source=f"{source} (image_proj)")


def ip_attention_state(ip: Mapping[str, np.ndarray], unet: UNetConfig, source: str) -> dict[str, np.ndarray]:
    """`{n}.to_k_ip.weight` -> `<attn2 path>.to_k_ip.weight` (PyTorch layout [out, in]), shapes checked."""
    names = ip_adapter_attn2_names(unet)
    expected = {f"{2 * k + 1}.{p}.weight" for k in range(len(names)) for p in IP_PROJECTIONS}
    missing = sorted(expected - set(ip), key=lambda k: (int(k.split(".")[0]), k))
    unexpected = sorted(set(ip) - expected)
    if missing or unexpected:
        lines = [
            f"\n  {title}: " + key_list(["ip_adapter." + k for k in keys])
            for title, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise ConversionError(
            f"{source}: the ip_adapter group does not fit the UNet ({len(names)} cross-attention layers, "
            f"keys 1..{2 * len(names) - 1} expected; pass --unet-config if the UNet is not SD 1.5's)"
            + "".join(lines)
        )
    bad = []
    for key in sorted(expected, key=lambda k: int(k.split(".")[0])):
        name = names[int(key.split(".")[0]) // 2]
        want = (attn2_channels(unet, name), unet.cross_attention_dim)
        if tuple(ip[key].shape) != want:
            bad.append(f"ip_adapter.{key} ({name}): file {tuple(ip[key].shape)} vs UNet {want}")
    if bad:
        raise ConversionError(f"{source}: mis-shaped IP-Adapter projections:\n  " + "\n  ".join(bad[:10]))
    return {k: np.asarray(v, np.float32) for k, v in ip_to_attn2(ip, names, source).items()}


def build_image_encoder(folder: str | os.PathLike) -> CLIPVisionModelWithProjection:
    """A transformers CLIPVisionModelWithProjection folder (config.json + model.safetensors / .bin)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"no such image encoder folder: {folder}")
    raw = read_json(folder / "config.json", "config")
    if raw.get("model_type") != "clip_vision_model":
        raise ConversionError(
            f"{folder / 'config.json'}: model_type {raw.get('model_type')!r}, expected 'clip_vision_model' "
            "(a CLIPVisionModelWithProjection folder such as IP-Adapter's models/image_encoder)"
        )
    try:
        cfg = CLIPVisionConfig.from_transformers(raw)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{folder / 'config.json'}: {e}") from e
    f = find_weights_file(folder, ("model", "pytorch_model"))
    model = shape_only_model(CLIPVisionModelWithProjection, cfg)
    return load_torch_state(model, read_state_dict(f), source=str(f), ignore=_ENCODER_IGNORE)


def _unet_config(path: str | os.PathLike | None) -> UNetConfig:
    """SD 1.5's UNet by default; else a unet bundle, a diffusers unet folder or its config.json."""
    if path is None:
        return UNetConfig()
    path = Path(path)
    try:
        if (path / "model.json").is_file():
            meta = read_meta(path)
            if meta["kind"] not in ("unet", "video_unet"):
                raise ConversionError(f"{path} holds a {meta['kind']!r} bundle, not a unet")
            return UNetConfig.from_dict(meta["config"])
        return UNetConfig.from_diffusers(read_json(path / "config.json" if path.is_dir() else path, "config"))
    except (BundleError, TypeError, ValueError) as e:
        raise ConversionError(f"{path}: {e}") from e


# ------------------------------------------------------------------------------------------ convert


def convert_ip_adapter(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    image_encoder: str | os.PathLike | None = None,
    unet_config: str | os.PathLike | None = None,
    dim_head: int = DEFAULT_DIM_HEAD,
    overwrite: bool = False,
) -> Path:
    """Write resampler/, image_encoder/ (if given), ip_attention.safetensors + .json and manifest.json."""
    src = Path(input)
    source = str(src)
    image_proj, ip = split_groups(read_state_dict(src), source)
    unet = _unet_config(unet_config)
    attn = ip_attention_state(ip, unet, source)
    resampler = build_resampler(image_proj, source, dim_head)
    rcfg = resampler.config
    if rcfg.output_dim != unet.cross_attention_dim:
        raise ConversionError(
            f"{source}: the Resampler emits {rcfg.output_dim}-dim tokens but the UNet's "
            f"cross_attention_dim is {unet.cross_attention_dim}"
        )
    encoder = build_image_encoder(image_encoder) if image_encoder is not None else None
    if encoder is not None and encoder.config.hidden_size != rcfg.embedding_dim:
        raise ConversionError(
            f"{image_encoder}: image encoder hidden_size {encoder.config.hidden_size} does not match the "
            f"Resampler's input width {rcfg.embedding_dim} (image_proj.proj_in.weight)"
        )
    output = Path(output)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        xdyna_jax.save(resampler, tmp / "resampler")
        if encoder is not None:
            xdyna_jax.save(encoder, tmp / "image_encoder")
        else:
            print("note: no image_encoder written; pass --image-encoder DIR to include one")
        write_safetensors(attn, tmp / "ip_attention.safetensors", metadata={"format": "pt"})
        info = {
            "num_tokens": rcfg.num_queries,  # image-prompt tokens appended to the text context
            "cross_attention_dim": unet.cross_attention_dim,
            "scale": 1.0,  # X-Dyna's IP-Adapter scale
            "processor_index": processor_indices(ip_adapter_attn2_names(unet)),
        }
        write_json(tmp / "ip_attention.json", info)
        manifest = {
            "converter": "ip-adapter",
            "source": str(src.absolute()),
            "image_encoder": str(Path(image_encoder).absolute()) if image_encoder is not None else None,
        }
        write_manifest(tmp, manifest)
    return output


# ------------------------------------------------------------------------------------------ export


def export_ip_adapter(
    resampler_bundle: str | os.PathLike,
    ip_attention_file: str | os.PathLike,
    out_bin: str | os.PathLike,
    *,
    dtype: str = "float32",
) -> Path:
    """Write the original `{"image_proj": {...}, "ip_adapter": {...}}` torch .bin (dtype float32 or float16).

    PyTorch -> bundles -> .bin reproduces every tensor exactly (float32 sources with the default dtype,
    float16 sources with dtype="float16").
    """
    import torch

    if dtype not in ("float32", "float16"):
        raise ConversionError(f"export dtype {dtype!r} not in ['float16', 'float32']")
    try:
        resampler = xdyna_jax.load(resampler_bundle, expected_kind="resampler")
    except BundleError as e:
        raise ConversionError(str(e)) from e
    attn = read_state_dict(ip_attention_file)
    layers: dict[str, set[str]] = {}
    for key in attn:
        name, _, leaf = key.rpartition(".")[0].rpartition(".")
        if leaf not in IP_PROJECTIONS or not key.endswith(".weight"):
            raise ConversionError(
                f"{ip_attention_file}: unexpected tensor {key!r} (only *.to_k_ip/to_v_ip.weight)"
            )
        layers.setdefault(name, set()).add(leaf)
    incomplete = sorted(n for n, found in layers.items() if found != set(IP_PROJECTIONS))
    if incomplete:
        raise ConversionError(
            f"{ip_attention_file}: layers without both to_k_ip and to_v_ip: {incomplete[:5]}"
        )
    ip = attn2_to_ip(attn, str(ip_attention_file))
    ip = {k: ip[k] for k in sorted(ip, key=lambda k: int(k.split(".")[0]))}  # the original file's order
    tdtype = getattr(torch, dtype)

    def tensors(group: Mapping[str, np.ndarray]) -> dict:
        return {k: torch.tensor(v).to(tdtype) for k, v in group.items()}  # copies: arrays may be read-only

    with atomic_file(out_bin) as tmp:
        torch.save({"image_proj": tensors(export_torch_state(resampler)), "ip_adapter": tensors(ip)}, tmp)
    return Path(out_bin)


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(p) -> None:
    p.add_argument("--input", required=True, help="ip-adapter-plus_sd15.bin (or its .safetensors)")
    p.add_argument(
        "--image-encoder", help="transformers CLIPVisionModelWithProjection folder (models/image_encoder)"
    )
    p.add_argument(
        "--output", required=True, help="output folder (resampler/, image_encoder/, ip_attention.*)"
    )
    p.add_argument(
        "--unet-config", help="unet bundle, diffusers unet folder or config.json (default: SD 1.5's UNet)"
    )
    p.add_argument("--dim-head", type=int, default=DEFAULT_DIM_HEAD, help="Resampler head width (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args) -> Path:
    return convert_ip_adapter(
        args.input,
        args.output,
        image_encoder=args.image_encoder,
        unet_config=args.unet_config,
        dim_head=args.dim_head,
        overwrite=args.overwrite,
    )
