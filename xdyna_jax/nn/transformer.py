"""Spatial transformer of the SD UNet: Transformer2DModel > BasicTransformerBlock > Attention + GEGLU FF."""

from __future__ import annotations

import dataclasses

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
        self.net = nnx.List(
            [
                GEGLU(dim, inner, compute, rngs),
                Identity(),
                linear(inner, dim, compute, rngs, names=("mlp", "embed")),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """Settings every spatial transformer of a UNet shares (the heads differ per block)."""

    cross_attention_dim: int
    norm_groups: int
    use_linear_projection: bool = False  # proj_in/proj_out as Linear (SD 2.x style) instead of 1x1 convs
    num_layers: int = 1
    dynamics_adapter: bool = False  # attn1 is X-Dyna's AdapterSelfAttention (needs `frames`, 0 = reference)
    ip_tokens: int = 0  # > 0: attn2 is IP-Adapter cross-attention over the last `ip_tokens` context tokens


class BasicTransformerBlock(nnx.Module):
    """x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))."""

    def __init__(self, dim: int, heads: int, spec: TransformerSpec, compute: Compute, rngs: nnx.Rngs):
        common = dict(heads=heads, dim_head=dim // heads, compute=compute, rngs=rngs)
        self.norm1 = LayerNorm(dim)
        self.attn1 = (AdapterSelfAttention if spec.dynamics_adapter else Attention)(dim, **common)
        self.norm2 = LayerNorm(dim)
        cross = spec.cross_attention_dim
        if spec.ip_tokens:
            self.attn2 = IPCrossAttention(dim, cross_attention_dim=cross, ip_tokens=spec.ip_tokens, **common)
        else:
            self.attn2 = Attention(dim, cross_attention_dim=cross, **common)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim, compute, rngs)

    def __call__(
        self, x: jax.Array, context: jax.Array, *, frames: int = 1, ip_scale: float = 1.0
    ) -> jax.Array:
        x = x + self.attn1(self.norm1(x), frames=frames, ip_scale=ip_scale)
        x = x + self.attn2(self.norm2(x), context, frames=frames, ip_scale=ip_scale)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm -> proj_in -> transformer blocks on (B, H*W, C) tokens -> proj_out, plus the residual.

    proj_in/proj_out are 1x1 convs (SD 1.x) or Linear layers (`use_linear_projection`, SD 2.x style).
    """

    def __init__(self, channels: int, heads: int, spec: TransformerSpec, compute: Compute, rngs: nnx.Rngs):
        if channels % heads:
            raise ValueError(f"{heads} attention heads do not divide {channels} channels")
        self.norm = GroupNorm(channels, spec.norm_groups, 1e-6)
        make_proj = (
            (lambda names: linear(channels, channels, compute, rngs, names=names))
            if spec.use_linear_projection
            else (lambda _: conv(channels, channels, 1, compute, rngs))
        )
        self.proj_in = make_proj(("embed", "mlp"))
        self.transformer_blocks = nnx.List(
            [BasicTransformerBlock(channels, heads, spec, compute, rngs) for _ in range(spec.num_layers)]
        )
        self.proj_out = make_proj(("mlp", "embed"))

    def __call__(
        self, x: jax.Array, context: jax.Array, *, frames: int = 1, ip_scale: float = 1.0
    ) -> jax.Array:
        b, h, w, c = x.shape
        # A 1x1 conv on NHWC and a Linear on the flattened tokens are the same op: both leave the
        # layout alone, so the only difference is which parameter shape the checkpoint carries.
        hidden = self.proj_in(self.norm(x)).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            hidden = block(hidden, context, frames=frames, ip_scale=ip_scale)
        return self.proj_out(hidden.reshape(b, h, w, c)) + x
