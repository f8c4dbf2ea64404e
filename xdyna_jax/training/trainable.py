"""Named trainable sets: which parameters a training run updates, as predicates on parameter paths.

A set is an nnx filter `(path, variable) -> bool`; `nnx.split(model, trainable_filter(name, model), ...)`
puts the selected parameters apart from the frozen rest. Paths are the model's own attribute names, which
are the PyTorch key names (`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q_ff.kernel`),
so a set names exactly what a converted checkpoint calls those weights.

    stage1  X-Dyna stage 1 (paper 4.1): the Dynamics-Adapter's new projections (`to_q_ff`, `to_out_ff` of
            every attn1), the pose ControlNet and the UNet's motion modules; SD 1.5 and the IP-Adapter stay
            frozen.
    stage2  X-Dyna stage 2: the S-Face ControlNet only.
    all     every parameter of the model (a small model trained from scratch).
    vae     a VAE (AutoencoderKL) trained on its own, from scratch: all of its parameters. An X-Dyna
            denoiser never trains its VAE (latents are computed outside it), so naming this set for a
            denoiser is an error, as is naming a denoiser's set for a VAE.
    transformer  DynamiCtrl's (or CogVideoX's) whole DiT, as the release fine-tunes it, except the learned
            position table `patch_embed.pos_embedding` of 1.0-style configs: diffusers holds it as a buffer,
            so no PyTorch run ever updates it. VAE and T5 stay outside the model (precomputed latents).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx

ADAPTER_LEAVES = ("to_q_ff", "to_out_ff")  # the Dynamics-Adapter's trainable projections inside attn1


def _stage1(path: tuple) -> bool:
    if path[0] == "pose_controlnet":
        return True
    if path[0] != "unet":
        return False
    return "motion_modules" in path or any(p in path for p in ADAPTER_LEAVES)


def _stage2(path: tuple) -> bool:
    return path[0] == "face_controlnet"


def _everything(path: tuple) -> bool:
    return True


def _dit(path: tuple) -> bool:
    return path[-1] != "pos_embedding"


@dataclasses.dataclass(frozen=True)
class TrainableSet:
    description: str
    model_kind: str | None  # "denoiser" | "vae" | "dit" | None (any model)
    selects: Callable[[tuple], bool]


TRAINABLE_SETS: dict[str, TrainableSet] = {
    "stage1": TrainableSet(
        "Dynamics-Adapter to_q_ff/to_out_ff + pose ControlNet + motion modules", "denoiser", _stage1
    ),
    "stage2": TrainableSet("S-Face ControlNet only", "denoiser", _stage2),
    "all": TrainableSet("every parameter (training from scratch)", None, _everything),
    "vae": TrainableSet("every parameter of a VAE trained from scratch", "vae", _everything),
    "transformer": TrainableSet(
        "the whole DynamiCtrl / CogVideoX transformer but its learned position table", "dit", _dit
    ),
}


class TrainableSetError(ValueError):
    """A trainable set that is unknown, or that does not fit the model it is applied to."""


def check_trainable_set(name: str) -> TrainableSet:
    """The set called `name`; an unknown name is one error listing the known sets (checked from the config,
    before any model is built or step compiled)."""
    if name not in TRAINABLE_SETS:
        known = "; ".join(f"{k} ({s.description})" for k, s in TRAINABLE_SETS.items())
        raise TrainableSetError(f"unknown trainable set {name!r}; known sets: {known}")
    return TRAINABLE_SETS[name]


def model_kind(model: nnx.Module) -> str:
    """'denoiser' for an XDynaDenoiser, 'vae' for an AutoencoderKL, 'dit' for a DynamiCtrl / CogVideoX
    transformer, else the class name."""
    name = type(model).__name__
    kinds = {
        "XDynaDenoiser": "denoiser",
        "AutoencoderKL": "vae",
        "DynamiCtrlTransformerModel": "dit",
        "CogVideoXTransformer3DModel": "dit",
    }
    return kinds.get(name, name)


def trainable_filter(name: str, model: nnx.Module):
    """The nnx filter of set `name` for `model`, checked to fit the model and to select something."""
    spec = check_trainable_set(name)
    kind = model_kind(model)
    if spec.model_kind is not None and spec.model_kind != kind:
        raise TrainableSetError(
            f"trainable set {name!r} ({spec.description}) applies to a {spec.model_kind} model, "
            f"not to a {type(model).__name__}"
        )

    def selects(path, variable) -> bool:
        return isinstance(variable, nnx.Param) and spec.selects(tuple(path))

    if not any(selects(p, v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))):
        raise TrainableSetError(
            f"trainable set {name!r} ({spec.description}) selects no parameter of this "
            f"{type(model).__name__} (is the part it trains missing, e.g. no face ControlNet for stage2?)"
        )
    return selects


def trainable_paths(name: str, model: nnx.Module) -> list[tuple]:
    """The parameter paths set `name` selects in `model` (for logs and tests)."""
    selects = trainable_filter(name, model)
    return [tuple(p) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if selects(p, v)]
