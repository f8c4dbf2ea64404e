"""Scaled dot-product attention behind one dispatch.

Every attention in the package (UNet self/cross, VAE mid-block, CLIP text, later the motion modules)
calls `dot_product_attention`, so a backend chosen in a config applies everywhere.

Backends:
  - "xla":      full softmax(QK^T)V with fp32 softmax. Fastest for short sequences.
  - "chunked":  queries processed in blocks of `chunk_size` under `lax.map`, so the full (Lq, Lk) score
                matrix of a 7168-token frame never exists at once (memory O(chunk * Lk) per head).
  - "dot_product": `jax.nn.dot_product_attention` with automatic implementation choice
                (cuDNN flash attention on a GPU when shapes allow, XLA elsewhere).
  - "cudnn":    `jax.nn.dot_product_attention(implementation="cudnn")`; GPU only, fails clearly otherwise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

BACKENDS = ("xla", "chunked", "dot_product", "cudnn")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    return name


def _scores_softmax_values(q, k, v, scale, causal, precision, q_offset=0):
    # q: (B, Lq, H, D), k/v: (B, Lk, H, D). Scores and softmax in fp32 whatever the activation dtype.
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32)
    s = s * scale
    if causal:
        lq, lk = q.shape[1], k.shape[1]
        qi = jnp.arange(lq)[:, None] + q_offset
        ki = jnp.arange(lk)[None, :]
        s = jnp.where(ki <= qi, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=precision)


def _chunked(q, k, v, scale, causal, precision, chunk_size):
    b, lq, h, d = q.shape
    if lq <= chunk_size:
        return _scores_softmax_values(q, k, v, scale, causal, precision)
    n_chunks = -(-lq // chunk_size)
    pad = n_chunks * chunk_size - lq
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qc = qp.reshape(b, n_chunks, chunk_size, h, d).swapaxes(0, 1)
    offsets = jnp.arange(n_chunks) * chunk_size

    def one(args):
        qi, off = args
        return _scores_softmax_values(qi, k, v, scale, causal, precision, q_offset=off)

    out = jax.lax.map(one, (qc, offsets))  # (n_chunks, B, chunk, H, D)
    out = out.swapaxes(0, 1).reshape(b, n_chunks * chunk_size, h, v.shape[-1])
    return out[:, :lq]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    backend: str = "xla",
    causal: bool = False,
    precision=None,
    chunk_size: int = 1024,
) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v for q (B, Lq, H, D), k and v (B, Lk, H, D); returns (B, Lq, H, D)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (B, L, H, D) inputs, got q{q.shape} k{k.shape} v{v.shape}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "xla":
        return _scores_softmax_values(q, k, v, scale, causal, precision)
    if backend == "chunked":
        return _chunked(q, k, v, scale, causal, precision, chunk_size)
    if backend in ("dot_product", "cudnn"):
        impl = "cudnn" if backend == "cudnn" else None
        if impl == "cudnn" and jax.default_backend() != "gpu":
            raise RuntimeError(
                "attention backend 'cudnn' needs a GPU; this process runs on "
                f"{jax.default_backend()!r}. Use 'dot_product' (picks cuDNN when available) or 'xla'."
            )
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation=impl)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
