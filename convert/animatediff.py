"""`python -m convert animatediff`: AnimateDiff motion modules + an SD 1.5 UNet bundle -> a video UNet bundle.

Input: an original file (mm_sd_v14/v15.ckpt, mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt; torch pickle or safetensors)
or a diffusers MotionAdapter folder (config.json + weights). The version (v1/v2/v3) is read off the keys
(mid-block module, pe length) or given with --version; a mismatch is an error. The `pe` buffers are checked
against the sinusoidal table and dropped (our module computes it).
"""

from __future__ import annotations

from pathlib import Path

import xdyna_jax
from convert.animatediff_keys import diffusers_motion_to_original, original_motion_to_diffusers
from convert.io import (
    ConversionError,
    atomic_output_dir,
    find_weights_file,
    key_list,
    read_state_dict,
    write_json,
    write_safetensors,
)
from convert.state import export_torch_state
from convert.video_unet import build_unet, motion_config, resolve_version, save_with_manifest, with_pe_buffers


def read_motion_modules(src: Path) -> dict:
    """Motion-module weights under original AnimateDiff names, from a file or a MotionAdapter folder."""
    if src.is_dir():
        sd = diffusers_motion_to_original(read_state_dict(find_weights_file(src, "diffusion_pytorch_model")))
    else:
        sd = read_state_dict(src)
    other = [k for k in sd if ".motion_modules." not in k]
    if other:
        raise ConversionError(
            f"{src}: not an AnimateDiff motion-module file; outside motion_modules: {key_list(other)}"
        )
    return sd


def convert_animatediff(
    input: str | Path,
    unet: str | Path,
    output: str | Path,
    *,
    version: str | None = None,
    overwrite: bool = False,
) -> Path:
    src = Path(input)
    if not src.exists():
        raise ConversionError(f"no such file or folder: {src}")
    motion = read_motion_modules(src)
    version = resolve_version(motion, version, str(src))
    try:
        base = xdyna_jax.load(unet, expected_kind="unet")
    except xdyna_jax.BundleError as e:
        raise ConversionError(f"--unet: {e}") from e
    if base.config.motion_modules:
        raise ConversionError(f"--unet {unet} already has motion modules; give a plain SD 1.5 UNet bundle")
    state = {**export_torch_state(base), **motion}
    model = build_unet(motion_config(base.config, version), state, f"{src} + {unet}")
    with atomic_output_dir(Path(output), overwrite=overwrite) as tmp:
        save_with_manifest(
            model,
            tmp,
            {
                "converter": "animatediff",
                "version": version,
                "motion": str(src.absolute()),
                "unet": str(Path(unet).absolute()),
            },
        )
    return Path(output)


def export_motion_modules(bundle: str | Path, output: str | Path, layout: str = "original") -> Path:
    """The bundle's motion modules as an original AnimateDiff file (with pe buffers) or a MotionAdapter folder."""
    model = xdyna_jax.load(bundle, expected_kind="video_unet")
    if not model.config.motion_modules:
        raise ConversionError(f"{bundle} has no motion modules")
    state = {
        k: v for k, v in with_pe_buffers(model, export_torch_state(model)).items() if ".motion_modules." in k
    }
    output = Path(output)
    if layout == "original":
        write_safetensors(state, output)
        return output
    if layout != "diffusers":
        raise ConversionError(f"unknown layout {layout!r}; use 'original' or 'diffusers'")
    cfg = model.config
    config = {
        "_class_name": "MotionAdapter",
        "block_out_channels": list(cfg.block_out_channels),
        "motion_layers_per_block": cfg.layers_per_block,
        "motion_mid_block_layers_per_block": 1,
        "motion_num_attention_heads": cfg.motion_heads,
        "motion_norm_num_groups": cfg.motion_norm_groups,
        "motion_max_seq_length": cfg.motion_max_len,
        "use_motion_mid_block": cfg.motion_mid_block,
    }
    with atomic_output_dir(output) as tmp:
        write_json(tmp / "config.json", config)
        write_safetensors(original_motion_to_diffusers(state), tmp / "diffusion_pytorch_model.safetensors")
    return output


def add_arguments(p) -> None:
    p.add_argument(
        "--input", required=True, help="motion-module file (.ckpt/.safetensors) or MotionAdapter folder"
    )
    p.add_argument("--unet", required=True, help="SD 1.5 UNet bundle (e.g. the unet/ of `convert sd15`)")
    p.add_argument("--output", required=True, help="output folder (unet/ bundle + manifest.json)")
    p.add_argument(
        "--version", choices=("v1", "v2", "v3"), help="AnimateDiff version (default: from the keys)"
    )
    p.add_argument("--overwrite", action="store_true")


def run(args) -> Path:
    return convert_animatediff(
        args.input, args.unet, args.output, version=args.version, overwrite=args.overwrite
    )
