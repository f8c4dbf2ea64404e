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
FRAMES, HEIGHT, WIDTH, TEXT = 16, 896, 512, 77


def full_size_configs(dtype: str, attention: str) -> dict:
    """{"unet", "controlnet_pose", "controlnet_face": config} of the release's model, computing in `dtype`."""
    from configs.models import model_configs
    from configs.xdyna_sd15 import get_config
    from xdyna_jax.nn.compute import Compute

    compute = Compute(dtype="bfloat16" if dtype == "bf16" else "float32", attention=attention)
    return {k: dataclasses.replace(v, compute=compute) for k, v in model_configs(get_config()).items()}


def window_step(
    cfgs: dict,
    param_dtype,
    *,
    frames: int = FRAMES,
    height: int = HEIGHT,
    width: int = WIDTH,
    text: int = TEXT,
    sequential_cfg: bool = True,
):
    """(the window step `XDynaPipeline` compiles, its abstract arguments) for the models of `cfgs` (as
    `full_size_configs` returns), one window of 1 reference + `frames` driven frames of height x width
    pixels. The arguments are (params, latents, timestep, frames, valid, total) as `denoise` passes them;
    params = (weights of `param_dtype`, conditions)."""
    from xdyna_jax.models.controlnet import ControlNetModel
    from xdyna_jax.models.unet import UNet
    from xdyna_jax.models.xdyna import XDynaDenoiser
    from xdyna_jax.nn.bf16_weights import compiler_options_for
    from xdyna_jax.nn.shape_only import shape_only_model
    from xdyna_jax.sampling.bundles import XDYNA_SCHEDULER, XDyna
    from xdyna_jax.sampling.loop import compiled_window_step
    from xdyna_jax.sampling.xdyna import XDynaPipeline

    denoiser = XDynaDenoiser(
        shape_only_model(UNet, cfgs["unet"]),
        shape_only_model(ControlNetModel, cfgs["controlnet_pose"]),
        shape_only_model(ControlNetModel, cfgs["controlnet_face"]),
    )
    parts = XDyna(denoiser, None, None, None, None, None, XDYNA_SCHEDULER, {})
    pipe = XDynaPipeline(parts, sequential_cfg=sequential_cfg)
    weights = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, param_dtype), nnx.split(denoiser)[1]
    )
    f32 = jnp.float32
    unet = cfgs["unet"]
    down = cfgs["controlnet_pose"].cond_downscale  # condition pixels per latent pixel (8 for SD 1.5)
    h, w = height // down, width // down
    context = unet.cross_attention_dim
    conds = {
        "pose": jax.ShapeDtypeStruct(
            (frames, height, width, cfgs["controlnet_pose"].conditioning_channels), f32
        ),
        "face": jax.ShapeDtypeStruct(
            (frames, height, width, cfgs["controlnet_face"].conditioning_channels), f32
        ),
        "context": jax.ShapeDtypeStruct((2, text + unet.ip_adapter_tokens, context), f32),
    }
    args = (
        (weights, conds),
        jax.ShapeDtypeStruct((1 + frames, h, w, unet.in_channels), f32),  # latents: reference + driven frames
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((1, frames), jnp.int32),  # one window
        jax.ShapeDtypeStruct((1,), jnp.bool_),
        jax.ShapeDtypeStruct((2, frames, h, w, unet.out_channels), f32),
    )
    # the XLA options the pipeline compiles with for weights of this dtype (bf16 on CPU: see nn/bf16_weights)
    return compiled_window_step(pipe.window_fn, compiler_options_for(weights)), args


def step_flops(cfgs: dict, param_dtype, *, lowered_only: bool = False, **shape) -> float:
    """FLOPs of one window step by XLA's cost analysis of the batched-CFG graph; the models of `cfgs` must
    use "xla" attention (no loop: every FLOP counted). lowered_only counts on the lowered, unoptimised graph
    instead of the compiled one: no compile (seconds instead of a minute at full size); at full size it
    gives 102.3 TFLOP where the compiled bf16 graph gives 103 (XLA:CPU adds bf16 <-> f32 converts)."""
    step, args = window_step(cfgs, param_dtype, sequential_cfg=False, **shape)
    lowered = step.lower(*args)
    cost = lowered.cost_analysis() if lowered_only else lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def measure(dtype: str, flops: bool) -> dict:
    param_dtype = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    step, args = window_step(full_size_configs(dtype, "chunked"), param_dtype)
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
        tflops = step_flops(full_size_configs(dtype, "xla"), param_dtype) / 1e12
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
