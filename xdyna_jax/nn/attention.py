"""Multi-head attention with diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`)."""

from __future__ import annotations

import jax
from flax import nnx

from xdyna_jax.nn.attention_ops import dot_product_attention
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import linear


class Attention(nnx.Module):
    """Self- or cross-attention: `to_out.0(attn(to_q(x), to_k(ctx), to_v(ctx)))`.

    `to_out` is a list so the PyTorch key `to_out.0.weight` maps to the path ('to_out', 0, 'kernel').
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        compute: Compute,
        rngs: nnx.Rngs,
        cross_attention_dim: int | None = None,
        qkv_bias: bool = False,
    ):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.compute = compute
        self.to_q = linear(query_dim, inner, compute, rngs, bias=qkv_bias)
        self.to_k = linear(kv_dim, inner, compute, rngs, bias=qkv_bias)
        self.to_v = linear(kv_dim, inner, compute, rngs, bias=qkv_bias)
        self.to_out = nnx.List([linear(inner, query_dim, compute, rngs)])

    def split_heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.heads, x.shape[-1] // self.heads)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """Attention over already-projected (B, L, inner) tensors; returns (B, Lq, inner) before to_out."""
        out = dot_product_attention(
            self.split_heads(q),
            self.split_heads(k),
            self.split_heads(v),
            backend=self.compute.attention,
            precision=self.compute.lax_precision,
            chunk_size=self.compute.attention_chunk,
        )
        return out.reshape(*out.shape[:-2], -1)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        ctx = x if context is None else context
        out = self.attend(self.to_q(x), self.to_k(ctx), self.to_v(ctx))
        return self.to_out[0](out)
