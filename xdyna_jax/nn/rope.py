"""3-D rotary position embedding (RoPE) of video tokens, as the CogVideoX family uses it.

A head of width D is split into a temporal, a height and a width part of D/4, 3D/8 and 3D/8 channels. Each
part rotates consecutive channel pairs (x[2i], x[2i+1]) by the angle position * theta^(-2i/d) of its axis, so
the cos / sin tables hold every frequency twice in a row ("repeat-interleaved") and are concatenated in the
order [t | h | w]. Tokens are in (t, h, w) raster order, the order the patch embedding emits them.

Two ways of placing the positions exist, both selected by the pipelines from the transformer's config:
  "slice"     (CogVideoX 1.5) integer positions 0..n-1 on every axis; a grid larger than `max_size` is an
              error (the 1.5 pipeline cuts its tables from a `max_size` grid);
  "linspace"  (CogVideoX 1.0) spatial positions spread over the crop region returned by
              `resize_crop_region`, n points from start to stop * (n-1)/n; temporal positions 0..T-1.
Tables are float32 and the rotation is computed in float32 whatever the activation dtype, then cast back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GRID_TYPES = ("slice", "linspace")


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to the (t, h, w) axes: D/4, 3D/8, 3D/8 (each must be even)."""
    if head_dim % 16:
        raise ValueError(
            f"3-D RoPE needs a head width divisible by 16 (t/h/w parts of D/4, 3D/8, 3D/8 channels, "
            f"each an even number), got {head_dim}"
        )
    return head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3


def _linspace_f32(start: float, stop: float, steps: int) -> np.ndarray:
    """`steps` float32 points from start to stop computed as PyTorch's CPU linspace does: the first half
    counted up from `start`, the second half down from `stop`, with one float32 step. jnp.linspace rounds
    differently, and these positions feed angles of up to ~100 rad, where one ulp matters."""
    start32, stop32 = np.float32(start), np.float32(stop)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float32((stop32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps)
    up = start32 + step * idx.astype(np.float32)
    down = stop32 - step * (steps - 1 - idx).astype(np.float32)
    return np.where(idx < steps // 2, up, down).astype(np.float32)


def resize_crop_region(
    grid_hw: tuple[int, int], base_width: int, base_height: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The CogVideoX 1.0 pipelines' crop region of a (grid_h, grid_w) token grid fitted into the base grid
    (the transformer's sample size in tokens): ((top, left), (bottom, right)). The grid is scaled to touch
    the base grid on its relatively longer side and centred on the other."""
    h, w = grid_hw
    if h / w > base_height / base_width:
        resize_h, resize_w = base_height, int(round(base_height / h * w))
    else:
        resize_w, resize_h = base_width, int(round(base_width / w * h))
    top = int(round((base_height - resize_h) / 2.0))
    left = int(round((base_width - resize_w) / 2.0))
    return (top, left), (top + resize_h, left + resize_w)


def _frequencies(dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/dim) for i < dim/2 as float32, rounded once from float64 on the host (inside a compiled
    program XLA may rewrite 1 / pow). PyTorch's float32 pow is not always correctly rounded: its
    frequencies can differ by one ulp, i.e. up to ~5e-6 of cos/sin at position 150 (1.5's largest grid)."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (1.0 / np.power(np.float64(theta), exponents.astype(np.float64))).astype(np.float32)


def _axis_tables(freqs: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(n, dim) float32 cos / sin of positions x frequencies, each frequency repeated twice in a row."""
    angles = positions[:, None] * freqs[None, :]
    return jnp.repeat(jnp.cos(angles), 2, axis=1), jnp.repeat(jnp.sin(angles), 2, axis=1)


def rope_3d(
    head_dim: int,
    grid_size: tuple[int, int],
    temporal_size: int,
    *,
    grid_type: str,
    crops_coords: tuple[tuple[float, float], tuple[float, float]] | None = None,
    max_size: tuple[int, int] | None = None,
    theta: float = 10000.0,
) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables, each (temporal_size * grid_h * grid_w, head_dim) float32, for tokens in (t, h, w)
    raster order (diffusers' `get_3d_rotary_pos_embed(..., use_real=True)`).

    grid_size: (grid_h, grid_w) tokens; temporal_size: temporal tokens (latent frames / patch_size_t).
    grid_type "slice" needs `max_size` = (max_h, max_w) (the grid must fit in it); "linspace" needs
    `crops_coords` = ((top, left), (bottom, right)), e.g. from `resize_crop_region`.
    """
    dim_t, dim_h, dim_w = axis_dims(head_dim)
    grid_h, grid_w = grid_size
    if min(grid_h, grid_w, temporal_size) < 1:
        raise ValueError(f"rope_3d: empty grid {grid_size} x {temporal_size} frames")
    if grid_type == "slice":
        if max_size is None:
            raise ValueError('rope_3d: grid_type="slice" needs max_size=(max_h, max_w)')
        if grid_h > max_size[0] or grid_w > max_size[1]:
            raise ValueError(
                f"rope_3d: a {grid_h}x{grid_w} token grid exceeds max_size {tuple(max_size)} of the "
                '"slice" tables (the transformer\'s sample_height/width over patch_size)'
            )
        pos_t = np.arange(temporal_size, dtype=np.float32)
        pos_h = np.arange(grid_h, dtype=np.float32)
        pos_w = np.arange(grid_w, dtype=np.float32)
    elif grid_type == "linspace":
        if crops_coords is None:
            raise ValueError(
                'rope_3d: grid_type="linspace" needs crops_coords=((top, left), (bottom, right))'
            )
        (top, left), (bottom, right) = crops_coords
        pos_h = _linspace_f32(top, bottom * (grid_h - 1) / grid_h, grid_h)
        pos_w = _linspace_f32(left, right * (grid_w - 1) / grid_w, grid_w)
        pos_t = _linspace_f32(0, temporal_size * (temporal_size - 1) / temporal_size, temporal_size)
    else:
        raise ValueError(f"rope_3d: grid_type {grid_type!r} not in {GRID_TYPES}")

    freqs = [_frequencies(d, theta) for d in (dim_t, dim_h, dim_w)]
    return _joint_tables(pos_t, pos_h, pos_w, *freqs)


@jax.jit
def _joint_tables(pos_t, pos_h, pos_w, freqs_t, freqs_h, freqs_w):
    """One compiled program per shape (called eagerly, a dozen small ops would each compile)."""
    t_cos, t_sin = _axis_tables(freqs_t, pos_t)
    h_cos, h_sin = _axis_tables(freqs_h, pos_h)
    w_cos, w_sin = _axis_tables(freqs_w, pos_w)
    shape = (pos_t.shape[0], pos_h.shape[0], pos_w.shape[0])
    dim_t, dim_h, dim_w = (2 * f.shape[0] for f in (freqs_t, freqs_h, freqs_w))

    def combine(t: jax.Array, h: jax.Array, w: jax.Array) -> jax.Array:
        joint = jnp.concatenate(
            [
                jnp.broadcast_to(t[:, None, None, :], (*shape, dim_t)),
                jnp.broadcast_to(h[None, :, None, :], (*shape, dim_h)),
                jnp.broadcast_to(w[None, None, :, :], (*shape, dim_w)),
            ],
            axis=-1,
        )
        return joint.reshape(-1, dim_t + dim_h + dim_w)

    return combine(t_cos, h_cos, w_cos), combine(t_sin, h_sin, w_sin)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the channel pairs (x[2i], x[2i+1]) of x (B, L, H, D) by tables cos / sin (L, D), in float32;
    returns x's dtype: out = x * cos + (-x[2i+1], x[2i]) * sin."""
    if x.ndim != 4 or cos.shape != (x.shape[1], x.shape[3]) or sin.shape != cos.shape:
        raise ValueError(
            f"apply_rotary: x (B, L, H, D) = {tuple(x.shape)} needs (L, D) tables, got cos "
            f"{tuple(cos.shape)} and sin {tuple(sin.shape)}"
        )
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    cos = cos.astype(jnp.float32)[None, :, None, :]
    sin = sin.astype(jnp.float32)[None, :, None, :]
    return (xf * cos + rotated * sin).astype(x.dtype)
