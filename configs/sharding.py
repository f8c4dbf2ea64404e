"""The `sharding` section of a config: mesh sizes and the one table mapping logical axis names to mesh axes.

The defaults suit FSDP: within a slice (or host) every device holds a shard of every large parameter
(`fsdp`), data parallelism runs across slices / hosts (`dcn_data` -1 = one group per slice), and `tensor`
splits attention heads and feed-forward hidden units when it is given a size above 1. The logical names
are the ones `xdyna_jax/nn/layers.py` puts on parameters, plus `batch` for activations.
"""

import ml_collections

# Sizes within one slice / host (ICI) and across them (DCN); one -1 per group takes what the others leave.
MESH = dict(data=1, fsdp=-1, tensor=1, dcn_data=-1, dcn_fsdp=1, dcn_tensor=1)

# logical name -> mesh axis, tuple of mesh axes, or None (replicated). A mesh axis that does not divide a
# dimension is dropped for that dimension (xdyna_jax.sharding.logical_spec), so odd sizes replicate.
# A ConfigDict keeps its keys in alphabetical order; that order only matters when two names of one array
# map to the same mesh axis (the first gets it, the other is replicated).
RULES = {
    "batch": ("data", "fsdp"),  # activations: examples spread over every device that holds a data shard
    "embed": "fsdp",  # model channels of linear weights (and embedding tables)
    "heads": "tensor",  # attention q/k/v outputs, out-projection inputs
    "mlp": "tensor",  # feed-forward hidden units, wide side of other projections
    "conv_in": None,
    "conv_out": "fsdp",  # conv kernels sharded on their output channels (and their biases with them)
    "norm": None,  # GroupNorm / LayerNorm scales and biases: small, replicated
    "vocab": None,  # embedding table rows (tokens, positions)
}


def sharding_section(**mesh_overrides) -> ml_collections.ConfigDict:
    unknown = set(mesh_overrides) - set(MESH)
    if unknown:
        raise ValueError(f"sharding_section: unknown mesh sizes {sorted(unknown)} (known: {sorted(MESH)})")
    return ml_collections.ConfigDict({"mesh": {**MESH, **mesh_overrides}, "rules": dict(RULES)})
