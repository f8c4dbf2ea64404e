"""shape_only_model builds the same variable tree as nnx.eval_shape with real nnx.Rngs (the slow way)."""

import pytest
from flax import nnx
from oracle import ONE_BLOCK

from xdyna_jax.models.controlnet import ControlNetConfig, ControlNetModel
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.nn.shape_only import shape_only_model

CASES = {
    "video_unet": (
        UNet,
        UNetConfig(
            **ONE_BLOCK,
            up_block_types=("CrossAttnUpBlock2D",),
            groupnorm_over_frames=True,
            dynamics_adapter=True,
            ip_adapter_tokens=2,
            motion_modules=True,
            motion_mid_block=True,
            motion_heads=2,
            motion_norm_groups=4,
        ),
    ),
    "controlnet": (
        ControlNetModel,
        ControlNetConfig(**ONE_BLOCK, conditioning_embedding_out_channels=(4, 8)),
    ),
}


def tree(model) -> dict:
    return {path: (type(v), v.shape, v.dtype) for path, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_tree_as_eval_shape_with_real_rngs(name):
    cls, cfg = CASES[name]
    expected = tree(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
    assert tree(shape_only_model(cls, cfg)) == expected
    if name == "video_unet":  # every optional part of the video UNet is in the compared tree
        keys = {".".join(map(str, p)) for p in expected}
        for part in ("to_q_ff", "to_out_ff", "to_k_ip", "to_v_ip", "mid_block.motion_modules.0"):
            assert any(part in k for k in keys), part
