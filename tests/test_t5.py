"""T5 v1.1 encoder and tokenizer parity against transformers (tiny config, random perturbed weights, fp32;
a SentencePiece model trained by the test)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from oracle import jitted, perturb_, rel_err, torch_state
from oracle_t5 import EXTRA_IDS, train_t5_spiece, write_t5_tokenizer_folder
from transformers.models.t5.modeling_t5 import T5Attention as TorchT5Attention

from convert.state import export_torch_state, load_torch_state
from xdyna_jax.conditioning.t5_tokenizer import T5Tokenizer
from xdyna_jax.models.t5 import (
    T5Config,
    T5EncoderModel,
    merge_tied_embeddings,
    relative_position_buckets,
)
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model

# inner width (heads * d_kv = 24) differs from d_model, and 8 buckets / max distance 12 saturate well
# inside the 30-token inputs
TINY = dict(
    vocab_size=64,
    d_model=32,
    d_kv=6,
    d_ff=40,
    num_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
    dropout_rate=0.0,
)
LENGTH = 30


def build_pair(feed_forward_proj="gated-gelu", seed=0, attn="eager", compute=None):
    torch.manual_seed(seed)
    config = transformers.T5Config(**TINY, feed_forward_proj=feed_forward_proj, attn_implementation=attn)
    ref = transformers.T5EncoderModel(config).eval()
    perturb_(ref, seed)
    cfg = T5Config.from_transformers(ref.config.to_dict(), compute=compute or Compute(precision="highest"))
    model = shape_only_model(T5EncoderModel, cfg)
    load_torch_state(model, merge_tied_embeddings(torch_state(ref)), source=f"tiny-{feed_forward_proj}")
    return ref, model


def random_ids(batch=2, length=LENGTH, seed=1):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, length), dtype=np.int32)


def padding_mask(batch=2, length=LENGTH):
    mask = np.ones((batch, length), np.int32)
    mask[1, 11:] = 0  # the second prompt is 11 tokens, padded
    return mask


def torch_encode(ref, ids, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask).long()}
        return ref(torch.from_numpy(ids).long(), **kwargs).last_hidden_state.numpy()


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_encoder_matches_transformers(feed_forward_proj):
    ref, model = build_pair(feed_forward_proj)
    ids, mask = random_ids(), padding_mask()
    # without a mask, as CogVideoX / DynamiCtrl call it: padded tokens attend and are attended
    run = jitted(model)
    out = run(jnp.asarray(ids))
    assert out.dtype == jnp.float32 and out.shape == (2, LENGTH, TINY["d_model"])
    assert rel_err(out, torch_encode(ref, ids)) < 1e-5
    # with a padding mask; transformers' eager and sdpa paths agree with it
    masked = run(jnp.asarray(ids), jnp.asarray(mask))
    expected = torch_encode(ref, ids, mask)
    assert rel_err(masked, expected) < 1e-5
    ref.set_attn_implementation("sdpa")
    assert rel_err(masked, torch_encode(ref, ids, mask)) < 1e-5
    # the mask changes the padded prompt only
    assert rel_err(masked[0], out[0]) < 1e-6 and rel_err(masked[1], out[1]) > 1e-3


def test_relative_position_buckets_match_transformers():
    # T5-XXL's (32, 128) and small tables, at offsets far beyond max_distance (float32 log boundaries)
    n = 400
    offsets = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # key - query
    for buckets, distance in [(32, 128), (8, 12), (6, 10), (10, 7), (64, 256)]:
        expected = TorchT5Attention._relative_position_bucket(
            offsets, bidirectional=True, num_buckets=buckets, max_distance=distance
        ).numpy()
        ours = relative_position_buckets(n, n, buckets, distance)
        np.testing.assert_array_equal(ours, expected, err_msg=f"{buckets} buckets, max distance {distance}")


def test_bf16_compute_and_params_run():
    ref, model = build_pair(seed=2)
    ids = random_ids(seed=3)
    expected = torch_encode(ref, ids)
    bf16 = shape_only_model(
        T5EncoderModel, T5Config(**{**model.config.to_dict(), "compute": Compute("bfloat16")})
    )
    load_torch_state(bf16, merge_tied_embeddings(torch_state(ref)), source="tiny", host=True)
    # bf16 params as a bf16 bundle restores them (cast on the host: no per-shape XLA kernels)
    nnx.update(bf16, jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16), nnx.state(bf16, nnx.Param)))
    assert {a.dtype for a in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    out = jitted(bf16)(jnp.asarray(ids))
    assert out.dtype == jnp.float32
    assert rel_err(out, expected) < 5e-2


def test_full_size_encoder_traces_from_shapes():
    # the XXL encoder as CogVideoX's text_encoder/config.json describes it, bf16, never allocated
    file = {
        "architectures": ["T5EncoderModel"],
        "d_ff": 10240,
        "d_kv": 64,
        "d_model": 4096,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": 24,
        "num_heads": 64,
        "num_layers": 24,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "vocab_size": 32128,
    }
    cfg = T5Config.from_transformers(file, compute=Compute("bfloat16"))
    assert cfg == T5Config(compute=Compute("bfloat16"))
    model = shape_only_model(T5EncoderModel, cfg)
    sizes = [v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert sum(sizes) == 32128 * 4096 + 32 * 64 + 24 * (4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096) + 4096
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 226), jnp.int32))
    assert out.shape == (2, 226, 4096) and out.dtype == jnp.float32


def test_state_keys_round_trip_and_tied_embedding():
    ref, model = build_pair(seed=4)
    original = torch_state(ref)
    exported = export_torch_state(model)
    # export writes the table once, as shared.weight; transformers re-ties encoder.embed_tokens to it
    assert sorted(exported) == sorted(k for k in original if k != "encoder.embed_tokens.weight")
    for k, v in exported.items():
        np.testing.assert_array_equal(v, original[k], err_msg=k)
    only_tied = {k: v for k, v in original.items() if k != "shared.weight"}
    np.testing.assert_array_equal(
        merge_tied_embeddings(only_tied)["shared.weight"], original["shared.weight"]
    )
    untied = {**original, "encoder.embed_tokens.weight": original["shared.weight"] + 1}
    with pytest.raises(ValueError, match="embed_tokens.*differs from shared.weight"):
        merge_tied_embeddings(untied, source="file.safetensors")


def test_config_round_trips_and_refusals():
    xxl = T5Config()
    assert (xxl.d_model, xxl.num_layers, xxl.num_heads, xxl.d_ff, xxl.vocab_size) == (
        4096,
        24,
        64,
        10240,
        32128,
    )
    assert (xxl.dense_act_fn, xxl.is_gated_act) == ("gelu_new", True)
    assert T5Config.from_dict(xxl.to_dict()) == xxl
    theirs = transformers.T5Config(**xxl.to_transformers())
    assert (theirs.dense_act_fn, theirs.is_gated_act) == ("gelu_new", True)
    assert T5Config.from_transformers(theirs.to_dict()) == xxl
    assert T5Config(feed_forward_proj="relu").dense_act_fn == "relu"
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-silu'"):
        T5Config(feed_forward_proj="gated-silu")
    with pytest.raises(ValueError, match="dense_act_fn='gelu' contradicts"):
        T5Config(dense_act_fn="gelu")
    with pytest.raises(ValueError, match="model_type='umt5'"):
        T5Config.from_transformers({**xxl.to_transformers(), "model_type": "umt5"})
    with pytest.raises(ValueError, match="relative_attention_max_distance"):
        T5Config(relative_attention_num_buckets=32, relative_attention_max_distance=8)


def test_bad_encoder_inputs_are_refused():
    _, model = build_pair(seed=5)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(jnp.zeros((LENGTH,), jnp.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        model(jnp.zeros((1, LENGTH), jnp.float32))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model(np.full((1, LENGTH), 64, np.int32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(jnp.zeros((2, LENGTH), jnp.int32), jnp.ones((2, LENGTH - 1), jnp.int32))


# ----------------------------------------------------------------------------------------------- tokenizer

PROMPTS = [
    "A person in a red jacket walks along the beach at sunset.",
    "",
    "The quick brown fox jumps over the lazy dog. " * 40,  # > 226 tokens: truncated, </s> kept
    "  Café   naïve  東京 Straße ﬁne ①  Ⅸ  ",  # NFKC, whitespace runs, unknown characters
    "zzz QQQ\ttabs\nand newlines",
    "sentinels <extra_id_0> and</s>inside<pad> text <unk> <extra_id_99>x",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5_tokenizer")
    spiece = train_t5_spiece(root / "trained")
    return {
        "spiece": write_t5_tokenizer_folder(root / "spiece", spiece, kind="spiece"),
        "json": write_t5_tokenizer_folder(root / "json", spiece, kind="json"),
    }


@pytest.mark.parametrize("kind", ["spiece", "json"])
def test_tokenizer_matches_transformers(folders, kind):
    folder = folders[kind]
    if kind == "spiece":
        ours = [T5Tokenizer.from_folder(folder), T5Tokenizer.from_spiece(folder / "spiece.model")]
    else:
        ours = [T5Tokenizer.from_folder(folder), T5Tokenizer.from_tokenizer_json(folder / "tokenizer.json")]
    # transformers 5 has one class under both names; both are checked should they part again
    for cls in (transformers.T5Tokenizer, transformers.T5TokenizerFast):
        theirs = cls.from_pretrained(str(folder))
        for max_length in (226, 12):
            expected = theirs(
                PROMPTS, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True
            )
            for tokenizer in ours:
                ids, mask = tokenizer(PROMPTS, max_length=max_length)
                assert ids.dtype == mask.dtype == np.int32 and ids.shape == (len(PROMPTS), max_length)
                np.testing.assert_array_equal(
                    ids, np.array(expected["input_ids"]), err_msg=f"{cls} {max_length}"
                )
                np.testing.assert_array_equal(mask, np.array(expected["attention_mask"]))
    tokenizer = ours[0]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.vocab_size == len(theirs)
    ids, mask = tokenizer("", max_length=5)  # a single string is a batch of one: </s> then padding
    assert ids.tolist() == [[1, 0, 0, 0, 0]] and mask.tolist() == [[1, 0, 0, 0, 0]]
    assert tokenizer.encode("<extra_id_0>") == [theirs.convert_tokens_to_ids("<extra_id_0>")]


def test_sentencepiece_keeps_marks_transformers_drops(folders):
    # A combining mark after a character NFKC rewrites ("ﬁ" + U+0301 -> "fí"): SentencePiece (T5's own
    # tokenizer, and transformers 4's slow T5Tokenizer) keeps the mark, here an unknown piece; the
    # `tokenizers` normaliser behind transformers 5's T5Tokenizer drops it. tokenizer.json follows the latter.
    text = "ﬁ\u0301"
    spiece = T5Tokenizer.from_folder(folders["spiece"])
    json_route = T5Tokenizer.from_folder(folders["json"])
    theirs = transformers.T5Tokenizer.from_pretrained(str(folders["spiece"]))
    assert spiece.encode(text) == spiece._sp.encode(text) == json_route.encode(text) + [spiece.unk_token_id]
    assert json_route.encode(text) == theirs.encode(text, add_special_tokens=False)


def test_bad_tokenizer_files_are_refused(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T5Tokenizer.from_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither spiece.model nor tokenizer.json"):
        T5Tokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        T5Tokenizer.from_spiece(tmp_path / "missing.model")
    corrupt = tmp_path / "spiece.model"
    corrupt.write_bytes((folders["spiece"] / "spiece.model").read_bytes()[:500])
    with pytest.raises(ValueError, match="not a readable SentencePiece model"):
        T5Tokenizer.from_spiece(corrupt)
    truncated = tmp_path / "tokenizer.json"
    truncated.write_text((folders["json"] / "tokenizer.json").read_text()[:1000])
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        T5Tokenizer.from_tokenizer_json(truncated)
    bpe = tmp_path / "bpe.json"
    bpe.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}))
    with pytest.raises(ValueError, match="BPE model"):
        T5Tokenizer.from_tokenizer_json(bpe)
    with pytest.raises(ValueError, match="no piece '<s>' for its eos_token"):
        T5Tokenizer.from_spiece(folders["spiece"] / "spiece.model", eos_token="<s>")
    with pytest.raises(ValueError, match="no token '<extra_id_100>'"):
        T5Tokenizer.from_tokenizer_json(folders["json"] / "tokenizer.json", extra_ids=EXTRA_IDS + 1)
    with pytest.raises(ValueError, match="neither a sentinel"):
        T5Tokenizer.from_spiece(folders["spiece"] / "spiece.model", additional_special_tokens=["<mask>"])
    tokenizer = T5Tokenizer.from_folder(folders["spiece"])
    with pytest.raises(ValueError, match="max_length"):
        tokenizer("a", max_length=0)
    with pytest.raises(TypeError, match="expected strings"):
        tokenizer(["a", None])
