"""Self-reenactment on the synthetic world's held-out identities: the README's results table.

    python -m bench.synthetic_reenactment --heldout demo/heldout --out eval/ \
        --model "demo model=assets/demo/model" --model "random weights=demo/init" \
        --model "no Dynamics-Adapter=demo/runs/denoiser_noadapter/bundle"

For each held-out clip (an identity and a dance never trained on; `python -m xdyna_jax.training.demo_recipe`
writes them to DIR/heldout): the clip's last frame is the reference photo, its first --frames frames are the
target, and their keypoints and face landmarks drive `sample.py` (pose and S-Face ControlNets). Each result
is scored by `python -m xdyna_jax.eval` against the target with the clip's palette; the table is the mean
over the clips, then the ground truth's own scores (the limb finder run on the target itself). The sampling
settings default to the demo's (`make demo`): 96 x 64, 25 DDIM steps, guidance 1.5, windows of 4 driven
frames with overlap 1 (the model trains on 1 + 4 frames), seed 0, fp32.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

SAMPLING = ["--height", "96", "--width", "64", "--seed", "0", "--dtype", "fp32", "--no-compile-cache"]
# the demo's settings (the Makefile's `make demo`); the options below change them
DEMO = dict(steps=25, guidance=1.5, window=4, overlap=1)
COLUMNS = ("PSNR dB", "SSIM", "limbs found", "pose error px (capped)", "identity error ΔE76",
           "background flow gen/target")  # fmt: skip


def clip_inputs(heldout: Path, stem: str, frames: int, dest: Path) -> dict[str, Path]:
    """The reference (the clip's last frame), the target frames and their keypoints (for the eval) of a clip."""
    import imageio.v3 as iio

    from xdyna_jax.io.video import read_video, write_frames

    video, _ = read_video(heldout / "videos" / f"{stem}.mp4")
    if len(video) <= frames:
        raise SystemExit(f"error: {stem} has {len(video)} frames; --frames {frames} leaves no reference")
    dest.mkdir(parents=True, exist_ok=True)
    paths = {
        "reference": dest / "reference.png",
        "target": dest / "target",
        "keypoints": dest / "keypoints.npy",
    }
    iio.imwrite(paths["reference"], video[-1])
    shutil.rmtree(paths["target"], ignore_errors=True)
    write_frames(paths["target"], video[:frames])
    np.save(paths["keypoints"], np.load(heldout / "poses" / f"{stem}.npy")[:frames])
    return paths


def scores(report: dict) -> tuple[float, ...]:
    pose, identity = report["pose"]["generated"], report["identity"]["generated"]
    return (report["image"]["psnr_db"], report["image"]["ssim"], pose["detection_rate"],
            pose["segment_capped_px"], identity["overall"], report["background_motion"]["ratio"])  # fmt: skip


def target_scores(report: dict) -> tuple[float | None, ...]:
    pose, identity = report["pose"]["target"], report["identity"]["target"]
    return (None, None, pose["detection_rate"], pose["segment_capped_px"], identity["overall"], 1.0)


def row(name: str, values: list[tuple]) -> str:
    mean = [None if v[0] is None else float(np.mean(v)) for v in zip(*values, strict=True)]
    digits = (2, 3, None, 2, 1, 2)
    cells = [
        "-" if m is None else (f"{100 * m:.0f} %" if d is None else f"{m:.{d}f}")
        for m, d in zip(mean, digits, strict=True)
    ]
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    import sample
    from xdyna_jax.eval.evaluate import evaluate

    p = argparse.ArgumentParser(
        prog="python -m bench.synthetic_reenactment", description=__doc__.split("\n")[0]
    )
    p.add_argument("--heldout", required=True, help="a synthetic world of held-out identities")
    p.add_argument(
        "--model", action="append", required=True, metavar="NAME=BUNDLE", help="a row of the table"
    )
    p.add_argument("--out", required=True, help="folder for the videos and eval reports")
    p.add_argument("--frames", type=int, default=8, help="frames animated per clip (default 8)")
    p.add_argument("--steps", type=int, default=DEMO["steps"])
    p.add_argument("--guidance", type=float, default=DEMO["guidance"])
    p.add_argument("--window", type=int, default=DEMO["window"], help="context window (driven frames)")
    p.add_argument("--overlap", type=int, default=DEMO["overlap"])
    args = p.parse_args(argv)
    sampling = SAMPLING + ["--steps", str(args.steps), "--guidance", str(args.guidance), "--window",
                           str(args.window), "--overlap", str(args.overlap)]  # fmt: skip
    heldout, out = Path(args.heldout), Path(args.out)
    models = [m.split("=", 1) for m in args.model]
    if any(len(m) != 2 or not Path(m[1]).is_dir() for m in models):
        raise SystemExit(f"error: --model takes NAME=BUNDLE with an existing bundle folder, got {args.model}")
    stems = [c["stem"] for c in json.loads((heldout / "world.json").read_text())["clips"]]
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    truth = []
    for name, bundle in models:
        values = []
        for stem in stems:
            inputs = clip_inputs(heldout, stem, args.frames, out / "inputs" / stem)
            run = out / name.replace(" ", "_") / stem
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            code = sample.main([
                "--model", bundle, "--reference", str(inputs["reference"]), "--pose", str(heldout / "poses" / f"{stem}.npy"),
                "--face", str(heldout / "videos" / f"{stem}.mp4"), "--landmarks",
                str(heldout / "faces" / f"{stem}.npy"), "--frames", str(args.frames), *sampling,
                "--out", str(run / "result.mp4"), "--grid", str(run / "grid.mp4"), "--frames-dir", str(run / "frames"),
            ])  # fmt: skip
            if code:
                return code
            report = evaluate(run / "frames", inputs["target"], keypoints_path=inputs["keypoints"],
                              palette_path=heldout / "palettes" / f"{stem}.json")  # fmt: skip
            (run / "eval.json").write_text(json.dumps(report, indent=1))
            values.append(scores(report))
            if len(truth) < len(stems):
                truth.append(target_scores(report))
        lines.append(row(name, values))
    lines.append(row("ground truth (the target itself)", truth))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
