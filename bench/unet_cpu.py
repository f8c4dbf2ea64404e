"""SD 1.5-size UNet forward on this machine: xdyna-jax vs diffusers PyTorch, same weights, one run.

    python -m bench.unet_cpu                       # 64x64 and 112x64 latents, batch 1, context 77x768, fp32
    python -m bench.unet_cpu --sizes 64x64 --repeats 5 --attention chunked
    python -m bench.unet_cpu --conv native            # JAX with XLA's conv everywhere (before im2col)

Random SD 1.5 weights are made once with torch (seeded), written to a temporary safetensors file and
converted for JAX, so both sides hold the same numbers. Each (framework, size) runs in its own process so
its peak RSS is its own; JAX also reports XLA's compiled temp memory. GFLOP/s uses the FLOP count of XLA's
cost analysis for both sides. The outputs of the two are compared as a sanity check. Times are the
minimum over the repeats: on a shared machine the minimum is the run least disturbed by other load.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

import numpy as np

from bench.common import spawn, time_calls, time_jitted
from xdyna_jax.nn.shape_only import shape_only_model


def _inputs(h: int, w: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, h, w, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 768)).astype(np.float32)
    return x, ctx, np.array([500], dtype=np.int32)


def worker_torch(weights: str, h: int, w: int, repeats: int, out: str) -> dict:
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    model = UNet2DConditionModel(cross_attention_dim=768).eval()
    model.load_state_dict(load_file(weights))
    x, ctx, t = _inputs(h, w)
    xt, ct, tt = (
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(ctx),
        torch.from_numpy(t).long(),
    )
    result = {}

    def run():
        with torch.inference_mode():
            result["y"] = model(xt, tt, ct).sample

    times = time_calls(run, repeats)
    np.save(out, result["y"].numpy().transpose(0, 2, 3, 1))
    return {"times": times, "threads": torch.get_num_threads()}


def worker_jax(
    weights: str, h: int, w: int, repeats: int, out: str, attention: str, chunk: int, conv: str
) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from convert.io import read_state_dict
    from convert.state import load_torch_state
    from xdyna_jax.models.unet import UNet, UNetConfig
    from xdyna_jax.nn.compute import Compute
    from xdyna_jax.nn.conv import set_formulation

    cfg = UNetConfig(compute=Compute(attention=attention, attention_chunk=chunk))
    model = shape_only_model(UNet, cfg)
    load_torch_state(model, read_state_dict(weights), source=weights)
    graph, params = nnx.split(set_formulation(model, conv))
    fwd = jax.jit(lambda p, x, t, c: nnx.merge(graph, p)(x, t, c))
    x, ctx, t = (jnp.asarray(a) for a in _inputs(h, w))
    times, compile_s, compiled, y = time_jitted(fwd, params, (x, t, ctx), repeats)
    np.save(out, np.asarray(y))
    mem = compiled.memory_analysis()
    return {
        "times": times,
        "compile_s": compile_s,
        "xla_temp_gib": mem.temp_size_in_bytes / 2**30,
        "flops": _flops(cfg, params, x, t, ctx),
        "xla_args_gib": mem.argument_size_in_bytes / 2**30,
        "devices": jax.device_count(),
    }


def _flops(cfg, params, x, t, ctx) -> float:
    """FLOPs of one forward from XLA's cost analysis of the loop-free ("xla" attention) graph: XLA does
    not multiply the body of the chunked backend's lax.map by its trip count."""
    import dataclasses

    import jax
    from flax import nnx

    from xdyna_jax.models.unet import UNet

    plain = dataclasses.replace(cfg, compute=dataclasses.replace(cfg.compute, attention="xla"))
    graph, _ = nnx.split(shape_only_model(UNet, plain))
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, x, t, ctx))
    lowered = jax.jit(lambda p, x, t, c: nnx.merge(graph, p)(x, t, c)).lower(*shapes)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def _make_weights(path: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = UNet2DConditionModel(cross_attention_dim=768)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="64x64,112x64", help="latent HxW list")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--attention", default="chunked", help="JAX attention backend (xla | chunked | dot_product)"
    )
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument(
        "--conv", default="auto", help="JAX conv formulation (auto | native | im2col), see xdyna_jax.nn.conv"
    )
    p.add_argument("--worker", choices=("torch", "jax"), help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]

    if a.worker:  # child process: one framework, one size
        ((h, w),) = sizes
        if a.worker == "torch":
            res = worker_torch(a.weights, h, w, a.repeats, a.out)
        else:
            res = worker_jax(a.weights, h, w, a.repeats, a.out, a.attention, a.chunk, a.conv)
        res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(res))
        return

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "unet.safetensors"
        print("making random SD 1.5 UNet weights ...", flush=True)
        _make_weights(weights)
        rows = []
        for h, w in sizes:
            common = ["--weights", str(weights), "--sizes", f"{h}x{w}", "--repeats", str(a.repeats)]
            pt = spawn(__spec__.name, ["--worker", "torch", "--out", f"{tmp}/pt.npy", *common])
            jx = spawn(
                __spec__.name,
                [
                    "--worker",
                    "jax",
                    "--out",
                    f"{tmp}/jx.npy",
                    "--attention",
                    a.attention,
                    "--chunk",
                    str(a.chunk),
                    "--conv",
                    a.conv,
                    *common,
                ],
            )
            y_pt, y_jx = np.load(f"{tmp}/pt.npy"), np.load(f"{tmp}/jx.npy")
            err = float(np.abs(y_pt - y_jx).max() / np.abs(y_pt).max())
            mp, mj = min(pt["times"]), min(jx["times"])
            gflop = jx["flops"] / 1e9
            rows.append(
                (
                    f"{h}x{w}",
                    mp,
                    mj,
                    mj / mp,
                    gflop / mp,
                    gflop / mj,
                    pt["peak_rss_gib"],
                    jx["peak_rss_gib"],
                    jx["xla_temp_gib"] + jx["xla_args_gib"],
                    jx["compile_s"],
                    err,
                )
            )
            print(
                f"{h}x{w}: torch {pt['times']}  jax {jx['times']}  (torch threads {pt['threads']}, "
                f"jax devices {jx['devices']}, jax conv {a.conv}, {gflop:.0f} GFLOP)",
                flush=True,
            )

    head = (
        "latent",
        "torch s (min)",
        "jax s (min)",
        "jax/torch",
        "torch GFLOP/s",
        "jax GFLOP/s",
        "torch peak GiB",
        "jax peak GiB",
        "jax forward GiB",
        "jax compile s",
        "rel err",
    )
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(
            f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | **{r[3]:.2f}** | {r[4]:.0f} | {r[5]:.0f} | {r[6]:.2f} | "
            f"{r[7]:.2f} | {r[8]:.2f} | {r[9]:.1f} | {r[10]:.1e} |"
        )


if __name__ == "__main__":
    main()
