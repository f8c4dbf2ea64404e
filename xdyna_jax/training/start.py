"""The models a run trains and the frozen parts around them, from the `--init` bundles.

    --init xdyna=DIR                          an X-Dyna pipeline bundle (`convert xdyna`, or one exported
                                              from training): continue training it, e.g. stage 2 on stage 1
    --init motion_unet=DIR --init ip_adapter=DIR --init sd15=DIR [--init pose_controlnet=DIR]
                                              stage 1 from converted bundles (training/init.py); sd15 is the
                                              `convert sd15` output, for its vae/, text_encoder/, tokenizer/
    [--init face_controlnet=DIR]              stage 2's S-Face ControlNet (default: made from the UNet)
    --init dynamictrl=DIR                     a DynamiCtrl pipeline bundle, with a DynamiCtrl config
                                              (training/dynamictrl_run.py)

A stage-2 run on a model without an S-Face ControlNet gets one (`add_face_controlnet`). Building the same
init twice gives the same models, which is what export relies on (training/export.py). Given a
`LogicalSharding(mesh, rules)`, every model is loaded straight onto its shards (training/init.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import xdyna_jax
from xdyna_jax.conditioning.clip_tokenizer import CLIPTokenizer
from xdyna_jax.nn.compute import Compute
from xdyna_jax.sharding import LogicalSharding
from xdyna_jax.training.init import InitError, TrainingModels, add_face_controlnet, init_stage1, resume

INIT_KEYS = {
    "xdyna": "X-Dyna pipeline bundle to continue from",
    "motion_unet": "video UNet bundle of `convert animatediff` (stage 1)",
    "ip_adapter": "`convert ip-adapter` output folder (stage 1)",
    "sd15": "`convert sd15` output folder: vae/, text_encoder/, tokenizer/ (stage 1)",
    "pose_controlnet": "ControlNet bundle to start the pose ControlNet from (stage 1, optional)",
    "face_controlnet": "ControlNet bundle to start the S-Face ControlNet from (stage 2, optional)",
    "dynamictrl": "DynamiCtrl pipeline bundle to fine-tune (a DynamiCtrl config; training/dynamictrl_run.py)",
}
STAGE1_REQUIRED = ("motion_unet", "ip_adapter", "sd15")


@dataclasses.dataclass
class RunModels:
    """What a training run needs: the denoiser and image-prompt encoders, the VAE, the text encoder and the
    tokenizer folder (copied into exported bundles)."""

    models: TrainingModels
    vae: object
    text_encoder: object
    tokenizer: Path


def parse_init(pairs: list[str] | dict) -> dict[str, str]:
    """`["key=DIR", ...]` -> {key: DIR}, checked: known keys, existing folders, a complete combination."""
    if isinstance(pairs, dict):
        init = dict(pairs)
    else:
        init = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not value:
                raise InitError(f"--init {pair!r}: expected KEY=DIR with KEY one of {sorted(INIT_KEYS)}")
            init[key] = value
    unknown = sorted(set(init) - set(INIT_KEYS))
    if unknown:
        known = "; ".join(f"{k} ({v})" for k, v in INIT_KEYS.items())
        raise InitError(f"--init: unknown bundle {unknown[0]!r}; known: {known}")
    for key, value in init.items():
        if not Path(value).is_dir():
            raise InitError(f"--init {key}={value}: no such folder")
    if "dynamictrl" in init:
        extra = sorted(set(init) - {"dynamictrl"})
        if extra:
            raise InitError(f"--init dynamictrl= is a whole DynamiCtrl bundle; drop --init {extra[0]}=")
    elif "xdyna" in init:
        extra = sorted(set(init) & {"motion_unet", "ip_adapter", "sd15", "pose_controlnet"})
        if extra:
            raise InitError(f"--init xdyna= already holds every part; drop --init {extra[0]}=")
    else:
        missing = [k for k in STAGE1_REQUIRED if k not in init]
        if missing:
            raise InitError(
                "--init: give xdyna=DIR, or motion_unet=, ip_adapter= and sd15= for stage 1 "
                f"(missing {', '.join(missing)})"
            )
    return init


def build_models(
    init: dict[str, str],
    trainable: str,
    compute: Compute,
    seed: int = 0,
    sharding: LogicalSharding | None = None,
) -> RunModels:
    """The run's models from checked `init` (see the module docstring), on `sharding` (None: one device)."""
    if "dynamictrl" in init:
        raise InitError("--init dynamictrl= trains with a DynamiCtrl config (train.py --config dynamictrl)")
    if "xdyna" in init:
        models, pipe = resume(init["xdyna"], compute=compute, sharding=sharding)
        vae, text_encoder = pipe.vae, pipe.text_encoder
        tokenizer = Path(init["xdyna"]) / "tokenizer"
    else:
        models = init_stage1(
            init["motion_unet"],
            init["ip_adapter"],
            pose_controlnet=init.get("pose_controlnet"),
            compute=compute,
            seed=seed,
            sharding=sharding,
        )
        sd15 = Path(init["sd15"])
        vae = xdyna_jax.load(sd15 / "vae", sharding=sharding, compute=compute, expected_kind="vae")
        text_encoder = xdyna_jax.load(
            sd15 / "text_encoder", sharding=sharding, compute=compute, expected_kind="clip_text"
        )
        tokenizer = sd15 / "tokenizer"
    if trainable == "stage2" and models.denoiser.face_controlnet is None:
        models = add_face_controlnet(
            models, init.get("face_controlnet"), compute=compute, seed=seed, sharding=sharding
        )
    if models.image_encoder is None or models.resampler is None:
        raise InitError("the init bundles hold no image_encoder/ and resampler/: the IP tokens need them")
    if not (tokenizer / "vocab.json").is_file():
        raise InitError(f"{tokenizer}: no tokenizer folder (vocab.json, merges.txt) for the empty prompt")
    return RunModels(models, vae, text_encoder, tokenizer)


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(folder)
