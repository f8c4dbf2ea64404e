"""IP-Adapter key names: the original numbered processors <-> the UNet's attn2 module paths.

IP-Adapter's `ip_adapter` group names its projections `{n}.to_k_ip.weight` / `{n}.to_v_ip.weight`, n = 1, 3,
5, ...: the n-th processor of diffusers' `unet.attn_processors`, where attn1 and attn2 alternate, so odd n are
the cross-attention (attn2) layers. Our UNet holds them at the attn2 paths
(`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k_ip.weight`). The rename is one table
(convert.key_tables), one row per attn2 layer, so both directions are exact inverses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from convert.io import ConversionError
from convert.key_tables import KeyTable, Rest, Row
from xdyna_jax.models.unet import UNetConfig
from xdyna_jax.models.unet_blocks import block_has_cross_attention

IP_PROJECTIONS = ("to_k_ip", "to_v_ip")
_IP_REST = Rest({p: p for p in IP_PROJECTIONS}, leaves=("weight",))
_ATTN2 = re.compile(
    r"^(down_blocks|up_blocks|mid_block)(?:\.(\d+))?\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$"
)
_GROUP_RANK = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


def ip_adapter_attn2_names(cfg: UNetConfig) -> list[str]:
    """The UNet's cross-attention (attn2) module paths in diffusers' `attn_processors` order.

    That order is the modules' registration order in diffusers' UNet2DConditionModel: down blocks, then up
    blocks, then the mid block (created after the up_blocks list is registered), each block's attentions and
    transformer blocks in index order. The k-th name owns IP-Adapter keys `{2k+1}.to_{k,v}_ip.weight`.
    """
    layers = range(cfg.transformer_layers_per_block)

    def block(prefix: str, n_attentions: int) -> list[str]:
        return [
            f"{prefix}.attentions.{j}.transformer_blocks.{t}.attn2"
            for j in range(n_attentions)
            for t in layers
        ]

    names = []
    for i, kind in enumerate(cfg.down_block_types):
        if block_has_cross_attention(kind):
            names += block(f"down_blocks.{i}", cfg.layers_per_block)
    for i, kind in enumerate(cfg.up_block_types):
        if block_has_cross_attention(kind):
            names += block(f"up_blocks.{i}", cfg.layers_per_block + 1)
    return names + block("mid_block", 1)


def _parse_attn2(name: str) -> tuple[str, int, int, int]:
    m = _ATTN2.match(name)
    if not m:
        raise ConversionError(
            f"{name!r} is not a UNet attn2 path (e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn2)"
        )
    group, block, attention, layer = m.groups()
    return group, int(block or 0), int(attention), int(layer)


def attn2_channels(cfg: UNetConfig, name: str) -> int:
    """The width of the attn2 layer at path `name` (the query side of its to_k_ip / to_v_ip outputs)."""
    group, index = _parse_attn2(name)[:2]
    ch = cfg.block_out_channels
    return {"down_blocks": ch[index], "up_blocks": ch[::-1][index], "mid_block": ch[-1]}[group]


def _processor_order(names: Iterable[str]) -> list[str]:
    """attn2 paths sorted as `attn_processors` lists them: down < up < mid, then block, attention, layer."""

    def order(name: str) -> tuple[int, ...]:
        group, *indices = _parse_attn2(name)
        return (_GROUP_RANK[group], *indices)

    return sorted(names, key=order)


def processor_indices(names: Iterable[str]) -> dict[str, int]:
    """attn2 path -> IP-Adapter key index (1, 3, 5, ...), from the paths alone (no UNet config needed)."""
    return {name: 2 * k + 1 for k, name in enumerate(_processor_order(names))}


def ip_rows(names: Sequence[str]) -> list[Row]:
    """One row per attn2 layer, `names` in attn_processors order: `{2k+1}.` <-> `<k-th path>.`."""
    return [(f"{2 * k + 1}.", f"{name}.", _IP_REST) for k, name in enumerate(names)]


def ip_to_attn2(ip: Mapping[str, Any], names: Sequence[str], source: str) -> dict[str, Any]:
    """`{n}.to_k_ip.weight` -> `<attn2 path>.to_k_ip.weight` for a UNet whose attn2 paths are `names`."""
    return KeyTable(ip_rows(names)).to_diffusers(ip, f"{source}: ip_adapter -> UNet attn2")


def attn2_to_ip(attn: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Inverse of `ip_to_attn2`; the indices come from the attn2 paths the keys name."""
    names = _processor_order({key.rsplit(".", 2)[0] for key in attn})
    return KeyTable(ip_rows(names)).to_original(attn, f"{source}: UNet attn2 -> ip_adapter")
