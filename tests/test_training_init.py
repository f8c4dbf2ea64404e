"""Stage-1 initialisation from converted bundles: at step 0 the X-Dyna denoiser is exactly SD 1.5 +
AnimateDiff + IP-Adapter (the zero to_out_ff, the zero-conv pose ControlNet)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracle import assert_placed_by_rules, random_torch_state, rel_err
from safetensors.numpy import save_file

import xdyna_jax
from configs.sharding import sharding_section
from convert.state import load_torch_state
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model
from xdyna_jax.sharding import LogicalSharding, make_mesh, rules_from_config
from xdyna_jax.training.init import InitError, init_stage1

# one resolution, attention (so adapter and IP-Adapter) in the mid block only, AnimateDiff v1: cheap to compile
ANIMATEDIFF = UNetConfig(
    block_out_channels=(8,),
    down_block_types=("DownBlock2D",),
    up_block_types=("UpBlock2D",),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=8,
    attention_head_dim=2,
    motion_modules=True,
    motion_max_len=24,
    motion_norm_groups=4,
    motion_heads=2,
    groupnorm_over_frames=True,
    compute=Compute(precision="highest", attention="xla"),
)
TOKENS = 2


def _write_ip_adapter(folder, rng):
    """The `convert ip-adapter` output the init reads: attn2 to_k_ip/to_v_ip (PyTorch layout) + token count."""
    abstract = shape_only_model(UNet, dataclasses.replace(ANIMATEDIFF, ip_adapter_tokens=TOKENS))
    ip = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        if path[-2] in ("to_k_ip", "to_v_ip"):
            key = ".".join(map(str, path[:-1])) + ".weight"
            ip[key] = (0.3 * rng.standard_normal(var.shape[::-1])).astype(np.float32)
    folder.mkdir()
    save_file(ip, str(folder / "ip_attention.safetensors"))
    (folder / "ip_attention.json").write_text(json.dumps({"num_tokens": TOKENS}))
    return ip


def test_stage1_init_is_sd15_animatediff_ip_adapter_at_step_0(tmp_path):
    rng = np.random.default_rng(0)
    motion_sd = random_torch_state(UNet, ANIMATEDIFF, seed=4)
    motion = load_torch_state(shape_only_model(UNet, ANIMATEDIFF), motion_sd, source="test")
    xdyna_jax.save(motion, tmp_path / "animatediff" / "unet")
    ip = _write_ip_adapter(tmp_path / "ip", rng)

    models = init_stage1(tmp_path / "animatediff", tmp_path / "ip", pose_embedding_channels=(4,))
    den = models.denoiser
    assert den.unet.config.dynamics_adapter and den.unet.config.ip_adapter_tokens == TOKENS
    attn1 = den.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    np.testing.assert_array_equal(attn1.to_q_ff.kernel.get_value(), attn1.to_q.kernel.get_value())
    assert not np.asarray(attn1.to_out_ff.kernel.get_value()).any()

    # the reference: the same weights in a UNet without the adapter, built from the PyTorch-named tensors
    plain_cfg = dataclasses.replace(ANIMATEDIFF, ip_adapter_tokens=TOKENS, skip_reference_frame=True)
    plain = load_torch_state(shape_only_model(UNet, plain_cfg), {**motion_sd, **ip}, source="reference")

    f, h = 1 + 3, 4
    x = jnp.asarray(rng.standard_normal((2, f, h, h, 4)), jnp.float32)
    t = jnp.array([10, 700])
    context = jnp.asarray(rng.standard_normal((2, 3 + TOKENS, 8)), jnp.float32)
    pose = jnp.asarray(rng.standard_normal((2, f - 1, h, h, 3)), jnp.float32)
    both = jax.jit(lambda d, p: (d(x, t, context, pose), p(x, t, context)))  # one compile for both
    ours, expected = both(den, plain)
    assert rel_err(ours, expected) < 1e-5

    # the pose ControlNet carries the UNet's encoder weights
    np.testing.assert_array_equal(
        den.pose_controlnet.down_blocks[0].resnets[0].conv1.kernel.get_value(),
        den.unet.down_blocks[0].resnets[0].conv1.kernel.get_value(),
    )
    assert models.image_encoder is None and models.resampler is None
    with pytest.raises(InitError, match="zero-image tokens"):
        models.null_image_tokens()

    # on 8 devices every param is born on its shards (as the config's rules place it), values unchanged
    mesh, rules = make_mesh(data=1, fsdp=8), rules_from_config(sharding_section().rules)
    sharding = LogicalSharding(mesh, rules)
    sharded = init_stage1(
        tmp_path / "animatediff", tmp_path / "ip", pose_embedding_channels=(4,), sharding=sharding
    )
    assert assert_placed_by_rules(sharded.denoiser, den, mesh, rules)


def test_init_refuses_a_unet_without_motion_modules(tmp_path):
    plain = dataclasses.replace(ANIMATEDIFF, motion_modules=False, groupnorm_over_frames=False)
    unet = load_torch_state(shape_only_model(UNet, plain), random_torch_state(UNet, plain), source="test")
    xdyna_jax.save(unet, tmp_path / "sd15")
    _write_ip_adapter(tmp_path / "ip", np.random.default_rng(0))
    with pytest.raises(InitError, match="'unet' bundle; expected the video_unet of `convert animatediff`"):
        init_stage1(tmp_path / "sd15", tmp_path / "ip")
