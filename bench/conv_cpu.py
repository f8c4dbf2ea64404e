"""Every convolution of the SD 1.5 UNet forward on CPU: native XLA conv vs im2col, and what conv2d picks.

    python -m bench.conv_cpu                      # 64x64 latent, batch 1, fp32
    python -m bench.conv_cpu --sizes 64x64,112x64 --batch 2 --repeats 15

The conv shapes are read from the traced UNet (so they are the model's, not a hand-written list). Each
shape is timed alone, native and im2col interleaved so both see the same machine load, min of N. The
"UNet conv s" columns multiply by how often the shape occurs: where the forward spends its conv time.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np


def unet_conv_shapes(h: int, w: int, batch: int) -> Counter:
    """(input shape, kernel shape, strides, padding) -> count over one SD 1.5 UNet forward."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.extend.core import jaxprs_in_params

    from xdyna_jax.models.unet import UNet, UNetConfig
    from xdyna_jax.nn.conv import set_formulation
    from xdyna_jax.nn.shape_only import shape_only_model

    # native everywhere: every conv shows up as one conv_general_dilated in the jaxpr
    graph, params = nnx.split(set_formulation(shape_only_model(UNet, UNetConfig()), "native"))
    args = (
        params,
        jax.ShapeDtypeStruct((batch, h, w, 4), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch, 77, 768), jnp.float32),
    )
    jaxpr = jax.make_jaxpr(lambda p, x, t, c: nnx.merge(graph, p)(x, t, c))(*args)
    shapes: Counter = Counter()

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                x, k = (v.aval.shape for v in eqn.invars)
                pads = tuple(tuple(p) for p in eqn.params["padding"])
                shapes[(x, k, tuple(eqn.params["window_strides"]), pads)] += 1
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return shapes


def time_pair(x, k, strides, pads, repeats: int) -> tuple[float, float]:
    """Min seconds of the native and the im2col conv, runs interleaved."""
    import jax

    from xdyna_jax.nn.conv import conv2d

    def make(formulation):
        return jax.jit(
            lambda x, k: conv2d(
                x, k, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), formulation=formulation
            )
        )

    fns = [make("native"), make("im2col")]
    for f in fns:
        f(x, k).block_until_ready()
    best = [float("inf")] * 2
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f(x, k).block_until_ready()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="64x64", help="latent HxW list")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()

    import jax.numpy as jnp

    from xdyna_jax.nn.conv import cpu_formulation

    rng = np.random.default_rng(0)
    for size in a.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        shapes = unet_conv_shapes(h, w, a.batch)
        print(f"\nlatent {h}x{w}, batch {a.batch}: {sum(shapes.values())} convs, {len(shapes)} shapes")
        print(
            "| input NHWC | kernel | stride | count | picks | native GFLOP/s | im2col GFLOP/s | "
            "UNet conv s native | UNet conv s picked |\n|" + "---|" * 9
        )
        total_native = total_picked = 0.0
        for (xs, ks, strides, pads), count in sorted(shapes.items(), key=lambda kv: (-kv[0][0][1], kv[0])):
            x = jnp.asarray(rng.standard_normal(xs, np.float32))
            k = jnp.asarray(rng.standard_normal(ks, np.float32) * 0.02)
            t_native, t_im2col = time_pair(x, k, strides, pads, a.repeats)
            ho = (xs[1] + sum(pads[0]) - ks[0]) // strides[0] + 1
            wo = (xs[2] + sum(pads[1]) - ks[1]) // strides[1] + 1
            gflop = 2 * xs[0] * ho * wo * ks[0] * ks[1] * ks[2] * ks[3] / 1e9
            picks = cpu_formulation(xs, ks, strides, pads)
            t_picked = t_im2col if picks == "im2col" else t_native
            total_native += count * t_native
            total_picked += count * t_picked
            print(
                f"| {'x'.join(map(str, xs))} | {ks[0]}x{ks[1]}x{ks[2]}->{ks[3]} | {strides[0]} | {count} | "
                f"{picks} | {gflop / t_native:.0f} | {gflop / t_im2col:.0f} | {count * t_native:.3f} | "
                f"{count * t_picked:.3f} |",
                flush=True,
            )
        print(
            f"UNet conv time {h}x{w}: native {total_native:.2f} s, picked {total_picked:.2f} s "
            f"({total_picked / total_native:.2f}x)"
        )


if __name__ == "__main__":
    main()
