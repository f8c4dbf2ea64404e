"""CLIPTextModel parity against transformers (tiny config, random perturbed weights, fp32) and its converter."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from oracle import perturb_, rel_err, torch_state

from convert.clip_text import export_clip_text_state, load_clip_text_state
from convert.io import ConversionError
from xdyna_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model

TINY = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=16,
    bos_token_id=998,  # inside the tiny vocabulary, or transformers warns
    eos_token_id=999,
)


def build_pair(act="quick_gelu", seed=0, state_prefix=""):
    torch.manual_seed(seed)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY, hidden_act=act)).eval()
    perturb_(ref, seed)
    cfg = CLIPTextConfig.from_transformers(ref.config.to_dict(), compute=Compute(precision="highest"))
    model = shape_only_model(CLIPTextModel, cfg)
    state = {state_prefix + k: v for k, v in torch_state(ref).items()}
    load_clip_text_state(model, state, source=f"tiny-{act}")
    return ref, model


def random_ids(batch, length, seed=1):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, length), dtype=np.int32)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("length", [77, 9])
def test_clip_text_matches_transformers(act, length):
    ref, model = build_pair(act)
    ids = random_ids(2, length)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    last, hidden = model(jnp.asarray(ids), return_hidden_states=True)
    assert rel_err(last, out.last_hidden_state.numpy()) < 1e-5
    assert len(hidden) == len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    for got, expected in zip(hidden, out.hidden_states, strict=True):
        assert rel_err(got, expected.numpy()) < 1e-5
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(ids))), np.asarray(last))


def test_prefixed_state_with_position_ids_loads():
    # SD 1.5 / transformers 4 files: `text_model.` prefix and the `position_ids` buffer.
    ref, model = build_pair(seed=2)
    state = {"text_model." + k: v for k, v in torch_state(ref).items()}
    state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    cfg = model.config
    prefixed = shape_only_model(CLIPTextModel, cfg)
    load_clip_text_state(prefixed, state, source="prefixed")
    ids = jnp.asarray(random_ids(2, 77, seed=3))  # the shapes of the parity test, so eager ops are cached
    np.testing.assert_array_equal(np.asarray(prefixed(ids)), np.asarray(model(ids)))


def test_export_round_trip_is_exact():
    ref, model = build_pair(seed=4)
    original = torch_state(ref)
    for prefix in ("text_model.", ""):
        exported = export_clip_text_state(model, prefix=prefix)
        assert sorted(exported) == sorted(prefix + k for k in original)
        for k, v in original.items():
            np.testing.assert_array_equal(exported[prefix + k], v, err_msg=k)


def test_exported_state_loads_into_transformers():
    ref, model = build_pair(seed=5)
    fresh = transformers.CLIPTextModel(ref.config).eval()
    fresh.load_state_dict({k: torch.tensor(v) for k, v in export_clip_text_state(model, "").items()})
    ids = torch.from_numpy(random_ids(1, 12, seed=6)).long()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).last_hidden_state, ref(ids).last_hidden_state, rtol=0, atol=0)


def test_bad_state_dicts_are_refused():
    ref, model = build_pair(seed=7)
    state = torch_state(ref)
    with pytest.raises(ConversionError, match="both with and without"):
        load_clip_text_state(
            model, {**state, "text_model.final_layer_norm.bias": state["final_layer_norm.bias"]}, "x"
        )
    with pytest.raises(ConversionError, match="unexpected keys.*text_projection"):
        load_clip_text_state(model, {**state, "text_projection.weight": np.zeros((16, 32), np.float32)}, "x")
    missing = dict(state)
    missing.pop("encoder.layers.2.mlp.fc2.bias")
    with pytest.raises(ConversionError, match="missing keys.*fc2.bias"):
        load_clip_text_state(model, missing, "x")


def test_config_round_trips():
    sd15 = CLIPTextConfig()
    assert CLIPTextConfig.from_dict(sd15.to_dict()) == sd15
    cfg = transformers.CLIPTextConfig(**sd15.to_transformers())
    assert CLIPTextConfig.from_transformers(cfg.to_dict()) == sd15
    assert sd15.to_transformers()["architectures"] == ["CLIPTextModel"]
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")


def test_bad_inputs_are_refused():
    _, model = build_pair()
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(jnp.zeros((77,), jnp.int32))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((1, 5), jnp.float32))
