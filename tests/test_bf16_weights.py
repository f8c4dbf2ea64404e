"""bf16 weights on CPU are widened just before their use (`nn/bf16_weights.py`), not all up front."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xdyna_jax.nn.bf16_weights import compiler_options_for, computed_after, dot_general, weight_after_input

LAYERS, WIDTH = 8, 512


def _stack(dot, options=None):
    """Two passes (lax.map, as the sampler's CFG halves) through LAYERS bf16 linear layers."""

    def f(weights, xs):
        def one(x):
            for w in weights:
                x = jnp.tanh(dot(x, w, (((1,), (0,)), ((), ())))).astype(jnp.bfloat16)
            return x

        return lax.map(one, xs)

    weights = [jax.ShapeDtypeStruct((WIDTH, WIDTH), jnp.bfloat16)] * LAYERS
    xs = jax.ShapeDtypeStruct((2, 4, WIDTH), jnp.bfloat16)
    return (
        jax.jit(f, compiler_options=options).lower(weights, xs).compile().memory_analysis().temp_size_in_bytes
    )


def test_widened_weights_are_not_all_live_at_once():
    f32_copies = LAYERS * WIDTH * WIDTH * 4
    options = compiler_options_for([jnp.zeros(1, jnp.bfloat16)])
    plain, tied = _stack(lax.dot_general, options), _stack(dot_general, options)
    # plain: XLA:CPU widens every weight ahead of the loop and keeps them all
    assert plain >= 0.9 * f32_copies, (plain, f32_copies)
    # tied: about one widened weight at a time
    assert tied <= 0.3 * f32_copies, (tied, f32_copies)
    assert compiler_options_for([jnp.zeros(1, jnp.float32)]) is None  # fp32 programs keep XLA's defaults


def test_values_unchanged():
    w = jax.random.normal(jax.random.key(0), (16, 8)).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (3, 16)).astype(jnp.bfloat16)
    tied = jax.jit(weight_after_input)(x, w)
    assert tied.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(tied).view(np.uint16), np.asarray(w).view(np.uint16))
    w32 = w.astype(jnp.float32)
    assert weight_after_input(x, w32) is w32  # float32 weights are left alone
    out = jax.jit(lambda x, w: dot_general(x, w, (((1,), (0,)), ((), ()))))(x, w)
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(lax.dot_general(x, w, (((1,), (0,)), ((), ()))))
    )


def test_computed_after_keeps_values_and_passes_the_gradient_through():
    value = jnp.linspace(-2.0, 3.0, 12, dtype=jnp.float32).reshape(3, 4)
    anchor = jnp.ones((2, 5), jnp.bfloat16)
    np.testing.assert_array_equal(computed_after(value, anchor), value)
    np.testing.assert_array_equal(
        computed_after(value.astype(jnp.bfloat16), anchor), value.astype(jnp.bfloat16)
    )

    def loss(v, a):
        return jnp.sum(jnp.sin(computed_after(v, a)) * v)

    grad_v, grad_a = jax.grad(loss, argnums=(0, 1))(value, anchor.astype(jnp.float32))
    np.testing.assert_allclose(grad_v, jnp.cos(value) * value + jnp.sin(value), rtol=1e-6)
    np.testing.assert_array_equal(grad_a, 0.0)  # the edge orders the computation, it carries no gradient
