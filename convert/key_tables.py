"""Key tables: the one rename mechanism of the converters, both directions from one table.

A table is rows `(original prefix, diffusers prefix, rest)`: the original side is a release's layout (LDM
single files, lllyasviel ControlNets, AnimateDiff, IP-Adapter's numbered processors), the diffusers side the
names our modules carry. A key is mapped by the longest row prefix it starts with; the row's `Rest` says how
the part after the prefix changes. Every `Rest` is a bijection and a key is only mapped when its new name is
read back through the same row, so the two directions are exact inverses by construction. A key no row maps
is never dropped: the call fails with one ConversionError listing them. Values pass through untouched (numpy,
torch or JAX arrays) unless a `Rest` reshapes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from convert.io import ConversionError, key_list

__all__ = ["PARAM", "PASS", "KeyTable", "Rest", "Row"]

# (value, the rest of the key in original naming, to_diffusers) -> value
Reshape = Callable[[Any, str, bool], Any]


class Rest:
    """How the part of a key after its row's prefix is renamed; a bijection by construction.

    `renames` maps original sub-module names to diffusers ones (`""` stands for the prefix's own
    parameters); the rest must then be `<sub>.<leaf>` with `leaf` in `leaves`. `renames=None` passes any
    rest unchanged. `reshape` converts a value whose layout differs between the two sides.
    """

    def __init__(
        self,
        renames: Mapping[str, str] | None = None,
        leaves: tuple[str, ...] = ("weight", "bias"),
        reshape: Reshape | None = None,
    ):
        self.leaves = leaves
        self.reshape = reshape
        self._names = None if renames is None else (dict(renames), {v: k for k, v in renames.items()})
        if self._names is not None and len(self._names[1]) != len(self._names[0]):
            raise ValueError(f"renames must be one-to-one: {dict(renames)}")

    def rename(self, rest: str, to_diffusers: bool) -> str | None:
        """The rest in the other naming, or None if it is not a name this row knows."""
        if self._names is None:
            return rest
        sub, _, leaf = rest.rpartition(".")
        names = self._names[0 if to_diffusers else 1]
        if leaf not in self.leaves or sub not in names:
            return None
        return f"{names[sub]}.{leaf}" if names[sub] else leaf


PARAM = Rest({"": ""})  # the rest is exactly `weight` or `bias`
PASS = Rest()  # the rest is the same in both namings

Row = tuple[str, str, Rest]  # (original prefix, diffusers prefix, rest); prefixes end with "." or are ""


class KeyTable:
    """A set of rows, indexed by prefix on either side; see the module docstring."""

    def __init__(self, rows: Iterable[Row]):
        self._index: tuple[dict[str, Row], dict[str, Row]] = ({}, {})
        for row in rows:
            for side in (0, 1):
                if row[side] in self._index[side]:
                    raise ValueError(f"two rows share the prefix {row[side]!r}")
                self._index[side][row[side]] = row

    def to_diffusers(self, sd: Mapping[str, Any], what: str, hint: str = "") -> dict[str, Any]:
        return self._apply(sd, True, what, hint)

    def to_original(self, sd: Mapping[str, Any], what: str, hint: str = "") -> dict[str, Any]:
        return self._apply(sd, False, what, hint)

    def _apply(self, sd: Mapping[str, Any], to_diffusers: bool, what: str, hint: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        unmapped: list[str] = []
        for key, value in sd.items():
            mapped = self._map(key, to_diffusers)
            if mapped is None:
                unmapped.append(key)
                continue
            new_key, original_rest, rest = mapped
            if new_key in out:
                raise ConversionError(f"{what}: two keys map to {new_key!r} (one of them is {key!r})")
            out[new_key] = value if rest.reshape is None else rest.reshape(value, original_rest, to_diffusers)
        if unmapped:
            raise ConversionError(
                f"{what}: no mapping for {key_list(unmapped)}" + (f"\n  {hint}" if hint else "")
            )
        return out

    def _map(self, key: str, to_diffusers: bool) -> tuple[str, str, Rest] | None:
        """(new key, rest in original naming, the row's Rest), or None when the key has no mapping."""
        src, dst = (0, 1) if to_diffusers else (1, 0)
        row = self._row_for(key, src)
        if row is None:
            return None
        rest = key[len(row[src]) :]
        new_rest = row[2].rename(rest, to_diffusers)
        if new_rest is None:
            return None
        new_key = row[dst] + new_rest
        if self._row_for(new_key, dst) is not row:  # the other direction would not give `key` back
            return None
        return new_key, (rest if to_diffusers else new_rest), row[2]

    def _row_for(self, key: str, side: int) -> Row | None:
        """The row with the longest prefix of `key` on `side` (cut at a dot, or the empty prefix)."""
        index = self._index[side]
        end = len(key)
        while True:
            end = key.rfind(".", 0, end)
            row = index.get(key[: end + 1])
            if row is not None or end < 0:
                return row
