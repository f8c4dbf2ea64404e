"""How a model computes (not what it computes): activation dtype, matmul precision, attention backend.

Kept apart from the architecture fields so the same weights can run in fp32 with `highest` precision
for parity tests and in bf16 with the backend's default precision for speed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from xdyna_jax.nn.attention_ops import check_backend

_PRECISIONS = {
    "default": jax.lax.Precision.DEFAULT,
    "high": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Compute:
    dtype: str = "float32"  # activation dtype; params stay float32
    precision: str = "default"  # matmul/conv precision: default | high | highest
    attention: str = "chunked"  # see xdyna_jax.nn.attention_ops.BACKENDS
    attention_chunk: int = 512  # query block size of the "chunked" backend (512 is fastest on CPU here)

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"compute.dtype {self.dtype!r} not in {sorted(_DTYPES)}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"compute.precision {self.precision!r} not in {sorted(_PRECISIONS)}")
        check_backend(self.attention)
        if self.attention_chunk < 1:
            raise ValueError(f"compute.attention_chunk must be >= 1, got {self.attention_chunk}")

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def lax_precision(self):
        return _PRECISIONS[self.precision]

    @classmethod
    def from_dict(cls, d: dict | None) -> Compute:
        return cls(**(d or {}))
