"""Shared helpers for the model config dataclasses (JSON round trip, diffusers config import)."""

from __future__ import annotations

import dataclasses
from typing import Any

from xdyna_jax.nn.compute import Compute


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value


def config_from_dict(cls, data: dict[str, Any], *, strict: bool = True):
    """Build dataclass `cls` from a dict (as written by `config_to_dict`); lists become tuples.

    strict: unknown keys raise (our own model.json); otherwise they are ignored (foreign configs).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if strict and unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
    kwargs = {k: _freeze(v) for k, v in data.items() if k in names}
    if "compute" in kwargs and not isinstance(kwargs["compute"], Compute):
        kwargs["compute"] = Compute.from_dict(dict(kwargs["compute"]))
    return cls(**kwargs)


def config_to_dict(config) -> dict[str, Any]:
    def thaw(v):
        return [thaw(x) for x in v] if isinstance(v, tuple) else v

    return {k: thaw(v) for k, v in dataclasses.asdict(config).items()}


def require_default(source: dict[str, Any], key: str, allowed: tuple, what: str) -> None:
    """Refuse a foreign config value we do not implement instead of silently ignoring it."""
    if key in source and source[key] not in allowed:
        raise ValueError(f"{what}: {key}={source[key]!r} is not supported (supported: {list(allowed)})")


class ConfigMixin:
    """from_dict / to_dict (our model.json) and the import of a foreign (diffusers / transformers) config."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_foreign(cls, cfg: dict[str, Any], compute: Compute | None, *, drop_none: bool = True, **fixed):
        """Our fields read from a foreign config.json (unknown keys dropped, None values too unless
        drop_none=False); `fixed` values override the file's."""
        keep = {f.name for f in dataclasses.fields(cls)} - {"compute", *fixed}
        data = {k: v for k, v in cfg.items() if k in keep and (v is not None or not drop_none)}
        return config_from_dict(cls, {**data, **fixed, "compute": compute or Compute()})

    def foreign_dict(self, *drop: str) -> dict[str, Any]:
        """to_dict without our compute settings (and the named fields), for writing a foreign config.json."""
        d = self.to_dict()
        for name in ("compute", *drop):
            d.pop(name)
        return d


def heads_per_block(num_attention_heads, attention_head_dim, blocks: int) -> tuple[int, ...]:
    """diffusers' legacy naming: `attention_head_dim` means heads when num_attention_heads is unset."""
    h = num_attention_heads if num_attention_heads is not None else attention_head_dim
    return tuple(h) if isinstance(h, tuple) else (h,) * blocks
