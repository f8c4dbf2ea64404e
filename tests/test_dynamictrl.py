"""DynamiCtrl's Pose-adaptive LayerNorm transformer vs a PyTorch reference of its equations built on diffusers'
CogVideoX pieces (tiny 1.5 config, perturbed weights, fp32), the zero-reduction to stock CogVideoX, control
errors, the release's parameter count and a shape-only bf16 trace at the release's size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from oracle import perturb_, rel_err, torch_state
from oracle_cogvideox import (
    TINY_COGVIDEOX_15,
    TINY_LATENT_SIZES,
    diffusers_transformer,
    from_torch_video,
    jax_transformer,
    jit_call,
    run_diffusers,
    tiny_inputs,
    to_torch_video,
    torch_inputs,
    torch_rope,
)

from xdyna_jax.models.cogvideox import CogVideoXConfig
from xdyna_jax.models.dynamictrl import DynamiCtrlTransformerModel
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model

KWARGS, SIZE = TINY_COGVIDEOX_15, TINY_LATENT_SIZES["1.5"]


class TorchPoseAdaptiveLN(torch.nn.Module):
    """The release's PadaLN: [shift, scale, gate] = linear(SiLU(temb)); c_hat = LN_c(c) (1 + scale) + shift."""

    def __init__(self, time_embed_dim, dim, eps):
        super().__init__()
        self.linear = torch.nn.Linear(time_embed_dim, 3 * dim)
        self.norm = torch.nn.LayerNorm(dim, eps=eps, elementwise_affine=True)

    def forward(self, c, temb):
        shift, scale, gate = self.linear(F.silu(temb)).chunk(3, dim=1)
        return self.norm(c) * (1 + scale[:, None]) + shift[:, None], gate[:, None]


def torch_block(block, padaln, x, e, c, temb, rope):
    """One DynamiCtrl block from diffusers' CogVideoXBlock pieces: the control tokens shift norm1's video
    output, the attention sees the sum, the carried stream is c_hat + gate * c_hat."""
    text_len = e.shape[1]
    c_hat, control_gate = padaln(c, temb)
    x_hat, e_hat, gate, e_gate = block.norm1(x, e, temb)
    a_x, a_e = block.attn1(hidden_states=x_hat + c_hat, encoder_hidden_states=e_hat, image_rotary_emb=rope)
    x, e = x + gate * a_x, e + e_gate * a_e
    x_hat, e_hat, gate, e_gate = block.norm2(x, e, temb)
    f = block.ff(torch.cat([e_hat, x_hat], dim=1))
    return x + gate * f[:, text_len:], e + e_gate * f[:, :text_len], c_hat + control_gate * c_hat


def torch_dynamictrl(model, padalns, hidden, text, timestep, pose, ofs, rope):
    """The whole DynamiCtrl forward on a diffusers CogVideoXTransformer3DModel's modules (1.5 layout)."""
    temb = model.time_embedding(model.time_proj(timestep).to(hidden.dtype))
    temb = temb + model.ofs_embedding(model.ofs_proj(ofs).to(hidden.dtype))
    text_len = text.shape[1]
    tokens = model.patch_embed(text, hidden)
    e, x = tokens[:, :text_len], tokens[:, text_len:]
    c = model.patch_embed(text, torch.cat([pose, pose], dim=2))[:, text_len:]  # (B, F, C, H, W): channels
    for block, padaln in zip(model.transformer_blocks, padalns, strict=True):
        x, e, c = torch_block(block, padaln, x, e, c, temb, rope)
    x = model.proj_out(model.norm_out(model.norm_final(x), temb=temb))
    b, f, _, h, w = hidden.shape
    p, pt = model.config.patch_size, model.config.patch_size_t
    x = x.reshape(b, f // pt, h // p, w // p, -1, pt, p, p)
    return x.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)


def make_pair(seed=0, zero_control=False):
    """(diffusers base model, torch PadaLNs, our DynamiCtrl on the same weights)."""
    base = diffusers_transformer(KWARGS, seed=seed)
    dim = KWARGS["num_attention_heads"] * KWARGS["attention_head_dim"]
    torch.manual_seed(seed + 10)
    padalns = torch.nn.ModuleList(
        [TorchPoseAdaptiveLN(KWARGS["time_embed_dim"], dim, 1e-5) for _ in range(KWARGS["num_layers"])]
    ).eval()
    perturb_(padalns, seed + 11)
    if zero_control:
        with torch.no_grad():
            for p in padalns.parameters():
                p.zero_()
    extra = {
        f"transformer_blocks.{k.split('.', 1)[0]}.control_norm1.{k.split('.', 1)[1]}": v
        for k, v in torch_state(padalns).items()
    }
    model = jax_transformer(base, cls=DynamiCtrlTransformerModel, extra_state=extra)
    return base, padalns, model


def test_block_matches_torch_reference():
    base, padalns, model = make_pair(seed=1)
    rng = np.random.default_rng(2)
    dim, text_len, tokens = 32, KWARGS["max_text_seq_length"], 16
    x, c = (rng.standard_normal((2, tokens, dim)).astype(np.float32) for _ in range(2))
    e = rng.standard_normal((2, text_len, dim)).astype(np.float32)
    temb = rng.standard_normal((2, KWARGS["time_embed_dim"])).astype(np.float32)
    rope = torch_rope(KWARGS, SIZE)
    with torch.no_grad():
        expected = torch_block(
            base.transformer_blocks[0], padalns[0], *map(torch.from_numpy, (x, e, c, temb)), rope
        )
    block = model.transformer_blocks[0]
    graph, state = nnx.split(block)
    run = jax.jit(lambda s, *a: nnx.merge(graph, s)(*a))
    got = run(state, x, e, temb, c, tuple(t.numpy() for t in rope))
    for ours, theirs in zip(got, expected, strict=True):
        assert rel_err(ours, theirs.numpy()) < 1e-5


def test_model_matches_torch_reference():
    base, padalns, model = make_pair(seed=3)
    inputs = tiny_inputs(KWARGS, SIZE, seed=4)
    with torch.no_grad():
        t = torch_inputs(inputs)
        expected = torch_dynamictrl(
            base,
            padalns,
            t["hidden_states"],
            t["encoder_hidden_states"],
            t["timestep"],
            to_torch_video(inputs["pose"]),
            t["ofs"],
            torch_rope(KWARGS, SIZE),
        )
    run = jit_call(model)
    got = run(inputs["hidden"], inputs["text"], inputs["timestep"], inputs["pose"], ofs=inputs["ofs"])
    assert got.shape == (2, *SIZE, KWARGS["out_channels"])
    assert rel_err(got, from_torch_video(expected)) < 1e-5
    # the pose matters (a model that ignored it would pass the line above only by accident of the weights)
    moved = run(inputs["hidden"], inputs["text"], inputs["timestep"], inputs["pose"] * 0.5, ofs=inputs["ofs"])
    assert rel_err(moved, got) > 1e-3


def test_zeroed_control_norm_is_stock_cogvideox():
    base, _, model = make_pair(seed=5, zero_control=True)
    inputs = tiny_inputs(KWARGS, SIZE, seed=6)
    expected = run_diffusers(base, KWARGS, inputs, SIZE)
    run = jit_call(model)
    for pose in (inputs["pose"], 10.0 * np.random.default_rng(7).standard_normal(inputs["pose"].shape)):
        got = run(
            inputs["hidden"], inputs["text"], inputs["timestep"], pose.astype(np.float32), ofs=inputs["ofs"]
        )
        assert rel_err(got, expected) < 1e-5


def test_control_is_required_and_checked():
    cfg = CogVideoXConfig.from_diffusers(KWARGS)
    model = shape_only_model(DynamiCtrlTransformerModel, cfg)
    inputs = tiny_inputs(KWARGS, SIZE)
    args = (inputs["hidden"], inputs["text"], inputs["timestep"])
    with pytest.raises(ValueError, match="control_hidden_states .* is required"):
        model(*args, ofs=inputs["ofs"])
    for bad in (inputs["pose"][..., :2], inputs["pose"][:, :1], inputs["hidden"]):
        with pytest.raises(ValueError, match="control_hidden_states must have the latents' shape"):
            model(*args, bad, ofs=inputs["ofs"])
    with pytest.raises(ValueError, match="must be 2 x out_channels"):
        shape_only_model(
            DynamiCtrlTransformerModel, CogVideoXConfig.from_diffusers({**KWARGS, "out_channels": 3})
        )


@pytest.mark.slow  # CI time (the suite is near 20 min): make test-slow
def test_bf16_forward_stays_close_to_fp32():
    """bf16 params + bf16 compute (as the release runs) vs fp32 on the same weights; bound as in
    test_cogvideox (8 mantissa bits through 2 blocks: ~1e-2 of the output range)."""
    base, padalns, fp32_model = make_pair(seed=8)
    inputs = tiny_inputs(KWARGS, SIZE, seed=9)
    args = (inputs["hidden"], inputs["text"], inputs["timestep"], inputs["pose"])
    fp32 = jit_call(fp32_model)(*args, ofs=inputs["ofs"])
    graph, state = nnx.split(fp32_model)
    bf16_cfg = CogVideoXConfig.from_diffusers(KWARGS, Compute(dtype="bfloat16"))
    bf16_graph, _ = nnx.split(shape_only_model(DynamiCtrlTransformerModel, bf16_cfg))
    bf16_state = jax.jit(lambda s: jax.tree.map(lambda x: x.astype(jnp.bfloat16), s))(state)
    bf16_model = nnx.merge(bf16_graph, bf16_state)
    bf16 = jit_call(bf16_model)(*args, ofs=inputs["ofs"])
    assert bf16.dtype == jnp.bfloat16
    err = rel_err(np.asarray(bf16, np.float32), np.asarray(fp32))
    assert 0 < err < 4e-2, err


def test_release_size_shape_only():
    """DynamiCtrl on CogVideoX1.5-5B-I2V (our config defaults): 5,770,420,864 parameters in 1,196 tensors,
    the base's 5,571,594,880 in 1,028 plus 42 x 4 control_norm1 tensors; and a bf16 forward traced from
    shapes only (nothing materialised)."""
    cfg = CogVideoXConfig(compute=Compute(dtype="bfloat16"))
    model = shape_only_model(DynamiCtrlTransformerModel, cfg)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(flat) == 1196
    assert sum(int(np.prod(v.shape)) for _, v in flat) == 5_770_420_864
    base = [v for p, v in flat if "control_norm1" not in p]  # CogVideoX1.5-5B-I2V itself
    assert (len(base), sum(int(np.prod(v.shape)) for v in base)) == (1028, 5_571_594_880)
    assert {
        tuple(p[2:]) for p in dict(flat) if p[:1] == ("transformer_blocks",) and p[2] == "control_norm1"
    } == {
        ("control_norm1", "linear", "kernel"),
        ("control_norm1", "linear", "bias"),
        ("control_norm1", "norm", "scale"),
        ("control_norm1", "norm", "bias"),
    }
    graph, state = nnx.split(model)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), state)
    latents = jax.ShapeDtypeStruct((2, 2, 4, 4, 32), jnp.bfloat16)
    pose = jax.ShapeDtypeStruct((2, 2, 4, 4, 16), jnp.bfloat16)
    text = jax.ShapeDtypeStruct((2, 226, 4096), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    out = jax.eval_shape(
        lambda s, x, e, t, c: nnx.merge(graph, s)(x, e, t, c, ofs=2.0), state, latents, text, t, pose
    )
    assert (out.shape, out.dtype) == ((2, 2, 4, 4, 16), jnp.bfloat16)
