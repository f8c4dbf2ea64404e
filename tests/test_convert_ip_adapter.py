"""`convert ip-adapter`: attn2 order vs diffusers, conversion + exact .bin round trip, and bad input."""

import json

import numpy as np
import pytest
import torch
import transformers
from diffusers import UNet2DConditionModel as TorchUNet
from oracle import TINY_SD_UNET, diffusers_resampler, perturb_, to_original, torch_state
from safetensors.numpy import load_file, save_file

import xdyna_jax
from convert.__main__ import main as cli
from convert.io import ConversionError
from convert.ip_adapter import (
    convert_ip_adapter,
    export_ip_adapter,
    ip_adapter_attn2_names,
    processor_indices,
)
from convert.state import export_torch_state
from xdyna_jax.models.resampler import ResamplerConfig
from xdyna_jax.models.unet import UNetConfig

DEEP_UNET = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    transformer_layers_per_block=2,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=16,
    hidden_act="gelu",
)
# consistent with TINY_SD_UNET (cross_attention_dim 32) and TINY_VISION (hidden 32)
RESAMPLER = ResamplerConfig(
    dim=32, depth=4, dim_head=64, heads=2, num_queries=4, embedding_dim=32, output_dim=32, ff_mult=4
)


def diffusers_attn2_order(unet_kw):
    with torch.device("meta"):  # only the module tree is needed, no weights
        unet = TorchUNet(**unet_kw)
    keys = [k.removesuffix(".processor") for k in unet.attn_processors]
    assert all(k.endswith("attn1" if i % 2 == 0 else "attn2") for i, k in enumerate(keys)), "not alternating"
    return keys[1::2], unet


@pytest.mark.parametrize("unet_kw", [TINY_SD_UNET, DEEP_UNET, {}], ids=["tiny", "deep", "sd15"])
def test_attn2_names_follow_diffusers_attn_processors(unet_kw):
    expected, _ = diffusers_attn2_order(unet_kw)
    names = ip_adapter_attn2_names(UNetConfig(**unet_kw))
    assert names == expected
    assert processor_indices(reversed(names)) == {n: 2 * k + 1 for k, n in enumerate(names)}
    if not unet_kw:  # SD 1.5: 6 down, 9 up, then 1 mid -> keys 1..31
        assert len(names) == 16 and names[6].startswith("up_blocks.1.") and names[-1].startswith("mid_block.")


def make_ip_adapter(seed=0, dtype=torch.float32):
    """A fake ip-adapter-plus .bin for TINY_SD_UNET: the Resampler's original keys and odd-indexed to_k/v_ip."""
    image_proj = to_original(torch_state(diffusers_resampler(RESAMPLER, seed)))
    cfg = UNetConfig(**TINY_SD_UNET)
    rng = np.random.default_rng(seed)
    ip = {}
    for k, name in enumerate(ip_adapter_attn2_names(cfg)):
        ch = cfg.block_out_channels[-1] if name.startswith("mid") else cfg.block_out_channels[0]
        for p in ("to_k_ip", "to_v_ip"):
            ip[f"{2 * k + 1}.{p}.weight"] = rng.standard_normal((ch, 32)).astype(np.float32)

    def tensors(group):
        return {k: torch.from_numpy(v).to(dtype) for k, v in group.items()}

    return {"image_proj": tensors(image_proj), "ip_adapter": tensors(ip)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ip")
    torch.manual_seed(0)
    encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_VISION))
    perturb_(encoder, 3)
    encoder.save_pretrained(root / "image_encoder")
    # as IP-Adapter's image_encoder (transformers 4.x): fp16, with the position_ids buffer
    weights = root / "image_encoder" / "model.safetensors"
    state = {k: v.astype(np.float16) for k, v in load_file(str(weights)).items()}
    save_file({**state, "vision_model.embeddings.position_ids": np.arange(17)[None]}, str(weights))
    _, unet = diffusers_attn2_order(TINY_SD_UNET)
    unet.save_config(root / "unet")
    ckpt = make_ip_adapter()
    torch.save(ckpt, root / "ip-adapter-plus.bin")
    out = convert_ip_adapter(
        root / "ip-adapter-plus.bin",
        root / "out",
        image_encoder=root / "image_encoder",
        unet_config=root / "unet",
    )
    encoder_state = {k: v.astype(np.float32) for k, v in state.items()}
    return {"root": root, "out": out, "ckpt": ckpt, "encoder": encoder_state}


def assert_groups_equal(got, expected):
    assert sorted(got) == sorted(expected)
    for group in expected:
        assert sorted(got[group]) == sorted(expected[group]), group
        for k, v in expected[group].items():
            assert got[group][k].dtype == v.dtype, k
            assert torch.equal(got[group][k], v), f"{group}.{k}"


def test_converted_bundles_and_attention_file(tiny):
    out, ckpt = tiny["out"], tiny["ckpt"]
    resampler = xdyna_jax.load(out / "resampler", expected_kind="resampler")
    assert resampler.config.to_dict() == RESAMPLER.to_dict()
    image_proj = export_torch_state(resampler)
    assert sorted(image_proj) == sorted(ckpt["image_proj"])
    for k, v in ckpt["image_proj"].items():
        np.testing.assert_array_equal(image_proj[k], v.numpy(), err_msg=k)
    encoder = export_torch_state(xdyna_jax.load(out / "image_encoder", expected_kind="clip_vision"))
    assert sorted(encoder) == sorted(tiny["encoder"])
    for k, v in tiny["encoder"].items():
        np.testing.assert_array_equal(encoder[k], v, err_msg=k)

    attn = load_file(str(out / "ip_attention.safetensors"))
    names = ip_adapter_attn2_names(UNetConfig(**TINY_SD_UNET))
    assert sorted(attn) == sorted(f"{n}.{p}.weight" for n in names for p in ("to_k_ip", "to_v_ip"))
    mid = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v_ip.weight"
    np.testing.assert_array_equal(attn[mid], ckpt["ip_adapter"]["7.to_v_ip.weight"].numpy())
    info = json.loads((out / "ip_attention.json").read_text())
    assert info["num_tokens"] == 4 and info["processor_index"][names[1]] == 3


def test_export_round_trip_is_exact(tiny, tmp_path):
    back = export_ip_adapter(
        tiny["out"] / "resampler", tiny["out"] / "ip_attention.safetensors", tmp_path / "b.bin"
    )
    assert_groups_equal(torch.load(back, weights_only=True), tiny["ckpt"])


def test_fp16_source_round_trips_with_cli(tiny, tmp_path):
    ckpt = make_ip_adapter(seed=1, dtype=torch.float16)
    torch.save(ckpt, tmp_path / "half.bin")
    root = tiny["root"]
    args = ["ip-adapter", "--input", str(tmp_path / "half.bin"), "--output", str(tmp_path / "out")]
    assert (
        cli(args + ["--image-encoder", str(root / "image_encoder"), "--unet-config", str(root / "unet")]) == 0
    )
    back = export_ip_adapter(
        tmp_path / "out" / "resampler",
        tmp_path / "out" / "ip_attention.safetensors",
        tmp_path / "b.bin",
        dtype="float16",
    )
    assert_groups_equal(torch.load(back, weights_only=True), ckpt)


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temp dir left behind"


def convert_bad(tiny, tmp_path, ckpt, match, **kw):
    torch.save(ckpt, tmp_path / "bad.bin")
    kw = {"image_encoder": tiny["root"] / "image_encoder", "unet_config": tiny["root"] / "unet", **kw}
    with pytest.raises(ConversionError, match=match):
        convert_ip_adapter(tmp_path / "bad.bin", tmp_path / "out", **kw)
    assert_nothing_written(tmp_path / "out")


def test_other_ip_adapter_variants_are_refused(tiny, tmp_path):
    ckpt = make_ip_adapter()
    plain = {"image_proj": {"proj.weight": torch.zeros(128, 16), "norm.weight": torch.ones(32)}}
    plain["ip_adapter"] = ckpt["ip_adapter"]
    convert_bad(
        tiny, tmp_path, plain, r"no image_proj\.latents; plain IP-Adapter \(image_proj\.proj\.weight\)"
    )
    convert_bad(
        tiny, tmp_path, {"ip_adapter": ckpt["ip_adapter"]}, "not an IP-Adapter-plus checkpoint: no image_proj"
    )
    convert_bad(tiny, tmp_path, {"image_proj": ckpt["image_proj"]}, "no ip_adapter group")
    convert_bad(tiny, tmp_path, {"unet.weight": torch.zeros(2)}, "not an IP-Adapter checkpoint")


def test_mismatches_are_refused(tiny, tmp_path):
    ckpt = make_ip_adapter()
    # default UNet (SD 1.5) has 16 cross-attention layers, the file only 4
    convert_bad(
        tiny,
        tmp_path,
        ckpt,
        r"(?s)does not fit the UNet.*missing: \d+ key\(s\): ip_adapter\.9\.",
        unet_config=None,
    )
    bad = {"image_proj": ckpt["image_proj"], "ip_adapter": dict(ckpt["ip_adapter"])}
    bad["ip_adapter"]["3.to_k_ip.weight"] = torch.zeros(64, 32)
    convert_bad(tiny, tmp_path, bad, r"ip_adapter\.3\.to_k_ip\.weight .*\(64, 32\) vs UNet \(32, 32\)")
    bad = {
        "image_proj": ckpt["image_proj"],
        "ip_adapter": {**ckpt["ip_adapter"], "2.to_k_ip.weight": torch.zeros(1)},
    }
    convert_bad(tiny, tmp_path, bad, r"unexpected: 1 key\(s\): ip_adapter\.2\.to_k_ip")
    big = tiny["root"] / "big_encoder"
    transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**{**TINY_VISION, "hidden_size": 48})
    ).save_pretrained(big)
    convert_bad(tiny, tmp_path, ckpt, "hidden_size 48 does not match", image_encoder=big)
    convert_bad(tiny, tmp_path, ckpt, "clip_vision_model", image_encoder=tiny["root"] / "unet")


def test_export_refuses_wrong_inputs(tiny, tmp_path):
    out = tiny["out"]
    with pytest.raises(ConversionError, match="'clip_vision' bundle, expected 'resampler'"):
        export_ip_adapter(out / "image_encoder", out / "ip_attention.safetensors", tmp_path / "b.bin")
    attn = load_file(str(out / "ip_attention.safetensors"))
    save_file({**attn, "conv_in.weight": np.zeros(2, np.float32)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ConversionError, match="unexpected tensor 'conv_in.weight'"):
        export_ip_adapter(out / "resampler", tmp_path / "extra.safetensors", tmp_path / "b.bin")
    attn.pop("mid_block.attentions.0.transformer_blocks.0.attn2.to_k_ip.weight")
    save_file(attn, str(tmp_path / "half.safetensors"))
    with pytest.raises(ConversionError, match="without both to_k_ip and to_v_ip.*mid_block"):
        export_ip_adapter(out / "resampler", tmp_path / "half.safetensors", tmp_path / "b.bin")
    assert not (tmp_path / "b.bin").exists()
