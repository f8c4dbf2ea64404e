"""Scaled dot-product attention behind one dispatch.

Every attention in the package (UNet self/cross, VAE mid-block, CLIP text, later the motion modules)
calls `dot_product_attention`, so a backend chosen in a config applies everywhere.

Backends:
  - "xla":      full softmax(QK^T)V in one pair of matmuls, fp32 softmax.
  - "chunked":  (the default) one head and at most `chunk_size` queries (the queries split into equal
                blocks) at a time in a loop when both sequences have at least `chunk_size` tokens, so the
                (Lq, Lk) score matrix of a 7168-token frame never exists at once (memory O(chunk * Lk))
                and one block's scores stay in cache; short sequences take the "xla" path. The loop body
                is checkpointed, so the backward pass recomputes one block's scores at a time instead of
                keeping all of them. Under a device mesh with logical axis rules (`sharding.activate`) the
                loop runs inside `shard_map` on each device's own examples (and heads): XLA cannot split
                a loop over a sharded axis and would otherwise run every device's blocks on every device.
  - "dot_product": `jax.nn.dot_product_attention` with automatic implementation choice
                (cuDNN flash attention on a GPU when shapes allow, XLA elsewhere).
  - "cudnn":    `jax.nn.dot_product_attention(implementation="cudnn")`; GPU only, fails clearly otherwise.
  - "splash":   JAX's Pallas TPU flash-attention kernel (`splash_attention_kernel.make_splash_mha`), with
                its own backward kernels, for TPU training and sampling. TPU only: on any other platform it
                raises unless the environment variable `XDYNA_SPLASH_INTERPRET=1` is set, which runs the
                same kernel in Pallas interpret mode (slow; CPU tests and CI use it). The variable is read
                when a function is traced, so set it before the first jit call.

The splash kernel works per example on heads-major (H, L, D) tensors whose sequence lengths are multiples
of its block sizes and does not scale the scores, so the "splash" path
  - vmaps over the batch;
  - pads each sequence to one block of its length rounded up to 128 (the TPU lane width the kernel tiles
    by) when that is at most 512, else to a multiple of 512-blocks: 77 or 93 tokens -> one 128 block,
    448 -> 512, 7168 -> 14 blocks of 512, 1792 -> 2048; the 16 or 17 frames of temporal attention also
    become one 128 block, computed at the padded size (8x the work of the "xla" path there);
  - masks padded keys with a static mask built on the host once per shape (with the causal triangle when
    asked). The kernel skips empty blocks and stores each distinct partial block once: without causal only
    the last key block is partial, so the mask costs one (block_q, block_kv) bool tile. Unpadded inputs
    use the kernel's lazy full / causal masks instead;
  - pads the head dimension to a multiple of 128 with zeros (40 / 64 / 80 -> 128, 160 -> 256): the zeros add
    nothing to q.k and the extra output columns are sliced off, and the kernel's tiles stay lane-aligned;
  - multiplies q by 1/sqrt(D) (of the unpadded D) before the kernel, in q's dtype as the "xla" path does;
  - runs bfloat16 and float32 as given and float16 in float32 (TPUs have no float16 matmul); softmax
    statistics are float32 in the kernel. `precision` is not applied: the kernel's matmuls run at the
    hardware's precision for the input dtype.
Built kernels are cached per (heads, lengths, causal, interpret), so tracing never rebuilds one. The
kernel is a custom call that XLA cannot partition, so under a device mesh with rules it runs through
`sharding.per_device` (`shard_map` over the batch and head axes), as the chunked loop does.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from xdyna_jax.nn.bf16_weights import tied_to
from xdyna_jax.sharding import per_device

BACKENDS = ("xla", "chunked", "dot_product", "cudnn", "splash")
SPLASH_INTERPRET_ENV = "XDYNA_SPLASH_INTERPRET"
_LANES = 128  # TPU vector lane width: the splash kernel's sequence blocks and our head-dim padding unit
_MAX_BLOCK = 512  # splash block for long sequences (q and kv)


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    return name


def _softmax_attention(q, k, v, scale, causal, precision, q_offset=0):
    """q (N, Lq, D), k/v (N, Lk, D) -> (N, Lq, D); heads are folded into N.

    Normalisation is deferred: out = (exp(s - max) @ v) / sum(exp(s - max)), dividing the (Lq, D) result
    instead of the (Lq, Lk) probabilities, which saves a full pass over the score matrix. Scores, max,
    exp and sum are fp32 whatever the activation dtype.
    """
    s = jnp.einsum(
        "nqd,nkd->nqk",
        q * jnp.asarray(scale, q.dtype),
        k,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    if causal:
        qi = jnp.arange(q.shape[1])[:, None] + q_offset
        ki = jnp.arange(k.shape[1])[None, :]
        s = jnp.where(ki <= qi, s, jnp.finfo(jnp.float32).min)
    p = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum(
        "nqk,nkd->nqd", p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32
    )
    return (out / denom).astype(v.dtype)


def _fold_heads(x):
    b, length, h, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * h, length, d)


def _unfold_heads(x, b, h):
    return x.reshape(b, h, x.shape[1], x.shape[2]).transpose(0, 2, 1, 3)


def _blocked(q, k, v, scale, causal, precision, chunk):
    """One (head, query block) at a time: a chunk x Lk fp32 score block (4 MiB for 512 x 2048) stays in
    cache, which on CPU is 3-6x faster than the full matrix, and memory is O(chunk * Lk), not O(Lq * Lk).
    The backward pass recomputes each block's scores (`_carried_blocks`; under `lax.map` the body is
    checkpointed): it holds one score block at a time, not every block's (O(Lq * Lk) again)."""
    n, lq, d = q.shape
    n_chunks = -(-lq // chunk)
    # Equal blocks of at most `chunk` queries: 826 queries are 2 x 413, not 2 x 512 with 198 padded rows
    # (24 % more work than the 826 rows need).
    block = -(-lq // n_chunks)
    pad = n_chunks * block - lq
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0))).reshape(n * n_chunks, 1, block, d)
    static = (scale, causal, precision, block, n_chunks)
    if v.shape[-1] != d or v.dtype != q.dtype:
        one = jax.checkpoint(lambda args: _attend_block(static, *args, k, v))
        out = jax.lax.map(one, (jnp.arange(n * n_chunks), qb))
    else:
        # Each result overwrites its own query block in the loop's carry. `lax.map` would stack the
        # results in a fresh buffer whose allocation depends on nothing, so XLA:CPU allocates it at the
        # start of the program: a 42-block DiT then held 41 of those buffers at once (9.8 GiB of a
        # full-size DynamiCtrl step; bench/dynamictrl_memory.py). The carry exists only once q does.
        out = _carried_blocks(static, qb, k, v)
    out = out.reshape(n, n_chunks * block, v.shape[-1])
    return out[:, :lq]


def _attend_block(static, i, qi, k, v):
    """Query block i (of `static`'s n_chunks per head) against its head's keys and values."""
    head = i // static[-1]
    ki = jax.lax.dynamic_slice_in_dim(k, head, 1)
    vi = jax.lax.dynamic_slice_in_dim(v, head, 1)
    return _attend_head(static, i, qi, ki, vi)


def _attend_head(static, i, qi, ki, vi):
    scale, causal, precision, chunk, n_chunks = static
    return _softmax_attention(qi, ki, vi, scale, causal, precision, q_offset=(i % n_chunks) * chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _carried_blocks(static, qb, k, v):
    """Every query block of qb (n * n_chunks, 1, chunk, d) attended (`_attend_block`), each result written
    over its own block in a loop's carry (see `_blocked`)."""

    def body(i, blocks):
        blocks_i = jax.lax.dynamic_index_in_dim(blocks, i, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(blocks, _attend_block(static, i, blocks_i, k, v), i, 0)

    return jax.lax.fori_loop(0, qb.shape[0], body, qb)


def _carried_blocks_fwd(static, qb, k, v):
    return _carried_blocks(static, qb, k, v), (qb, k, v)


def _carried_blocks_bwd(static, residuals, g):
    """The loop's transpose written out: block i's VJP (its scores recomputed, one block at a time)
    adds its key / value cotangents into its head's rows. Autodiff of the loop starts dk and dv from
    zeros that depend on nothing, which XLA:CPU allocates at the program's start, a pair per attention:
    84 heads x tokens x 64 buffers at once in a 42-block DiT's backward (9.9 GiB per device at full
    size, bench/dynamictrl_memory.py). Here the zeros are tied to the cotangent, so a pair exists only
    while its own attention's backward runs. The sums are autodiff's, in the same (block) order."""
    qb, k, v = residuals
    n_chunks = static[-1]
    anchor = g.reshape(-1)[:1]
    zeros = lambda x: tied_to(jnp.zeros_like(x), anchor)  # noqa: E731

    def body(i, carry):
        dq, dk, dv = carry
        head = i // n_chunks
        row = lambda a: jax.lax.dynamic_slice_in_dim(a, head, 1)  # noqa: E731
        qi = jax.lax.dynamic_index_in_dim(qb, i, keepdims=False)
        _, vjp = jax.vjp(lambda qi, ki, vi: _attend_head(static, i, qi, ki, vi), qi, row(k), row(v))
        dqi, dki, dvi = vjp(jax.lax.dynamic_index_in_dim(g, i, keepdims=False))
        dq = jax.lax.dynamic_update_index_in_dim(dq, dqi, i, 0)
        dk = jax.lax.dynamic_update_slice_in_dim(dk, row(dk) + dki, head, 0)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, row(dv) + dvi, head, 0)
        return dq, dk, dv

    return jax.lax.fori_loop(0, qb.shape[0], body, (zeros(qb), zeros(k), zeros(v)))


_carried_blocks.defvjp(_carried_blocks_fwd, _carried_blocks_bwd)


def _blocked_bhld(q, k, v, scale, causal, precision, chunk):
    """`_blocked` on (B, L, H, D) tensors."""
    b, h = q.shape[0], q.shape[2]
    out = _blocked(_fold_heads(q), _fold_heads(k), _fold_heads(v), scale, causal, precision, chunk)
    return _unfold_heads(out, b, h)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _splash_tiling(length: int) -> tuple[int, int]:
    """(padded length, block) of one sequence: a single block of the length rounded up to 128 when that is
    at most 512, else 512-blocks. On TPU each grid step has a fixed cost that a 128 x 128 tile does not
    amortise, so long sequences take 512 even when that pads more (1792 -> 2048) than a 256 block would."""
    padded = _round_up(length, _LANES)
    if padded <= _MAX_BLOCK:
        return padded, padded
    return _round_up(length, _MAX_BLOCK), _MAX_BLOCK


def _splash_interpret() -> bool:
    if os.environ.get(SPLASH_INTERPRET_ENV, "").lower() in ("1", "true", "yes"):
        return True
    if jax.default_backend() != "tpu":
        raise RuntimeError(
            "attention backend 'splash' is JAX's Pallas TPU kernel; this process runs on "
            f"{jax.default_backend()!r}. Set {SPLASH_INTERPRET_ENV}=1 to run it in Pallas interpret mode "
            "(slow, for tests), or use 'chunked', 'xla' or 'dot_product'."
        )
    return False


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads, lq_padded, lk, lk_padded, causal, interpret):
    """The per-example splash kernel for (heads, lq_padded, D) x (heads, lk_padded, D), keys >= lk masked."""
    # imported here: Pallas takes ~0.6 s to import, which no other backend should pay
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (lq_padded, lk_padded)
    if lk_padded == lk:
        # Lazy masks: nothing is materialised, the causal one is evaluated in the kernel.
        mask = masks.CausalMask(shape) if causal else masks.FullMask(shape)
    else:
        allowed = np.zeros(shape, np.bool_)
        allowed[:, :lk] = True
        if causal:
            allowed &= np.tri(lq_padded, lk_padded, dtype=np.bool_)
        mask = masks.NumpyMask(allowed)
    bq, bkv = _splash_tiling(lq_padded)[1], _splash_tiling(lk_padded)[1]
    blocks = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    # the kernel holds its mask tables as arrays: made concrete here even when the first caller is being
    # traced (inside shard_map they would otherwise be that trace's values, and this cache would leak them)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(
            masks.MultiHeadMask([mask] * heads),
            block_sizes=blocks,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )


def _splash(q, k, v, scale, causal):
    """(B, Lq, H, D) attention through the splash kernel; see the module docstring for the padding."""
    interpret = _splash_interpret()
    out_dtype = q.dtype
    compute_dtype = jnp.float32 if q.dtype == jnp.float16 else q.dtype
    _, lq, h, d = q.shape
    lk, dv = k.shape[1], v.shape[-1]
    lq_padded, lk_padded = _splash_tiling(lq)[0], _splash_tiling(lk)[0]

    def heads_major(x, length, padded_length, dim):
        x = x.astype(compute_dtype).transpose(0, 2, 1, 3)
        return jnp.pad(x, ((0, 0), (0, 0), (0, padded_length - length), (0, _round_up(dim, _LANES) - dim)))

    kernel = _splash_kernel(h, lq_padded, lk, lk_padded, causal, interpret)
    out = jax.vmap(kernel)(
        heads_major(q * jnp.asarray(scale, q.dtype), lq, lq_padded, d),
        heads_major(k, lk, lk_padded, d),
        heads_major(v, lk, lk_padded, dv),
    )
    return out[:, :, :lq, :dv].transpose(0, 2, 1, 3).astype(out_dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    backend: str = "xla",
    causal: bool = False,
    precision=None,
    chunk_size: int = 1024,
) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v for q (B, Lq, H, D), k and v (B, Lk, H, D); returns (B, Lq, H, D)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (B, L, H, D) inputs, got q{q.shape} k{k.shape} v{v.shape}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    if backend in ("xla", "chunked"):
        b, h = q.shape[0], q.shape[2]
        # Blocking pays when both sides are long: one head's (block, Lk) scores stay in cache, where the
        # all-heads score tensor of the "xla" path goes through memory several times (exp, max, sum). For
        # 144 heads of 512 x 512 (a mid-size UNet level's frames) the loop is 2.5x faster on CPU; at
        # 256 x 256 or with 77 keys it is slower (per-iteration cost), so cross-attention to 77 tokens stays
        # one matmul.
        if backend == "chunked" and q.shape[1] >= chunk_size and k.shape[1] >= chunk_size:
            fn = lambda q, k, v, _: _blocked_bhld(q, k, v, scale, causal, precision, chunk_size)  # noqa: E731
            return per_device(fn, (q, k, v), names=("batch", None, "heads", None))
        out = _softmax_attention(_fold_heads(q), _fold_heads(k), _fold_heads(v), scale, causal, precision)
        return _unfold_heads(out, b, h)
    if backend in ("dot_product", "cudnn"):
        impl = "cudnn" if backend == "cudnn" else None
        if impl == "cudnn" and jax.default_backend() != "gpu":
            raise RuntimeError(
                "attention backend 'cudnn' needs a GPU; this process runs on "
                f"{jax.default_backend()!r}. Use 'dot_product' (picks cuDNN when available) or 'xla'."
            )
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation=impl)
    if backend == "splash":
        # the kernel is a custom call XLA cannot partition: under a mesh each device runs it on its shard
        fn = lambda q, k, v, _: _splash(q, k, v, scale, causal)  # noqa: E731
        return per_device(fn, (q, k, v), names=("batch", None, "heads", None))
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
