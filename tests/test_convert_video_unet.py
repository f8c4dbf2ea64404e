"""`convert xdyna-unet` and `convert animatediff`: the release's layout lands where the equations say,
init + checkpoint merging, versions, exact export round trips, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import MotionAdapter
from flax import nnx
from oracle import TINY_UNET, perturb_, torch_state
from safetensors.numpy import load_file

import xdyna_jax
from convert.animatediff import convert_animatediff, export_motion_modules
from convert.animatediff_keys import diffusers_motion_to_original
from convert.io import ConversionError
from convert.state import export_torch_state
from convert.video_unet import with_pe_buffers
from convert.xdyna_unet import convert_xdyna_unet, export_xdyna_unet
from xdyna_jax.models.unet import UNet, UNetConfig

# SD 1.5's block structure (what the converter reads a release file as) at 1/10 width.
XDYNA = UNetConfig(
    block_out_channels=(32, 64, 128, 128),
    cross_attention_dim=32,
    dynamics_adapter=True,
    ip_adapter_tokens=16,
    motion_modules=True,
    motion_max_len=24,
    groupnorm_over_frames=True,
    skip_reference_frame=True,
)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny checkpoint with the release's key names, shapes (pe buffers) and wrappers (state_dict, module.)."""
    root = tmp_path_factory.mktemp("xdyna")
    model = UNet(XDYNA, rngs=nnx.Rngs(0))
    state = with_pe_buffers(model, export_torch_state(model))
    rng = np.random.default_rng(0)
    state = {
        k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) if "pe" not in k else v
        for k, v in state.items()
    }  # no zero-init to_out_ff / proj_out may hide a misplaced key
    wrapped = {"state_dict": {"module." + k: torch.from_numpy(v) for k, v in state.items()}, "epoch": 5}
    torch.save(wrapped, root / "unet-checkpoint-epoch-5.ckpt")
    return root, state


def test_release_keys_land_where_the_equations_say(release):
    root, state = release
    out = convert_xdyna_unet(root / "unet-checkpoint-epoch-5.ckpt", root / "out")
    model = xdyna_jax.load(out / "unet")
    cfg = model.config
    assert (cfg.dynamics_adapter, cfg.ip_adapter_tokens, cfg.motion_modules, cfg.motion_max_len) == (
        True,
        16,
        True,
        24,
    )
    assert cfg.groupnorm_over_frames and cfg.skip_reference_frame and not cfg.motion_mid_block
    block = model.down_blocks[1].attentions[0].transformer_blocks[0]
    prefix = "down_blocks.1.attentions.0.transformer_blocks.0."
    np.testing.assert_array_equal(block.attn1.to_q_ff.kernel[...], state[prefix + "attn1.to_q_ff.weight"].T)
    np.testing.assert_array_equal(block.attn1.to_out_ff.bias[...], state[prefix + "attn1.to_out_ff.bias"])
    np.testing.assert_array_equal(block.attn2.to_k_ip.kernel[...], state[prefix + "attn2.to_k_ip.weight"].T)
    mm = model.up_blocks[3].motion_modules[2].temporal_transformer
    key = "up_blocks.3.motion_modules.2.temporal_transformer."
    np.testing.assert_array_equal(
        mm.transformer_blocks[0].attention_blocks[1].to_q.kernel[...],
        state[key + "transformer_blocks.0.attention_blocks.1.to_q.weight"].T,
    )
    np.testing.assert_array_equal(
        mm.transformer_blocks[0].norms[1].scale[...], state[key + "transformer_blocks.0.norms.1.weight"]
    )
    conv = state["down_blocks.0.resnets.0.conv1.weight"]
    np.testing.assert_array_equal(
        model.down_blocks[0].resnets[0].conv1.kernel[...], conv.transpose(2, 3, 1, 0)
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["ignored_keys"]) == 2 * 20  # two pe buffers per motion module, 20 modules in v1


def test_export_round_trip_is_exact(release, tmp_path):
    root, state = release
    out = (
        root / "out"
        if (root / "out").exists()
        else convert_xdyna_unet(root / "unet-checkpoint-epoch-5.ckpt", root / "out")
    )
    for name in ("back.safetensors", "back.ckpt"):
        export_xdyna_unet(out / "unet", tmp_path / name)
    back = load_file(str(tmp_path / "back.safetensors"))
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    ckpt = torch.load(tmp_path / "back.ckpt", weights_only=True)
    np.testing.assert_array_equal(ckpt["conv_in.weight"].numpy(), state["conv_in.weight"])


def test_init_file_is_overridden_by_checkpoint(release, tmp_path):
    _, state = release
    ckpt = {k: v for k, v in state.items() if "_ff." in k}
    ckpt.pop("mid_block.attentions.0.transformer_blocks.0.attn1.to_q_ff.weight")  # comes from to_q instead
    ckpt["conv_in.bias"] = state["conv_in.bias"] + 1
    init = {k: v for k, v in state.items() if "_ff." not in k}
    torch.save({k: torch.from_numpy(v) for k, v in ckpt.items()}, tmp_path / "trained.ckpt")
    torch.save({k: torch.from_numpy(v) for k, v in init.items()}, tmp_path / "init.pth")
    out = convert_xdyna_unet(tmp_path / "trained.ckpt", tmp_path / "out", init=tmp_path / "init.pth")
    model = xdyna_jax.load(out / "unet")
    np.testing.assert_array_equal(model.conv_in.bias[...], state["conv_in.bias"] + 1)
    attn1 = model.mid_block.attentions[0].transformer_blocks[0].attn1
    np.testing.assert_array_equal(attn1.to_q_ff.kernel[...], attn1.to_q.kernel[...])


def test_bad_inputs(release, tmp_path):
    _, state = release
    no_ip = {k: torch.from_numpy(v) for k, v in state.items() if "_ip." not in k}
    torch.save(no_ip, tmp_path / "no_ip.ckpt")
    with pytest.raises(ConversionError, match="no IP-Adapter weights"):
        convert_xdyna_unet(tmp_path / "no_ip.ckpt", tmp_path / "a")
    with pytest.raises(ConversionError, match="--version v3 given, but the weights are AnimateDiff v1"):
        convert_xdyna_unet(tmp_path / "no_ip.ckpt", tmp_path / "b", version="v3", ip_tokens=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    out = convert_xdyna_unet(tmp_path / "no_ip.ckpt", tmp_path / "c", ip_tokens=0)
    model = xdyna_jax.load(out / "unet")
    graph, params = nnx.split(model)
    call = lambda p, x: nnx.merge(graph, p)(x, jnp.array([1]), jnp.zeros((1, 77, 32)))
    jax.eval_shape(
        call, params, jax.ShapeDtypeStruct((1, 25, 8, 8, 4), jnp.float32)
    )  # 1 reference + 24 frames
    with pytest.raises(ValueError, match="max_len=24"):
        jax.eval_shape(call, params, jax.ShapeDtypeStruct((1, 26, 8, 8, 4), jnp.float32))


TINY_2D = UNetConfig(**TINY_UNET)


@pytest.fixture(scope="module")
def animatediff(tmp_path_factory):
    root = tmp_path_factory.mktemp("ad")
    xdyna_jax.save(UNet(TINY_2D, rngs=nnx.Rngs(1)), root / "sd15_unet")
    torch.manual_seed(0)
    adapter = MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_norm_num_groups=8,
        motion_num_attention_heads=8,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    )
    perturb_(adapter)
    adapter.save_pretrained(root / "adapter")
    return root, torch_state(adapter)


def test_animatediff_folder_and_original_file_agree(animatediff, tmp_path):
    root, adapter_state = animatediff
    from_folder = convert_animatediff(root / "adapter", root / "sd15_unet", tmp_path / "a")
    original = diffusers_motion_to_original(adapter_state)
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in original.items()}}, tmp_path / "mm_v2.ckpt")
    from_file = convert_animatediff(tmp_path / "mm_v2.ckpt", root / "sd15_unet", tmp_path / "b")
    a, b = (export_torch_state(xdyna_jax.load(p / "unet")) for p in (from_folder, from_file))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    cfg = xdyna_jax.load(from_file / "unet").config
    assert cfg.motion_mid_block and cfg.motion_max_len == 32 and not cfg.groupnorm_over_frames
    export_motion_modules(from_file / "unet", tmp_path / "mm.safetensors")
    back = load_file(str(tmp_path / "mm.safetensors"))
    assert sorted(back) == sorted(original)
    for k, v in original.items():
        if k.endswith(".pe"):  # a recomputed buffer, not a weight: equal up to float32 rounding
            np.testing.assert_allclose(back[k], v, atol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(back[k], v, err_msg=k)
    export_motion_modules(from_file / "unet", tmp_path / "adapter_out", layout="diffusers")
    reloaded = torch_state(MotionAdapter.from_pretrained(tmp_path / "adapter_out"))
    for k, v in adapter_state.items():
        np.testing.assert_allclose(reloaded[k], v, rtol=0, atol=1e-6 if k.endswith(".pe") else 0, err_msg=k)


def test_animatediff_bad_inputs(animatediff, tmp_path):
    root, adapter_state = animatediff
    with pytest.raises(ConversionError, match="--version v3 given, but the weights are AnimateDiff v2"):
        convert_animatediff(root / "adapter", root / "sd15_unet", tmp_path / "x", version="v3")
    torch.save({"conv_in.weight": torch.zeros(3)}, tmp_path / "not_mm.ckpt")
    with pytest.raises(ConversionError, match="not an AnimateDiff motion-module file"):
        convert_animatediff(tmp_path / "not_mm.ckpt", root / "sd15_unet", tmp_path / "y")
    with pytest.raises(ConversionError, match="--unet"):
        convert_animatediff(root / "adapter", tmp_path, tmp_path / "z")
