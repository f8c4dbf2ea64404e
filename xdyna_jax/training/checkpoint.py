"""Training checkpoints: the TrainState, the data position and the run's config, with orbax.

    ckpts = Checkpoints(output / "checkpoints", keep=3)
    ckpts.save(step, state, data_state=source.get_state(), config=cfg.to_dict())   # async
    state, data_state, config = ckpts.restore(abstract_state(shapes, shardings))

Each save is one orbax `CheckpointManager` step holding three items: `state` (every array of the TrainState:
params, frozen weights, optimizer moments, EMA, step, RNG), `data` (each process's example-source position,
JSON) and `config` (JSON). Saves are asynchronous: `save` returns once the arrays are copied off the devices
(the next step may then donate them) and the files are written in the background. orbax writes a step into
a temporary folder and renames it into place when complete, so a run killed mid-save leaves the previous
checkpoints intact and the partial one is never restored. Only the newest `keep` steps are kept.

Restoring takes an abstract target (shapes, dtypes and the shardings wanted now), so a checkpoint written
on one mesh restores onto any other: each device reads only its shards.

`StopRequest` turns SIGTERM (how pre-emptible TPU VMs and most schedulers announce the end) into a flag the
loop reads at each step boundary; it then saves and exits normally. On several processes, JAX's
coordination service receives the notice instead, and orbax's `reached_preemption` makes every process
agree on the step to stop at.
"""

from __future__ import annotations

import base64
import json
import signal
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from xdyna_jax.training.step import TrainState


class CheckpointError(ValueError):
    """A checkpoint folder that cannot continue this run (none there, or another run's)."""


def abstract_state(shapes: TrainState, shardings: TrainState) -> TrainState:
    """The restore target: each array's shape and dtype with the sharding it should get."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def _encode_position(state: Any) -> Any:
    # grain's loader iterators report bytes; JSON needs text
    return {"bytes_b64": base64.b64encode(state).decode()} if isinstance(state, bytes) else state


def _decode_position(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"bytes_b64"}:
        return base64.b64decode(state["bytes_b64"])
    return state


def gather_positions(position: Any) -> list:
    """Every process's data position, in process order (each process reads its own share of the data)."""
    if jax.process_count() == 1:
        return [_encode_position(position)]
    data = np.frombuffer(json.dumps(_encode_position(position)).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(r[: int(n)]).decode()) for r, n in zip(rows, sizes.reshape(-1), strict=True)]


class Checkpoints:
    """An orbax CheckpointManager over `directory` (see the module docstring)."""

    def __init__(self, directory: str | Path, *, keep: int = 3, asynchronous: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, *, data_state: Any, config: dict) -> None:
        """Start saving `state` as step `step` (returns once the arrays are off the devices)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"processes": gather_positions(data_state)}),
            config=ocp.args.JsonSave(config),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, Any, dict]:
        """(state placed as `target` says, this process's data position, the saved config)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        restored = self.manager.restore(step, args=args)
        positions = restored.data["processes"]
        if len(positions) != jax.process_count():
            raise CheckpointError(
                f"{self.directory / str(step)} was written by {len(positions)} processes; this run has "
                f"{jax.process_count()} (each process's data position belongs to its own share of the data)"
            )
        return restored.state, _decode_position(positions[jax.process_index()]), dict(restored.config)

    def read_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(restored.config)

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class StopRequest:
    """`with StopRequest() as stop: ... if stop.requested(step, ckpts): save; exit` (see the module docstring)."""

    def __init__(self):
        self._flag = False
        self._previous = None

    def _handler(self, signum, frame):
        self._flag = True

    def __enter__(self) -> StopRequest:
        # on several processes JAX's own preemption notifier must keep the signal (see module docstring)
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def requested(self, step: int, checkpoints: Checkpoints) -> bool:
        if jax.process_count() == 1:
            return self._flag
        return checkpoints.reached_preemption(step)
