"""Thin constructors for Linear / Conv with the package's dtype and precision conventions.

Attribute names follow the PyTorch originals; leaves are Flax's (`kernel`, `bias`), so a converted key is
the PyTorch key with `weight` -> `kernel` and the layout transposed (see convert/state.py).
Convs compute through `xdyna_jax.nn.conv.conv2d`, which on CPU lowers small-extent convs as one matmul.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from xdyna_jax.nn.bf16_weights import dot_general
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.conv import conv2d


def linear(din: int, dout: int, compute: Compute, rngs: nnx.Rngs, *, bias: bool = True) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=compute.jnp_dtype,
        param_dtype=jnp.float32,
        precision=compute.lax_precision,
        dot_general=dot_general,
        rngs=rngs,
    )


def conv(
    din: int,
    dout: int,
    kernel: int,
    compute: Compute,
    rngs: nnx.Rngs,
    *,
    stride: int = 1,
    padding: int | str = "auto",
    bias: bool = True,
) -> nnx.Conv:
    """PyTorch-style Conv2d on NHWC: symmetric `padding` pixels (default kernel//2), never Flax 'SAME'.

    An `nnx.Conv` (leaves `kernel` [kh, kw, I, O] and `bias`) whose convolution is `conv2d`: the native
    XLA conv, or on CPU an im2col matmul where that is faster (same numbers to fp32 rounding).
    """
    pad = kernel // 2 if padding == "auto" else padding
    return nnx.Conv(
        din,
        dout,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=bias,
        dtype=compute.jnp_dtype,
        param_dtype=jnp.float32,
        precision=compute.lax_precision,
        conv_general_dilated=conv2d,
        rngs=rngs,
    )
