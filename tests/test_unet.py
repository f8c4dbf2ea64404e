"""UNet parity against diffusers (tiny configs, random perturbed weights, fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from oracle import nchw, nhwc, perturb_, rel_err, torch_state

from convert.state import export_torch_state, load_torch_state
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model

CONFIGS = {
    # diffusers' own unit-test config (its tests' tiny UNet2DConditionModel)
    "diffusers_test": dict(
        block_out_channels=(32, 64),
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        layers_per_block=1,
    ),
    # SD1.5's block structure at small width; linear projections exercise the SD2-style path
    "sd15_shape": dict(
        block_out_channels=(16, 32, 32, 32),
        norm_num_groups=8,
        cross_attention_dim=24,
        attention_head_dim=(2, 4, 4, 4),
        layers_per_block=2,
        use_linear_projection=True,
    ),
}


HIGHEST = Compute(precision="highest")


def build_pair(name, seed=0, compute=HIGHEST):
    kwargs = CONFIGS[name]
    torch.manual_seed(seed)
    ref = TorchUNet(in_channels=4, out_channels=4, sample_size=16, **kwargs).eval()
    perturb_(ref, seed)
    cfg = UNetConfig.from_diffusers(dict(ref.config), compute=compute)
    model = shape_only_model(UNet, cfg)
    load_torch_state(model, torch_state(ref), source=name)
    return ref, model


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("hw", [(16, 16), (24, 8)])
def test_unet_matches_diffusers(name, hw):
    ref, model = build_pair(name)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *hw, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, CONFIGS[name]["cross_attention_dim"])).astype(np.float32)
    t = np.array([10, 981], dtype=np.int32)
    with torch.no_grad():
        expected = nhwc(ref(nchw(x), torch.from_numpy(t).long(), torch.from_numpy(ctx)).sample)
    got = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
    assert rel_err(got, expected) < 1e-5


def test_unet_controlnet_residuals_match_diffusers():
    ref, model = build_pair("diffusers_test", seed=3)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 5, 16)).astype(np.float32)
    shapes = [(16, 16, 32), (16, 16, 32), (8, 8, 32), (8, 8, 64)]
    down = [rng.standard_normal((1, *s)).astype(np.float32) for s in shapes]
    mid = rng.standard_normal((1, 8, 8, 64)).astype(np.float32)
    with torch.no_grad():
        expected = nhwc(
            ref(
                nchw(x),
                torch.tensor([500]),
                torch.from_numpy(ctx),
                down_block_additional_residuals=tuple(nchw(d) for d in down),
                mid_block_additional_residual=nchw(mid),
            ).sample
        )
    got = model(
        jnp.asarray(x), jnp.asarray([500]), jnp.asarray(ctx), [jnp.asarray(d) for d in down], jnp.asarray(mid)
    )
    assert rel_err(got, expected) < 1e-5


def test_export_round_trip_is_exact():
    ref, model = build_pair("sd15_shape")
    original = torch_state(ref)
    exported = export_torch_state(model)
    assert sorted(exported) == sorted(original)
    for k, v in original.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_wrong_input_layout_is_refused():
    _, model = build_pair("diffusers_test")
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 4, 16, 16)), jnp.array([1]), jnp.zeros((1, 3, 16)))
