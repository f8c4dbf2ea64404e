"""AnimateDiff key names (convert/animatediff_keys.py): original <-> diffusers MotionAdapter names, version and
position-table detection, against diffusers' own converter and a real MotionAdapter."""

import numpy as np
import pytest
from diffusers import MotionAdapter
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
from flax import nnx

from convert.animatediff_keys import (
    check_pe,
    detect_motion_version,
    diffusers_motion_to_original,
    original_motion_to_diffusers,
)
from convert.io import ConversionError
from convert.state import torch_key
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.motion import MotionSpec, VanillaTemporalModule, sinusoidal_table


def original_file(pe_len: int | None, mid: bool, c: int = 8) -> dict:
    """An SD1.5-layout motion-module file in original names: per-module keys as our module exports them."""
    one = nnx.eval_shape(
        lambda: VanillaTemporalModule(
            c, MotionSpec(heads=2, norm_groups=2), compute=Compute(), rngs=nnx.Rngs(0)
        )
    )
    local = sorted(torch_key(tuple(p)) for p, _ in nnx.to_flat_state(nnx.state(one, nnx.Param)))
    modules = [f"down_blocks.{i}.motion_modules.{j}" for i in range(4) for j in range(2)]
    modules += [f"up_blocks.{i}.motion_modules.{j}" for i in range(4) for j in range(3)]
    modules += ["mid_block.motion_modules.0"] if mid else []
    sd = {
        f"{m}.{k}": np.array([n], np.float32)
        for n, (m, k) in enumerate((m, k) for m in modules for k in local)
    }
    if pe_len:
        for m in modules:
            for i in (0, 1):
                key = f"{m}.temporal_transformer.transformer_blocks.0.attention_blocks.{i}.pos_encoder.pe"
                sd[key] = sinusoidal_table(pe_len, c)[None].copy()
    return sd


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize(
    ("version", "pe_len", "mid"), [("v1", 24, False), ("v2", 32, True), ("v3", 32, False)]
)
def test_key_maps_round_trip_and_detect_version(version, pe_len, mid):
    orig = original_file(pe_len, mid)
    assert len({k.split(".temporal_transformer")[0] for k in orig}) == (21 if mid else 20)
    diff = original_motion_to_diffusers(orig)
    assert_same(diffusers_motion_to_original(diff), orig)
    assert_same(original_motion_to_diffusers(diffusers_motion_to_original(diff)), diff)
    # Names agree with diffusers' own converter (which drops pe) and with a real MotionAdapter.
    assert sorted(k for k in diff if not k.endswith("pos_embed.pe")) == sorted(
        convert_animatediff_checkpoint_to_diffusers(orig)
    )
    adapter = MotionAdapter(
        block_out_channels=(8, 8, 8, 8),
        motion_num_attention_heads=2,
        motion_norm_num_groups=2,
        motion_max_seq_length=pe_len,
        use_motion_mid_block=mid,
    )
    assert sorted(adapter.state_dict()) == sorted(diff)
    # Version and pe length read from either naming.
    assert detect_motion_version(orig) == detect_motion_version(diff) == version
    assert check_pe(orig, pe_len) == check_pe(diff) == pe_len


def test_key_maps_leave_other_keys_and_refuse_foreign_names():
    orig = original_file(24, mid=False)
    unet_key = "down_blocks.0.resnets.0.norm1.weight"  # a UNet key a naive `.norm1` replace would mangle
    both = original_motion_to_diffusers({**orig, unet_key: np.zeros(1)})
    assert unet_key in both and unet_key in diffusers_motion_to_original(both)
    with pytest.raises(ConversionError, match="not original"):
        original_motion_to_diffusers({"down_blocks.0.motion_modules.0.norm.weight": np.zeros(1)})
    with pytest.raises(ConversionError, match="not diffusers"):
        diffusers_motion_to_original(orig)
    block = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."
    twin = block + "attention_blocks.1.pos_encoder.pe"
    with pytest.raises(ConversionError, match="differ"):
        original_motion_to_diffusers({**orig, twin: orig[twin] + 1})


def test_check_pe_rejects_wrong_tables():
    orig = original_file(24, mid=False)
    key = "up_blocks.2.motion_modules.1.temporal_transformer.transformer_blocks.0."
    key += "attention_blocks.0.pos_encoder.pe"
    half = {**orig, key: orig[key].astype(np.float16)}  # files saved in fp16 still pass
    assert check_pe(half, 24) == 24
    bad = orig[key].copy()
    bad[0, 5, 3] += 0.1
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        check_pe({**orig, key: bad}, 24)
    with pytest.raises(ConversionError, match="max_len=32"):
        check_pe(orig, 32)
    no_pe = original_file(None, mid=False)
    assert check_pe(no_pe, 24) is None
    with pytest.raises(ConversionError, match="v1 from v3"):
        detect_motion_version(no_pe)
    assert detect_motion_version(original_file(None, mid=True)) == "v2"
