"""`python -m convert export`: bundles -> PyTorch layouts that diffusers, ComfyUI and A1111 load.

  --layout diffusers    a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
                        scheduler/); or, for a single bundle, config.json + weights in OUT
  --layout single-file  one .safetensors with `model.diffusion_model.*`, `first_stage_model.*`,
                        `cond_stage_model.transformer.*` (the original SD 1.x layout)
  --layout release      the X-Dyna release's files: an X-Dyna pipeline folder -> a folder holding
                        unet-checkpoint-epoch-5.ckpt and the ControlNets' .ckpt files under their release names;
                        one video_unet or controlnet bundle -> one flat state dict file (.ckpt/.pth or
                        .safetensors; the UNet's with its `pos_encoder.pe` buffers)
Weights are written as float32, so PyTorch -> Flax -> PyTorch is bit-identical. They are read from the
bundle as host arrays and rewritten one tensor at a time, so an export holds about one copy of the model.
CogVideoX / DynamiCtrl bundles (`convert cogvideox` / `convert dynamictrl` outputs, or one of their model
bundles) export to the diffusers pipeline layout they came from, sharded like the release and in the
bundle's stored dtype, so a bf16 release comes back bit for bit (convert/cogvideox_folder.py).
A video UNet has no diffusers UNet2DConditionModel folder (that would drop its motion modules and X-Dyna's
adapters), so the diffusers layout refuses it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

import xdyna_jax
from convert import ldm_keys
from convert.clip_text import export_clip_text_state
from convert.io import (
    ConversionError,
    atomic_file,
    atomic_output_dir,
    read_json,
    refuse_existing_output,
    release_memory,
    write_json,
    write_safetensors,
)
from convert.state import export_torch_state, to_torch_layout, torch_key
from convert.video_unet import with_pe_buffers
from xdyna_jax.bundle import BundleError, build_abstract, read_meta, read_params

PIPELINE_PARTS = ("unet", "vae", "text_encoder")
# kinds with no diffusers folder layout, and the function that writes their original layout
_OWN_EXPORT = {
    "resampler": "convert.ip_adapter.export_ip_adapter",
}
_WEIGHTS_NAME = {"clip_text": "model", "clip_vision": "model"}  # others: diffusion_pytorch_model


_TORCH_PICKLES = (".ckpt", ".pth", ".pt", ".bin")
# What diffusers' UNetMotionModel cannot express (X-Dyna's adapters, the reference-frame skip) or computes
# differently (its ResNets normalise each frame alone; its motion modules pool GroupNorm over frames): a
# diffusers folder of such a UNet would compute something else, so none is written.
_NOT_IN_DIFFUSERS = {
    "dynamics_adapter": "the Dynamics-Adapter (attn1.to_q_ff / to_out_ff)",
    "ip_adapter_tokens": "IP-Adapter projections inside the UNet (attn2.to_k_ip / to_v_ip)",
    "skip_reference_frame": "the reference frame kept out of temporal attention",
    "groupnorm_over_frames": "ResNet GroupNorm statistics pooled over frames (AnimateDiff v1)",
}


def _load(path: Path):
    try:
        return xdyna_jax.load(path)
    except BundleError as e:
        raise ConversionError(str(e)) from e


def bundle_torch_state(bundle: str | Path, expected_kind: str | None = None) -> dict[str, np.ndarray]:
    """One bundle as a PyTorch-named, PyTorch-laid-out float32 state dict, built tensor by tensor.

    Each param is read as a host array and dropped once its PyTorch-layout copy exists, so this holds one
    copy of the model. A video UNet with motion modules gets the `pos_encoder.pe` buffers its files carry.
    """
    bundle = Path(bundle)
    try:
        kind = read_meta(bundle)["kind"]
        params = read_params(bundle, expected_kind=expected_kind, param_dtype="float32")
    except BundleError as e:
        raise ConversionError(str(e)) from e
    out = {}
    for path in list(params):
        value = params.pop(path)
        out[torch_key(path)] = np.ascontiguousarray(to_torch_layout(path[-1], value))
        del value
    if kind == "video_unet":
        model = build_abstract(bundle)  # shapes only: the pe tables depend on the config alone
        if model.config.motion_modules:
            out = with_pe_buffers(model, out)
    return out


def write_state_file(state: dict[str, np.ndarray], output: Path, *, overwrite: bool = False) -> Path:
    """A flat state dict as .safetensors or a torch pickle (.ckpt/.pth/.pt/.bin), atomically."""
    output = Path(output)
    if output.suffix != ".safetensors" and output.suffix not in _TORCH_PICKLES:
        raise ConversionError(
            f"a state dict file is .safetensors or one of {list(_TORCH_PICKLES)}; got {output}"
        )
    refuse_existing_output(output, overwrite)
    if output.suffix == ".safetensors":
        write_safetensors(state, output, metadata={"format": "pt"})
        return output
    import torch

    with atomic_file(output) as tmp:  # torch.save streams tensor by tensor from the shared numpy buffers
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp)
    return output


def _refuse_video_unet(bundle: Path, config: dict) -> None:
    found = [what for field, what in _NOT_IN_DIFFUSERS.items() if config.get(field)]
    if config.get("motion_modules") and not config.get("motion_groupnorm_across_frames"):
        found.append(
            "motion-module GroupNorm per frame (the original AnimateDiff's; diffusers pools over frames)"
        )
    raise ConversionError(
        f"{bundle} is a video UNet bundle; a diffusers UNet2DConditionModel folder would silently drop its "
        "motion modules"
        + (f", and diffusers' UNetMotionModel lacks {'; '.join(found)}" if found else "")
        + ". Export it with --layout release (the flat state dict X-Dyna / AnimateDiff load); its motion modules "
        "alone go to a diffusers MotionAdapter folder with convert.animatediff.export_motion_modules"
    )


def torch_state_and_config(bundle: Path) -> tuple[str, dict[str, np.ndarray], dict]:
    """(kind, PyTorch-named state dict, diffusers/transformers config.json dict) of one bundle."""
    try:
        meta = read_meta(bundle)
    except BundleError as e:
        raise ConversionError(str(e)) from e
    kind = meta["kind"]
    if kind in _OWN_EXPORT:
        raise ConversionError(f"{bundle} is a {kind!r} bundle; export it with {_OWN_EXPORT[kind]}")
    if kind == "video_unet":
        _refuse_video_unet(bundle, meta["config"])
    if kind == "clip_text":  # transformers' names differ from the module's: the module does the renaming
        model = _load(bundle)
        return kind, export_clip_text_state(model), model.config.to_transformers()
    config = build_abstract(bundle).config
    state = bundle_torch_state(bundle)
    return kind, state, config.to_transformers() if kind == "clip_vision" else config.to_diffusers()


def _write_component(bundle: Path, out: Path) -> str:
    kind, state, config = torch_state_and_config(bundle)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    write_safetensors(state, out / f"{_WEIGHTS_NAME.get(kind, 'diffusion_pytorch_model')}.safetensors")
    return kind


def _cogvideox_family(src: Path) -> str | None:
    """Whether src is a CogVideoX-family pipeline bundle ("pipeline"), model bundle ("bundle") or neither."""
    from convert.cogvideox_folder import EXPORT_KINDS, PIPELINE_KINDS

    try:
        if (src / "model.json").is_file():
            return "bundle" if read_meta(src)["kind"] in EXPORT_KINDS else None
        if (src / "manifest.json").is_file():
            return (
                "pipeline"
                if read_json(src / "manifest.json", "manifest").get("kind") in PIPELINE_KINDS
                else None
            )
    except BundleError as e:
        raise ConversionError(str(e)) from e
    return None


def export_diffusers(src: Path, output: Path, overwrite: bool = False) -> Path:
    # CogVideoX / DynamiCtrl: sharded safetensors in the bundle's stored dtype (bf16 stays bf16)
    family = _cogvideox_family(src)
    if family == "pipeline":
        from convert.cogvideox_folder import export_pipeline_folder

        return export_pipeline_folder(src, output, overwrite=overwrite)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        if family == "bundle":
            from convert.cogvideox_folder import export_bundle

            export_bundle(src, tmp)
            return output
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
            cls = read_json(src / "scheduler" / "scheduler_config.json", "scheduler config").get(
                "_class_name"
            )
            index["scheduler"] = ["diffusers", cls or "DDIMScheduler"]
        write_json(tmp / "model_index.json", index)
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
    unet_state = ldm_keys.diffusers_unet_to_ldm(
        export_torch_state(unet), **ldm_keys.unet_structure(unet.config)
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
    refuse_existing_output(output, overwrite)
    write_safetensors(single_file_state(src), output, metadata={"format": "pt"})
    return output


def export_release(src: Path, output: Path, overwrite: bool = False) -> Path:
    """X-Dyna's release layout: a pipeline folder -> its .ckpt files; one unet/controlnet bundle -> one file."""
    from convert.xdyna import RELEASE_FILES  # convert.xdyna imports the converters, which import this module

    if (src / "model.json").is_file():
        try:
            kind = read_meta(src)["kind"]
        except BundleError as e:
            raise ConversionError(str(e)) from e
        if kind not in ("video_unet", "controlnet"):
            raise ConversionError(
                f"{src} holds a {kind!r} bundle; the release layout has only the UNet and ControlNets"
            )
        return write_state_file(bundle_torch_state(src, kind), output, overwrite=overwrite)
    parts = [name for name in RELEASE_FILES if (src / name / "model.json").is_file()]
    if "unet" not in parts:
        raise ConversionError(f"{src} is neither an X-Dyna pipeline folder (no unet/ bundle) nor one bundle")
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        for name in parts:
            kind = "video_unet" if name == "unet" else "controlnet"
            write_state_file(bundle_torch_state(src / name, kind), tmp / RELEASE_FILES[name][0])
            release_memory()  # the previous part's arrays go before the next one is read
    return output


LAYOUTS = {"diffusers": export_diffusers, "single-file": export_single_file, "release": export_release}


def export(input: str | Path, output: str | Path, layout: str, overwrite: bool = False) -> Path:
    src, output = Path(input), Path(output)
    if not src.is_dir():
        raise ConversionError(f"no such bundle folder: {src}")
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}; use one of {sorted(LAYOUTS)}")
    return LAYOUTS[layout](src, output, overwrite)


def add_arguments(p) -> None:
    p.add_argument(
        "--input", required=True, help="a `convert sd15` or `convert xdyna` output folder, or one bundle"
    )
    p.add_argument(
        "--output",
        required=True,
        help="output folder (diffusers, release) or file (.safetensors single-file; one bundle's release file)",
    )
    p.add_argument("--layout", choices=tuple(LAYOUTS), default="diffusers")
    p.add_argument("--overwrite", action="store_true")


def run(args) -> Path:
    return export(args.input, args.output, args.layout, overwrite=args.overwrite)
