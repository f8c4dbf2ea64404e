"""`convert controlnet`: every source layout gives the same parameters; exports round-trip bit-exactly;
bad input fails with one clear error and writes nothing."""

import json

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from oracle import perturb_, torch_state
from safetensors.numpy import load_file, save_file

import xdyna_jax
from convert.__main__ import main as cli
from convert.controlnet import convert_controlnet
from convert.controlnet_keys import CONTROL_PREFIX, diffusers_to_original
from convert.state import export_torch_state
from xdyna_jax.models.controlnet import ControlNetConfig

# 2 blocks, 2 layers: 6 zero convs; 6-channel condition like X-Dyna's S-Face ControlNet.
TINY = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=16,
    attention_head_dim=2,
    conditioning_channels=6,
    conditioning_embedding_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
)
# SD 1.5's structure (4 blocks, input_blocks 1..11, input_hint_block 0..14) at 1/10 width: what a file
# without --config-from is read as.
NARROW = dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64, conditioning_channels=6)


def make(kwargs, seed=0):
    torch.manual_seed(seed)
    model = TorchControlNet(**kwargs)
    perturb_(model, seed)
    return model


def original(state, kwargs, prefix=CONTROL_PREFIX):
    """The original lllyasviel layout of a diffusers state dict, by our reverse mapping."""
    cfg = ControlNetConfig(**kwargs)
    return {prefix + k: v for k, v in diffusers_to_original(state, cfg).items()}


def bundle_state(path):
    return export_torch_state(xdyna_jax.load(path))


def assert_states_equal(got, expected):
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn")
    model = make(TINY)
    model.save_pretrained(root / "diffusers")
    converted = convert_controlnet(root / "diffusers", root / "converted")
    return {"root": root, "folder": root / "diffusers", "converted": converted, "state": torch_state(model)}


@pytest.fixture(scope="module")
def narrow():
    model = make(NARROW, seed=3)
    return {"state": torch_state(model), "config": ControlNetConfig.from_diffusers(dict(model.config))}


def test_diffusers_folder_converts_exactly(tiny):
    assert_states_equal(bundle_state(tiny["converted"]), tiny["state"])
    assert xdyna_jax.load(tiny["converted"]).config == ControlNetConfig(**TINY)
    assert manifest(tiny["converted"])["layout"] == "diffusers-folder"


def test_our_original_layout_matches_diffusers_converter(tiny, narrow):
    """diffusers' own original -> diffusers conversion must invert our diffusers -> original mapping."""
    sd = original(narrow["state"], NARROW)
    assert_states_equal(convert_controlnet_checkpoint(sd, {"layers_per_block": 2}), narrow["state"])
    # diffusers hard-codes SD's four embedding stages (conv_out = input_hint_block.14), so for the tiny
    # two-stage embedding only the encoder and zero convs can be cross-checked
    back = convert_controlnet_checkpoint(original(tiny["state"], TINY), {"layers_per_block": 2})
    keep = lambda d: {k: v for k, v in d.items() if not k.startswith("controlnet_cond_embedding.")}
    assert_states_equal(keep(back), keep(tiny["state"]))


@pytest.mark.parametrize("prefix", [CONTROL_PREFIX, ""], ids=["control_model", "stripped"])
def test_original_file_gives_same_params(tiny, tmp_path, prefix):
    path = tmp_path / "control_v11p_tiny.pth"
    torch.save({k: torch.from_numpy(v) for k, v in original(tiny["state"], TINY, prefix).items()}, path)
    out = convert_controlnet(path, tmp_path / "out", config_from=tiny["folder"])
    assert_states_equal(bundle_state(out), bundle_state(tiny["converted"]))
    assert manifest(out)["layout"] == "original"


def test_v10_full_file_ignores_sd_parts(tiny, tmp_path):
    sd = original(tiny["state"], TINY)
    extra = {
        "model.diffusion_model.input_blocks.0.0.weight": np.ones((32, 4, 3, 3), np.float32),
        "model.diffusion_model.out.2.bias": np.ones(4, np.float32),
        "first_stage_model.encoder.conv_in.weight": np.ones((8, 3, 3, 3), np.float32),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(16, np.float32),
        "betas": np.linspace(0, 1, 10, dtype=np.float32),
    }
    save_file({**sd, **extra}, str(tmp_path / "control_sd15_tiny.safetensors"))
    out = convert_controlnet(
        tmp_path / "control_sd15_tiny.safetensors", tmp_path / "out", config_from=tiny["folder"]
    )
    assert_states_equal(bundle_state(out), tiny["state"])
    assert manifest(out)["layout"] == "original-full"
    assert manifest(out)["ignored_keys"] == sorted(extra)


def test_xdyna_ckpt_with_wrapper_and_module_prefix(narrow, tmp_path):
    """controlnet-face-checkpoint-epoch-2.ckpt: diffusers names, DDP prefix, wrapper, no config."""
    wrapped = {"module." + k: torch.from_numpy(v) for k, v in narrow["state"].items()}
    path = tmp_path / "controlnet-face-checkpoint-epoch-2.ckpt"
    torch.save({"state_dict": wrapped, "epoch": 2}, path)
    out = convert_controlnet(path, tmp_path / "out")
    assert_states_equal(bundle_state(out), narrow["state"])
    cfg = xdyna_jax.load(out).config
    assert cfg == narrow["config"] and cfg.conditioning_channels == 6  # read off the tensors
    assert manifest(out)["layout"] == "diffusers-file"


def test_sd15_shaped_original_round_trips_exactly(narrow, tmp_path):
    """No --config-from: SD 1.5 structure; export back to the original layout gives the same file."""
    sd = original(narrow["state"], NARROW)
    save_file(sd, str(tmp_path / "control.safetensors"))
    out = convert_controlnet(tmp_path / "control.safetensors", tmp_path / "out")
    assert xdyna_jax.load(out).config == narrow["config"]
    assert_states_equal(bundle_state(out), narrow["state"])
    assert (
        cli(
            [
                "controlnet",
                "--export",
                "original",
                "--input",
                str(out),
                "--output",
                str(tmp_path / "b.safetensors"),
            ]
        )
        == 0
    )
    assert_states_equal(load_file(str(tmp_path / "b.safetensors")), sd)


@pytest.mark.parametrize("command", ["export", "controlnet"])
def test_export_diffusers_loads_in_diffusers_bit_exact(tiny, tmp_path, command):
    args = [command, "--input", str(tiny["converted"]), "--output", str(tmp_path / "exported")]
    assert cli(args + (["--export", "diffusers"] if command == "controlnet" else [])) == 0
    assert_states_equal(torch_state(TorchControlNet.from_pretrained(tmp_path / "exported")), tiny["state"])


def _fails(capsys, tmp_path, *args):
    before = set(tmp_path.iterdir())
    assert cli(["controlnet", "--output", str(tmp_path / "out"), "--input", *map(str, args)]) == 2
    assert set(tmp_path.iterdir()) == before  # no output, no temp folder left behind
    return capsys.readouterr().err


def test_unet_file_is_refused_clearly(tmp_path, capsys):
    torch.manual_seed(0)
    unet = TorchUNet(
        block_out_channels=(32, 64),
        norm_num_groups=8,
        cross_attention_dim=16,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    save_file(torch_state(unet), str(tmp_path / "unet.safetensors"))
    err = _fails(capsys, tmp_path, tmp_path / "unet.safetensors")
    assert "not a ControlNet checkpoint" in err and "UNet" in err and err.count("error:") == 1


def test_mis_shaped_key_and_wrong_condition_channels(tiny, tmp_path, capsys):
    state = dict(tiny["state"])
    state["controlnet_down_blocks.3.weight"] = state["controlnet_down_blocks.3.weight"][:, :-1]
    save_file(state, str(tmp_path / "bad.safetensors"))
    err = _fails(capsys, tmp_path, tmp_path / "bad.safetensors", "--config-from", tiny["folder"])
    assert "mis-shaped" in err and "controlnet_down_blocks.3.weight" in err
    # a 6-channel (S-Face) file with a 3-channel (pose) config
    pose_cfg = {**json.loads((tiny["folder"] / "config.json").read_text()), "conditioning_channels": 3}
    (tmp_path / "pose.json").write_text(json.dumps(pose_cfg))
    save_file(tiny["state"], str(tmp_path / "face.safetensors"))
    err = _fails(capsys, tmp_path, tmp_path / "face.safetensors", "--config-from", tmp_path / "pose.json")
    assert "controlnet_cond_embedding.conv_in.weight" in err and "(8, 6, 3, 3)" in err


def test_missing_input_and_non_sd15_file_without_config(tiny, tmp_path, capsys):
    assert "no such file" in _fails(capsys, tmp_path, tmp_path / "nope.ckpt")
    assert "--export" in _fails(capsys, tmp_path, tiny["converted"])  # a bundle is not a source
    # a 2-block file read as SD 1.5's 4-block structure: the hint says what to do
    save_file(original(tiny["state"], TINY), str(tmp_path / "tiny.safetensors"))
    assert "--config-from" in _fails(capsys, tmp_path, tmp_path / "tiny.safetensors")
