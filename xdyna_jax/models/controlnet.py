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
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.models.unet_encoder import UNetEncoder, UNetEncoderConfig
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import conv


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetEncoderConfig):
    """Architecture fields carry diffusers' config names; defaults are SD 1.5's (control_v11p_sd15_*)."""

    DIFFUSERS_CLASS: ClassVar[str] = "ControlNetModel"

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    # Kept so a diffusers config round-trips; only the values SD 1.x ControlNets use are implemented.
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False

    def __post_init__(self):
        super().__post_init__()
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
    def cond_downscale(self) -> int:
        """Condition image size / latent size: each embedding stage after the first halves the size."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: dict, compute: Compute | None = None) -> ControlNetConfig:
        """Read a diffusers ControlNetModel config.json dict, refusing options this port does not implement."""
        what = "controlnet config"
        name = cfg.get("_class_name", "ControlNetModel")
        if name != "ControlNetModel":
            raise ValueError(f"{what}: _class_name is {name!r}, expected 'ControlNetModel'")
        return cls.read_diffusers(cfg, compute, what)


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


class ControlNetModel(UNetEncoder):
    """sample (B, H, W, C_in), timesteps (B,) or scalar, context (B, L, D), cond (B, s*H, s*W, C_cond)
    -> (down_residuals: one per UNet skip connection, mid_residual), with s = config.cond_downscale (8 for SD).

    Residuals are returned in the compute dtype, already multiplied by `conditioning_scale`; pass them to
    `UNet(..., down_residuals=..., mid_residual=...)`. Zero convs (and the condition
    embedding's conv_out) start at zero, as in diffusers, so a new ControlNet is a no-op until trained.
    """

    def __init__(self, config: ControlNetConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        ch, compute = config.block_out_channels, config.compute
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            config.conditioning_channels, config.conditioning_embedding_out_channels, ch[0], compute, rngs
        )
        # One per skip the encoder emits: conv_in's output, each down-block layer's, each downsampler's.
        skip_channels = [ch[0]] + [
            c for i, c in enumerate(ch) for _ in range(config.layers_per_block + int(i < len(ch) - 1))
        ]
        self.controlnet_down_blocks = nnx.List([conv(c, c, 1, compute, rngs) for c in skip_channels])
        self.controlnet_mid_block = conv(ch[-1], ch[-1], 1, compute, rngs)
        zeroed = (
            *self.controlnet_down_blocks,
            self.controlnet_mid_block,
            self.controlnet_cond_embedding.conv_out,
        )
        for layer in zeroed:
            _zero_(layer)

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
        temb = self.time_embed(timesteps, x.shape[0])
        cond_embedding = self.controlnet_cond_embedding(cond.astype(dtype))
        x, skips = self.encode(x, temb, encoder_hidden_states.astype(dtype), input_residual=cond_embedding)

        scale = jnp.asarray(conditioning_scale, dtype)
        down = [zc(s) * scale for zc, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        return down, self.controlnet_mid_block(x) * scale
