"""Down, mid and up blocks of the SD UNet (diffusers' CrossAttnDownBlock2D / DownBlock2D /
UNetMidBlock2DCrossAttn / CrossAttnUpBlock2D / UpBlock2D), NHWC."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx

from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.motion import MotionSpec, VanillaTemporalModule
from xdyna_jax.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from xdyna_jax.nn.transformer import Transformer2DModel, TransformerSpec


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What every block of one model shares, read once from its config (the blocks never see the config)."""

    temb_channels: int
    norm_groups: int
    norm_eps: float
    compute: Compute
    transformer: TransformerSpec
    motion: MotionSpec | None = None  # AnimateDiff modules after each (resnet, transformer) pair
    motion_in_mid_block: bool = False  # v2 also has one in the mid block


class VideoSpec(NamedTuple):
    """How a call treats the frames folded into the batch (index b*frames + f; frame 0 = reference).

    norm_fn: how resnet GroupNorms pool statistics (None: per frame); see ResnetBlock2D.
    """

    frames: int = 1
    norm_fn: Callable | None = None
    skip_reference: bool = False


PLAIN = VideoSpec()


def _attentions(channels: int, heads: int, count: int, spec: BlockSpec, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List(
        [Transformer2DModel(channels, heads, spec.transformer, spec.compute, rngs) for _ in range(count)]
    )


def _motion_modules(channels: int, count: int, motion: MotionSpec | None, compute, rngs) -> nnx.List | None:
    if motion is None:
        return None
    return nnx.List(
        [VanillaTemporalModule(channels, motion, compute=compute, rngs=rngs) for _ in range(count)]
    )


def _resnet(cin: int, cout: int, spec: BlockSpec, rngs: nnx.Rngs, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(
        cin,
        cout,
        temb_channels=spec.temb_channels,
        groups=spec.norm_groups,
        eps=spec.norm_eps,
        compute=spec.compute,
        rngs=rngs,
        output_scale_factor=scale,
    )


def _pair(block, i, x, temb, context, video: VideoSpec, ip_scale: float):
    """resnet i, then its transformer and motion module if the block has them."""
    x = block.resnets[i](x, temb, video.norm_fn)
    if block.attentions is not None:
        x = block.attentions[i](x, context, frames=video.frames, ip_scale=ip_scale)
    if block.motion_modules is not None:
        x = block.motion_modules[i](x, video.frames, video.skip_reference)
    return x


class DownBlock(nnx.Module):
    """`layers` (resnet [+ transformer]) pairs, then an optional stride-2 downsampler."""

    def __init__(
        self, cin, cout, *, cross_attn, layers, heads, add_down, padding: int, spec: BlockSpec, rngs
    ):
        self.resnets = nnx.List([_resnet(cin if i == 0 else cout, cout, spec, rngs) for i in range(layers)])
        self.attentions = _attentions(cout, heads, layers, spec, rngs) if cross_attn else None
        self.motion_modules = _motion_modules(cout, layers, spec.motion, spec.compute, rngs)
        self.downsamplers = (
            nnx.List([Downsample2D(cout, cout, padding=padding, compute=spec.compute, rngs=rngs)])
            if add_down
            else None
        )

    def __call__(self, x, temb, context, video: VideoSpec = PLAIN, *, ip_scale: float = 1.0):
        skips = []
        for i in range(len(self.resnets)):
            x = _pair(self, i, x, temb, context, video, ip_scale)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nnx.Module):
    """resnet, then (transformer [+ motion module], resnet) pairs."""

    def __init__(self, channels, *, heads, output_scale_factor: float, spec: BlockSpec, rngs):
        self.resnets = nnx.List(
            [_resnet(channels, channels, spec, rngs, output_scale_factor) for _ in range(2)]
        )
        self.attentions = _attentions(channels, heads, 1, spec, rngs)
        motion = spec.motion if spec.motion_in_mid_block else None
        self.motion_modules = _motion_modules(channels, 1, motion, spec.compute, rngs)

    def __call__(self, x, temb, context, video: VideoSpec = PLAIN, *, ip_scale: float = 1.0):
        x = self.resnets[0](x, temb, video.norm_fn)
        for i, (attn, resnet) in enumerate(zip(self.attentions, self.resnets[1:], strict=True)):
            x = attn(x, context, frames=video.frames, ip_scale=ip_scale)
            if self.motion_modules is not None:
                x = self.motion_modules[i](x, video.frames, video.skip_reference)
            x = resnet(x, temb, video.norm_fn)
        return x


class UpBlock(nnx.Module):
    """`layers` resnets each fed concat(x, skip) [+ transformer], then an optional nearest-2x upsampler."""

    def __init__(self, cin, cout, prev_cout, *, cross_attn, layers, heads, add_up, spec: BlockSpec, rngs):
        def res_in(i):
            skip = cin if i == layers - 1 else cout
            return (prev_cout if i == 0 else cout) + skip

        self.resnets = nnx.List([_resnet(res_in(i), cout, spec, rngs) for i in range(layers)])
        self.attentions = _attentions(cout, heads, layers, spec, rngs) if cross_attn else None
        self.motion_modules = _motion_modules(cout, layers, spec.motion, spec.compute, rngs)
        self.upsamplers = (
            nnx.List([Upsample2D(cout, cout, compute=spec.compute, rngs=rngs)]) if add_up else None
        )

    def __call__(
        self, x, skips, temb, context, upsample_size=None, video: VideoSpec = PLAIN, *, ip_scale: float = 1.0
    ):
        for i in range(len(self.resnets)):
            x = _pair(self, i, jnp.concatenate([x, skips.pop()], axis=-1), temb, context, video, ip_scale)
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
