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

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

import xdyna_jax
from convert import ldm_keys
from convert.clip_text import load_clip_text_state
from convert.io import ConversionError, atomic_output_dir, find_weights_file, read_state_dict
from convert.state import load_torch_state
from xdyna_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from xdyna_jax.models.clip_tokenizer import CLIPTokenizer
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


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"missing config file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e


def _config(make, path: Path, *args):
    try:
        return make(_read_json(path), *args)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{path}: {e}") from e


def read_diffusers_folder(src: Path) -> dict[str, Part]:
    for sub in ("unet", "vae", "text_encoder"):
        if not (src / sub).is_dir():
            raise ConversionError(f"{src} is not a diffusers Stable Diffusion folder: {src / sub} is missing")
    parts = {}
    f = find_weights_file(src / "unet", "diffusion_pytorch_model")
    parts["unet"] = Part(
        _config(UNetConfig.from_diffusers, src / "unet/config.json"), read_state_dict(f), str(f)
    )
    f = find_weights_file(src / "vae", "diffusion_pytorch_model")
    vae_state = ldm_keys.normalize_legacy_vae_keys(read_state_dict(f))
    parts["vae"] = Part(_config(VAEConfig.from_diffusers, src / "vae/config.json"), vae_state, str(f))
    f = find_weights_file(src / "text_encoder", ("model", "pytorch_model"))
    clip_cfg = _config(CLIPTextConfig.from_transformers, src / "text_encoder/config.json")
    parts["text_encoder"] = Part(clip_cfg, read_state_dict(f), str(f))
    return parts


def _shape(state: dict, key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"{source}: expected key {key!r} is missing; not an SD 1.x checkpoint?")
    return tuple(state[key].shape)


def _sd15_configs(
    unet: dict, vae: dict, clip: dict, source: str
) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig]:
    """SD 1.5's architecture, with the few sizes that variants change read off the tensors."""
    mc, cin = _shape(unet, "input_blocks.0.0.weight", source)[:2]
    to_k = _shape(unet, "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", source)
    proj_in = _shape(unet, "input_blocks.1.1.proj_in.weight", source)
    unet_cfg = UNetConfig(
        in_channels=cin,
        block_out_channels=(mc, 2 * mc, 4 * mc, 4 * mc),
        cross_attention_dim=to_k[1],
        use_linear_projection=len(proj_in) == 2,
    )
    vocab, hidden = _shape(clip, "text_model.embeddings.token_embedding.weight", source)
    positions = _shape(clip, "text_model.embeddings.position_embedding.weight", source)[0]
    layers = 1 + max(int(k.split(".")[3]) for k in clip if k.startswith("text_model.encoder.layers."))
    inter = _shape(clip, "text_model.encoder.layers.0.mlp.fc1.weight", source)[0]
    clip_cfg = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=positions,
    )
    vc = _shape(vae, "encoder.conv_in.weight", source)[0]
    vae_cfg = VAEConfig(block_out_channels=(vc, 2 * vc, 4 * vc, 4 * vc))
    return unet_cfg, vae_cfg, clip_cfg


def read_single_file(path: Path, config_from: Path | None = None, use_ema: bool = False) -> dict[str, Part]:
    sd = read_state_dict(path)
    unet, vae, clip, ignored = ldm_keys.split_single_file(sd, use_ema=use_ema)
    clip = ldm_keys.ldm_clip_to_diffusers(clip)
    if config_from is not None:
        unet_cfg = _config(UNetConfig.from_diffusers, config_from / "unet/config.json")
        vae_cfg = _config(VAEConfig.from_diffusers, config_from / "vae/config.json")
        clip_cfg = _config(CLIPTextConfig.from_transformers, config_from / "text_encoder/config.json")
    else:
        unet_cfg, vae_cfg, clip_cfg = _sd15_configs(unet, vae, clip, str(path))
    attention = tuple(t.startswith("CrossAttn") for t in unet_cfg.down_block_types)
    unet = ldm_keys.ldm_unet_to_diffusers(
        unet, layers_per_block=unet_cfg.layers_per_block, n_blocks=len(attention), attention_blocks=attention
    )
    vae = ldm_keys.ldm_vae_to_diffusers(vae, n_blocks=len(vae_cfg.block_out_channels))
    src = str(path)
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
        (tmp / "scheduler").mkdir()
        if scheduler is not None and scheduler.is_file():
            shutil.copy(scheduler, tmp / "scheduler" / "scheduler_config.json")
        else:
            cfg = {"_class_name": "DDIMScheduler", **SD15_SCHEDULER.to_diffusers()}
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer is not None:
            _copy_tokenizer(Path(tokenizer), tmp / "tokenizer")
        else:
            print("note: no tokenizer written (a single file has none); pass --tokenizer DIR to include one")
        manifest["tokenizer"] = str(Path(tokenizer).absolute()) if tokenizer else None
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
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
