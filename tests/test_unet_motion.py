"""The UNet with AnimateDiff motion modules against diffusers' UNetMotionModel + MotionAdapter (v2/v3-style
modules; diffusers pools the motion GroupNorm over frames, so ours runs with that option here), and the
reference-frame skip of X-Dyna (cross_id) against the same oracle with frame 0 sliced around each module."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import MotionAdapter, UNetMotionModel
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from oracle import TINY_UNET, jitted, perturb_, rel_err, torch_state

from convert.animatediff_keys import diffusers_motion_to_original
from convert.state import load_torch_state
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model

B, FRAMES, H, W, CROSS = 1, 4, 8, 8, 16
TINY = dict(TINY_UNET, in_channels=4, out_channels=4, sample_size=8)


class SkipReference(torch.nn.Module):
    """cross_id from the equations: frame 0 of each window goes around the motion module unchanged."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(
        self,
        hidden_states,
        encoder_hidden_states=None,
        timestep=None,
        class_labels=None,
        num_frames=1,
        cross_attention_kwargs=None,
    ):
        bf, c, h, w = hidden_states.shape
        window = hidden_states.view(bf // num_frames, num_frames, c, h, w)
        rest = self.inner(window[:, 1:].reshape(-1, c, h, w), num_frames=num_frames - 1)
        return torch.cat([window[:, :1], rest.view(bf // num_frames, num_frames - 1, c, h, w)], 1).view(
            bf, c, h, w
        )


def build(version, skip_reference=False, seed=0):
    torch.manual_seed(seed)
    unet2d = TorchUNet(**TINY)
    adapter = MotionAdapter(
        block_out_channels=TINY["block_out_channels"],
        motion_layers_per_block=1,
        motion_norm_num_groups=8,
        motion_num_attention_heads=4,
        motion_max_seq_length=32,
        use_motion_mid_block=version == "v2",
    )
    ref = UNetMotionModel.from_unet2d(unet2d, adapter)
    perturb_(ref, seed)
    ref.eval()
    state = {k: v for k, v in torch_state(ref).items() if "pos_embed" not in k}
    motion = {k: v for k, v in state.items() if ".motion_modules." in k}
    state = {k: v for k, v in state.items() if ".motion_modules." not in k}
    state.update(diffusers_motion_to_original(motion))
    if skip_reference:
        for block in [*ref.down_blocks, *ref.up_blocks, ref.mid_block]:
            if getattr(block, "motion_modules", None) is not None:
                block.motion_modules = torch.nn.ModuleList(SkipReference(m) for m in block.motion_modules)
    cfg = UNetConfig.from_diffusers({k: v for k, v in TINY.items()}, compute=Compute(precision="highest"))
    cfg = dataclasses.replace(
        cfg,
        motion_modules=True,
        motion_mid_block=version == "v2",
        motion_max_len=32,
        motion_heads=4,
        motion_norm_groups=8,
        motion_groupnorm_across_frames=True,
        skip_reference_frame=skip_reference,
    )
    model = shape_only_model(UNet, cfg)
    return ref, load_torch_state(model, state, source=f"UNetMotionModel {version}")


def compare(ref, model, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, FRAMES, H, W, 4)).astype(np.float32)
    ctx = rng.standard_normal((B, 5, CROSS)).astype(np.float32)
    t = np.array([321], np.int32)
    with torch.no_grad():
        expected = (
            ref(
                torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()),
                torch.from_numpy(t).long(),
                torch.from_numpy(np.repeat(ctx, FRAMES, axis=0)),
            )
            .sample.numpy()
            .transpose(0, 2, 3, 4, 1)
        )
    got = jitted(model)(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
    return rel_err(got, expected)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_matches_unet_motion_model(version):
    ref, model = build(version)
    assert compare(ref, model) < 1e-4


def test_reference_frame_skips_motion_modules():
    ref, model = build("v2", skip_reference=True, seed=3)
    assert compare(ref, model) < 1e-4
    # and the skip matters: the same weights without it give another answer
    plain = dataclasses.replace(model.config, skip_reference_frame=False)
    graph, state = nnx.split(model)
    other = nnx.merge(nnx.split(shape_only_model(UNet, plain))[0], state)
    assert compare(ref, other) > 1e-3
