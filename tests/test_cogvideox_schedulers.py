"""Parity tests of the JAX CogVideoX schedulers against diffusers' CogVideoXDPMScheduler and
CogVideoXDDIMScheduler, with the DPM's noise draws injected into diffusers in order."""

from __future__ import annotations

import dataclasses

import diffusers.schedulers.scheduling_dpm_cogvideox as torch_dpm_module
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler as TorchDDIM
from diffusers import CogVideoXDPMScheduler as TorchDPM

from xdyna_jax.schedulers.cogvideox import (
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXSchedulerConfig,
)

# What the CogVideoX(1.5) releases ship, with the DynamiCtrl release's "trailing" override.
RELEASE = dict(
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    snr_shift_scale=1.0,
    timestep_spacing="trailing",
    clip_sample=False,
)
SHAPE = (1, 2, 4, 4, 3)  # (B, F, H, W, C); the schedulers are elementwise


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-8))


def fake_model(x, t):
    """A fixed function of x and t standing in for the network, so errors compound over steps."""
    return jnp.tanh(x) * (jnp.asarray(t, jnp.float32) / 1000.0) + 0.3 * x + 0.05


def torch_model(x: torch.Tensor, t) -> torch.Tensor:
    return torch.from_numpy(np.array(fake_model(jnp.asarray(x.numpy()), int(t))))


def torch_dpm_loop(monkeypatch, ref: TorchDPM, n: int, latents: np.ndarray, draws: list[np.ndarray]):
    """diffusers' pipeline loop, its generator replaced by ``draws`` handed out in order."""
    queue = iter(draws)
    calls = []

    def injected_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == latents.shape
        calls.append(1)
        return torch.from_numpy(next(queue))

    monkeypatch.setattr(torch_dpm_module, "randn_tensor", injected_randn)
    ref.set_timesteps(n)
    x, old, out = torch.from_numpy(latents), None, []
    for i, t in enumerate(ref.timesteps):
        back = ref.timesteps[i - 1] if i > 0 else None
        x, old = ref.step(torch_model(x, t), old, t, back, x, return_dict=False)
        out.append((x.numpy(), old.numpy()))
    return out, len(calls)


def our_dpm_loop(ours: CogVideoXDPMScheduler, n: int, latents: np.ndarray, draws: list[np.ndarray]):
    used = np.cumsum(ours.noise_draws_per_step(n)) - 1  # each step uses its last draw
    x, old, back, out = jnp.asarray(latents), None, None, []
    for i, t in enumerate(ours.timesteps(n)):
        noise = jnp.asarray(draws[used[i]])
        x, x0 = ours.step(fake_model(x, t), int(t), x, n, noise, old, back)
        old, back = x0, int(t)
        out.append((x, x0))
    return out


def make_draws(seed: int, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(SHAPE, dtype=np.float32)
    return latents, [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(2 * n)]


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_tables(rescale: bool, shift: float) -> None:
    cfg = CogVideoXSchedulerConfig(rescale_betas_zero_snr=rescale, snr_shift_scale=shift)
    ours = CogVideoXDPMScheduler(cfg)
    for ref in (TorchDPM(**cfg.to_diffusers()), TorchDDIM(**cfg.to_diffusers())):
        assert ref.alphas_cumprod.dtype == torch.float64  # scaled_linear is held in float64
        np.testing.assert_allclose(ours.alphas_cumprod_f64, ref.alphas_cumprod.numpy(), rtol=1e-12, atol=0)
        assert ours.final_alpha_cumprod == float(ref.final_alpha_cumprod)
    # Zero SNR is an exact zero in both, which is what makes lambda = -inf at t = 999.
    assert (ours.alphas_cumprod_f64[-1] == 0.0) == rescale
    linear = CogVideoXSchedulerConfig(beta_schedule="linear", rescale_betas_zero_snr=rescale)
    ref = TorchDPM(**linear.to_diffusers())  # float32 in diffusers, float64 here
    np.testing.assert_allclose(
        CogVideoXDPMScheduler(linear).alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_timesteps(spacing: str) -> None:
    for offset in (0, 1) if spacing == "leading" else (0,):
        cfg = CogVideoXSchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
        for n in (1, 7, 10, 25, 50, 999):
            got = CogVideoXDPMScheduler(cfg).timesteps(n)
            assert got.dtype == np.int32 and got.shape == (n,)
            for ref in (TorchDPM(**cfg.to_diffusers()), TorchDDIM(**cfg.to_diffusers())):
                ref.set_timesteps(n)
                np.testing.assert_array_equal(got, ref.timesteps.numpy())
    if spacing == "trailing":
        assert list(CogVideoXDPMScheduler(cfg).timesteps(25)[[0, 1, -1]]) == [999, 959, 39]


DPM_CASES = [
    ("release", RELEASE, 25),
    ("release", RELEASE, 10),
    ("release", RELEASE, 50),
    ("release-7-steps", RELEASE, 7),  # last step has prev_t = 0: second order, alpha_prev = alpha_bar[0]
    ("release-1-step", RELEASE, 1),  # t = 999 straight to prev_t < 0
    ("release-2-steps", RELEASE, 2),  # r = inf and h = inf in the same step
    ("alpha-to-zero", dict(RELEASE, set_alpha_to_one=False), 25),  # last-step noise is used
    ("shift-3-leading", dict(RELEASE, snr_shift_scale=3.0, timestep_spacing="leading", steps_offset=1), 25),
    ("epsilon", dict(prediction_type="epsilon", timestep_spacing="linspace"), 10),
    ("sample", dict(prediction_type="sample", rescale_betas_zero_snr=True, timestep_spacing="trailing"), 10),
]


@pytest.mark.parametrize("name, kwargs, n", DPM_CASES, ids=[f"{c[0]}-{c[2]}" for c in DPM_CASES])
def test_dpm_loop_matches_diffusers(monkeypatch, name: str, kwargs: dict, n: int) -> None:
    cfg = CogVideoXSchedulerConfig(**kwargs)
    ours = CogVideoXDPMScheduler(cfg)
    latents, draws = make_draws(0, n)
    want, num_calls = torch_dpm_loop(monkeypatch, TorchDPM(**cfg.to_diffusers()), n, latents, draws)
    assert num_calls == ours.noise_draws_per_step(n).sum()  # the documented draw order
    got = our_dpm_loop(ours, n, latents, draws)
    for i, ((x, x0), (ref_x, ref_x0)) in enumerate(zip(got, want, strict=True)):
        assert np.isfinite(np.asarray(x)).all() and np.isfinite(np.asarray(x0)).all(), i
        assert rel_err(x, ref_x) < 1e-5, (i, rel_err(x, ref_x))
        assert rel_err(x0, ref_x0) < 1e-5, (i, rel_err(x0, ref_x0))


def test_noise_draws_per_step() -> None:
    ours = CogVideoXDPMScheduler(CogVideoXSchedulerConfig(**RELEASE))
    np.testing.assert_array_equal(ours.noise_draws_per_step(25), [1] + [2] * 23 + [1])
    np.testing.assert_array_equal(ours.noise_draws_per_step(7), [1] + [2] * 6)  # last prev_t is 0
    np.testing.assert_array_equal(ours.noise_draws_per_step(1), [1])


DDIM_CASES = [
    ("release", RELEASE, 25),
    ("release", RELEASE, 10),
    ("release", RELEASE, 50),
    ("shift-3-leading", dict(snr_shift_scale=3.0, timestep_spacing="leading", steps_offset=1), 25),
    ("epsilon-alpha-to-zero", dict(prediction_type="epsilon", set_alpha_to_one=False), 10),
    ("sample", dict(prediction_type="sample", rescale_betas_zero_snr=True, timestep_spacing="trailing"), 10),
]


@pytest.mark.parametrize("name, kwargs, n", DDIM_CASES, ids=[f"{c[0]}-{c[2]}" for c in DDIM_CASES])
def test_ddim_loop_matches_diffusers(name: str, kwargs: dict, n: int) -> None:
    cfg = CogVideoXSchedulerConfig(**kwargs)
    ours, ref = CogVideoXDDIMScheduler(cfg), TorchDDIM(**cfg.to_diffusers())
    ref.set_timesteps(n)
    latents, _ = make_draws(1, 0)
    x, ref_x = jnp.asarray(latents), torch.from_numpy(latents)
    for i, t in enumerate(ours.timesteps(n)):
        x, x0 = ours.step(fake_model(x, t), int(t), x, n)
        ref_x, ref_x0 = ref.step(torch_model(ref_x, t), int(t), ref_x, return_dict=False)
        assert np.isfinite(np.asarray(x)).all(), i
        assert rel_err(x, ref_x.numpy()) < 1e-5, (i, rel_err(x, ref_x.numpy()))
        assert rel_err(x0, ref_x0.numpy()) < 1e-5, (i, rel_err(x0, ref_x0.numpy()))


def test_jitted_scan_loops_equal_eager(monkeypatch) -> None:
    """The whole 25-step release loop under one jax.jit + lax.scan, carrying (x, x0_back, t_back)."""
    n = 25
    cfg = CogVideoXSchedulerConfig(**RELEASE)
    dpm, ddim = CogVideoXDPMScheduler(cfg), CogVideoXDDIMScheduler(cfg)
    latents, draws = make_draws(2, n)
    used = np.cumsum(dpm.noise_draws_per_step(n)) - 1
    noises = jnp.asarray(np.stack([draws[i] for i in used]))
    timesteps = jnp.asarray(dpm.timesteps(n))

    @jax.jit
    def dpm_loop(x, noises):
        def body(carry, inputs):
            x, x0_back, t_back = carry
            t, noise = inputs
            x, x0 = dpm.step(fake_model(x, t), t, x, n, noise, x0_back, t_back)
            return (x, x0, t), x

        carry = (x, jnp.zeros_like(x), jnp.int32(-1))
        return jax.lax.scan(body, carry, (timesteps, noises))[1]

    @jax.jit
    def ddim_loop(x):
        def body(x, t):
            x, _ = ddim.step(fake_model(x, t), t, x, n)
            return x, x

        return jax.lax.scan(body, x, timesteps)[1]

    scanned = dpm_loop(jnp.asarray(latents), noises)
    eager = our_dpm_loop(dpm, n, latents, draws)
    want, _ = torch_dpm_loop(monkeypatch, TorchDPM(**cfg.to_diffusers()), n, latents, draws)
    for i in range(n):
        assert rel_err(scanned[i], eager[i][0]) < 1e-6, i
        assert rel_err(scanned[i], want[i][0]) < 1e-5, i

    scanned = ddim_loop(jnp.asarray(latents))
    x = jnp.asarray(latents)
    for i, t in enumerate(ddim.timesteps(n)):
        x, _ = ddim.step(fake_model(x, t), int(t), x, n)
        assert rel_err(scanned[i], x) < 1e-6, i


@pytest.mark.parametrize("n", [1, 2, 25])
def test_zero_snr_edges_keep_values_and_gradients_finite(n: int) -> None:
    """t = 999 (lambda = -inf), the step after it (r = inf) and the last step (h = inf, an unused infinite
    second-order weight in torch): values and gradients through every input stay finite."""
    ours = CogVideoXDPMScheduler(CogVideoXSchedulerConfig(**RELEASE))
    ts = ours.timesteps(n)
    rng = np.random.default_rng(3)
    v, x, noise, old = (jnp.asarray(rng.standard_normal(SHAPE, dtype=np.float32)) for _ in range(4))
    for i, t in enumerate(ts):
        back = int(ts[i - 1]) if i else -1

        def total(v, x, noise, old, t=t, back=back):
            prev, x0 = ours.step(v, t, x, n, noise, old, back)
            return prev.sum() + x0.sum()

        grads = jax.grad(total, argnums=(0, 1, 2, 3))(v, x, noise, old)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads), t
        prev, x0 = ours.step(v, int(t), x, n, noise, old if i else None, back if i else None)
        assert np.isfinite(np.asarray(prev)).all() and np.isfinite(np.asarray(x0)).all(), t
        if t == 999:
            np.testing.assert_array_equal(x0, -v)  # zero signal: x0 = -v exactly
        if t - 1000 // n < 0:
            np.testing.assert_array_equal(prev, x0)  # alpha_prev = 1: the noise weight is exactly 0


@pytest.mark.parametrize("scheduler", [CogVideoXDPMScheduler, CogVideoXDDIMScheduler])
@pytest.mark.parametrize("kwargs", [RELEASE, dict(snr_shift_scale=3.0)], ids=["release", "shift-3"])
def test_add_noise_and_velocity(scheduler, kwargs: dict) -> None:
    cfg = CogVideoXSchedulerConfig(**kwargs)
    ours = scheduler(cfg)
    ref = (TorchDPM if scheduler is CogVideoXDPMScheduler else TorchDDIM)(**cfg.to_diffusers())
    rng = np.random.default_rng(4)
    shape = (3, *SHAPE[1:])
    x0, noise = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
    timesteps = np.array([0, 421, 999], np.int32)
    tx0, tnoise, tt = (torch.from_numpy(a) for a in (x0, noise, timesteps.astype(np.int64)))
    got = jax.jit(ours.add_noise)(x0, noise, timesteps)
    assert rel_err(got, ref.add_noise(tx0, tnoise, tt).numpy()) < 1e-5
    got = jax.jit(ours.get_velocity)(x0, noise, timesteps)
    assert rel_err(got, ref.get_velocity(tx0, tnoise, tt).numpy()) < 1e-5
    np.testing.assert_array_equal(ours.add_noise(x0, noise, 421), ours.add_noise(x0, noise, np.full(3, 421)))


def test_per_example_timesteps() -> None:
    n = 25
    ours = CogVideoXDPMScheduler(CogVideoXSchedulerConfig(**RELEASE))
    rng = np.random.default_rng(5)
    v, x, noise, old = (jnp.asarray(rng.standard_normal((3, 2, 4, 4, 3), dtype=np.float32)) for _ in range(4))
    ts, backs = jnp.array([999, 959, 39]), jnp.array([-1, 999, 79])
    prev, x0 = ours.step(v, ts, x, n, noise, old, backs)
    for i in range(3):
        one = slice(i, i + 1)
        p, z = ours.step(v[one], int(ts[i]), x[one], n, noise[one], old[one], int(backs[i]))
        np.testing.assert_allclose(prev[one], p, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(x0[one], z, rtol=1e-6, atol=1e-7)


def test_dtypes() -> None:
    ours = CogVideoXDPMScheduler(CogVideoXSchedulerConfig(**RELEASE))
    x = jnp.ones((1, 2, 2, 2, 4), jnp.bfloat16)
    prev, x0 = ours.step(x.astype(jnp.float32), 959, x, 25, x, x, 999)
    assert prev.dtype == x0.dtype == jnp.float32  # bf16 latents, fp32 model output (as the release)
    prev, x0 = CogVideoXDDIMScheduler(ours.config).step(x, 959, x, 25)
    assert prev.dtype == x0.dtype == jnp.bfloat16
    assert ours.add_noise(x, x, 5).dtype == jnp.bfloat16


def test_step_argument_errors() -> None:
    ours = CogVideoXDPMScheduler(CogVideoXSchedulerConfig(**RELEASE))
    x = jnp.zeros((1, 4))
    with pytest.raises(ValueError, match="timestep_back"):
        ours.step(x, 959, x, 25, x, old_pred_original_sample=x)
    with pytest.raises(ValueError, match="old_pred_original_sample"):
        ours.step(x, 959, x, 25, x, timestep_back=999)
    with pytest.raises(ValueError, match="noise"):
        ours.step(x, 959, x, 25, jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.step(x, 959, x, 0, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        CogVideoXDDIMScheduler().timesteps(1001)


def test_config_from_diffusers_round_trip() -> None:
    released = {  # the shape of CogVideoX(1.5)-5B(-I2V)'s scheduler/scheduler_config.json
        "_class_name": "CogVideoXDDIMScheduler",
        "_diffusers_version": "0.32.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "sample_max_value": 1.0,
        "set_alpha_to_one": True,
        "snr_shift_scale": 1.0,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
        "trained_betas": None,
    }
    cfg = CogVideoXSchedulerConfig.from_diffusers(released)
    assert cfg == CogVideoXSchedulerConfig(**RELEASE)
    assert CogVideoXSchedulerConfig.from_diffusers(cfg.to_diffusers()) == cfg
    hash(cfg)  # usable as a static jit argument
    for ref_cls in (TorchDPM, TorchDDIM):
        ref = ref_cls.from_config(released)
        for key, value in cfg.to_diffusers().items():
            assert ref.config[key] == value, (ref_cls.__name__, key)
    # Missing keys take diffusers' class defaults (snr_shift_scale 3.0, not the release's 1.0).
    assert CogVideoXSchedulerConfig.from_diffusers({}).snr_shift_scale == TorchDPM().config.snr_shift_scale
    betas = np.linspace(1e-4, 2e-2, 10).tolist()
    tiny = CogVideoXSchedulerConfig(num_train_timesteps=10, trained_betas=betas, snr_shift_scale=2.0)
    assert isinstance(tiny.trained_betas, tuple)
    np.testing.assert_allclose(
        CogVideoXDPMScheduler(tiny).alphas_cumprod,
        TorchDPM(**tiny.to_diffusers()).alphas_cumprod.numpy(),
        rtol=0,
        atol=1e-6,
    )
    assert dataclasses.replace(cfg, timestep_spacing="leading").timestep_spacing == "leading"


@pytest.mark.parametrize(
    "name, value",
    [
        ("beta_schedule", "sigmoid"),
        ("timestep_spacing", "uniform"),
        ("prediction_type", "flow"),
        ("num_train_timesteps", 0),
        ("steps_offset", -1),
        ("snr_shift_scale", 0.0),
        ("rescale_betas_zero_snr", "true"),
        ("beta_start", 1.5),
        ("trained_betas", [0.1, 0.2]),
        ("thresholding", True),
    ],
)
def test_bad_config_raises(name: str, value) -> None:
    with pytest.raises(ValueError, match=name):
        CogVideoXSchedulerConfig.from_diffusers({"_class_name": "CogVideoXDPMScheduler", name: value})
