"""diffusers' CogVideoXTransformer3DModel (the CogVideoX 1.0 and 1.5 video DiT) in Flax NNX.

Attribute names are diffusers', so every PyTorch key maps onto a parameter path mechanically
(convert/state.py): `patch_embed.proj`, `transformer_blocks.3.attn1.to_out.0`, `norm_out.linear`, ...

The network, for latents x (B, F', h, w, C_in) channels-last and text embeddings (B, L, text_embed_dim):
  - time (+ ofs) embedding: temb = MLP(sinusoid_D(t)) [+ MLP(sinusoid_ofs(ofs))] (D = heads x head_dim);
  - patch embedding: text tokens = text_proj(text); video tokens are (t, h, w)-raster patches, either 2-D
    per frame (1.0: a p x p stride-p conv) or 3-D (1.5: a Linear over (C, p_t, p, p)-ordered patches);
    without RoPE a fixed 3-D sinusoidal table is added (CogVideoX-2B), with learned positions (the 1.0 I2V
    model) a stored table spanning [text ; video];
  - blocks: AdaLN-zero norms with separate shift/scale/gate for text and video (`norm1`, `norm2`), full
    attention over [text ; video] with per-head q/k LayerNorm and 3-D RoPE on the video positions only, and
    a GELU-tanh feed-forward on [text ; video];
  - head: `norm_final`, AdaLN `norm_out`, `proj_out`, unpatchify back to (B, F', h, w, C_out).
Norm statistics, softmax and RoPE run in float32; everything else in `config.compute.dtype`. Parameters may
be float32 or bfloat16 arrays (a bf16 bundle); each layer casts them to the compute dtype at its use.
Every block is one `nnx.Module` called with arrays only, so a rematerialisation policy can wrap it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdyna_jax.models.config_utils import ConfigMixin, require_default
from xdyna_jax.nn.attention import Attention
from xdyna_jax.nn.attention_ops import dot_product_attention
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.embeddings import TimestepEmbedding, timestep_features
from xdyna_jax.nn.layers import conv, linear, param
from xdyna_jax.nn.norms import LayerNorm
from xdyna_jax.nn.rope import apply_rotary, axis_dims, resize_crop_region, rope_3d
from xdyna_jax.nn.transformer import Identity

# The values diffusers' CogVideoXTransformer3DModel takes for arguments a config.json leaves out (older
# files predate patch_size_t, ofs_embed_dim, patch_bias...): the import fills them in before our defaults,
# which are CogVideoX1.5-5B-I2V's, could apply.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    num_attention_heads=30,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    flip_sin_to_cos=True,
    freq_shift=0,
    time_embed_dim=512,
    ofs_embed_dim=None,
    text_embed_dim=4096,
    num_layers=30,
    attention_bias=True,
    sample_width=90,
    sample_height=60,
    sample_frames=49,
    patch_size=2,
    patch_size_t=None,
    temporal_compression_ratio=4,
    max_text_seq_length=226,
    activation_fn="gelu-approximate",
    timestep_activation_fn="silu",
    norm_elementwise_affine=True,
    norm_eps=1e-5,
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=False,
    use_learned_positional_embeddings=False,
    patch_bias=True,
)
QK_NORM_EPS = 1e-6  # diffusers builds the per-head q/k LayerNorms with eps 1e-6 whatever norm_eps says


@dataclasses.dataclass(frozen=True)
class CogVideoXConfig(ConfigMixin):
    """diffusers' CogVideoXTransformer3DModel config fields; defaults are CogVideoX1.5-5B-I2V's (the base of
    DynamiCtrl). sample_height / sample_width are latent pixels, sample_frames video frames."""

    num_attention_heads: int = 48
    attention_head_dim: int = 64
    in_channels: int = 32
    out_channels: int = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = 512
    text_embed_dim: int = 4096
    num_layers: int = 42
    attention_bias: bool = True
    sample_width: int = 300
    sample_height: int = 300
    sample_frames: int = 81
    patch_size: int = 2
    patch_size_t: int | None = 2
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = True
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = False  # only the 1.0 conv patch embedding reads it; the 1.5 Linear always has a bias
    compute: Compute = Compute()

    def __post_init__(self):
        name = type(self).__name__
        fixed = dict(
            activation_fn=("gelu-approximate",),
            timestep_activation_fn=("silu",),
            norm_elementwise_affine=(True,),
        )
        for key, allowed in fixed.items():
            require_default({key: getattr(self, key)}, key, allowed, name)
        for key in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{name}: {key} must be a positive integer, got {getattr(self, key)!r}")
        if self.ofs_embed_dim is not None and self.ofs_embed_dim != self.time_embed_dim:
            raise ValueError(
                f"{name}: ofs_embed_dim={self.ofs_embed_dim} must equal time_embed_dim={self.time_embed_dim} "
                "(the ofs embedding is added to the time embedding)"
            )
        if self.patch_size_t is not None and self.patch_size_t < 1:
            raise ValueError(f"{name}: patch_size_t must be None or >= 1, got {self.patch_size_t}")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ValueError(f"{name}: learned positional embeddings come only with rotary ones in CogVideoX")
        if self.use_rotary_positional_embeddings:
            axis_dims(self.attention_head_dim)  # raises for a head width the 3-D split cannot take
        if self.uses_position_table:
            if self.patch_size_t is not None:
                raise ValueError(
                    f"{name}: positional tables (no RoPE, or learned positions) with patch_size_t="
                    f"{self.patch_size_t} are not supported (no CogVideoX model has them; diffusers' table "
                    "would not match the 3-D patch count)"
                )
            if self.inner_dim % 16:
                raise ValueError(f"{name}: the 3-D sinusoidal table needs a width divisible by 16")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def uses_position_table(self) -> bool:
        """A sinusoidal (no RoPE) or learned table is added to the patch embedding."""
        return self.use_learned_positional_embeddings or not self.use_rotary_positional_embeddings

    @property
    def patch_volume(self) -> int:
        return self.patch_size * self.patch_size * (self.patch_size_t or 1)

    @classmethod
    def from_diffusers(cls, cfg: dict, compute: Compute | None = None, **fixed):
        """Read a diffusers transformer/config.json dict. Keys it leaves out take diffusers' defaults (not
        ours); settings we do not implement (dropout, other activations...) are refused."""
        require_default(cfg, "dropout", (0, 0.0), cls.__name__)
        return cls.from_foreign({**DIFFUSERS_DEFAULTS, **cfg}, compute, drop_none=False, **fixed)

    def to_diffusers(self, class_name: str = "CogVideoXTransformer3DModel") -> dict:
        """A config.json dict diffusers' CogVideoXTransformer3DModel.from_config accepts."""
        return {"_class_name": class_name, **self.foreign_dict(), "dropout": 0.0}


def sincos_positions_3d(
    dim: int, frames: int, grid_h: int, grid_w: int, spatial_scale: float, temporal_scale: float
) -> jax.Array:
    """(frames * grid_h * grid_w, dim) float32 fixed sinusoidal table of CogVideoX's patch embedding
    (diffusers' get_3d_sincos_pos_embed): per token [temporal (dim/4) | width (3dim/8) | height (3dim/8)],
    each part [sin | cos] of position / scale times 10000^(-2i/d). diffusers computes it in float64; the
    frequencies here are rounded once from float64, the angles in float32 (~1e-6 absolute at 2B's sizes)."""
    d_temporal, d_half_spatial = dim // 4, 3 * dim // 8

    def omega(d: int) -> np.ndarray:
        return (1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))).astype(np.float32)

    def positions(count: int, scale: float) -> np.ndarray:
        return np.arange(count, dtype=np.float32) / np.float32(scale)

    return _sincos_table(
        positions(frames, temporal_scale),
        positions(grid_h, spatial_scale),
        positions(grid_w, spatial_scale),
        omega(d_temporal),
        omega(d_half_spatial),
    )


@jax.jit
def _sincos_table(pos_t, pos_h, pos_w, omega_t, omega_s):
    """One compiled program per shape (called eagerly, a dozen small ops would each compile)."""

    def one_axis(pos, omega):
        angles = pos[:, None] * omega[None, :]
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

    by_t, by_h, by_w = one_axis(pos_t, omega_t), one_axis(pos_h, omega_s), one_axis(pos_w, omega_s)
    shape = (pos_t.shape[0], pos_h.shape[0], pos_w.shape[0])
    table = jnp.concatenate(
        [
            jnp.broadcast_to(by_t[:, None, None, :], (*shape, by_t.shape[-1])),
            jnp.broadcast_to(by_w[None, None, :, :], (*shape, by_w.shape[-1])),
            jnp.broadcast_to(by_h[None, :, None, :], (*shape, by_h.shape[-1])),
        ],
        axis=-1,
    )
    return table.reshape(-1, table.shape[-1])


def rotary_tables(
    config: CogVideoXConfig, latent_frames: int, latent_height: int, latent_width: int
) -> tuple[jax.Array, jax.Array]:
    """The RoPE (cos, sin) tables the diffusers CogVideoX pipelines build for latents of this size, each
    (tokens, attention_head_dim) float32: 1.5 (patch_size_t set) "slice" positions within the sample grid;
    1.0 "linspace" positions over the pipeline's resize-crop region of the sample grid."""
    p = config.patch_size
    grid = (latent_height // p, latent_width // p)
    base_h, base_w = config.sample_height // p, config.sample_width // p
    if config.patch_size_t is None:
        crop = resize_crop_region(grid, base_w, base_h)
        return rope_3d(
            config.attention_head_dim, grid, latent_frames, grid_type="linspace", crops_coords=crop
        )
    temporal = -(-latent_frames // config.patch_size_t)
    return rope_3d(config.attention_head_dim, grid, temporal, grid_type="slice", max_size=(base_h, base_w))


class CogVideoXPatchEmbed(nnx.Module):
    """Text projection + video patches (+ the positional table where the config has one)."""

    def __init__(self, cfg: CogVideoXConfig, rngs: nnx.Rngs):
        d, compute = cfg.inner_dim, cfg.compute
        self.cfg = cfg
        if cfg.patch_size_t is None:
            self.proj = conv(
                cfg.in_channels,
                d,
                cfg.patch_size,
                compute,
                rngs,
                stride=cfg.patch_size,
                padding=0,
                bias=cfg.patch_bias,
                names=("conv_in", "embed"),
            )
        else:
            self.proj = linear(cfg.in_channels * cfg.patch_volume, d, compute, rngs, names=(None, "embed"))
        self.text_proj = linear(cfg.text_embed_dim, d, compute, rngs, names=(None, "embed"))
        if cfg.use_learned_positional_embeddings:
            # A persistent buffer in diffusers, stored in the checkpoints, never trained there: spans
            # [max_text_seq_length text ; sample-size video] positions. Initialised as diffusers does
            # (zeros for text, the sinusoidal table for video).
            frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
            table = sincos_positions_3d(
                d,
                frames,
                cfg.sample_height // cfg.patch_size,
                cfg.sample_width // cfg.patch_size,
                cfg.spatial_interpolation_scale,
                cfg.temporal_interpolation_scale,
            )
            table = jnp.pad(table, ((cfg.max_text_seq_length, 0), (0, 0)))[None]
            self.pos_embedding = param(table, (None, "vocab", "embed"))

    def patches(self, video: jax.Array) -> jax.Array:
        """(B, F, H, W, C) latents -> (B, tokens, D) in (t, h, w) raster order."""
        cfg = self.cfg
        b, f, h, w, c = video.shape
        p = cfg.patch_size
        if cfg.patch_size_t is None:
            tokens = self.proj(video.reshape(b * f, h, w, c))  # (B*F, h/p, w/p, D)
            return tokens.reshape(b, -1, tokens.shape[-1])
        pt = cfg.patch_size_t
        x = video.reshape(b, f // pt, pt, h // p, p, w // p, p, c)
        # features in PyTorch's (C, p_t, p_h, p_w) order, the layout of proj's input
        x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, (f // pt) * (h // p) * (w // p), -1)
        return self.proj(x)

    def learned_table_applies(self, frames: int) -> bool:
        """diffusers adds its stored table only at the sample frame count; any other count (even with
        learned positions) gets the sinusoidal table of the current size."""
        cfg = self.cfg
        pixel_frames = (frames - 1) * cfg.temporal_compression_ratio + 1
        return cfg.use_learned_positional_embeddings and pixel_frames == cfg.sample_frames

    def video_positions(self, frames: int, height: int, width: int) -> jax.Array | None:
        """(1, video tokens, D) table added to the video tokens, or None (RoPE only)."""
        cfg = self.cfg
        if not cfg.uses_position_table:
            return None
        if self.learned_table_applies(frames):
            return self.pos_embedding[:, cfg.max_text_seq_length :]
        table = sincos_positions_3d(
            cfg.inner_dim,
            frames,
            height // cfg.patch_size,
            width // cfg.patch_size,
            cfg.spatial_interpolation_scale,
            cfg.temporal_interpolation_scale,
        )
        return table[None]

    def embed_video(self, video: jax.Array) -> jax.Array:
        """Video tokens (B, N, D) with their positions where the config has a table."""
        tokens = self.patches(video)
        pos = self.video_positions(*video.shape[1:4])
        return tokens if pos is None else tokens + pos.astype(tokens.dtype)

    def __call__(self, text: jax.Array, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(text tokens (B, L, D), video tokens (B, N, D)). Text tokens get positions only from a learned
        table (the sinusoidal one is zero there); that table needs L == max_text_seq_length."""
        text_tokens = self.text_proj(text)
        if self.learned_table_applies(video.shape[1]):
            table = self.pos_embedding[:, : self.cfg.max_text_seq_length]
            text_tokens = text_tokens + table.astype(text_tokens.dtype)
        return text_tokens, self.embed_video(video)


class CogVideoXLayerNormZero(nnx.Module):
    """AdaLN-zero for both streams: one shared LayerNorm, separate (shift, scale, gate) for video and text."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float, compute: Compute, rngs: nnx.Rngs):
        self.linear = linear(time_embed_dim, 6 * dim, compute, rngs)
        self.norm = LayerNorm(dim, eps)

    def __call__(self, x: jax.Array, e: jax.Array, temb: jax.Array):
        """-> (x_hat, e_hat, gate (B, 1, D), text gate (B, 1, D))."""
        mod = self.linear(jax.nn.silu(temb))[:, None, :]
        shift, scale, gate, e_shift, e_scale, e_gate = jnp.split(mod, 6, axis=-1)
        x_hat = self.norm(x) * (1 + scale) + shift
        e_hat = self.norm(e) * (1 + e_scale) + e_shift
        return x_hat, e_hat, gate, e_gate


class CogVideoXAttention(Attention):
    """Self-attention over [text ; video] with per-head q/k LayerNorm (eps 1e-6) and RoPE on the video
    queries and keys only; no mask (padded text tokens attend and are attended, as in diffusers)."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, bias: bool, compute: Compute, rngs: nnx.Rngs):
        super().__init__(dim, heads=heads, dim_head=dim_head, compute=compute, rngs=rngs, qkv_bias=bias)
        self.norm_q = LayerNorm(dim_head, QK_NORM_EPS)
        self.norm_k = LayerNorm(dim_head, QK_NORM_EPS)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, rope=None, **_):
        """x: video tokens (B, N, D); context: text tokens (B, L, D) -> (video out, text out)."""
        if context is None:
            raise ValueError(
                "CogVideoXAttention attends over [text ; video]: pass the text tokens as context"
            )
        text_len = context.shape[1]
        joint = jnp.concatenate([context, x], axis=1)
        q = self.norm_q(self.split_heads(self.to_q(joint)))
        k = self.norm_k(self.split_heads(self.to_k(joint)))
        v = self.split_heads(self.to_v(joint))
        if rope is not None:
            cos, sin = rope
            q = jnp.concatenate([q[:, :text_len], apply_rotary(q[:, text_len:], cos, sin)], axis=1)
            k = jnp.concatenate([k[:, :text_len], apply_rotary(k[:, text_len:], cos, sin)], axis=1)
        out = dot_product_attention(
            q,
            k,
            v,
            backend=self.compute.attention,
            precision=self.compute.lax_precision,
            chunk_size=self.compute.attention_chunk,
        )
        out = self.to_out[0](out.reshape(*out.shape[:-2], -1))
        return out[:, text_len:], out[:, :text_len]


class GELUTanhProjection(nnx.Module):
    """diffusers' GELU(approximate="tanh") layer: `proj` then the tanh GELU."""

    def __init__(self, dim: int, inner: int, compute: Compute, rngs: nnx.Rngs):
        self.proj = linear(dim, inner, compute, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=True)


class CogVideoXFeedForward(nnx.Module):
    """`net.0.proj` (D -> 4D), GELU-tanh, (dropout slot), `net.2` (4D -> D)."""

    def __init__(self, dim: int, compute: Compute, rngs: nnx.Rngs, *, mult: int = 4):
        self.net = nnx.List(
            [
                GELUTanhProjection(dim, dim * mult, compute, rngs),
                Identity(),
                linear(dim * mult, dim, compute, rngs, names=("mlp", "embed")),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.net:
            x = layer(x)
        return x


class CogVideoXBlock(nnx.Module):
    """norm1 -> attention over [text ; video] -> gated residuals -> norm2 -> FF on [text ; video] -> gated
    residuals. `video_norm_addend` (B, N, D), when given, is added to the video part of norm1's output
    before the attention (DynamiCtrl's pose tokens); the residual streams do not see it."""

    def __init__(self, cfg: CogVideoXConfig, rngs: nnx.Rngs):
        d, compute = cfg.inner_dim, cfg.compute
        self.norm1 = CogVideoXLayerNormZero(cfg.time_embed_dim, d, cfg.norm_eps, compute, rngs)
        self.attn1 = CogVideoXAttention(
            d,
            heads=cfg.num_attention_heads,
            dim_head=cfg.attention_head_dim,
            bias=cfg.attention_bias,
            compute=compute,
            rngs=rngs,
        )
        self.norm2 = CogVideoXLayerNormZero(cfg.time_embed_dim, d, cfg.norm_eps, compute, rngs)
        self.ff = CogVideoXFeedForward(d, compute, rngs)

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        temb: jax.Array,
        rope: tuple[jax.Array, jax.Array] | None = None,
        video_norm_addend: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(video (B, N, D), text (B, L, D)) -> the updated pair."""
        x, e = hidden_states, encoder_hidden_states
        x_hat, e_hat, gate, e_gate = self.norm1(x, e, temb)
        if video_norm_addend is not None:
            x_hat = x_hat + video_norm_addend
        a_x, a_e = self.attn1(x_hat, e_hat, rope=rope)
        x = x + gate * a_x
        e = e + e_gate * a_e
        x_hat, e_hat, gate, e_gate = self.norm2(x, e, temb)
        text_len = e.shape[1]
        f = self.ff(jnp.concatenate([e_hat, x_hat], axis=1))
        return x + gate * f[:, text_len:], e + e_gate * f[:, :text_len]


class AdaLayerNormOut(nnx.Module):
    """The output AdaLN: LN(x) * (1 + scale) + shift, [shift, scale] = linear(SiLU(temb))."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float, compute: Compute, rngs: nnx.Rngs):
        self.linear = linear(time_embed_dim, 2 * dim, compute, rngs)
        self.norm = LayerNorm(dim, eps)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.linear(jax.nn.silu(temb))[:, None, :], 2, axis=-1)
        return self.norm(x) * (1 + scale) + shift


def _check_batch_values(value, batch: int, what: str, model: str) -> None:
    size = int(np.prod(np.shape(value)))
    if np.ndim(value) > 1 or size not in (1, batch):
        raise ValueError(
            f"{model}: {what} must be a scalar, (1,) or (B={batch},), got shape {np.shape(value)}"
        )


def _batch_values(value, batch: int, dtype) -> jax.Array:
    """A scalar, (1,) or (B,) value as a (B,) array."""
    return jnp.broadcast_to(jnp.asarray(value, dtype).reshape(-1), (batch,))


class CogVideoXTransformer3DModel(nnx.Module):
    """`model(hidden_states, encoder_hidden_states, timestep, *, ofs=None, image_rotary_emb=None)`:

    hidden_states (B, F', h, w, in_channels) latents channels-last (F' latent frames, divisible by
    patch_size_t on 1.5 models); encoder_hidden_states (B, L, text_embed_dim); timestep (B,) (or a scalar);
    ofs: the 1.5 I2V offset (the pipelines pass 2.0), a scalar or (B,), required iff the config has
    ofs_embed_dim; image_rotary_emb: (cos, sin) tables (tokens, head_dim), computed from the shapes as the
    diffusers pipelines do (`rotary_tables`) when None. Returns (B, F', h, w, out_channels) in the compute
    dtype.
    """

    block_class = CogVideoXBlock

    def __init__(self, config: CogVideoXConfig, *, rngs: nnx.Rngs):
        cfg, d, compute = config, config.inner_dim, config.compute
        self.config = config
        self.patch_embed = CogVideoXPatchEmbed(cfg, rngs)
        self.time_embedding = TimestepEmbedding(d, cfg.time_embed_dim, compute, rngs)
        self.ofs_embedding = (
            TimestepEmbedding(cfg.ofs_embed_dim, cfg.ofs_embed_dim, compute, rngs)
            if cfg.ofs_embed_dim
            else None
        )
        self.transformer_blocks = nnx.List([self.block_class(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm_final = LayerNorm(d, cfg.norm_eps)
        self.norm_out = AdaLayerNormOut(cfg.time_embed_dim, d, cfg.norm_eps, compute, rngs)
        self.proj_out = linear(d, cfg.patch_volume * cfg.out_channels, compute, rngs, names=("embed", None))

    # -- pieces shared with DynamiCtrl ------------------------------------------------------------------

    def check_inputs(self, hidden_states, encoder_hidden_states, timestep, ofs, image_rotary_emb) -> None:
        """Every shape and option error, raised before any computation."""
        cfg = self.config
        name = type(self).__name__
        if hidden_states.ndim != 5 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"{name}: hidden_states must be (B, F', h, w, {cfg.in_channels}) channels-last latents, got "
                f"{tuple(hidden_states.shape)}"
            )
        b, f, h, w, _ = hidden_states.shape
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        if h % p or w % p or f % pt:
            raise ValueError(
                f"{name}: latents of {f} frames x {h}x{w} are not divisible by the patch size "
                f"{pt}x{p}x{p} (pad the frames to a multiple of patch_size_t, as the pipelines do)"
            )
        if (
            encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[0] != b
            or encoder_hidden_states.shape[-1] != cfg.text_embed_dim
        ):
            raise ValueError(
                f"{name}: encoder_hidden_states must be (B={b}, L, {cfg.text_embed_dim}), got "
                f"{tuple(encoder_hidden_states.shape)}"
            )
        if cfg.use_learned_positional_embeddings and (h != cfg.sample_height or w != cfg.sample_width):
            raise ValueError(
                f"{name}: learned positional embeddings exist only for {cfg.sample_height}x{cfg.sample_width} "
                f"latents, got {h}x{w}"
            )
        if (
            self.patch_embed.learned_table_applies(f)
            and encoder_hidden_states.shape[1] != cfg.max_text_seq_length
        ):
            raise ValueError(
                f"{name}: the learned positional table spans {cfg.max_text_seq_length} text tokens; got "
                f"{encoder_hidden_states.shape[1]} (pad the prompt embeddings to max_text_seq_length)"
            )
        if self.ofs_embedding is not None and ofs is None:
            raise ValueError(
                f"{name}: this model has an ofs embedding (1.5 I2V): pass ofs (the pipelines use 2.0)"
            )
        if self.ofs_embedding is None and ofs is not None:
            raise ValueError(f"{name}: ofs given but the config has no ofs_embed_dim")
        _check_batch_values(timestep, b, "timestep", name)
        if ofs is not None:
            _check_batch_values(ofs, b, "ofs", name)
        if image_rotary_emb is not None:
            if not cfg.use_rotary_positional_embeddings:
                raise ValueError(f"{name}: image_rotary_emb given but the config has no rotary embeddings")
            tokens = (f // pt) * (h // p) * (w // p)
            shapes = [tuple(np.shape(t)) for t in image_rotary_emb]
            if len(shapes) != 2 or any(s != (tokens, cfg.attention_head_dim) for s in shapes):
                raise ValueError(
                    f"{name}: image_rotary_emb must be (cos, sin), each ({tokens}, {cfg.attention_head_dim}); "
                    f"got shapes {shapes}"
                )

    def time_embed(self, timestep, ofs, batch: int) -> jax.Array:
        """temb (B, time_embed_dim): MLP(sinusoid_D(t)) [+ MLP(sinusoid_ofs(ofs))]."""
        cfg = self.config
        dtype = cfg.compute.jnp_dtype
        t = _batch_values(timestep, batch, jnp.float32)
        feats = timestep_features(
            t, cfg.inner_dim, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        )
        temb = self.time_embedding(feats.astype(dtype))
        if self.ofs_embedding is not None:
            o = _batch_values(ofs, batch, jnp.float32)
            feats = timestep_features(
                o, cfg.ofs_embed_dim, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
            )
            temb = temb + self.ofs_embedding(feats.astype(dtype))
        return temb

    def rope_for(self, hidden_states, image_rotary_emb):
        if not self.config.use_rotary_positional_embeddings:
            return None
        if image_rotary_emb is None:
            return rotary_tables(self.config, *hidden_states.shape[1:4])
        return tuple(jnp.asarray(t, jnp.float32) for t in image_rotary_emb)

    def output_head(self, x: jax.Array, temb: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
        """Video tokens (B, N, D) -> (B, F', h, w, out_channels)."""
        cfg = self.config
        b, f, h, w = latent_shape[:4]
        p, pt, c = cfg.patch_size, cfg.patch_size_t or 1, cfg.out_channels
        out = self.proj_out(self.norm_out(self.norm_final(x), temb))
        # proj_out's features are PyTorch's (C, p_t, p_h, p_w)
        out = out.reshape(b, f // pt, h // p, w // p, c, pt, p, p)
        return out.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, f, h, w, c)

    def embed_inputs(self, hidden_states, encoder_hidden_states, timestep, ofs, image_rotary_emb):
        """(video tokens, text tokens, temb, rope) for the blocks, after the input checks."""
        dtype = self.config.compute.jnp_dtype
        hidden_states = jnp.asarray(hidden_states, dtype)
        encoder_hidden_states = jnp.asarray(encoder_hidden_states, dtype)
        self.check_inputs(hidden_states, encoder_hidden_states, timestep, ofs, image_rotary_emb)
        temb = self.time_embed(timestep, ofs, hidden_states.shape[0])
        e, x = self.patch_embed(encoder_hidden_states, hidden_states)
        return x, e, temb, self.rope_for(hidden_states, image_rotary_emb)

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        timestep: jax.Array,
        *,
        ofs=None,
        image_rotary_emb: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        x, e, temb, rope = self.embed_inputs(
            hidden_states, encoder_hidden_states, timestep, ofs, image_rotary_emb
        )
        for block in self.transformer_blocks:
            x, e = block(x, e, temb, rope)
        return self.output_head(x, temb, hidden_states.shape)
