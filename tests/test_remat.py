"""The "full" remat policy really trades memory for recomputation on XLA:CPU, where `jax.checkpoint` does not."""

import jax
import jax.numpy as jnp
import numpy as np
from oracle import rel_err

from xdyna_jax.nn.recompute import recompute_in_backward

ACTIVATION_MIB = 8  # one (4096, 512) float32 activation


def layer(w, inputs):
    x = inputs[0]
    for _ in range(4):
        x = jnp.tanh(x @ w)
    return x


def loss(ws, x, wrap):
    for w in ws:
        x = wrap(layer)(w, [x])
    return jnp.sum(x)


def temp_mib(wrap) -> float:
    ws = [jax.ShapeDtypeStruct((512, 512), jnp.float32)] * 8
    x = jax.ShapeDtypeStruct((4096, 512), jnp.float32)
    grad = jax.jit(jax.grad(lambda ws, x: loss(ws, x, wrap)))
    return grad.lower(ws, x).compile().memory_analysis().temp_size_in_bytes / 2**20


def test_full_remat_keeps_only_layer_inputs_and_gives_the_same_gradients():
    plain = temp_mib(lambda f: f)
    # 8 layers x 4 activations are kept without remat; with it, the 8 layer inputs plus one layer's work
    assert plain >= 32 * ACTIVATION_MIB
    assert temp_mib(recompute_in_backward) <= 0.5 * plain
    if jax.default_backend() == "cpu":  # the reason for the custom VJP: jax.checkpoint saves nothing here
        assert temp_mib(jax.checkpoint) >= 0.9 * plain
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((512, 512)) / 30, jnp.float32) for _ in range(8)]
    x = jnp.asarray(rng.standard_normal((64, 512)), jnp.float32)
    expected = jax.grad(lambda ws: loss(ws, x, lambda f: f))(ws)
    got = jax.grad(lambda ws: loss(ws, x, recompute_in_backward))(ws)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sliced_feed_forward_equals_the_whole_one_with_gradients_on_one_and_eight_devices():
    """compute.feed_forward_chunk: 37 tokens per slice (the last slice padded) over 8 x 20 tokens, values and
    weight / input gradients as without slices; under an 8-device mesh each device slices its own tokens."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from xdyna_jax.nn.compute import Compute
    from xdyna_jax.nn.transformer import FeedForward
    from xdyna_jax.sharding import activate, make_mesh

    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 20, 16)), jnp.float32)
    whole = FeedForward(16, Compute(precision="highest"), nnx.Rngs(0))
    sliced = FeedForward(16, Compute(precision="highest", feed_forward_chunk=37), nnx.Rngs(0))

    def value_and_grads(ff, x):
        graphdef, state = nnx.split(ff)

        def f(state, x):
            out = nnx.merge(graphdef, state)(x)
            return jnp.sum(jnp.sin(out)), out

        return jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(state, x)

    (state_grad, x_grad), out = value_and_grads(whole, x)
    mesh = make_mesh(data=8)
    with activate(mesh, (("batch", "data"),)):
        split_x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
        cases = [value_and_grads(sliced, x), value_and_grads(sliced, split_x)]
    for (s_grad, xs_grad), o in cases:  # other slices sum the weight gradients in another order
        assert rel_err(o, out) < 1e-6 and rel_err(xs_grad, x_grad) < 1e-6
        grads = zip(jax.tree_util.tree_leaves(s_grad), jax.tree_util.tree_leaves(state_grad), strict=True)
        assert all(rel_err(a, b) < 1e-5 for a, b in grads)
