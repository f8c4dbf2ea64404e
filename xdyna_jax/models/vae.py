"""The SD 1.x VAE (diffusers' AutoencoderKL) in Flax NNX, NHWC.

Module attributes carry diffusers' names (`encoder.down_blocks.0.resnets.1.conv1`, `quant_conv`,
`decoder.mid_block.attentions.0.to_q`, ...), so convert/state.py maps a diffusers state dict directly.
Images are NHWC floats in [-1, 1]; latents are NHWC with `latent_channels` channels (unscaled: multiply by
`scaling_factor` before handing them to the UNet, see `latents_from_images`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.models.config_utils import ConfigMixin, require_default
from xdyna_jax.nn.attention import Attention
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import conv
from xdyna_jax.nn.norms import GroupNorm
from xdyna_jax.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D

# Fixed by diffusers' Encoder/Decoder whatever the config says.
_EPS = 1e-6
# DiagonalGaussianDistribution clamps the log-variance to this range.
_LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig(ConfigMixin):
    """Architecture fields carry diffusers' config names; defaults are SD 1.5's vae/config.json."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] | None = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    compute: Compute = Compute()

    def __post_init__(self):
        n = len(self.block_out_channels)
        if set(self.down_block_types) != {"DownEncoderBlock2D"} or len(self.down_block_types) != n:
            raise ValueError(
                f"VAEConfig: need {n} 'DownEncoderBlock2D' down blocks, got {list(self.down_block_types)}"
            )
        if set(self.up_block_types) != {"UpDecoderBlock2D"} or len(self.up_block_types) != n:
            raise ValueError(
                f"VAEConfig: need {n} 'UpDecoderBlock2D' up blocks, got {list(self.up_block_types)}"
            )
        if self.act_fn != "silu":
            raise ValueError(f"VAEConfig: act_fn={self.act_fn!r} is not supported (supported: ['silu'])")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"VAEConfig: norm_num_groups={self.norm_num_groups} does not divide {c}")

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: dict, compute: Compute | None = None) -> VAEConfig:
        """Read a diffusers vae/config.json dict, refusing options this port does not implement.

        `force_upcast` is a pipeline hint that `compute` replaces here, so it is dropped.
        """
        what = "vae config"
        require_default(cfg, "_class_name", ("AutoencoderKL",), what)
        require_default(cfg, "latents_mean", (None,), what)
        require_default(cfg, "latents_std", (None,), what)
        require_default(cfg, "act_fn", ("silu",), what)
        return cls.from_foreign(cfg, compute, drop_none=False)

    def to_diffusers(self) -> dict:
        d = self.foreign_dict()
        return {"_class_name": "AutoencoderKL", **d}


class VAEAttention(Attention):
    """Single-head self-attention over the H*W pixels with its own GroupNorm and a residual.

    Subclasses `Attention` (rather than wrapping it) so the parameter names stay flat as in diffusers:
    `attentions.0.{group_norm, to_q, to_k, to_v, to_out.0}`.
    """

    def __init__(self, channels: int, *, groups: int, compute: Compute, rngs: nnx.Rngs):
        super().__init__(channels, heads=1, dim_head=channels, compute=compute, rngs=rngs, qkv_bias=True)
        self.group_norm = GroupNorm(channels, groups, _EPS)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        # Goes through the package's attention dispatch, so `compute.attention="chunked"` bounds the memory
        # of the 7168-token score matrix of a 896x512 image.
        out = super().__call__(tokens)
        return x + out.reshape(b, h, w, c)


def _resnet(cin: int, cout: int, cfg: VAEConfig, rngs: nnx.Rngs) -> ResnetBlock2D:
    return ResnetBlock2D(
        cin, cout, temb_channels=None, groups=cfg.norm_num_groups, eps=_EPS, compute=cfg.compute, rngs=rngs
    )


class MidBlock(nnx.Module):
    """resnet, attention, resnet (diffusers' UNetMidBlock2D without time embedding)."""

    def __init__(self, channels: int, cfg: VAEConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([_resnet(channels, channels, cfg, rngs) for _ in range(2)])
        self.attentions = (
            nnx.List([VAEAttention(channels, groups=cfg.norm_num_groups, compute=cfg.compute, rngs=rngs)])
            if cfg.mid_block_add_attention
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, layers: int, add_down: bool, cfg: VAEConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([_resnet(cin if i == 0 else cout, cout, cfg, rngs) for i in range(layers)])
        self.downsamplers = (
            nnx.List([Downsample2D(cout, cout, padding=0, compute=cfg.compute, rngs=rngs)])
            if add_down
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, layers: int, add_up: bool, cfg: VAEConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([_resnet(cin if i == 0 else cout, cout, cfg, rngs) for i in range(layers)])
        self.upsamplers = (
            nnx.List([Upsample2D(cout, cout, compute=cfg.compute, rngs=rngs)]) if add_up else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nnx.Module):
    """image (B, H, W, in) -> (B, H/8, W/8, 2*latent): mean and log-variance stacked on the channels."""

    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
        ch = cfg.block_out_channels
        self.conv_in = conv(cfg.in_channels, ch[0], 3, cfg.compute, rngs)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    layers=cfg.layers_per_block,
                    add_down=i < len(ch) - 1,
                    cfg=cfg,
                    rngs=rngs,
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock(ch[-1], cfg, rngs)
        self.conv_norm_out = GroupNorm(ch[-1], cfg.norm_num_groups, _EPS)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, cfg.compute, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """latent (B, h, w, latent) -> image (B, 8h, 8w, out); up blocks have one resnet more than down blocks."""

    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
        rch = cfg.block_out_channels[::-1]
        self.conv_in = conv(cfg.latent_channels, rch[0], 3, cfg.compute, rngs)
        self.mid_block = MidBlock(rch[0], cfg, rngs)
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock(
                    rch[max(i - 1, 0)],
                    rch[i],
                    layers=cfg.layers_per_block + 1,
                    add_up=i < len(rch) - 1,
                    cfg=cfg,
                    rngs=rngs,
                )
                for i in range(len(rch))
            ]
        )
        self.conv_norm_out = GroupNorm(rch[-1], cfg.norm_num_groups, _EPS)
        self.conv_out = conv(rch[-1], cfg.out_channels, 3, cfg.compute, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """One draw from the diagonal Gaussian posterior N(mean, exp(logvar))."""
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * noise


class AutoencoderKL(nnx.Module):
    """`encode` images to the posterior's (mean, logvar), `decode` latents to images; all NHWC, float32 out."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg, z = config, config.latent_channels
        self.encoder = Encoder(cfg, rngs)
        self.decoder = Decoder(cfg, rngs)
        self.quant_conv = conv(2 * z, 2 * z, 1, cfg.compute, rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(z, z, 1, cfg.compute, rngs) if cfg.use_post_quant_conv else None

    def _check(self, x: jax.Array, channels: int, what: str) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"VAE {what} expects (B, H, W, {channels}) in NHWC, got {tuple(x.shape)}")
        return x.astype(self.config.compute.jnp_dtype)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (B, H, W, in_channels) in [-1, 1] -> posterior (mean, logvar), each (B, H/8, W/8, latent)."""
        h = self.encoder(self._check(images, self.config.in_channels, "encode"))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent_channels) -> images (B, 8h, 8w, out_channels), roughly [-1, 1]."""
        z = self._check(latents, self.config.latent_channels, "decode")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(
        self, images: jax.Array, key: jax.Array | None = None, sample_posterior: bool = False
    ) -> jax.Array:
        """Reconstruct `images` through the posterior's mode, or a sample of it (needs `key`)."""
        if sample_posterior and key is None:
            raise ValueError("sample_posterior=True needs a PRNG key")
        mean, logvar = self.encode(images)
        return self.decode(sample_latent(mean, logvar, key) if sample_posterior else mean)

    def latents_from_images(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Diffusion-space latents: a posterior sample (mode if `key` is None), shifted and scaled."""
        mean, logvar = self.encode(images)
        z = mean if key is None else sample_latent(mean, logvar, key)
        shift = self.config.shift_factor or 0.0
        return (z - shift) * self.config.scaling_factor

    def images_from_latents(self, latents: jax.Array) -> jax.Array:
        """Inverse of `latents_from_images`' scaling, then decode."""
        shift = self.config.shift_factor or 0.0
        return self.decode(latents / self.config.scaling_factor + shift)
