"""DynamiCtrl's transformer: the CogVideoX DiT with one Pose-adaptive LayerNorm (`control_norm1`) per block.

The pose video's latents c0 (B, F', h, w, C_out) enter as a second token stream. Its tokens are the shared
`patch_embed` of [pose ; pose] on channels (video part only; the pose latent fills both the noisy-latent and
the image-latent input channels). In block l, with temb the time (+ ofs) embedding:
    [shift, scale, gate] = chunk3(control_norm1.linear(SiLU(temb)))          (in this order)
    c_hat = control_norm1.norm(c_l) * (1 + scale) + shift                    (its own affine LayerNorm)
    norm1's video output x_hat += c_hat  (text and the residual streams untouched; RoPE then rotates the sum)
    c_{l+1} = c_hat + gate * c_hat                                            (a rescale, not a residual)
and the rest of the block is CogVideoX's. The last block's control stream is discarded.
With every control_norm1 parameter zero, c_hat is zero and the model is the stock CogVideoX transformer.
Parameter paths are the release's (`transformer_blocks.i.control_norm1.{linear,norm}`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.models.cogvideox import CogVideoXBlock, CogVideoXConfig, CogVideoXTransformer3DModel
from xdyna_jax.nn.bf16_weights import computed_after
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import linear
from xdyna_jax.nn.norms import LayerNorm
from xdyna_jax.sharding import constrain_batch

# Under full remat a block's control input is not kept for the backward pass: it is recomputed from the
# control stream at the start of its segment of this many blocks (see `DynamiCtrlTransformerModel`), so a
# 42-block step keeps 7 of the 42 (20,400 x 3072 per clip) control streams, for at most 5 recomputed
# Pose-adaptive LayerNorms (elementwise work) per block in the backward pass.
CONTROL_SEGMENT = 6


def next_control(c_hat: jax.Array, gate: jax.Array) -> jax.Array:
    """The control stream a block hands on: c_hat + gate * c_hat, as the release writes it (it rounds
    differently from (1 + gate) * c_hat in bf16)."""
    return c_hat + gate * c_hat


def control_chain(norms, control: jax.Array, temb: jax.Array) -> jax.Array:
    """The control stream after the blocks whose `control_norm1`s are `norms` (in order), from `control`:
    what those blocks hand on, computed without them."""
    for norm in norms:
        control = constrain_batch(next_control(*norm(constrain_batch(control), temb)))
    return control


class PoseAdaptiveLayerNorm(nnx.Module):
    """`linear` (time_embed_dim -> 3D: shift, scale, gate) and its own affine LayerNorm `norm`."""

    def __init__(self, time_embed_dim: int, dim: int, eps: float, compute: Compute, rngs: nnx.Rngs):
        self.linear = linear(time_embed_dim, 3 * dim, compute, rngs)
        self.norm = LayerNorm(dim, eps)

    def __call__(self, control: jax.Array, temb: jax.Array) -> tuple[jax.Array, jax.Array]:
        """control tokens (B, N, D) -> (c_hat, gate (B, 1, D))."""
        shift, scale, gate = jnp.split(self.linear(jax.nn.silu(temb))[:, None, :], 3, axis=-1)
        return self.norm(control) * (1 + scale) + shift, gate


class DynamiCtrlBlock(CogVideoXBlock):
    """A CogVideoX block whose norm1 video output is shifted by the modulated control tokens."""

    def __init__(self, cfg: CogVideoXConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        self.control_norm1 = PoseAdaptiveLayerNorm(
            cfg.time_embed_dim, cfg.inner_dim, cfg.norm_eps, cfg.compute, rngs
        )

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        temb: jax.Array,
        control: jax.Array,
        rope: tuple[jax.Array, jax.Array] | None = None,
        control_source=None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(video, text, control) tokens -> the updated triple. `control_source` (segment start's control
        stream, the control_norm1s of the blocks since) says how `control` can be recomputed; only a
        block that recomputes its inputs (training/remat.py) reads it."""
        del control_source
        # Under a mesh with rules (training), every stream stays split over the examples: by propagation
        # alone XLA kept the examples whole and split the weights' contracting dimension instead, holding
        # the whole global batch's 4x-wide feed-forward activation on every device (and all-reducing it).
        hidden_states, encoder_hidden_states, control = (
            constrain_batch(a) for a in (hidden_states, encoder_hidden_states, control)
        )
        # The control stream depends only on the pose and the time embedding; unordered, XLA computes every
        # block's stream up front and holds them all (19.6 GiB of a full-size step's 42 GiB; see
        # bench/dynamictrl_memory.py). Tie each block's to its video input so one exists at a time.
        control = computed_after(control, hidden_states)
        c_hat, gate = self.control_norm1(control, temb)
        x, e = super().__call__(hidden_states, encoder_hidden_states, temb, rope, video_norm_addend=c_hat)
        return constrain_batch(x), constrain_batch(e), constrain_batch(next_control(c_hat, gate))


class DynamiCtrlTransformerModel(CogVideoXTransformer3DModel):
    """`model(hidden_states, encoder_hidden_states, timestep, control_hidden_states, *, ofs=None,
    image_rotary_emb=None)`: CogVideoXTransformer3DModel's call (see there) plus the pose latents
    control_hidden_states (B, F', h, w, out_channels) channels-last, required, on the latents' grid.
    The config is CogVideoX's (in_channels must be 2 x out_channels: [pose ; pose] goes through patch_embed).
    """

    block_class = DynamiCtrlBlock

    def __init__(self, config: CogVideoXConfig, *, rngs: nnx.Rngs):
        if config.in_channels != 2 * config.out_channels:
            raise ValueError(
                f"DynamiCtrlTransformerModel: in_channels={config.in_channels} must be 2 x out_channels="
                f"{config.out_channels}: the pose latent is patch-embedded as [pose ; pose] on channels"
            )
        super().__init__(config, rngs=rngs)

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        timestep: jax.Array,
        control_hidden_states: jax.Array | None = None,
        *,
        ofs=None,
        image_rotary_emb: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        cfg = self.config
        expected = (*jnp.shape(hidden_states)[:-1], cfg.out_channels)
        if control_hidden_states is None:
            raise ValueError(
                "DynamiCtrlTransformerModel: control_hidden_states (the pose video's latents, "
                f"(B, F', h, w, {cfg.out_channels}) channels-last) is required"
            )
        if tuple(jnp.shape(control_hidden_states)) != expected:
            raise ValueError(
                f"DynamiCtrlTransformerModel: control_hidden_states must have the latents' shape with "
                f"{cfg.out_channels} channels, {expected}; got {tuple(jnp.shape(control_hidden_states))}"
            )
        x, e, temb, rope = self.embed_inputs(
            hidden_states, encoder_hidden_states, timestep, ofs, image_rotary_emb
        )
        pose = jnp.asarray(control_hidden_states, cfg.compute.jnp_dtype)
        c = self.patch_embed.embed_video(jnp.concatenate([pose, pose], axis=-1))
        blocks = self.transformer_blocks
        for i, block in enumerate(blocks):
            if i % CONTROL_SEGMENT == 0:
                anchor, start = c, i
            source = {}
            if getattr(block, "recomputes_control", False):
                source = {"control_source": (anchor, tuple(blocks[j].control_norm1 for j in range(start, i)))}
            x, e, c = block(x, e, temb, c, rope, **source)
        return self.output_head(x, temb, jnp.shape(hidden_states))
