"""bf16/f16 weights on CPU: widened to float32 just before their use, not all at once.

XLA's CPU backend has no bfloat16/float16 matmul or convolution: it widens both operands to float32 at
each dot. A weight's widened copy depends only on the weight, so the scheduler is free to make it long
before its use, and it does: a full-size bf16 window step held float32 copies of most of the UNet at its
peak (6.8 of its 11.6 GiB of temporaries; `lax.map`'s loop-invariant code motion hoists them too).
An optimisation barrier does not help: XLA:CPU expands barriers before scheduling, leaving no edge.
With the dependency below that step's peak fell from 15.6 to 10.9 GiB (`python -m bench.sample_memory`).

So on CPU a bf16/f16 weight gets a data dependency on the layer's input (see `tied_to`); the integer op
fuses into the widening, so it costs nothing extra, and the copy is made right before its use.
GPU/TPU programs (native bf16) and float32 weights are left as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


_BITS = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def tied_to(value: jax.Array, anchor: jax.Array) -> jax.Array:
    """`value`'s bits, computable only once `anchor` exists: a data dependency no compiler pass removes.

    Integer ops on the value's bits: XLA:CPU widens every bf16 float op (a select or add too) by first
    converting its inputs, and that convert would again be free to float away. The OR sets the lowest
    mantissa bit only when anchor's first element is NaN, when whatever consumes both is NaN anyway.
    """
    bits = lax.bitcast_convert_type(value, _BITS[jnp.dtype(value.dtype).itemsize])
    flag = jnp.isnan(anchor.reshape(-1)[0]).astype(bits.dtype)
    return lax.bitcast_convert_type(bits | flag, value.dtype)


@jax.custom_jvp
def computed_after(value: jax.Array, anchor: jax.Array) -> jax.Array:
    """`value` unchanged, but only computable once `anchor` exists, with `value`'s gradient passed straight
    through (`tied_to` alone has none: its integer ops cut the tangent).

    For a stream that depends on neither the layer's other inputs nor its outputs (DynamiCtrl's pose
    tokens): without the edge a scheduler may compute every layer's copy of it first and hold them all.
    """
    return tied_to(value, anchor)


@computed_after.defjvp
def _computed_after_jvp(primals, tangents):
    return computed_after(*primals), tangents[0]


def _tied(x: jax.Array, weight: jax.Array) -> jax.Array:
    return tied_to(weight, x)


def weight_after_input(x: jax.Array, weight: jax.Array) -> jax.Array:
    """`weight`, same values; on CPU a bf16/f16 weight that can only be computed once `x` exists."""
    if jnp.dtype(weight.dtype) not in _LOW_PRECISION or x.size == 0:
        return weight
    return lax.platform_dependent(x, weight, cpu=_tied, default=lambda _, w: w)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`lax.dot_general` whose right operand (a Linear's kernel) waits for the left (see module doc)."""
    return lax.dot_general(
        lhs,
        weight_after_input(lhs, rhs),
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )


# Loop-invariant code motion would still hoist each weight's integer view out of a `lax.map` body (the
# sampler's CFG halves) and keep all of them: 10.9 GiB peak for the full-size bf16 window step, 7.9 without.
CPU_LOW_PRECISION_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compiler_options_for(params) -> dict | None:
    """XLA options for a CPU program over `params` (any pytree): the above when it holds bf16/f16 arrays."""
    if jax.default_backend() != "cpu":
        return None
    dtypes = {jnp.dtype(a.dtype) for a in jax.tree_util.tree_leaves(params) if hasattr(a, "dtype")}
    if dtypes & set(_LOW_PRECISION):
        return dict(CPU_LOW_PRECISION_COMPILER_OPTIONS)
    return None
