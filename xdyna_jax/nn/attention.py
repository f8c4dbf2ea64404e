"""Multi-head attention with diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`).

Every class here is called as `attn(x, context=None, *, frames=1, ip_scale=1.0)`, so a transformer block
calls whichever its config picked the same way; each reads only the arguments its equation needs.
"""

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
        self.to_q = linear(query_dim, inner, compute, rngs, bias=qkv_bias, names=("embed", "heads"))
        self.to_k = linear(kv_dim, inner, compute, rngs, bias=qkv_bias, names=("embed", "heads"))
        self.to_v = linear(kv_dim, inner, compute, rngs, bias=qkv_bias, names=("embed", "heads"))
        self.to_out = nnx.List([linear(inner, query_dim, compute, rngs, names=("heads", "embed"))])

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

    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, *, frames=1, ip_scale=1.0
    ) -> jax.Array:
        """Self-attention when `context` is None; `frames` and `ip_scale` are for the subclasses."""
        ctx = x if context is None else context
        out = self.attend(self.to_q(x), self.to_k(ctx), self.to_v(ctx))
        return self.to_out[0](out)


class AdapterSelfAttention(Attention):
    """X-Dyna's Dynamics-Adapter in `attn1`: per-frame self-attention plus a reference branch.

        out = to_out.0(Attn(Q, K, V)) + to_out_ff(Attn(Q', K_R, V_R))

    Q' = to_q_ff(h) is a trainable copy of to_q (initialised equal to it); K_R, V_R are the frozen to_k/to_v
    of frame 0 (the reference) of the same window, shared by every frame (frame 0 attends to itself too).
    `to_out_ff` (Linear with bias) starts at zero, so a fresh adapter leaves the UNet unchanged.
    """

    def __init__(self, query_dim: int, *, heads: int, dim_head: int, compute: Compute, rngs: nnx.Rngs):
        super().__init__(query_dim, heads=heads, dim_head=dim_head, compute=compute, rngs=rngs)
        inner = heads * dim_head
        self.to_q_ff = linear(query_dim, inner, compute, rngs, bias=False, names=("embed", "heads"))
        self.to_q_ff.kernel.set_value(self.to_q.kernel.get_value())
        self.to_out_ff = linear(inner, query_dim, compute, rngs, names=("heads", "embed"))
        self.to_out_ff.kernel.set_value(jax.numpy.zeros_like(self.to_out_ff.kernel.get_value()))

    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, *, frames=1, ip_scale=1.0
    ) -> jax.Array:
        """x: (B*F, N, C), the frames of each window consecutive."""
        if context is not None:
            raise ValueError("the Dynamics-Adapter is self-attention (attn1): it takes no context")
        bf, n, _ = x.shape
        k, v = self.to_k(x), self.to_v(x)
        out = self.to_out[0](self.attend(self.to_q(x), k, v))
        # Attention is independent per query row, so all F*N queries of a window can attend to the
        # reference's N keys in one call instead of broadcasting K_R, V_R to every frame.
        b = bf // frames
        q_ref = self.to_q_ff(x).reshape(b, frames * n, -1)
        k_ref = k.reshape(b, frames, n, -1)[:, 0]
        v_ref = v.reshape(b, frames, n, -1)[:, 0]
        ref = self.attend(q_ref, k_ref, v_ref).reshape(bf, n, -1)
        return out + self.to_out_ff(ref)


class IPCrossAttention(Attention):
    """`attn2` with IP-Adapter: Attn(q, to_k(text), to_v(text)) + scale * Attn(q, to_k_ip(img), to_v_ip(img)).

    The context is [text tokens ; `ip_tokens` image tokens] along the sequence axis, as X-Dyna passes it.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        ip_tokens: int,
        compute: Compute,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            query_dim,
            heads=heads,
            dim_head=dim_head,
            cross_attention_dim=cross_attention_dim,
            compute=compute,
            rngs=rngs,
        )
        inner = heads * dim_head
        self.ip_tokens = ip_tokens
        self.to_k_ip = linear(cross_attention_dim, inner, compute, rngs, bias=False, names=("embed", "heads"))
        self.to_v_ip = linear(cross_attention_dim, inner, compute, rngs, bias=False, names=("embed", "heads"))

    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, *, frames=1, ip_scale=1.0
    ) -> jax.Array:
        if context is None or context.shape[1] <= self.ip_tokens:
            raise ValueError(
                f"IP-Adapter attention expects [text ; {self.ip_tokens} image tokens], got a context of "
                f"{0 if context is None else context.shape[1]} tokens"
            )
        text, image = context[:, : -self.ip_tokens], context[:, -self.ip_tokens :]
        q = self.to_q(x)
        out = self.attend(q, self.to_k(text), self.to_v(text))
        out = out + ip_scale * self.attend(q, self.to_k_ip(image), self.to_v_ip(image))
        return self.to_out[0](out)
