"""Tiny DynamiCtrl pipeline bundles for the pipeline and CLI tests.

`tiny_dynamictrl_bundle(folder)` writes, from random tiny JAX modules, the folder `python -m convert
dynamictrl` writes (transformer/, vae/, text_encoder/ bundles, tokenizer/, scheduler/, manifest.json) in a
second or two. `converted_tiny_dynamictrl_release(root)` goes the long way instead: a fake release written by
the PyTorch classes (tests/oracle_dynamictrl_release.py), then `convert dynamictrl` (about 12 s).

Sizes: the tiny VAE downsamples by 4 with 4 latent channels, the transformer patches 2x2x2, so frames are
multiples of 8 pixels; the transformer's RoPE grid spans 4x4 tokens (frames up to 32x32). The VAE's sample
size is 64, so frames up to 32x32 are not tiled (tiles are half the sample size) unless a test asks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from oracle import random_torch_state
from oracle_cogvideox import TINY_COGVIDEOX_15
from oracle_dynamictrl_release import (
    SCHEDULER,
    SPM_VOCAB,
    TINY_COGVIDEOX_VAE,
    TINY_T5,
    write_release,
    write_tokenizer,
)

TINY_PIPELINE_VAE = dict(TINY_COGVIDEOX_VAE, sample_height=64, sample_width=64)


def random_module(model_cls, config, seed: int):
    """`model_cls(config)` with small random weights (norm scales near 1), built without an eager init."""
    from convert.state import load_torch_state
    from xdyna_jax.nn.shape_only import shape_only_model

    state = random_torch_state(model_cls, config, seed)
    return load_torch_state(shape_only_model(model_cls, config), state, source="test")


def tiny_dynamictrl_modules(
    *,
    seed: int = 0,
    invert_scale_latents: bool = True,
    vae: dict | None = None,
    transformer: dict | None = None,
):
    """(transformer, vae, text_encoder): random tiny DynamiCtrl parts, float32; `vae` and `transformer`
    override config fields (diffusers names)."""
    from xdyna_jax.models.cogvideox import CogVideoXConfig
    from xdyna_jax.models.dynamictrl import DynamiCtrlTransformerModel
    from xdyna_jax.models.t5 import T5Config, T5EncoderModel
    from xdyna_jax.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig

    vae_config = dict(TINY_PIPELINE_VAE, invert_scale_latents=invert_scale_latents, **(vae or {}))
    return (
        random_module(
            DynamiCtrlTransformerModel,
            CogVideoXConfig.from_diffusers(dict(TINY_COGVIDEOX_15, **(transformer or {}))),
            seed,
        ),
        random_module(AutoencoderKLCogVideoX, CogVideoXVAEConfig.from_diffusers(vae_config), seed + 1),
        random_module(
            T5EncoderModel,
            T5Config.from_transformers(dict(TINY_T5, vocab_size=SPM_VOCAB, model_type="t5")),
            seed + 2,
        ),
    )


def tiny_dynamictrl_bundle(
    folder: str | Path,
    *,
    seed: int = 0,
    invert_scale_latents: bool = True,
    vae: dict | None = None,
    transformer: dict | None = None,
) -> Path:
    """A DynamiCtrl pipeline bundle of random tiny modules at `folder` (which must not exist); its scheduler
    config names CogVideoXDDIMScheduler, as the release's does. transformer=dict(num_layers=1) halves the
    transformer's compile time."""
    from xdyna_jax import save

    folder = Path(folder)
    folder.mkdir(parents=True)
    transformer, vae_module, text_encoder = tiny_dynamictrl_modules(
        seed=seed, invert_scale_latents=invert_scale_latents, vae=vae, transformer=transformer
    )
    for name, module in (("transformer", transformer), ("vae", vae_module), ("text_encoder", text_encoder)):
        save(module, folder / name)
    write_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    config = {"_class_name": "CogVideoXDDIMScheduler", **SCHEDULER}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    manifest = {"kind": "dynamictrl", "converter": "tests/oracle_dynamictrl.py", "param_dtype": "float32"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def converted_tiny_dynamictrl_release(root: str | Path, *, seed: int = 0) -> Path:
    """A fake DynamiCtrl release written under root/release by the PyTorch classes (bf16), converted with
    `convert dynamictrl` to root/bundle; returns the bundle folder."""
    from convert.dynamictrl import convert_dynamictrl

    root = Path(root)
    write_release(root / "release", control=True, seed=seed)
    return convert_dynamictrl(root / "release", root / "bundle", progress=False)


def dancing_inputs(num_frames: int, height: int, width: int, *, seed: int = 0, reference_hw=(37, 23)):
    """(reference uint8 (h0, w0, 3), pose frames uint8 (num_frames, height, width, 3)): random images."""
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 256, (*reference_hw, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
    return reference, poses
