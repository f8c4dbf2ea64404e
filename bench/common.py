"""What the benchmarks share: timing a call, running a worker in its own process, timing a jitted call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def time_calls(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of `repeats` calls of fn after `warmup` untimed calls (the first also compiles, for JAX)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def spawn(module: str, args: list[str]) -> dict:
    """Run `python -m module args` in a fresh process (its own peak RSS); parse the JSON of its last line."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=os.environ
    )
    if proc.returncode:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_jitted(fwd, params, inputs: tuple, repeats: int) -> tuple[list[float], float, object, object]:
    """(times, compile seconds, compiled executable, output) of the jitted fwd(params, *inputs)."""
    t0 = time.perf_counter()
    compiled = fwd.lower(params, *inputs).compile()
    compile_s = time.perf_counter() - t0
    result = {}

    def run():
        result["y"] = compiled(params, *inputs).block_until_ready()

    return time_calls(run, repeats), compile_s, compiled, result["y"]


def compile_sharded_step(trainer, state, batch, sharding, options: dict):
    """`trainer.compile` on the mesh of a config's `sharding` section, parameters and batch placed by its
    rules, as train.py compiles its step; returns (compiled step, compile seconds)."""
    from xdyna_jax.sharding import mesh_from_config, param_shardings, rules_from_config
    from xdyna_jax.training.batch import batch_sharding

    mesh = mesh_from_config(sharding.mesh)
    rules = rules_from_config(sharding.rules)
    t0 = time.perf_counter()
    compiled = trainer.compile(
        state,
        batch,
        mesh,
        param_shardings=lambda tree: param_shardings(tree, mesh, rules),
        batch_sharding=batch_sharding,
        rules=rules,
        compiler_options=options,
    )
    return compiled, time.perf_counter() - t0, mesh
