"""`convert sd15` and `convert export`: both source layouts, exact round trips, and bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import DDIMScheduler
from diffusers import UNet2DConditionModel as TorchUNet
from oracle import TINY_CLIP, TINY_SD_UNET, TINY_VAE, make_models, torch_state, write_diffusers_folder
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextModel as TorchCLIP

import xdyna_jax
from convert import ldm_keys
from convert.__main__ import main as cli
from convert.clip_text import export_clip_text_state
from convert.export import export
from convert.io import ConversionError
from convert.sd15 import convert_sd15
from convert.state import export_torch_state

# SD 1.5's structure at 1/10 width: what a single file without --config-from is read as.
NARROW_UNET = dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64, sample_size=8)
NARROW_VAE = dict(
    block_out_channels=(32, 64, 128, 128),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
)
NARROW_CLIP = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=1,
    num_hidden_layers=2,
    vocab_size=1000,
    max_position_embeddings=77,
)


def single_file_state(models, n_blocks, attention_blocks, layers_per_block):
    unet, vae, clip = (torch_state(m) for m in models)
    sd = {}
    sd.update(
        {
            ldm_keys.UNET_PREFIX + k: v
            for k, v in ldm_keys.diffusers_unet_to_ldm(
                unet, layers_per_block=layers_per_block, n_blocks=n_blocks, attention_blocks=attention_blocks
            ).items()
        }
    )
    sd.update({ldm_keys.VAE_PREFIX + k: v for k, v in ldm_keys.diffusers_vae_to_ldm(vae).items()})
    sd.update({ldm_keys.CLIP_PREFIX + k: v for k, v in ldm_keys.diffusers_clip_to_ldm(clip).items()})
    return sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    models = make_models(TINY_SD_UNET, TINY_VAE, TINY_CLIP)
    folder = write_diffusers_folder(root / "diffusers", models)
    converted = convert_sd15(folder, root / "converted", progress=False)
    states = {name: torch_state(m) for name, m in zip(("unet", "vae", "text_encoder"), models, strict=True)}
    return {"root": root, "folder": folder, "converted": converted, "states": states, "models": models}


def bundle_states(folder):
    return {
        "unet": export_torch_state(xdyna_jax.load(folder / "unet")),
        "vae": export_torch_state(xdyna_jax.load(folder / "vae")),
        "text_encoder": export_clip_text_state(xdyna_jax.load(folder / "text_encoder"), prefix=""),
    }


def assert_states_equal(got, expected):
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def test_diffusers_folder_converts_exactly(tiny):
    got = bundle_states(tiny["converted"])
    for part in ("unet", "vae", "text_encoder"):
        expected = {k: v for k, v in tiny["states"][part].items() if not k.endswith("position_ids")}
        assert_states_equal(got[part], expected)
    manifest = json.loads((tiny["converted"] / "manifest.json").read_text())
    assert manifest["parts"]["unet"]["file"].endswith("diffusion_pytorch_model.safetensors")
    assert (tiny["converted"] / "tokenizer" / "vocab.json").is_file()
    sched = json.loads((tiny["converted"] / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "linear" and sched["steps_offset"] == 1


def test_fp16_bin_folder_is_upcast(tiny, tmp_path):
    folder = shutil.copytree(tiny["folder"], tmp_path / "fp16")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    half = {k: torch.from_numpy(v).half() for k, v in tiny["states"]["unet"].items()}
    torch.save(half, folder / "unet" / "diffusion_pytorch_model.bin")
    out = convert_sd15(folder, tmp_path / "out", progress=False)
    got = export_torch_state(xdyna_jax.load(out / "unet"))
    assert_states_equal(got, {k: v.float().numpy() for k, v in half.items()})


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_matches_folder(tiny, tmp_path, fmt):
    sd = single_file_state(tiny["models"], 2, (True, False), 1)
    # what real single files carry besides the weights: schedule buffers, EMA copies, CLIP position ids
    sd["betas"] = np.linspace(0, 1, 10, dtype=np.float32)
    sd["model_ema.decay"] = np.array(0.9999, dtype=np.float32)
    sd[ldm_keys.CLIP_PREFIX + "text_model.embeddings.position_ids"] = np.arange(77)[None]
    path = tmp_path / f"model.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(
            {"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, "global_step": 1},
            path,
        )
    out = convert_sd15(
        path,
        tmp_path / "out",
        config_from=tiny["folder"],
        tokenizer=tiny["folder"] / "tokenizer",
        progress=False,
    )
    got, expected = bundle_states(out), bundle_states(tiny["converted"])
    for part in expected:
        assert_states_equal(got[part], expected[part])
    ignored = json.loads((out / "manifest.json").read_text())["parts"]["unet"]["ignored_keys"]
    assert "betas" in ignored and "model_ema.decay" in ignored


def test_sd15_shaped_single_file_round_trips_exactly(tmp_path):
    models = make_models(NARROW_UNET, NARROW_VAE, NARROW_CLIP, seed=5)
    sd = single_file_state(models, 4, (True, True, True, False), 2)
    save_file(sd, str(tmp_path / "sd15.safetensors"))
    out = convert_sd15(tmp_path / "sd15.safetensors", tmp_path / "out", progress=False)
    assert xdyna_jax.load(out / "unet").config.block_out_channels == (32, 64, 128, 128)
    export(out, tmp_path / "back.safetensors", "single-file")
    assert_states_equal(load_file(str(tmp_path / "back.safetensors")), sd)


def test_export_diffusers_loads_in_diffusers_bit_exact(tiny, tmp_path):
    out = export(tiny["converted"], tmp_path / "exported", "diffusers")
    assert_states_equal(torch_state(TorchUNet.from_pretrained(out / "unet")), tiny["states"]["unet"])
    assert_states_equal(torch_state(TorchVAE.from_pretrained(out / "vae")), tiny["states"]["vae"])
    clip = torch_state(TorchCLIP.from_pretrained(out / "text_encoder"))
    assert_states_equal(clip, tiny["states"]["text_encoder"])
    index = json.loads((out / "model_index.json").read_text())
    assert (
        index["unet"] == ["diffusers", "UNet2DConditionModel"]
        and (out / "tokenizer" / "merges.txt").is_file()
    )
    DDIMScheduler.from_pretrained(out / "scheduler")


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temp dir left behind"


def test_missing_input(tmp_path):
    with pytest.raises(ConversionError, match="nope"):
        convert_sd15(tmp_path / "nope", tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_folder_missing_component(tiny, tmp_path):
    folder = shutil.copytree(tiny["folder"], tmp_path / "src")
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(ConversionError, match="text_encoder"):
        convert_sd15(folder, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_checkpoint_of_another_kind(tiny, tmp_path):
    path = tmp_path / "vae_only.safetensors"
    save_file(
        {ldm_keys.VAE_PREFIX + k: v for k, v in ldm_keys.diffusers_vae_to_ldm(tiny["states"]["vae"]).items()},
        str(path),
    )
    with pytest.raises(ConversionError, match="vae_only|diffusion_model"):
        convert_sd15(path, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_truncated_file(tiny, tmp_path):
    folder = shutil.copytree(tiny["folder"], tmp_path / "src")
    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ConversionError, match="diffusion_pytorch_model.safetensors"):
        convert_sd15(folder, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_mis_shaped_tensor_names_key_and_shapes(tiny, tmp_path):
    folder = shutil.copytree(tiny["folder"], tmp_path / "src")
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["decoder.conv_in.weight"] = sd["decoder.conv_in.weight"][:, :, :1, :1].copy()
    save_file(sd, str(f))
    with pytest.raises(ConversionError, match=r"decoder\.conv_in\.weight.*\(16, 4, 1, 1\)"):
        convert_sd15(folder, tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path / "out")


def test_unexpected_and_missing_keys_listed(tiny, tmp_path):
    folder = shutil.copytree(tiny["folder"], tmp_path / "src")
    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["extra.weight"] = np.zeros(3, np.float32)
    del sd["conv_out.bias"]
    save_file(sd, str(f))
    with pytest.raises(
        ConversionError,
        match=r"(?s)missing keys: 1 key\(s\): conv_out\.bias.*unexpected keys: 1 key\(s\): extra",
    ):
        convert_sd15(folder, tmp_path / "out", progress=False)


def test_cli_reports_errors_and_refuses_existing_output(tiny, tmp_path, capsys):
    assert cli(["sd15", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli(["sd15", "--input", str(tiny["folder"]), "--output", str(tiny["converted"])]) == 2
    assert "exists" in capsys.readouterr().err
