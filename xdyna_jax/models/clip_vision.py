"""transformers' CLIPVisionModelWithProjection (IP-Adapter's image encoder) in Flax NNX, NHWC.

The parameter tree mirrors the transformers file exactly, `vision_model.` level included:
`vision_model.embeddings.{class_embedding, patch_embedding, position_embedding}`,
`vision_model.pre_layrnorm` (transformers' spelling), `vision_model.encoder.layers.N.*`,
`vision_model.post_layernorm`, `visual_projection`.
So convert/state.py maps a transformers state dict onto it with no renaming. The encoder layers are the text
encoder's (models/clip_text.py) without the causal mask.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.models.clip_text import ACTIVATIONS, CLIPEncoder
from xdyna_jax.models.config_utils import ConfigMixin
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import axis_names, conv, linear, param
from xdyna_jax.nn.norms import LayerNorm


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(ConfigMixin):
    """transformers' CLIPVisionConfig names; defaults are IP-Adapter's image_encoder (OpenCLIP ViT-H/14)."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 1024
    # "gelu" (exact erf) for OpenCLIP ViT-H/14; OpenAI's ViT-L/14 uses "quick_gelu"
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    compute: Compute = Compute()

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPVisionConfig: hidden_act {self.hidden_act!r} not in {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPVisionConfig: {self.num_attention_heads} heads do not divide "
                f"hidden_size {self.hidden_size}"
            )
        if not isinstance(self.image_size, int) or not isinstance(self.patch_size, int):
            raise ValueError(
                f"CLIPVisionConfig: image_size and patch_size must be ints (square images), got "
                f"{self.image_size!r} and {self.patch_size!r}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CLIPVisionConfig: patch_size {self.patch_size} does not divide image_size {self.image_size}"
            )

    @property
    def num_positions(self) -> int:
        """Patches plus the class token (257 for 224 / 14)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_transformers(cls, cfg: dict, compute: Compute | None = None) -> CLIPVisionConfig:
        """Read a transformers CLIPVisionModelWithProjection config.json dict (dropout etc. are ignored)."""
        return cls.from_foreign(cfg, compute)

    def to_transformers(self) -> dict:
        """A config.json dict that transformers' CLIPVisionModelWithProjection.from_pretrained accepts."""
        d = self.foreign_dict()
        return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model", **d}


class CLIPVisionOutput(NamedTuple):
    """transformers' CLIPVisionModelOutput fields (a NamedTuple, so it is a pytree and jit can return it)."""

    image_embeds: jax.Array  # (B, projection_dim): visual_projection(post_layernorm(CLS token))
    last_hidden_state: jax.Array  # (B, num_positions, hidden_size): last layer, before post_layernorm
    hidden_states: tuple[jax.Array, ...]  # pre_layrnorm output, then every layer's output


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        d, compute = cfg.hidden_size, cfg.compute
        self.class_embedding = param(
            jax.random.normal(rngs.params(), (d,), jnp.float32) * d**-0.5, ("embed",)
        )
        # Non-overlapping patches: a stride-p convolution with no padding and no bias.
        self.patch_embedding = conv(
            cfg.num_channels, d, cfg.patch_size, compute, rngs, stride=cfg.patch_size, padding=0, bias=False
        )
        self.position_embedding = nnx.Embed(
            cfg.num_positions,
            d,
            dtype=compute.jnp_dtype,
            embedding_metadata=axis_names(("vocab", "embed")),
            rngs=rngs,
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        patches = self.patch_embedding(pixel_values)  # (B, H/p, W/p, D)
        b, _, _, d = patches.shape
        # Row-major flattening of the grid = transformers' NCHW flatten(2): position i is row i // grid.
        patches = patches.reshape(b, -1, d)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, d))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding(jnp.arange(x.shape[1]))[None]


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, rngs: nnx.Rngs):
        self.embeddings = CLIPVisionEmbeddings(cfg, rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg, rngs, causal=False)  # duck-typed: reads the same config fields
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)


class CLIPVisionModelWithProjection(nnx.Module):
    """pixel_values (B, image_size, image_size, 3) NHWC, CLIP-normalised -> CLIPVisionOutput (float32).

    IP-Adapter-plus feeds `hidden_states[-2]` (the penultimate layer, (B, 257, 1280) for ViT-H/14) to its
    Resampler; plain IP-Adapter uses `image_embeds`. See xdyna_jax/conditioning/clip_image.py for the
    preprocessing that produces `pixel_values`.
    """

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, rngs)
        self.visual_projection = linear(
            config.hidden_size, config.projection_dim, config.compute, rngs, bias=False
        )

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        cfg = self.config
        pixel_values = jnp.asarray(pixel_values)
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"CLIPVisionModelWithProjection expects pixel_values (B, {', '.join(map(str, expected))}) "
                f"in NHWC, got {tuple(pixel_values.shape)}"
            )
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values.astype(cfg.compute.jnp_dtype)))
        hidden_states = [x]
        for layer in vm.encoder.layers:
            x = layer(x)
            hidden_states.append(x)
        image_embeds = self.visual_projection(vm.post_layernorm(x[:, 0]))
        return CLIPVisionOutput(
            image_embeds=image_embeds.astype(jnp.float32),
            last_hidden_state=x.astype(jnp.float32),
            hidden_states=tuple(h.astype(jnp.float32) for h in hidden_states),
        )
