"""`python -m convert export`: bundles -> PyTorch layouts that diffusers, ComfyUI and A1111 load.

  --layout diffusers    a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
                        scheduler/); or, for a single bundle, config.json + weights in OUT
  --layout single-file  one .safetensors with `model.diffusion_model.*`, `first_stage_model.*`,
                        `cond_stage_model.transformer.*` (the original SD 1.x layout)
Weights are written exactly as held (float32), so PyTorch -> Flax -> PyTorch is bit-identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import xdyna_jax
from convert import ldm_keys
from convert.clip_text import export_clip_text_state
from convert.io import ConversionError, atomic_output_dir, write_safetensors
from convert.state import export_torch_state
from xdyna_jax.bundle import BundleError, read_meta

PIPELINE_PARTS = ("unet", "vae", "text_encoder")
# kinds with no diffusers folder layout, and the function that writes their original layout
_OWN_EXPORT = {
    "resampler": "convert.ip_adapter.export_ip_adapter",
}
_WEIGHTS_NAME = {"clip_text": "model", "clip_vision": "model"}  # others: diffusion_pytorch_model


def _load(path: Path):
    try:
        return xdyna_jax.load(path)
    except BundleError as e:
        raise ConversionError(str(e)) from e


def torch_state_and_config(bundle: Path) -> tuple[str, dict[str, np.ndarray], dict]:
    """(kind, PyTorch-named state dict, diffusers/transformers config.json dict) of one bundle."""
    kind = read_meta(bundle)["kind"]
    if kind in _OWN_EXPORT:
        raise ConversionError(f"{bundle} is a {kind!r} bundle; export it with {_OWN_EXPORT[kind]}")
    model = _load(bundle)
    if kind == "clip_text":
        return kind, export_clip_text_state(model), model.config.to_transformers()
    if kind == "clip_vision":
        return kind, export_torch_state(model), model.config.to_transformers()
    return kind, export_torch_state(model), model.config.to_diffusers()


def _write_component(bundle: Path, out: Path) -> str:
    kind, state, config = torch_state_and_config(bundle)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(state, out / f"{_WEIGHTS_NAME.get(kind, 'diffusion_pytorch_model')}.safetensors")
    return kind


def export_diffusers(src: Path, output: Path, overwrite: bool = False) -> Path:
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        if (src / "model.json").is_file():  # a single bundle
            _write_component(src, tmp)
            return output
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}
        classes = {
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
        }
        for part in PIPELINE_PARTS:
            if (src / part).is_dir():
                _write_component(src / part, tmp / part)
                index[part] = classes[part]
        if (src / "tokenizer").is_dir():
            shutil.copytree(src / "tokenizer", tmp / "tokenizer")
            index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        if (src / "scheduler").is_dir():
            shutil.copytree(src / "scheduler", tmp / "scheduler")
            cls = json.loads((src / "scheduler" / "scheduler_config.json").read_text()).get("_class_name")
            index["scheduler"] = ["diffusers", cls or "DDIMScheduler"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return output


def single_file_state(src: Path) -> dict[str, np.ndarray]:
    """The SD 1.x single-file state dict of a converted pipeline folder (unet + vae + text_encoder)."""
    missing = [p for p in PIPELINE_PARTS if not (src / p / "model.json").is_file()]
    if missing:
        raise ConversionError(
            f"{src}: single-file export needs the bundles {missing} (a `convert sd15` output)"
        )
    out: dict[str, np.ndarray] = {}
    unet = _load(src / "unet")
    cfg = unet.config
    attention = tuple(t.startswith("CrossAttn") for t in cfg.down_block_types)
    unet_state = ldm_keys.diffusers_unet_to_ldm(
        export_torch_state(unet),
        layers_per_block=cfg.layers_per_block,
        n_blocks=len(attention),
        attention_blocks=attention,
    )
    out.update({ldm_keys.UNET_PREFIX + k: v for k, v in unet_state.items()})
    vae = _load(src / "vae")
    vae_state = ldm_keys.diffusers_vae_to_ldm(
        export_torch_state(vae), n_blocks=len(vae.config.block_out_channels)
    )
    out.update({ldm_keys.VAE_PREFIX + k: v for k, v in vae_state.items()})
    clip_state = ldm_keys.diffusers_clip_to_ldm(export_clip_text_state(_load(src / "text_encoder")))
    out.update({ldm_keys.CLIP_PREFIX + k: v for k, v in clip_state.items()})
    return out


def export_single_file(src: Path, output: Path, overwrite: bool = False) -> Path:
    if output.suffix != ".safetensors":
        raise ConversionError(f"single-file export writes .safetensors; got output {output}")
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} already exists (pass --overwrite to replace it)")
    write_safetensors(single_file_state(src), output, metadata={"format": "pt"})
    return output


def export(input: str | Path, output: str | Path, layout: str, overwrite: bool = False) -> Path:
    src, output = Path(input), Path(output)
    if not src.is_dir():
        raise ConversionError(f"no such bundle folder: {src}")
    if layout == "diffusers":
        return export_diffusers(src, output, overwrite)
    if layout == "single-file":
        return export_single_file(src, output, overwrite)
    raise ConversionError(f"unknown layout {layout!r}; use 'diffusers' or 'single-file'")


def add_arguments(p) -> None:
    p.add_argument("--input", required=True, help="a `convert sd15` output folder, or one bundle")
    p.add_argument(
        "--output", required=True, help="output folder (diffusers) or .safetensors file (single-file)"
    )
    p.add_argument("--layout", choices=("diffusers", "single-file"), default="diffusers")
    p.add_argument("--overwrite", action="store_true")


def run(args) -> Path:
    return export(args.input, args.output, args.layout, overwrite=args.overwrite)
