"""DynamiCtrl's fine-tuning objective: the release's full-transformer SFT loss, on precomputed latents.

A batch holds everything the frozen VAE and T5 would produce, computed before the step (`data.prepare`):

    latents        (B, F', h, w, C)  the clip's video latents, already x the VAE scaling factor (0.7)
    image_latents  (B, 1, h, w, C)   the latent of the clip's noised reference frame (frame 0), x 0.7
    pose_latents   (B, F', h, w, C)  the pose video's latents, x 0.7
    text           (B, L, D_text)    T5 embeddings of the caption (L = 226 for the release)

The reference frame is noised in pixel space before it is encoded, x_ref + sigma * n with
log sigma ~ N(-3, 0.5) per example (`noise_reference_frame`); that happens where the image latent is
computed, i.e. when the batch is prepared, not in this step (the VAE sits outside it). The step draws, from
its key, per example: t ~ U{0, ..., T-1}, the noise eps, and whether the image latent is dropped (all zeros,
with probability `image_dropout`). Then, with the CogVideoX schedule's alpha-bar (scaled-linear betas
0.00085 .. 0.012, zero-terminal-SNR rescale, SNR shift 1):

    x_t   = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    v_hat = model([x_t ; image latent zero-padded to F'] on channels, text, t, pose, ofs=2)
    x0hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v_hat        (the scheduler's get_velocity of v_hat)
    loss  = mean_b mean((x0hat - x0)^2 / (1 - abar_t))

as the release writes it; the weight makes it the v-prediction MSE, mean (v_hat - v)^2. 1 - abar_t is never 0:
abar_0 = 1 - 0.00085 and the zero-SNR end has abar_999 = 0, i.e. weight 1. Text is never dropped, as in the
release.

Two things the release draws anew at every step come fixed from precomputed batches: the VAE posterior
samples of the clip, reference and pose (prepared once), and the reference's pixel noise. A dataset prepared
with several noised encodings of each reference brings the latter back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xdyna_jax.schedulers.cogvideox import CogVideoXDDIMScheduler, CogVideoXSchedulerConfig

DYNAMICTRL_BATCH_KEYS = ("latents", "image_latents", "pose_latents", "text")


@dataclasses.dataclass(frozen=True)
class DynamiCtrlObjectiveConfig:
    """The release's training schedule (CogVideoX1.5's scheduler_config.json) and SFT randomness."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    rescale_betas_zero_snr: bool = True
    snr_shift_scale: float = 1.0
    # each example's image latent becomes all zeros with this probability (the unconditional image signal)
    image_dropout: float = 0.05
    ofs: float = 2.0  # CogVideoX1.5 I2V's offset embedding input, as the release passes it
    # the reference frame's pixel noise before encoding: sigma = exp(N(mean, std)) per example
    reference_noise_log_mean: float = -3.0
    reference_noise_log_std: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.image_dropout <= 1.0:
            raise ValueError(f"objective.image_dropout must be in [0, 1], got {self.image_dropout}")
        if self.reference_noise_log_std < 0:
            raise ValueError(
                f"objective.reference_noise_log_std must be >= 0, got {self.reference_noise_log_std}"
            )
        top = float(self.scheduler().alphas_cumprod_f64.max())
        if not top < 1.0:
            raise ValueError(
                f"objective: the schedule's alpha-bar reaches {top} (beta_start={self.beta_start}); the loss "
                "weight 1 / (1 - alpha-bar) needs alpha-bar < 1 at every timestep"
            )

    def scheduler(self) -> CogVideoXDDIMScheduler:
        return _scheduler(
            CogVideoXSchedulerConfig(
                num_train_timesteps=self.num_train_timesteps,
                beta_start=self.beta_start,
                beta_end=self.beta_end,
                beta_schedule=self.beta_schedule,
                prediction_type="v_prediction",
                rescale_betas_zero_snr=self.rescale_betas_zero_snr,
                snr_shift_scale=self.snr_shift_scale,
            )
        )

    def alphas_cumprod(self) -> jax.Array:
        """(T,) float32 alpha-bar of the schedule (the samplers' own table)."""
        return self.scheduler().alphas_cumprod

    def loss_weights(self) -> jax.Array:
        """(T,) float32 1 / (1 - alpha-bar_t), computed in float64 (1 - abar_0 is ~8.5e-4)."""
        return jnp.asarray(1.0 / (1.0 - self.scheduler().alphas_cumprod_f64), jnp.float32)


@functools.cache
def _scheduler(cfg: CogVideoXSchedulerConfig) -> CogVideoXDDIMScheduler:
    return CogVideoXDDIMScheduler(cfg)


class DynamiCtrlDraws(NamedTuple):
    """Everything random in one loss evaluation, drawn from one key (so a test can replay it)."""

    timesteps: jax.Array  # (B,) int32
    noise: jax.Array  # (B, F', h, w, C) float32
    drop_image: jax.Array  # (B,) bool: this example's image latent becomes zeros


def draw_dynamictrl(key: jax.Array, latents_shape: tuple[int, ...], cfg: DynamiCtrlObjectiveConfig):
    b = latents_shape[0]
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    return DynamiCtrlDraws(
        timesteps=jax.random.randint(k_t, (b,), 0, cfg.num_train_timesteps, jnp.int32),
        noise=jax.random.normal(k_noise, tuple(latents_shape), jnp.float32),
        drop_image=jax.random.bernoulli(k_drop, cfg.image_dropout, (b,)),
    )


def noise_reference_frame(frame: jax.Array, key: jax.Array, cfg: DynamiCtrlObjectiveConfig) -> jax.Array:
    """Reference frames (B, ..., H, W, 3) in [-1, 1] plus sigma * N(0, 1), log sigma ~ N(mean, std) per
    example: what the release does to the reference before the VAE encodes it (done when the dataset is
    prepared: `data.prepare_dynamictrl.reference_pixel_noise`, with the same draws from the same key)."""
    from xdyna_jax.data.prepare_dynamictrl import reference_pixel_noise

    noised, _ = reference_pixel_noise(frame, key, cfg.reference_noise_log_mean, cfg.reference_noise_log_std)
    return noised


def model_input(noisy: jax.Array, image_latents: jax.Array, drop_image: jax.Array) -> jax.Array:
    """[x_t ; image latent in frame 0, zeros after (and everywhere for dropped examples)] on channels."""
    image = jnp.where(drop_image[:, None, None, None, None], 0.0, image_latents.astype(jnp.float32))
    pad = noisy.shape[1] - image.shape[1]
    image = jnp.pad(image, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    return jnp.concatenate([noisy, image], axis=-1)


def dynamictrl_loss(model, batch: dict, draws: DynamiCtrlDraws, cfg: DynamiCtrlObjectiveConfig) -> jax.Array:
    """The SFT loss of `batch` (see the module docstring) under `draws`, float32 scalar. `model` is called as
    DynamiCtrlTransformerModel: model(hidden, text, timestep, pose, ofs=...)."""
    sched = cfg.scheduler()
    x0 = batch["latents"].astype(jnp.float32)
    t = draws.timesteps
    noisy = sched.add_noise(x0, draws.noise, t)
    hidden = model_input(noisy, batch["image_latents"], draws.drop_image)
    v_hat = model(hidden, batch["text"], t, batch["pose_latents"], ofs=cfg.ofs).astype(jnp.float32)
    x0_hat = sched.get_velocity(v_hat, noisy, t)  # sqrt(abar) x_t - sqrt(1 - abar) v_hat
    weights = cfg.loss_weights()[t].reshape(-1, *(1,) * (x0.ndim - 1))
    per_example = jnp.mean((weights * jnp.square(x0_hat - x0)).reshape(x0.shape[0], -1), axis=1)
    return jnp.mean(per_example)


def check_dynamictrl_batch(batch: dict) -> None:
    """One clear error for a batch the DynamiCtrl step cannot use (run on shapes before compiling)."""
    for key in DYNAMICTRL_BATCH_KEYS:
        if key not in batch:
            raise ValueError(f"DynamiCtrl training batch has no {key!r} (it has {sorted(batch)})")
    shape = lambda k: tuple(np.shape(batch[k]))  # noqa: E731
    lat = shape("latents")
    if len(lat) != 5:
        raise ValueError(f"batch['latents'] must be video latents (B, F', h, w, C), got {lat}")
    b, f, h, w, c = lat
    if f % 2:
        raise ValueError(
            f"batch['latents'] has {f} latent frames; CogVideoX1.5's temporal patch needs an even count "
            "(clips of 1 + 4k frames with k odd, e.g. the release's 37 -> 10)"
        )
    if shape("pose_latents") != lat:
        raise ValueError(
            f"batch['pose_latents'] must have the latents' shape {lat}, got {shape('pose_latents')}"
        )
    if shape("image_latents") != (b, 1, h, w, c):
        raise ValueError(
            f"batch['image_latents'] must be the reference frame's latent {(b, 1, h, w, c)}, "
            f"got {shape('image_latents')}"
        )
    text = shape("text")
    if len(text) != 3 or text[0] != b:
        raise ValueError(f"batch['text'] must be T5 embeddings (B={b}, L, D), got {text}")
