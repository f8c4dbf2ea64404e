"""transformers' T5EncoderModel (T5 v1.1, CogVideoX's / DynamiCtrl's text encoder) in Flax NNX.

Parameter paths are transformers' state-dict keys, so convert/state.py maps a checkpoint mechanically:
  shared.weight                                          -> shared.embedding           (vocab, d_model)
  encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight -> ....{q,k,v,o}.kernel       (no biases)
  encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight -> ....embedding (buckets, heads)
  encoder.block.{i}.layer.{0,1}.layer_norm.weight        -> ....layer_norm.scale
  encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight -> ....kernel  ({wi, wo} for "relu")
  encoder.final_layer_norm.weight                        -> encoder.final_layer_norm.scale
A transformers state dict also holds `encoder.embed_tokens.weight`, the same tensor as `shared.weight`
(the two are tied); `merge_tied_embeddings` folds it into `shared.weight` before loading.

What makes T5 differ from a textbook transformer, all reproduced here:
  - no 1/sqrt(d_kv) scaling of the attention scores (the scale is folded into the trained q weights);
  - no absolute positions: a learned bias per (relative-position bucket, head) is added to the scores;
    only the first block owns the table, and the bias it gives is reused by every block;
  - RMSNorm without mean subtraction or bias (computed in float32);
  - v1.1's gated feed-forward: wo(gelu_tanh(wi_0 x) * wi_1 x).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdyna_jax.models.config_utils import ConfigMixin, require_default
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import axis_names, linear, param

ACTIVATIONS = {
    "relu": jax.nn.relu,
    # transformers' "gelu_new": the tanh approximation, which "gated-gelu" (T5 v1.1) selects
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}
# feed_forward_proj -> (dense_act_fn, is_gated_act), as transformers' T5Config derives them.
FEED_FORWARD = {"gated-gelu": ("gelu_new", True), "relu": ("relu", False)}

SHARED_KEY = "shared.weight"
TIED_EMBEDDING_KEY = "encoder.embed_tokens.weight"


@dataclasses.dataclass(frozen=True)
class T5Config(ConfigMixin):
    """transformers' T5Config field names (encoder part); defaults are the T5-v1.1-XXL encoder's.

    `dense_act_fn` and `is_gated_act` follow from `feed_forward_proj` (left None they are filled in; given,
    they must agree with it).
    """

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str | None = None
    is_gated_act: bool | None = None
    compute: Compute = Compute()

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD:
            raise ValueError(
                f"T5Config: feed_forward_proj {self.feed_forward_proj!r} is not supported "
                f"(supported: {sorted(FEED_FORWARD)})"
            )
        act, gated = FEED_FORWARD[self.feed_forward_proj]
        for name, derived in (("dense_act_fn", act), ("is_gated_act", gated)):
            given = getattr(self, name)
            if given is None:
                object.__setattr__(self, name, derived)
            elif given != derived:
                raise ValueError(
                    f"T5Config: {name}={given!r} contradicts feed_forward_proj={self.feed_forward_proj!r} "
                    f"(which means {name}={derived!r})"
                )
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"T5Config: {name} must be >= 1, got {getattr(self, name)}")
        # The bucketing needs exact buckets (num_buckets // 4 of them per direction) and a log range above them.
        if self.relative_attention_num_buckets < 4:
            raise ValueError(
                f"T5Config: relative_attention_num_buckets must be >= 4, got {self.relative_attention_num_buckets}"
            )
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(
                f"T5Config: relative_attention_max_distance={self.relative_attention_max_distance} must exceed "
                f"relative_attention_num_buckets // 4 = {self.relative_attention_num_buckets // 4}"
            )

    @property
    def inner_dim(self) -> int:
        """Width of the attention's q/k/v outputs (num_heads * d_kv; need not equal d_model)."""
        return self.num_heads * self.d_kv

    @classmethod
    def from_transformers(cls, cfg: dict, compute: Compute | None = None) -> T5Config:
        """Read a transformers text_encoder/config.json dict (decoder, dropout and token-id keys ignored).

        Like transformers, the activation comes from `feed_forward_proj` alone (the file's dense_act_fn /
        is_gated_act are derived values). Another model_type (umt5: a bias table per block) is refused.
        """
        require_default(cfg, "model_type", ("t5",), "T5Config")
        derived = {k: v for k, v in cfg.items() if k not in ("dense_act_fn", "is_gated_act")}
        return cls.from_foreign(derived, compute)

    def to_transformers(self) -> dict:
        """A config.json dict that transformers' T5Config / T5EncoderModel.from_pretrained accept."""
        d = self.foreign_dict("dense_act_fn", "is_gated_act")
        return {"architectures": ["T5EncoderModel"], "model_type": "t5", **d}


def relative_position_buckets(
    query_length: int, key_length: int, num_buckets: int, max_distance: int
) -> np.ndarray:
    """(query_length, key_length) int32 bucket of each key offset `key - query`, bidirectional.

    Half the buckets are for keys after the query, half for keys before. In each half, offsets below
    num_buckets // 4 get one bucket each; larger ones share buckets spaced logarithmically up to
    max_distance, and everything beyond falls in the last bucket. Computed on the host from the static
    lengths, with transformers' float32 arithmetic, so the boundaries land exactly where its do.
    """
    offset = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(offset)
    log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
    scaled = log_ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    far = np.minimum(exact + scaled.astype(np.int64), half - 1)
    bucket = np.where(offset > 0, half, 0) + np.where(distance < exact, distance, far)
    return bucket.astype(np.int32)


def merge_tied_embeddings(state: Mapping[str, np.ndarray], source: str = "T5 state dict") -> dict:
    """`state` with `encoder.embed_tokens.weight` folded into `shared.weight` (transformers ties them).

    Files hold either or both keys (save_pretrained keeps one; `state_dict()` lists both). Both present
    must hold the same values, else a ValueError names `source`. Export writes `shared.weight` only,
    which transformers re-ties on load.
    """
    out = dict(state)
    if TIED_EMBEDDING_KEY not in out:
        return out
    tied = out.pop(TIED_EMBEDDING_KEY)
    if SHARED_KEY not in out:
        out[SHARED_KEY] = tied
    elif tuple(out[SHARED_KEY].shape) != tuple(tied.shape) or not np.array_equal(
        np.asarray(out[SHARED_KEY]), np.asarray(tied)
    ):
        raise ValueError(
            f"{source}: {TIED_EMBEDDING_KEY} {tuple(tied.shape)} differs from {SHARED_KEY} "
            f"{tuple(out[SHARED_KEY].shape)}; T5 ties them, so a file must hold one table"
        )
    return out


class T5LayerNorm(nnx.Module):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight, statistics and product in float32."""

    def __init__(self, num_channels: int, eps: float):
        self.eps = eps
        self.scale = param(jnp.ones((num_channels,), jnp.float32), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention plus an additive (heads, Lq, Lk) position bias.

    Written out here rather than through `nn.attention_ops.dot_product_attention`: that dispatch scales by
    1/sqrt(D) and takes no additive bias. The (B, H, L, L) score tensor at the pipeline's 226 tokens is
    small (13 MB per prompt at 64 heads in float32), so one pair of einsums is the right shape anyway.
    """

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, *, has_relative_attention_bias: bool):
        compute = cfg.compute
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.precision = compute.lax_precision
        self.q = linear(cfg.d_model, cfg.inner_dim, compute, rngs, bias=False, names=("embed", "heads"))
        self.k = linear(cfg.d_model, cfg.inner_dim, compute, rngs, bias=False, names=("embed", "heads"))
        self.v = linear(cfg.d_model, cfg.inner_dim, compute, rngs, bias=False, names=("embed", "heads"))
        self.o = linear(cfg.inner_dim, cfg.d_model, compute, rngs, bias=False, names=("heads", "embed"))
        if has_relative_attention_bias:
            # rows are buckets (positions); the heads side is 8-64 wide, not worth splitting
            self.relative_attention_bias = nnx.Embed(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                embedding_metadata=axis_names(("vocab", None)),
                rngs=rngs,
            )
        else:
            self.relative_attention_bias = None

    def __call__(self, x: jax.Array, position_bias: jax.Array, keep: jax.Array | None) -> jax.Array:
        """x (B, L, d_model); position_bias (1, H, L, L) float32; keep (B, 1, 1, L) bool or None."""
        b, length, _ = x.shape

        def heads(t):
            return t.reshape(b, length, self.num_heads, self.d_kv)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = jnp.einsum(
            "bqhd,bkhd->bhqk", q, k, precision=self.precision, preferred_element_type=jnp.float32
        )
        scores = scores + position_bias
        if keep is not None:
            # a fill value, not an added one: masked scores cannot reach -inf (a fully masked row stays finite)
            scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum(
            "bhqk,bkhd->bqhd",
            weights.astype(v.dtype),
            v,
            precision=self.precision,
            preferred_element_type=jnp.float32,
        ).astype(v.dtype)
        return self.o(out.reshape(b, length, self.num_heads * self.d_kv))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, *, has_relative_attention_bias: bool):
        self.SelfAttention = T5Attention(cfg, rngs, has_relative_attention_bias=has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def __call__(self, x, position_bias, keep):
        return x + self.SelfAttention(self.layer_norm(x), position_bias, keep)


class T5DenseGatedActDense(nnx.Module):
    """v1.1's feed-forward: wo(act(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        self.act = cfg.dense_act_fn
        self.wi_0 = linear(cfg.d_model, cfg.d_ff, cfg.compute, rngs, bias=False)
        self.wi_1 = linear(cfg.d_model, cfg.d_ff, cfg.compute, rngs, bias=False)
        self.wo = linear(cfg.d_ff, cfg.d_model, cfg.compute, rngs, bias=False, names=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(ACTIVATIONS[self.act](self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nnx.Module):
    """The original T5's feed-forward: wo(act(wi x))."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        self.act = cfg.dense_act_fn
        self.wi = linear(cfg.d_model, cfg.d_ff, cfg.compute, rngs, bias=False)
        self.wo = linear(cfg.d_ff, cfg.d_model, cfg.compute, rngs, bias=False, names=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(ACTIVATIONS[self.act](self.wi(x)))


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        dense = T5DenseGatedActDense if cfg.is_gated_act else T5DenseActDense
        self.DenseReluDense = dense(cfg, rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    """`layer` is transformers' list: [self-attention, feed-forward], each pre-norm with a residual."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs, *, has_relative_attention_bias: bool):
        self.layer = nnx.List(
            [
                T5LayerSelfAttention(cfg, rngs, has_relative_attention_bias=has_relative_attention_bias),
                T5LayerFF(cfg, rngs),
            ]
        )

    def __call__(self, x, position_bias, keep):
        return self.layer[1](self.layer[0](x, position_bias, keep))


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        self.block = nnx.List(
            [T5Block(cfg, rngs, has_relative_attention_bias=i == 0) for i in range(cfg.num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5EncoderModel(nnx.Module):
    """input_ids (B, L) int -> last_hidden_state (B, L, d_model) float32, after `final_layer_norm`.

    Without `attention_mask` every token attends to every token, padding included: how CogVideoX and
    DynamiCtrl call the encoder on prompts padded to 226. With a (B, L) mask (1 = token, 0 = padding, as
    the tokenizer returns it) padded keys are left out, as transformers does; padded positions still get
    outputs. Activations run in `config.compute.dtype`; norms, softmax and the output are float32.
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        # no dtype: rows are cast after the lookup, so a bf16 run never makes a bf16 copy of the whole table
        self.shared = nnx.Embed(
            config.vocab_size, config.d_model, embedding_metadata=axis_names(("vocab", "embed")), rngs=rngs
        )
        self.encoder = T5Stack(config, rngs)

    def position_bias(self, length: int) -> jax.Array:
        """(1, num_heads, length, length) float32 bias from the first block's table, shared by all blocks."""
        cfg = self.config
        buckets = relative_position_buckets(
            length, length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.embedding[...]
        values = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0)  # (L, L, H)
        return values.transpose(2, 0, 1)[None]

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        _check_ids(input_ids, cfg.vocab_size)
        input_ids = jnp.asarray(input_ids)
        b, length = input_ids.shape
        keep = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, length):
                raise ValueError(
                    f"T5EncoderModel: attention_mask shape {tuple(attention_mask.shape)} does not match "
                    f"input_ids {(b, length)}"
                )
            keep = (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        x = jnp.take(self.shared.embedding[...], input_ids, axis=0).astype(cfg.compute.jnp_dtype)
        bias = self.position_bias(length)
        for block in self.encoder.block:
            x = block(x, bias, keep)
        return self.encoder.final_layer_norm(x.astype(jnp.float32))


def _check_ids(input_ids, vocab_size: int) -> None:
    shape = tuple(getattr(input_ids, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"T5EncoderModel expects input_ids (B, L), got shape {shape}")
    if shape[1] == 0:
        raise ValueError("T5EncoderModel: input_ids has no tokens (L = 0)")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"T5EncoderModel expects integer token ids, got dtype {input_ids.dtype}")
    if isinstance(input_ids, jax.core.Tracer):
        return  # values unknown under jit; a concrete call is checked below
    ids = np.asarray(input_ids)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(
            f"T5EncoderModel: token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]; "
            "the tokenizer and text encoder do not match"
        )
