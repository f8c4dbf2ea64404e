"""AnimateDiff motion-module key names: original (guoyww/AnimateDiff, X-Dyna) <-> diffusers MotionAdapter.

Inside one motion module (`...motion_modules.J.` or, for a single module's own state dict, no prefix):

    original                                               diffusers
    temporal_transformer.norm / proj_in / proj_out         norm / proj_in / proj_out
    ...transformer_blocks.K.attention_blocks.0 / .1        ...transformer_blocks.K.attn1 / attn2
    ...transformer_blocks.K.norms.0 / norms.1 / ff_norm    ...transformer_blocks.K.norm1 / norm2 / norm3
    ...transformer_blocks.K.ff                             ...transformer_blocks.K.ff
    ...transformer_blocks.K.attention_blocks.{0,1}.pos_encoder.pe   ...transformer_blocks.K.pos_embed.pe

These are rows of one table (convert.key_tables), built for the modules and blocks the keys contain, so the
two directions are exact inverses. The original keeps one sinusoidal `pe` buffer per attention (two equal
copies per block), diffusers one per block: original -> diffusers keeps the copy after checking both are
equal, diffusers -> original writes it twice. Keys outside motion modules pass unchanged.

Version rules: a mid-block module means v2; otherwise the `pe` length decides, 24 = v1 (mm_sd_v14/v15,
X-Dyna), 32 = v3.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.io import ConversionError
from convert.key_tables import PARAM, PASS, KeyTable, Row
from xdyna_jax.nn.motion import sinusoidal_table

__all__ = [
    "check_pe",
    "detect_motion_version",
    "diffusers_motion_to_original",
    "original_motion_to_diffusers",
]

_MOTION = "motion_modules."
_MODULE = re.compile(r"^(.*?motion_modules\.\d+\.)")  # the prefix up to and including one module
_BLOCK_INDEX = re.compile(r"transformer_blocks\.(\d+)\.")
_TT = "temporal_transformer."
# Inside `transformer_blocks.K.`: (original, diffusers, rest). The pe row is longer than attention_blocks.0's,
# so it wins for the buffer.
_BLOCK_ROWS = (
    ("attention_blocks.0.", "attn1.", PASS),
    ("attention_blocks.1.", "attn2.", PASS),
    ("attention_blocks.0.pos_encoder.", "pos_embed.", PASS),
    ("norms.0.", "norm1.", PARAM),
    ("norms.1.", "norm2.", PARAM),
    ("ff_norm.", "norm3.", PARAM),
    ("ff.", "ff.", PASS),
)
_ORIG_PE = re.compile(r"attention_blocks\.([01])\.pos_encoder\.pe$")
_PE_KEY = re.compile(r"(pos_encoder|pos_embed)\.pe$")
# Tolerance for a stored table against ours: covers a file saved in bf16 (half an ulp near 1 is 2^-9),
# while a wrong table (other base, sin/cos swapped, learned, shuffled rows) is off by O(1).
_PE_ATOL = 3e-3


def motion_rows(module_prefixes, n_blocks: int) -> list[Row]:
    """The rows of every motion module under `module_prefixes` (each ending in `motion_modules.J.` or "")."""
    rows: list[Row] = []
    for prefix in sorted(set(module_prefixes)):
        rows += [
            (f"{prefix}{_TT}{name}.", f"{prefix}{name}.", PARAM) for name in ("norm", "proj_in", "proj_out")
        ]
        for k in range(n_blocks):
            block = f"transformer_blocks.{k}."
            rows += [(prefix + _TT + block + o, prefix + block + d, rest) for o, d, rest in _BLOCK_ROWS]
    return rows


def _rename(sd: Mapping[str, Any], to_diffusers: bool) -> dict[str, Any]:
    """Rename every motion-module key through the table; keys outside motion modules pass unchanged.

    A state dict where no key mentions `motion_modules.` is taken as ONE module's own state dict.
    """
    local_only = not any(_MOTION in k for k in sd)
    motion = sd if local_only else {k: v for k, v in sd.items() if _MOTION in k}
    prefixes = [""] if local_only else [m.group(1) for k in motion if (m := _MODULE.match(k))]
    n_blocks = 1 + max((int(m.group(1)) for k in motion if (m := _BLOCK_INDEX.search(k))), default=-1)
    table = KeyTable(motion_rows(prefixes, n_blocks))
    naming = "original" if to_diffusers else "diffusers"
    what = "AnimateDiff " + ("original -> diffusers" if to_diffusers else "diffusers -> original")
    hint = f"these are not {naming} motion-module names"
    apply = table.to_diffusers if to_diffusers else table.to_original
    return {**{k: v for k, v in sd.items() if k not in motion}, **apply(motion, what, hint)}


def original_motion_to_diffusers(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Original AnimateDiff names -> diffusers MotionAdapter names (a block's two pe copies become one)."""
    kept = {}
    for key, value in sd.items():
        m = _ORIG_PE.search(key)
        if m and m.group(1) == "1":  # the copy in attention_blocks.0 stands for both
            twin = key[: m.start(1)] + "0" + key[m.end(1) :]
            if twin not in sd:
                kept[twin] = value
            elif not np.array_equal(np.asarray(sd[twin]), np.asarray(value)):
                raise ConversionError(f"{twin} and {key} differ; diffusers keeps a single pe per block")
            continue
        kept[key] = value
    return _rename(kept, to_diffusers=True)


def diffusers_motion_to_original(sd: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers MotionAdapter names -> original AnimateDiff names (a block's pe goes to both attentions)."""
    out = _rename(sd, to_diffusers=False)
    for key in [k for k in out if _ORIG_PE.search(k)]:
        out[key.replace("attention_blocks.0.pos_encoder", "attention_blocks.1.pos_encoder")] = out[key]
    return out


def check_pe(sd: Mapping[str, Any], max_len: int | None = None) -> int | None:
    """Check every `pos_encoder.pe` / `pos_embed.pe` buffer against the sinusoidal table; return its length.

    Our module recomputes the table instead of loading it, so a file whose table is anything else (another
    formula, a learned or corrupted buffer) would silently run differently: refuse it, naming the key. All
    buffers must share one length; with `max_len` given it must also equal the model's max_len. Returns None
    when the file holds no pe buffer (recent AnimateDiff code saves it non-persistent).
    """
    lengths: dict[int, str] = {}
    for key, value in sd.items():
        if not _PE_KEY.search(key):
            continue
        pe = np.asarray(value, dtype=np.float32)
        if pe.ndim != 3 or pe.shape[0] != 1:
            raise ConversionError(f"{key}: expected a (1, length, channels) position table, got {pe.shape}")
        table = sinusoidal_table(pe.shape[1], pe.shape[2])
        err = float(np.max(np.abs(pe[0] - table)))
        if not err <= _PE_ATOL:  # also catches NaN
            raise ConversionError(
                f"{key}: not the sinusoidal position table AnimateDiff uses (max abs difference {err:.3g})"
            )
        lengths.setdefault(pe.shape[1], key)
    if len(lengths) > 1:
        found = ", ".join(f"{n} ({k})" for n, k in sorted(lengths.items()))
        raise ConversionError(f"position tables of different lengths in one file: {found}")
    if not lengths:
        return None
    ((length, key),) = lengths.items()
    if max_len is not None and length != max_len:
        raise ConversionError(
            f"{key}: position table of length {length}, but the model has max_len={max_len}"
        )
    return length


def detect_motion_version(sd: Mapping[str, Any]) -> str:
    """Return "v1", "v2" or "v3" for a whole motion-module file, in either naming."""
    if not any("motion_modules." in k for k in sd):
        raise ConversionError(
            "no AnimateDiff motion-module keys (`...motion_modules.N....`) in this state dict"
        )
    if any("mid_block.motion_modules." in k for k in sd):
        return "v2"
    length = check_pe(sd)
    if length == 24:
        return "v1"
    if length == 32:
        return "v3"
    if length is None:
        raise ConversionError(
            "cannot tell AnimateDiff v1 from v3: no mid-block module and no pos_encoder.pe / pos_embed.pe "
            "buffer to read the position-table length from; give the version explicitly"
        )
    raise ConversionError(f"position table of length {length}: not AnimateDiff v1 (24) or v3 (32)")
