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

A DynamiCtrl block under "full" does not keep its control-stream input either: the backward pass
recomputes it from the stream at the start of its segment of blocks (`_full_remat_dynamictrl_call`).

`apply_remat(model, {"down_blocks": "dots", "mid_block": "none", "up_blocks": "full"})` changes the class of
every such block (or layer) of every network in `model` to a subclass whose call runs under
`jax.checkpoint`, so the parameter paths, and with them bundles, trainable sets and shardings, stay as they
are.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.models.cogvideox import CogVideoXBlock
from xdyna_jax.models.controlnet import ControlNetConditioningEmbedding
from xdyna_jax.models.dynamictrl import DynamiCtrlBlock, control_chain
from xdyna_jax.models.unet_blocks import DownBlock, MidBlock, UpBlock
from xdyna_jax.nn.bf16_weights import tied_to
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


def _tie_floats(tree, anchor):
    return jax.tree_util.tree_map(
        lambda x: tied_to(x, anchor) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _full_remat_dynamictrl_call(
    self, hidden_states, encoder_hidden_states, temb, control, rope=None, control_source=None
):
    """A DynamiCtrl block under "full" that keeps neither its activations nor its control input: the
    backward pass recomputes the control stream from `control_source` (the stream at its segment's start
    and the Pose-adaptive LayerNorms of the blocks since; `DynamiCtrlTransformerModel` passes it), then
    the block. The video and text inputs are kept, as under plain "full".

    The control stream depends only on the pose tokens and temb, so the recomputation is a few
    LayerNorms and elementwise ops; keeping it would cost one (tokens x width) array per block, as much
    as the video stream (35 x 0.12 GiB per device of a full-size step: bench/dynamictrl_memory.py). The block's output does not depend
    on the source given `control`, so the source's cotangent is zero and the control's cotangent flows
    back through the blocks as without remat: the gradients are the same."""
    if control_source is None:
        return _PLAIN_FULL_CALL(self, hidden_states, encoder_hidden_states, temb, control, rope)
    graphdef, state = nnx.split(self)
    anchor_control, norms = control_source
    norm_parts = [nnx.split(norm) for norm in norms]
    norm_graphs = [g for g, _ in norm_parts]

    def run(state, x, e, temb, control, rope):
        return DynamiCtrlBlock.__call__(nnx.merge(graphdef, state), x, e, temb, control, rope)

    @jax.custom_vjp
    def call(state, x, e, temb, control, rope, source):
        return run(state, x, e, temb, control, rope)

    def forward(state, x, e, temb, control, rope, source):
        return run(state, x, e, temb, control, rope), (state, x, e, temb, rope, source)

    def backward(residuals, cotangent):
        anchor = next(x for x in jax.tree_util.tree_leaves(cotangent) if x.size)
        # tied to the cotangent: the recomputation waits for the backward pass (nn/recompute.py)
        state, x, e, temb, rope, (norm_states, start) = _tie_floats(residuals, anchor)
        norms = [nnx.merge(g, s) for g, s in zip(norm_graphs, norm_states, strict=True)]
        control = control_chain(norms, start, temb)
        _, vjp = jax.vjp(run, state, x, e, temb, control, rope)
        return (*vjp(cotangent), None)

    call.defvjp(forward, backward)
    source = ([s for _, s in norm_parts], anchor_control)
    return call(state, hidden_states, encoder_hidden_states, temb, control, rope, source)


# a DynamiCtrl block called without a control source (on its own) recomputes as any block under "full"
_PLAIN_FULL_CALL = _checkpointed_call(DynamiCtrlBlock, "full")


def _subclass(base: type, policy_name: str) -> type:
    key = (base, policy_name)
    if key not in _SUBCLASSES:
        attrs = {"__call__": _checkpointed_call(base, policy_name)}
        if base is DynamiCtrlBlock and policy_name == "full":
            attrs = {"__call__": _full_remat_dynamictrl_call, "recomputes_control": True}
        _SUBCLASSES[key] = type(f"{policy_name.capitalize()}Remat{base.__name__}", (base,), attrs)
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
