"""A synthetic identity's palette file: which colour each limb and the clothing are drawn in.

The file is JSON:

    {"format": "xdyna-synthetic-palette/1", "identity": 3,
     "limbs": [[r, g, b], ... 17 of them, in xdyna_jax.conditioning.pose.LIMBS order],
     "limb_width": 6, "skin": [r, g, b], "clothing": [[r, g, b], ...], "background": "waves",
     "height": 128, "width": 128, "tolerance": 24}

`limb_width` is the full width (diameter) of a limb's capsule in pixels; an optional "limb_widths" gives
one per limb instead (17, LIMBS order: a renderer may draw the neck and head limbs thinner). `tolerance`
is the largest per-channel deviation of a limb's drawn pixels from its colour (shading included). A limb
entry may be null for a limb the renderer does not draw; it is then left out of every limb metric. Other
keys are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from xdyna_jax.conditioning.pose import LIMBS

PALETTE_FORMAT = "xdyna-synthetic-palette/1"

RGB = tuple[int, int, int]


class PaletteError(ValueError):
    """A palette file that is missing, not JSON, or not in the palette format."""


@dataclasses.dataclass(frozen=True)
class Palette:
    """One identity's colours. limbs: 17 RGB triples (None: not drawn) in `LIMBS` order; limb_widths: each
    limb's capsule diameter in pixels (all `limb_width` unless the file lists them)."""

    identity: int
    limbs: tuple[RGB | None, ...]
    limb_width: float
    skin: RGB
    clothing: tuple[RGB, ...]
    background: str
    height: int
    width: int
    tolerance: int
    limb_widths: tuple[float, ...] = ()

    def __post_init__(self):
        if not self.limb_widths:
            object.__setattr__(self, "limb_widths", (float(self.limb_width),) * len(LIMBS))


def _rgb(value, where: str) -> RGB:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 3
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)
    ):
        raise PaletteError(f"{where} must be [r, g, b] integers in 0..255, got {value!r}")
    return tuple(value)


def _number(data: dict, key: str, where: str, kind=int, minimum=0):
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
        raise PaletteError(f"{where}: '{key}' must be a number, got {value!r}")
    if value < minimum:
        raise PaletteError(f"{where}: '{key}' must be >= {minimum}, got {value!r}")
    return kind(value)


def palette_from_dict(data, where: str = "palette") -> Palette:
    """The parsed JSON of a palette file -> Palette; `where` names it in errors."""
    if not isinstance(data, dict):
        raise PaletteError(f"{where}: a palette is a JSON object, got {type(data).__name__}")
    if data.get("format") != PALETTE_FORMAT:
        raise PaletteError(f"{where}: 'format' must be {PALETTE_FORMAT!r}, got {data.get('format')!r}")
    missing = [
        k
        for k in ("identity", "limbs", "limb_width", "skin", "clothing", "height", "width", "tolerance")
        if k not in data
    ]
    if missing:
        raise PaletteError(f"{where}: missing {', '.join(missing)}")
    limbs = data["limbs"]
    if not isinstance(limbs, list) or len(limbs) != len(LIMBS):
        raise PaletteError(f"{where}: 'limbs' must list {len(LIMBS)} colours (LIMBS order), got {limbs!r}")
    clothing = data["clothing"]
    if not isinstance(clothing, list):
        raise PaletteError(f"{where}: 'clothing' must be a list of [r, g, b], got {clothing!r}")
    widths = data.get("limb_widths")
    if widths is not None and (
        not isinstance(widths, list)
        or len(widths) != len(LIMBS)
        or not all(isinstance(w, int | float) and not isinstance(w, bool) and w > 0 for w in widths)
    ):
        raise PaletteError(f"{where}: 'limb_widths' must list {len(LIMBS)} positive numbers, got {widths!r}")
    return Palette(
        identity=_number(data, "identity", where, minimum=-(2**63)),
        limbs=tuple(None if c is None else _rgb(c, f"{where}: limbs[{i}]") for i, c in enumerate(limbs)),
        limb_width=_number(data, "limb_width", where, kind=float, minimum=1),
        skin=_rgb(data["skin"], f"{where}: 'skin'"),
        clothing=tuple(_rgb(c, f"{where}: clothing[{i}]") for i, c in enumerate(clothing)),
        background=str(data.get("background", "")),
        height=_number(data, "height", where, minimum=1),
        width=_number(data, "width", where, minimum=1),
        tolerance=_number(data, "tolerance", where, minimum=0),
        limb_widths=() if widths is None else tuple(float(w) for w in widths),
    )


def read_palette(path: str | Path) -> Palette:
    """A palette JSON file -> Palette, or one PaletteError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise PaletteError(f"{path}: no such palette file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PaletteError(f"{path}: not valid JSON ({e})") from e
    return palette_from_dict(data, str(path))
