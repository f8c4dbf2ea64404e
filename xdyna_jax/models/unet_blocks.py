"""Down, mid and up blocks of the SD UNet (diffusers' CrossAttnDownBlock2D / DownBlock2D /
UNetMidBlock2DCrossAttn / CrossAttnUpBlock2D / UpBlock2D), NHWC."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx

from xdyna_jax.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from xdyna_jax.nn.transformer import Transformer2DModel


class VideoSpec(NamedTuple):
    """How a call treats the frames folded into the batch (index b*frames + f; frame 0 = reference).

    norm_fn: how resnet GroupNorms pool statistics (None: per frame); see ResnetBlock2D.
    """

    frames: int = 1
    norm_fn: Callable | None = None
    ip_scale: float = 1.0
    skip_reference: bool = False


PLAIN = VideoSpec()


def _attention(channels, heads, cfg, compute, rngs, num_layers):
    return Transformer2DModel(
        channels,
        heads=heads,
        cross_attention_dim=cfg.cross_attention_dim,
        groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        num_layers=num_layers,
        dynamics_adapter=getattr(cfg, "dynamics_adapter", False),
        ip_tokens=getattr(cfg, "ip_adapter_tokens", 0),
        compute=compute,
        rngs=rngs,
    )


def _motion_modules(channels, count, cfg, compute, rngs):
    """AnimateDiff temporal modules after each (resnet, transformer) pair, when the config asks for them."""
    if not getattr(cfg, "motion_modules", False):
        return None
    from xdyna_jax.nn.motion import VanillaTemporalModule

    return nnx.List(
        [
            VanillaTemporalModule(
                channels,
                heads=cfg.motion_heads,
                max_len=cfg.motion_max_len,
                norm_groups=cfg.motion_norm_groups,
                groupnorm_across_frames=cfg.motion_groupnorm_across_frames,
                compute=compute,
                rngs=rngs,
            )
            for _ in range(count)
        ]
    )


def _pair(block, i, x, temb, context, spec):
    """resnet i, then its transformer and motion module if the block has them."""
    x = block.resnets[i](x, temb, spec.norm_fn)
    if block.attentions is not None:
        x = block.attentions[i](x, context, spec.frames, spec.ip_scale)
    if block.motion_modules is not None:
        x = block.motion_modules[i](x, spec.frames, spec.skip_reference)
    return x


def _resnet(cin, cout, cfg, compute, rngs, scale=1.0):
    return ResnetBlock2D(
        cin,
        cout,
        temb_channels=cfg.time_embed_dim,
        groups=cfg.norm_num_groups,
        eps=cfg.norm_eps,
        compute=compute,
        rngs=rngs,
        output_scale_factor=scale,
    )


class DownBlock(nnx.Module):
    """`layers` (resnet [+ transformer]) pairs, then an optional stride-2 downsampler."""

    def __init__(
        self, cin, cout, *, cross_attn, layers, heads, transformer_layers, add_down, cfg, compute, rngs
    ):
        self.resnets = nnx.List(
            [_resnet(cin if i == 0 else cout, cout, cfg, compute, rngs) for i in range(layers)]
        )
        self.attentions = (
            nnx.List([_attention(cout, heads, cfg, compute, rngs, transformer_layers) for _ in range(layers)])
            if cross_attn
            else None
        )
        self.downsamplers = (
            nnx.List([Downsample2D(cout, cout, padding=cfg.downsample_padding, compute=compute, rngs=rngs)])
            if add_down
            else None
        )
        self.motion_modules = _motion_modules(cout, layers, cfg, compute, rngs)

    def __call__(self, x, temb, context, spec: VideoSpec = PLAIN):
        skips = []
        for i in range(len(self.resnets)):
            x = _pair(self, i, x, temb, context, spec)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nnx.Module):
    """resnet, then (transformer, resnet) pairs."""

    def __init__(self, channels, *, heads, transformer_layers, cfg, compute, rngs):
        scale = cfg.mid_block_scale_factor
        self.resnets = nnx.List([_resnet(channels, channels, cfg, compute, rngs, scale) for _ in range(2)])
        self.attentions = nnx.List([_attention(channels, heads, cfg, compute, rngs, transformer_layers)])
        self.motion_modules = (
            _motion_modules(channels, 1, cfg, compute, rngs)
            if getattr(cfg, "motion_mid_block", False)
            else None
        )

    def __call__(self, x, temb, context, spec: VideoSpec = PLAIN):
        x = self.resnets[0](x, temb, spec.norm_fn)
        for i, (attn, resnet) in enumerate(zip(self.attentions, self.resnets[1:], strict=True)):
            x = attn(x, context, spec.frames, spec.ip_scale)
            if self.motion_modules is not None:
                x = self.motion_modules[i](x, spec.frames, spec.skip_reference)
            x = resnet(x, temb, spec.norm_fn)
        return x


class UpBlock(nnx.Module):
    """`layers` resnets each fed concat(x, skip) [+ transformer], then an optional nearest-2x upsampler."""

    def __init__(
        self,
        cin,
        cout,
        prev_cout,
        *,
        cross_attn,
        layers,
        heads,
        transformer_layers,
        add_up,
        cfg,
        compute,
        rngs,
    ):
        def res_in(i):
            skip = cin if i == layers - 1 else cout
            return (prev_cout if i == 0 else cout) + skip

        self.resnets = nnx.List([_resnet(res_in(i), cout, cfg, compute, rngs) for i in range(layers)])
        self.attentions = (
            nnx.List([_attention(cout, heads, cfg, compute, rngs, transformer_layers) for _ in range(layers)])
            if cross_attn
            else None
        )
        self.upsamplers = nnx.List([Upsample2D(cout, cout, compute=compute, rngs=rngs)]) if add_up else None
        self.motion_modules = _motion_modules(cout, layers, cfg, compute, rngs)

    def __call__(self, x, skips, temb, context, upsample_size=None, spec: VideoSpec = PLAIN):
        for i in range(len(self.resnets)):
            x = _pair(self, i, jnp.concatenate([x, skips.pop()], axis=-1), temb, context, spec)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


def block_has_cross_attention(block_type: str) -> bool:
    return block_type.startswith("CrossAttn")


def check_block_types(down: tuple[str, ...], up: tuple[str, ...]) -> None:
    for t in down:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise ValueError(f"unsupported down block type {t!r}")
    for t in up:
        if t not in ("CrossAttnUpBlock2D", "UpBlock2D"):
            raise ValueError(f"unsupported up block type {t!r}")
