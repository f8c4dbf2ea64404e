"""Thin constructors for Linear / Conv with the package's dtype and precision conventions.

Attribute names follow the PyTorch originals; leaves are Flax's (`kernel`, `bias`), so a converted key is
the PyTorch key with `weight` -> `kernel` and the layout transposed (see convert/state.py).
Convs compute through `xdyna_jax.nn.conv.conv2d`, which on CPU lowers small-extent convs as one matmul.

Every parameter carries logical axis names, one per dimension (Flax's `out_sharding` metadata), which
`xdyna_jax.sharding` maps onto mesh axes through one rules table. The vocabulary:
  embed            a model's channel width (the narrow side of a projection; attention in/out width)
  heads / mlp      the wide side: attention q/k/v outputs and out-projection inputs / feed-forward hidden
  conv_in/conv_out a conv kernel's input / output channels (kernel height and width, and a 3-D
                   kernel's depth, are None)
  norm             GroupNorm / LayerNorm scales and biases
  vocab            rows of an embedding table (tokens, positions)
A bias takes the name of its layer's output dimension.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from xdyna_jax.nn.bf16_weights import dot_general
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.conv import conv2d

LINEAR_NAMES = ("embed", "mlp")
CONV_NAMES = ("conv_in", "conv_out")


def axis_names(names: tuple[str | None, ...]) -> dict:
    """Param metadata naming each dimension. Not eagerly sharded: the names only say where a param may
    go, `xdyna_jax.sharding` decides (so building a model never needs an active mesh)."""
    return {"out_sharding": tuple(names), "eager_sharding": False}


def param(value, names: tuple[str | None, ...]) -> nnx.Param:
    """An `nnx.Param` holding `value` with one logical axis name per dimension."""
    if len(names) != value.ndim:
        raise ValueError(f"param of shape {value.shape} given {len(names)} axis names {names}")
    return nnx.Param(value, **axis_names(names))


def linear(
    din: int,
    dout: int,
    compute: Compute,
    rngs: nnx.Rngs,
    *,
    bias: bool = True,
    names: tuple[str, str] = LINEAR_NAMES,
) -> nnx.Linear:
    """`names`: the logical axes of the kernel (in, out); the bias is named by the output's."""
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=compute.jnp_dtype,
        param_dtype=jnp.float32,
        precision=compute.lax_precision,
        dot_general=dot_general,
        kernel_metadata=axis_names(names),
        bias_metadata=axis_names(names[1:]),
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
    names: tuple[str, str] = CONV_NAMES,
) -> nnx.Conv:
    """PyTorch-style Conv2d on NHWC: symmetric `padding` pixels (default kernel//2), never Flax 'SAME'.

    An `nnx.Conv` (leaves `kernel` [kh, kw, I, O] and `bias`) whose convolution is `conv2d`: the native
    XLA conv, or on CPU an im2col matmul where that is faster (same numbers to fp32 rounding).
    `names`: the logical axes of the input / output channels (kernel height and width are unnamed).
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
        kernel_metadata=axis_names((None, None, *names)),
        bias_metadata=axis_names(names[1:]),
        rngs=rngs,
    )


def conv3d(
    din: int,
    dout: int,
    kernel: tuple[int, int, int],
    compute: Compute,
    rngs: nnx.Rngs,
    *,
    padding: tuple[tuple[int, int], ...] = ((0, 0), (0, 0), (0, 0)),
    bias: bool = True,
    names: tuple[str, str] = CONV_NAMES,
) -> nnx.Conv:
    """PyTorch-style Conv3d on channels-last video (B, T, H, W, C), stride 1, explicit `padding` per axis.

    Leaves `kernel` [kt, kh, kw, I, O] and `bias`; the convolution is XLA's native one (through `conv2d`,
    which passes anything but a 2-D conv straight to `lax.conv_general_dilated`, keeping the bf16-weight
    handling of nn/bf16_weights.py). `names`: the logical axes of the input / output channels.
    """
    return nnx.Conv(
        din,
        dout,
        kernel_size=tuple(kernel),
        strides=(1, 1, 1),
        padding=tuple(tuple(p) for p in padding),
        use_bias=bias,
        dtype=compute.jnp_dtype,
        param_dtype=jnp.float32,
        precision=compute.lax_precision,
        conv_general_dilated=conv2d,
        kernel_metadata=axis_names((None, None, None, *names)),
        bias_metadata=axis_names(names[1:]),
        rngs=rngs,
    )
