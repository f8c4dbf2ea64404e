"""Memory and FLOPs of one full-size X-Dyna sampling window step, compiled from shapes only (no weights).

    python -m bench.sample_memory                 # fp32 and bf16, 1 + 16 frames at 896x512, CFG batch 2
    python -m bench.sample_memory --dtypes bf16 --no-flops

The step is the one `XDynaPipeline` compiles: the pose and S-Face ControlNets on the 16 driven frames (once
for both CFG halves), the X-Dyna UNet (SD 1.5 + Dynamics-Adapter + IP-Adapter 16 tokens + AnimateDiff v1)
on [reference ; 16 frames] for each CFG half (one half after the other, as the pipeline runs them by
default), and the per-frame accumulation. Peak memory per device is XLA's
compiled memory analysis (arguments + outputs + temporaries - aliased); bf16 stores the frozen weights in
bf16 and computes in bf16. FLOPs come from a compile with the "xla" attention backend, whose softmax is not
inside a loop (XLA's cost analysis counts a loop body once, so the default "chunked" backend under-counts).
Each result is one line: task=sample dtype=<fp32|bf16> devices=1 peak_gib_per_device=<x> tflops_per_step=<y>
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

GIB = 2**30
FRAMES, HEIGHT, WIDTH, TEXT, IP = 16, 896, 512, 77, 16


def _window_step(dtype: str, attention: str, sequential_cfg: bool = True):
    """(the compiled-to-be window step, its abstract arguments) at full size."""
    from configs.models import model_configs
    from configs.xdyna_sd15 import get_config
    from xdyna_jax.models.controlnet import ControlNetModel
    from xdyna_jax.models.unet import UNet
    from xdyna_jax.models.xdyna import XDynaDenoiser
    from xdyna_jax.nn.compute import Compute
    from xdyna_jax.nn.shape_only import shape_only_model
    from xdyna_jax.sampling.bundles import XDYNA_SCHEDULER, XDyna
    from xdyna_jax.sampling.loop import compiled_window_step
    from xdyna_jax.sampling.xdyna import XDynaPipeline

    compute = Compute(dtype="bfloat16" if dtype == "bf16" else "float32", attention=attention)
    cfgs = {k: dataclasses.replace(v, compute=compute) for k, v in model_configs(get_config()).items()}
    denoiser = XDynaDenoiser(
        shape_only_model(UNet, cfgs["unet"]),
        shape_only_model(ControlNetModel, cfgs["controlnet_pose"]),
        shape_only_model(ControlNetModel, cfgs["controlnet_face"]),
    )
    parts = XDyna(denoiser, None, None, None, None, None, XDYNA_SCHEDULER, {})
    pipe = XDynaPipeline(parts, sequential_cfg=sequential_cfg)
    param_dtype = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    weights = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, param_dtype), nnx.split(denoiser)[1]
    )
    f32 = jnp.float32
    h, w = HEIGHT // 8, WIDTH // 8
    conds = {
        "pose": jax.ShapeDtypeStruct((FRAMES, HEIGHT, WIDTH, 3), f32),
        "face": jax.ShapeDtypeStruct((FRAMES, HEIGHT, WIDTH, 6), f32),
        "context": jax.ShapeDtypeStruct((2, TEXT + IP, 768), f32),
    }
    args = (
        (weights, conds),
        jax.ShapeDtypeStruct((1 + FRAMES, h, w, 4), f32),  # latents: reference + driven frames
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((1, FRAMES), jnp.int32),  # one window
        jax.ShapeDtypeStruct((1,), jnp.bool_),
        jax.ShapeDtypeStruct((2, FRAMES, h, w, 4), f32),
    )
    return compiled_window_step(pipe.window_fn), args


def measure(dtype: str, flops: bool) -> dict:
    step, args = _window_step(dtype, "chunked")
    t0 = time.perf_counter()
    mem = step.lower(*args).compile().memory_analysis()
    compile_s = time.perf_counter() - t0
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    tflops = float("nan")
    if flops:
        step, args = _window_step(dtype, "xla", sequential_cfg=False)  # no loop: every FLOP counted
        cost = step.lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        tflops = float(cost.get("flops", 0.0)) / 1e12
    return {
        "peak_gib": peak / GIB,
        "weights_gib": mem.argument_size_in_bytes / GIB,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "tflops": tflops,
        "compile_s": compile_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one compile less per dtype)")
    a = p.parse_args()
    for dtype in a.dtypes.split(","):
        r = measure(dtype, not a.no_flops)
        print(
            f"task=sample dtype={dtype} devices=1 peak_gib_per_device={r['peak_gib']:.2f} "
            f"tflops_per_step={r['tflops']:.1f}   (arguments {r['weights_gib']:.2f} GiB, temporaries "
            f"{r['temp_gib']:.2f} GiB, compile {r['compile_s']:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
