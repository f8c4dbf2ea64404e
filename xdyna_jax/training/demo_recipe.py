"""The demo model's recipe, one command: a synthetic world, its datasets, a fresh X-Dyna, the VAE stage, the
denoiser stage and stage 2, each through train.py, and the trained bundle copied out.

    python -m xdyna_jax.training.demo_recipe --out demo/          # the full run (docs/synthetic.md)
    python -m xdyna_jax.training.demo_recipe --out demo_quick/ --quick # a few steps per stage: it runs end to end

Under --out:
  world/            the training world (seed 0): dancers of --identities identities, scene clips
  heldout/          a world of other identities and other dances (seed 1), never trained on: validation
                    losses here, and the demo's reference images (heldout/references/) and driving poses
  data/human, data/scene, data/heldout   the prepared datasets (python -m xdyna_jax.data.prepare)
  latents/human, latents/scene, latents/heldout   the same with the trained VAE's latents stored
                    (prepare --latents): what the denoiser and stage 2 train on
  init/             the fresh X-Dyna (python -m xdyna_jax.training.scratch)
  runs/vae, runs/denoiser, runs/stage2   the train.py runs (checkpoints, tensorboard, bundle), and
                    runs/<stage>.log their console output
  xdyna_synthetic/  the trained pipeline bundle (stage 2's), what sample.py loads
  demo_inputs/      the demo's inputs (held out: an identity and a dance never trained on):
                    reference.png (the identity's own photo), driving_pose.npy, driving.mp4 (the dance, for
                    the S-Face maps; also the self-reenactment target), driving_landmarks.npy,
                    palette.json (the identity's limb colours, for `python -m xdyna_jax.eval`)
  recipe.json       the commands' settings, each stage's wall time, steps and measured seconds per step

Stages (configs/train_xdyna.py): `synthetic_vae` trains the VAE alone on frames and measures its latent
scale; `synthetic` trains every parameter of the denoiser (UNet with adapter, IP-Adapter projections and
motion modules, both ControlNets): from scratch there is no SD 1.5 to freeze, so this one stage is SD's
pretraining and the paper's stage 1 together (the S-Face ControlNet included); `synthetic_stage2` then
trains the S-Face ControlNet alone, as the paper's stage 2 (--stage2-steps 0 skips it). Every stage
validates on the held-out dataset before its first and after its last step.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TRAIN_CONFIG = ROOT / "configs" / "train_xdyna.py"
# (name, config of configs/train_xdyna.py, steps of the full recipe)
# A stage of 0 steps is skipped (--stage2-steps 0: the denoiser stage alone trains the S-Face ControlNet too).
STAGES = (("vae", "synthetic_vae", 600), ("denoiser", "synthetic", 3000), ("stage2", "synthetic_stage2", 200))
QUICK_STEPS = 4
BUNDLE = "xdyna_synthetic"
DEMO_INPUTS = "demo_inputs"
MAX_BUNDLE_BYTES = 20_000_000


class RecipeError(RuntimeError):
    """A step of the recipe failed (its command's exit status is in the message)."""


def _run(what: str, main, argv: list[str]) -> None:
    code = main(argv)
    if code != 0:
        raise RecipeError(f"{what} failed with exit status {code}: {' '.join(argv)}")


def _train(name: str, argv: list[str], log_file: Path) -> None:
    """train.py in its own process (as a user runs it), its console output kept in `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as f:
        code = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT).returncode  # fmt: skip
    if code != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-5:]
        raise RecipeError(
            f"stage {name} failed with exit status {code} (log {log_file}): " + " | ".join(tail)
        )


def seconds_per_step(log_file: Path) -> float | None:
    """The median of the step rates train.py logged (each over the steps since the previous log line, with
    compiles, validation and saves excluded), as seconds per step."""
    rates = [float(r) for r in re.findall(r"steps_per_s=([0-9.eE+-]+)", log_file.read_text(errors="replace"))]
    return round(float(1.0 / np.median(rates)), 3) if rates else None


def write_demo_inputs(heldout: Path, dest: Path) -> dict:
    """The held-out world's first clip as the demo's inputs in `dest` (the module docstring's names)."""
    world = json.loads((heldout / "world.json").read_text())
    clip = world["clips"][0]
    stem, identity = clip["stem"], f"id{clip['identity']:06d}"
    dest.mkdir(parents=True)
    for source, name in (
        (heldout / "references" / f"{identity}.png", "reference.png"),
        (heldout / "poses" / f"{stem}.npy", "driving_pose.npy"),
        (heldout / "videos" / f"{stem}.mp4", "driving.mp4"),
        (heldout / "faces" / f"{stem}.npy", "driving_landmarks.npy"),
        (heldout / "palettes" / f"{stem}.json", "palette.json"),
    ):
        shutil.copyfile(source, dest / name)
    return {"clip": stem, "identity": identity, "height": world["height"], "width": world["width"]}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run_recipe(
    out: str | Path,
    *,
    identities: int = 12,
    clips_per_identity: int = 4,
    scenes: int = 6,
    heldout_identities: int = 2,
    frames: int = 24,
    steps: dict[str, int] | None = None,
    seed: int = 0,
    log=print,
) -> dict:
    """Run every step of the module docstring into `out` (which must not exist); returns recipe.json's dict."""
    from xdyna_jax.data import prepare
    from xdyna_jax.data.synthetic import write_world
    from xdyna_jax.training import scratch

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    cfg = scratch.load_config(f"{TRAIN_CONFIG}:synthetic")
    h, w = int(cfg.height), int(cfg.width)
    steps = {name: n for name, _, n in STAGES} | dict(steps or {})
    record: dict = {"settings": dict(identities=identities, clips_per_identity=clips_per_identity, scenes=scenes,
                                     heldout_identities=heldout_identities, frames=frames, height=h, width=w,
                                     seed=seed, steps=steps), "stages": {}}  # fmt: skip
    times = record["stages"]

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        log(f"[recipe] {name} ...")
        result = fn(*args, **kwargs)
        times.setdefault(name, {})["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"[recipe] {name}: {times[name]['seconds']} s")
        return result

    def world(name, ids, clips, scene_clips, world_seed):
        write_world(out / name, ids, clips, scene_clips, frames, h, w, world_seed)

    out.mkdir(parents=True)
    timed("world", world, "world", identities, clips_per_identity, scenes, seed)
    timed("heldout_world", world, "heldout", heldout_identities, 1, 0, seed + 1)
    size = ["--height", str(h), "--width", str(w)]

    def human(world_dir: Path, output: Path) -> list[str]:
        return ["--videos", str(world_dir / "videos"), "--poses", str(world_dir / "poses"), "--faces",
                str(world_dir / "faces"), *size, "--output", str(output)]  # fmt: skip

    def prepare_all(dest: Path, latents: Path | None = None):
        stored = ["--latents", str(latents)] if latents else []
        _run("prepare", prepare.main, human(out / "world", dest / "human") + stored)
        _run("prepare", prepare.main, human(out / "heldout", dest / "heldout") + stored)
        scene = ["--videos", str(out / "world" / "scenes"), "--scene", *size, "--output", str(dest / "scene")]
        _run("prepare", prepare.main, scene + stored)

    timed("prepare", prepare_all, out / "data")
    timed("scratch", _run, "scratch", scratch.main,
          ["--config", f"{TRAIN_CONFIG}:synthetic", "--out", str(out / "init"), "--seed", str(seed)])  # fmt: skip
    init = out / "init"
    data = out / "data"
    for name, config, _ in STAGES:
        run = out / "runs" / name
        n = int(steps[name])
        if n == 0:
            continue
        if name != "vae" and data == out / "data":
            # the trained VAE's latents, stored once: the later stages' steps then never run its encoder
            timed("prepare_latents", prepare_all, out / "latents", init)
            data = out / "latents"
        argv = ["--config", f"{TRAIN_CONFIG}:{config}", "--init", f"xdyna={init}", "--data", str(data / "human"),
                "--val-data", str(data / "heldout"), "--output", str(run), "--steps", str(n),
                "--set", f"train.val_every={n}", "--set", f"seed={seed}"]  # fmt: skip
        if name == "denoiser":  # harmonic data fusion: scene clips mixed in
            argv += ["--scene-data", str(data / "scene")]
        if n < 100:  # a short run: the warmup and the saves must fit in it
            argv += ["--set", f"optimizer.warmup_steps={max(n // 4, 1)}", "--set", f"train.save_every={n}",
                     "--set", f"train.log_every={max(n // 2, 1)}"]  # fmt: skip
        log_file = out / "runs" / f"{name}.log"
        timed(name, _train, name, argv, log_file)
        times[name].update(steps=n, seconds_per_step=seconds_per_step(log_file))
        init = run / "bundle"
    bundle = out / BUNDLE
    shutil.copytree(init, bundle)
    record["demo_inputs"] = write_demo_inputs(out / "heldout", out / DEMO_INPUTS)
    record["bundle"] = {"path": str(bundle), "bytes": folder_bytes(bundle)}
    if record["bundle"]["bytes"] > MAX_BUNDLE_BYTES:
        log(f"[recipe] warning: {bundle} is {record['bundle']['bytes'] / 1e6:.1f} MB (> 20 MB)")
    (out / "recipe.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m xdyna_jax.training.demo_recipe", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="folder to create (must not exist)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per stage and a small world")
    p.add_argument("--identities", type=int, default=12)
    p.add_argument("--clips-per-identity", type=int, default=4)
    p.add_argument("--scenes", type=int, default=6)
    p.add_argument("--frames", type=int, default=24, help="frames per clip")
    for name, _, n in STAGES:
        p.add_argument(f"--{name}-steps", type=int, default=n)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    steps = {name: getattr(args, f"{name}_steps") for name, _, _ in STAGES}
    world = dict(identities=args.identities, clips_per_identity=args.clips_per_identity, scenes=args.scenes,
                 frames=args.frames)  # fmt: skip
    if args.quick:
        steps = {name: QUICK_STEPS for name in steps}
        world = dict(identities=2, clips_per_identity=1, scenes=1, frames=12)
    try:
        record = run_recipe(args.out, steps=steps, seed=args.seed, **world)
    except (RecipeError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record["stages"], indent=1))
    print(f"wrote {record['bundle']['path']} ({record['bundle']['bytes'] / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
