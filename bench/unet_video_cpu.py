"""Video UNet (AnimateDiff motion modules) on this machine: xdyna-jax vs diffusers' UNetMotionModel, plus the
FLOPs and XLA memory of one full-size X-Dyna UNet call.

    python -m bench.unet_video_cpu                          # 32x32 latent, 1 reference + 16 frames, 3 repeats
    python -m bench.unet_video_cpu --size 48x32 --frames 9 --repeats 5
    python -m bench.unet_video_cpu --skip-torch --skip-flops

Part 1 runs one UNet call on a window (batch 1, F frames, context 77x768, fp32) at a mid-size config
(block_out_channels 64/128/256/256, SD 1.5 block types, 2 layers, 8 heads, v3-style motion modules: no
mid-block module, per-frame resnet GroupNorm). Random torch weights (seeded, every parameter perturbed so no
zero-initialised path hides a difference) are written to a temporary safetensors file; diffusers loads them
as they are, JAX renames the motion keys with diffusers_motion_to_original, drops the pos_embed buffers and
pools the motion GroupNorm over frames as diffusers does (motion_groupnorm_across_frames). Each framework
runs in its own process so its peak RSS is its own. GFLOP/s uses XLA's FLOP count for both sides.

Part 2 compiles the full X-Dyna UNet (SD 1.5 + Dynamics-Adapter + IP-Adapter 16 tokens + AnimateDiff v1
motion modules, reference frame skipped) from shapes only, at 896x512 (latent 112x64), 1 reference + 16
frames, batch 2 (CFG), context 77 + 16 tokens: FLOPs from XLA's cost analysis of the loop-free "xla"
attention graph (XLA does not multiply the chunked backend's lax.map body by its trip count) and the
memory analysis of the default "chunked" graph. ControlNet calls are not included.

The machine has 2 cores shared with other jobs: timings are indicative only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import spawn, time_calls, time_jitted
from xdyna_jax.nn.shape_only import shape_only_model

# diffusers UNet2DConditionModel kwargs of the mid-size model (SD 1.5 block types by default).
MID = dict(
    block_out_channels=(64, 128, 256, 256),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    sample_size=32,
)
MOTION_HEADS, MOTION_GROUPS, MOTION_LEN = 8, 32, 32
TEXT_TOKENS, IP_TOKENS, STEPS = 77, 16, 25
FULL_LATENT, FULL_FRAMES, FULL_BATCH = (112, 64), 17, 2


def _inputs(frames: int, h: int, w: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, frames, h, w, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, TEXT_TOKENS, 768)).astype(np.float32)
    return x, ctx, np.array([500], dtype=np.int32)


def _torch_model():
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from diffusers.utils import logging

    logging.set_verbosity_error()  # from_unet2d's notice about float32 modules
    adapter = MotionAdapter(
        block_out_channels=MID["block_out_channels"],
        motion_layers_per_block=MID["layers_per_block"],
        motion_num_attention_heads=MOTION_HEADS,
        motion_norm_num_groups=MOTION_GROUPS,
        motion_max_seq_length=MOTION_LEN,
        use_motion_mid_block=False,
    )
    return UNetMotionModel.from_unet2d(UNet2DConditionModel(**MID), adapter)


def _make_weights(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = _torch_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def worker_torch(weights: str, frames: int, h: int, w: int, repeats: int, out: str) -> dict:
    import torch
    from safetensors.torch import load_file

    model = _torch_model().eval()
    model.load_state_dict(load_file(weights))
    x, ctx, t = _inputs(frames, h, w)
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy())  # (B, C, F, H, W)
    ct = torch.from_numpy(np.repeat(ctx, frames, axis=0))  # context per frame: (B*F, L, D)
    tt = torch.from_numpy(t).long()
    result = {}

    def run():
        with torch.inference_mode():
            result["y"] = model(xt, tt, ct).sample

    times = time_calls(run, repeats)
    np.save(out, result["y"].numpy().transpose(0, 2, 3, 4, 1))
    return {"times": times, "threads": torch.get_num_threads()}


def _mid_config(attention: str):
    from xdyna_jax.models.unet import UNetConfig
    from xdyna_jax.nn.compute import Compute

    cfg = UNetConfig.from_diffusers(MID, compute=Compute(attention=attention))
    return dataclasses.replace(
        cfg,
        motion_modules=True,
        motion_mid_block=False,
        motion_max_len=MOTION_LEN,
        motion_heads=MOTION_HEADS,
        motion_norm_groups=MOTION_GROUPS,
        motion_groupnorm_across_frames=True,
    )


def _full_config(attention: str):
    """X-Dyna's UNet: SD 1.5 + Dynamics-Adapter + IP-Adapter-plus + AnimateDiff v1, reference frame skipped."""
    from xdyna_jax.models.unet import UNetConfig
    from xdyna_jax.nn.compute import Compute

    return UNetConfig(
        dynamics_adapter=True,
        ip_adapter_tokens=IP_TOKENS,
        motion_modules=True,
        motion_mid_block=False,
        motion_max_len=24,
        groupnorm_over_frames=True,
        skip_reference_frame=True,
        compute=Compute(attention=attention),
    )


def _jax_weights(weights: str) -> dict:
    from convert.animatediff_keys import diffusers_motion_to_original
    from convert.io import read_state_dict

    state = {k: v for k, v in read_state_dict(weights).items() if "pos_embed" not in k}
    motion = {k: v for k, v in state.items() if ".motion_modules." in k}
    state = {k: v for k, v in state.items() if ".motion_modules." not in k}
    return {**state, **diffusers_motion_to_original(motion)}


def _model(cfg):

    from xdyna_jax.models.unet import UNet

    return shape_only_model(UNet, cfg)


def _jit(model):
    """(jitted forward of params, x, t, ctx; the model's params)."""
    import jax
    from flax import nnx

    graph, params = nnx.split(model)
    return jax.jit(lambda p, x, t, c: nnx.merge(graph, p)(x, t, c)), params


def _shapes(tree):
    import jax

    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _compile(cfg, *args):
    """Compile from shapes only; returns (compiled, seconds)."""
    fwd, params = _jit(_model(cfg))
    t0 = time.perf_counter()
    compiled = fwd.lower(*_shapes((params, *args))).compile()
    return compiled, time.perf_counter() - t0


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def worker_jax(weights: str, frames: int, h: int, w: int, repeats: int, out: str, flops: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from convert.state import load_torch_state

    model = load_torch_state(_model(_mid_config("chunked")), _jax_weights(weights), source=weights)
    fwd, params = _jit(model)
    x, ctx, t = (jnp.asarray(a) for a in _inputs(frames, h, w))
    times, compile_s, compiled, y = time_jitted(fwd, params, (x, t, ctx), repeats)
    np.save(out, np.asarray(y))
    mem = compiled.memory_analysis()
    return {
        "times": times,
        "compile_s": compile_s,
        "xla_gib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2**30,
        "flops": _flops(_compile(_mid_config("xla"), x, t, ctx)[0]) if flops else 0.0,
        "devices": jax.device_count(),
    }


def worker_full() -> dict:
    """FLOPs ("xla" attention) and XLA memory ("chunked") of one full-size X-Dyna UNet call, shapes only."""
    import jax
    import jax.numpy as jnp

    (h, w), f, b = FULL_LATENT, FULL_FRAMES, FULL_BATCH
    x = jax.ShapeDtypeStruct((b, f, h, w, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((b,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((b, TEXT_TOKENS + IP_TOKENS, 768), jnp.float32)
    plain, plain_s = _compile(_full_config("xla"), x, t, ctx)
    chunked, chunked_s = _compile(_full_config("chunked"), x, t, ctx)
    _, params = _jit(_model(_full_config("chunked")))
    mem = chunked.memory_analysis()
    leaves = jax.tree_util.tree_leaves(params)
    return {
        "flops": _flops(plain),
        "compile_xla_s": plain_s,
        "compile_chunked_s": chunked_s,
        "params_gib": sum(np.prod(a.shape) * a.dtype.itemsize for a in leaves) / 2**30,
        "n_params": int(sum(np.prod(a.shape) for a in leaves)),
        "temp_gib": mem.temp_size_in_bytes / 2**30,
    }


def _run_worker(a, h: int, w: int) -> None:
    if a.worker == "torch":
        res = worker_torch(a.weights, a.frames, h, w, a.repeats, a.out)
    elif a.worker == "jax":
        res = worker_jax(a.weights, a.frames, h, w, a.repeats, a.out, not a.skip_flops)
    else:
        res = worker_full()
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(res))


def _compare(a, h: int, w: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "unet_motion.safetensors"
        print("making random mid-size UNetMotionModel weights ...", flush=True)
        _make_weights(weights)
        common = ["--weights", str(weights), "--size", f"{h}x{w}", "--frames", str(a.frames)]
        common += ["--repeats", str(a.repeats), *(["--skip-flops"] if a.skip_flops else [])]
        pt = (
            None
            if a.skip_torch
            else spawn(__spec__.name, ["--worker", "torch", "--out", f"{tmp}/pt.npy", *common])
        )
        jx = spawn(__spec__.name, ["--worker", "jax", "--out", f"{tmp}/jx.npy", *common])
        y_jx = np.load(f"{tmp}/jx.npy")
        y_pt = None if pt is None else np.load(f"{tmp}/pt.npy")
    err = float(np.abs(y_pt - y_jx).max() / np.abs(y_pt).max()) if pt else float("nan")
    gflop = jx["flops"] / 1e9
    mj = statistics.median(jx["times"])
    mp = statistics.median(pt["times"]) if pt else float("nan")
    print(
        f"torch {pt['times'] if pt else '-'} (threads {pt['threads'] if pt else '-'})  jax {jx['times']} "
        f"(devices {jx['devices']}), {gflop:.0f} GFLOP per call",
        flush=True,
    )
    head = ("latent", "F", "torch s", "jax s", "jax/torch", "torch GFLOP/s", "jax GFLOP/s")
    head += ("torch peak GiB", "jax peak GiB", "jax XLA GiB", "jax compile s", "rel diff")
    row = (f"{h}x{w}", a.frames, f"{mp:.2f}", f"{mj:.2f}", f"**{mj / mp:.2f}**", f"{gflop / mp:.0f}")
    row += (f"{gflop / mj:.0f}", f"{pt['peak_rss_gib']:.2f}" if pt else "-", f"{jx['peak_rss_gib']:.2f}")
    row += (f"{jx['xla_gib']:.2f}", f"{jx['compile_s']:.1f}", f"{err:.1e}")
    _table(head, [row])


def _full(a) -> None:
    print("compiling the full-size X-Dyna UNet from shapes (xla + chunked attention) ...", flush=True)
    r = spawn(__spec__.name, ["--worker", "full"])
    tflop = r["flops"] / 1e12
    (h, w), f, b = FULL_LATENT, FULL_FRAMES, FULL_BATCH
    head = ("latent", "F", "batch", "params (M)", "TFLOP/call", f"TFLOP/{STEPS} steps", "params GiB")
    head += ("XLA temp GiB", "params + temp GiB", "compile xla s", "compile chunked s")
    row = (f"{h}x{w}", f, b, f"{r['n_params'] / 1e6:.0f}", f"{tflop:.1f}", f"{tflop * STEPS:.0f}")
    row += (f"{r['params_gib']:.2f}", f"{r['temp_gib']:.2f}", f"{r['params_gib'] + r['temp_gib']:.2f}")
    row += (f"{r['compile_xla_s']:.0f}", f"{r['compile_chunked_s']:.0f}")
    _table(head, [row])


def _table(head: tuple, rows: list[tuple]) -> None:
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")
    print(flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="32x32", help="latent HxW of the mid-size comparison")
    p.add_argument("--frames", type=int, default=17, help="frames per window (1 reference + 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-torch", action="store_true", help="JAX only in the mid-size comparison")
    p.add_argument("--skip-flops", action="store_true", help="no FLOP counts, no full-size compile")
    p.add_argument("--worker", choices=("torch", "jax", "full"), help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    h, w = (int(v) for v in a.size.split("x"))
    if a.frames > MOTION_LEN:
        p.error(f"--frames {a.frames} exceeds the motion modules' max length {MOTION_LEN}")

    if a.worker:  # child process: one framework (or the full-size compile)
        _run_worker(a, h, w)
        return
    _compare(a, h, w)
    if not a.skip_flops:
        _full(a)


if __name__ == "__main__":
    main()
