"""Shared steps of the video-UNet converters (AnimateDiff, X-Dyna): motion keys, versions, pe buffers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

import xdyna_jax
from convert.animatediff_keys import check_pe, detect_motion_version
from convert.io import ConversionError, write_manifest
from convert.state import load_torch_state
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.nn.motion import sinusoidal_table
from xdyna_jax.nn.shape_only import shape_only_model

# AnimateDiff versions: pe length, mid-block module, resnet GroupNorm
# pooled over frames (v1's non-inflated GroupNorm) or per frame (v2/v3's InflatedGroupNorm).
VERSIONS = {
    "v1": dict(motion_max_len=24, motion_mid_block=False, groupnorm_over_frames=True),
    "v2": dict(motion_max_len=32, motion_mid_block=True, groupnorm_over_frames=False),
    "v3": dict(motion_max_len=32, motion_mid_block=False, groupnorm_over_frames=False),
}
PE_IGNORE = (r"\.pos_encoder\.pe$",)


def resolve_version(sd: dict, requested: str | None, source: str) -> str:
    """The file's AnimateDiff version; a requested one must agree with what the keys say."""
    if requested is not None and requested not in VERSIONS:
        raise ConversionError(f"unknown motion-module version {requested!r}; use one of {sorted(VERSIONS)}")
    try:
        found = detect_motion_version(sd)
    except ConversionError as e:
        if requested is None:
            raise ConversionError(f"{source}: {e}") from e
        found = None  # no pe buffer and no mid block: trust the user
    if requested is not None and found is not None and found != requested:
        raise ConversionError(
            f"{source}: --version {requested} given, but the weights are AnimateDiff {found}"
        )
    version = requested or found
    if found:  # the pe buffers present must be the sinusoidal table of this version's length
        check_pe(sd, VERSIONS[version]["motion_max_len"])
    return version


def motion_config(base: UNetConfig, version: str, **overrides) -> UNetConfig:
    return dataclasses.replace(base, motion_modules=True, **{**VERSIONS[version], **overrides})


def build_unet(config: UNetConfig, state: dict, source: str, ignore=PE_IGNORE) -> UNet:
    model = shape_only_model(UNet, config)
    return load_torch_state(model, state, source=source, ignore=ignore)


def with_pe_buffers(model: UNet, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the `pos_encoder.pe` buffers the original files carry (one per temporal attention)."""
    out = dict(state)
    length = model.config.motion_max_len
    for key, value in state.items():
        if key.endswith("attention_blocks.0.to_q.weight") and ".motion_modules." in key:
            table = sinusoidal_table(length, value.shape[1])[None].astype(np.float32)
            for i in (0, 1):
                out[key.replace("attention_blocks.0.to_q.weight", f"attention_blocks.{i}.pos_encoder.pe")] = (
                    table
                )
    return out


def save_with_manifest(model, tmp: Path, manifest: dict) -> None:
    xdyna_jax.save(model, tmp / "unet")
    write_manifest(tmp, manifest)
