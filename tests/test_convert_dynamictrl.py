"""`convert dynamictrl` / `convert cogvideox` on tiny fake release folders (the release's names, shards and
index.json, written here by the real PyTorch classes in bf16): every key lands on a parameter bit for bit,
the Mask variant replaces the transformer, `--dtype fp32` widens exactly, export gives the files' state dicts
back exactly, and each broken input is one clear error with nothing written."""

import json
import shutil

import numpy as np
import pytest
from oracle_cogvideox import TINY_COGVIDEOX_10_I2V, TINY_COGVIDEOX_15
from oracle_dynamictrl_release import make_transformer, saved_state, write_mask_variant, write_release
from safetensors.numpy import save_file

from convert.__main__ import main as cli
from convert.cogvideox import convert_cogvideox
from convert.cogvideox_folder import (
    bundle_state,
    export_bundle,
    export_pipeline_folder,
    fill,
    part_specs,
    plan_part,
)
from convert.dynamictrl import convert_dynamictrl
from convert.io import ConversionError, find_safetensors_weights
from xdyna_jax.bundle import read_meta
from xdyna_jax.sampling.bundles import DynamiCtrl, load_pipeline

PARTS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamictrl")
    states = write_release(root / "DynamiCtrl", control=True)
    mask = write_mask_variant(root / "Dynamictrl-Mask_C01")
    out = root / "bundle"
    assert cli(["dynamictrl", "--input", str(root / "DynamiCtrl"), "--output", str(out)]) == 0
    return root, states, mask, out


def assert_same_state(got: dict, expected: dict, what: str) -> None:
    """Same keys, dtypes and bytes."""
    assert sorted(got) == sorted(expected), what
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, f"{what} {key}: {got[key].dtype} vs {value.dtype}"
        assert got[key].shape == value.shape, f"{what} {key}"
        assert np.array_equal(got[key].view(np.uint8), value.view(np.uint8)), f"{what} {key}"


def file_state(folder, stem) -> dict:
    return dict(find_safetensors_weights(folder, stem).tensors())


def pipeline_variant(tmp_path, release_folder, **replaced):
    """A pipeline folder linking to release_folder's parts except those in `replaced` (name -> folder)."""
    folder = tmp_path / "variant"
    folder.mkdir()
    for item in release_folder.iterdir():
        target = replaced.get(item.name, item)
        if target is not None:
            (folder / item.name).symlink_to(target)
    return folder


def copied(src, dst):
    shutil.copytree(src, dst, symlinks=False)
    return dst


def test_bundle_holds_the_release_weights_bit_for_bit(release):
    _, states, _, out = release
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "dynamictrl" and manifest["param_dtype"] == "bfloat16"
    assert read_meta(out / "transformer")["kind"] == "dynamictrl_transformer"
    for name in PARTS:
        assert read_meta(out / name)["param_dtype"] == "bfloat16"
        assert manifest["parts"][name]["ignored_keys"] == []
        assert_same_state(bundle_state(out / name), states[name], name)  # every file key, as stored
    assert len(manifest["parts"]["transformer"]["files"]) > 1  # the fake's transformer is sharded
    assert len(manifest["parts"]["text_encoder"]["files"]) > 1
    assert (out / "tokenizer" / "spiece.model").is_file()

    pipe = load_pipeline(out)
    assert isinstance(pipe, DynamiCtrl)
    block = pipe.transformer.transformer_blocks[0]
    assert block.control_norm1.linear.kernel[...].dtype == np.dtype("bfloat16")
    assert pipe.vae.encoder.conv_in.conv.kernel[...].dtype == np.dtype("bfloat16")
    ids, _ = pipe.tokenizer(["a dancer raises both arms"])
    assert ids.shape == (1, 226)
    assert (
        pipe.scheduler.prediction_type == "v_prediction" and pipe.scheduler_class == "CogVideoXDDIMScheduler"
    )


def test_export_gives_the_release_files_back(release, tmp_path):
    root, states, _, out = release
    back = export_pipeline_folder(out, tmp_path / "exported", max_shard="24KB")
    for name, stem in PARTS.items():
        assert_same_state(file_state(back / name, stem), states[name], name)
        source = json.loads((root / "DynamiCtrl" / name / "config.json").read_text())
        assert json.loads((back / name / "config.json").read_text()) == source
    assert (back / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert json.loads((back / "model_index.json").read_text()) == json.loads(
        (root / "DynamiCtrl" / "model_index.json").read_text()
    )
    # transformers re-ties the embedding: the exported text encoder loads as the original did
    from transformers import T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(back / "text_encoder")
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()


def test_mask_variant_replaces_the_transformer_and_fp32_widens_exactly(release, tmp_path):
    root, states, mask, _ = release
    out = convert_dynamictrl(
        root / "DynamiCtrl",
        tmp_path / "mask",
        transformer=root / "Dynamictrl-Mask_C01",
        dtype="fp32",
        progress=False,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["param_dtype"] == "float32"
    assert all(str(root / "Dynamictrl-Mask_C01") in f for f in manifest["parts"]["transformer"]["files"])
    widened = {k: v.astype(np.float32) for k, v in mask.items()}
    assert read_meta(out / "transformer")["param_dtype"] == "float32"
    assert_same_state(bundle_state(out / "transformer"), widened, "mask transformer")
    assert_same_state(
        bundle_state(out / "vae"), {k: v.astype(np.float32) for k, v in states["vae"].items()}, "vae"
    )


def test_stock_cogvideox_folder(release, tmp_path):
    """`convert cogvideox` on a 1.0-I2V-style transformer (its learned position table is a stored key)."""
    root, _, _, _ = release
    stock = make_transformer(TINY_COGVIDEOX_10_I2V, control=False, seed=20)
    stock.save_pretrained(tmp_path / "stock_transformer", max_shard_size="24KB")
    folder = pipeline_variant(tmp_path, root / "DynamiCtrl", transformer=tmp_path / "stock_transformer")
    out = convert_cogvideox(folder, tmp_path / "cogvideox", progress=False)
    assert json.loads((out / "manifest.json").read_text())["kind"] == "cogvideox"
    expected = saved_state(stock)
    assert "patch_embed.pos_embedding" in expected
    assert_same_state(bundle_state(out / "transformer"), expected, "stock transformer")
    export_bundle(out / "transformer", tmp_path / "one")  # a single model bundle exports on its own
    assert_same_state(file_state(tmp_path / "one", PARTS["transformer"]), expected, "exported")

    # ... and the other way round: a DynamiCtrl transformer is not a stock one
    with pytest.raises(ConversionError, match=r"control_norm1.*convert dynamictrl"):
        convert_cogvideox(root / "DynamiCtrl", tmp_path / "wrong", progress=False)
    assert not (tmp_path / "wrong").exists()


def test_stock_transformer_given_to_convert_dynamictrl(release, tmp_path):
    root = release[0]
    make_transformer(TINY_COGVIDEOX_15, control=False).save_pretrained(tmp_path / "stock")
    with pytest.raises(ConversionError) as e:
        convert_dynamictrl(
            root / "DynamiCtrl", tmp_path / "out", transformer=tmp_path / "stock", progress=False
        )
    message = str(e.value)
    assert (
        "control_norm1 (Pose-adaptive LayerNorm) keys are missing" in message
        and "convert cogvideox" in message
    )
    assert "transformer_blocks.0.control_norm1.linear.weight" in message
    assert not (tmp_path / "out").exists()


def _shards(folder):
    return sorted(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))


def _break_missing_shard(folder):
    last = _shards(folder)[-1]
    last.unlink()
    return f"no such file: .*{last.name}"


def _break_index_names_missing_file(folder):
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    index["weight_map"]["proj_out.weight"] = "elsewhere.safetensors"
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return r"no such file: .*elsewhere.safetensors \(a shard listed in .*index.json for 1 tensor\(s\): proj_out.weight"


def _break_truncated(folder):
    shard = _shards(folder)[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    return f"cannot read .*{shard.name}: it is truncated"


def _break_shape(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "text_embed_dim": 64}))
    return r"mis-shaped keys: 1 key\(s\): patch_embed.text_proj.weight: file \(32, 32\) vs model \(32, 64\)"


@pytest.mark.parametrize(
    "breaker", [_break_missing_shard, _break_index_names_missing_file, _break_truncated, _break_shape]
)
def test_broken_transformer_is_one_clear_error(release, tmp_path, breaker):
    root = release[0]
    folder = copied(root / "DynamiCtrl" / "transformer", tmp_path / "transformer")
    message = breaker(folder)
    with pytest.raises(ConversionError, match=message):
        convert_dynamictrl(root / "DynamiCtrl", tmp_path / "out", transformer=folder, progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["transformer"]  # no temp folder left either


def test_missing_part_folder(release, tmp_path):
    folder = pipeline_variant(tmp_path, release[0] / "DynamiCtrl", vae=None)
    with pytest.raises(ConversionError, match=r"missing part folder .*variant/vae"):
        convert_dynamictrl(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tied_t5_embedding(release, tmp_path):
    """A text encoder file that also stores encoder.embed_tokens.weight: accepted when equal, refused when not."""
    root, states, _, _ = release
    t5 = dict(states["text_encoder"])
    spec = part_specs("dynamictrl")["text_encoder"]
    for name, table in (("equal", t5["shared.weight"]), ("different", t5["shared.weight"] * 2)):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(root / "DynamiCtrl" / "text_encoder" / "config.json", folder)
        save_file({**t5, "encoder.embed_tokens.weight": table}, str(folder / "model.safetensors"))
        if name == "equal":
            plan = plan_part("text_encoder", spec, folder)
            assert plan.aliases == {"encoder.embed_tokens.weight": "shared.weight"}
            model = fill(plan, "bfloat16")
            np.testing.assert_array_equal(
                model.shared.embedding[...].view(np.uint16), t5["shared.weight"].view(np.uint16)
            )
        else:
            with pytest.raises(
                ConversionError, match="encoder.embed_tokens.weight and shared.weight are tied"
            ):
                plan_part("text_encoder", spec, folder)
