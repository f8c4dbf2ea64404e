"""conv2d: the im2col formulation equals the native XLA conv, and each backend / shape gets the one we claim."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracle import rel_err

from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.conv import IM2COL_MAX_PIXELS, conv2d, cpu_formulation, set_formulation
from xdyna_jax.nn.layers import conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, k, stride, pads, formulation, precision=None):
    return conv2d(
        x, k, (stride, stride), pads, dimension_numbers=NHWC, precision=precision, formulation=formulation
    )


def _random(shape_x, shape_k, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape_x).astype(np.float32)
    k = (rng.standard_normal(shape_k) / np.sqrt(np.prod(shape_k[:3]))).astype(np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(k, dtype)


# (input NHWC, kernel size, output channels, stride, pads): small-extent and large-extent regimes, the
# symmetric 1-pixel padding of the UNet, the VAE downsampler's unpadded stride 2 (it pads right/bottom
# itself), 1x1 convs, a batch > 1 and a non-square latent.
CASES = [
    ((1, 8, 8, 512), 3, 32, 1, ((1, 1), (1, 1))),
    ((2, 7, 5, 64), 3, 48, 1, ((1, 1), (1, 1))),
    ((1, 16, 16, 512), 3, 32, 2, ((1, 1), (1, 1))),
    ((1, 9, 9, 64), 3, 32, 2, ((0, 0), (0, 0))),
    ((1, 40, 24, 16), 3, 24, 1, ((1, 1), (1, 1))),
    ((1, 8, 8, 96), 1, 64, 1, ((0, 0), (0, 0))),
    ((3, 32, 32, 8), 1, 16, 1, ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("shape_x,ks,cout,stride,pads", CASES)
def test_im2col_equals_native_fp32(shape_x, ks, cout, stride, pads):
    x, k = _random(shape_x, (ks, ks, shape_x[-1], cout))
    f = jax.jit(_conv, static_argnums=(2, 3, 4, 5))
    native = f(x, k, stride, pads, "native")
    assert rel_err(f(x, k, stride, pads, "im2col"), native) < 2e-6
    assert rel_err(f(x, k, stride, pads, "auto"), native) < 2e-6
    if stride == 2:  # `precision` is passed on to the matmul as to the conv
        highest = jax.lax.Precision.HIGHEST
        assert (
            rel_err(f(x, k, stride, pads, "im2col", highest), f(x, k, stride, pads, "native", highest)) < 2e-6
        )


@pytest.mark.parametrize("shape_x,ks,cout,stride,pads", [CASES[0], CASES[2], CASES[5]])
def test_im2col_equals_native_bf16(shape_x, ks, cout, stride, pads):
    x, k = _random(shape_x, (ks, ks, shape_x[-1], cout), jnp.bfloat16)
    f = jax.jit(_conv, static_argnums=(2, 3, 4))
    im2col, native = f(x, k, stride, pads, "im2col"), f(x, k, stride, pads, "native")
    exact = f(x.astype(jnp.float32), k.astype(jnp.float32), stride, pads, "native")
    assert im2col.dtype == native.dtype == jnp.bfloat16
    # both round the same fp32-accumulated sum to bf16 (8 mantissa bits)
    assert rel_err(im2col, exact) < 1e-2 and rel_err(native, exact) < 1e-2
    assert rel_err(im2col, native) < 1e-2


def test_cpu_dispatch_by_shape():
    same = ((1, 1), (1, 1))
    # the SD UNet's small levels at batch 1 (64x64 and 112x64 latents): im2col
    assert cpu_formulation((1, 8, 8, 1280), (3, 3, 1280, 1280), (1, 1), same) == "im2col"
    assert cpu_formulation((1, 16, 16, 2560), (3, 3, 2560, 1280), (1, 1), same) == "im2col"
    assert cpu_formulation((1, 28, 16, 1280), (3, 3, 1280, 1280), (1, 1), same) == "im2col"
    assert cpu_formulation((1, 32, 32, 640), (3, 3, 640, 640), (2, 2), same) == "im2col"  # 16x16 out
    # large extents (and the same 8x8 level over a 16-frame clip): native
    assert cpu_formulation((1, 32, 32, 640), (3, 3, 640, 640), (1, 1), same) == "native"
    assert cpu_formulation((1, 64, 64, 320), (3, 3, 320, 320), (1, 1), same) == "native"
    assert cpu_formulation((16, 8, 8, 1280), (3, 3, 1280, 1280), (1, 1), same) == "native"
    assert IM2COL_MAX_PIXELS < 16 * 8 * 8
    # few input channels (CLIP's 3-channel patch embedding, the ControlNet hint block): native
    assert cpu_formulation((1, 224, 224, 3), (14, 14, 3, 1024), (14, 14), ((0, 0), (0, 0))) == "native"
    assert cpu_formulation((1, 16, 16, 16), (3, 3, 16, 32), (1, 1), same) == "native"
    assert cpu_formulation((1, 8, 8, 320), (3, 3, 320, 320), (1, 1), same) == "native"
    # a 1x1 conv is a matmul at every extent
    assert cpu_formulation((1, 64, 64, 320), (1, 1, 320, 320), (1, 1), ((0, 0), (0, 0))) == "im2col"


def _lowered(fn, args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_backend_decides_at_lowering():
    """CPU gets the matmul for a small extent, the native conv for a large one; GPU/TPU always the conv."""
    small = _random((1, 8, 8, 1280), (3, 3, 1280, 64))
    large = _random((1, 64, 64, 320), (3, 3, 320, 8))
    f = lambda x, k: _conv(x, k, 1, ((1, 1), (1, 1)), "auto")
    cpu_small = _lowered(f, small, "cpu")
    assert "dot_general" in cpu_small and "convolution" not in cpu_small
    assert "convolution" in _lowered(f, large, "cpu")
    for platform in ("cuda", "tpu"):
        text = _lowered(f, small, platform)
        assert "convolution" in text and "dot_general" not in text


def _trace_and_run(model, x):
    graph, state = nnx.split(model)
    fn = lambda s, x: nnx.merge(graph, s)(x)
    return str(jax.make_jaxpr(fn)(state, x)), jax.jit(fn)(state, x)


def test_layer_conv_forced_native():
    """layers.conv computes through conv2d; set_formulation(..., 'native') makes it the XLA conv."""
    for dtype, tol in (("float32", 2e-6), ("bfloat16", 1e-2)):
        layer = conv(640, 32, 3, Compute(dtype=dtype), nnx.Rngs(0))
        assert layer.kernel.shape == (3, 3, 640, 32) and layer.bias.shape == (32,)
        x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 6, 6, 640)), jnp.float32)
        auto_jaxpr, auto = _trace_and_run(layer, x)
        native_jaxpr, native = _trace_and_run(set_formulation(layer, "native"), x)
        assert "dot_general" in auto_jaxpr
        assert "conv_general_dilated" in native_jaxpr and "dot_general" not in native_jaxpr
        assert rel_err(auto, native) < tol
        back_jaxpr, _ = _trace_and_run(set_formulation(layer, "auto"), x)
        assert back_jaxpr == auto_jaxpr


def test_bad_formulation():
    x, k = _random((1, 2, 2, 1), (1, 1, 1, 1))
    with pytest.raises(ValueError, match="conv formulation 'fast'"):
        _conv(x, k, 1, ((0, 0), (0, 0)), "fast")
    with pytest.raises(ValueError, match="conv formulation 'fast'"):
        set_formulation(nnx.Module(), "fast")
