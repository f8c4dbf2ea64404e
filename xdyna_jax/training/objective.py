"""X-Dyna's training objective: epsilon-prediction MSE on the driven frames of a window.

A training window is [reference ; N driven frames] of clean VAE latents (B, 1 + N, h, w, 4). The driven
frames are noised at one timestep per example, t ~ U{0, ..., T-1}, with the release's schedule (linear betas
0.00085..0.012 over 1000 steps, the one its DDIM sampler is configured with):

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,      loss = mean over frames 1..N of (eps_hat - eps)^2

The reference frame 0 stays clean (the sampler never noises it either) and is left out of the loss: the model
only ever reads it.

Loss weighting (both off by default: the plain mean above). Each example's error is weighted by
clip(SNR_t, snr_floor, snr_gamma) / SNR_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t). Since
|eps_hat - eps|^2 = SNR_t |x0_hat - x0|^2, the plain loss weights the clean-frame error by SNR_t, which
is ~0.002 at the noisiest steps: there the frame's layout and colours are decided, and what only the reference
can tell (a background, an identity's colours) hardly enters the gradient.
- `snr_gamma` > 0 caps the weight at gamma (Min-SNR-gamma, Hang et al. 2023; diffusers' `--snr_gamma`): the
  nearly clean steps count less.
- `snr_floor` > 0 keeps the clean-frame weight at least `snr_floor` (with 1: the "truncated SNR" weighting of
  Salimans & Ho 2022, max(SNR_t, 1) |x0_hat - x0|^2): the noisiest steps count as much as an x0 loss.
For classifier-free guidance the unconditional signal is the IP-Adapter tokens of an
all-zero normalised image (what the sampler's uncond half uses), so each example's image tokens are replaced
by those with probability `image_dropout`, drawn from the step's key.

A VAE trained from scratch (the `vae` trainable set) has its own objective, `vae_loss`: frames (B, F, H, W, 3)
in [-1, 1] are encoded, one latent drawn from each posterior with the step's key, decoded, and

    loss = mean |x_hat - x| + vae_kl_weight * mean KL(N(mu, sigma^2) || N(0, 1))

with both means per element (pixels, latent entries), or the squared error with `vae_reconstruction="mse"`.
L1 (the reconstruction term of SD's autoencoder, without its perceptual and adversarial terms, which need
pretrained networks) keeps edges sharper once a VAE is trained; MSE's gradients grow with the error, so a
small VAE trained for minutes learns every colour axis instead of brightness first (the synthetic recipe's
choice, configs/train_xdyna.py). The small KL weight only keeps the latents from drifting far from unit
scale, the diffusion model reads them through the scaling factor measured after training
(training/vae_stage.py).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from xdyna_jax.models.vae import sample_latent
from xdyna_jax.sampling.bundles import XDYNA_SCHEDULER
from xdyna_jax.schedulers import DDIMScheduler
from xdyna_jax.training.dynamictrl_objective import (
    DynamiCtrlObjectiveConfig,
    check_dynamictrl_batch,
    draw_dynamictrl,
    dynamictrl_loss,
)

VAE_RECONSTRUCTIONS = ("l1", "mse")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    num_train_timesteps: int = XDYNA_SCHEDULER.num_train_timesteps
    beta_start: float = XDYNA_SCHEDULER.beta_start
    beta_end: float = XDYNA_SCHEDULER.beta_end
    beta_schedule: str = XDYNA_SCHEDULER.beta_schedule
    # IP-Adapter's own training drops the image prompt (to a zero image) for 5 % of examples; the X-Dyna
    # release ships no training code, so its rate is unknown.
    image_dropout: float = 0.05
    # loss weighting clip(SNR, snr_floor, snr_gamma) / SNR (the module docstring); 0 turns each bound off
    snr_gamma: float = 0.0
    snr_floor: float = 0.0
    # the VAE stage (vae_loss): reconstruction "l1" | "mse" and the weight of the per-element KL term
    vae_reconstruction: str = "l1"
    vae_kl_weight: float = 1e-4

    def __post_init__(self):
        if not 0.0 <= self.image_dropout <= 1.0:
            raise ValueError(f"objective.image_dropout must be in [0, 1], got {self.image_dropout}")
        for name in ("snr_gamma", "snr_floor"):
            if getattr(self, name) < 0:
                raise ValueError(f"objective.{name} must be >= 0 (0: off), got {getattr(self, name)}")
        if self.snr_gamma and self.snr_floor > self.snr_gamma:
            raise ValueError(
                f"objective.snr_floor {self.snr_floor} is above objective.snr_gamma {self.snr_gamma}"
            )
        if self.vae_reconstruction not in VAE_RECONSTRUCTIONS:
            raise ValueError(
                f"objective.vae_reconstruction must be one of {VAE_RECONSTRUCTIONS}, got {self.vae_reconstruction!r}"
            )
        if self.vae_kl_weight < 0:
            raise ValueError(f"objective.vae_kl_weight must be >= 0, got {self.vae_kl_weight}")

    def alphas_cumprod(self) -> jax.Array:
        """(T,) float32 alpha_bar of the schedule (the DDIM sampler's own table, so both agree)."""
        sched = dataclasses.replace(
            XDYNA_SCHEDULER,
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
        )
        return DDIMScheduler(sched).alphas_cumprod


class Draws(NamedTuple):
    """Everything random in one loss evaluation, drawn from one key (so a test can replay it)."""

    timesteps: jax.Array  # (B,) int32
    noise: jax.Array  # (B, N, h, w, C) float32, for the driven frames
    drop_image: jax.Array  # (B,) bool: this example's image tokens become the zero-image tokens


def draw(key: jax.Array, latents_shape: tuple[int, ...], cfg: ObjectiveConfig) -> Draws:
    b, f = latents_shape[:2]
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    return Draws(
        timesteps=jax.random.randint(k_t, (b,), 0, cfg.num_train_timesteps, jnp.int32),
        noise=jax.random.normal(k_noise, (b, f - 1, *latents_shape[2:]), jnp.float32),
        drop_image=jax.random.bernoulli(k_drop, cfg.image_dropout, (b,)),
    )


def add_noise(x0: jax.Array, noise: jax.Array, timesteps: jax.Array, alphas_cumprod: jax.Array) -> jax.Array:
    """x_t of clean `x0` (B, ...) at per-example `timesteps` (B,), in float32."""
    ab = alphas_cumprod[timesteps].reshape(-1, *(1,) * (x0.ndim - 1))
    return jnp.sqrt(ab) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - ab) * noise


def drop_image_tokens(image_tokens: jax.Array, null_tokens: jax.Array, drop: jax.Array) -> jax.Array:
    """(B, T, D) image tokens with the rows of `drop` (B,) replaced by `null_tokens` (T, D)."""
    null = jnp.broadcast_to(null_tokens.astype(image_tokens.dtype), image_tokens.shape)
    return jnp.where(drop[:, None, None], null, image_tokens)


def batch_size(batch: dict) -> int:
    """Examples in a training batch (a denoiser's latents windows or a VAE's frames)."""
    return batch["images" if "images" in batch and "latents" not in batch else "latents"].shape[0]


def check_batch(batch: dict) -> None:
    """One clear error for a batch the step cannot use (run on shapes before compiling)."""
    if "images" in batch and "latents" not in batch:
        return check_vae_batch(batch)
    if "pose_latents" in batch:
        return check_dynamictrl_batch(batch)
    for key in ("latents", "text", "image_tokens"):
        if key not in batch:
            raise ValueError(f"training batch has no {key!r} (it has {sorted(batch)})")
    lat = batch["latents"]
    if len(lat.shape) != 5 or lat.shape[1] < 2:
        raise ValueError(
            f"batch['latents'] must be windows (B, 1 + N, h, w, C) with N >= 1, got {tuple(lat.shape)}"
        )
    b, n = lat.shape[0], lat.shape[1] - 1
    for key in ("text", "image_tokens"):
        if len(batch[key].shape) != 3 or batch[key].shape[0] != b:
            raise ValueError(f"batch[{key!r}] must be (B={b}, L, D), got {tuple(batch[key].shape)}")
    for key in ("pose", "face"):
        if batch.get(key) is not None and tuple(batch[key].shape[:2]) != (b, n):
            raise ValueError(
                f"batch[{key!r}] must cover the {n} driven frames (B={b}, {n}, H, W, C), "
                f"got {tuple(batch[key].shape)}"
            )


def snr_weights(timesteps: jax.Array, alphas_cumprod: jax.Array, gamma: float = 0.0, floor: float = 0.0):
    """(B,) loss weights clip(SNR_t, floor, gamma) / SNR_t of epsilon prediction (a bound of 0 is off)."""
    if gamma == 0 and floor == 0:
        return jnp.ones(timesteps.shape, jnp.float32)
    ab = alphas_cumprod[timesteps].astype(jnp.float32)
    snr = ab / (1.0 - ab)
    clipped = snr
    if floor:
        clipped = jnp.maximum(clipped, floor)
    if gamma:
        clipped = jnp.minimum(clipped, gamma)
    return clipped / snr


def diffusion_loss(
    denoiser,
    batch: dict,
    null_tokens: jax.Array,
    draws: Draws,
    alphas_cumprod: jax.Array,
    snr_gamma: float = 0.0,
    snr_floor: float = 0.0,
):
    """Mean squared epsilon error over frames 1..N of `batch` (see the module docstring), float32 scalar;
    each example's error weighted by `snr_weights` when a bound is set.

    batch: latents (B, 1+N, h, w, C) clean, frame 0 the reference; text (B, L, D); image_tokens (B, T, D);
    optional pose (B, N, H, W, 3) and face (B, N, H, W, 6) conditions of the driven frames.
    """
    latents = batch["latents"]
    reference = latents[:, :1].astype(jnp.float32)
    noisy = add_noise(latents[:, 1:], draws.noise, draws.timesteps, alphas_cumprod)
    window = jnp.concatenate([reference, noisy], axis=1)
    image = drop_image_tokens(batch["image_tokens"], null_tokens, draws.drop_image)
    context = jnp.concatenate([batch["text"], image.astype(batch["text"].dtype)], axis=1)
    eps = denoiser(window, draws.timesteps, context, batch.get("pose"), batch.get("face"))
    per_example = jnp.mean(
        jnp.square(eps[:, 1:].astype(jnp.float32) - draws.noise), axis=tuple(range(1, eps.ndim))
    )
    return jnp.mean(snr_weights(draws.timesteps, alphas_cumprod, snr_gamma, snr_floor) * per_example)


def check_vae_batch(batch: dict) -> None:
    """One clear error for a VAE stage's batch: images (B, F, H, W, 3), H and W multiples of 8."""
    images = batch.get("images")
    if images is None or len(images.shape) != 5 or images.shape[-1] != 3:
        shape = None if images is None else tuple(images.shape)
        raise ValueError(f"a VAE batch needs images (B, F, H, W, 3) in [-1, 1], got {shape}")


def vae_loss(vae, batch: dict, key: jax.Array, cfg: ObjectiveConfig) -> jax.Array:
    """Reconstruction + KL of `batch["images"]` through `vae` (see the module docstring), float32 scalar."""
    images = batch["images"]
    x = images.reshape(-1, *images.shape[-3:]).astype(jnp.float32)
    mean, logvar = vae.encode(x)
    recon = vae.decode(sample_latent(mean, logvar, key))
    error = recon - x
    rec = jnp.mean(jnp.abs(error)) if cfg.vae_reconstruction == "l1" else jnp.mean(jnp.square(error))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return rec + cfg.vae_kl_weight * kl


def training_loss(model, batch: dict, null_tokens, key: jax.Array, cfg: ObjectiveConfig, alphas_cumprod):
    """The objective of `model`'s kind: `vae_loss` for a VAE, the SFT loss for a DynamiCtrl transformer
    (cfg a DynamiCtrlObjectiveConfig; see training/dynamictrl_objective.py), else `diffusion_loss`; draws
    from `key`."""
    if type(model).__name__ == "AutoencoderKL":
        return vae_loss(model, batch, key, cfg)
    if type(model).__name__ == "DynamiCtrlTransformerModel":
        if not isinstance(cfg, DynamiCtrlObjectiveConfig):
            raise TypeError(
                f"a DynamiCtrl transformer trains with a DynamiCtrlObjectiveConfig, got {type(cfg).__name__}"
            )
        return dynamictrl_loss(model, batch, draw_dynamictrl(key, batch["latents"].shape, cfg), cfg)
    draws = draw(key, batch["latents"].shape, cfg)
    return diffusion_loss(model, batch, null_tokens, draws, alphas_cumprod, cfg.snr_gamma, cfg.snr_floor)
