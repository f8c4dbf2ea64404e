"""An X-Dyna pipeline folder with every part freshly initialised, for training from scratch.

    python -m xdyna_jax.training.scratch --config configs/train_xdyna.py:synthetic --out bundles/synthetic_init
    python train.py --config configs/train_xdyna.py:synthetic_vae --init xdyna=bundles/synthetic_init ...

The config's `model` section names every part (unet, vae, controlnet_pose, optional controlnet_face,
image_encoder, resampler, text_encoder; configs/synthetic.py is the small one) and its `tokenizer` section
the tokenizer's size (vocab_size, model_max_length): the tokenizer is trained here (training/vocab.py).
The folder has the layout `convert xdyna` writes, so train.py's `--init xdyna=` starts from it.

The weights are drawn on the host with numpy (building the models eagerly would compile one XLA kernel per
parameter shape: about a minute for this small model on a CPU), from one seed, with the distributions the
modules' own Flax initialisers use: every kernel N(0, 1 / fan_in) (fan_in = all axes but the output one),
biases 0, norm scales 1; token and position tables N(0, 0.02) as CLIP's, CLIP's class embedding and the
Resampler's queries N(0, 1 / width). The parts that the usual recipes add to a working network start at
zero, so at step 0 they add nothing and the network they join trains as itself: the ControlNets' zero
convs and condition-embedding output conv, the Dynamics-Adapter's `to_out_ff`, and the motion modules'
`proj_out` (AnimateDiff's zero initialisation).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import xdyna_jax
from xdyna_jax.bundle import read_params
from xdyna_jax.conditioning.clip_tokenizer import CLIPTokenizer
from xdyna_jax.io.atomic import atomic_folder
from xdyna_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from xdyna_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from xdyna_jax.models.controlnet import ControlNetConfig, ControlNetModel
from xdyna_jax.models.resampler import Resampler, ResamplerConfig
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.models.vae import AutoencoderKL, VAEConfig
from xdyna_jax.models.xdyna import XDynaDenoiser
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model
from xdyna_jax.sampling.bundles import MANIFEST, XDYNA_SCHEDULER, XDyna
from xdyna_jax.training.vocab import write_tokenizer_folder

# part name -> (config class, model class, bundle folder); the order fixes each part's seed
PARTS = {
    "unet": (UNetConfig, UNet),
    "controlnet_pose": (ControlNetConfig, ControlNetModel),
    "controlnet_face": (ControlNetConfig, ControlNetModel),
    "vae": (VAEConfig, AutoencoderKL),
    "text_encoder": (CLIPTextConfig, CLIPTextModel),
    "image_encoder": (CLIPVisionConfig, CLIPVisionModelWithProjection),
    "resampler": (ResamplerConfig, Resampler),
}
REQUIRED = ("unet", "vae", "text_encoder", "image_encoder", "resampler")
# tables read as N(0, 0.02) (CLIP's initializer range)
TABLE_STD = 0.02


class ScratchError(ValueError):
    """A config that cannot build a from-scratch X-Dyna (missing part, mismatched widths)."""


def _zero_at_start(path: tuple) -> bool:
    """Parameters that start at zero (see the module docstring)."""
    if path[0] in ("controlnet_down_blocks", "controlnet_mid_block"):
        return True
    if path[:2] == ("controlnet_cond_embedding", "conv_out"):
        return True
    if "to_out_ff" in path:
        return True
    return "motion_modules" in path and "proj_out" in path and "temporal_transformer" in path


def initial_value(path: tuple, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A fresh float32 value for the parameter at `path` (see the module docstring)."""
    leaf = path[-1]
    if _zero_at_start(path) or leaf == "bias":
        return np.zeros(shape, np.float32)
    if leaf == "scale":
        return np.ones(shape, np.float32)
    if leaf == "embedding":
        return (TABLE_STD * rng.standard_normal(shape)).astype(np.float32)
    if leaf in ("class_embedding", "latents"):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    if leaf == "kernel":
        fan_in = int(np.prod(shape[:-1]))
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    raise ScratchError(f"no initialiser for parameter {'.'.join(map(str, path))} {shape}")


def random_model(model_cls, config, seed: int | list[int]) -> nnx.Module:
    """`model_cls(config)` with every parameter drawn by `initial_value` from `seed` (host numpy; an int
    or a list of ints, as numpy seeds take), in the model's parameter order."""
    model = shape_only_model(model_cls, config)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(initial_value(tuple(path), tuple(var.shape), rng)))
    return model


def part_configs(model: dict | ml_collections.ConfigDict, compute: Compute | None = None) -> dict:
    """{part: config dataclass} of a config's `model` section, checked to make one X-Dyna."""
    model = model.to_dict() if isinstance(model, ml_collections.ConfigDict) else dict(model)
    unknown = sorted(set(model) - set(PARTS))
    if unknown:
        raise ScratchError(f"config.model.{unknown[0]}: not an X-Dyna part (parts: {sorted(PARTS)})")
    missing = [p for p in REQUIRED if p not in model]
    if missing:
        raise ScratchError(f"config.model has no {missing[0]} section (an X-Dyna needs {list(REQUIRED)})")
    compute = (compute or Compute()).__dict__
    try:
        cfgs = {k: PARTS[k][0].from_dict({**dict(v), "compute": compute}) for k, v in model.items()}
    except (TypeError, ValueError) as e:
        raise ScratchError(f"config.model: {e}") from e
    cross = cfgs["unet"].cross_attention_dim
    widths = {
        "text_encoder.hidden_size": cfgs["text_encoder"].hidden_size,
        "resampler.output_dim": cfgs["resampler"].output_dim,
    }
    widths.update(
        {f"{k}.cross_attention_dim": cfgs[k].cross_attention_dim for k in cfgs if "controlnet" in k}
    )
    bad = {k: v for k, v in widths.items() if v != cross}
    if bad:
        raise ScratchError(f"config.model: these widths must equal unet.cross_attention_dim={cross}: {bad}")
    if cfgs["resampler"].embedding_dim != cfgs["image_encoder"].hidden_size:
        raise ScratchError(
            f"config.model: resampler.embedding_dim {cfgs['resampler'].embedding_dim} must be the image "
            f"encoder's hidden_size {cfgs['image_encoder'].hidden_size}"
        )
    if cfgs["resampler"].num_queries != cfgs["unet"].ip_adapter_tokens:
        raise ScratchError(
            f"config.model: resampler.num_queries {cfgs['resampler'].num_queries} must be "
            f"unet.ip_adapter_tokens {cfgs['unet'].ip_adapter_tokens}"
        )
    return cfgs


def assemble_xdyna(models: dict[str, nnx.Module], tokenizer: CLIPTokenizer | None) -> XDyna:
    """The models of `PARTS` (controlnets optional) as an `XDyna` with the release's scheduler."""
    return XDyna(
        denoiser=XDynaDenoiser(models["unet"], models.get("controlnet_pose"), models.get("controlnet_face")),
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=tokenizer,
        image_encoder=models["image_encoder"],
        resampler=models["resampler"],
        scheduler=XDYNA_SCHEDULER,
        manifest={"kind": "xdyna"},
    )


def random_xdyna(cfgs: dict, seed: int = 0, *, tokenizer: CLIPTokenizer | None = None) -> XDyna:
    """An XDyna of fresh models of `cfgs` (`part_configs`); part i draws from seed [seed, i]."""
    names = list(PARTS)
    models = {
        name: random_model(PARTS[name][1], cfg, [seed, names.index(name)]) for name, cfg in cfgs.items()
    }
    return assemble_xdyna(models, tokenizer)


def save_xdyna(parts: XDyna, tokenizer_folder: str | Path, folder: str | Path, manifest: dict) -> Path:
    """`parts` written as the pipeline folder `convert xdyna` writes (atomically: a temporary folder beside
    `folder`, renamed into place), its tokenizer copied from `tokenizer_folder`."""
    folder = Path(folder).absolute()
    if folder.exists():
        raise FileExistsError(f"{folder} already exists")
    models = {
        "unet": parts.denoiser.unet,
        "controlnet_pose": parts.denoiser.pose_controlnet,
        "controlnet_face": parts.denoiser.face_controlnet,
        "vae": parts.vae,
        "text_encoder": parts.text_encoder,
        "image_encoder": parts.image_encoder,
        "resampler": parts.resampler,
    }
    with atomic_folder(folder) as tmp:
        for name, module in models.items():
            if module is not None:
                xdyna_jax.save(module, tmp / name)
        shutil.copytree(tokenizer_folder, tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        scheduler = json.dumps(parts.scheduler.to_diffusers())
        (tmp / "scheduler" / "scheduler_config.json").write_text(scheduler)
        (tmp / MANIFEST).write_text(json.dumps({"kind": "xdyna", **manifest}, indent=2) + "\n")
    return folder


def write_scratch_bundle(cfg: ml_collections.ConfigDict, out: str | Path, *, seed: int = 0) -> Path:
    """Build every part of `cfg.model` fresh (seeded), train the tokenizer of `cfg.tokenizer`, and write
    the X-Dyna pipeline folder `out` (see the module docstring)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    if "model" not in cfg or "tokenizer" not in cfg:
        raise ScratchError("the config needs a `model` and a `tokenizer` section (see configs/synthetic.py)")
    cfgs = part_configs(cfg.model)
    tok = dict(cfg.tokenizer)
    text = cfgs["text_encoder"]
    if tok.get("vocab_size", text.vocab_size) != text.vocab_size:
        raise ScratchError(
            f"config.tokenizer.vocab_size {tok['vocab_size']} != text_encoder.vocab_size {text.vocab_size}"
        )
    length = int(tok.get("model_max_length", text.max_position_embeddings))
    if length > text.max_position_embeddings:
        raise ScratchError(
            f"config.tokenizer.model_max_length {length} exceeds the text encoder's "
            f"max_position_embeddings {text.max_position_embeddings}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tokenizer_folder(
            Path(tmp) / "tokenizer", vocab_size=text.vocab_size, model_max_length=length
        )
        tokenizer = CLIPTokenizer.from_folder(folder)
        text = dataclasses.replace(
            text, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        parts = random_xdyna({**cfgs, "text_encoder": text}, seed, tokenizer=tokenizer)
        manifest = {"converter": "xdyna_jax.training.scratch", "seed": int(seed)}
        return save_xdyna(parts, folder, out, manifest)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`FILE.py[:ARG]` -> the file's get_config([ARG]) (train.py's --config form)."""
    file, _, arg = spec.partition(":")
    path = Path(file)
    if path.suffix != ".py" or not path.is_file():
        raise ScratchError(f"--config {spec!r}: not an existing .py file")
    module_spec = importlib.util.spec_from_file_location(f"_scratch_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ScratchError(f"--config {path}: defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def parameter_counts(folder: str | Path) -> dict[str, int]:
    """{part: number of parameters} of a pipeline folder's model bundles."""
    folder = Path(folder)
    return {
        part: sum(v.size for v in read_params(folder / part).values())
        for part in PARTS
        if (folder / part).is_dir()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m xdyna_jax.training.scratch",
        description="Write an X-Dyna pipeline folder of freshly initialised models (training from scratch).",
    )
    p.add_argument("--config", default="configs/synthetic.py", help="FILE.py[:ARG] with model and tokenizer")
    p.add_argument("--out", required=True, help="pipeline folder to create (must not exist)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        out = write_scratch_bundle(load_config(args.config), args.out, seed=args.seed)
    except (ScratchError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = parameter_counts(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {sum(counts.values()):,} parameters, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
