"""AutoencoderKL parity against diffusers (tiny configs, random perturbed weights, fp32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx
from oracle import nchw, nhwc, perturb_, rel_err, torch_state

from convert.state import export_torch_state, load_torch_state
from xdyna_jax.models.vae import AutoencoderKL, VAEConfig, sample_latent
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model


def _blocks(n):
    return dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)


CONFIGS = {
    "two_block": dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, **_blocks(2)),
    "three_block": dict(block_out_channels=(8, 16, 16), norm_num_groups=4, layers_per_block=2, **_blocks(3)),
    # the optional pieces switched off
    "bare": dict(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **_blocks(2),
    ),
}
# chunk 16 < the 60 / 256 mid-block tokens of the test images, so the chunked path really runs
COMPUTES = {
    "highest": Compute(precision="highest"),
    "chunked": Compute(precision="highest", attention="chunked", attention_chunk=16),
}

# One compiled program per (model structure, input shapes): encode, decode of an unrelated latent, forward.
_all = nnx.jit(lambda m, x, z: (*m.encode(x), m.decode(z), m(x)))
_forward = nnx.jit(lambda m, x: m(x))


@functools.cache
def torch_vae(name):
    torch.manual_seed(0)
    ref = TorchVAE(in_channels=3, out_channels=3, latent_channels=4, **CONFIGS[name]).eval()
    perturb_(ref, 1)
    return ref


def jax_vae(name, compute="highest"):
    ref = torch_vae(name)
    cfg = VAEConfig.from_diffusers(dict(ref.config), compute=COMPUTES[compute])
    model = shape_only_model(AutoencoderKL, cfg)
    return load_torch_state(model, torch_state(ref), source=name)


def images(hw=(32, 32), batch=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, *hw, 3)).astype(np.float32)


PAIRS = [
    ("two_block", "highest"),
    ("two_block", "chunked"),
    ("three_block", "highest"),
    ("three_block", "chunked"),
]
# 24x40 is not square and gives a 6x10 latent with three blocks (60 mid-block tokens)
IMAGE_HW = {"two_block": (32, 32), "three_block": (24, 40)}


@pytest.mark.parametrize("name,compute", PAIRS)
def test_matches_diffusers(name, compute):
    """encode (mean, clipped logvar), decode and the full forward (posterior mode) against diffusers."""
    ref = torch_vae(name)
    x = images(IMAGE_HW[name])
    with torch.no_grad():
        dist = ref.encode(nchw(x)).latent_dist
        z = np.random.default_rng(1).standard_normal(nhwc(dist.mean).shape).astype(np.float32)
        expected_decode = nhwc(ref.decode(nchw(z)).sample)
        expected_forward = nhwc(ref(nchw(x), sample_posterior=False).sample)
    mean, logvar, decoded, forward = _all(jax_vae(name, compute), jnp.asarray(x), jnp.asarray(z))
    assert rel_err(mean, nhwc(dist.mean)) < 1e-5
    assert rel_err(logvar, nhwc(dist.logvar)) < 1e-5
    assert rel_err(decoded, expected_decode) < 1e-5
    assert rel_err(forward, expected_forward) < 1e-5


@pytest.mark.parametrize("name,hw", [("bare", (32, 32)), ("three_block", (23, 37))])
def test_forward_matches_diffusers(name, hw):
    """Full reconstruction through the posterior mode, including sizes not divisible by the downscale."""
    x = images(hw, batch=1)
    with torch.no_grad():
        expected = nhwc(torch_vae(name)(nchw(x), sample_posterior=False).sample)
    got = _forward(jax_vae(name), jnp.asarray(x))
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5


@nnx.jit
def _posterior(model, x, key):
    mean, logvar = model.encode(x)
    z = sample_latent(mean, logvar, key)
    sampled = model(x, key, sample_posterior=True)
    return z, mean, model.latents_from_images(x, key), model.latents_from_images(x), sampled, model.decode(z)


def test_posterior_sampling_and_scaling():
    model = jax_vae("two_block")
    x = jnp.asarray(images((8, 8), batch=1))
    z, mean, scaled_sample, scaled_mode, sampled, decoded = _posterior(model, x, jax.random.key(0))
    assert float(jnp.abs(z - mean).max()) > 0
    np.testing.assert_allclose(scaled_sample, z * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(scaled_mode, mean * 0.18215, rtol=1e-6)
    np.testing.assert_allclose(sampled, decoded, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="key"):
        model(x, sample_posterior=True)


@pytest.mark.parametrize("name", ["three_block", "bare"])
def test_export_round_trip_is_exact(name):
    original = torch_state(torch_vae(name))
    exported = export_torch_state(jax_vae(name))
    assert sorted(exported) == sorted(original)
    for k, v in original.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_wrong_inputs_are_refused():
    model = jax_vae("two_block")
    with pytest.raises(ValueError, match=r"\(1, 3, 32, 32\)"):
        model.encode(jnp.zeros((1, 3, 32, 32)))  # NCHW
    with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
        model.encode(jnp.zeros((32, 32, 3)))  # no batch axis
    with pytest.raises(ValueError, match=r"\(1, 4, 4, 3\)"):
        model.decode(jnp.zeros((1, 4, 4, 3)))  # an image, not a latent


def test_config_round_trips_and_refuses_unsupported():
    cfg = VAEConfig.from_diffusers(dict(torch_vae("three_block").config))
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert VAEConfig().block_out_channels == (128, 256, 512, 512) and VAEConfig().downscale == 8
    with pytest.raises(ValueError, match="UpDecoderBlock2D"):
        VAEConfig.from_diffusers({**cfg.to_diffusers(), "up_block_types": ["AttnUpDecoderBlock2D"] * 3})
    with pytest.raises(ValueError, match="latents_mean"):
        VAEConfig.from_diffusers({**cfg.to_diffusers(), "latents_mean": [0.0] * 4})
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_diffusers({**cfg.to_diffusers(), "act_fn": "gelu"})
