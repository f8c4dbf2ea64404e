"""Pipeline bundles: a folder of model bundles plus tokenizer/, scheduler/ and manifest.json.

A converter (`python -m convert xdyna`) writes one model bundle per network and records the pipeline's
`kind` in manifest.json; `load_pipeline` reads that kind and hands the folder to the loader registered for
it, so a sampler can take any pipeline folder:

    pipe = load_pipeline("bundles/xdyna")          # an XDyna
    pipe = load_xdyna("bundles/xdyna", compute=Compute(dtype="bfloat16"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
from flax import nnx

from xdyna_jax.bundle import BundleError, load, read_bundle_json
from xdyna_jax.conditioning.clip_tokenizer import CLIPTokenizer
from xdyna_jax.conditioning.t5_tokenizer import T5Tokenizer
from xdyna_jax.models.xdyna import XDynaDenoiser
from xdyna_jax.nn.compute import Compute
from xdyna_jax.schedulers import DDIMConfig
from xdyna_jax.schedulers.cogvideox import CogVideoXSchedulerConfig
from xdyna_jax.sharding import LogicalSharding

MANIFEST = "manifest.json"

# The release's sampler: linear betas, steps_offset 1, no clipping; set_alpha_to_one keeps diffusers'
# default (True), as the release never overrides it. `convert xdyna` writes it as scheduler/.
XDYNA_SCHEDULER = DDIMConfig(
    beta_schedule="linear",
    beta_start=0.00085,
    beta_end=0.012,
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=True,
)


@dataclasses.dataclass
class XDyna:
    """Every part of a converted X-Dyna bundle (`python -m convert xdyna`); absent optional parts are None."""

    denoiser: XDynaDenoiser
    vae: nnx.Module
    text_encoder: nnx.Module
    tokenizer: CLIPTokenizer | None
    image_encoder: nnx.Module | None
    resampler: nnx.Module | None
    scheduler: DDIMConfig
    manifest: dict

    def image_tokens(self, pixel_values: jax.Array) -> jax.Array:
        """IP-Adapter-plus tokens: Resampler(CLIP vision penultimate hidden states) of CLIP-preprocessed images."""
        if self.image_encoder is None or self.resampler is None:
            raise ValueError("this X-Dyna bundle has no image_encoder/resampler (IP-Adapter) parts")
        return self.resampler(self.image_encoder(pixel_values).hidden_states[-2])


def read_manifest(path: str | Path) -> dict:
    """A pipeline folder's manifest.json; it must name the pipeline's kind."""
    file = Path(path) / MANIFEST
    manifest = read_bundle_json(path, MANIFEST, "pipeline bundle")
    if "kind" not in manifest:
        raise BundleError(f"{file} names no pipeline kind (one of {sorted(PIPELINE_KINDS)})")
    if manifest["kind"] not in PIPELINE_KINDS:
        raise BundleError(
            f"{file}: unknown pipeline kind {manifest['kind']!r}; known kinds: {sorted(PIPELINE_KINDS)}"
        )
    return manifest


def _expect_kind(path: Path, kind: str) -> dict:
    manifest = read_manifest(path)
    if manifest["kind"] != kind:
        raise BundleError(f"{path / MANIFEST} describes a {manifest['kind']!r} pipeline, expected {kind!r}")
    return manifest


def load_xdyna(
    path: str | Path,
    *,
    compute: Compute | None = None,
    param_dtype: str | None = None,
    sharding: LogicalSharding | None = None,
) -> XDyna:
    """Load the folder written by `python -m convert xdyna`.

    compute overrides every model's compute settings; param_dtype casts every model's params while loading;
    sharding (`LogicalSharding(mesh, rules)`) restores every model's params straight onto their shards.
    """
    path = Path(path)
    manifest = _expect_kind(path, "xdyna")

    def part(name, kind, required=True):
        if not (path / name).is_dir():
            if required:
                raise BundleError(f"{path} is missing its {name}/ bundle")
            return None
        return load(
            path / name, sharding=sharding, compute=compute, expected_kind=kind, param_dtype=param_dtype
        )

    denoiser = XDynaDenoiser(
        part("unet", "video_unet"),
        part("controlnet_pose", "controlnet", False),
        part("controlnet_face", "controlnet", False),
    )
    tokenizer = CLIPTokenizer.from_folder(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    scheduler = read_bundle_json(path / "scheduler", "scheduler_config.json", "scheduler config folder")
    return XDyna(
        denoiser=denoiser,
        vae=part("vae", "vae"),
        text_encoder=part("text_encoder", "clip_text"),
        tokenizer=tokenizer,
        image_encoder=part("image_encoder", "clip_vision", False),
        resampler=part("resampler", "resampler", False),
        scheduler=DDIMConfig.from_diffusers(scheduler),
        manifest=manifest,
    )


@dataclasses.dataclass
class CogVideoX:
    """Every part of a converted CogVideoX pipeline bundle (`python -m convert cogvideox`)."""

    transformer: nnx.Module
    vae: nnx.Module
    text_encoder: nnx.Module
    tokenizer: T5Tokenizer
    scheduler: CogVideoXSchedulerConfig
    # the diffusers class the folder's scheduler config names (CogVideoXDDIMScheduler / CogVideoXDPMScheduler)
    scheduler_class: str
    manifest: dict


@dataclasses.dataclass
class DynamiCtrl(CogVideoX):
    """A converted DynamiCtrl bundle (`python -m convert dynamictrl`): `transformer` has control_norm1 blocks."""


def _load_cogvideox_family(path, kind, transformer_kind, cls, *, compute, param_dtype, sharding):
    path = Path(path)
    manifest = _expect_kind(path, kind)

    def part(name, part_kind):
        if not (path / name).is_dir():
            raise BundleError(f"{path} is missing its {name}/ bundle")
        return load(
            path / name, sharding=sharding, compute=compute, expected_kind=part_kind, param_dtype=param_dtype
        )

    if not (path / "tokenizer").is_dir():
        raise BundleError(f"{path} is missing its tokenizer/ folder")
    scheduler = read_bundle_json(path / "scheduler", "scheduler_config.json", "scheduler config folder")
    return cls(
        transformer=part("transformer", transformer_kind),
        vae=part("vae", "cogvideox_vae"),
        text_encoder=part("text_encoder", "t5_encoder"),
        tokenizer=T5Tokenizer.from_folder(path / "tokenizer"),
        scheduler=CogVideoXSchedulerConfig.from_diffusers(scheduler),
        scheduler_class=scheduler.get("_class_name", "CogVideoXDDIMScheduler"),
        manifest=manifest,
    )


def load_cogvideox(
    path: str | Path,
    *,
    compute: Compute | None = None,
    param_dtype: str | None = None,
    sharding: LogicalSharding | None = None,
) -> CogVideoX:
    """Load the folder written by `python -m convert cogvideox` (options as for `load_xdyna`)."""
    return _load_cogvideox_family(
        path,
        "cogvideox",
        "cogvideox_transformer",
        CogVideoX,
        compute=compute,
        param_dtype=param_dtype,
        sharding=sharding,
    )


def load_dynamictrl(
    path: str | Path,
    *,
    compute: Compute | None = None,
    param_dtype: str | None = None,
    sharding: LogicalSharding | None = None,
) -> DynamiCtrl:
    """Load the folder written by `python -m convert dynamictrl` (options as for `load_xdyna`).

    Params keep the bundle's dtype (bf16 for the release) unless param_dtype says otherwise.
    """
    return _load_cogvideox_family(
        path,
        "dynamictrl",
        "dynamictrl_transformer",
        DynamiCtrl,
        compute=compute,
        param_dtype=param_dtype,
        sharding=sharding,
    )


# pipeline kind (manifest.json "kind") -> its loader(path, compute=..., param_dtype=...)
PIPELINE_KINDS: dict[str, Callable[..., object]] = {
    "xdyna": load_xdyna,
    "cogvideox": load_cogvideox,
    "dynamictrl": load_dynamictrl,
}


def load_pipeline(path: str | Path, *, compute: Compute | None = None, param_dtype: str | None = None):
    """Load any pipeline bundle, dispatching on the kind its manifest.json records."""
    kind = read_manifest(path)["kind"]
    return PIPELINE_KINDS[kind](path, compute=compute, param_dtype=param_dtype)
