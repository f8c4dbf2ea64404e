"""2-D convolution on NHWC that picks its formulation per backend and static shape.

XLA's CPU convolution is slow when the output has few pixels and many channels (the 16x16 and 8x8
levels of the SD UNet at batch 1), while one matmul over gathered patches ("im2col") runs near the
CPU's matmul peak there. At large extents the native convolution wins and im2col would also multiply
the activation by kh*kw in memory. So on CPU a 3x3 conv is lowered as im2col only below a pixel count,
and a 1x1 conv (a plain matmul, no copy) always; other backends keep `lax.conv_general_dilated`.

`conv2d` has the signature of `lax.conv_general_dilated` so it plugs into `nnx.Conv(conv_general_dilated=...)`
and the parameters (`kernel` [kh, kw, I, O], `bias`) stay those of `nnx.Conv`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from xdyna_jax.nn.bf16_weights import weight_after_input

FORMULATIONS = ("auto", "native", "im2col")

# When a kh*kw > 1 conv is lowered as im2col on CPU: at most IM2COL_MAX_PIXELS output pixels (N*Ho*Wo,
# batch included) and at least IM2COL_MIN_CHANNELS input channels. Measured on the 2-core dev machine with
# bench/conv_cpu.py and by hand (fp32 3x3, batch 1, native and im2col interleaved, min of 10; time of
# im2col / time of native):
#   1280->1280:   8x8 0.28-0.44 | 16x16 0.57-0.73 | 28x16 0.83-0.93 | 16x32 0.83-0.89 | 24x32 ~1 | 32x32 ~1
#   640->640:     32x32 1.15-1.3 | 64x64 (320->320) 1.6-1.9
#   at 8x8/16x16: 320 channels ~1.05, 160 ~1.0, 128 and 64 ~1.15
# So im2col from 8x8 up to 512 pixels (which covers the 28x16 level of a 112x64 latent), native from about
# 768 on, where it is as fast or faster and im2col would hold kh*kw copies of a large activation; at 512
# pixels the patch matrix of the widest SD conv (2560 channels) is 512*9*2560*4 B = 47 MB. Below 512
# channels the patch matrix is too thin for the matmul to win (the ControlNet hint block, CLIP's
# 3-channel patch embedding, SD's 320-wide level, which only runs at 64x64 anyway).
IM2COL_MAX_PIXELS = 512
IM2COL_MIN_CHANNELS = 512


def set_formulation(model: nnx.Module, name: str) -> nnx.Module:
    """Make every conv2d-backed `nnx.Conv` in `model` use formulation `name` on all backends, in place.

    "native" or "im2col" force one (to compare them in tests and benchmarks); "auto" restores the
    default. The choice is a static attribute of each layer, so it is part of the graph that `nnx.split`
    returns and a jitted function traced with one formulation is never reused for another.
    """
    _check_formulation(name)
    fn = _FORCED[name]
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Conv) and module.conv_general_dilated in _FORCED.values():
            module.conv_general_dilated = fn
    return model


def _check_formulation(name: str) -> None:
    if name not in FORMULATIONS:
        raise ValueError(f"conv formulation {name!r} not in {FORMULATIONS}")


def _explicit_pads(padding) -> tuple[tuple[int, int], ...] | None:
    if isinstance(padding, str):
        return None
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return pads if all(lo >= 0 and hi >= 0 for lo, hi in pads) else None


def cpu_formulation(
    input_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int] = (1, 1),
    padding=((0, 0), (0, 0)),
) -> str:
    """The formulation `conv2d` uses on CPU for an NHWC input and an HWIO kernel of these static shapes."""
    n, h, w, c = input_shape
    kh, kw = kernel_shape[:2]
    strides = tuple(strides)
    pads = _explicit_pads(padding)
    if pads is None or len(pads) != 2:
        return "native"
    (pt, pb), (pl, pr) = pads
    ho = (h + pt + pb - kh) // strides[0] + 1
    wo = (w + pl + pr - kw) // strides[1] + 1
    if kh == kw == 1 and strides == (1, 1) and pads == ((0, 0), (0, 0)):
        # a 1x1 conv is a matmul over the pixels (no patch copy); measured 0.86-0.9x the native conv's
        # time at SD's UNet shapes and 0.4-0.7x at VAE decoder extents (256x256x512, 512x512x256)
        return "im2col"
    if c >= IM2COL_MIN_CHANNELS and n * ho * wo <= IM2COL_MAX_PIXELS:
        return "im2col"
    return "native"


def _native(lhs, rhs, strides, padding, precision, preferred_element_type):
    return lax.conv_general_dilated(
        lhs,
        rhs,
        strides,
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _im2col(lhs, rhs, strides, pads, precision, preferred_element_type):
    """One matmul of the [N, Ho, Wo, kh*kw*I] patches with the kernel reshaped to [kh*kw*I, O].

    Patch channels are ordered (row, column, input channel), the row-major order of the HWIO kernel,
    so the kernel reshape is free.
    """
    kh, kw, cin, cout = rhs.shape
    n, h, w, _ = lhs.shape
    (pt, pb), (pl, pr) = pads
    sh, sw = strides
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0))) if any((pt, pb, pl, pr)) else lhs
    taps = [
        lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin), (1, sh, sw, 1))
        for i in range(kh)
        for j in range(kw)
    ]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    return lax.dot_general(
        patches,
        rhs.reshape(kh * kw * cin, cout),
        (((3,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def conv2d(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    *,
    formulation: str = "auto",
) -> jax.Array:
    """`lax.conv_general_dilated` for NHWC x HWIO; on CPU lowered as im2col where `cpu_formulation` says.

    `formulation` "native" / "im2col" forces one on every backend (for tests, see `set_formulation`);
    "auto" (default) picks per backend at lowering time (`lax.platform_dependent`), so a program
    compiled for GPU/TPU never contains the im2col branch. Anything outside what im2col covers
    (dilation, groups, string padding, other layouts, sharded outputs) goes to the native conv.
    """
    _check_formulation(formulation)
    strides = tuple(int(s) for s in window_strides)
    pads = _explicit_pads(padding)
    general = dict(
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    plain = (
        lhs.ndim == 4
        and rhs.ndim == 4
        and pads is not None
        and len(pads) == 2
        and all(math.prod(d) == 1 for d in (lhs_dilation or (1,), rhs_dilation or (1,)))
        and feature_group_count == 1
        and out_sharding is None
        and _is_nhwc_hwio(dimension_numbers)
    )
    rhs = weight_after_input(lhs, rhs)
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, strides, padding, out_sharding=out_sharding, **general)

    def native(x, k):
        return _native(x, k, strides, pads, precision, preferred_element_type)

    def im2col(x, k):
        return _im2col(x, k, strides, pads, precision, preferred_element_type)

    if formulation == "native":
        return native(lhs, rhs)
    if formulation == "im2col":
        return im2col(lhs, rhs)
    if cpu_formulation(lhs.shape, rhs.shape, strides, pads) == "native":
        return native(lhs, rhs)
    return lax.platform_dependent(lhs, rhs, cpu=im2col, default=native)


def _is_nhwc_hwio(dimension_numbers) -> bool:
    """True for ("NHWC", "HWIO", "NHWC") given as strings or as the ConvDimensionNumbers nnx.Conv passes."""
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")


# One callable per formulation (conv2d itself for "auto"), so layers set alike have equal graph defs.
_FORCED = {name: functools.partial(conv2d, formulation=name) for name in FORMULATIONS if name != "auto"}
_FORCED["auto"] = conv2d
