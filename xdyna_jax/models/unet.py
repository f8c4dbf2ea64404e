"""The SD 1.x UNet (diffusers' UNet2DConditionModel family) in Flax NNX, NHWC."""

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
from xdyna_jax.models.unet_blocks import (
    DownBlock,
    MidBlock,
    UpBlock,
    VideoSpec,
    block_has_cross_attention,
    check_block_types,
)
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.embeddings import TimestepEmbedding, timestep_features
from xdyna_jax.nn.layers import conv
from xdyna_jax.nn.norms import GroupNorm


@dataclasses.dataclass(frozen=True)
class UNetConfig(ConfigMixin):
    """Architecture fields carry diffusers' config names; defaults are SD 1.5's unet/config.json."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
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
    sample_size: int | None = 64
    # --- video / X-Dyna (not diffusers UNet fields) ---
    # resnet GroupNorms and conv_norm_out pool statistics over all frames of a clip (AnimateDiff v1 and the
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
    compute: Compute = Compute()

    def __post_init__(self):
        check_block_types(self.down_block_types, self.up_block_types)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"UNetConfig: {n} block_out_channels but {len(self.down_block_types)} down and "
                f"{len(self.up_block_types)} up block types"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"UNetConfig: norm_num_groups={self.norm_num_groups} does not divide {c}")
        if self.ip_adapter_tokens < 0:
            raise ValueError(f"UNetConfig: ip_adapter_tokens must be >= 0, got {self.ip_adapter_tokens}")

    @property
    def is_video(self) -> bool:
        return self.groupnorm_over_frames or self.dynamics_adapter or self.motion_modules

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def heads(self) -> tuple[int, ...]:
        return heads_per_block(
            self.num_attention_heads, self.attention_head_dim, len(self.block_out_channels)
        )

    @classmethod
    def from_diffusers(cls, cfg: dict, compute: Compute | None = None) -> UNetConfig:
        """Read a diffusers unet/config.json dict, refusing options this port does not implement."""
        what = "unet config"
        require_default(cfg, "resnet_time_scale_shift", ("default",), what)
        require_default(cfg, "class_embed_type", (None,), what)
        require_default(cfg, "addition_embed_type", (None,), what)
        require_default(cfg, "encoder_hid_dim", (None,), what)
        require_default(cfg, "time_embedding_type", ("positional",), what)
        require_default(cfg, "only_cross_attention", (False,), what)
        require_default(cfg, "dual_cross_attention", (False,), what)
        require_default(cfg, "act_fn", ("silu",), what)
        require_default(cfg, "conv_in_kernel", (3,), what)
        require_default(cfg, "conv_out_kernel", (3,), what)
        require_default(cfg, "center_input_sample", (False,), what)
        require_default(cfg, "time_embedding_dim", (None,), what)
        require_default(cfg, "mid_block_type", ("UNetMidBlock2DCrossAttn",), what)
        require_default(cfg, "transformer_layers_per_block", (1,), what)
        layers = cfg.get("layers_per_block", 2)
        if isinstance(layers, list | tuple):
            if len(set(layers)) != 1:
                raise ValueError(f"{what}: per-block layers_per_block={layers} is not supported")
            layers = layers[0]
        return cls.from_foreign(cfg, compute, drop_none=False, layers_per_block=layers)

    def to_diffusers(self) -> dict:
        """diffusers unet/config.json of the 2-D part (video fields are ours and are left out)."""
        d = self.foreign_dict(*_VIDEO_FIELDS)
        return {"_class_name": "UNet2DConditionModel", **d, "act_fn": "silu", "center_input_sample": False}


_VIDEO_FIELDS = (
    "groupnorm_over_frames",
    "dynamics_adapter",
    "ip_adapter_tokens",
    "motion_modules",
    "motion_mid_block",
    "motion_max_len",
    "motion_heads",
    "motion_norm_groups",
    "motion_groupnorm_across_frames",
    "skip_reference_frame",
)


class UNet(nnx.Module):
    """sample (B, H, W, C_in), timesteps (B,) or scalar, context (B, L, D) -> noise prediction (B, H, W, C_out).

    Optional ControlNet residuals are added to the skip connections (`down_residuals`, one per skip) and
    to the mid-block output (`mid_residual`), as in diffusers.
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg, compute = config, config.compute
        ch = cfg.block_out_channels
        heads = cfg.heads()
        tl = cfg.transformer_layers_per_block
        self.conv_in = conv(cfg.in_channels, ch[0], 3, compute, rngs)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, compute, rngs)

        down = []
        for i, block_type in enumerate(cfg.down_block_types):
            down.append(
                DownBlock(
                    ch[i - 1] if i else ch[0],
                    ch[i],
                    cross_attn=block_has_cross_attention(block_type),
                    layers=cfg.layers_per_block,
                    heads=heads[i],
                    transformer_layers=tl,
                    add_down=i < len(ch) - 1,
                    cfg=cfg,
                    compute=compute,
                    rngs=rngs,
                )
            )
        self.down_blocks = nnx.List(down)
        self.mid_block = MidBlock(
            ch[-1], heads=heads[-1], transformer_layers=tl, cfg=cfg, compute=compute, rngs=rngs
        )

        up = []
        rch, rheads = ch[::-1], heads[::-1]
        for i, block_type in enumerate(cfg.up_block_types):
            up.append(
                UpBlock(
                    rch[min(i + 1, len(ch) - 1)],
                    rch[i],
                    rch[i - 1] if i else rch[0],
                    cross_attn=block_has_cross_attention(block_type),
                    layers=cfg.layers_per_block + 1,
                    heads=rheads[i],
                    transformer_layers=tl,
                    add_up=i < len(ch) - 1,
                    cfg=cfg,
                    compute=compute,
                    rngs=rngs,
                )
            )
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = GroupNorm(ch[0], cfg.norm_num_groups, cfg.norm_eps)
        self.conv_out = conv(ch[0], cfg.out_channels, 3, compute, rngs)

    def time_embed(self, timesteps: jax.Array, batch: int) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        feats = timestep_features(
            t,
            self.config.block_out_channels[0],
            flip_sin_to_cos=self.config.flip_sin_to_cos,
            freq_shift=self.config.freq_shift,
        )
        return self.time_embedding(feats.astype(self.config.compute.jnp_dtype))

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
        """sample (B, H, W, C) or a clip (B, F, H, W, C); timesteps (B,) or scalar; context (B, L, D).

        ControlNet residuals may be per image (B*F, ...) or per clip (B, F, ...). Returns sample's shape.
        """
        cfg = self.config
        video = sample.ndim == 5
        if sample.ndim not in (4, 5) or sample.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"UNet expects sample (B, H, W, {cfg.in_channels}) or (B, F, H, W, {cfg.in_channels}) in NHWC, "
                f"got {tuple(sample.shape)}"
            )
        if cfg.is_video and not video:
            raise ValueError(
                f"this UNet is a video model; pass a clip (B, F, H, W, C), got {tuple(sample.shape)}"
            )
        b, frames = sample.shape[0], (sample.shape[1] if video else 1)
        dtype = cfg.compute.jnp_dtype
        x = sample.reshape(b * frames, *sample.shape[-3:]).astype(dtype)
        context = jnp.repeat(encoder_hidden_states.astype(dtype), frames, axis=0)
        temb = jnp.repeat(self.time_embed(timesteps, b), frames, axis=0)
        spec = VideoSpec(
            frames=frames,
            norm_fn=_norm_over_frames(b, frames) if cfg.groupnorm_over_frames else None,
            ip_scale=ip_scale,
            skip_reference=cfg.skip_reference_frame,
        )

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, spec)
            skips.extend(block_skips)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} down residuals, got {len(down_residuals)}")
            skips = [s + r.reshape(s.shape).astype(dtype) for s, r in zip(skips, down_residuals, strict=True)]

        x = self.mid_block(x, temb, context, spec)
        if mid_residual is not None:
            x = x + mid_residual.reshape(x.shape).astype(dtype)

        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[1:3] if skips else None
            x = block(x, block_skips, temb, context, upsample_size=size, spec=spec)

        norm = spec.norm_fn or (lambda n, h: n(h))
        x = self.conv_out(jax.nn.silu(norm(self.conv_norm_out, x)))
        return x.astype(jnp.float32).reshape(sample.shape[:-1] + (cfg.out_channels,))


def _norm_over_frames(batch: int, frames: int):
    """GroupNorm with statistics over every frame of a clip: normalise (B, F, H, W, C), not (B*F, H, W, C)."""

    def norm(module, h):
        return module(h.reshape(batch, frames, *h.shape[1:])).reshape(h.shape)

    return norm
