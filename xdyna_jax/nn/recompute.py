"""Recomputation in the backward pass that every XLA backend keeps (gradient checkpointing).

`recompute_in_backward(run)` is `run(state, arrays)` that keeps only its inputs for the backward pass, which
reruns `run` on inputs tied to the incoming cotangent (`bf16_weights.tied_to`: the same bits through integer
ops). `jax.checkpoint` marks its recomputation with optimisation barriers instead; XLA:CPU expands those
before scheduling, and its scheduler then recomputes early, so the saving is lost there (a checkpointed MLP's
gradient needed more memory than the plain one), in CPU runs and in the compiled memory analysis that sizes
TPU jobs alike. The dependency on the cotangent makes the recomputation wait for the backward pass on every
backend, and no CSE pass can merge it with the forward. Gradients are the same: the recomputed values are
the forward's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from xdyna_jax.nn.bf16_weights import tied_to


def _first_float(tree) -> jax.Array | None:
    return next(
        (x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating) and x.size),
        None,
    )


def recompute_in_backward(run: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """`run(state, arrays)` (two pytrees of arrays) keeping only its inputs; the backward pass reruns it."""

    @jax.custom_vjp
    def call(state, arrays):
        return run(state, arrays)

    def forward(state, arrays):
        return run(state, arrays), (state, arrays)

    def backward(inputs, cotangent):
        anchor = _first_float(cotangent)
        if anchor is not None:
            inputs = jax.tree_util.tree_map(
                lambda x: tied_to(x, anchor) if jnp.issubdtype(x.dtype, jnp.floating) else x, inputs
            )
        _, vjp = jax.vjp(run, *inputs)
        return vjp(cotangent)

    call.defvjp(forward, backward)
    return call
