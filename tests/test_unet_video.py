"""The X-Dyna UNet on windows of frames: Dynamics-Adapter, GroupNorm over frames and IP-Adapter attention, against a
PyTorch reference written here from the equations in docs/architecture.md (diffusers has no oracle for the
adapter or the pooled GroupNorm): diffusers' UNet2DConditionModel with its attn1 processors replaced by the
adapter equation, diffusers' own IPAdapterAttnProcessor2_0 in attn2, and resnet GroupNorms wrapped to pool
statistics over the frames of a window."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from flax import nnx
from oracle import TINY_UNET, jitted, perturb_, random_torch_state, rel_err, torch_state

from convert.state import load_torch_state
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.nn.attention import AdapterSelfAttention
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model

B, FRAMES, H, W = 2, 3, 8, 8
TEXT, IMG, CROSS = 5, 4, 16
TINY = dict(TINY_UNET, in_channels=4, out_channels=4, sample_size=8)


def sdpa(attn, q, k, v):
    b, heads = q.shape[0], attn.heads
    split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)
    return (
        F.scaled_dot_product_attention(split(q), split(k), split(v))
        .transpose(1, 2)
        .reshape(b, -1, q.shape[-1])
    )


class AdapterProcessor(torch.nn.Module):
    """out = to_out(Attn(Q,K,V)) + to_out_ff(Attn(Q',K_R,V_R)), K_R/V_R = K/V of frame 0 broadcast to all frames."""

    def __init__(self, dim):
        super().__init__()
        self.to_q_ff = torch.nn.Linear(dim, dim, bias=False)
        self.to_out_ff = torch.nn.Linear(dim, dim)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        x = hidden_states
        bf, n, c = x.shape
        k, v = attn.to_k(x), attn.to_v(x)
        out = attn.to_out[0](sdpa(attn, attn.to_q(x), k, v))
        ref = lambda t: t.view(bf // FRAMES, FRAMES, n, c)[:, :1].expand(-1, FRAMES, -1, -1).reshape(bf, n, c)
        out = out + self.to_out_ff(sdpa(attn, self.to_q_ff(x), ref(k), ref(v)))
        return attn.to_out[1](out)


class ClipGroupNorm(torch.nn.Module):
    """torch GroupNorm on (b, c, f, h, w): statistics over every frame of a window (the release's ResnetBlock3D)."""

    def __init__(self, gn):
        super().__init__()
        self.gn = gn

    def forward(self, x):
        bf, c, h, w = x.shape
        y = self.gn(x.view(bf // FRAMES, FRAMES, c, h, w).transpose(1, 2))
        return y.transpose(1, 2).reshape(bf, c, h, w)


def torch_reference(seed=0):
    torch.manual_seed(seed)
    ref = TorchUNet(**TINY)
    procs = {}
    for name, attn in ((n, m) for n, m in ref.named_modules() if n.endswith(("attn1", "attn2"))):
        dim = attn.to_q.out_features
        if name.endswith("attn1"):
            procs[name + ".processor"] = AdapterProcessor(dim)
        else:
            procs[name + ".processor"] = IPAdapterAttnProcessor2_0(dim, CROSS, num_tokens=(IMG,), scale=1.0)
    ref.set_attn_processor(procs)
    for module in list(ref.modules()):
        for norm in ("norm1", "norm2"):
            if type(module).__name__ == "ResnetBlock2D":
                setattr(module, norm, ClipGroupNorm(getattr(module, norm)))
    ref.conv_norm_out = ClipGroupNorm(ref.conv_norm_out)
    perturb_(ref, seed)
    return ref.eval()


def our_state(ref):
    """The reference's weights under our names: attn1.to_q_ff/to_out_ff, attn2.to_k_ip/to_v_ip (X-Dyna's)."""
    state = {}
    for k, v in torch_state(ref).items():
        k = k.replace(".processor.", ".").replace("gn.", "")
        k = k.replace("to_k_ip.0.", "to_k_ip.").replace("to_v_ip.0.", "to_v_ip.")
        state[k] = v
    return state


def ours(ref, **overrides):
    cfg = UNetConfig.from_diffusers(dict(ref.config), compute=Compute(precision="highest"))
    video = dict(dynamics_adapter=True, groupnorm_over_frames=True, ip_adapter_tokens=IMG)
    cfg = dataclasses.replace(cfg, **{**video, **overrides})
    model = shape_only_model(UNet, cfg)
    return load_torch_state(model, our_state(ref), source="reference")


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, FRAMES, H, W, 4)).astype(np.float32)
    text = rng.standard_normal((B, TEXT, CROSS)).astype(np.float32)
    img = rng.standard_normal((B, IMG, CROSS)).astype(np.float32)
    t = np.array([10, 700], np.int32)
    return x, text, img, t


def torch_forward(ref, x, text, img, t, ip_scale=1.0):
    for proc in ref.attn_processors.values():
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            proc.scale = [ip_scale]
    rep = lambda a: torch.from_numpy(np.repeat(a, FRAMES, axis=0))
    sample = torch.from_numpy(x.reshape(B * FRAMES, H, W, 4).transpose(0, 3, 1, 2).copy())
    out = ref(sample, torch.from_numpy(np.repeat(t, FRAMES)).long(), (rep(text), [rep(img)])).sample
    return out.permute(0, 2, 3, 1).reshape(B, FRAMES, H, W, 4)


@pytest.fixture(scope="module")
def pair():
    ref = torch_reference()
    return ref, ours(ref)


@pytest.mark.parametrize("ip_scale", [1.0, 0.5])
def test_xdyna_unet_matches_equations(pair, ip_scale):
    ref, model = pair
    x, text, img, t = inputs()
    with torch.no_grad():
        expected = torch_forward(ref, x, text, img, t, ip_scale).numpy()
    got = jitted(model)(
        jnp.asarray(x), jnp.asarray(t), jnp.concatenate([text, img], axis=1), ip_scale=ip_scale
    )
    assert got.shape == (B, FRAMES, H, W, 4)
    assert rel_err(got, expected) < 1e-4


def test_adapter_gradients_match_autograd(pair):
    ref, model = pair
    x, text, img, t = inputs(2)
    weights = np.random.default_rng(3).standard_normal((B, FRAMES, H, W, 4)).astype(np.float32)
    out = torch_forward(ref, x, text, img, t)
    (out * torch.from_numpy(weights)).sum().backward()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    proc = ref.get_submodule(name).processor
    expected = {
        "to_q_ff": proc.to_q_ff.weight.grad.numpy().T,
        "to_out_ff": proc.to_out_ff.weight.grad.numpy().T,
    }

    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        y = nnx.merge(graph, p, rest)(jnp.asarray(x), jnp.asarray(t), jnp.concatenate([text, img], axis=1))
        return jnp.sum(y * weights)

    grads = jax.jit(jax.grad(loss))(params)
    attn1 = grads["down_blocks"][0]["attentions"][0]["transformer_blocks"][0]["attn1"]
    for key, exp in expected.items():
        assert rel_err(attn1[key]["kernel"][...], exp) < 1e-4, key


def test_fresh_adapter_initialisation():
    """The adapter starts with to_q_ff = to_q and to_out_ff = 0 (checked on the attn1 module alone: an
    eagerly initialised UNet costs one XLA compile per parameter shape)."""
    attn1 = AdapterSelfAttention(32, heads=2, dim_head=16, compute=Compute(), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(attn1.to_q_ff.kernel[...], attn1.to_q.kernel[...])
    assert not np.any(attn1.to_out_ff.kernel[...]) and not np.any(attn1.to_out_ff.bias[...])


def test_fresh_adapter_is_plain_sd_per_frame():
    """With the adapter's initial weights and per-frame norms, the video UNet equals the 2-D UNet on every
    frame."""
    base = UNetConfig(
        **{k: v for k, v in TINY.items() if k != "sample_size"}, compute=Compute(precision="highest")
    )
    video_cfg = dataclasses.replace(base, dynamics_adapter=True)
    state = random_torch_state(UNet, video_cfg, seed=4)
    for key in state:
        if key.endswith("to_q_ff.weight"):
            state[key] = state[key.replace("to_q_ff", "to_q")]
        elif ".to_out_ff." in key:
            state[key] = np.zeros_like(state[key])
    video = load_torch_state(shape_only_model(UNet, video_cfg), state, source="fresh adapter")
    plain_state = {k: v for k, v in state.items() if "_ff." not in k}
    plain = load_torch_state(shape_only_model(UNet, base), plain_state, source="2-D")
    x, text, _, t = inputs(5)
    got = jitted(video)(jnp.asarray(x), jnp.asarray(t), jnp.asarray(text))
    per_frame = jitted(plain)(
        jnp.asarray(x.reshape(B * FRAMES, H, W, 4)),
        jnp.repeat(jnp.asarray(t), FRAMES),
        jnp.repeat(jnp.asarray(text), FRAMES, axis=0),
    )
    np.testing.assert_allclose(got.reshape(per_frame.shape), per_frame, rtol=1e-5, atol=1e-5)

    # reference_timestep_zero: frame 0 is the 2-D UNet at t = 0, the other frames unchanged
    zero_cfg = dataclasses.replace(video_cfg, reference_timestep_zero=True)
    zero = load_torch_state(shape_only_model(UNet, zero_cfg), state, source="fresh adapter, reference at t=0")
    got_zero = np.asarray(jitted(zero)(jnp.asarray(x), jnp.asarray(t), jnp.asarray(text)))
    frame_t = np.repeat(np.asarray(t), FRAMES).reshape(B, FRAMES)
    frame_t[:, 0] = 0
    assert (np.asarray(t) != 0).all()
    per_frame_zero = jitted(plain)(
        jnp.asarray(x.reshape(B * FRAMES, H, W, 4)),
        jnp.asarray(frame_t.reshape(-1)),
        jnp.repeat(jnp.asarray(text), FRAMES, axis=0),
    )
    np.testing.assert_allclose(got_zero.reshape(per_frame.shape), per_frame_zero, rtol=1e-5, atol=1e-5)
    assert np.abs(got_zero[:, 0] - np.asarray(got)[:, 0]).max() > 1e-3


def test_video_input_errors(pair):
    _, model = pair
    with pytest.raises(ValueError, match="video model"):
        model(jnp.zeros((1, H, W, 4)), jnp.array([1]), jnp.zeros((1, TEXT + IMG, CROSS)))
    with pytest.raises(ValueError, match="image tokens"):
        model(jnp.zeros((1, 2, H, W, 4)), jnp.array([1]), jnp.zeros((1, IMG, CROSS)))
