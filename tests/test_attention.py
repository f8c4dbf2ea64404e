"""Every attention backend against one NumPy reference (and against PyTorch SDPA)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from oracle import rel_err

from xdyna_jax.nn.attention_ops import BACKENDS, dot_product_attention

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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq,lk,causal", [(37, 37, False), (37, 37, True), (50, 7, False), (5, 77, False)])
def test_backend_matches_reference(backend, lq, lk, causal):
    if not available(backend):
        pytest.skip("cudnn needs a GPU")
    q, k, v = inputs(lq, lk)
    got = dot_product_attention(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        backend=backend,
        causal=causal,
        precision=HIGHEST,
        chunk_size=16,  # smaller than lq so the chunked path really splits (and pads the last block)
    )
    assert rel_err(got, numpy_attention(q, k, v, causal)) < 1e-5


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


def test_bad_backend_and_shapes_are_refused():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        dot_product_attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match=r"\(B, L, H, D\)"):
        dot_product_attention(q[0], q[0], q[0])
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError, match="needs a GPU"):
            dot_product_attention(q, q, q, backend="cudnn")
