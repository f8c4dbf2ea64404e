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

Original <-> diffusers names are the table in convert.controlnet_keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xdyna_jax
from convert import ldm_keys
from convert.controlnet_keys import CONTROL_PREFIX, diffusers_to_original, original_to_diffusers
from convert.export import export_diffusers
from convert.io import (
    ConversionError,
    atomic_output_dir,
    find_weights_file,
    key_list,
    read_json,
    read_state_dict,
    refuse_existing_output,
    write_manifest,
    write_safetensors,
)
from convert.sd_structure import sd1x_unet_fields
from convert.state import export_torch_state, load_torch_state, tensor_shape
from xdyna_jax.bundle import BundleError, read_meta
from xdyna_jax.models.controlnet import ControlNetConfig, ControlNetModel
from xdyna_jax.nn.shape_only import shape_only_model

# The rest of a v1.0 ControlLDM file: the SD model it was trained against (not part of the ControlNet).
_FULL_MODEL_PREFIXES = (ldm_keys.UNET_PREFIX, ldm_keys.VAE_PREFIX, "cond_stage_model.", "model_ema.")
_HINT = "\n  (read as SD 1.5's ControlNet structure; pass --config-from if the file has another one)"
_NO_CONFIG_HINT = "not an SD 1.x-shaped ControlNet? Pass --config-from with the matching diffusers config"


@dataclass
class Source:
    """A ControlNet read from disk: config, diffusers-named weights, and what was found / left out."""

    config: ControlNetConfig
    state: dict
    layout: str  # diffusers-folder | diffusers-file | original | original-full
    file: str
    ignored: list[str] = field(default_factory=list)
    derived: bool = False  # config read off the tensors as SD 1.5's structure (no config given)


# ----------------------------------------------------------------------------------------------- reading


def _read_config(path: Path) -> ControlNetConfig:
    """A diffusers ControlNet config: a folder holding config.json, or the json file itself."""
    file = path / "config.json" if path.is_dir() else path
    try:
        return ControlNetConfig.from_diffusers(read_json(file, "config"))
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{file}: {e}") from e


def sd15_config(state: Mapping[str, Any], source: str) -> ControlNetConfig:
    """SD 1.5's ControlNet structure, with the sizes variants change read off the (diffusers-named) tensors."""
    embedding = "controlnet_cond_embedding."
    emb0, cond = tensor_shape(state, embedding + "conv_in.weight", source, _NO_CONFIG_HINT)[:2]
    blocks = {int(m.group(1)) for k in state if (m := re.match(rf"{embedding}blocks\.(\d+)\.", k))}
    # blocks come in pairs (same-width conv, stride-2 conv to the next width): the odd ones give the widths
    widths = [
        tensor_shape(state, f"{embedding}blocks.{i}.weight", source, _NO_CONFIG_HINT)[0]
        for i in sorted(blocks)[1::2]
    ]
    return ControlNetConfig(
        **sd1x_unet_fields(state, source, _NO_CONFIG_HINT),
        conditioning_channels=cond,
        conditioning_embedding_out_channels=(emb0, *widths),
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
        guess = f"an unknown model ({key_list(keys, limit=5)})"
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
            f"{path}: neither control_model.* nor parts of the SD model: {key_list(sorted(unknown))}"
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
        write_manifest(tmp, manifest)
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
    refuse_existing_output(output, overwrite)
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
