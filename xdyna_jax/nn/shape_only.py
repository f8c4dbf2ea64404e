"""Shape-only models: the parameter tree of a model without allocating or initialising any weights.

`nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))` traces every random initialiser, and each update of
the Rngs counter inside the trace builds a JAX error message that walks the whole trace so far (flax 0.12 /
jax 0.10): quadratic in the number of parameters, about 30 s for a small X-Dyna UNet. Shapes do not
depend on the random keys, so a stand-in that hands out one fixed key makes the same tree in ~1 s.
"""

from __future__ import annotations

import jax
from flax import nnx


class _FixedKeyRngs:
    """Duck-types nnx.Rngs for modules that only draw keys (rngs.params(), rngs())."""

    def __getattr__(self, name):
        return self

    def __call__(self):
        return jax.random.key(0)


def shape_only_model(model_cls, config):
    """`model_cls(config, rngs=...)` with jax.ShapeDtypeStruct leaves, ready for loading weights into."""
    return nnx.eval_shape(lambda: model_cls(config, rngs=_FixedKeyRngs()))
