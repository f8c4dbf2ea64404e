"""The optimizer of the trainable weights: AdamW with linear warmup, an optional learning-rate decay after
it, and global-norm clipping, plus an optional exponential moving average (EMA) of those weights.

Only the trainable set's parameters reach the optimizer (training/step.py splits them off), so its
moments are as large as that set, not as the model: stage 1 updates ~0.8 B of the 2.0 B X-Dyna weights.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

DECAYS = ("constant", "cosine", "linear")  # the learning rate after the warmup


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-5  # the paper's AdamW rate for every module
    warmup_steps: int = 0  # linear warmup: lr * (step + 1) / warmup_steps for the first steps
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2  # torch AdamW's default (what a PyTorch recipe of the paper would use)
    clip_norm: float = 1.0  # global-norm clip of the gradient; <= 0 turns it off
    ema_decay: float = 0.0  # 0: no EMA; else ema <- decay * ema + (1 - decay) * params after each step
    # after the warmup the rate stays (constant: the paper's recipe) or falls along a half cosine / a line to
    # final_lr_fraction * learning_rate at step decay_steps (counted from step 0, warmup included); a falling
    # rate lets the last steps settle into a minimum that a constant rate's step noise keeps it out of
    decay: str = "constant"
    decay_steps: int = 0
    final_lr_fraction: float = 0.0

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optimizer.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.decay not in DECAYS:
            raise ValueError(f"optimizer.decay must be one of {DECAYS}, got {self.decay!r}")
        if self.decay != "constant" and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"optimizer.decay={self.decay!r} needs decay_steps > warmup_steps ({self.warmup_steps}), "
                f"got decay_steps={self.decay_steps}"
            )
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"optimizer.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")


def learning_rate(cfg: OptimizerConfig):
    """step -> lr. The first update already moves (lr / warmup_steps), unlike a warmup from exactly 0; the
    decay starts at full rate on the first step after the warmup and reaches its floor at decay_steps."""
    if cfg.warmup_steps == 0 and cfg.decay == "constant":
        return optax.constant_schedule(cfg.learning_rate)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        frac = jnp.minimum(1.0, (step + 1.0) / cfg.warmup_steps) if cfg.warmup_steps else jnp.float32(1.0)
        if cfg.decay != "constant":
            done = jnp.clip((step - cfg.warmup_steps) / (cfg.decay_steps - cfg.warmup_steps), 0.0, 1.0)
            left = 0.5 * (1.0 + jnp.cos(math.pi * done)) if cfg.decay == "cosine" else 1.0 - done
            frac = frac * (cfg.final_lr_fraction + (1.0 - cfg.final_lr_fraction) * left)
        return cfg.learning_rate * frac

    return schedule


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.clip_norm <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)


def ema_update(ema, params, decay: float):
    """One EMA step of every leaf, in float32 (the EMA shadows fp32 master weights)."""
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)
