"""The optimizer of the trainable weights: AdamW with linear warmup and global-norm clipping, plus an
optional exponential moving average (EMA) of those weights.

Only the trainable set's parameters reach the optimizer (training/step.py splits them off), so its
moments are as large as that set, not as the model: stage 1 updates ~0.8 B of the 2.0 B X-Dyna weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


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

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optimizer.ema_decay must be in [0, 1), got {self.ema_decay}")


def learning_rate(cfg: OptimizerConfig):
    """step -> lr. The first update already moves (lr / warmup_steps), unlike a warmup from exactly 0."""
    if cfg.warmup_steps == 0:
        return optax.constant_schedule(cfg.learning_rate)

    def schedule(step):
        frac = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / cfg.warmup_steps)
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
