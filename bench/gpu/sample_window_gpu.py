"""The full-size X-Dyna window step on one GPU: xdyna-jax (bf16, cudnn attention) vs PyTorch (diffusers, SDPA,
bf16), times and MFU. Prepared to run on a GPU machine with JAX and PyTorch (+ diffusers) installed, no
network:

    python -m bench.gpu.sample_window_gpu                 # ~5 min on one H200; JSON to $OUT/ if set
    python -m bench.gpu.sample_window_gpu --repeats 20 --skip-like-for-like
    python -m bench.gpu.sample_window_gpu --smoke         # tiny sizes on the CPU: checks the script runs

The step is the one `XDynaPipeline` compiles (bench/sample_memory.py builds it): the pose and S-Face
ControlNets on the 16 driven frames (once for both CFG halves), the UNet on [reference ; 16 frames] at
896x512 (latent 112x64) for each CFG half with 77 text + 16 IP tokens, the per-frame accumulation.
  - jax xdyna: the release's UNet (Dynamics-Adapter, GroupNorm over frames, reference frame skipped by the
    AnimateDiff v1 motion modules), CFG halves one after the other as the pipeline runs them;
  - jax like_for_like: our UNet configured as diffusers' model (no adapter, per-frame GroupNorm, every frame
    through the motion modules; bench/sample_cpu.py checks it computes the PyTorch step on CPU);
  - torch: diffusers' UNetMotionModel (SD 1.5 + MotionAdapter v1) with diffusers' IP-Adapter processors and
    two ControlNetModels, eager, SDPA, both CFG ways timed (one batch of 2 / one half after the other),
    the faster kept. Weights are random on both sides (they need not be equal for timing).
Every step time is the median of --repeats calls after --warmup calls; JAX's compile time is separate.
FLOPs: XLA's cost analysis of the lowered step with the loop-free "xla" attention and the CFG halves as one
batch (a loop body and a cuDNN call would count once / as zero), per variant; the PyTorch step is credited
with the like-for-like count. MFU = FLOPs / time / peak, peak = 989 TFLOP/s (H200 SXM dense bf16;
--peak-tflops to change). Each part is guarded: one that fails prints its error and the others still run.
"""

from __future__ import annotations

import os

# before JAX starts: allocate on demand so PyTorch finds GPU memory after the JAX part
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import time_calls  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.0
FULL_FRAMES, FULL_HEIGHT, FULL_WIDTH = 16, 896, 512


def _jax_configs(smoke: bool, attention: str) -> dict:
    """{variant: cfgs for sample_memory.window_step}: the release's models and the like-for-like UNet."""
    from bench.sample_cpu import TINY, as_like_for_like, unet_configs
    from bench.sample_memory import full_size_configs
    from xdyna_jax.models.controlnet import ControlNetConfig
    from xdyna_jax.nn.compute import Compute

    if smoke:
        compute = Compute(dtype="bfloat16", attention=attention)
        encoder = {k: v for k, v in TINY.unet.items() if k != "up_block_types"}
        cn = lambda c: ControlNetConfig.from_diffusers(
            {
                **encoder,
                "conditioning_channels": c,
                "conditioning_embedding_out_channels": TINY.cond_embedding,
            },
            compute,
        )
        unet = dataclasses.replace(unet_configs(TINY)[1], compute=compute)
        xdyna = {"unet": unet, "controlnet_pose": cn(3), "controlnet_face": cn(6)}
    else:
        xdyna = full_size_configs("bf16", attention)
    return {"xdyna": xdyna, "like_for_like": {**xdyna, "unet": as_like_for_like(xdyna["unet"])}}


def _with_attention(cfgs: dict, attention: str) -> dict:
    return {
        k: dataclasses.replace(c, compute=dataclasses.replace(c.compute, attention=attention))
        for k, c in cfgs.items()
    }


def _materialize(args, seed: int = 0):
    """Concrete arrays for window_step's abstract arguments: random weights (one host pool of N(0, 0.02)
    reused across parameters, norm scales 1 + that: the values do not change the speed), random latents and
    conditions, one window holding every driven frame."""
    import jax

    (weights, conds), latents, _, frames, _, total = args
    leaves, tree = jax.tree_util.tree_flatten_with_path(weights)
    rng = np.random.default_rng(seed)
    dtype = leaves[0][1].dtype
    pool = (0.02 * rng.standard_normal(max(int(np.prod(a.shape)) for _, a in leaves), np.float32)).astype(
        dtype
    )
    ones = (1 + pool).astype(dtype)

    def value(path, a):
        src = ones if "scale" in jax.tree_util.keystr(path) else pool
        return src[: int(np.prod(a.shape))].reshape(a.shape)

    weights = jax.tree_util.tree_unflatten(tree, [value(path, a) for path, a in leaves])
    concrete = lambda s, lo=None: (
        rng.uniform(0, 1, s.shape) if lo == "unit" else rng.standard_normal(s.shape)
    ).astype(np.float32)
    conds = {
        "pose": concrete(conds["pose"], "unit"),
        "face": concrete(conds["face"], "unit"),
        "context": concrete(conds["context"]),
    }
    n = frames.shape[1]
    host = (
        (weights, conds),
        concrete(latents),
        np.int32(500),
        np.arange(n, dtype=np.int32)[None],
        np.ones(1, bool),
        np.zeros(total.shape, np.float32),
    )
    return jax.device_put(host)


def run_jax(cfgs: dict, shape: dict, warmup: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from bench.sample_memory import window_step

    attention = cfgs["unet"].compute.attention
    step, abstract = window_step(cfgs, jnp.bfloat16, **shape)
    args = _materialize(abstract)
    t0 = time.perf_counter()
    try:
        lowered = step.lower(*args)
    except NotImplementedError as e:  # a shape cuDNN refuses (raised while tracing, so this costs seconds)
        if attention != "cudnn":
            raise
        print(f"cudnn attention refused ({e}); falling back to dot_product", flush=True)
        attention = "dot_product"
        step, _ = window_step(_with_attention(cfgs, attention), jnp.bfloat16, **shape)
        lowered = step.lower(*args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    times = time_calls(lambda: compiled(*args).block_until_ready(), repeats, warmup)
    out = np.asarray(compiled(*args))
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        ) / 2**30
    return {
        "step_s": statistics.median(times),
        "min_s": min(times),
        "times": times,
        "compile_s": compile_s,
        "xla_peak_gib": peak,
        "finite": bool(np.isfinite(out).all()),
        "attention": attention,
        "device": str(jax.devices()[0]),
    }


def count_flops(cfgs: dict, shape: dict) -> float:
    """FLOPs of one step: XLA's cost analysis of the lowered batched-CFG graph with "xla" attention."""
    import jax.numpy as jnp

    from bench.sample_memory import step_flops

    return step_flops(_with_attention(cfgs, "xla"), jnp.bfloat16, lowered_only=True, **shape)


def run_torch(smoke: bool, warmup: int, repeats: int) -> dict:
    import torch

    from bench.sample_cpu import MID, TINY, torch_models, torch_step_runner

    device = "cpu" if smoke else "cuda"
    size = (
        TINY
        if smoke
        else dataclasses.replace(MID, latent=(FULL_HEIGHT // 8, FULL_WIDTH // 8), frames=FULL_FRAMES)
    )
    t0 = time.perf_counter()
    with torch.device(device):
        models = [m.to(torch.bfloat16) for m in torch_models(size, perturb=0.0)]
    build_s = time.perf_counter() - t0
    from bench.sample_cpu import step_inputs

    x = step_inputs(size)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    res = {}
    for name, batched in (("batched", True), ("sequential", False)):
        run, out = torch_step_runner(models, x, batched, device=device, dtype=torch.bfloat16)

        def call(run=run):
            run()
            sync()

        times = time_calls(call, repeats, warmup)
        res[name] = {"step_s": statistics.median(times), "min_s": min(times), "times": times}
        res[name]["finite"] = bool(torch.isfinite(out["total"]).all())
    best = min(res, key=lambda k: res[k]["step_s"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {**res[best], "cfg": best, "by_cfg": res, "build_s": build_s, "peak_alloc_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, to check the script runs")
    p.add_argument(
        "--attention", default=None, help="JAX attention backend (default cudnn; xla with --smoke)"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS)
    p.add_argument("--skip-like-for-like", action="store_true", help="time only the release's JAX step")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--budget-s", type=float, default=480, help="skip the parts not started by then")
    a = p.parse_args()
    attention = a.attention or ("xla" if a.smoke else "cudnn")
    shape = dict(frames=16, height=24, width=16) if a.smoke else {}
    start = time.perf_counter()
    results = {"smoke": a.smoke, "attention": attention, "peak_tflops": a.peak_tflops, "errors": {}}

    def part(name, fn):
        if time.perf_counter() - start > a.budget_s:
            results["errors"][name] = f"skipped: past --budget-s {a.budget_s}"
            print(f"{name}: skipped (past the {a.budget_s:.0f} s budget)", flush=True)
            return None
        try:
            r = fn()
        except Exception as e:  # one part failing must not lose the others' figures
            results["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"{name}: FAILED\n{traceback.format_exc()[-3000:]}", flush=True)
            return None
        results[name] = r
        print(f"{name}: {json.dumps(r)}", flush=True)
        _write(results)
        return r

    cfgs = _jax_configs(a.smoke, attention)
    jax_x = part("jax_xdyna", lambda: run_jax(cfgs["xdyna"], shape, a.warmup, a.repeats))
    torch_r = None if a.skip_torch else part("torch", lambda: run_torch(a.smoke, a.warmup, a.repeats))
    jax_l = None
    if not a.skip_like_for_like:
        jax_l = part("jax_like_for_like", lambda: run_jax(cfgs["like_for_like"], shape, a.warmup, a.repeats))
    flops = {}
    for variant in ("xdyna", "like_for_like"):
        f = part(f"flops_{variant}", lambda v=variant: count_flops(cfgs[v], shape))
        if f:
            flops[variant] = f
    _summary(results, jax_x, jax_l, torch_r, flops, a.peak_tflops)
    _write(results)


def _summary(results, jax_x, jax_l, torch_r, flops, peak_tflops) -> None:
    peak = peak_tflops * 1e12
    mfu = lambda f, s: f / s / peak if f and s else float("nan")
    rows = [
        ("jax", "xdyna", jax_x, flops.get("xdyna")),
        ("jax", "like_for_like", jax_l, flops.get("like_for_like")),
        ("torch", "like_for_like", torch_r, flops.get("like_for_like")),
    ]
    print(f"\nMFU against {peak_tflops:.0f} TFLOP/s bf16 dense", flush=True)
    for framework, variant, r, f in rows:
        if r is None:
            continue
        extra = f" compile_s={r['compile_s']:.1f}" if "compile_s" in r else f" cfg={r['cfg']}"
        print(
            f"task=sample_step_gpu framework={framework} variant={variant} step_s={r['step_s']:.4f} "
            f"tflops_per_step={(f or float('nan')) / 1e12:.4g} mfu={mfu(f, r['step_s']):.3g}{extra}",
            flush=True,
        )
    for variant, j in (("xdyna", jax_x), ("like_for_like", jax_l)):
        if j and torch_r:
            ratio = j["step_s"] / torch_r["step_s"]
            results[f"ratio_{variant}"] = ratio
            print(f"task=sample_step_gpu ratio_jax_{variant}_over_torch={ratio:.2f}", flush=True)


def _write(results: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "sample_window_gpu.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
