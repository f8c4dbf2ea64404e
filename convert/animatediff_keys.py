"""AnimateDiff motion-module key names: original (guoyww/AnimateDiff, X-Dyna) <-> diffusers MotionAdapter.

Inside one motion module (`...motion_modules.J.` or, for a single module's own state dict, no prefix):

    original                                               diffusers
    temporal_transformer.norm / proj_in / proj_out         norm / proj_in / proj_out
    ...transformer_blocks.K.attention_blocks.0 / .1        ...transformer_blocks.K.attn1 / attn2
    ...transformer_blocks.K.norms.0 / norms.1 / ff_norm    ...transformer_blocks.K.norm1 / norm2 / norm3
    ...transformer_blocks.K.attention_blocks.{0,1}.pos_encoder.pe   ...transformer_blocks.K.pos_embed.pe

The original keeps one sinusoidal `pe` buffer per attention (two equal copies per block), diffusers one per
block: original -> diffusers keeps the copy after checking both are equal, diffusers -> original writes it
twice. Values pass through untouched (numpy, torch or JAX). Every key is checked to come back unchanged
through the opposite direction, so the two functions are exact inverses or fail with a ConversionError.

Version rules (checkpoint_formats.md §2b): a mid-block module means v2; otherwise the `pe` length decides,
24 = v1 (mm_sd_v14/v15, X-Dyna), 32 = v3.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from convert.io import ConversionError
from xdyna_jax.nn.motion import sinusoidal_table

__all__ = [
    "check_pe",
    "detect_motion_version",
    "diffusers_motion_to_original",
    "original_motion_to_diffusers",
]

_MODULE = re.compile(r"^(.*?motion_modules\.\d+\.)?(.*)$")  # (prefix up to the module, name inside it)
_BLOCK = re.compile(r"^(transformer_blocks\.\d+\.)(.*)$")
_TT = "temporal_transformer."
# Renames right after `transformer_blocks.K.`: (original, diffusers); the trailing dots stop `norms.0.`
# from matching `norms.01.`.
_BLOCK_RENAMES = (
    ("attention_blocks.0.", "attn1."),
    ("attention_blocks.1.", "attn2."),
    ("norms.0.", "norm1."),
    ("norms.1.", "norm2."),
    ("ff_norm.", "norm3."),
)
_ORIG_PE = re.compile(r"attention_blocks\.([01])\.pos_encoder\.pe$")
_DIFF_PE = "pos_embed.pe"
_PE_KEY = re.compile(r"(pos_encoder|pos_embed)\.pe$")
# Tolerance for a stored table against ours: covers a file saved in bf16 (half an ulp near 1 is 2^-9),
# while a wrong table (other base, sin/cos swapped, learned, shuffled rows) is off by O(1).
_PE_ATOL = 3e-3


def _split(key: str, local_only: bool) -> tuple[str, str] | None:
    """(prefix, name inside the module), or None for a key that is not part of a motion module."""
    if local_only:
        return "", key
    prefix, name = _MODULE.match(key).groups()
    return (prefix, name) if prefix else None


def _local_to_diffusers(name: str) -> str | None:
    if not name.startswith(_TT):
        return None  # not an original motion-module name
    name = name[len(_TT) :]
    m = _BLOCK.match(name)
    if m:
        head, rest = m.groups()
        if _ORIG_PE.fullmatch(rest):
            return head + _DIFF_PE
        for orig, diff in _BLOCK_RENAMES:
            if rest.startswith(orig):
                return head + diff + rest[len(orig) :]
    return name


def _local_to_original(name: str) -> str | None:
    if name.startswith(_TT):
        return None  # already original naming
    m = _BLOCK.match(name)
    if m:
        head, rest = m.groups()
        if rest == _DIFF_PE:
            return _TT + head + "attention_blocks.0.pos_encoder.pe"
        for orig, diff in _BLOCK_RENAMES:
            if rest.startswith(diff):
                return _TT + head + orig + rest[len(diff) :]
    return _TT + name


def _rename(
    sd: Mapping[str, Any],
    forward: Callable[[str], str | None],
    backward: Callable[[str], str | None],
    what: str,
) -> dict[str, Any]:
    """Apply `forward` to the name inside every motion module; keys outside motion modules pass unchanged.

    A state dict where no key mentions `motion_modules.` is taken as ONE module's own state dict.
    """
    local_only = not any("motion_modules." in k for k in sd)
    out, bad = {}, []
    for key, value in sd.items():
        parts = _split(key, local_only)
        if parts is None:
            out[key] = value
            continue
        prefix, name = parts
        new = forward(name)
        # Exactness: the opposite direction must give the key back (pe copies are handled by the callers).
        if new is None or (not _PE_KEY.search(key) and backward(new) != name) or prefix + new in out:
            bad.append(key)
            continue
        out[prefix + new] = value
    if bad:
        raise ConversionError(
            f"{len(bad)} key(s) are not {what} motion-module names (or would collide): {', '.join(bad[:10])}"
        )
    return out


def original_motion_to_diffusers(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Original AnimateDiff names -> diffusers MotionAdapter names (a block's two pe copies become one)."""
    kept = {}
    for key, value in sd.items():
        m = _ORIG_PE.search(key)
        twin = key[: m.start(1)] + "0" + key[m.end(1) :] if m and m.group(1) == "1" else None
        if twin is not None and twin in sd:
            if not np.array_equal(np.asarray(sd[twin]), np.asarray(value)):
                raise ConversionError(f"{twin} and {key} differ; diffusers keeps a single pe per block")
            continue  # the copy in attention_blocks.0 stands for both
        kept[key] = value
    return _rename(kept, _local_to_diffusers, _local_to_original, "original")


def diffusers_motion_to_original(sd: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers MotionAdapter names -> original AnimateDiff names (a block's pe goes to both attentions)."""
    out = _rename(sd, _local_to_original, _local_to_diffusers, "diffusers")
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
    """Return "v1", "v2" or "v3" for a whole motion-module file, in either naming (formats doc §2b)."""
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
