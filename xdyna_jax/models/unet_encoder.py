"""The encoder half the SD UNet and its ControlNets share: conv_in, time embedding, down blocks, mid block.

`UNetEncoder` builds these four under diffusers' top-level names (`conv_in`, `time_embedding`,
`down_blocks`, `mid_block`), so the UNet and the ControlNet subclass it and their converted keys stay
diffusers' own. `UNetEncoderConfig` holds the config fields they share, with diffusers' names and SD 1.5's
defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.models.config_utils import ConfigMixin, heads_per_block, require_default
from xdyna_jax.models.unet_blocks import (
    PLAIN,
    BlockSpec,
    DownBlock,
    MidBlock,
    VideoSpec,
    block_has_cross_attention,
    check_block_types,
)
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.embeddings import TimestepEmbedding, timestep_features
from xdyna_jax.nn.layers import conv
from xdyna_jax.nn.transformer import TransformerSpec
from xdyna_jax.sharding import constrain_batch

# diffusers options neither model implements: a config that sets them is refused, never silently ignored.
_UNSUPPORTED = {
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "only_cross_attention": (False,),
    "act_fn": ("silu",),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
}


@dataclasses.dataclass(frozen=True)
class UNetEncoderConfig(ConfigMixin):
    DIFFUSERS_CLASS: ClassVar[str]  # the diffusers class whose config.json this reads and writes
    OWN_FIELDS: ClassVar[tuple[str, ...]] = ()  # fields of ours that the diffusers config does not have

    in_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    layers_per_block: int = 2
    # diffusers' legacy name: for SD 1.x this is the number of heads (head_dim = channels / heads).
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    transformer_layers_per_block: int = 1
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    use_linear_projection: bool = False
    compute: Compute = Compute()

    def __post_init__(self):
        name = type(self).__name__
        check_block_types(self.down_block_types, ())
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError(
                f"{name}: {len(self.block_out_channels)} block_out_channels but "
                f"{len(self.down_block_types)} down block types"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"{name}: norm_num_groups={self.norm_num_groups} does not divide {c}")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def heads(self) -> tuple[int, ...]:
        return heads_per_block(
            self.num_attention_heads, self.attention_head_dim, len(self.block_out_channels)
        )

    def block_spec(self) -> BlockSpec:
        transformer = TransformerSpec(
            cross_attention_dim=self.cross_attention_dim,
            norm_groups=self.norm_num_groups,
            use_linear_projection=self.use_linear_projection,
            num_layers=self.transformer_layers_per_block,
        )
        return BlockSpec(self.time_embed_dim, self.norm_num_groups, self.norm_eps, self.compute, transformer)

    @classmethod
    def read_diffusers(cls, cfg: dict[str, Any], compute: Compute | None, what: str, **unsupported):
        """Our fields from a diffusers config.json, refusing the options we do not implement (the shared
        ones and `unsupported`: key -> allowed values)."""
        for key, allowed in {**_UNSUPPORTED, **unsupported}.items():
            require_default(cfg, key, allowed, what)
        per_block = {}
        for key in ("layers_per_block", "transformer_layers_per_block"):
            value = cfg.get(key)
            if isinstance(value, list | tuple):  # diffusers allows per-block lists; we need one value
                if len(set(value)) != 1:
                    raise ValueError(f"{what}: per-block {key}={value} is not supported")
                per_block[key] = value[0]
        return cls.from_foreign(cfg, compute, drop_none=False, **per_block)

    def to_diffusers(self) -> dict:
        """diffusers config.json (compute and OWN_FIELDS left out), for `python -m convert export`."""
        fixed = {"act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn"}
        return {"_class_name": self.DIFFUSERS_CLASS, **self.foreign_dict(*self.OWN_FIELDS), **fixed}


class UNetEncoder(nnx.Module):
    """Builds conv_in, time_embedding, down_blocks and mid_block of `config`; subclasses add the rest."""

    def __init__(self, config: UNetEncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        ch, heads, compute = config.block_out_channels, config.heads(), config.compute
        spec = config.block_spec()
        self.conv_in = conv(config.in_channels, ch[0], 3, compute, rngs)
        self.time_embedding = TimestepEmbedding(ch[0], config.time_embed_dim, compute, rngs)
        self.down_blocks = nnx.List(
            [
                DownBlock(
                    ch[i - 1] if i else ch[0],
                    ch[i],
                    cross_attn=block_has_cross_attention(block_type),
                    layers=config.layers_per_block,
                    heads=heads[i],
                    add_down=i < len(ch) - 1,
                    padding=config.downsample_padding,
                    spec=spec,
                    rngs=rngs,
                )
                for i, block_type in enumerate(config.down_block_types)
            ]
        )
        self.mid_block = MidBlock(
            ch[-1], heads=heads[-1], output_scale_factor=config.mid_block_scale_factor, spec=spec, rngs=rngs
        )

    def time_embed(self, timesteps: jax.Array, batch: int) -> jax.Array:
        """(batch, time_embed_dim) in the compute dtype; a scalar timestep is shared by the batch."""
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        feats = timestep_features(
            t,
            self.config.block_out_channels[0],
            flip_sin_to_cos=self.config.flip_sin_to_cos,
            freq_shift=self.config.freq_shift,
        )
        return self.time_embedding(feats.astype(self.config.compute.jnp_dtype))

    def encode(
        self,
        x: jax.Array,
        temb: jax.Array,
        context: jax.Array,
        video: VideoSpec = PLAIN,
        *,
        input_residual: jax.Array | None = None,
        ip_scale: float = 1.0,
    ) -> tuple[jax.Array, list[jax.Array]]:
        """conv_in (+ input_residual: the ControlNet's condition), down blocks, mid block.

        Returns the mid block's output and the skips (conv_in's output, then one per down-block layer and
        downsampler), in the order the up blocks consume them from the end.
        """
        # constrain_batch (a no-op without an active mesh and rules) keeps the examples split over the
        # data-parallel devices at block boundaries, whatever the compiler would infer from the weights.
        x = self.conv_in(constrain_batch(x))
        if input_residual is not None:
            x = x + input_residual
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, video, ip_scale=ip_scale)
            x = constrain_batch(x)
            skips.extend(block_skips)
        return constrain_batch(self.mid_block(x, temb, context, video, ip_scale=ip_scale)), skips
