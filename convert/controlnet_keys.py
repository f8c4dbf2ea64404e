"""ControlNet key names: original lllyasviel layout (`control_model.*`) <-> diffusers ControlNetModel.

The encoder half uses the UNet's rows (convert.ldm_keys); the ControlNet's own parts are
  input_hint_block.0 <-> controlnet_cond_embedding.conv_in
  input_hint_block.{2,4,...,2n} <-> controlnet_cond_embedding.blocks.{0..n-1}   (odd indices are SiLUs)
  input_hint_block.{2n+2} <-> controlnet_cond_embedding.conv_out
  zero_convs.{i}.0 <-> controlnet_down_blocks.{i};  middle_block_out.0 <-> controlnet_mid_block
One table (convert.key_tables) serves both directions, so they are exact inverses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from convert.key_tables import PARAM, KeyTable, Row
from convert.ldm_keys import unet_encoder_rows, unet_structure
from xdyna_jax.models.controlnet import ControlNetConfig

CONTROL_PREFIX = "control_model."


def controlnet_rows(config: ControlNetConfig) -> list[Row]:
    """Every prefix of a ControlNet with `config`'s block structure, original -> diffusers."""
    structure = unet_structure(config)
    rows = unet_encoder_rows(**structure)
    # The condition embedding: conv_in, then a (same-width, stride-2) conv pair per width step, then conv_out.
    n_blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    embedding = "controlnet_cond_embedding."
    rows.append(("input_hint_block.0.", embedding + "conv_in.", PARAM))
    rows += [(f"input_hint_block.{2 * j + 2}.", f"{embedding}blocks.{j}.", PARAM) for j in range(n_blocks)]
    rows.append((f"input_hint_block.{2 * n_blocks + 2}.", embedding + "conv_out.", PARAM))
    # One zero conv per encoder output the UNet receives: conv_in, each resnet/attention slot, each downsampler.
    n_levels, lpb = structure["n_blocks"], structure["layers_per_block"]
    n_outputs = 1 + n_levels * lpb + (n_levels - 1)
    rows += [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.", PARAM) for i in range(n_outputs)]
    rows.append(("middle_block_out.0.", "controlnet_mid_block.", PARAM))
    return rows


def original_to_diffusers(sd: Mapping[str, Any], config: ControlNetConfig) -> dict[str, Any]:
    """Original ControlNet keys (without `control_model.`) -> diffusers ControlNetModel keys."""
    return KeyTable(controlnet_rows(config)).to_diffusers(sd, "original ControlNet -> diffusers")


def diffusers_to_original(sd: Mapping[str, Any], config: ControlNetConfig) -> dict[str, Any]:
    """Exact inverse of `original_to_diffusers` (keys without `control_model.`)."""
    return KeyTable(controlnet_rows(config)).to_original(sd, "diffusers ControlNet -> original")
