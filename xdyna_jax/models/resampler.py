"""IP-Adapter-plus image-prompt Resampler (a Perceiver resampler) in Flax NNX.

Parameter names are the original IP-Adapter ones, i.e. the keys of `ip-adapter-plus_sd15.bin["image_proj"]`:
  latents (1, Q, dim), proj_in, proj_out, norm_out,
  layers.N.0.{norm1, norm2, to_q, to_kv, to_out}   (PerceiverAttention)
  layers.N.1.{0, 1, 3}                              (FeedForward: LayerNorm, Linear, GELU, Linear)
so convert/state.py loads that group directly. (diffusers' IPAdapterPlusImageProjection holds the same
weights under other names, with to_kv split into to_k / to_v.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.models.config_utils import ConfigMixin
from xdyna_jax.nn.attention_ops import dot_product_attention
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import linear, param
from xdyna_jax.nn.norms import LayerNorm

_EPS = 1e-5  # every LayerNorm of the Resampler is torch's default


@dataclasses.dataclass(frozen=True)
class ResamplerConfig(ConfigMixin):
    """IP-Adapter's Resampler arguments; defaults are ip-adapter-plus_sd15's."""

    dim: int = 768  # width of the latent queries
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16  # image-prompt tokens handed to the UNet
    embedding_dim: int = 1280  # CLIP hidden size of the input features
    output_dim: int = 768  # UNet cross_attention_dim
    ff_mult: int = 4
    compute: Compute = Compute()

    @property
    def inner_dim(self) -> int:
        return self.dim_head * self.heads


class GELU(nnx.Module):
    """Parameter-free slot `layers.N.1.2` of the feed-forward (torch's nn.GELU: exact erf form)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(x, approximate=False)


class PerceiverAttention(nnx.Module):
    """The latent queries attend to [image features; latents] (keys and values from both)."""

    def __init__(self, cfg: ResamplerConfig, rngs: nnx.Rngs):
        c = cfg.compute
        self.heads = cfg.heads
        self.compute = c
        self.norm1 = LayerNorm(cfg.dim, _EPS)  # image features
        self.norm2 = LayerNorm(cfg.dim, _EPS)  # latents
        self.to_q = linear(cfg.dim, cfg.inner_dim, c, rngs, bias=False, names=("embed", "heads"))
        # [k | v] along the output axis
        self.to_kv = linear(cfg.dim, 2 * cfg.inner_dim, c, rngs, bias=False, names=("embed", "heads"))
        self.to_out = linear(cfg.inner_dim, cfg.dim, c, rngs, bias=False, names=("heads", "embed"))

    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = jnp.split(self.to_kv(jnp.concatenate([x, latents], axis=1)), 2, axis=-1)

        def heads(t):
            return t.reshape(*t.shape[:-1], self.heads, t.shape[-1] // self.heads)

        # The original scales q and k by dim_head**-0.25 each; one dim_head**-0.5 on the scores is the same.
        out = dot_product_attention(
            heads(self.to_q(latents)),
            heads(k),
            heads(v),
            backend=self.compute.attention,
            precision=self.compute.lax_precision,
            chunk_size=self.compute.attention_chunk,
        )
        return self.to_out(out.reshape(*out.shape[:-2], -1))


def _feed_forward(cfg: ResamplerConfig, rngs: nnx.Rngs) -> nnx.List:
    """An nnx.List, not nnx.Sequential, so the parameter paths are `1.0`, `1.1`, `1.3` as in torch."""
    c, inner = cfg.compute, cfg.dim * cfg.ff_mult
    return nnx.List(
        [
            LayerNorm(cfg.dim, _EPS),
            linear(cfg.dim, inner, c, rngs, bias=False),
            GELU(),
            linear(inner, cfg.dim, c, rngs, bias=False, names=("mlp", "embed")),
        ]
    )


class Resampler(nnx.Module):
    """CLIP features (B, N, embedding_dim) -> image-prompt tokens (B, num_queries, output_dim), float32.

    For IP-Adapter-plus the input is the image encoder's penultimate hidden state (hidden_states[-2]).
    """

    def __init__(self, config: ResamplerConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg, c = config, config.compute
        self.latents = param(
            jax.random.normal(rngs.params(), (1, cfg.num_queries, cfg.dim), jnp.float32) * cfg.dim**-0.5,
            (None, None, "embed"),
        )
        self.proj_in = linear(cfg.embedding_dim, cfg.dim, c, rngs)
        self.proj_out = linear(cfg.dim, cfg.output_dim, c, rngs, names=("mlp", "embed"))
        self.norm_out = LayerNorm(cfg.output_dim, _EPS)
        self.layers = nnx.List(
            [nnx.List([PerceiverAttention(cfg, rngs), _feed_forward(cfg, rngs)]) for _ in range(cfg.depth)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = jnp.asarray(x)
        if x.ndim != 3 or x.shape[-1] != cfg.embedding_dim:
            raise ValueError(f"Resampler expects features (B, N, {cfg.embedding_dim}), got {tuple(x.shape)}")
        dtype = cfg.compute.jnp_dtype
        x = self.proj_in(x.astype(dtype))
        latents = jnp.broadcast_to(self.latents[...].astype(dtype), (x.shape[0], *self.latents.shape[1:]))
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            h = latents
            for f in ff:
                h = f(h)
            latents = latents + h
        return self.norm_out(self.proj_out(latents)).astype(jnp.float32)
