"""`python -m convert xdyna`: the official X-Dyna release (+ SD 1.5 + IP-Adapter-plus) -> one X-Dyna bundle.

    python -m convert xdyna --release X-Dyna/ --sd15 stable-diffusion-v1-5/ --ip-adapter IP-Adapter/models/ \
        --output bundles/xdyna

The release folder (HF Boese0601/X-Dyna) is searched for its three checkpoints by name:
unet-checkpoint-epoch-5.ckpt, controlnet-checkpoint-epoch-5.ckpt (pose), controlnet-face-checkpoint-epoch-2.ckpt
(S-Face; optional). SD 1.5 (diffusers folder or single file) gives the VAE, text encoder and tokenizer; the
IP-Adapter folder gives ip-adapter-plus_sd15.bin (Resampler) and image_encoder/. The output holds one bundle
per model, tokenizer/, scheduler/ (the release's DDIM settings) and manifest.json naming the pipeline kind
("xdyna") and every source file.

Memory: each step reads only what it converts (of SD 1.5 only the VAE, text encoder and tokenizer; never its
UNet), writes its bundles from host arrays and is freed before the next step, so the peak is about the largest
single checkpoint (the 5.3 GB UNet), not the sum. A ControlNet whose structure does not fit the UNet (widths,
context dim, ...) is refused here, not at the first denoising call.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm import tqdm

import xdyna_jax
from convert.controlnet import convert_controlnet
from convert.io import (
    ConversionError,
    atomic_output_dir,
    read_json,
    release_memory,
    write_manifest,
    write_scheduler_config,
)
from convert.ip_adapter import convert_ip_adapter
from convert.sd15 import build_text_encoder, build_vae, read_diffusers_folder, read_single_file
from convert.xdyna_unet import convert_xdyna_unet
from xdyna_jax.bundle import read_meta
from xdyna_jax.sampling.bundles import XDYNA_SCHEDULER

RELEASE_FILES = {
    "unet": ("unet-checkpoint-epoch-5.ckpt", True),
    "controlnet_pose": ("controlnet-checkpoint-epoch-5.ckpt", True),
    "controlnet_face": ("controlnet-face-checkpoint-epoch-2.ckpt", False),
}


# ControlNet config fields that must equal the UNet's: its residuals are added to the UNet's skips (same
# widths and count) and it reads the same latents and text context.
CONTROLNET_MUST_MATCH = (
    "in_channels",
    "block_out_channels",
    "down_block_types",
    "layers_per_block",
    "cross_attention_dim",
)


def check_controlnet_fits(controlnet: Path, unet: Path, sources: tuple[Path, Path]) -> None:
    """One ConversionError naming both source files and each field where the ControlNet and UNet differ."""
    net, base = read_meta(controlnet)["config"], read_meta(unet)["config"]
    bad = [f for f in CONTROLNET_MUST_MATCH if _as_list(net[f]) != _as_list(base[f])]
    if bad:
        fields = "; ".join(f"{f}: ControlNet {net[f]} vs UNet {base[f]}" for f in bad)
        raise ConversionError(
            f"the ControlNet {sources[0]} does not fit the UNet {sources[1]} ({fields}); its residuals "
            "could not be added to the UNet's skip connections"
        )


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def find_release_file(release: Path, name: str, required: bool) -> Path | None:
    hits = sorted(p for p in release.rglob(name) if p.is_file())
    if len(hits) > 1:
        raise ConversionError(f"{release}: {name} appears more than once ({', '.join(map(str, hits))})")
    if not hits and required:
        raise ConversionError(f"{release}: no {name} found (the X-Dyna release's file names are expected)")
    return hits[0] if hits else None


def find_ip_adapter(folder: Path) -> tuple[Path, Path]:
    """(ip-adapter-plus_sd15.bin, image_encoder/) from an IP-Adapter `models/` folder (or its parent)."""
    bins = sorted(folder.rglob("ip-adapter-plus_sd15.bin")) or sorted(
        folder.rglob("ip-adapter-plus_sd15.safetensors")
    )
    encoders = sorted(p.parent for p in folder.rglob("config.json") if p.parent.name == "image_encoder")
    if not bins:
        raise ConversionError(f"{folder}: no ip-adapter-plus_sd15.bin (IP-Adapter-plus for SD 1.5) found")
    if not encoders:
        raise ConversionError(f"{folder}: no image_encoder/ (CLIP ViT-H/14 with config.json) found")
    return bins[0], encoders[0]


def convert_xdyna(
    release: str | Path,
    sd15: str | Path,
    ip_adapter: str | Path,
    output: str | Path,
    *,
    init: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    release, sd15, ip_adapter, output = Path(release), Path(sd15), Path(ip_adapter), Path(output)
    for what, p in (("--release", release), ("--ip-adapter", ip_adapter)):
        if not p.is_dir():
            raise ConversionError(f"{what}: no such folder {p}")
    if not sd15.exists():
        raise ConversionError(f"--sd15: no such file or folder {sd15}")
    files = {name: find_release_file(release, fname, req) for name, (fname, req) in RELEASE_FILES.items()}
    ip_bin, image_encoder = find_ip_adapter(ip_adapter)
    manifest = {"kind": "xdyna", "converter": "xdyna", "parts": {}}
    steps = [n for n in ("unet", "controlnet_pose", "controlnet_face") if files[n]] + ["sd15", "ip_adapter"]
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        for step in tqdm(steps, desc="convert xdyna", disable=not progress):
            if step == "unet":
                convert_xdyna_unet(files["unet"], tmp / "_unet", init=init)
                (tmp / "_unet" / "unet").rename(tmp / "unet")
                manifest["parts"]["unet"] = read_json(tmp / "_unet" / "manifest.json", "manifest")
                shutil.rmtree(tmp / "_unet")
            elif step.startswith("controlnet"):
                convert_controlnet(files[step], tmp / step)
                check_controlnet_fits(tmp / step, tmp / "unet", (files[step], files["unet"]))
                manifest["parts"][step] = read_json(tmp / step / "manifest.json", "manifest")
            elif step == "sd15":
                if sd15.is_dir():
                    parts = read_diffusers_folder(sd15, ("vae", "text_encoder"))
                else:  # a single file holds the SD UNet too: drop it as soon as the file is split
                    parts = read_single_file(sd15)
                    del parts["unet"]
                for name, build in (("vae", build_vae), ("text_encoder", build_text_encoder)):
                    part = parts.pop(name)
                    xdyna_jax.save(build(part), tmp / name)
                    manifest["parts"][name] = {"file": part.source}
                    del part
                    release_memory()
                if (sd15 / "tokenizer").is_dir():
                    shutil.copytree(sd15 / "tokenizer", tmp / "tokenizer")
                    manifest["parts"]["tokenizer"] = {"file": str((sd15 / "tokenizer").absolute())}
            else:
                unet_cfg = tmp / "unet"
                convert_ip_adapter(ip_bin, tmp / "_ip", image_encoder=image_encoder, unet_config=unet_cfg)
                for name in ("resampler", "image_encoder"):
                    (tmp / "_ip" / name).rename(tmp / name)
                    manifest["parts"][name] = {"file": str(ip_bin if name == "resampler" else image_encoder)}
                shutil.rmtree(tmp / "_ip")  # the UNet checkpoint already holds the trained to_k_ip / to_v_ip
            release_memory()  # this step's tensors (and their file mappings) go before the next step reads
        write_scheduler_config(tmp, XDYNA_SCHEDULER.to_diffusers())
        write_manifest(tmp, manifest)
    return output


def add_arguments(p) -> None:
    p.add_argument("--release", required=True, help="the X-Dyna release folder (its .ckpt files)")
    p.add_argument("--sd15", required=True, help="SD 1.5 diffusers folder or single file (VAE, text encoder)")
    p.add_argument(
        "--ip-adapter",
        required=True,
        help="IP-Adapter models/ folder (ip-adapter-plus_sd15.bin, image_encoder/)",
    )
    p.add_argument("--output", required=True, help="output folder (the X-Dyna bundle)")
    p.add_argument("--init", help="animatediff_v15_v1_ipplus.pth, if the UNet checkpoint is partial")
    p.add_argument("--overwrite", action="store_true")


def run(args) -> Path:
    return convert_xdyna(
        args.release, args.sd15, args.ip_adapter, args.output, init=args.init, overwrite=args.overwrite
    )
