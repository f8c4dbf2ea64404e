"""Every attention backend against one NumPy reference (and against PyTorch SDPA)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from oracle import rel_err

from xdyna_jax.nn import attention_ops
from xdyna_jax.nn.attention_ops import BACKENDS, SPLASH_INTERPRET_ENV, dot_product_attention

HIGHEST = jax.lax.Precision.HIGHEST


def numpy_attention(q, k, v, causal):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def inputs(lq, lk, heads=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    shape = lambda n: (2, n, heads, d)
    return [rng.standard_normal(shape(n)).astype(np.float32) for n in (lq, lk, lk)]


def available(backend):
    return backend != "cudnn" or jax.default_backend() == "gpu"


@pytest.fixture
def splash_interpret(monkeypatch):
    """Off TPU the splash kernel runs in Pallas interpret mode (the same kernel code, evaluated by XLA)."""
    if jax.default_backend() != "tpu":
        monkeypatch.setenv(SPLASH_INTERPRET_ENV, "1")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lq,lk,causal", [(37, 37, False), (37, 37, True), (48, 16, True), (50, 7, False), (5, 77, False)]
)
def test_backend_matches_reference(backend, lq, lk, causal, request):
    """None of the lengths is a multiple of 128, so "splash" pads queries and keys and masks the keys."""
    if not available(backend):
        pytest.skip("cudnn needs a GPU")
    if backend == "splash":
        request.getfixturevalue("splash_interpret")
    q, k, v = inputs(lq, lk)
    got = dot_product_attention(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        backend=backend,
        causal=causal,
        precision=HIGHEST,
        # lq 37 > 16: the chunked path splits into 3 blocks of 13 (one padded row); 48 x 16 keys: keys
        # exactly one chunk long still take the loop, 3 unpadded blocks
        chunk_size=16,
    )
    assert rel_err(got, numpy_attention(q, k, v, causal)) < 1e-5


def test_splash_gradients_match_xla(splash_interpret):
    """Training differentiates through the kernel's own backward kernels: q, k, v grads equal the "xla"
    path's, with 77 keys padded to 128 and masked; tracing twice reuses the one built kernel."""
    q, k, v = (jnp.asarray(a) for a in inputs(37, 77))
    weight = jnp.asarray(np.random.default_rng(1).standard_normal((2, 37, 3, 8)), jnp.float32)

    def grads(backend):
        def loss(q, k, v):
            out = dot_product_attention(q, k, v, backend=backend, precision=HIGHEST)
            return jnp.sum(out * weight)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    attention_ops._splash_kernel.cache_clear()
    for got, expected in zip(grads("splash"), grads("xla"), strict=True):
        assert rel_err(got, expected) < 1e-5
    jax.make_jaxpr(lambda q: dot_product_attention(q, k, v, backend="splash"))(q)
    assert attention_ops._splash_kernel.cache_info().currsize == 1


def test_reference_matches_torch_sdpa():
    q, k, v = inputs(20, 20)
    t = lambda a: torch.from_numpy(a).transpose(1, 2)
    expected = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True)
    assert rel_err(numpy_attention(q, k, v, True), expected.transpose(1, 2).numpy()) < 1e-6


def test_chunked_never_builds_the_full_score_matrix():
    """XLA's temp memory for 4096 tokens stays a fraction of one full (8, 4096, 4096) fp32 score matrix."""
    q = jax.ShapeDtypeStruct((1, 4096, 8, 40), jnp.float32)

    def temp_bytes(backend):
        f = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, backend=backend, chunk_size=512))
        return f.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

    full_scores = 8 * 4096 * 4096 * 4
    assert temp_bytes("chunked") < full_scores / 16


def test_chunked_backward_recomputes_one_score_block_at_a_time():
    """The gradient's temp memory also stays a fraction of the full score matrix: the loop body is
    checkpointed, so the backward scan does not keep every block's scores."""
    q = jax.ShapeDtypeStruct((1, 4096, 8, 40), jnp.float32)
    loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, backend="chunked", chunk_size=512))  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    full_scores = 8 * 4096 * 4096 * 4
    assert grad.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes < full_scores / 8


def _trip_counts(compiled) -> list[int]:
    return [int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', compiled.as_text())]


def test_chunked_runs_per_device_under_a_mesh():
    """8 devices, examples split over `data` by the rules: each device loops over its own (example, head,
    query block) triples only (16 = 1 x 4 x 4, not the global 128), and values and gradients equal one
    device's."""
    from jax.sharding import NamedSharding, PartitionSpec

    from xdyna_jax.sharding import activate, make_mesh

    mesh, rules = make_mesh(data=8), (("batch", "data"), ("heads", None))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((8, 2048, 4, 8)), jnp.float32) for _ in range(3))

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, backend="chunked", chunk_size=512, precision=HIGHEST)
        return jnp.sum(out * jnp.cos(out)), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    expected_grads, expected = grad(q, k, v)
    split = [jax.device_put(a, NamedSharding(mesh, PartitionSpec("data"))) for a in (q, k, v)]
    with activate(mesh, rules):
        lowered = grad.lower(*split)
    compiled = lowered.compile()
    assert set(_trip_counts(compiled)) == {16}
    grads, out = compiled(*split)
    assert out.sharding.spec[0] == "data"
    assert rel_err(out, expected) < 1e-6
    for g, e in zip(grads, expected_grads, strict=True):
        assert rel_err(g, e) < 1e-6


def test_bad_backend_and_shapes_are_refused():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        dot_product_attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match=r"\(B, L, H, D\)"):
        dot_product_attention(q[0], q[0], q[0])
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError, match="needs a GPU"):
            dot_product_attention(q, q, q, backend="cudnn")


def test_splash_off_tpu_names_interpret_mode(monkeypatch):
    if jax.default_backend() == "tpu":
        pytest.skip("splash runs compiled on a TPU")
    monkeypatch.delenv(SPLASH_INTERPRET_ENV, raising=False)
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(RuntimeError, match=f"'splash' is JAX's Pallas TPU kernel.*{SPLASH_INTERPRET_ENV}=1"):
        dot_product_attention(q, q, q, backend="splash")


def test_splash_runs_per_device_under_a_mesh(splash_interpret):
    """The splash kernel (a custom call XLA cannot split) on 8 devices, examples over `data`: each device
    runs it on its own shard; values and gradients equal one device's."""
    from jax.sharding import NamedSharding, PartitionSpec

    from xdyna_jax.sharding import activate, make_mesh

    mesh, rules = make_mesh(data=8), (("batch", "data"), ("heads", None))
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((8, 40, 2, 8)), jnp.float32) for _ in range(3))
    loss = lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(q, k, v, backend="splash")))  # noqa: E731
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    expected, expected_grads = grad(q, k, v)
    split = [jax.device_put(a, NamedSharding(mesh, PartitionSpec("data"))) for a in (q, k, v)]
    with activate(mesh, rules):
        value, grads = grad(*split)
    assert rel_err(value, expected) < 1e-6
    for g, e in zip(grads, expected_grads, strict=True):
        assert rel_err(g, e) < 1e-6
