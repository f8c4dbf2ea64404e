"""Spatial transformer of the SD UNet: Transformer2DModel > BasicTransformerBlock > Attention + GEGLU FF."""

from __future__ import annotations

import jax
from flax import nnx

from xdyna_jax.nn.attention import AdapterSelfAttention, Attention, IPCrossAttention
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import conv, linear
from xdyna_jax.nn.norms import GroupNorm, LayerNorm


class GEGLU(nnx.Module):
    """proj(x) = [value | gate]; returns value * gelu(gate) with exact (erf) GELU as in PyTorch."""

    def __init__(self, dim: int, inner: int, compute: Compute, rngs: nnx.Rngs):
        self.proj = linear(dim, 2 * inner, compute, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jax.numpy.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class Identity(nnx.Module):
    """Parameter-free slot (PyTorch's Dropout at inference) keeping `ff.net.2` at index 2."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class FeedForward(nnx.Module):
    def __init__(self, dim: int, compute: Compute, rngs: nnx.Rngs, *, mult: int = 4):
        inner = dim * mult
        self.net = nnx.List([GEGLU(dim, inner, compute, rngs), Identity(), linear(inner, dim, compute, rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x)).

    dynamics_adapter: attn1 is X-Dyna's AdapterSelfAttention (needs `frames`, frame 0 = reference).
    ip_tokens > 0: attn2 is IP-Adapter cross-attention over the last `ip_tokens` context tokens.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        cross_attention_dim: int,
        compute: Compute,
        rngs: nnx.Rngs,
        *,
        dynamics_adapter: bool = False,
        ip_tokens: int = 0,
    ):
        dim_head = dim // heads
        self.norm1 = LayerNorm(dim)
        self_attn = AdapterSelfAttention if dynamics_adapter else Attention
        self.attn1 = self_attn(dim, heads=heads, dim_head=dim_head, compute=compute, rngs=rngs)
        self.norm2 = LayerNorm(dim)
        cross = dict(heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim, compute=compute)
        if ip_tokens:
            self.attn2 = IPCrossAttention(dim, ip_tokens=ip_tokens, rngs=rngs, **cross)
        else:
            self.attn2 = Attention(dim, rngs=rngs, **cross)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim, compute, rngs)

    def __call__(self, x: jax.Array, context: jax.Array, frames: int = 1, ip_scale: float = 1.0) -> jax.Array:
        h = self.norm1(x)
        x = x + (self.attn1(h, frames) if isinstance(self.attn1, AdapterSelfAttention) else self.attn1(h))
        h = self.norm2(x)
        x = x + (
            self.attn2(h, context, ip_scale)
            if isinstance(self.attn2, IPCrossAttention)
            else self.attn2(h, context)
        )
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm -> proj_in -> transformer blocks on (B, H*W, C) tokens -> proj_out, plus the residual.

    proj_in/proj_out are 1x1 convs (SD 1.x) or Linear layers (`use_linear_projection`, SD 2.x style).
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        cross_attention_dim: int,
        groups: int,
        use_linear_projection: bool,
        num_layers: int = 1,
        dynamics_adapter: bool = False,
        ip_tokens: int = 0,
        compute: Compute,
        rngs: nnx.Rngs,
    ):
        if channels % heads:
            raise ValueError(f"{heads} attention heads do not divide {channels} channels")
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(channels, groups, 1e-6)
        make_proj = (
            (lambda: linear(channels, channels, compute, rngs))
            if use_linear_projection
            else (lambda: conv(channels, channels, 1, compute, rngs))
        )
        self.proj_in = make_proj()
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    channels,
                    heads,
                    cross_attention_dim,
                    compute,
                    rngs,
                    dynamics_adapter=dynamics_adapter,
                    ip_tokens=ip_tokens,
                )
                for _ in range(num_layers)
            ]
        )
        self.proj_out = make_proj()

    def __call__(self, x: jax.Array, context: jax.Array, frames: int = 1, ip_scale: float = 1.0) -> jax.Array:
        b, h, w, c = x.shape
        # A 1x1 conv on NHWC and a Linear on the flattened tokens are the same op: both leave the
        # layout alone, so the only difference is which parameter shape the checkpoint carries.
        hidden = self.proj_in(self.norm(x)).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            hidden = block(hidden, context, frames, ip_scale)
        return self.proj_out(hidden.reshape(b, h, w, c)) + x
