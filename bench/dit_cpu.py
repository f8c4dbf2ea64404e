"""CogVideoX-1.5 DiT forward on this machine: xdyna-jax vs diffusers PyTorch, and the FLOPs of the full-size
DynamiCtrl forward.

    python -m bench.dit_cpu                                   # 2 layers, latent 2x40x60 (5 frames 320x480)
    python -m bench.dit_cpu --layers 4 --latent 2x40x60 --repeats 3 --rounds 1 --attention xla
    python -m bench.dit_cpu --xla-option xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT
    python -m bench.dit_cpu --sweep                           # also time every CPU attention backend / chunk
    python -m bench.dit_cpu --pieces                          # also time a block's pieces, JAX and torch
    python -m bench.dit_cpu --full-size                       # full DynamiCtrl: XLA FLOPs vs the analytic count
    python -m bench.dit_cpu --full-size --extrapolate         # compile 1 and 2 layers, extrapolate to 42

Mid size: CogVideoX1.5-5B-I2V at full width (48 heads x 64, patch 2x2x2, "slice" RoPE, ofs embedding, 32
input channels, text 226 x 4096) with few layers, batch 1, fp32 both sides. Random weights are made once with
torch (seeded, every parameter perturbed so no unit / zero norm hides a difference), written to a temporary
safetensors file, loaded by diffusers as they are and into ours by convert.state.load_torch_state. The RoPE
tables are computed once outside the timed call on both sides, as the pipelines do. Each framework runs in
its own process (its own peak RSS), torch and JAX processes alternating for --rounds rounds; times are the
minimum over all repeats (on a shared machine the least disturbed run, so report the load average); the outputs are compared as a sanity check. GFLOP/s uses XLA's FLOP count of the loop-free
"xla"-attention graph for both sides.

Full size (--full-size): DynamiCtrlTransformerModel, 42 layers, in_channels 32, at 1360x768 (HxW) x 37 frames
(latent 10 x 170 x 96: 20,400 video tokens + 226 text), CFG batch 2, bf16 weights and activations, built from
shapes only (no weight is materialised) and compiled with "xla" attention, so the graph has no loop and XLA's
cost analysis counts every FLOP (a loop body would be counted once); the whole model compiles in ~15-30 s
here (--extrapolate compiles 1 and 2 layers instead). The analytic count is written out from the equations
(matmuls as 2 FLOPs per multiply-add; elementwise work is left out of it, XLA counts it: ~1 % at full size).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import spawn, time_calls

# diffusers CogVideoXTransformer3DModel kwargs of CogVideoX1.5-5B-I2V (the DynamiCtrl base); num_layers is
# set per run.
COGVIDEOX15_I2V = dict(
    num_attention_heads=48,
    attention_head_dim=64,
    in_channels=32,
    out_channels=16,
    time_embed_dim=512,
    ofs_embed_dim=512,
    text_embed_dim=4096,
    sample_height=300,
    sample_width=300,
    sample_frames=81,
    patch_size=2,
    patch_size_t=2,
    patch_bias=False,
    temporal_compression_ratio=4,
    max_text_seq_length=226,
    use_rotary_positional_embeddings=True,
    use_learned_positional_embeddings=False,
)
TEXT_TOKENS = 226
TIMESTEP, OFS = 500, 2.0
# full-size DynamiCtrl forward: 37 frames at 1360x768 (HxW) -> latent F'=10, 170x96; CFG batch 2
FULL_LAYERS, FULL_LATENT, FULL_BATCH = 42, (10, 170, 96), 2
REFERENCE_TFLOP = 416  # the reference's own count per single-sample forward (matmuls + attention)
SWEEP = (("xla", 0), ("dot_product", 0), ("chunked", 128), ("chunked", 256), ("chunked", 512))


def _kwargs(layers: int) -> dict:
    return dict(COGVIDEOX15_I2V, num_layers=layers)


def _inputs(latent: tuple[int, int, int]):
    """Channels-last numpy inputs: latents (1, F', h, w, 32), text (1, 226, 4096), timestep, ofs."""
    rng = np.random.default_rng(0)
    f, h, w = latent
    x = rng.standard_normal((1, f, h, w, COGVIDEOX15_I2V["in_channels"])).astype(np.float32)
    text = rng.standard_normal((1, TEXT_TOKENS, COGVIDEOX15_I2V["text_embed_dim"])).astype(np.float32)
    return x, text, np.array([TIMESTEP], np.int32), np.array([OFS], np.float32)


def _jax_config(kwargs: dict, attention: str, chunk: int, dtype: str = "float32"):
    """Our config of the diffusers kwargs; chunk 0 (a backend without blocks) stands for any."""
    from xdyna_jax.models.cogvideox import CogVideoXConfig
    from xdyna_jax.nn.compute import Compute

    compute = Compute(dtype=dtype, attention=attention, attention_chunk=max(chunk, 1))
    return CogVideoXConfig.from_diffusers(kwargs, compute)


# -- mid size: the two workers ------------------------------------------------------------------------------


def _torch_rope(latent):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    f, h, w = latent
    p, pt = COGVIDEOX15_I2V["patch_size"], COGVIDEOX15_I2V["patch_size_t"]
    base = (COGVIDEOX15_I2V["sample_height"] // p, COGVIDEOX15_I2V["sample_width"] // p)
    dim = COGVIDEOX15_I2V["attention_head_dim"]
    return get_3d_rotary_pos_embed(dim, None, (h // p, w // p), f // pt, grid_type="slice", max_size=base)


def worker_torch(weights: str, layers: int, latent, repeats: int, out: str, pieces: bool) -> dict:
    import torch
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import load_file

    model = CogVideoXTransformer3DModel(**_kwargs(layers)).eval()
    model.load_state_dict(load_file(weights))
    x, text, t, ofs = _inputs(latent)
    args = dict(
        hidden_states=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3))),
        encoder_hidden_states=torch.from_numpy(text),
        timestep=torch.from_numpy(t).long(),
        ofs=torch.from_numpy(ofs),
        image_rotary_emb=_torch_rope(latent),
        return_dict=False,
    )
    result = {}

    def run():
        with torch.inference_mode():
            result["y"] = model(**args)[0]

    times = time_calls(run, repeats)
    np.save(out, result["y"].numpy().transpose(0, 1, 3, 4, 2))
    res = {"times": times, "threads": torch.get_num_threads()}
    if pieces:
        res["pieces"] = _torch_pieces(model, args, repeats)
    return res


def worker_jax(
    weights: str,
    layers: int,
    latent,
    repeats: int,
    out: str,
    attention: str,
    chunk: int,
    sweep: bool,
    pieces: bool,
    xla_options: dict | None,
) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from convert.io import read_state_dict
    from convert.state import load_torch_state
    from xdyna_jax.models.cogvideox import CogVideoXTransformer3DModel, rotary_tables
    from xdyna_jax.nn.shape_only import shape_only_model

    cfg = _jax_config(_kwargs(layers), attention, chunk)
    model = shape_only_model(CogVideoXTransformer3DModel, cfg)
    load_torch_state(model, read_state_dict(weights), source=weights)
    _, params = nnx.split(model)
    x, text, t, ofs = (jnp.asarray(a) for a in _inputs(latent))
    cos, sin = rotary_tables(cfg, *latent)
    inputs = (x, text, t, ofs, cos, sin)

    def forward_for(backend: str, block: int):
        graph, _ = nnx.split(
            shape_only_model(CogVideoXTransformer3DModel, _jax_config(_kwargs(layers), backend, block))
        )
        return jax.jit(
            lambda p, x, e, t, o, c, s: nnx.merge(graph, p)(x, e, t, ofs=o, image_rotary_emb=(c, s))
        )

    times, compile_s, compiled, y = _time_jitted(
        forward_for(attention, chunk), params, inputs, repeats, xla_options
    )
    np.save(out, np.asarray(y))
    mem = compiled.memory_analysis()
    res = {
        "times": times,
        "compile_s": compile_s,
        "xla_temp_gib": mem.temp_size_in_bytes / 2**30,
        "xla_args_gib": mem.argument_size_in_bytes / 2**30,
        "devices": jax.device_count(),
    }
    plain = forward_for("xla", 0).lower(*_shapes((params, *inputs))).compile()
    res["flops"] = _flops(plain)
    if sweep:
        res["sweep"] = {}
        for backend, block in SWEEP:
            if (backend, block) == (attention, chunk if attention == "chunked" else 0):
                res["sweep"][f"{backend}:{block}"] = min(times)
                continue
            sweep_times, *_ = _time_jitted(forward_for(backend, block), params, inputs, repeats, xla_options)
            res["sweep"][f"{backend}:{block}"] = min(sweep_times)
            print(f"  jax {backend} {block or ''}: {min(sweep_times):.2f} s", flush=True)
    if pieces:
        res["pieces"] = _jax_pieces(model, cfg, x, text, t, ofs, (cos, sin), repeats)
    return res


def _time_jitted(fwd, params, inputs: tuple, repeats: int, xla_options: dict | None):
    """bench.common.time_jitted with XLA compiler options (e.g. a library for the dots)."""
    t0 = time.perf_counter()
    compiled = fwd.lower(params, *inputs).compile(xla_options)
    compile_s = time.perf_counter() - t0
    result = {}

    def run():
        result["y"] = compiled(params, *inputs).block_until_ready()

    return time_calls(run, repeats), compile_s, compiled, result["y"]


def _shapes(tree):
    import jax

    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


# -- mid size: the pieces of one block, timed on both sides --------------------------------------------------


def _jax_pieces(model, cfg, x, text, t, ofs, rope, repeats: int) -> dict:
    """Seconds (min over repeats) of each piece of the first block, one jitted call each, at the mid size."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from xdyna_jax.nn.attention_ops import dot_product_attention
    from xdyna_jax.nn.rope import apply_rotary

    block = model.transformer_blocks[0]
    xv, e, temb, _ = model.embed_inputs(x, text, t, ofs, rope)
    joint = jnp.concatenate([e, xv], axis=1)
    heads = cfg.num_attention_heads
    q = joint.reshape(*joint.shape[:2], heads, -1)
    n_text = e.shape[1]

    def timed(fn, *args):
        jitted = jax.jit(fn)
        out = {}

        def run():
            out["y"] = jax.block_until_ready(jitted(*args))

        return min(time_calls(run, repeats))

    graph_b, state_b = nnx.split(block)
    graph_m, state_m = nnx.split(model)
    pieces = {
        "embed (patch+text+time)": timed(
            lambda s, *a: nnx.merge(graph_m, s).embed_inputs(*a, rope)[:3], state_m, x, text, t, ofs
        ),
        "block": timed(lambda s, xv, e, tb: nnx.merge(graph_b, s)(xv, e, tb, rope), state_b, xv, e, temb),
        "norm1 (LN + AdaLN mod)": timed(
            lambda s, xv, e, tb: nnx.merge(graph_b, s).norm1(xv, e, tb), state_b, xv, e, temb
        ),
        "qkv proj": timed(
            lambda s, j: [getattr(nnx.merge(graph_b, s).attn1, n)(j) for n in ("to_q", "to_k", "to_v")],
            state_b,
            joint,
        ),
        "qk norm": timed(
            lambda s, a: (nnx.merge(graph_b, s).attn1.norm_q(a), nnx.merge(graph_b, s).attn1.norm_k(a)),
            state_b,
            q,
        ),
        "rope (q, k)": timed(
            lambda a: [
                jnp.concatenate([a[:, :n_text], apply_rotary(a[:, n_text:], *rope)], axis=1) for _ in range(2)
            ],
            q,
        ),
        "out proj": timed(lambda s, j: nnx.merge(graph_b, s).attn1.to_out[0](j), state_b, joint),
        "ff": timed(lambda s, j: nnx.merge(graph_b, s).ff(j), state_b, joint),
    }
    for backend, chunk in SWEEP:
        pieces[f"attention core {backend} {chunk or ''}".strip()] = timed(
            lambda a, b=backend, c=chunk: dot_product_attention(
                a, a, a, backend=b, chunk_size=max(c, 1), precision=cfg.compute.lax_precision
            ),
            q,
        )
    return pieces


def _torch_pieces(model, args, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    block = model.transformer_blocks[0]

    def embed():
        emb = model.time_embedding(model.time_proj(args["timestep"]).to(torch.float32))
        emb = emb + model.ofs_embedding(model.ofs_proj(args["ofs"]).to(torch.float32))
        return emb, model.patch_embed(args["encoder_hidden_states"], args["hidden_states"])

    with torch.inference_mode():
        emb, hs = embed()
        text_len = args["encoder_hidden_states"].shape[1]
        e, xv = hs[:, :text_len], hs[:, text_len:]
        joint = torch.cat([e, xv], dim=1)
        heads = block.attn1.heads
        qh = joint.unflatten(2, (heads, -1)).transpose(1, 2)  # (B, H, L, D)
        rope = args["image_rotary_emb"]

    def timed(fn):
        def run():
            with torch.inference_mode():
                fn()

        return min(time_calls(run, repeats))

    from diffusers.models.embeddings import apply_rotary_emb

    return {
        "embed (patch+text+time)": timed(embed),
        "block": timed(lambda: block(xv, e, emb, image_rotary_emb=rope)),
        "norm1 (LN + AdaLN mod)": timed(lambda: block.norm1(xv, e, emb)),
        "qkv proj": timed(lambda: [m(joint) for m in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v)]),
        "qk norm": timed(lambda: (block.attn1.norm_q(qh), block.attn1.norm_k(qh))),
        "rope (q, k)": timed(
            lambda: [
                torch.cat([qh[:, :, :text_len], apply_rotary_emb(qh[:, :, text_len:], rope)], dim=2)
                for _ in range(2)
            ]
        ),
        "out proj": timed(lambda: block.attn1.to_out[0](joint)),
        "ff": timed(lambda: block.ff(joint)),
        "attention core sdpa": timed(lambda: F.scaled_dot_product_attention(qh, qh, qh)),
    }


def _make_weights(path: Path, layers: int) -> None:
    import torch
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**_kwargs(layers))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # no unit norm weight or zero bias left to hide a difference
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def parse_xla_options(items: list[str]) -> dict | None:
    """["key=value", ...] -> XLA compiler options; "true" / "false" become Python bools (XLA rejects the
    strings for a bool option such as xla_cpu_use_xnnpack), every other value stays a string."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--xla-option wants KEY=VALUE, got {item!r}")
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options or None


def mid_size(a) -> None:
    latent = tuple(int(v) for v in a.latent.split("x"))
    f, h, w = latent
    if f % 2 or h % 2 or w % 2:
        raise SystemExit(f"--latent {a.latent}: F', h and w must be even (patch 2 x 2 x 2)")
    tokens = (f // 2) * (h // 2) * (w // 2)
    loads = [os.getloadavg()]
    print(f"load average {loads[0]}", flush=True)
    runs = {"torch": [], "jax": []}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "dit.safetensors"
        print(f"making random CogVideoX1.5-shaped weights ({a.layers} layers) ...", flush=True)
        _make_weights(weights, a.layers)
        common = ["--weights", str(weights), "--layers", str(a.layers), "--latent", a.latent]
        common += ["--repeats", str(a.repeats)]
        jx_args = ["--attention", a.attention, "--chunk", str(a.chunk)]
        jx_args += [arg for opt in a.xla_option for arg in ("--xla-option", opt)]
        # alternating the processes spreads the other load on this shared machine over both sides
        for r in range(a.rounds):
            extra = (["--pieces"] if a.pieces and r == 0 else []) + (
                ["--sweep"] if a.sweep and r == 0 else []
            )
            pt = spawn(__spec__.name, ["--worker", "torch", "--out", f"{tmp}/pt.npy", *common, *extra])
            print(f"round {r}: torch {pt['times']} (threads {pt['threads']})", flush=True)
            jx = spawn(
                __spec__.name, ["--worker", "jax", "--out", f"{tmp}/jx.npy", *jx_args, *common, *extra]
            )
            print(f"round {r}: jax {jx['times']} (devices {jx['devices']})", flush=True)
            runs["torch"].append(pt)
            runs["jax"].append(jx)
            loads.append(os.getloadavg())
        y_pt, y_jx = np.load(f"{tmp}/pt.npy"), np.load(f"{tmp}/jx.npy")
    err = float(np.abs(y_pt - y_jx).max() / np.abs(y_pt).max())
    mp = min(t for run in runs["torch"] for t in run["times"])
    mj = min(t for run in runs["jax"] for t in run["times"])
    pt, jx = runs["torch"][0], runs["jax"][0]
    gflop = jx["flops"] / 1e9
    print(
        f"load average {loads[-1]} (1-min average seen: {min(x[0] for x in loads):.1f} .. {max(x[0] for x in loads):.1f})"
    )
    attention = f"{a.attention}" + (f" {a.chunk}" if a.attention == "chunked" else "")
    if a.xla_option:
        attention += f", XLA options {' '.join(a.xla_option)}"
    head = (
        "layers",
        "latent (tokens)",
        "jax attention",
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
    print(
        f"| {a.layers} | {a.latent} ({tokens} + {TEXT_TOKENS}) | {attention} | {mp:.2f} | {mj:.2f} | "
        f"**{mj / mp:.2f}** | {gflop / mp:.0f} | {gflop / mj:.0f} | {pt['peak_rss_gib']:.2f} | "
        f"{jx['peak_rss_gib']:.2f} | {jx['xla_temp_gib'] + jx['xla_args_gib']:.2f} | {jx['compile_s']:.1f} | "
        f"{err:.1e} |"
    )
    print(
        f"\n{gflop:.0f} GFLOP per forward (XLA, 'xla' attention graph); {a.rounds} rounds x {a.repeats} repeats"
    )
    if a.sweep:
        print("\n| JAX attention (round 0) | jax s (min) | jax / torch (min) |\n|---|---|---|")
        for name, s in jx["sweep"].items():
            print(f"| {name} | {s:.2f} | {s / mp:.2f} |")
    if a.pieces:
        print("\n| piece (block 0, round 0) | torch ms | jax ms | jax/torch |\n|---|---|---|---|")
        names = list(dict.fromkeys([*pt["pieces"], *jx["pieces"]]))
        for name in names:
            tp, tj = pt["pieces"].get(name), jx["pieces"].get(name)
            cells = [f"{1e3 * v:.1f}" if v is not None else "" for v in (tp, tj)]
            ratio = f"{tj / tp:.2f}" if tp and tj else ""
            print(f"| {name} | {cells[0]} | {cells[1]} | {ratio} |")


# -- full size: FLOPs -----------------------------------------------------------------------------------------


def analytic_flops(kwargs: dict, latent, text_tokens: int, *, batch: int = 1, control: bool = True) -> dict:
    """FLOPs of one forward of the CogVideoX 1.5-style transformer (DynamiCtrl with `control`) from the
    equations, matmuls only (2 per multiply-add), by part, plus "total"."""
    d = kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
    dt, layers = kwargs["time_embed_dim"], kwargs["num_layers"]
    p, pt = kwargs["patch_size"], kwargs["patch_size_t"]
    f, h, w = latent
    n = (f // pt) * (h // p) * (w // p)
    seq = text_tokens + n
    patch_in = kwargs["in_channels"] * p * p * pt
    patch_out = kwargs["out_channels"] * p * p * pt
    parts = {
        # noisy latents and (DynamiCtrl) [pose ; pose] through the same patch Linear; text_proj
        "patch embeds": 2 * n * patch_in * d * (2 if control else 1)
        + 2 * text_tokens * kwargs["text_embed_dim"] * d,
        # time MLP (sinusoid D -> dt -> dt) and ofs MLP (dt -> dt -> dt)
        "time + ofs MLPs": 2 * (d * dt + dt * dt) + (2 * 2 * dt * dt if kwargs.get("ofs_embed_dim") else 0),
        # per block norm1, norm2 (6D each) and control_norm1 (3D) linears on temb
        "AdaLN/PadaLN linears": layers * 2 * dt * d * (6 + 6 + (3 if control else 0)),
        "q,k,v,out projections": layers * 2 * 4 * d * d * seq,
        "feed-forward": layers * 2 * 8 * d * d * seq,
        "attention QK^T and AV": layers * 2 * 2 * seq * seq * d,
        "head (norm_out linear + proj_out)": 2 * dt * 2 * d + 2 * n * d * patch_out,
    }
    parts = {k: v * batch for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def xla_flops(
    kwargs: dict, latent, text_tokens: int, batch: int, dtype: str = "bfloat16"
) -> tuple[float, float, float]:
    """(XLA FLOPs, lower s, compile s) of the DynamiCtrl forward of `kwargs` with "xla" attention, weights
    and activations in `dtype`, from shapes only (nothing is allocated)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from xdyna_jax.models.dynamictrl import DynamiCtrlTransformerModel
    from xdyna_jax.nn.bf16_weights import compiler_options_for
    from xdyna_jax.nn.shape_only import shape_only_model

    cfg = _jax_config(kwargs, "xla", 1, dtype=dtype)
    act = cfg.compute.jnp_dtype
    graph, params = nnx.split(shape_only_model(DynamiCtrlTransformerModel, cfg))
    params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, act), params)
    f, h, w = latent
    args = (
        params,
        jax.ShapeDtypeStruct((batch, f, h, w, kwargs["in_channels"]), act),
        jax.ShapeDtypeStruct((batch, text_tokens, kwargs["text_embed_dim"]), act),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch, f, h, w, kwargs["out_channels"]), act),
        jax.ShapeDtypeStruct((1,), jnp.float32),
    )
    fwd = jax.jit(lambda p, x, e, t, pose, o: nnx.merge(graph, p)(x, e, t, pose, ofs=o))
    t0 = time.perf_counter()
    lowered = fwd.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options_for(params))
    return _flops(compiled), t1 - t0, time.perf_counter() - t1


def full_size(a) -> None:
    f, h, w = FULL_LATENT
    n = (f // 2) * (h // 2) * (w // 2)
    print(f"load average {os.getloadavg()}", flush=True)
    print(
        f"full-size DynamiCtrl forward: {FULL_LAYERS} layers, latent {f}x{h}x{w} (37 frames at 1360x768 HxW), "
        f"{n} video + {TEXT_TOKENS} text tokens, CFG batch {FULL_BATCH}, bf16, 'xla' attention, from shapes only",
        flush=True,
    )
    parts = analytic_flops(_kwargs(FULL_LAYERS), FULL_LATENT, TEXT_TOKENS)
    for name, v in parts.items():
        print(f"analytic {name}: {v / 1e12:.3f} TFLOP per sample, {FULL_BATCH * v / 1e12:.3f} per CFG batch")
    print(f"reference figure: ~{REFERENCE_TFLOP} TFLOP per single-sample forward")
    if a.extrapolate:
        counts = {}
        for layers in (1, 2):
            flops, lower_s, compile_s = xla_flops(_kwargs(layers), FULL_LATENT, TEXT_TOKENS, FULL_BATCH)
            counts[layers] = flops
            print(
                f"XLA {layers}-layer model: {flops / 1e12:.3f} TFLOP per CFG batch (lower {lower_s:.1f} s, "
                f"compile {compile_s:.1f} s)",
                flush=True,
            )
        xla = counts[1] + (FULL_LAYERS - 1) * (counts[2] - counts[1])
        how = f"EXTRAPOLATED linearly from 1- and 2-layer compiles: 1-layer + {FULL_LAYERS - 1} x per-layer"
    else:
        xla, lower_s, compile_s = xla_flops(_kwargs(FULL_LAYERS), FULL_LATENT, TEXT_TOKENS, FULL_BATCH)
        how = f"whole {FULL_LAYERS}-layer model compiled: lower {lower_s:.1f} s, compile {compile_s:.1f} s"
    total = parts["total"] * FULL_BATCH
    print(f"XLA cost analysis: {xla / 1e12:.3f} TFLOP per CFG batch ({how})")
    print(f"XLA cost analysis: {xla / FULL_BATCH / 1e12:.3f} TFLOP per sample (CFG batch / {FULL_BATCH})")
    print(
        f"analytic total: {total / 1e12:.3f} TFLOP per CFG batch, {total / FULL_BATCH / 1e12:.3f} per sample"
    )
    print(f"XLA / analytic: {xla / total:.4f} ({100 * (xla / total - 1):+.2f} %)")
    scores = FULL_LAYERS * FULL_BATCH * COGVIDEOX15_I2V["num_attention_heads"] * (n + TEXT_TOKENS) ** 2
    print(
        f"XLA - analytic: {(xla - total) / 1e12:.3f} TFLOP = {(xla - total) / scores:.2f} FLOP per attention score "
        "(the softmax's max, subtract, sum and the other elementwise work the analytic count leaves out)"
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {rss:.2f} GiB, load average {os.getloadavg()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--latent", default="2x40x60", help="latent F'xhxw (even; 2x40x60 = 5 frames at 320x480)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    p.add_argument("--rounds", type=int, default=2, help="torch / jax process pairs, run alternately")
    p.add_argument(
        "--attention", default="chunked", help="JAX attention backend (chunked | xla | dot_product)"
    )
    p.add_argument("--chunk", type=int, default=512, help="query block of the chunked backend")
    p.add_argument(
        "--xla-option", action="append", default=[], help="KEY=VALUE XLA compiler option for JAX (repeatable)"
    )
    p.add_argument("--sweep", action="store_true", help="also time every CPU attention backend / chunk size")
    p.add_argument("--pieces", action="store_true", help="also time the pieces of one block on both sides")
    p.add_argument(
        "--full-size", action="store_true", help="full DynamiCtrl: XLA FLOPs vs the analytic count"
    )
    p.add_argument("--extrapolate", action="store_true", help="full size: compile 1 and 2 layers, not 42")
    p.add_argument("--worker", choices=("torch", "jax"), help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:  # child process: one framework
        latent = tuple(int(v) for v in a.latent.split("x"))
        if a.worker == "torch":
            res = worker_torch(a.weights, a.layers, latent, a.repeats, a.out, a.pieces)
        else:
            options = parse_xla_options(a.xla_option)
            res = worker_jax(
                a.weights,
                a.layers,
                latent,
                a.repeats,
                a.out,
                a.attention,
                a.chunk,
                a.sweep,
                a.pieces,
                options,
            )
        res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(res))
        return
    if a.full_size:
        full_size(a)
    else:
        mid_size(a)


if __name__ == "__main__":
    main()
