"""X-Dyna's initial latents against the recipe written here with torch (blur from the Gaussian's equation)
and diffusers' add_noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as TorchDDIM
from oracle import rel_err

from xdyna_jax.sampling.bundles import XDYNA_SCHEDULER
from xdyna_jax.sampling.init_latents import gaussian_blur, initial_latents
from xdyna_jax.schedulers import DDIMScheduler

N, C = 5, 4


def torch_gaussian_blur(x, size=9, sigma=18.0):
    """The 2-D kernel from the Gaussian's equation, reflect padding, one conv per channel (NCHW)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    kernel = (g / g.sum()).float()[None, None].repeat(x.shape[1], 1, 1, 1)
    padded = torch.nn.functional.pad(x, (size // 2,) * 4, mode="reflect")
    return torch.nn.functional.conv2d(padded, kernel, groups=x.shape[1])


def test_initial_latents_follow_the_release_recipe():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((12, 10, C)).astype(np.float32)
    mask = rng.random((N, 12, 10, C)) < 0.5
    noise = rng.standard_normal((N, 12, 10, C)).astype(np.float32)
    scheduler = DDIMScheduler(XDYNA_SCHEDULER)
    got = np.asarray(
        initial_latents(jnp.asarray(ref), N, scheduler, 961, mask=jnp.asarray(mask), noise=jnp.asarray(noise))
    )
    blurred = torch_gaussian_blur(torch.from_numpy(ref).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    mixed = np.where(mask, ref[None], blurred[None])
    torch_ddim = TorchDDIM(**XDYNA_SCHEDULER.to_diffusers())
    want = torch_ddim.add_noise(torch.from_numpy(mixed), torch.from_numpy(noise), torch.tensor([961])).numpy()
    np.testing.assert_array_equal(got[0], ref)  # frame 0: the clean reference
    assert rel_err(got[1:], want) < 1e-5
    assert rel_err(np.asarray(gaussian_blur(jnp.asarray(ref[None])))[0], blurred) < 1e-6
    # drawn from a key: reproducible, and another key gives other latents
    a, b = (initial_latents(jnp.asarray(ref), 3, scheduler, 961, key=jax.random.key(k)) for k in (0, 0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = initial_latents(jnp.asarray(ref), 3, scheduler, 961, key=jax.random.key(1))
    assert float(jnp.abs(a - c).max()) > 0.1
    with pytest.raises(ValueError, match="pass `key`"):
        initial_latents(jnp.asarray(ref), 3, scheduler, 961)
