"""Command line: score a generated video against its target.

    python -m xdyna_jax.eval --generated out.mp4 --target gt.mp4 \
        [--keypoints drive.npy --palette palette.json] [--reference ref.png] [--json scores.json] \
        [--lpips-weights alexnet-owt-7be5be79.pth [--lpips-net alex]]
    python -m xdyna_jax.eval --generated generated_videos/ --target target_videos/ \
        --fvd-weights i3d_torchscript.pt [--json fvd.json]

The first form scores one video against its target, frame by frame; LPIPS is added when a local backbone
file is given. The second compares two folders of videos (mp4 files, or sub-folders of PNG frames) by FVD.
Learned metrics need `pip install 'xdyna-jax[eval]'` and weights on disk; nothing downloads.

Prints a table and, with --json, writes the same numbers as JSON (atomically). Exit status 0 on success,
2 when the inputs cannot be evaluated (the message names the files).
"""

from __future__ import annotations

import argparse
import math
import sys

from xdyna_jax.eval.evaluate import evaluate, evaluate_video_sets, video_set, write_json
from xdyna_jax.eval.identity_metrics import SPACES
from xdyna_jax.eval.inputs import EvalInputError
from xdyna_jax.eval.learned_metrics import FVD_MIN_FRAMES, LPIPS_BACKBONES, LPIPS_NETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xdyna_jax.eval",
        description="Score a generated video against its target, frame by frame (nothing is resized), or two "
        "folders of videos by FVD.",
    )
    parser.add_argument(
        "--generated",
        required=True,
        help="generated video: an mp4, or a folder of PNG frames; for FVD, a folder of such videos",
    )
    parser.add_argument(
        "--target",
        required=True,
        help="ground-truth video: an mp4, or a folder of PNG frames; for FVD, a folder of such videos",
    )
    parser.add_argument(
        "--keypoints", help="driving keypoints, a DWPose-style (T, 134, 3) or (T, 18, 3) x, y, score .npy"
    )
    parser.add_argument("--palette", help="the identity's palette JSON (xdyna-synthetic-palette/1)")
    parser.add_argument("--reference", help="reference image: checked to carry the palette's limb colours")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument(
        "--pose-cap-px",
        type=float,
        help="distance a missed or far limb counts (default: frame diagonal / 10)",
    )
    parser.add_argument(
        "--color-space", choices=SPACES, default="lab", help="identity colour distance: CIELAB ΔE76 or RGB"
    )
    parser.add_argument("--min-score", type=float, default=0.3, help="keypoint score for a visible joint")
    parser.add_argument(
        "--lpips-weights",
        metavar="FILE",
        help="LPIPS backbone: a torchvision AlexNet (alexnet-owt-7be5be79.pth) or VGG16 (vgg16-397923af.pth) "
        "state dict on disk; LPIPS's linear layers come with the lpips package",
    )
    parser.add_argument(
        "--lpips-net", choices=LPIPS_NETS, default="alex", help="the backbone --lpips-weights holds"
    )
    parser.add_argument(
        "--fvd-weights",
        metavar="FILE",
        help="I3D detector for FVD, the TorchScript i3d_torchscript.pt (StyleGAN-V's); --generated and "
        f"--target are then folders of at least 2 videos each, all of one length of {FVD_MIN_FRAMES} or more "
        "frames",
    )
    return parser


def _number(value, digits: int = 3, *, significant: bool = False) -> str:
    """Fixed decimals, or `digits` significant digits (for energies that may be tiny); "-" for none."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}" if significant else f"{value:.{digits}f}"


def table_rows(report: dict) -> list[tuple[str, str, str]]:
    """(metric, generated, target) text rows; the target column is the ground truth's own score, where a
    metric scores a single video."""
    image = report["image"]
    psnr = "inf" if image["psnr_db"] is None else _number(image["psnr_db"], 2)
    rows = [
        ("L1 (0-255, lower is better)", _number(image["l1"]), ""),
        ("PSNR dB (float64, higher is better)", psnr, ""),
        ("SSIM (Gaussian 11, sigma 1.5)", _number(image["ssim"], 4), ""),
    ]
    if image["lpips"] is not None:
        net = LPIPS_BACKBONES.get(report["inputs"]["lpips_net"], report["inputs"]["lpips_net"])
        rows.append((f"LPIPS ({net}, lower is better)", _number(image["lpips"], 4), ""))
    pose = report["pose"]
    if pose is not None:
        gen, tgt = pose["generated"], pose["target"]
        cap = _number(gen["cap_px"], 1)
        rows += [
            (
                "limbs detected (share of scored)",
                _number(gen["detection_rate"]),
                _number(tgt["detection_rate"]),
            ),
            ("pose error, centroid px (found)", _number(gen["centroid_px"]), _number(tgt["centroid_px"])),
            ("pose error, segment px (found)", _number(gen["segment_px"]), _number(tgt["segment_px"])),
            (
                f"pose error, centroid px (capped {cap})",
                _number(gen["centroid_capped_px"]),
                _number(tgt["centroid_capped_px"]),
            ),
            (
                f"pose error, segment px (capped {cap})",
                _number(gen["segment_capped_px"]),
                _number(tgt["segment_capped_px"]),
            ),
        ]
    identity = report["identity"]
    if identity is not None:
        gen, tgt = identity["generated"], identity["target"]
        unit = "ΔE76" if gen["space"] == "lab" else "RGB"
        rows += [
            (f"identity error, limbs ({unit})", _number(gen["limbs"], 2), _number(tgt["limbs"], 2)),
            (f"identity error, clothing ({unit})", _number(gen["clothing"], 2), _number(tgt["clothing"], 2)),
            (f"identity error, overall ({unit})", _number(gen["overall"], 2), _number(tgt["overall"], 2)),
        ]
    motion = report["background_motion"]
    if motion is not None:
        rows += [
            (
                "background flow energy (px^2)",
                _number(motion["generated_energy"], 4, significant=True),
                _number(motion["target_energy"], 4, significant=True),
            ),
            ("background flow energy ratio gen/target", _number(motion["ratio"]), ""),
            ("background flow energy gen - target", _number(motion["difference"], 4, significant=True), ""),
        ]
    reference = report["reference"]
    if reference is not None:
        rows.append(("reference: palette limb colours found", _number(reference["palette_coverage"]), ""))
    return rows


def format_table(report: dict) -> str:
    rows = [("metric", "generated", "target"), *table_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}".rstrip() for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    head = f"{report['frames']} frames of {report['width']}x{report['height']}"
    if report["pose"] is not None:
        lines.append(
            "(pose, identity: generated scored where the target shows each part; target on every part its "
            "keypoints call visible)"
        )
    return "\n".join([head, *lines])


def format_set_table(report: dict) -> str:
    videos = report["videos"]
    head = (
        f"{len(videos['generated'])} generated and {len(videos['target'])} target videos of "
        f"{report['frames']} frames"
    )
    row = ("FVD (I3D features, lower is better)", _number(report["fvd"], 2))
    width = max(len(row[0]), len("metric"))
    lines = [f"{'metric':<{width}}  value", f"{row[0]:<{width}}  {row[1]}"]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join([head, *lines])


def _sets_main(args) -> int:
    """Two folders of videos, or --fvd-weights: FVD only."""
    pair_only = {
        "--keypoints": args.keypoints,
        "--palette": args.palette,
        "--reference": args.reference,
        "--lpips-weights": args.lpips_weights,
    }
    given = [flag for flag, value in pair_only.items() if value is not None]
    try:
        # with a single video on either side, evaluate_video_sets's error (FVD needs 2 per side) is the one
        if given and all(video_set(p) is not None for p in (args.generated, args.target)):
            raise EvalInputError(
                f"{', '.join(given)} score one video against its target; FVD (--fvd-weights, folders of "
                "videos) is computed on its own"
            )
        report = evaluate_video_sets(args.generated, args.target, fvd_weights=args.fvd_weights)
    except EvalInputError as e:
        print(f"xdyna_jax.eval: error: {e}", file=sys.stderr)
        return 2
    print(format_set_table(report))
    for name, why in report["skipped"].items():
        print(f"{name} skipped: {why}")
    if args.json:
        print(f"wrote {write_json(args.json, report)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fvd_weights is not None or any(video_set(p) is not None for p in (args.generated, args.target)):
        return _sets_main(args)
    try:
        report = evaluate(
            args.generated,
            args.target,
            keypoints_path=args.keypoints,
            palette_path=args.palette,
            reference_path=args.reference,
            pose_cap_px=args.pose_cap_px,
            color_space=args.color_space,
            min_score=args.min_score,
            lpips_weights=args.lpips_weights,
            lpips_net=args.lpips_net,
        )
    except EvalInputError as e:
        print(f"xdyna_jax.eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    skipped = dict(report["skipped"])
    learned_note = skipped.pop("lpips_fvd", None)  # a sentence naming both metrics, printed last
    for name, why in skipped.items():
        print(f"{name} skipped: {why}")
    if learned_note is not None:
        print(learned_note)
    if args.json:
        print(f"wrote {write_json(args.json, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
