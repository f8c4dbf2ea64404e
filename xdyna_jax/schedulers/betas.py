"""Noise-schedule helpers shared by the schedulers: beta tables, the zero-terminal-SNR rescale and the
spacing of inference timesteps.

Everything here runs on the host in NumPy float64; the schedulers cast the resulting tables to float32
for device use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "betas_from_alphas_cumprod",
    "check_num_inference_steps",
    "cosine_betas",
    "make_betas",
    "rescale_zero_terminal_snr",
    "spaced_timesteps",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the squared-cosine alpha-bar schedule (Nichol & Dhariwal, 2021)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
            for i in range(num_steps)
        ]
    )


def make_betas(
    num_train_timesteps: int,
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    trained_betas: Sequence[float] | None = None,
) -> np.ndarray:
    """Float64 betas of a named schedule, or ``trained_betas`` when given (validated by the caller)."""
    n = num_train_timesteps
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float64)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(n)
    raise ValueError(f"beta_schedule={beta_schedule!r} is not one of {BETA_SCHEDULES}.")


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last entry is exactly 0 (zero SNR) while the first is kept
    (Lin et al., 2023, Algorithm 1). Takes and returns alpha-bar, in float64."""
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    if alphas_cumprod.shape[0] < 2:
        raise ValueError("rescale_betas_zero_snr needs num_train_timesteps >= 2.")
    sqrt_ab = np.sqrt(alphas_cumprod)
    first, last = sqrt_ab[0], sqrt_ab[-1]
    # Subtracting the last value first makes the terminal entry an exact zero, not a rounding residue.
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    return sqrt_ab**2


def betas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Invert ``alpha_bar = cumprod(1 - beta)``."""
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int) -> None:
    """Raise unless ``num_inference_steps`` is an int in [1, num_train_timesteps]."""
    t = num_train_timesteps
    if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= t:
        raise ValueError(
            f"num_inference_steps={num_inference_steps!r} must be an int in [1, num_train_timesteps={t}]."
        )


def spaced_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0
) -> np.ndarray:
    """Descending int32 inference timesteps, as diffusers' DDIM-family ``set_timesteps`` spaces them.

    ``"trailing"`` always gives exactly ``num_inference_steps`` entries (diffusers' float ``np.arange`` gives
    one extra, ``-1``, for some step counts such as 61).
    """
    check_num_inference_steps(num_inference_steps, num_train_timesteps)
    t, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        steps = np.linspace(0, t - 1, n).round()[::-1]
    elif spacing == "leading":
        steps = np.arange(n)[::-1] * (t // n) + steps_offset
    elif spacing == "trailing":
        # Same float expression as diffusers' np.arange(t, 0, -t / n) for the first n entries.
        steps = np.round(t - np.arange(n) * (t / n)) - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not one of {TIMESTEP_SPACINGS}.")
    steps = steps.astype(np.int32)
    if steps.max() >= t:
        raise ValueError(
            f"steps_offset={steps_offset} with num_inference_steps={n} gives timestep {steps.max()}"
            f" >= num_train_timesteps={t}."
        )
    return steps


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_schedule_fields(config: Any, prediction_types: Sequence[str]) -> None:
    """The fields every diffusers-style scheduler config shares (the training schedule, spacing, offsets,
    flags): one `ValueError` naming the config class, the field, its value and what was expected."""

    def fail(name: str, expected: str) -> None:
        value = getattr(config, name)
        raise ValueError(f"{type(config).__name__}.{name}={value!r} is invalid: expected {expected}.")

    if not is_int(config.num_train_timesteps) or config.num_train_timesteps < 1:
        fail("num_train_timesteps", "a positive int")
    if config.beta_schedule not in BETA_SCHEDULES:
        fail("beta_schedule", f"one of {BETA_SCHEDULES}")
    if config.timestep_spacing not in TIMESTEP_SPACINGS:
        fail("timestep_spacing", f"one of {TIMESTEP_SPACINGS}")
    if config.prediction_type not in prediction_types:
        fail("prediction_type", f"one of {tuple(prediction_types)}")
    if not is_int(config.steps_offset) or config.steps_offset < 0:
        fail("steps_offset", "a non-negative int")
    for name in ("clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr"):
        if not isinstance(getattr(config, name), (bool, np.bool_)):
            fail(name, "a bool")
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas)
        if betas.shape != (config.num_train_timesteps,) or not np.all((betas > 0) & (betas < 1)):
            fail("trained_betas", f"{config.num_train_timesteps} values in (0, 1)")
    else:
        for name in ("beta_start", "beta_end"):
            value = getattr(config, name)
            if not is_real(value) or not 0 <= value < 1:
                fail(name, "a number in [0, 1)")
        if config.beta_start > config.beta_end:
            fail("beta_start", f"a value <= beta_end={config.beta_end}")
