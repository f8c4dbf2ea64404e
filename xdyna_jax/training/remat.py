"""Named rematerialisation (gradient checkpointing) policies per UNet / ControlNet block, from the config.

    none  keep every activation for the backward pass (fastest, most memory)
    dots  keep only the outputs of matmuls without batch dimensions (the weight projections); recompute the
          rest, attention scores included (the largest activations at 896x512)
    full  keep only the block's inputs; recompute the whole block in the backward pass

"dots" is `jax.checkpoint` with JAX's policy. "full" is `nn.recompute.recompute_in_backward`, a custom VJP
whose recomputation waits for the cotangent: `jax.checkpoint`'s would be lost on XLA:CPU (see that module),
and with it the compiled memory analysis that sizes TPU jobs.

Targets are the UNet / ControlNet blocks (`down_blocks`, `mid_block`, `up_blocks`) and, finer, the layers
inside them (`resnets`, `attentions` (the spatial transformers), `motion_modules`), and the ControlNets'
`controlnet_cond_embedding` (a conv stack at the condition's full resolution, 896x512), and the DiT blocks
of CogVideoX / DynamiCtrl (`transformer_blocks`, each block one target). Policies nest: a block
under "full" whose layers are also "full" keeps only the layers' inputs while its backward pass runs, so one
layer's activations are live at a time; layers under "full" inside blocks under "none" is the usual
per-layer checkpointing (every layer input kept, each layer recomputed once). At 896x512 x 17 frames a
top-level block's activations alone exceed a 16 GiB device; one layer's do not.

`apply_remat(model, {"down_blocks": "dots", "mid_block": "none", "up_blocks": "full"})` changes the class of
every such block (or layer) of every network in `model` to a subclass whose call runs under
`jax.checkpoint`, so the parameter paths, and with them bundles, trainable sets and shardings, stay as they
are.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
from flax import nnx

from xdyna_jax.models.cogvideox import CogVideoXBlock
from xdyna_jax.models.controlnet import ControlNetConditioningEmbedding
from xdyna_jax.models.dynamictrl import DynamiCtrlBlock
from xdyna_jax.models.unet_blocks import DownBlock, MidBlock, UpBlock
from xdyna_jax.nn.motion import VanillaTemporalModule
from xdyna_jax.nn.recompute import recompute_in_backward
from xdyna_jax.nn.resnet import ResnetBlock2D
from xdyna_jax.nn.transformer import Transformer2DModel

POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}
# the layer-level targets (inside the blocks, or before them); the rest of BLOCKS are the blocks
LAYERS = ("resnets", "attentions", "motion_modules", "controlnet_cond_embedding")
BLOCKS = {
    "down_blocks": DownBlock,
    "mid_block": MidBlock,
    "up_blocks": UpBlock,
    "resnets": ResnetBlock2D,
    "attentions": Transformer2DModel,
    "motion_modules": VanillaTemporalModule,
    "controlnet_cond_embedding": ControlNetConditioningEmbedding,
    # the DiT blocks of CogVideoX and DynamiCtrl (a DynamiCtrlBlock is a CogVideoXBlock: one target)
    "transformer_blocks": CogVideoXBlock,
}
# Classes a checkpointed subclass derives from: a node's first one in its MRO. DynamiCtrlBlock is listed so
# its blocks get a subclass of DynamiCtrlBlock, not of its CogVideoXBlock base (which would drop the
# control stream).
_ROOTS = (*BLOCKS.values(), DynamiCtrlBlock)
_SUBCLASSES: dict[tuple[type, str], type] = {}


def check_remat(policies: Mapping[str, str]) -> None:
    for block, policy in policies.items():
        if block not in BLOCKS:
            raise ValueError(f"remat: unknown block {block!r}; known blocks: {sorted(BLOCKS)}")
        if policy not in POLICIES:
            raise ValueError(f"remat.{block}: unknown policy {policy!r}; known policies: {sorted(POLICIES)}")


def _checkpointed_call(base: type, policy_name: str):
    if policy_name == "full":
        wrap = recompute_in_backward
    else:
        wrap = functools.partial(jax.checkpoint, policy=POLICIES[policy_name])

    def __call__(self, *args, **kwargs):
        # Only arrays go through the checkpoint: everything else (VideoSpec's norm function, frame counts,
        # ip_scale) is closed over, and the block's weights enter as an explicit state argument.
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        is_array = [isinstance(x, jax.Array) for x in leaves]
        graphdef, state = nnx.split(self)

        def run(state, arrays):
            it = iter(arrays)
            a, k = jax.tree_util.tree_unflatten(
                treedef, [next(it) if d else x for x, d in zip(leaves, is_array, strict=True)]
            )
            return base.__call__(nnx.merge(graphdef, state), *a, **k)

        return wrap(run)(state, [x for x, d in zip(leaves, is_array, strict=True) if d])

    return __call__


def _subclass(base: type, policy_name: str) -> type:
    key = (base, policy_name)
    if key not in _SUBCLASSES:
        call = _checkpointed_call(base, policy_name)
        _SUBCLASSES[key] = type(
            f"{policy_name.capitalize()}Remat{base.__name__}", (base,), {"__call__": call}
        )
    return _SUBCLASSES[key]


def apply_remat(model: nnx.Module, policies: Mapping[str, str]) -> nnx.Module:
    """Set each block's policy in place (see the module docstring); returns `model`."""
    check_remat(policies)
    for _, node in nnx.iter_graph(model):
        for block, base in BLOCKS.items():
            if isinstance(node, base):
                root = next(c for c in type(node).__mro__ if c in _ROOTS)
                name = policies.get(block, "none")
                node.__class__ = root if name == "none" else _subclass(root, name)
    return model
