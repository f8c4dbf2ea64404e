"""`python -m convert controlnet`: an SD 1.x ControlNet checkpoint <-> a `controlnet` bundle.

Sources (detected from the file, not its name):
  * a diffusers folder: config.json + diffusion_pytorch_model.{safetensors,bin} (e.g. control_v11p_sd15_openpose);
  * a diffusers-named state dict file, such as X-Dyna's controlnet-checkpoint-epoch-5.ckpt and
    controlnet-face-checkpoint-epoch-2.ckpt (torch pickles; a `state_dict` wrapper and DDP `module.`
    prefixes are removed by convert.io.read_state_dict);
  * an original lllyasviel v1.1 control-only file (`control_model.*`, or the same keys already stripped:
    `time_embed.0.weight`, `input_hint_block.0.weight`, ...);
  * an original v1.0 ControlLDM file: `control_model.*` plus the whole SD model (`model.diffusion_model.*`,
    `first_stage_model.*`, `cond_stage_model.*`, schedule buffers), which is ignored and listed as such.
Files without a config are read as SD 1.5's ControlNet structure, with the sizes variants change (input,
condition and embedding channels, width, context dim, projection type) read off the tensors; `config_from`
(a diffusers ControlNet folder or its config.json) describes anything else.

Export (`--export diffusers|original`): a bundle back to a diffusers folder (config.json + safetensors), or
to the original v1.1 control-only layout (`control_model.*` in one .safetensors). Both are bit-exact.

Original <-> diffusers names: the encoder half uses the UNet's rules (convert.ldm_keys); the rest is
  input_hint_block.0 <-> controlnet_cond_embedding.conv_in
  input_hint_block.{2,4,...,2n} <-> controlnet_cond_embedding.blocks.{0..n-1}   (odd indices are SiLUs)
  input_hint_block.{2n+2} <-> controlnet_cond_embedding.conv_out
  zero_convs.{i}.0 <-> controlnet_down_blocks.{i};  middle_block_out.0 <-> controlnet_mid_block
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xdyna_jax
from convert import ldm_keys
from convert.export import export_diffusers
from convert.io import (
    ConversionError,
    atomic_output_dir,
    find_weights_file,
    read_state_dict,
    write_safetensors,
)
from convert.state import export_torch_state, load_torch_state
from xdyna_jax.bundle import BundleError, read_meta
from xdyna_jax.models.controlnet import ControlNetConfig, ControlNetModel
from xdyna_jax.nn.shape_only import shape_only_model

CONTROL_PREFIX = "control_model."
# The rest of a v1.0 ControlLDM file: the SD model it was trained against (not part of the ControlNet).
_FULL_MODEL_PREFIXES = (ldm_keys.UNET_PREFIX, ldm_keys.VAE_PREFIX, "cond_stage_model.", "model_ema.")
# Original names of the ControlNet-only parts; everything else in `control_model.*` is UNet encoder.
_ORIGINAL_EXTRA = ("input_hint_block.", "zero_convs.", "middle_block_out.")
_DIFFUSERS_EXTRA = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


_HINT = "\n  (read as SD 1.5's ControlNet structure; pass --config-from if the file has another one)"


@dataclass
class Source:
    """A ControlNet read from disk: config, diffusers-named weights, and what was found / left out."""

    config: ControlNetConfig
    state: dict
    layout: str  # diffusers-folder | diffusers-file | original | original-full
    file: str
    ignored: list[str] = field(default_factory=list)
    derived: bool = False  # config read off the tensors as SD 1.5's structure (no config given)


# ------------------------------------------------------------------------------------------ key mapping


def _structure(cfg: ControlNetConfig) -> dict:
    attention = tuple(t.startswith("CrossAttn") for t in cfg.down_block_types)
    return dict(layers_per_block=cfg.layers_per_block, n_blocks=len(attention), attention_blocks=attention)


def _split(sd: Mapping[str, Any], extra: tuple[str, ...]) -> tuple[dict, dict]:
    encoder = {k: v for k, v in sd.items() if not k.startswith(extra)}
    return encoder, {k: v for k, v in sd.items() if k.startswith(extra)}


def _rename_all(sd: Mapping[str, Any], rename, what: str) -> dict[str, Any]:
    """Apply `rename(key) -> new key | None` to every key; one error lists the keys with no mapping."""
    out, unmapped = {}, []
    for key, value in sd.items():
        new = rename(key)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        raise ConversionError(
            f"{what}: {len(unmapped)} key(s) have no mapping: " + ", ".join(sorted(unmapped)[:20])
        )
    return out


def _hint_to_diffusers(sd: Mapping[str, Any]) -> dict[str, Any]:
    """input_hint_block / zero_convs / middle_block_out -> diffusers names (see the module docstring)."""
    hint = [int(m.group(1)) for k in sd if (m := re.match(r"input_hint_block\.(\d+)\.", k))]
    last = max(hint, default=0)

    def rename(key: str) -> str | None:
        if m := re.fullmatch(r"input_hint_block\.(\d+)\.(weight|bias)", key):
            i, leaf = int(m.group(1)), m.group(2)
            if i == 0:
                return f"controlnet_cond_embedding.conv_in.{leaf}"
            if i == last:
                return f"controlnet_cond_embedding.conv_out.{leaf}"
            return f"controlnet_cond_embedding.blocks.{i // 2 - 1}.{leaf}" if i % 2 == 0 else None
        if m := re.fullmatch(r"zero_convs\.(\d+)\.0\.(weight|bias)", key):
            return f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
        if m := re.fullmatch(r"middle_block_out\.0\.(weight|bias)", key):
            return f"controlnet_mid_block.{m.group(1)}"
        return None

    return _rename_all(sd, rename, "original ControlNet -> diffusers")


def _hint_to_original(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `_hint_to_diffusers`."""
    blocks = [
        int(m.group(1)) for k in sd if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))
    ]
    n = max(blocks, default=-1) + 1

    def rename(key: str) -> str | None:
        if m := re.fullmatch(r"controlnet_cond_embedding\.conv_in\.(weight|bias)", key):
            return f"input_hint_block.0.{m.group(1)}"
        if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(weight|bias)", key):
            return f"input_hint_block.{2 * int(m.group(1)) + 2}.{m.group(2)}"
        if m := re.fullmatch(r"controlnet_cond_embedding\.conv_out\.(weight|bias)", key):
            return f"input_hint_block.{2 * n + 2}.{m.group(1)}"
        if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", key):
            return f"zero_convs.{m.group(1)}.0.{m.group(2)}"
        if m := re.fullmatch(r"controlnet_mid_block\.(weight|bias)", key):
            return f"middle_block_out.0.{m.group(1)}"
        return None

    return _rename_all(sd, rename, "diffusers ControlNet -> original")


def original_to_diffusers(sd: Mapping[str, Any], config: ControlNetConfig) -> dict[str, Any]:
    """Original ControlNet keys (without `control_model.`) -> diffusers ControlNetModel keys."""
    encoder, extra = _split(sd, _ORIGINAL_EXTRA)
    return {**ldm_keys.ldm_unet_to_diffusers(encoder, **_structure(config)), **_hint_to_diffusers(extra)}


def diffusers_to_original(sd: Mapping[str, Any], config: ControlNetConfig) -> dict[str, Any]:
    """Exact inverse of `original_to_diffusers` (keys without `control_model.`)."""
    encoder, extra = _split(sd, _DIFFUSERS_EXTRA)
    return {**ldm_keys.diffusers_unet_to_ldm(encoder, **_structure(config)), **_hint_to_original(extra)}


# ----------------------------------------------------------------------------------------------- reading


def _read_config(path: Path) -> ControlNetConfig:
    """A diffusers ControlNet config: a folder holding config.json, or the json file itself."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConversionError(f"missing config file {file}")
    try:
        return ControlNetConfig.from_diffusers(json.loads(file.read_text()))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{file} is not valid JSON: {e}") from e
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{file}: {e}") from e


def _shape(state: Mapping[str, Any], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(
            f"{source}: expected key {key!r} is missing; not an SD 1.x-shaped ControlNet? "
            "Pass --config-from with the matching diffusers config"
        )
    return tuple(state[key].shape)


def sd15_config(state: Mapping[str, Any], source: str) -> ControlNetConfig:
    """SD 1.5's ControlNet structure, with the sizes variants change read off the (diffusers-named) tensors."""
    mc, cin = _shape(state, "conv_in.weight", source)[:2]
    emb0, cond = _shape(state, "controlnet_cond_embedding.conv_in.weight", source)[:2]
    blocks = {
        int(m.group(1)) for k in state if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))
    }
    # blocks come in pairs (same-width conv, stride-2 conv to the next width): the odd ones give the widths
    widths = [
        _shape(state, f"controlnet_cond_embedding.blocks.{i}.weight", source)[0] for i in sorted(blocks)[1::2]
    ]
    attn = "down_blocks.0.attentions.0."
    context = _shape(state, attn + "transformer_blocks.0.attn2.to_k.weight", source)[1]
    if context == 1024:  # SD 2.x: heads are not derivable from shapes (64-channel heads, not 8 heads)
        raise ConversionError(
            f"{source}: looks like an SD 2.x ControlNet (context dim 1024); pass --config-from with its config"
        )
    return ControlNetConfig(
        in_channels=cin,
        conditioning_channels=cond,
        conditioning_embedding_out_channels=(emb0, *widths),
        block_out_channels=(mc, 2 * mc, 4 * mc, 4 * mc),
        cross_attention_dim=context,
        use_linear_projection=len(_shape(state, attn + "proj_in.weight", source)) == 2,
    )


def _not_a_controlnet(path: Path, keys: list[str]) -> ConversionError:
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(ldm_keys.UNET_PREFIX):
        guess = "an SD single-file checkpoint without control_model.* keys (use `convert sd15`)"
    elif has("up_blocks.") or "conv_out.weight" in keys:
        guess = "a diffusers UNet state dict (it has up_blocks / conv_out; use `convert sd15`)"
    elif has("output_blocks.") or has("out.2."):
        guess = "an original LDM UNet (it has output_blocks; use `convert sd15`)"
    elif any("motion_modules." in k for k in keys):
        guess = "an AnimateDiff motion module"
    elif has("encoder.") or has("decoder."):
        guess = "a VAE"
    elif has("text_model.") or has("embeddings."):
        guess = "a CLIP text encoder"
    else:
        guess = "an unknown model (first keys: " + ", ".join(keys[:5]) + ")"
    return ConversionError(
        f"{path} is not a ControlNet checkpoint: it has none of controlnet_cond_embedding.*, control_model.*, "
        f"input_hint_block.*; it looks like {guess}"
    )


def _split_original(sd: dict, path: Path) -> tuple[dict, list[str], bool]:
    """`control_model.*` of an original file -> (stripped control dict, ignored keys, is a v1.0 full file)."""
    control, ignored, unknown = {}, [], []
    for key, value in sd.items():
        if key.startswith(CONTROL_PREFIX):
            control[key.removeprefix(CONTROL_PREFIX)] = value
        elif key.startswith(_FULL_MODEL_PREFIXES) or "." not in key:  # SD parts, schedule buffers (betas...)
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{path}: {len(unknown)} key(s) are neither control_model.* nor parts of the SD model: "
            + ", ".join(sorted(unknown)[:20])
        )
    full = any(k.startswith(ldm_keys.UNET_PREFIX) for k in ignored)
    return control, sorted(ignored), full


def read_file(path: Path, config: ControlNetConfig | None = None) -> Source:
    sd = read_state_dict(path)
    keys = list(sd)
    if "controlnet_cond_embedding.conv_in.weight" in sd:  # diffusers names (X-Dyna .ckpt, exported files)
        return Source(
            config or sd15_config(sd, str(path)), sd, "diffusers-file", str(path), derived=not config
        )
    if any(k.startswith(CONTROL_PREFIX) for k in keys):
        control, ignored, full = _split_original(sd, path)
        layout = "original-full" if full else "original"
        sd.clear()  # drop the ignored SD parts (GBs in a v1.0 file) as early as possible
    elif "input_hint_block.0.weight" in sd:  # control-only file with the prefix already stripped
        control, ignored, layout = sd, [], "original"
    else:
        raise _not_a_controlnet(path, keys)
    structure = config or ControlNetConfig()
    try:
        state = original_to_diffusers(control, structure)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}{'' if config else _HINT}") from e
    return Source(config or sd15_config(state, str(path)), state, layout, str(path), ignored, not config)


def read_source(src: Path, config_from: Path | None = None) -> Source:
    config = _read_config(config_from) if config_from is not None else None
    if src.is_dir():
        if (src / "model.json").is_file():
            raise ConversionError(
                f"{src} is already a bundle; pass --export to write it out as PyTorch weights"
            )
        weights = find_weights_file(src, "diffusion_pytorch_model")
        config = config or _read_config(src)
        return Source(config, read_state_dict(weights), "diffusers-folder", str(weights))
    return read_file(src, config)


def build(source: Source) -> ControlNetModel:
    model = shape_only_model(ControlNetModel, source.config)
    try:
        return load_torch_state(model, source.state, source=f"{source.file} (controlnet)")
    except ConversionError as e:
        raise ConversionError(f"{e}{_HINT if source.derived else ''}") from e


def convert_controlnet(
    input: str | Path, output: str | Path, *, config_from: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Convert `input` (folder or file, see the module docstring) into a bundle at `output`; returns it.

    The bundle folder also holds manifest.json (source, detected layout, ignored keys). Nothing is written
    unless the conversion succeeds.
    """
    src, output = Path(input), Path(output)
    if not src.exists():
        raise ConversionError(f"no such file or folder: {src}")
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        source = read_source(src, Path(config_from) if config_from else None)
        model = build(source)
        source.state.clear()
        xdyna_jax.save(model, tmp, overwrite=True)  # tmp is the (empty) bundle folder itself
        manifest = {
            "converter": "controlnet",
            "source": str(src.absolute()),
            "file": source.file,
            "layout": source.layout,
            "config_from": str(Path(config_from).absolute()) if config_from else None,
            "ignored_keys": source.ignored,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return output


# ------------------------------------------------------------------------------------------------ export


def original_state(model: ControlNetModel) -> dict[str, Any]:
    """The model as an original v1.1 control-only state dict (`control_model.*`)."""
    state = diffusers_to_original(export_torch_state(model), model.config)
    return {CONTROL_PREFIX + k: v for k, v in state.items()}


def export_controlnet(
    bundle: str | Path, output: str | Path, layout: str = "diffusers", overwrite: bool = False
) -> Path:
    """A controlnet bundle -> diffusers folder (config.json + safetensors) or original .safetensors file."""
    bundle, output = Path(bundle), Path(output)
    try:
        kind = read_meta(bundle)["kind"]
    except BundleError as e:
        raise ConversionError(str(e)) from e
    if kind != "controlnet":
        raise ConversionError(f"{bundle} holds a {kind!r} bundle, not a controlnet")
    if layout == "diffusers":
        return export_diffusers(bundle, output, overwrite)
    if layout != "original":
        raise ConversionError(f"unknown layout {layout!r}; use 'diffusers' or 'original'")
    if output.suffix != ".safetensors":
        raise ConversionError(f"original-layout export writes one .safetensors file; got output {output}")
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} already exists (pass --overwrite to replace it)")
    write_safetensors(original_state(xdyna_jax.load(bundle)), output, metadata={"format": "pt"})
    return output


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    p.add_argument(
        "--input",
        required=True,
        help="diffusers ControlNet folder, original .pth/.safetensors, X-Dyna .ckpt; with --export: a bundle",
    )
    p.add_argument("--output", required=True, help="bundle folder; with --export: folder or .safetensors")
    p.add_argument(
        "--config-from", help="diffusers ControlNet folder (or config.json) describing a non-SD1.5 file"
    )
    p.add_argument(
        "--export",
        choices=("diffusers", "original"),
        help="export a controlnet bundle instead: diffusers folder, or original control_model.* .safetensors",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args) -> Path:
    if args.export:
        if args.config_from:
            raise ConversionError("--config-from applies to conversion, not to --export")
        return export_controlnet(args.input, args.output, args.export, overwrite=args.overwrite)
    return convert_controlnet(args.input, args.output, config_from=args.config_from, overwrite=args.overwrite)
