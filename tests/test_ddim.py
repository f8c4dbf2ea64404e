"""Parity tests of the JAX DDIM scheduler against diffusers' torch DDIMScheduler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as TorchDDIM

from xdyna_jax.schedulers import DDIMConfig, DDIMScheduler

# Stable Diffusion 1.5's noise schedule; X-Dyna uses the same betas with a "linear" schedule.
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-8))


def make_pair(**kwargs) -> tuple[DDIMScheduler, TorchDDIM]:
    config = DDIMConfig(**kwargs)
    return DDIMScheduler(config), TorchDDIM(**config.to_diffusers())


def torch_step(ref: TorchDDIM, model_output, t: int, sample, eta: float = 0.0, noise=None):
    out = ref.step(
        torch.from_numpy(np.array(model_output)),
        int(t),
        torch.from_numpy(np.array(sample)),
        eta=eta,
        variance_noise=None if noise is None else torch.from_numpy(np.array(noise)),
    )
    return out.prev_sample.numpy(), out.pred_original_sample.numpy()


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("rescale", [False, True])
def test_alphas_cumprod(schedule: str, rescale: bool) -> None:
    ours, ref = make_pair(beta_schedule=schedule, rescale_betas_zero_snr=rescale, **SD_BETAS)
    assert ours.alphas_cumprod.dtype == jnp.float32
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    assert ours.final_alpha_cumprod == float(ref.final_alpha_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n", [1, 7, 10, 25, 50, 999, 1000])
def test_timesteps(spacing: str, offset: int, n: int) -> None:
    ours, ref = make_pair(timestep_spacing=spacing, steps_offset=offset)
    if spacing == "leading" and offset and n == 1000:
        with pytest.raises(ValueError, match="steps_offset"):
            ours.timesteps(n)
        return
    ref.set_timesteps(n)
    got = ours.timesteps(n)
    assert got.dtype == np.int32 and got.shape == (n,)
    np.testing.assert_array_equal(got, ref.timesteps.numpy())


def test_trailing_timesteps_have_exact_length() -> None:
    # diffusers' float np.arange yields n + 1 timesteps (the last being -1) for n = 61; we keep the first n.
    ours, ref = make_pair(timestep_spacing="trailing")
    ref.set_timesteps(61)
    got = ours.timesteps(61)
    assert got.shape == (61,) and got.min() >= 0
    np.testing.assert_array_equal(got, ref.timesteps.numpy()[:61])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_step(prediction_type: str, clip_sample: bool, set_alpha_to_one: bool, schedule: str) -> None:
    kwargs = dict(
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        set_alpha_to_one=set_alpha_to_one,
        beta_schedule=schedule,
        steps_offset=1,
        **SD_BETAS,
    )
    ours, ref = make_pair(**kwargs)
    # A second reference on our (float64-derived) alpha table isolates the update formula from table
    # rounding: diffusers' float32 cumprod is off by ~1 ulp, and x0-prediction near t = 0 divides by
    # sqrt(1 - alpha_t) ~ 0.04, which turns that into ~3e-5 relative error.
    shared = TorchDDIM(**ours.config.to_diffusers())
    shared.alphas_cumprod = torch.from_numpy(np.array(ours.alphas_cumprod))
    n = 10
    ref.set_timesteps(n)
    shared.set_timesteps(n)
    rng = np.random.default_rng(0)
    step = jax.jit(ours.step, static_argnums=(3,))
    # First, a middle and the last timestep (the last one exercises final_alpha_cumprod).
    for t in ours.timesteps(n)[[0, 4, -1]]:
        model_output = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
        sample = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
        prev, x0 = step(model_output, jnp.int32(t), sample, n)
        tol = 1e-4 if prediction_type == "sample" else 1e-5
        for reference, tolerance in ((ref, tol), (shared, 1e-5)):
            ref_prev, ref_x0 = torch_step(reference, model_output, t, sample)
            assert rel_err(prev, ref_prev) < tolerance, t
            assert rel_err(x0, ref_x0) < tolerance, t


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_jitted_scan_loop(set_alpha_to_one: bool) -> None:
    """10-step X-Dyna-style loop under jit + lax.scan on a 5-D video latent vs the torch loop."""
    ours, ref = make_pair(beta_schedule="linear", steps_offset=1, clip_sample=False,
                          set_alpha_to_one=set_alpha_to_one, **SD_BETAS)  # fmt: skip
    n = 10
    ref.set_timesteps(n)
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((1, 3, 8, 8, 4), dtype=np.float32)

    # A fake "denoiser" that depends on t and x, so errors would compound across steps.
    def model(x, t):
        return jnp.tanh(x) * (t.astype(jnp.float32) / 1000.0) + 0.1 * x

    @jax.jit
    def sample_loop(x):
        def body(x, t):
            prev, _ = ours.step(model(x, t), t, x, n)
            return prev, None

        return jax.lax.scan(body, x, jnp.asarray(ours.timesteps(n)))[0]

    got = sample_loop(latents)
    x = torch.from_numpy(latents)
    for t in ref.timesteps:
        eps = torch.from_numpy(np.array(model(jnp.asarray(x.numpy()), jnp.int32(t))))
        x = ref.step(eps, t, x).prev_sample
    assert rel_err(got, x.numpy()) < 1e-5


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_step_eta_same_noise(eta: float, set_alpha_to_one: bool) -> None:
    ours, ref = make_pair(set_alpha_to_one=set_alpha_to_one, clip_sample=False, **SD_BETAS)
    n = 25
    ref.set_timesteps(n)
    rng = np.random.default_rng(2)
    shape = (2, 2, 4, 4, 3)
    for i, t in enumerate(ours.timesteps(n)[[0, 12, -1]]):
        key = jax.random.key(i)
        model_output = rng.standard_normal(shape, dtype=np.float32)
        sample = rng.standard_normal(shape, dtype=np.float32)
        prev, x0 = ours.step(model_output, t, sample, n, eta=eta, key=key)
        noise = jax.random.normal(key, shape, jnp.float32)  # the same draw step() makes
        ref_prev, ref_x0 = torch_step(ref, model_output, t, sample, eta=eta, noise=noise)
        assert rel_err(prev, ref_prev) < 1e-5, t
        assert rel_err(x0, ref_x0) < 1e-5, t


def test_eta_zero_ignores_key_and_eta_needs_key() -> None:
    ours = DDIMScheduler()
    x = jnp.ones((1, 4))
    a = ours.step(x, 500, x, 10)
    b = ours.step(x, 500, x, 10, key=jax.random.key(0))
    np.testing.assert_array_equal(a[0], b[0])
    with pytest.raises(ValueError, match="key"):
        ours.step(x, 500, x, 10, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        ours.step(x, 500, x, 10, eta=-1.0, key=jax.random.key(0))


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (3, 2, 8, 8, 4)])
def test_add_noise_and_velocity(shape: tuple[int, ...]) -> None:
    ours, ref = make_pair(beta_schedule="scaled_linear", **SD_BETAS)
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal(shape, dtype=np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32)
    timesteps = np.array([0, 421, 999], np.int32)
    tx0, tnoise, tt = (torch.from_numpy(a) for a in (x0, noise, timesteps.astype(np.int64)))
    add_noise = jax.jit(ours.add_noise)
    assert rel_err(add_noise(x0, noise, timesteps), ref.add_noise(tx0, tnoise, tt).numpy()) < 1e-6
    assert rel_err(ours.get_velocity(x0, noise, timesteps), ref.get_velocity(tx0, tnoise, tt).numpy()) < 1e-6
    # A scalar timestep broadcasts over the whole batch.
    np.testing.assert_allclose(
        ours.add_noise(x0, noise, 421), ours.add_noise(x0, noise, np.full(3, 421)), rtol=0, atol=0
    )


def test_bf16_keeps_dtype() -> None:
    ours = DDIMScheduler()
    x = jnp.ones((2, 4, 4, 4), jnp.bfloat16)
    prev, x0 = ours.step(x, jnp.int32(981), x, 20)
    assert prev.dtype == x0.dtype == jnp.bfloat16
    assert ours.add_noise(x, x, jnp.array([1, 2])).dtype == jnp.bfloat16


def test_per_example_timesteps_in_step() -> None:
    ours = DDIMScheduler(DDIMConfig(steps_offset=1))
    rng = np.random.default_rng(4)
    model_output = rng.standard_normal((2, 3, 4, 4), dtype=np.float32)
    sample = rng.standard_normal((2, 3, 4, 4), dtype=np.float32)
    prev, _ = ours.step(model_output, jnp.array([961, 41]), sample, 25)
    for i, t in enumerate([961, 41]):
        np.testing.assert_allclose(
            prev[i], ours.step(model_output[i : i + 1], t, sample[i : i + 1], 25)[0][0]
        )


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_xdyna_release_config(set_alpha_to_one: bool) -> None:
    """X-Dyna inference: linear 0.00085..0.012, steps_offset 1, 25 DDIM steps (first/last timestep)."""
    ours, ref = make_pair(beta_schedule="linear", steps_offset=1, clip_sample=False,
                          set_alpha_to_one=set_alpha_to_one, **SD_BETAS)  # fmt: skip
    ref.set_timesteps(25)
    ts = ours.timesteps(25)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    assert ts[0] == 961 and ts[-1] == 1
    rng = np.random.default_rng(5)
    for t in ts[[0, -1]]:
        model_output = rng.standard_normal((1, 2, 4, 4, 4), dtype=np.float32)
        sample = rng.standard_normal((1, 2, 4, 4, 4), dtype=np.float32)
        prev, x0 = ours.step(model_output, t, sample, 25)
        ref_prev, ref_x0 = torch_step(ref, model_output, t, sample)
        assert rel_err(prev, ref_prev) < 1e-5 and rel_err(x0, ref_x0) < 1e-5


def test_config_round_trip_and_from_diffusers() -> None:
    sd15 = {  # SD1.5's scheduler_config.json (written for PNDM)
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    }
    config = DDIMConfig.from_diffusers(sd15)
    assert (
        config.steps_offset == 1 and not config.set_alpha_to_one and config.beta_schedule == "scaled_linear"
    )
    assert DDIMConfig.from_diffusers(config.to_diffusers()) == config
    hash(config)  # usable as a static jit argument
    # The dict round-trips through diffusers too.
    ref = TorchDDIM.from_config(sd15)
    for key, value in config.to_diffusers().items():
        assert ref.config[key] == value, key
    betas = np.linspace(1e-4, 2e-2, 10).tolist()
    ours, ref = make_pair(num_train_timesteps=10, trained_betas=betas)
    assert isinstance(ours.config.trained_betas, tuple)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "name, value",
    [
        ("beta_schedule", "cosine"),
        ("timestep_spacing", "uniform"),
        ("prediction_type", "x0"),
        ("num_train_timesteps", 0),
        ("steps_offset", -1),
        ("clip_sample", "false"),
        ("clip_sample_range", 0.0),
        ("beta_start", 1.5),
        ("trained_betas", [0.1, 0.2]),
    ],
)
def test_bad_config_raises(name: str, value) -> None:
    with pytest.raises(ValueError, match=name):
        DDIMConfig.from_diffusers({"_class_name": "DDIMScheduler", name: value})


def test_thresholding_unsupported() -> None:
    with pytest.raises(ValueError, match="thresholding"):
        DDIMConfig.from_diffusers({"thresholding": True})
    DDIMConfig.from_diffusers({"thresholding": False})


@pytest.mark.parametrize("n", [0, 1001, -3, 2.5])
def test_bad_num_inference_steps(n) -> None:
    ours = DDIMScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.timesteps(n)
    x = jnp.zeros((1, 4))
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.step(x, 0, x, n)
