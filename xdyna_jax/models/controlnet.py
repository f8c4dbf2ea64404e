"""The SD 1.x ControlNet (diffusers' ControlNetModel) in Flax NNX, NHWC.

A ControlNet is the UNet's encoder half (conv_in, time embedding, down blocks, mid block) plus
  * `controlnet_cond_embedding`: a small conv stack that brings the condition image (pose skeleton, S-Face
    maps, ...) from pixel resolution down to the latent resolution, added to the output of conv_in;
  * one 1x1 "zero conv" per UNet skip connection (`controlnet_down_blocks`) and one after the mid block
    (`controlnet_mid_block`), whose outputs are the residuals the UNet adds to its skips / mid output.
X-Dyna uses two of these per frame: a pose ControlNet (3-channel condition) and an S-Face ControlNet
(6 channels: the local and global face maps concatenated).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.models.config_utils import (
    ConfigMixin,
    heads_per_block,
    require_default,
)
from xdyna_jax.models.unet_blocks import DownBlock, MidBlock, block_has_cross_attention, check_block_types
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.embeddings import TimestepEmbedding, timestep_features
from xdyna_jax.nn.layers import conv


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(ConfigMixin):
    """Architecture fields carry diffusers' config names; defaults are SD 1.5's (control_v11p_sd15_*).

    Also provides the fields DownBlock / MidBlock read off their `cfg` (cross_attention_dim, norm_num_groups,
    norm_eps, use_linear_projection, downsample_padding, mid_block_scale_factor, time_embed_dim).
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
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
    # Kept so a diffusers config round-trips; only the values SD 1.x ControlNets use are implemented.
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False
    compute: Compute = Compute()

    def __post_init__(self):
        check_block_types(self.down_block_types, ())
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError(
                f"ControlNetConfig: {len(self.block_out_channels)} block_out_channels but "
                f"{len(self.down_block_types)} down block types"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"ControlNetConfig: norm_num_groups={self.norm_num_groups} does not divide {c}"
                )
        if not self.conditioning_embedding_out_channels:
            raise ValueError("ControlNetConfig: conditioning_embedding_out_channels must not be empty")
        if self.controlnet_conditioning_channel_order != "rgb":
            raise ValueError(
                "ControlNetConfig: controlnet_conditioning_channel_order="
                f"{self.controlnet_conditioning_channel_order!r} is not supported (only 'rgb')"
            )
        if self.global_pool_conditions:
            raise ValueError("ControlNetConfig: global_pool_conditions=True is not supported")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def cond_downscale(self) -> int:
        """Condition image size / latent size: each embedding stage after the first halves the size."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def heads(self) -> tuple[int, ...]:
        return heads_per_block(
            self.num_attention_heads, self.attention_head_dim, len(self.block_out_channels)
        )

    @classmethod
    def from_diffusers(cls, cfg: dict, compute: Compute | None = None) -> ControlNetConfig:
        """Read a diffusers ControlNetModel config.json dict, refusing options this port does not implement."""
        what = "controlnet config"
        name = cfg.get("_class_name", "ControlNetModel")
        if name != "ControlNetModel":
            raise ValueError(f"{what}: _class_name is {name!r}, expected 'ControlNetModel'")
        require_default(cfg, "mid_block_type", ("UNetMidBlock2DCrossAttn",), what)
        require_default(cfg, "resnet_time_scale_shift", ("default",), what)
        require_default(cfg, "class_embed_type", (None,), what)
        require_default(cfg, "num_class_embeds", (None,), what)
        require_default(cfg, "addition_embed_type", (None,), what)
        require_default(cfg, "encoder_hid_dim", (None,), what)
        require_default(cfg, "encoder_hid_dim_type", (None,), what)
        require_default(cfg, "only_cross_attention", (False,), what)
        require_default(cfg, "act_fn", ("silu",), what)
        require_default(cfg, "controlnet_conditioning_channel_order", ("rgb",), what)
        require_default(cfg, "global_pool_conditions", (False,), what)
        per_block = {}
        for key in ("layers_per_block", "transformer_layers_per_block"):
            value = cfg.get(key)
            if isinstance(value, list | tuple):  # diffusers allows per-block lists; we need one value
                if len(set(value)) != 1:
                    raise ValueError(f"{what}: per-block {key}={value} is not supported")
                per_block[key] = value[0]
        return cls.from_foreign(cfg, compute, drop_none=False, **per_block)

    def to_diffusers(self) -> dict:
        d = self.foreign_dict()
        return {
            "_class_name": "ControlNetModel",
            **d,
            "act_fn": "silu",
            "mid_block_type": "UNetMidBlock2DCrossAttn",
        }


class ControlNetConditioningEmbedding(nnx.Module):
    """conv_in, then pairs of (3x3 conv, 3x3 stride-2 conv), then conv_out; SiLU after all but conv_out."""

    def __init__(self, cin: int, channels: tuple[int, ...], cout: int, compute: Compute, rngs: nnx.Rngs):
        self.conv_in = conv(cin, channels[0], 3, compute, rngs)
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            blocks.append(conv(c_in, c_in, 3, compute, rngs))
            blocks.append(conv(c_in, c_out, 3, compute, rngs, stride=2))
        self.blocks = nnx.List(blocks)
        self.conv_out = conv(channels[-1], cout, 3, compute, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.silu(self.conv_in(x))
        for block in self.blocks:
            x = jax.nn.silu(block(x))
        return self.conv_out(x)


def _zero_(layer: nnx.Conv) -> None:
    """ControlNet's zero init: a fresh ControlNet adds exactly nothing to the UNet it is attached to."""
    layer.kernel.set_value(jnp.zeros_like(layer.kernel.get_value()))
    layer.bias.set_value(jnp.zeros_like(layer.bias.get_value()))


class ControlNetModel(nnx.Module):
    """sample (B, H, W, C_in), timesteps (B,) or scalar, context (B, L, D), cond (B, s*H, s*W, C_cond)
    -> (down_residuals: one per UNet skip connection, mid_residual), with s = config.cond_downscale (8 for SD).

    Residuals are returned in the compute dtype, already multiplied by `conditioning_scale`; pass them to
    `UNet(..., down_residuals=..., mid_residual=...)`. Zero convs (and the condition
    embedding's conv_out) start at zero, as in diffusers, so a new ControlNet is a no-op until trained.
    """

    def __init__(self, config: ControlNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg, compute = config, config.compute
        ch = cfg.block_out_channels
        heads = cfg.heads()
        self.conv_in = conv(cfg.in_channels, ch[0], 3, compute, rngs)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, compute, rngs)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            cfg.conditioning_channels, cfg.conditioning_embedding_out_channels, ch[0], compute, rngs
        )
        down = []
        zero_convs = [conv(ch[0], ch[0], 1, compute, rngs)]  # for conv_in's output, the first skip
        for i, block_type in enumerate(cfg.down_block_types):
            add_down = i < len(ch) - 1
            down.append(
                DownBlock(
                    ch[i - 1] if i else ch[0],
                    ch[i],
                    cross_attn=block_has_cross_attention(block_type),
                    layers=cfg.layers_per_block,
                    heads=heads[i],
                    transformer_layers=cfg.transformer_layers_per_block,
                    add_down=add_down,
                    cfg=cfg,
                    compute=compute,
                    rngs=rngs,
                )
            )
            # one per skip the block emits: each layer's output, plus the downsampler's
            n_skips = cfg.layers_per_block + int(add_down)
            zero_convs += [conv(ch[i], ch[i], 1, compute, rngs) for _ in range(n_skips)]
        self.down_blocks = nnx.List(down)
        self.controlnet_down_blocks = nnx.List(zero_convs)
        self.mid_block = MidBlock(
            ch[-1],
            heads=heads[-1],
            transformer_layers=cfg.transformer_layers_per_block,
            cfg=cfg,
            compute=compute,
            rngs=rngs,
        )
        self.controlnet_mid_block = conv(ch[-1], ch[-1], 1, compute, rngs)
        for layer in (*zero_convs, self.controlnet_mid_block, self.controlnet_cond_embedding.conv_out):
            _zero_(layer)

    def time_embed(self, timesteps: jax.Array, batch: int) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        feats = timestep_features(
            t,
            self.config.block_out_channels[0],
            flip_sin_to_cos=self.config.flip_sin_to_cos,
            freq_shift=self.config.freq_shift,
        )
        return self.time_embedding(feats.astype(self.config.compute.jnp_dtype))

    def _check_inputs(self, sample: jax.Array, context: jax.Array, cond: jax.Array) -> None:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"ControlNet expects sample (B, H, W, {cfg.in_channels}) in NHWC, got {tuple(sample.shape)}"
            )
        b, h, w, _ = sample.shape
        s = cfg.cond_downscale
        expected = (b, s * h, s * w, cfg.conditioning_channels)
        if tuple(cond.shape) != expected:
            raise ValueError(
                f"ControlNet expects cond {expected} (NHWC, {s}x the latent size, "
                f"{cfg.conditioning_channels} channels) for sample {tuple(sample.shape)}, "
                f"got cond {tuple(cond.shape)}"
            )
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(
                f"ControlNet expects encoder_hidden_states (B={b}, L, {cfg.cross_attention_dim}), "
                f"got {tuple(context.shape)}"
            )

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        cond: jax.Array,
        conditioning_scale: float | jax.Array = 1.0,
    ) -> tuple[list[jax.Array], jax.Array]:
        self._check_inputs(sample, encoder_hidden_states, cond)
        dtype = self.config.compute.jnp_dtype
        x = sample.astype(dtype)
        context = encoder_hidden_states.astype(dtype)
        temb = self.time_embed(timesteps, x.shape[0])

        x = self.conv_in(x) + self.controlnet_cond_embedding(cond.astype(dtype))
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)

        scale = jnp.asarray(conditioning_scale, dtype)
        down = [zc(s) * scale for zc, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        return down, self.controlnet_mid_block(x) * scale
