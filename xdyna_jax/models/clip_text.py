"""transformers' CLIPTextModel (SD 1.5's text encoder, CLIP ViT-L/14) in Flax NNX.

Parameter paths are transformers' keys without the `text_model.` level, e.g.
`encoder.layers.3.self_attn.q_proj.kernel`; convert/clip_text.py maps both key styles onto them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from xdyna_jax.models.config_utils import ConfigMixin
from xdyna_jax.nn.attention_ops import dot_product_attention
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import axis_names, linear
from xdyna_jax.nn.norms import LayerNorm

ACTIVATIONS = {
    # OpenAI CLIP's sigmoid approximation of GELU (SD 1.x's text encoder uses it)
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # transformers' "gelu" is the exact erf form
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ConfigMixin):
    """transformers' CLIPTextConfig field names; defaults are SD 1.5's text_encoder/config.json."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    # Metadata only (they pick the pooled token in transformers, which SD does not use). SD 1.5's file keeps
    # the pre-2023 values 0/2/1; the tokenizer's real ids are 49406/49407.
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 1
    compute: Compute = Compute()

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig: hidden_act {self.hidden_act!r} not in {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig: {self.num_attention_heads} heads do not divide hidden_size {self.hidden_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers(cls, cfg: dict, compute: Compute | None = None) -> CLIPTextConfig:
        """Read a transformers text_encoder/config.json dict (unknown keys such as dropout are ignored)."""
        return cls.from_foreign(cfg, compute)

    def to_transformers(self) -> dict:
        """A config.json dict that transformers' CLIPTextConfig / CLIPTextModel.from_pretrained accept."""
        d = self.foreign_dict()
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **d}


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs):
        dtype = cfg.compute.jnp_dtype
        table = axis_names(("vocab", "embed"))
        self.token_embedding = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, embedding_metadata=table, rngs=rngs
        )
        self.position_embedding = nnx.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, embedding_metadata=table, rngs=rngs
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[-1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with transformers' names (`q_proj`, `k_proj`, `v_proj`, `out_proj`).

    Causal for the text encoder; the vision tower (models/clip_vision.py) passes causal=False.
    """

    def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs, *, causal: bool = True):
        d, compute = cfg.hidden_size, cfg.compute
        self.heads = cfg.num_attention_heads
        self.causal = causal
        self.compute = compute
        self.q_proj = linear(d, d, compute, rngs, names=("embed", "heads"))
        self.k_proj = linear(d, d, compute, rngs, names=("embed", "heads"))
        self.v_proj = linear(d, d, compute, rngs, names=("embed", "heads"))
        self.out_proj = linear(d, d, compute, rngs, names=("heads", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        def heads(t):
            return t.reshape(*t.shape[:-1], self.heads, t.shape[-1] // self.heads)

        out = dot_product_attention(
            heads(self.q_proj(x)),
            heads(self.k_proj(x)),
            heads(self.v_proj(x)),
            backend=self.compute.attention,
            causal=self.causal,
            precision=self.compute.lax_precision,
            chunk_size=self.compute.attention_chunk,
        )
        return self.out_proj(out.reshape(*out.shape[:-2], -1))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, cfg.compute, rngs)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, cfg.compute, rngs, names=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs, *, causal: bool = True):
        self.self_attn = CLIPAttention(cfg, rngs, causal=causal)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg, rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs, *, causal: bool = True):
        self.layers = nnx.List(
            [CLIPEncoderLayer(cfg, rngs, causal=causal) for _ in range(cfg.num_hidden_layers)]
        )


class CLIPTextModel(nnx.Module):
    """input_ids (B, L) int -> last_hidden_state (B, L, hidden_size) float32, after `final_layer_norm`.

    Attention is causal with no padding mask, as Stable Diffusion calls the encoder (prompts padded to 77
    with `<|endoftext|>`). With `return_hidden_states=True` it returns `(last_hidden_state, hidden_states)`
    where `hidden_states` is transformers' tuple: the embeddings, then every layer's output (before the final
    norm), so `hidden_states[-2]` is the penultimate layer ("CLIP skip").
    """

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, rngs)
        self.encoder = CLIPEncoder(config, rngs)
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def __call__(self, input_ids: jax.Array, *, return_hidden_states: bool = False):
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"CLIPTextModel expects input_ids (B, L), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"CLIPTextModel: sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{cfg.max_position_embeddings}; truncate the prompt with the tokenizer"
            )
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"CLIPTextModel expects integer token ids, got dtype {input_ids.dtype}")
        x = self.embeddings(input_ids)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            hidden_states.append(x)
        last = self.final_layer_norm(x).astype(jnp.float32)
        if return_hidden_states:
            return last, tuple(h.astype(jnp.float32) for h in hidden_states)
        return last
