"""`python -m convert sd15`: a Stable Diffusion 1.x checkpoint -> unet / vae / text_encoder bundles.

Two source layouts:
  * a diffusers folder (unet/ vae/ text_encoder/ tokenizer/ [scheduler/]), safetensors or .bin, fp32 or fp16;
  * an original single file (.safetensors / .ckpt) with `model.diffusion_model.*`, `first_stage_model.*`,
    `cond_stage_model.transformer.*`; its architecture is SD 1.5's (read off the tensor shapes) unless
    `config_from` names a diffusers folder whose config.json files describe it.
Every source key is used or on an explicit ignore list; every parameter is filled; otherwise one
ConversionError lists what is missing, unexpected or mis-shaped. Output appears atomically.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

import xdyna_jax
from convert import ldm_keys
from convert.clip_text import load_clip_text_state
from convert.io import (
    ConversionError,
    atomic_output_dir,
    find_weights_file,
    read_json,
    read_state_dict,
    write_manifest,
    write_scheduler_config,
)
from convert.sd_structure import sd1x_unet_fields
from convert.state import load_torch_state, tensor_shape
from xdyna_jax.conditioning.clip_tokenizer import CLIPTokenizer
from xdyna_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.models.vae import AutoencoderKL, VAEConfig
from xdyna_jax.nn.shape_only import shape_only_model
from xdyna_jax.schedulers import DDIMConfig

# SD 1.5's own scheduler settings, written when the source carries no scheduler config (single files).
SD15_SCHEDULER = DDIMConfig(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
)


@dataclass
class Part:
    """One model read from the source: its config, PyTorch-named weights and where they came from."""

    config: object
    state: dict
    source: str
    ignored: list[str] = field(default_factory=list)


def _config(make, path: Path, *args):
    try:
        return make(read_json(path, "config"), *args)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{path}: {e}") from e


def read_diffusers_folder(
    src: Path, names: tuple[str, ...] = ("unet", "vae", "text_encoder")
) -> dict[str, Part]:
    """The parts `names` of a diffusers SD folder (the others are not read: X-Dyna needs no SD UNet)."""
    for sub in names:
        if not (src / sub).is_dir():
            raise ConversionError(f"{src} is not a diffusers Stable Diffusion folder: {src / sub} is missing")
    parts = {}
    if "unet" in names:
        f = find_weights_file(src / "unet", "diffusion_pytorch_model")
        parts["unet"] = Part(
            _config(UNetConfig.from_diffusers, src / "unet/config.json"), read_state_dict(f), str(f)
        )
    if "vae" in names:
        f = find_weights_file(src / "vae", "diffusion_pytorch_model")
        vae_state = ldm_keys.normalize_legacy_vae_keys(read_state_dict(f))
        parts["vae"] = Part(_config(VAEConfig.from_diffusers, src / "vae/config.json"), vae_state, str(f))
    if "text_encoder" in names:
        f = find_weights_file(src / "text_encoder", ("model", "pytorch_model"))
        clip_cfg = _config(CLIPTextConfig.from_transformers, src / "text_encoder/config.json")
        parts["text_encoder"] = Part(clip_cfg, read_state_dict(f), str(f))
    return parts


_NOT_SD1X = "not an SD 1.x checkpoint?"


def _sd15_configs(vae: dict, clip: dict, source: str) -> tuple[VAEConfig, CLIPTextConfig]:
    """SD 1.5's VAE and text encoder, with the few sizes that variants change read off the tensors."""

    def shape(state: dict, key: str) -> tuple[int, ...]:
        return tensor_shape(state, key, source, _NOT_SD1X)

    vocab, hidden = shape(clip, "text_model.embeddings.token_embedding.weight")
    positions = shape(clip, "text_model.embeddings.position_embedding.weight")[0]
    layers = 1 + max(int(k.split(".")[3]) for k in clip if k.startswith("text_model.encoder.layers."))
    inter = shape(clip, "text_model.encoder.layers.0.mlp.fc1.weight")[0]
    clip_cfg = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=positions,
    )
    vc = shape(vae, "encoder.conv_in.weight")[0]
    return VAEConfig(block_out_channels=(vc, 2 * vc, 4 * vc, 4 * vc)), clip_cfg


def read_single_file(path: Path, config_from: Path | None = None, use_ema: bool = False) -> dict[str, Part]:
    sd = read_state_dict(path)
    src = str(path)
    unet, vae, clip, ignored = ldm_keys.split_single_file(sd, use_ema=use_ema)
    clip = ldm_keys.ldm_clip_to_diffusers(clip)
    if config_from is not None:
        unet_cfg = _config(UNetConfig.from_diffusers, config_from / "unet/config.json")
        vae_cfg = _config(VAEConfig.from_diffusers, config_from / "vae/config.json")
        clip_cfg = _config(CLIPTextConfig.from_transformers, config_from / "text_encoder/config.json")
        unet = ldm_keys.ldm_unet_to_diffusers(unet, **ldm_keys.unet_structure(unet_cfg))
    else:  # SD 1.5's block structure; the sizes are read off the renamed tensors
        unet = ldm_keys.ldm_unet_to_diffusers(unet, **ldm_keys.unet_structure(UNetConfig()))
        unet_cfg = UNetConfig(**sd1x_unet_fields(unet, src, _NOT_SD1X))
        vae_cfg, clip_cfg = _sd15_configs(vae, clip, src)
    vae = ldm_keys.ldm_vae_to_diffusers(vae, n_blocks=len(vae_cfg.block_out_channels))
    return {
        "unet": Part(unet_cfg, unet, src, ignored),
        "vae": Part(vae_cfg, vae, src),
        "text_encoder": Part(clip_cfg, clip, src),
    }


def build_unet(part: Part) -> UNet:
    model = shape_only_model(UNet, part.config)
    return load_torch_state(model, part.state, source=f"{part.source} (unet)")


def build_vae(part: Part) -> AutoencoderKL:
    model = shape_only_model(AutoencoderKL, part.config)
    return load_torch_state(model, part.state, source=f"{part.source} (vae)")


def build_text_encoder(part: Part) -> CLIPTextModel:
    model = shape_only_model(CLIPTextModel, part.config)
    return load_clip_text_state(model, part.state, source=f"{part.source} (text_encoder)")


BUILDERS = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder}


def _copy_tokenizer(folder: Path, out: Path) -> None:
    try:
        CLIPTokenizer.from_folder(folder)  # fails clearly if vocab.json / merges.txt are missing or broken
    except (OSError, ValueError) as e:
        raise ConversionError(f"tokenizer: {e}") from e
    shutil.copytree(folder, out)


def convert_sd15(
    input: str | Path,
    output: str | Path,
    *,
    tokenizer: str | Path | None = None,
    config_from: str | Path | None = None,
    use_ema: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert `input` (diffusers folder or single file) into bundles under `output`; returns `output`."""
    src = Path(input)
    if not src.exists():
        raise ConversionError(f"no such file or folder: {src}")
    output = Path(output)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        if src.is_dir():
            parts = read_diffusers_folder(src)
            tokenizer = tokenizer or (src / "tokenizer" if (src / "tokenizer").is_dir() else None)
            scheduler = src / "scheduler" / "scheduler_config.json"
        else:
            parts = read_single_file(src, Path(config_from) if config_from else None, use_ema)
            scheduler = None
        manifest = {"converter": "sd15", "source": str(src.absolute()), "parts": {}}
        for name, part in tqdm(parts.items(), desc="convert sd15", disable=not progress):
            xdyna_jax.save(BUILDERS[name](part), tmp / name)
            manifest["parts"][name] = {"file": part.source, "ignored_keys": part.ignored}
            part.state.clear()  # free the source tensors before the next part
        if scheduler is not None and scheduler.is_file():
            write_scheduler_config(tmp, read_json(scheduler, "scheduler config"))
        else:
            write_scheduler_config(tmp, SD15_SCHEDULER.to_diffusers())
        if tokenizer is not None:
            _copy_tokenizer(Path(tokenizer), tmp / "tokenizer")
        else:
            print("note: no tokenizer written (a single file has none); pass --tokenizer DIR to include one")
        manifest["tokenizer"] = str(Path(tokenizer).absolute()) if tokenizer else None
        write_manifest(tmp, manifest)
    return output


def add_arguments(p) -> None:
    p.add_argument(
        "--input", required=True, help="diffusers SD1.5 folder, or a .safetensors/.ckpt single file"
    )
    p.add_argument("--output", required=True, help="output folder (unet/, vae/, text_encoder/, tokenizer/)")
    p.add_argument("--tokenizer", help="tokenizer folder (vocab.json, merges.txt) for a single-file input")
    p.add_argument(
        "--config-from", help="diffusers folder whose config.json files describe a non-SD1.5 single file"
    )
    p.add_argument(
        "--use-ema", action="store_true", help="single file: take the UNet from its model_ema.* copy"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args) -> Path:
    return convert_sd15(
        args.input,
        args.output,
        tokenizer=args.tokenizer,
        config_from=args.config_from,
        use_ema=args.use_ema,
        overwrite=args.overwrite,
    )
