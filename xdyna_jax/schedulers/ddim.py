"""DDIM scheduler (Song et al., 2020) in pure JAX, semantically matching diffusers' ``DDIMScheduler``.

The scheduler is stateless: the number of inference steps is passed to every call instead of being set
with ``set_timesteps``, so one instance can be closed over by jitted code without hidden mutation.

Deliberate differences from diffusers (0.42.1):

* the noise schedule is computed in float64 and cast to float32 (diffusers uses float32 throughout; the
  two agree to < 1e-6 absolute);
* ``"trailing"`` spacing always returns exactly ``num_inference_steps`` timesteps (diffusers' float
  ``np.arange`` returns one extra, ``-1``, for some step counts such as 61);
* arithmetic runs in float32 whatever the input dtype, and results are cast back to the sample's dtype;
* dynamic thresholding (``thresholding=True``) is not implemented.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xdyna_jax.schedulers.betas import (
    betas_from_alphas_cumprod,
    check_num_inference_steps,
    check_schedule_fields,
    is_real,
    make_betas,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)

__all__ = ["DDIMConfig", "DDIMScheduler"]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
    """DDIM hyper-parameters; field names and defaults are those of diffusers' ``DDIMScheduler``."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        # Lists (as read from JSON) would make the frozen dataclass unhashable, and hashability lets the
        # config be a static jit argument.
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        self._validate()

    def _validate(self) -> None:
        check_schedule_fields(self, _PREDICTION_TYPES)
        if not is_real(self.clip_sample_range) or not self.clip_sample_range > 0:
            raise ValueError(
                f"DDIMConfig.clip_sample_range={self.clip_sample_range!r} is invalid: expected a positive number."
            )

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> DDIMConfig:
        """Build from a diffusers scheduler config dict (e.g. a loaded ``scheduler_config.json``).

        Keys this port does not model (``_class_name``, ``skip_prk_steps``, ...) are ignored, so configs
        written for other schedulers (SD1.5 ships a PNDM config) load too. Missing keys take diffusers'
        DDIM defaults. ``thresholding=True`` raises, as it would silently change results if ignored.
        """
        if config.get("thresholding", False):
            raise ValueError("DDIMConfig: thresholding=True (dynamic thresholding) is not supported.")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_diffusers(self) -> dict[str, Any]:
        """Return the config as a diffusers-style dict (accepted by ``diffusers.DDIMScheduler(**d)``)."""
        out = dataclasses.asdict(self)
        if out["trained_betas"] is not None:
            out["trained_betas"] = list(out["trained_betas"])
        return out


def _betas(config: DDIMConfig) -> np.ndarray:
    """Float64 betas for ``config``."""
    betas = make_betas(
        config.num_train_timesteps,
        config.beta_schedule,
        config.beta_start,
        config.beta_end,
        config.trained_betas,
    )
    if config.rescale_betas_zero_snr:
        betas = betas_from_alphas_cumprod(rescale_zero_terminal_snr(np.cumprod(1.0 - betas)))
    return betas


def _per_example(coeff: jax.Array, ndim: int) -> jax.Array:
    """Reshape a scalar or (B,) coefficient to broadcast against a (B, ...) array of rank ``ndim``."""
    return jnp.reshape(coeff, (-1,) + (1,) * (ndim - 1)) if coeff.ndim else coeff


class DDIMScheduler:
    """Stateless DDIM sampler; all methods except :meth:`timesteps` are jit/scan friendly.

    Attributes:
        config: the :class:`DDIMConfig`.
        alphas_cumprod: (num_train_timesteps,) float32 cumulative product of ``1 - beta``.
        final_alpha_cumprod: alpha-bar used for the step past ``t = 0`` (1.0 or ``alphas_cumprod[0]``).
    """

    init_noise_sigma: float = 1.0

    def __init__(self, config: DDIMConfig | None = None) -> None:
        self.config = config if config is not None else DDIMConfig()
        alphas_cumprod = np.cumprod(1.0 - _betas(self.config))
        self.alphas_cumprod = jnp.asarray(alphas_cumprod, dtype=jnp.float32)
        self.final_alpha_cumprod = (
            1.0 if self.config.set_alpha_to_one else float(np.float32(alphas_cumprod[0]))
        )

    def _check_num_steps(self, num_inference_steps: int) -> None:
        check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Descending int32 timesteps for a sampling run (host-side, so loop lengths stay static)."""
        cfg = self.config
        return spaced_timesteps(
            cfg.num_train_timesteps, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset
        )

    def _alpha_prod(self, timesteps: jax.Array) -> jax.Array:
        return self.alphas_cumprod[jnp.asarray(timesteps, jnp.int32)]

    def step(
        self,
        model_output: jax.Array,
        timestep: int | jax.Array,
        sample: jax.Array,
        num_inference_steps: int,
        eta: float = 0.0,
        key: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """One reverse DDIM update from ``timestep`` to ``timestep - num_train_timesteps // num_inference_steps``.

        Args:
            model_output: network prediction (epsilon, v or x0 per ``config.prediction_type``), shape (B, ...).
            timestep: current timestep; int, or traced int scalar / (B,) array.
            sample: current noisy sample x_t, same shape as ``model_output``.
            num_inference_steps: static number of sampling steps (fixes the stride to the previous timestep).
            eta: static noise weight; 0 is deterministic DDIM, 1 is DDPM-like.
            key: ``jax.random`` key for the noise, required when ``eta > 0``. The noise is
                ``jax.random.normal(key, sample.shape, jnp.float32)``.

        Returns:
            ``(prev_sample, pred_original_sample)``, both in ``sample.dtype``.
        """
        self._check_num_steps(num_inference_steps)
        if not eta >= 0:
            raise ValueError(f"eta={eta!r} must be >= 0.")
        if eta > 0 and key is None:
            raise ValueError(f"eta={eta} > 0 needs a jax.random key for the noise.")
        cfg = self.config
        out_dtype = sample.dtype
        x = sample.astype(jnp.float32)
        model_output = model_output.astype(jnp.float32)

        timestep = jnp.asarray(timestep, jnp.int32)
        prev_timestep = timestep - cfg.num_train_timesteps // num_inference_steps
        alpha_t = self._alpha_prod(timestep)
        # Past t = 0 there is no alpha-bar to look up; clamp the index so the gather stays in range.
        alpha_prev = jnp.where(
            prev_timestep >= 0, self._alpha_prod(jnp.maximum(prev_timestep, 0)), self.final_alpha_cumprod
        )
        beta_t, beta_prev = 1.0 - alpha_t, 1.0 - alpha_prev
        variance = (beta_prev / beta_t) * (1.0 - alpha_t / alpha_prev)
        std = eta * jnp.sqrt(variance)

        a_t, b_t, a_prev, std = (_per_example(c, x.ndim) for c in (alpha_t, beta_t, alpha_prev, std))
        if cfg.prediction_type == "epsilon":
            x0 = (x - jnp.sqrt(b_t) * model_output) / jnp.sqrt(a_t)
            eps = model_output
        elif cfg.prediction_type == "sample":
            x0 = model_output
            eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(b_t)
        else:  # v_prediction
            x0 = jnp.sqrt(a_t) * x - jnp.sqrt(b_t) * model_output
            eps = jnp.sqrt(a_t) * model_output + jnp.sqrt(b_t) * x
        if cfg.clip_sample:
            x0 = jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)

        # eps is deliberately the unclipped prediction (diffusers' use_clipped_model_output=False). The
        # clamp only guards against float rounding taking the radicand a hair below zero when eta = 1.
        direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - std**2, 0.0)) * eps
        prev_sample = jnp.sqrt(a_prev) * x0 + direction
        if eta > 0:
            prev_sample = prev_sample + std * jax.random.normal(key, x.shape, jnp.float32)
        return prev_sample.astype(out_dtype), x0.astype(out_dtype)

    def _sqrt_alphas(
        self, timesteps: int | Sequence[int] | jax.Array, ndim: int
    ) -> tuple[jax.Array, jax.Array]:
        alpha = self._alpha_prod(timesteps)
        return _per_example(jnp.sqrt(alpha), ndim), _per_example(jnp.sqrt(1.0 - alpha), ndim)

    def add_noise(
        self, original_samples: jax.Array, noise: jax.Array, timesteps: int | Sequence[int] | jax.Array
    ) -> jax.Array:
        """Forward diffusion q(x_t | x_0): ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise``.

        ``timesteps`` is a scalar or (B,) int array, broadcast over samples of shape (B, ...) of any rank.
        """
        sqrt_a, sqrt_b = self._sqrt_alphas(timesteps, original_samples.ndim)
        noisy = sqrt_a * original_samples.astype(jnp.float32) + sqrt_b * noise.astype(jnp.float32)
        return noisy.astype(original_samples.dtype)

    def get_velocity(
        self, sample: jax.Array, noise: jax.Array, timesteps: int | Sequence[int] | jax.Array
    ) -> jax.Array:
        """v-prediction target ``sqrt(a_t) * noise - sqrt(1 - a_t) * sample`` (Salimans & Ho, 2022).

        ``timesteps`` broadcasts as in :meth:`add_noise`.
        """
        sqrt_a, sqrt_b = self._sqrt_alphas(timesteps, sample.ndim)
        velocity = sqrt_a * noise.astype(jnp.float32) - sqrt_b * sample.astype(jnp.float32)
        return velocity.astype(sample.dtype)
