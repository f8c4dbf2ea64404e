"""CogVideoX's two samplers in pure JAX, matching diffusers' ``CogVideoXDPMScheduler`` and
``CogVideoXDDIMScheduler`` (0.42.1).

Both share one noise schedule: betas -> alpha-bar, then an SNR shift ``a / (s + (1 - s) a)`` with
``s = snr_shift_scale`` (as in SD3), then optionally the zero-terminal-SNR rescale applied to alpha-bar. With
the rescale, ``alpha_bar[T - 1]`` is exactly 0, so the first step of a trailing schedule (t = 999) has zero
signal and log-SNR ``lambda = -inf``.

* :class:`CogVideoXDDIMScheduler` is deterministic DDIM (eta = 0): ``x_prev = a x_t + b x0``.
* :class:`CogVideoXDPMScheduler` is a DPM-Solver++(2M)-SDE-style step. With ``h = lambda_prev - lambda_t``::

      x_prev = sigma_prev / sigma_t * e^{-h} x_t + sqrt(alpha_prev) (1 - e^{-2h}) D
               + sigma_prev sqrt(1 - e^{-2h}) noise

  where ``D = x0`` on a first-order step and ``D = (1 + 1/(2r)) x0 - 1/(2r) x0_back`` on a second-order
  one, ``r = (lambda_t - lambda_back) / h``. A step is first order when there is no previous step or when
  the previous timestep falls below 0. Both schedulers are stateless: the DPM's multistep state (the
  previous step's x0 and timestep) is passed in and returned explicitly, so a sampling loop runs under
  ``jax.lax.scan``.

The zero-SNR edges follow torch's IEEE arithmetic: at t = 999, h = +inf, so ``e^{-h} = 0`` and the step
is ``x_prev = sqrt(alpha_prev) x0 + sigma_prev noise`` with x0 = -v (v-prediction); on the step after it
``lambda_back = -inf`` gives r = inf and ``1/(2r) = 0`` (second order in form, first order in value); on a
last step whose previous timestep is < 0 with ``set_alpha_to_one``, ``alpha_prev = 1`` gives h = +inf and
``x_prev = x0`` with the noise weighted by exactly 0. The second-order weight is computed only where it is
used, so torch's unused ``inf`` coefficient on that last step never meets a finite 0 (no ``inf * 0``).

Deliberate differences from diffusers:

* the schedule is computed in float64 for every ``beta_schedule`` (diffusers keeps float64 only for
  ``scaled_linear``, CogVideoX's schedule, and float32 otherwise) and the per-timestep quantities the steps
  use (sqrt(alpha_bar), sqrt(1 - alpha_bar), lambda) are tabulated in float64 before the cast to float32,
  so ``1 - alpha_bar`` near t = 0 keeps its precision on device;
* arithmetic runs in float32; outputs take the promoted dtype of ``sample`` and ``model_output``;
* ``"trailing"`` spacing always returns exactly ``num_inference_steps`` timesteps.

As in diffusers, both steps ignore ``clip_sample`` (and ``clip_sample_range`` / ``sample_max_value``): the
fields are kept so configs round-trip, but nothing is clipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xdyna_jax.schedulers.betas import (
    check_num_inference_steps,
    check_schedule_fields,
    is_real,
    make_betas,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)

__all__ = ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler", "CogVideoXSchedulerConfig"]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclasses.dataclass(frozen=True)
class CogVideoXSchedulerConfig:
    """Hyper-parameters of both CogVideoX schedulers; names and defaults are those of diffusers'
    ``CogVideoXDPMScheduler`` / ``CogVideoXDDIMScheduler`` (which share them).

    The defaults are diffusers' class defaults, not CogVideoX's released settings: the released
    ``scheduler_config.json`` files set ``prediction_type="v_prediction"``, ``rescale_betas_zero_snr=True``,
    ``snr_shift_scale=1.0`` and ``timestep_spacing="trailing"``, and a config that omits
    ``snr_shift_scale`` gets 3.0.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True  # ignored by both steps, as in diffusers
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    clip_sample_range: float = 1.0  # ignored, as in diffusers
    sample_max_value: float = 1.0  # ignored, as in diffusers
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    snr_shift_scale: float = 3.0

    def __post_init__(self) -> None:
        # Lists (as read from JSON) would make the frozen dataclass unhashable; hashable configs can be
        # static jit arguments.
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        self._validate()

    def _validate(self) -> None:
        check_schedule_fields(self, _PREDICTION_TYPES)

        def fail(name: str, expected: str) -> None:
            raise ValueError(
                f"CogVideoXSchedulerConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}."
            )

        for name in ("clip_sample_range", "sample_max_value"):
            if not is_real(getattr(self, name)):
                fail(name, "a number")
        # Any positive shift keeps the shifted alpha-bar inside (0, 1].
        if not is_real(self.snr_shift_scale) or not self.snr_shift_scale > 0:
            fail("snr_shift_scale", "a positive number")
        if self.rescale_betas_zero_snr and self.num_train_timesteps < 2:
            fail("rescale_betas_zero_snr", "False when num_train_timesteps < 2")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> CogVideoXSchedulerConfig:
        """Build from a diffusers scheduler config dict (a loaded ``scheduler_config.json``).

        Either CogVideoX class name is accepted (the DynamiCtrl release loads the DPM scheduler from a
        ``CogVideoXDDIMScheduler`` config). Metadata keys (``_class_name``, ``_diffusers_version``) and
        keys these schedulers do not have are ignored, as diffusers ignores them; missing keys take the
        class defaults (note ``snr_shift_scale=3.0``). Values this port does not implement raise: an unknown
        schedule / spacing / prediction type, and ``thresholding=True`` (which neither CogVideoX step
        performs, so honouring the config is impossible and ignoring it would be silent).
        """
        if config.get("thresholding", False):
            raise ValueError(
                "CogVideoXSchedulerConfig: thresholding=True (dynamic thresholding) is not supported."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_diffusers(self) -> dict[str, Any]:
        """The config as a diffusers-style dict (accepted by both diffusers CogVideoX schedulers)."""
        out = dataclasses.asdict(self)
        if out["trained_betas"] is not None:
            out["trained_betas"] = list(out["trained_betas"])
        return out


def _per_example(coeff: jax.Array, ndim: int) -> jax.Array:
    """Reshape a scalar or (B,) coefficient to broadcast against a (B, ...) array of rank ``ndim``."""
    return jnp.reshape(coeff, (-1,) + (1,) * (ndim - 1)) if coeff.ndim else coeff


class _CogVideoXSchedule:
    """The schedule tables and the methods both CogVideoX schedulers share.

    Attributes:
        config: the :class:`CogVideoXSchedulerConfig`.
        alphas_cumprod_f64: (T,) NumPy float64 alpha-bar after the SNR shift and optional rescale.
        alphas_cumprod: the same as a float32 device array.
        final_alpha_cumprod: alpha-bar used past t = 0 (1.0, or ``alphas_cumprod[0]`` without
            ``set_alpha_to_one``).
    """

    init_noise_sigma: float = 1.0

    def __init__(self, config: CogVideoXSchedulerConfig | None = None) -> None:
        cfg = config if config is not None else CogVideoXSchedulerConfig()
        self.config = cfg
        betas = make_betas(
            cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.trained_betas
        )
        alpha_bar = np.cumprod(1.0 - betas)
        shift = float(cfg.snr_shift_scale)
        alpha_bar = alpha_bar / (shift + (1.0 - shift) * alpha_bar)
        if cfg.rescale_betas_zero_snr:
            alpha_bar = rescale_zero_terminal_snr(alpha_bar)
        self.alphas_cumprod_f64 = alpha_bar
        self.alphas_cumprod = jnp.asarray(alpha_bar, dtype=jnp.float32)
        self.final_alpha_cumprod = 1.0 if cfg.set_alpha_to_one else float(alpha_bar[0])

        # Tables indexed by timestep, with one extra entry at index T for "past t = 0" so that a previous
        # timestep < 0 becomes an ordinary in-range gather. Computed in float64 and only then cast: in
        # float32, 1 - alpha_bar near t = 0 (~8.5e-4) would carry ~1e-4 relative error into every sigma.
        table = np.concatenate([alpha_bar, [self.final_alpha_cumprod]])
        with np.errstate(divide="ignore"):
            # lambda = log(sqrt(a / (1 - a))): -inf where a = 0 (zero SNR), +inf where a = 1.
            log_snr = np.log(np.sqrt(table / (1.0 - table)))
        self._sqrt_alpha = jnp.asarray(np.sqrt(table), jnp.float32)
        self._sigma = jnp.asarray(np.sqrt(1.0 - table), jnp.float32)
        self._log_snr = jnp.asarray(log_snr, jnp.float32)

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Descending int32 timesteps for a sampling run (host-side, so loop lengths stay static)."""
        cfg = self.config
        return spaced_timesteps(
            cfg.num_train_timesteps, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset
        )

    def _prev_index(self, timestep: jax.Array, num_inference_steps: int) -> tuple[jax.Array, jax.Array]:
        """(previous timestep, its table index): ``t - T // n``, mapped to the final entry when < 0."""
        check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        prev_timestep = timestep - self.config.num_train_timesteps // num_inference_steps
        return prev_timestep, jnp.where(prev_timestep >= 0, prev_timestep, self.config.num_train_timesteps)

    def _pred_original_sample(
        self, model_output: jax.Array, sample: jax.Array, sqrt_alpha: jax.Array, sigma: jax.Array
    ) -> jax.Array:
        """x0 from the network output. Epsilon-prediction at zero SNR divides by 0, as diffusers does."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - sigma * model_output) / sqrt_alpha
        if kind == "sample":
            return model_output
        return sqrt_alpha * sample - sigma * model_output  # v_prediction

    def _sqrt_alphas(
        self, timesteps: int | Sequence[int] | jax.Array, ndim: int
    ) -> tuple[jax.Array, jax.Array]:
        index = jnp.asarray(timesteps, jnp.int32)
        return _per_example(self._sqrt_alpha[index], ndim), _per_example(self._sigma[index], ndim)

    def add_noise(
        self, original_samples: jax.Array, noise: jax.Array, timesteps: int | Sequence[int] | jax.Array
    ) -> jax.Array:
        """Forward diffusion q(x_t | x_0): ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise``.

        ``timesteps`` is a scalar or (B,) int array, broadcast over samples of shape (B, ...) of any rank.
        """
        sqrt_a, sigma = self._sqrt_alphas(timesteps, original_samples.ndim)
        noisy = sqrt_a * original_samples.astype(jnp.float32) + sigma * noise.astype(jnp.float32)
        return noisy.astype(original_samples.dtype)

    def get_velocity(
        self, sample: jax.Array, noise: jax.Array, timesteps: int | Sequence[int] | jax.Array
    ) -> jax.Array:
        """v-prediction target ``sqrt(a_t) * noise - sqrt(1 - a_t) * sample``; timesteps as in add_noise."""
        sqrt_a, sigma = self._sqrt_alphas(timesteps, sample.ndim)
        velocity = sqrt_a * noise.astype(jnp.float32) - sigma * sample.astype(jnp.float32)
        return velocity.astype(sample.dtype)


class CogVideoXDDIMScheduler(_CogVideoXSchedule):
    """Deterministic DDIM on the CogVideoX schedule; every method except :meth:`timesteps` is jit/scan
    friendly."""

    def step(
        self,
        model_output: jax.Array,
        timestep: int | jax.Array,
        sample: jax.Array,
        num_inference_steps: int,
    ) -> tuple[jax.Array, jax.Array]:
        """One update from ``timestep`` to ``timestep - num_train_timesteps // num_inference_steps``.

        Args:
            model_output: network prediction (per ``config.prediction_type``), shape (B, ...).
            timestep: current timestep; int, or traced int scalar / (B,) array.
            sample: current x_t, same shape as ``model_output``.
            num_inference_steps: static number of sampling steps (fixes the stride).

        Returns:
            ``(prev_sample, pred_original_sample)`` in the promoted dtype of the inputs.
        """
        out_dtype = jnp.promote_types(sample.dtype, model_output.dtype)
        x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        timestep = jnp.asarray(timestep, jnp.int32)
        _, prev_index = self._prev_index(timestep, num_inference_steps)
        sqrt_a, sigma, sqrt_a_prev, sigma_prev = (
            _per_example(table[index], x.ndim)
            for table, index in (
                (self._sqrt_alpha, timestep),
                (self._sigma, timestep),
                (self._sqrt_alpha, prev_index),
                (self._sigma, prev_index),
            )
        )
        x0 = self._pred_original_sample(out, x, sqrt_a, sigma)
        coeff_sample = sigma_prev / sigma
        coeff_x0 = sqrt_a_prev - sqrt_a * coeff_sample
        prev_sample = coeff_sample * x + coeff_x0 * x0
        return prev_sample.astype(out_dtype), x0.astype(out_dtype)


class CogVideoXDPMScheduler(_CogVideoXSchedule):
    """CogVideoX's DPM-Solver++(2M)-SDE-style sampler; every method except :meth:`timesteps` and
    :meth:`noise_draws_per_step` is jit/scan friendly.

    A sampling loop carries ``(x, x0_back, t_back)``, starting from ``(x_T, zeros, -1)``::

        for t, noise in zip(timesteps, noises):
            x, x0 = scheduler.step(v(x, t), t, x, n, noise, old_pred_original_sample=x0_back,
                                   timestep_back=t_back)
            x0_back, t_back = x0, t

    Noise: diffusers draws ``randn(sample.shape)`` from the pipeline's generator once on a first-order step
    and twice on a second-order step, using only the second draw (the first belongs to a first-order
    result that is discarded). :meth:`noise_draws_per_step` gives the count per step; the ``noise`` to pass
    is always the step's last draw. A last step whose previous timestep is < 0 with ``set_alpha_to_one``
    still consumes its draw but weights it by exactly 0. Draws are shaped like ``sample``: a torch draw in
    (B, F, C, H, W) must be moved to this project's channels-last (B, F, H, W, C) before it is passed.
    """

    def noise_draws_per_step(self, num_inference_steps: int) -> np.ndarray:
        """Host-side int32 (n,): how many normal draws diffusers' step takes from the generator at each
        step of ``timesteps(n)`` (1 on the first step and on a step whose previous timestep is < 0, else 2;
        the last draw of each step is the one used)."""
        timesteps = self.timesteps(num_inference_steps)
        prev = timesteps - self.config.num_train_timesteps // num_inference_steps
        draws = np.where(prev < 0, 1, 2).astype(np.int32)
        draws[0] = 1
        return draws

    def step(
        self,
        model_output: jax.Array,
        timestep: int | jax.Array,
        sample: jax.Array,
        num_inference_steps: int,
        noise: jax.Array,
        old_pred_original_sample: jax.Array | None = None,
        timestep_back: int | jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """One update from ``timestep`` to ``timestep - num_train_timesteps // num_inference_steps``.

        Args:
            model_output: network prediction (per ``config.prediction_type``), shape (B, ...).
            timestep: current timestep; int, or traced int scalar / (B,) array.
            sample: current x_t, same shape as ``model_output``.
            num_inference_steps: static number of sampling steps (fixes the stride).
            noise: the standard-normal draw this step uses, shaped like ``sample`` (see the class notes on
                which of diffusers' draws that is).
            old_pred_original_sample: the previous step's ``pred_original_sample``; None on the first step
                (treated as zeros).
            timestep_back: the previous step's timestep; None or negative on the first step. Under
                ``jax.lax.scan`` carry -1 into the first step instead of None.

        Returns:
            ``(prev_sample, pred_original_sample)`` in the promoted dtype of ``sample`` and
            ``model_output``; carry ``pred_original_sample`` and ``timestep`` into the next step.
        """
        if old_pred_original_sample is not None and timestep_back is None:
            raise ValueError("old_pred_original_sample was given without its timestep_back.")
        if timestep_back is None:
            timestep_back = -1
        elif old_pred_original_sample is None and isinstance(timestep_back, (int, np.integer, np.ndarray)):
            if np.any(np.asarray(timestep_back) >= 0):
                raise ValueError(
                    f"timestep_back={timestep_back} >= 0 needs the previous step's old_pred_original_sample."
                )
        if noise.shape != sample.shape:
            raise ValueError(f"noise has shape {noise.shape}; expected sample's shape {sample.shape}.")

        out_dtype = jnp.promote_types(sample.dtype, model_output.dtype)
        x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        old_x0 = (
            jnp.zeros_like(x)
            if old_pred_original_sample is None
            else old_pred_original_sample.astype(jnp.float32)
        )
        timestep = jnp.asarray(timestep, jnp.int32)
        timestep_back = jnp.asarray(timestep_back, jnp.int32)
        prev_timestep, prev_index = self._prev_index(timestep, num_inference_steps)
        has_back = timestep_back >= 0
        second_order = has_back & (prev_timestep >= 0)

        sqrt_a, sigma, log_snr = self._sqrt_alpha[timestep], self._sigma[timestep], self._log_snr[timestep]
        sqrt_a_prev, sigma_prev = self._sqrt_alpha[prev_index], self._sigma[prev_index]
        log_snr_prev = self._log_snr[prev_index]
        log_snr_back = self._log_snr[jnp.where(has_back, timestep_back, 0)]

        # h = +inf when either end has zero SNR or alpha_prev = 1; every use below is finite then:
        # e^{-h} = 0 and expm1(-2h) = -1.
        h = log_snr_prev - log_snr
        coeff_sample = sigma_prev / sigma * jnp.exp(-h)
        coeff_x0 = jnp.expm1(-2.0 * h) * sqrt_a_prev  # <= 0; subtracted, as diffusers writes it
        coeff_noise = sigma_prev * jnp.sqrt(-jnp.expm1(-2.0 * h))
        # Second-order weight 1/(2r), r = (lambda_t - lambda_back) / h. lambda_back = -inf makes r = inf and
        # the weight 0 (torch's value); on first-order steps r may be 0 or nan (h = inf), so it is replaced
        # before the division and the weight forced to 0 there.
        ratio = jnp.where(second_order, (log_snr - log_snr_back) / jnp.where(second_order, h, 1.0), 1.0)
        back_weight = jnp.where(second_order, 1.0 / (2.0 * ratio), 0.0)

        sqrt_a, sigma = _per_example(sqrt_a, x.ndim), _per_example(sigma, x.ndim)
        coeff_sample, coeff_x0, coeff_noise, back_weight = (
            _per_example(c, x.ndim) for c in (coeff_sample, coeff_x0, coeff_noise, back_weight)
        )
        x0 = self._pred_original_sample(out, x, sqrt_a, sigma)
        denoised = jnp.where(
            _per_example(second_order, x.ndim), (1.0 + back_weight) * x0 - back_weight * old_x0, x0
        )
        prev_sample = coeff_sample * x - coeff_x0 * denoised + coeff_noise * noise.astype(jnp.float32)
        return prev_sample.astype(out_dtype), x0.astype(out_dtype)
