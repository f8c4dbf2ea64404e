"""One denoising step of a full-size X-Dyna video (1 + 16 frames, 896x512) from a converted real-size bundle:
wall time and the sampling process's peak RSS.

    python -m bench.sample_full_size --keep fakes/              # bf16; builds fakes + bundle once (~12 + 11 GiB)
    python -m bench.sample_full_size --keep fakes/ --dtype fp32

The weights are random, in the release's file layouts (`bench.convert_memory`'s fakes: SD 1.5, the X-Dyna
UNet and both ControlNet checkpoints, IP-Adapter-plus and its CLIP ViT-H/14 image encoder), plus a small
byte-level tokenizer; `python -m convert xdyna` turns them into the fp32 pipeline bundle users get. The
measured process then does what `sample.py --dtype bf16` does: `load_pipeline(..., param_dtype)` (weights
cast while loading), the reference's VAE latent and IP tokens, the empty prompt, one DDIM step of the one
16-frame window with CFG, and the decode of 16 frames. Its peak RSS is the kernel's (wait4's rusage), so it
counts everything: weights, XLA's buffers, compiled code, Python.
Result line: task=sample_full_size dtype=<d> frames=16 height=896 width=512 steps=1 peak_rss_gib=<x> ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.convert_memory import GIB, run_measured

FRAMES, HEIGHT, WIDTH = 16, 896, 512


def write_byte_tokenizer(folder: Path) -> None:
    """A CLIP-format BPE tokenizer with only byte symbols (no merges): ids within CLIP's vocabulary size, so
    the real-size text encoder takes them. CLIP's own vocabulary is not ours to ship."""
    from tokenizers.pre_tokenizers import ByteLevel

    base = sorted(ByteLevel.alphabet())
    tokens = base + [b + "</w>" for b in base] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def build_bundle(root: Path) -> Path:
    """The fakes (reused when already built at full size) and their converted bundle under root."""
    stamp, bundle = root / "fakes.json", root / "bundle"
    if not (stamp.is_file() and json.loads(stamp.read_text())["scale"] == 1.0):
        shutil.rmtree(root, ignore_errors=True)
        r = run_measured(["bench.convert_memory", "--build-only", "--keep", str(root), "--scale", "1.0"])
        print(f"built full-size fakes in {r['wall_s']} s", flush=True)
    if not (root / "sd15" / "tokenizer").is_dir():
        write_byte_tokenizer(root / "sd15" / "tokenizer")
    if not (bundle / "manifest.json").is_file():
        shutil.rmtree(bundle, ignore_errors=True)
        args = ["convert", "xdyna", "--release", str(root / "X-Dyna"), "--sd15", str(root / "sd15")]
        args += ["--ip-adapter", str(root / "IP-Adapter"), "--output", str(bundle)]
        r = run_measured(args)
        print(f"converted the bundle in {r['wall_s']} s (peak RSS {r['peak_rss_gib']} GiB)", flush=True)
    return bundle


def run_worker(args: list[str]) -> dict:
    """`python -m <args>` with its output in files (a full pipe would stall it): wall seconds, its own peak
    RSS, and the JSON of its last stdout line."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        code = os.waitstatus_to_exitcode(status)
        if code:
            why = f"killed by signal {-code} (out of memory?)" if code < 0 else f"exit status {code}"
            raise RuntimeError(f"{' '.join(args)} failed, {why}:\n{err.read()[-3000:]}")
        result = json.loads(out.read().strip().splitlines()[-1])
    return {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss * 1024 / GIB, "result": result}


def _rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def worker(bundle: str, dtype: str) -> None:
    """The measured process: load, sample one step, print one JSON line (the parent reads the peak RSS)."""
    import numpy as np

    from xdyna_jax.nn.compute import Compute
    from xdyna_jax.sampling import load_pipeline
    from xdyna_jax.sampling.xdyna import XDynaPipeline

    jnp_dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    t0 = time.perf_counter()
    pipe = XDynaPipeline(load_pipeline(bundle, compute=Compute(dtype=jnp_dtype), param_dtype=jnp_dtype))
    load_s, load_rss = time.perf_counter() - t0, _rss_gib()
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (1024, 640, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    faces = rng.integers(0, 256, (FRAMES, HEIGHT, WIDTH, 6), dtype=np.uint8)
    calls = []
    t1 = time.perf_counter()
    frames = pipe(
        reference, poses, faces, num_frames=FRAMES, steps=1, height=HEIGHT, width=WIDTH,
        progress=lambda n: calls.append(time.perf_counter()),
    )  # fmt: skip
    call_s = time.perf_counter() - t1
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3), frames.shape
    result = {"load_s": load_s, "load_rss_gib": load_rss, "call_s": call_s, "window_calls": len(calls)}
    print(json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--keep", help="folder for the fakes and the bundle, kept and reused (default: a temp dir)"
    )
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # the measured process: the bundle folder
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.dtype)
        return
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="xdyna-full-"))
    try:
        bundle = build_bundle(root)
        r = run_worker(["bench.sample_full_size", "--worker", str(bundle), "--dtype", args.dtype])
        w = r["result"]
        print(
            f"task=sample_full_size dtype={args.dtype} frames={FRAMES} height={HEIGHT} width={WIDTH} steps=1 "
            f"peak_rss_gib={r['peak_rss_gib']:.2f} load_s={w['load_s']:.1f} rss_after_load_gib="
            f"{w['load_rss_gib']:.2f} call_s={w['call_s']:.0f} wall_s={r['wall_s']:.0f}",
            flush=True,
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
