"""ControlNetModel parity against diffusers (tiny configs, random perturbed weights, fp32), init and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from flax import nnx
from oracle import ONE_BLOCK, nchw, nhwc, perturb_, rel_err, torch_state

from convert.state import load_torch_state, torch_key
from xdyna_jax.models.controlnet import ControlNetConfig, ControlNetModel
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model

# Two embedding stages -> the condition image is 2x the latent (SD's four stages give 8x).
TINY = dict(
    block_out_channels=(32, 64),
    norm_num_groups=8,
    cross_attention_dim=16,
    attention_head_dim=2,
    conditioning_embedding_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
)
CASES = {
    "pose": dict(conditioning_channels=3, layers_per_block=1),
    "face": dict(conditioning_channels=6, layers_per_block=2),
}
HIGHEST = Compute(precision="highest")


def build_pair(name, seed=0):
    torch.manual_seed(seed)
    ref = TorchControlNet(**TINY, **CASES[name]).eval()
    perturb_(ref, seed)  # the zero convs would otherwise hide every bug behind all-zero outputs
    cfg = ControlNetConfig.from_diffusers(dict(ref.config), compute=HIGHEST)
    model = shape_only_model(ControlNetModel, cfg)
    load_torch_state(model, torch_state(ref), source=name)
    return ref, model


def inputs(cond_channels, hw=(8, 12), seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *hw, 4)).astype(np.float32)
    cond = rng.uniform(0, 1, (2, 2 * hw[0], 2 * hw[1], cond_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 16)).astype(np.float32)
    return x, np.array([10, 981]), ctx, cond


def torch_residuals(ref, x, t, ctx, cond, scale):
    with torch.no_grad():
        out = ref(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond), conditioning_scale=scale)
    return [nhwc(r) for r in out.down_block_res_samples], nhwc(out.mid_block_res_sample)


@pytest.mark.parametrize("name", sorted(CASES))
def test_controlnet_matches_diffusers(name):
    ref, model = build_pair(name)
    args = inputs(CASES[name]["conditioning_channels"])
    # jitted, as the pipeline runs it; the 0.5 scale is a traced argument, not a constant
    call = nnx.jit(lambda m, *a: m(*a))
    for scale in (1.0, 0.5):
        down, mid = call(model, *(jnp.asarray(a) for a in args), jnp.float32(scale))
        exp_down, exp_mid = torch_residuals(ref, *args, scale)
        lpb = CASES[name]["layers_per_block"]
        assert len(down) == len(exp_down) == 1 + (lpb + 1) + lpb
        errs = [rel_err(a, b) for a, b in zip(down, exp_down, strict=True)] + [rel_err(mid, exp_mid)]
        assert max(errs) < 1e-5, errs


def test_fresh_controlnet_adds_nothing():
    cfg = ControlNetConfig(**ONE_BLOCK, conditioning_embedding_out_channels=(4, 4))
    model = ControlNetModel(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    args = (jnp.ones((1, 4, 4, 4)), jnp.array([3]), jnp.ones((1, 3, 8)), jnp.ones((1, 8, 8, 3)))
    down, mid = nnx.jit(lambda m, *a: m(*a))(model, *args)
    assert len(down) == 2 and all(not np.any(np.asarray(d)) for d in down) and not np.any(np.asarray(mid))
    # only the zero convs and the condition embedding's last conv start at zero
    cond = model.controlnet_cond_embedding
    assert not np.any(np.asarray(cond.conv_out.kernel.get_value()))
    assert np.any(np.asarray(cond.conv_in.kernel.get_value()))
    assert np.any(np.asarray(model.down_blocks[0].resnets[0].conv1.kernel.get_value()))


@pytest.fixture(scope="module")
def small_model():
    cfg = ControlNetConfig(**TINY, conditioning_channels=6, layers_per_block=1)
    return shape_only_model(ControlNetModel, cfg)


@pytest.mark.parametrize(
    "cond_shape",
    [(1, 16, 16, 3), (1, 8, 8, 6), (1, 64, 64, 6), (2, 16, 16, 6)],
    ids=["channels", "1x", "8x", "batch"],
)
def test_bad_cond_names_both_shapes(small_model, cond_shape):
    # the check runs before any weight is touched, so the abstract (eval_shape) model suffices
    with pytest.raises(ValueError) as e:
        small_model(jnp.zeros((1, 8, 8, 4)), jnp.array([1]), jnp.zeros((1, 5, 16)), jnp.zeros(cond_shape))
    assert str(cond_shape) in str(e.value) and "(1, 8, 8, 4)" in str(e.value)


def test_config_round_trips_and_refuses_unsupported():
    cfg = ControlNetConfig()
    assert cfg.cond_downscale == 8 and cfg.time_embed_dim == 1280
    assert ControlNetConfig.from_dict(cfg.to_dict()) == cfg
    # what we write, diffusers builds into the same architecture
    ref = TorchControlNet.from_config(ControlNetConfig(**TINY).to_diffusers())
    assert ControlNetConfig.from_diffusers(dict(ref.config)) == ControlNetConfig(**TINY)
    for bad in (
        {"controlnet_conditioning_channel_order": "bgr"},
        {"global_pool_conditions": True},
        {"mid_block_type": "UNetMidBlock2D"},
        {"_class_name": "UNet2DConditionModel"},
        {"layers_per_block": [1, 2]},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ControlNetConfig.from_diffusers({**ControlNetConfig(**TINY).to_diffusers(), **bad})


def test_full_size_parameters_match_diffusers_sd15_controlnet():
    """SD 1.5's ControlNet (as control_v11p_sd15_openpose, with X-Dyna's 6-channel condition): same 340
    parameter names and shapes as diffusers builds, checked without allocating any weights."""
    with torch.device("meta"):
        ref = TorchControlNet(cross_attention_dim=768, conditioning_channels=6)
    cfg = ControlNetConfig.from_diffusers(dict(ref.config))
    assert cfg == ControlNetConfig(conditioning_channels=6) and cfg.cond_downscale == 8
    model = shape_only_model(ControlNetModel, cfg)
    ours = {torch_key(p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    def flax_shape(key, shape):  # Conv2d [O,I,kh,kw] -> [kh,kw,I,O]; Linear [O,I] -> [I,O]
        if key.endswith(".weight") and len(shape) == 4:
            return (shape[2], shape[3], shape[1], shape[0])
        return shape[::-1] if key.endswith(".weight") and len(shape) == 2 else shape

    expected = {k: flax_shape(k, tuple(v.shape)) for k, v in ref.state_dict().items()}
    assert len(expected) == 340 and ours == expected
