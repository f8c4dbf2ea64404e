"""CogVideoX's causal 3-D VAE (diffusers' AutoencoderKLCogVideoX) in Flax NNX, channels last.

Video is (B, F, H, W, C) floats in [-1, 1]; latents are (B, F', H/8, W/8, latent_channels) with
F' = (F - 1) / 4 + 1: the first frame is encoded on its own, every later group of 4 frames into one latent
frame (causal convs, and temporal down/up-sampling that keeps the first frame apart). The decoder's norms are
spatial norms: GroupNorm modulated by convs of the latent being decoded.

Long videos go through in frame chunks, as diffusers does: 8 pixel frames (plus the remainder in the first
chunk) when encoding, 2 latent frames when decoding, each chunk one jitted program, with the causal convs'
temporal context handed from chunk to chunk. GroupNorm statistics are per chunk and the temporal resampling
sees one chunk at a time, so the chunking changes the numbers and is part of the model: decoding F' latent
frames in chunks of 2 gives 4 F' frames for an even F' (10 -> 40) and 4 F' - 3 for an odd one (the first
chunk then holds 3 latent frames, which decode to 9).
Large frames can further be cut into overlapping tiles that are blended together (`use_tiling=True`,
sizes in `CogVideoXTiling`), diffusers' `enable_tiling`.

Module attributes carry diffusers' names (`encoder.down_blocks.0.resnets.0.conv1.conv`,
`decoder.up_blocks.1.resnets.2.norm1.conv_y.conv`, ...), so convert/state.py maps a diffusers state dict
directly.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from xdyna_jax.models.config_utils import ConfigMixin, require_default
from xdyna_jax.models.vae import sample_latent
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.conv3d import CausalConv3d, start_cache
from xdyna_jax.nn.layers import conv3d
from xdyna_jax.nn.norms import GroupNorm
from xdyna_jax.nn.resnet import Downsample2D, Upsample2D

# diffusers' frame chunk sizes (`num_sample_frames_batch_size`, `num_latent_frames_batch_size`); the VAE
# was trained with these, other values give poor results.
SAMPLE_FRAMES_PER_CHUNK = 8
LATENT_FRAMES_PER_CHUNK = 2
# The epsilon of the encoder's output GroupNorm and of every spatial norm, whatever `norm_eps` says.
_FIXED_EPS = 1e-6
# DiagonalGaussianDistribution clamps the log-variance to this range.
_LOGVAR_RANGE = (-30.0, 20.0)
_DOWN_BLOCK = "CogVideoXDownBlock3D"
_UP_BLOCK = "CogVideoXUpBlock3D"


@dataclasses.dataclass(frozen=True)
class CogVideoXVAEConfig(ConfigMixin):
    """Architecture fields carry diffusers' config names; defaults are CogVideoX1.5's vae/config.json.

    `force_upcast` and `invert_scale_latents` are recorded for the pipelines (how they scale image
    latents); the model itself computes as `compute` says and scales by `scaling_factor` only.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN_BLOCK,) * 4
    up_block_types: tuple[str, ...] = (_UP_BLOCK,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 0.7
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = True
    compute: Compute = Compute()

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("CogVideoXVAEConfig: block_out_channels is empty")
        if set(self.down_block_types) != {_DOWN_BLOCK} or len(self.down_block_types) != n:
            raise ValueError(
                f"CogVideoXVAEConfig: down_block_types must be {n} x {_DOWN_BLOCK!r}, got {list(self.down_block_types)}"
            )
        if set(self.up_block_types) != {_UP_BLOCK} or len(self.up_block_types) != n:
            raise ValueError(
                f"CogVideoXVAEConfig: up_block_types must be {n} x {_UP_BLOCK!r}, got {list(self.up_block_types)}"
            )
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(
                f"CogVideoXVAEConfig: act_fn={self.act_fn!r} is not supported (supported: ['silu', 'swish'])"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"CogVideoXVAEConfig: norm_num_groups={self.norm_num_groups} does not divide {c}"
                )
        ratio = self.temporal_compression_ratio
        levels = math.log2(ratio) if ratio >= 1 else -1.0
        if not levels.is_integer() or levels > n - 1:
            raise ValueError(
                f"CogVideoXVAEConfig: temporal_compression_ratio={ratio!r} must be a power of two of at most "
                f"2**{n - 1} (one halving per down block that has a downsampler)"
            )
        for name in ("shift_factor", "latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"CogVideoXVAEConfig: {name}={getattr(self, name)!r} is not supported (supported: [None]); "
                    "CogVideoX latents are only scaled by scaling_factor"
                )
        if (self.use_quant_conv or self.use_post_quant_conv) and self.out_channels != self.latent_channels:
            # diffusers sizes these 1x1x1 convs by out_channels, so they only fit the latent when both agree
            raise ValueError(
                "CogVideoXVAEConfig: use_quant_conv / use_post_quant_conv need out_channels == latent_channels "
                f"(diffusers builds them with out_channels={self.out_channels}; latent_channels="
                f"{self.latent_channels})"
            )

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent pixel along H and W (8 for CogVideoX)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_levels(self) -> int:
        """How many times the frame count is halved (2 for CogVideoX: 4 frames per latent frame)."""
        return round(math.log2(self.temporal_compression_ratio))

    def encoded_num_frames(self, num_frames: int) -> int:
        """Latent frames `encode` makes from `num_frames` pixel frames (frame-chunked as diffusers does)."""
        total = 0
        for start, end in frame_chunks(num_frames, SAMPLE_FRAMES_PER_CHUNK):
            t = end - start
            for _ in range(self.temporal_levels):
                t = 1 + (t - 1) // 2 if t % 2 else t // 2
            total += t
        return total

    def decoded_num_frames(self, num_latent_frames: int) -> int:
        """Pixel frames `decode` makes from `num_latent_frames`: 4 F' for an even F', 4 F' - 3 for an odd one."""
        total = 0
        for start, end in frame_chunks(num_latent_frames, LATENT_FRAMES_PER_CHUNK):
            t = end - start
            for _ in range(self.temporal_levels):
                t = t if t == 1 else 2 * t - (t % 2)
            total += t
        return total

    @classmethod
    def from_diffusers(cls, cfg: dict, compute: Compute | None = None) -> CogVideoXVAEConfig:
        """Read a diffusers vae/config.json dict, refusing options this port does not implement."""
        require_default(cfg, "_class_name", ("AutoencoderKLCogVideoX",), "vae config")
        return cls.from_foreign(cfg, compute, drop_none=False)

    def to_diffusers(self) -> dict:
        return {"_class_name": "AutoencoderKLCogVideoX", **self.foreign_dict()}


@dataclasses.dataclass(frozen=True)
class CogVideoXTiling:
    """Tile sizes of a tiled encode / decode, named as diffusers' `enable_tiling` arguments.

    A frame is tiled when it is taller or wider than a tile (in pixels; `tile_sample_min_* / 8` latent
    pixels when decoding). Tiles start every `tile * (1 - overlap)` and overlap their neighbours, which are
    blended linearly over `overlap` of a tile, then cropped. The default (`for_config`) is half the
    config's sample size: 240 x 360 pixels for CogVideoX.
    """

    tile_sample_min_height: int
    tile_sample_min_width: int
    tile_overlap_factor_height: float = 1 / 6
    tile_overlap_factor_width: float = 1 / 5

    def __post_init__(self):
        for name in ("tile_sample_min_height", "tile_sample_min_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"CogVideoXTiling: {name}={getattr(self, name)} must be >= 1")
        for name in ("tile_overlap_factor_height", "tile_overlap_factor_width"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"CogVideoXTiling: {name}={getattr(self, name)} must be in [0, 1)")

    @classmethod
    def for_config(cls, config: CogVideoXVAEConfig) -> CogVideoXTiling:
        return cls(config.sample_height // 2, config.sample_width // 2)

    def latent_tile(self, spatial_scale: int) -> tuple[int, int]:
        return (
            int(self.tile_sample_min_height / spatial_scale),
            int(self.tile_sample_min_width / spatial_scale),
        )

    def plan(self, spatial_scale: int, *, decode: bool) -> _TilePlan:
        """Tile size, stride, blend width and kept size for `encode` (input pixels, output latent pixels)
        or `decode` (input latent pixels, output pixels), by diffusers' formulas (int() truncations kept)."""
        sample = (self.tile_sample_min_height, self.tile_sample_min_width)
        latent = self.latent_tile(spatial_scale)
        factors = (self.tile_overlap_factor_height, self.tile_overlap_factor_width)
        tile_in, tile_out = (latent, sample) if decode else (sample, latent)
        stride = tuple(int(t * (1 - f)) for t, f in zip(tile_in, factors, strict=True))
        blend = tuple(int(t * f) for t, f in zip(tile_out, factors, strict=True))
        keep = tuple(t - b for t, b in zip(tile_out, blend, strict=True))
        if min(*stride, *keep, *tile_in) < 1:
            raise ValueError(
                f"CogVideoXTiling {self}: at spatial scale {spatial_scale} the {'latent' if decode else 'pixel'} "
                f"tiles {tile_in} give strides {stride} and kept sizes {keep}; all must be >= 1"
            )
        return _TilePlan(tile=tile_in, stride=stride, blend=blend, keep=keep)


@dataclasses.dataclass(frozen=True)
class _TilePlan:
    tile: tuple[int, int]
    stride: tuple[int, int]
    blend: tuple[int, int]
    keep: tuple[int, int]


def frame_chunks(num_frames: int, per_chunk: int) -> list[tuple[int, int]]:
    """diffusers' frame chunks as (start, end): `per_chunk` frames each, the remainder in the first one."""
    count = max(num_frames // per_chunk, 1)
    rest = num_frames % per_chunk
    return [
        (0 if i == 0 else per_chunk * i + rest, min(per_chunk * (i + 1) + rest, num_frames))
        for i in range(count)
    ]


def _fold_frames(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _halve_frames(x: jax.Array) -> jax.Array:
    """Average frame pairs; with an odd count the first frame stays alone and the pairs start after it."""
    b, t = x.shape[:2]
    head, rest = (x[:, :1], x[:, 1:]) if t % 2 else (x[:, :0], x)
    pairs = rest.shape[1] // 2
    rest = rest[:, : 2 * pairs].reshape(b, pairs, 2, *x.shape[2:])
    pooled = (rest[:, :, 0] + rest[:, :, 1]) / 2
    return (
        jnp.concatenate([head, pooled.astype(x.dtype)], axis=1) if head.shape[1] else pooled.astype(x.dtype)
    )


def _double_frames(x: jax.Array) -> jax.Array:
    """Repeat every frame twice, except that an odd count (> 1) keeps the first frame single."""
    t = x.shape[1]
    if t == 1:
        return x
    if t % 2:
        return jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 2, axis=1)], axis=1)
    return jnp.repeat(x, 2, axis=1)


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output position under torch's 'nearest' resize to a given size (float32 scale)."""
    if size_in == size_out:
        return np.arange(size_out)
    scale = np.float32(size_in) / np.float32(size_out)
    idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, size_in - 1)


def _resize_nearest(x: jax.Array, size: tuple[int, ...]) -> jax.Array:
    """Nearest resize of the axes after the batch axis to `size` (static), as torch's F.interpolate(size=)."""
    for axis, n_out in enumerate(size, start=1):
        n_in = x.shape[axis]
        idx = _nearest_indices(n_in, n_out)
        if n_out % n_in == 0 and np.array_equal(idx, np.arange(n_out) // (n_out // n_in)):
            x = jnp.repeat(x, n_out // n_in, axis=axis) if n_out != n_in else x
        else:
            x = jnp.take(x, jnp.asarray(idx), axis=axis)
    return x


class SpatialNorm3D(nnx.Module):
    """GroupNorm of the activation f, scaled by conv_y(zq) and shifted by conv_b(zq), zq the latent resized
    to f's frames and pixels (the first frame on its own when f has an odd frame count above 1)."""

    def __init__(self, channels: int, zq_channels: int, *, groups: int, compute: Compute, rngs: nnx.Rngs):
        self.norm_layer = GroupNorm(channels, groups, _FIXED_EPS)
        self.conv_y = CausalConv3d(zq_channels, channels, 1, compute=compute, rngs=rngs)
        self.conv_b = CausalConv3d(zq_channels, channels, 1, compute=compute, rngs=rngs)

    def __call__(self, f: jax.Array, zq: jax.Array) -> jax.Array:
        # conv_y / conv_b are per-pixel (1x1x1, no temporal context, so no cache) and a nearest resize only
        # copies pixels, so they commute: convolving at the latent's resolution and resizing the results gives
        # the same numbers while the full-resolution scale and shift fuse into the normalisation instead of
        # being two more activation-sized buffers (and the convs cost 1/256 of the FLOPs in the last block).
        scale, _ = self.conv_y(zq)
        shift, _ = self.conv_b(zq)
        size = f.shape[1:4]
        return self.norm_layer(f) * _resize_like_frames(scale, size) + _resize_like_frames(shift, size)


def _resize_like_frames(zq: jax.Array, size: tuple[int, int, int]) -> jax.Array:
    """zq nearest-resized to (T, H, W) = `size`; for an odd T > 1 the first frame is resized on its own."""
    t, h, w = size
    if t > 1 and t % 2:
        return jnp.concatenate(
            [_resize_nearest(zq[:, :1], (1, h, w)), _resize_nearest(zq[:, 1:], (t - 1, h, w))], axis=1
        )
    return _resize_nearest(zq, size)


class ResnetBlock3D(nnx.Module):
    """norm1-silu-conv1-norm2-silu-conv2 plus the input (through a 1x1x1 conv when the width changes).

    The norms are GroupNorms (encoder) or spatial norms conditioned on the latent (decoder,
    `spatial_norm_dim` = latent channels).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        *,
        groups: int,
        eps: float,
        spatial_norm_dim: int | None,
        compute: Compute,
        rngs: nnx.Rngs,
    ):
        def norm(channels):
            if spatial_norm_dim is None:
                return GroupNorm(channels, groups, eps)
            return SpatialNorm3D(channels, spatial_norm_dim, groups=groups, compute=compute, rngs=rngs)

        self.norm1 = norm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, compute=compute, rngs=rngs)
        self.norm2 = norm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, compute=compute, rngs=rngs)
        self.conv_shortcut = conv3d(cin, cout, (1, 1, 1), compute, rngs) if cin != cout else None

    def _norm(self, norm, x, zq):
        return norm(x) if zq is None else norm(x, zq)

    def __call__(self, x: jax.Array, zq: jax.Array | None = None, cache: dict | None = None):
        cache = cache or {}
        h, conv1_cache = self.conv1(jax.nn.silu(self._norm(self.norm1, x, zq)), cache.get("conv1"))
        h, conv2_cache = self.conv2(jax.nn.silu(self._norm(self.norm2, h, zq)), cache.get("conv2"))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h + shortcut, {"conv1": conv1_cache, "conv2": conv2_cache}


def _run_resnets(resnets, x, zq, cache):
    cache = cache or {}
    new = {}
    for i, resnet in enumerate(resnets):
        x, new[f"resnet_{i}"] = resnet(x, zq, cache.get(f"resnet_{i}"))
    return x, new


class Downsample3D(Downsample2D):
    """Optionally halve the frames (`compress_time`), then the VAE's stride-2 3x3 conv on every frame."""

    def __init__(self, channels: int, *, compress_time: bool, compute: Compute, rngs: nnx.Rngs):
        super().__init__(channels, channels, padding=0, compute=compute, rngs=rngs)
        self.compress_time = compress_time

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.compress_time:
            x = _halve_frames(x)
        b, t = x.shape[:2]
        y = super().__call__(_fold_frames(x))
        return y.reshape(b, t, *y.shape[1:])


class Upsample3D(Upsample2D):
    """Optionally double the frames (`compress_time`), then 2x nearest upsampling and a 3x3 conv per frame."""

    def __init__(self, channels: int, *, compress_time: bool, compute: Compute, rngs: nnx.Rngs):
        super().__init__(channels, channels, compute=compute, rngs=rngs)
        self.compress_time = compress_time

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.compress_time:
            x = _double_frames(x)
        b, t = x.shape[:2]
        y = super().__call__(_fold_frames(x))
        return y.reshape(b, t, *y.shape[1:])


def _resnet(cin, cout, cfg: CogVideoXVAEConfig, rngs, spatial_norm_dim=None) -> ResnetBlock3D:
    return ResnetBlock3D(
        cin,
        cout,
        groups=cfg.norm_num_groups,
        eps=cfg.norm_eps,
        spatial_norm_dim=spatial_norm_dim,
        compute=cfg.compute,
        rngs=rngs,
    )


class DownBlock3D(nnx.Module):
    def __init__(self, cin, cout, *, add_down: bool, compress_time: bool, cfg: CogVideoXVAEConfig, rngs):
        self.resnets = nnx.List(
            [_resnet(cin if i == 0 else cout, cout, cfg, rngs) for i in range(cfg.layers_per_block)]
        )
        self.downsamplers = (
            nnx.List([Downsample3D(cout, compress_time=compress_time, compute=cfg.compute, rngs=rngs)])
            if add_down
            else None
        )

    def __call__(self, x: jax.Array, cache: dict | None = None):
        x, cache = _run_resnets(self.resnets, x, None, cache)
        return (x if self.downsamplers is None else self.downsamplers[0](x)), cache


class MidBlock3D(nnx.Module):
    def __init__(self, channels: int, *, cfg: CogVideoXVAEConfig, rngs, spatial_norm_dim: int | None = None):
        self.resnets = nnx.List([_resnet(channels, channels, cfg, rngs, spatial_norm_dim) for _ in range(2)])

    def __call__(self, x: jax.Array, zq: jax.Array | None = None, cache: dict | None = None):
        return _run_resnets(self.resnets, x, zq, cache)


class UpBlock3D(nnx.Module):
    def __init__(self, cin, cout, *, add_up: bool, compress_time: bool, cfg: CogVideoXVAEConfig, rngs):
        z = cfg.latent_channels
        self.resnets = nnx.List(
            [_resnet(cin if i == 0 else cout, cout, cfg, rngs, z) for i in range(cfg.layers_per_block + 1)]
        )
        self.upsamplers = (
            nnx.List([Upsample3D(cout, compress_time=compress_time, compute=cfg.compute, rngs=rngs)])
            if add_up
            else None
        )

    def __call__(self, x: jax.Array, zq: jax.Array, cache: dict | None = None):
        x, cache = _run_resnets(self.resnets, x, zq, cache)
        return (x if self.upsamplers is None else self.upsamplers[0](x)), cache


class Encoder3D(nnx.Module):
    """video chunk (B, T, H, W, in) -> (B, T', H/8, W/8, 2*latent): mean and log-variance on the channels."""

    def __init__(self, cfg: CogVideoXVAEConfig, rngs: nnx.Rngs):
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3, compute=cfg.compute, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                DownBlock3D(
                    ch[max(i - 1, 0)],
                    ch[i],
                    add_down=i < n - 1,
                    compress_time=i < cfg.temporal_levels,
                    cfg=cfg,
                    rngs=rngs,
                )
                for i in range(n)
            ]
        )
        self.mid_block = MidBlock3D(ch[-1], cfg=cfg, rngs=rngs)
        self.norm_out = GroupNorm(ch[-1], cfg.norm_num_groups, _FIXED_EPS)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3, compute=cfg.compute, rngs=rngs)

    def __call__(self, x: jax.Array, cache: dict | None = None):
        cache = cache or {}
        new = {}
        x, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
        for i, block in enumerate(self.down_blocks):
            x, new[f"down_block_{i}"] = block(x, cache.get(f"down_block_{i}"))
        x, new["mid_block"] = self.mid_block(x, cache=cache.get("mid_block"))
        x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x)), cache.get("conv_out"))
        return x, new


class Decoder3D(nnx.Module):
    """latent chunk (B, T', h, w, latent) -> (B, T, 8h, 8w, out); every norm is a spatial norm of the chunk."""

    def __init__(self, cfg: CogVideoXVAEConfig, rngs: nnx.Rngs):
        rch, n = cfg.block_out_channels[::-1], len(cfg.block_out_channels)
        z = cfg.latent_channels
        self.conv_in = CausalConv3d(z, rch[0], 3, compute=cfg.compute, rngs=rngs)
        self.mid_block = MidBlock3D(rch[0], cfg=cfg, rngs=rngs, spatial_norm_dim=z)
        self.up_blocks = nnx.List(
            [
                UpBlock3D(
                    rch[max(i - 1, 0)],
                    rch[i],
                    add_up=i < n - 1,
                    compress_time=i < cfg.temporal_levels,
                    cfg=cfg,
                    rngs=rngs,
                )
                for i in range(n)
            ]
        )
        self.norm_out = SpatialNorm3D(rch[-1], z, groups=cfg.norm_num_groups, compute=cfg.compute, rngs=rngs)
        self.conv_out = CausalConv3d(rch[-1], cfg.out_channels, 3, compute=cfg.compute, rngs=rngs)

    def __call__(self, z: jax.Array, cache: dict | None = None):
        cache = cache or {}
        new = {}
        x, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
        x, new["mid_block"] = self.mid_block(x, z, cache.get("mid_block"))
        for i, block in enumerate(self.up_blocks):
            x, new[f"up_block_{i}"] = block(x, z, cache.get(f"up_block_{i}"))
        x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x, z)), cache.get("conv_out"))
        return x, new


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4,))
def _chunk_program(graphdef, method: str, state, x, cache):
    """One frame chunk through `method` of the merged model: compiled once per (model, chunk shape).

    The incoming cache is donated: its buffers can hold the outgoing one (about 1.3 GB per 240 x 360 tile).
    """
    return getattr(nnx.merge(graphdef, state), method)(x, cache)


# The cache shapes of each chunk program, by what they depend on: finding them traces the model (about a
# second for the full-size decoder) and a tiled decode starts a video in every tile.
_CACHE_SHAPES: dict = {}


def _cache_shapes(graphdef, method: str, state, x: jax.Array):
    key = (
        graphdef,
        method,
        tuple(x.shape),
        jnp.dtype(x.dtype),
        frozenset(jnp.dtype(a.dtype) for a in jax.tree.leaves(state)),
    )
    if key not in _CACHE_SHAPES:
        if len(_CACHE_SHAPES) >= 64:
            _CACHE_SHAPES.clear()
        _CACHE_SHAPES[key] = _chunk_program.eval_shape(graphdef, method, state, x, None)[1]
    return _CACHE_SHAPES[key]


# Cutting inputs into chunks / tiles and joining the results run as one jitted program each (per shape and
# plan), not as dozens of eager slices and blends that would each compile a small program of their own.


@functools.partial(jax.jit, static_argnums=1)
def _cut_frames(x: jax.Array, bounds: tuple[tuple[int, int], ...]) -> tuple[jax.Array, ...]:
    return tuple(x[:, start:end] for start, end in bounds)


@jax.jit
def _join_frames(chunks: list[jax.Array]) -> jax.Array:
    return jnp.concatenate(chunks, axis=1)


def _over_frame_chunks(run_chunk, x: jax.Array, per_chunk: int) -> jax.Array:
    """Run the chunks in order, each with the causal cache the previous one left, and join them on frames."""
    bounds = tuple(frame_chunks(x.shape[1], per_chunk))
    if len(bounds) == 1:
        return run_chunk(x, None)[0]
    cache, outputs = None, []
    for chunk in _cut_frames(x, bounds):
        y, cache = run_chunk(chunk, cache)
        outputs.append(y)
    return _join_frames(outputs)


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """b with its first `extent` rows (or columns) faded in from the last ones of its neighbour a."""
    e = min(a.shape[axis], b.shape[axis], extent)
    if e <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = e
    w_b = np.array([y / e for y in range(e)], np.float32).reshape(shape)
    w_a = np.array([1 - y / e for y in range(e)], np.float32).reshape(shape)
    n_a, n_b = a.shape[axis], b.shape[axis]
    mixed = lax.slice_in_dim(a, n_a - e, n_a, axis=axis) * w_a + lax.slice_in_dim(b, 0, e, axis=axis) * w_b
    return jnp.concatenate([mixed, lax.slice_in_dim(b, e, n_b, axis=axis)], axis=axis)


@functools.partial(jax.jit, static_argnums=1)
def _cut_tiles(x: jax.Array, plan: _TilePlan) -> tuple[tuple[jax.Array, ...], ...]:
    """Overlapping (H, W) tiles of x (B, F, H, W, C), a tuple of rows; edge tiles are smaller."""
    height, width = x.shape[2:4]
    (th, tw), (sh, sw) = plan.tile, plan.stride
    return tuple(
        tuple(x[:, :, i : i + th, j : j + tw] for j in range(0, width, sw)) for i in range(0, height, sh)
    )


@functools.partial(jax.jit, static_argnums=1)
def _join_tiles(rows: list[list[jax.Array]], plan: _TilePlan) -> jax.Array:
    """Blend each tile into its upper and left neighbours and crop it to `plan.keep`, in diffusers' order:
    a neighbour is used after its own blending."""
    rows = [list(row) for row in rows]
    kh, kw = plan.keep
    out_rows = []
    for i, row in enumerate(rows):
        for j in range(len(row)):
            tile = row[j]
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, plan.blend[0], axis=2)
            if j > 0:
                tile = _blend(row[j - 1], tile, plan.blend[1], axis=3)
            row[j] = tile
        out_rows.append(jnp.concatenate([t[:, :, :kh, :kw] for t in row], axis=3))
    return jnp.concatenate(out_rows, axis=2)


def _over_tiles(run_tile, x: jax.Array, plan: _TilePlan) -> jax.Array:
    """Run `run_tile` on every tile of x, one after the other, and join the results."""
    return _join_tiles([[run_tile(tile) for tile in row] for row in _cut_tiles(x, plan)], plan)


class AutoencoderKLCogVideoX(nnx.Module):
    """`encode` video to the posterior's (mean, logvar), `decode` latents to video; channels last, float32 out.

    Both run in diffusers' frame chunks, each chunk one jitted program (compiled once per chunk shape, and
    usable inside an outer jit or eval_shape); `use_tiling=True` also splits frames larger than a tile
    (`tiling`, default `CogVideoXTiling.for_config(config)`) into blended tiles.
    """

    def __init__(self, config: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        z, compute = config.latent_channels, config.compute
        self.encoder = Encoder3D(config, rngs)
        self.decoder = Decoder3D(config, rngs)
        self.quant_conv = conv3d(2 * z, 2 * z, (1, 1, 1), compute, rngs) if config.use_quant_conv else None
        self.post_quant_conv = conv3d(z, z, (1, 1, 1), compute, rngs) if config.use_post_quant_conv else None

    # -- one frame chunk (pure functions of the parameters; what the jitted programs run) --

    def encode_chunk(self, x: jax.Array, cache: dict | None = None) -> tuple[jax.Array, dict]:
        """A chunk of video (B, T, H, W, in) -> (moments (B, T', h, w, 2*latent) float32, cache for the next)."""
        h, cache = self.encoder(x.astype(self.config.compute.jnp_dtype), cache)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h.astype(jnp.float32), cache

    def decode_chunk(self, z: jax.Array, cache: dict | None = None) -> tuple[jax.Array, dict]:
        """A chunk of latents (B, T', h, w, latent) -> (video (B, T, 8h, 8w, out) float32, cache for the next)."""
        z = z.astype(self.config.compute.jnp_dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        y, cache = self.decoder(z, cache)
        return y.astype(jnp.float32), cache

    # -- whole videos --

    def _check(self, x: jax.Array, channels: int, what: str) -> jax.Array:
        if x.ndim != 5 or x.shape[-1] != channels or min(x.shape[:4]) < 1:
            raise ValueError(
                f"AutoencoderKLCogVideoX {what} expects channels-last video (B, F, H, W, {channels}), "
                f"got {tuple(x.shape)}"
            )
        return x

    def _tiling(self, tiling: CogVideoXTiling | None) -> CogVideoXTiling:
        if tiling is None:
            return CogVideoXTiling.for_config(self.config)
        if not isinstance(tiling, CogVideoXTiling):
            raise TypeError(f"tiling must be a CogVideoXTiling, got {type(tiling).__name__}")
        return tiling

    def _chunk_runner(self, method: str):
        graphdef, state = nnx.split(self)

        def run(x, cache):
            if cache is None:
                # the first chunk runs the program of the later chunks of its shape, with a cache that
                # says "start of the video"
                cache = start_cache(_cache_shapes(graphdef, method, state, x))
            return _chunk_program(graphdef, method, state, x, cache)

        return run

    def encode_moments(
        self, video: jax.Array, *, use_tiling: bool = False, tiling: CogVideoXTiling | None = None
    ) -> jax.Array:
        """video (B, F, H, W, in) -> the encoder's (B, F', h, w, 2*latent) float32, chunked (and tiled)."""
        x = self._check(video, self.config.in_channels, "encode")
        plan = self._tiling(tiling).plan(self.config.spatial_scale, decode=False)
        run = self._chunk_runner("encode_chunk")

        def per_tile(t):
            return _over_frame_chunks(run, t, SAMPLE_FRAMES_PER_CHUNK)

        th, tw = plan.tile
        if use_tiling and (x.shape[2] > th or x.shape[3] > tw):
            return _over_tiles(per_tile, x, plan)
        return per_tile(x)

    def encode(
        self, video: jax.Array, *, use_tiling: bool = False, tiling: CogVideoXTiling | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """video (B, F, H, W, in) in [-1, 1] -> posterior (mean, logvar), each (B, F', H/8, W/8, latent), float32.

        F' = (F - 1) / 4 + 1 for F = 1, 5, 9, ... (see `CogVideoXVAEConfig.encoded_num_frames` for others).
        """
        moments = self.encode_moments(video, use_tiling=use_tiling, tiling=tiling)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode(
        self, latents: jax.Array, *, use_tiling: bool = False, tiling: CogVideoXTiling | None = None
    ) -> jax.Array:
        """Unscaled latents (B, F', h, w, latent) -> video (B, F, 8h, 8w, out) float32, roughly [-1, 1].

        F = `config.decoded_num_frames(F')`: 4 F' for an even F', 4 F' - 3 for an odd one, as diffusers gives
        them (the pipelines trim the even case to the frames they asked for).
        """
        z = self._check(latents, self.config.latent_channels, "decode")
        plan = self._tiling(tiling).plan(self.config.spatial_scale, decode=True)
        run = self._chunk_runner("decode_chunk")

        def per_tile(t):
            return _over_frame_chunks(run, t, LATENT_FRAMES_PER_CHUNK)

        th, tw = plan.tile
        if use_tiling and (z.shape[2] > th or z.shape[3] > tw):
            return _over_tiles(per_tile, z, plan)
        return per_tile(z)

    def __call__(
        self,
        video: jax.Array,
        key: jax.Array | None = None,
        sample_posterior: bool = False,
        *,
        use_tiling: bool = False,
        tiling: CogVideoXTiling | None = None,
    ) -> jax.Array:
        """Reconstruct `video` through the posterior's mode, or a sample of it (needs `key`)."""
        if sample_posterior and key is None:
            raise ValueError("sample_posterior=True needs a PRNG key")
        mean, logvar = self.encode(video, use_tiling=use_tiling, tiling=tiling)
        z = sample_latent(mean, logvar, key) if sample_posterior else mean
        return self.decode(z, use_tiling=use_tiling, tiling=tiling)

    def latents_from_video(
        self,
        video: jax.Array,
        key: jax.Array | None = None,
        *,
        use_tiling: bool = False,
        tiling: CogVideoXTiling | None = None,
    ) -> jax.Array:
        """Diffusion-space latents: a posterior sample (the mode if `key` is None) times `scaling_factor`."""
        mean, logvar = self.encode(video, use_tiling=use_tiling, tiling=tiling)
        z = mean if key is None else sample_latent(mean, logvar, key)
        return z * self.config.scaling_factor

    def video_from_latents(
        self, latents: jax.Array, *, use_tiling: bool = False, tiling: CogVideoXTiling | None = None
    ) -> jax.Array:
        """Undo `latents_from_video`'s scaling, then decode."""
        return self.decode(latents / self.config.scaling_factor, use_tiling=use_tiling, tiling=tiling)
