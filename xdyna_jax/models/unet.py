"""The SD 1.x UNet (diffusers' UNet2DConditionModel family) in Flax NNX, NHWC."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.models.unet_blocks import (
    BlockSpec,
    UpBlock,
    VideoSpec,
    block_has_cross_attention,
    check_block_types,
)
from xdyna_jax.models.unet_encoder import UNetEncoder, UNetEncoderConfig
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import conv
from xdyna_jax.nn.motion import MotionSpec
from xdyna_jax.nn.norms import GroupNorm
from xdyna_jax.sharding import constrain_batch


@dataclasses.dataclass(frozen=True)
class UNetConfig(UNetEncoderConfig):
    """Architecture fields carry diffusers' config names; defaults are SD 1.5's unet/config.json."""

    DIFFUSERS_CLASS: ClassVar[str] = "UNet2DConditionModel"
    # The video fields are ours: diffusers' UNet2DConditionModel config has none of them.
    OWN_FIELDS: ClassVar[tuple[str, ...]] = tuple(
        "groupnorm_over_frames dynamics_adapter ip_adapter_tokens motion_modules motion_mid_block motion_max_len "
        "motion_heads motion_norm_groups motion_groupnorm_across_frames skip_reference_frame "
        "reference_timestep_zero".split()
    )

    out_channels: int = 4
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    sample_size: int | None = 64
    # --- video / X-Dyna (not diffusers UNet fields) ---
    # resnet GroupNorms and conv_norm_out pool statistics over all frames of a window (AnimateDiff v1 and the
    # X-Dyna release); off = per frame (AnimateDiff v2/v3, diffusers' UNetMotionModel).
    groupnorm_over_frames: bool = False
    dynamics_adapter: bool = False  # X-Dyna's reference branch in every attn1 (frame 0 = reference)
    ip_adapter_tokens: int = 0  # > 0: attn2 has IP-Adapter to_k_ip/to_v_ip for the last N context tokens
    motion_modules: bool = False  # AnimateDiff temporal modules after each resnet/transformer pair
    motion_mid_block: bool = False  # v2 also has one in the mid block
    motion_max_len: int = 32  # positional-encoding length: 24 (v1, X-Dyna) or 32 (v2, v3)
    motion_heads: int = 8
    motion_norm_groups: int = 32
    # diffusers' AnimateDiffTransformer3D pools the motion GroupNorm over frames; the original AnimateDiff
    # code (and so X-Dyna) normalises each frame. Default: the original.
    motion_groupnorm_across_frames: bool = False
    skip_reference_frame: bool = False  # X-Dyna's cross_id: frame 0 bypasses the motion modules
    # frame 0 (the reference) gets the timestep-0 embedding instead of the window's t: the release's disabled
    # `zero_temb` path. Off in the release, whose pretrained SD features describe a clean frame at any t. Meant
    # for a model trained from scratch, whose high-t features may treat the reference as noise too; measured on
    # the synthetic demo model it did not make the model read its reference (docs/synthetic.md).
    reference_timestep_zero: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_block_types((), self.up_block_types)
        if len(self.up_block_types) != len(self.block_out_channels):
            raise ValueError(
                f"UNetConfig: {len(self.block_out_channels)} block_out_channels but "
                f"{len(self.up_block_types)} up block types"
            )
        if self.ip_adapter_tokens < 0:
            raise ValueError(f"UNetConfig: ip_adapter_tokens must be >= 0, got {self.ip_adapter_tokens}")

    @property
    def is_video(self) -> bool:
        return self.groupnorm_over_frames or self.dynamics_adapter or self.motion_modules

    def block_spec(self) -> BlockSpec:
        spec = super().block_spec()
        adapters = dict(dynamics_adapter=self.dynamics_adapter, ip_tokens=self.ip_adapter_tokens)
        motion = MotionSpec(
            heads=self.motion_heads,
            max_len=self.motion_max_len,
            norm_groups=self.motion_norm_groups,
            groupnorm_across_frames=self.motion_groupnorm_across_frames,
        )
        return dataclasses.replace(
            spec,
            transformer=dataclasses.replace(spec.transformer, **adapters),
            motion=motion if self.motion_modules else None,
            motion_in_mid_block=self.motion_modules and self.motion_mid_block,
        )

    @classmethod
    def from_diffusers(cls, cfg: dict, compute: Compute | None = None) -> UNetConfig:
        """Read a diffusers unet/config.json dict, refusing options this port does not implement."""
        return cls.read_diffusers(
            cfg,
            compute,
            "unet config",
            dual_cross_attention=(False,),
            conv_in_kernel=(3,),
            conv_out_kernel=(3,),
            center_input_sample=(False,),
        )


class UNet(UNetEncoder):
    """sample (B, H, W, C_in), timesteps (B,) or scalar, context (B, L, D) -> noise prediction (B, H, W, C_out).

    Runs on images, or on windows (B, F, H, W, C_in) when the config `is_video`. Optional ControlNet residuals
    are added to the skip connections (`down_residuals`, one per skip) and to the mid-block output
    (`mid_residual`), as in diffusers.
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        ch, heads, spec = config.block_out_channels[::-1], config.heads()[::-1], config.block_spec()
        self.up_blocks = nnx.List(
            [
                UpBlock(
                    ch[min(i + 1, len(ch) - 1)],
                    ch[i],
                    ch[i - 1] if i else ch[0],
                    cross_attn=block_has_cross_attention(block_type),
                    layers=config.layers_per_block + 1,
                    heads=heads[i],
                    add_up=i < len(ch) - 1,
                    spec=spec,
                    rngs=rngs,
                )
                for i, block_type in enumerate(config.up_block_types)
            ]
        )
        self.conv_norm_out = GroupNorm(ch[-1], config.norm_num_groups, config.norm_eps)
        self.conv_out = conv(ch[-1], config.out_channels, 3, config.compute, rngs)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        down_residuals: list[jax.Array] | tuple[jax.Array, ...] | None = None,
        mid_residual: jax.Array | None = None,
        *,
        ip_scale: float = 1.0,
    ) -> jax.Array:
        """sample (B, H, W, C) or a window (B, F, H, W, C); timesteps (B,) or scalar; context (B, L, D).

        ControlNet residuals may be per image (B*F, ...) or per window (B, F, ...). Returns sample's shape.
        """
        cfg = self.config
        is_clip = sample.ndim == 5
        if sample.ndim not in (4, 5) or sample.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"UNet expects sample (B, H, W, {cfg.in_channels}) or (B, F, H, W, {cfg.in_channels}) in NHWC, "
                f"got {tuple(sample.shape)}"
            )
        if cfg.is_video and not is_clip:
            raise ValueError(
                f"this UNet is a video model; pass a window (B, F, H, W, C), got {tuple(sample.shape)}"
            )
        b, frames = sample.shape[0], (sample.shape[1] if is_clip else 1)
        dtype = cfg.compute.jnp_dtype
        x = sample.reshape(b * frames, *sample.shape[-3:]).astype(dtype)
        context = jnp.repeat(encoder_hidden_states.astype(dtype), frames, axis=0)
        temb = jnp.repeat(self.time_embed(timesteps, b), frames, axis=0)
        if cfg.reference_timestep_zero and is_clip:
            clean = self.time_embed(jnp.zeros((b,), jnp.int32), b)
            temb = temb.reshape(b, frames, -1).at[:, 0].set(clean).reshape(b * frames, -1)
        video = VideoSpec(
            frames=frames,
            norm_fn=_norm_over_frames(b, frames) if cfg.groupnorm_over_frames else None,
            skip_reference=cfg.skip_reference_frame,
        )

        x, skips = self.encode(x, temb, context, video, ip_scale=ip_scale)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} down residuals, got {len(down_residuals)}")
            skips = [s + r.reshape(s.shape).astype(dtype) for s, r in zip(skips, down_residuals, strict=True)]
        if mid_residual is not None:
            x = x + mid_residual.reshape(x.shape).astype(dtype)

        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[1:3] if skips else None
            x = constrain_batch(block(x, block_skips, temb, context, size, video, ip_scale=ip_scale))

        norm = video.norm_fn or (lambda n, h: n(h))
        x = self.conv_out(jax.nn.silu(norm(self.conv_norm_out, x)))
        return x.astype(jnp.float32).reshape(sample.shape[:-1] + (cfg.out_channels,))


def _norm_over_frames(batch: int, frames: int):
    """GroupNorm with statistics over every frame of a window: normalise (B, F, H, W, C), not (B*F, H, W, C)."""

    def norm(module, h):
        return module(h.reshape(batch, frames, *h.shape[1:])).reshape(h.shape)

    return norm
