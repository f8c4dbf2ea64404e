"""The ml_collections configs build their models, and the tiny one runs one X-Dyna denoising call."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import tiny, xdyna_sd15
from configs.models import model_configs
from xdyna_jax.models.controlnet import ControlNetModel
from xdyna_jax.models.unet import UNet
from xdyna_jax.models.xdyna import XDynaDenoiser
from xdyna_jax.nn.shape_only import shape_only_model


def test_paper_config_is_the_release_architecture():
    cfgs = model_configs(xdyna_sd15.get_config())
    unet = cfgs["unet"]
    assert unet.block_out_channels == (320, 640, 1280, 1280) and unet.motion_max_len == 24
    assert unet.groupnorm_over_frames and unet.skip_reference_frame and unet.ip_adapter_tokens == 16
    assert cfgs["controlnet_face"].conditioning_channels == 6

    # The release's UNet checkpoint: 1326 keys / 1,321,465,924 numbers for the
    # UNet, of which 40 are pe buffers (2 per motion module, 24 x C each: 844,800 numbers) that we compute;
    # 340 keys / 361.28 M for each ControlNet (+432 for the face one's 6-channel input conv).
    def count(cls, c):
        flat = nnx.to_flat_state(nnx.state(shape_only_model(cls, c), nnx.Param))
        return len(flat), sum(v.size for _, v in flat)

    assert count(UNet, unet) == (1326 - 40, 1_321_465_924 - 844_800)
    assert count(ControlNetModel, cfgs["controlnet_pose"]) == (340, 361_279_120)
    assert count(ControlNetModel, cfgs["controlnet_face"]) == (340, 361_279_120 + 432)


def test_tiny_config_denoises():
    cfg = tiny.get_config()
    cfg.compute.attention = "xla"
    m = model_configs(cfg)
    rngs = nnx.Rngs(0)
    den = XDynaDenoiser(
        UNet(m["unet"], rngs=rngs),
        ControlNetModel(m["controlnet_pose"], rngs=rngs),
        ControlNetModel(m["controlnet_face"], rngs=rngs),
    )
    f, h = cfg.frames, cfg.height // 8
    x = jnp.ones((1, 1 + f, h, h, 4))
    ctx = jnp.ones((1, 7 + 4, 32))
    pose, face = jnp.ones((1, f, h * 2, h * 2, 3)), jnp.ones((1, f, h * 2, h * 2, 6))
    out = jax.eval_shape(lambda: den(x, jnp.array([10]), ctx, pose, face))
    assert out.shape == x.shape


def test_unknown_model_section_is_refused():
    cfg = tiny.get_config()
    cfg.model.toaster = {}
    with pytest.raises(ValueError, match="toaster"):
        model_configs(cfg)
