"""A training config's sections (`configs/train_xdyna.py`, any ConfigDict of that shape) as the training
package's dataclasses, checked (the trainable set's name among them) before anything is built."""

from __future__ import annotations

from typing import Any

from xdyna_jax.training.dynamictrl_objective import DynamiCtrlObjectiveConfig
from xdyna_jax.training.objective import ObjectiveConfig
from xdyna_jax.training.optimizer import OptimizerConfig
from xdyna_jax.training.step import StepConfig


def optimizer_config(cfg: Any) -> OptimizerConfig:
    """The optimizer section; a decay without its own decay_steps ends at the run's last step."""
    opt = cfg.optimizer.to_dict()
    if opt.get("decay", "constant") != "constant" and not opt.get("decay_steps"):
        opt["decay_steps"] = int(cfg.train.steps)
    return OptimizerConfig(**opt)


def training_configs(
    cfg: Any,
) -> tuple[StepConfig, OptimizerConfig, ObjectiveConfig | DynamiCtrlObjectiveConfig]:
    """(step, optimizer, objective) configs of a run config; a config of kind "dynamictrl"
    (configs/train_dynamictrl.py) has DynamiCtrl's objective."""
    step = cfg.step.to_dict()
    objective = DynamiCtrlObjectiveConfig if cfg.get("kind", "xdyna") == "dynamictrl" else ObjectiveConfig
    return (
        StepConfig(**{**step, "remat": dict(step.get("remat", {}))}),
        optimizer_config(cfg),
        objective(**cfg.objective.to_dict()),
    )
