"""Command line: score a generated video against its target.

    python -m xdyna_jax.eval --generated out.mp4 --target gt.mp4 \
        [--keypoints drive.npy --palette palette.json] [--reference ref.png] [--json scores.json]

Prints a table and, with --json, writes the same numbers as JSON (atomically). Exit status 0 on success,
2 when the inputs cannot be evaluated (the message names the files).
"""

from __future__ import annotations

import argparse
import math
import sys

from xdyna_jax.eval.evaluate import evaluate, write_json
from xdyna_jax.eval.identity_metrics import SPACES
from xdyna_jax.eval.inputs import EvalInputError

LEARNED_METRICS_NOTE = (
    "LPIPS and FVD skipped: they need pretrained networks (AlexNet/VGG, I3D) whose weights neither ship "
    "with xdyna-jax nor download, and this version does not compute them"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xdyna_jax.eval",
        description="Score a generated video against its target, frame by frame (nothing is resized).",
    )
    parser.add_argument(
        "--generated", required=True, help="generated video: an mp4, or a folder of PNG frames"
    )
    parser.add_argument(
        "--target", required=True, help="ground-truth video: an mp4, or a folder of PNG frames"
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
    parser.add_argument("--lpips-weights", help="(not implemented in this version)")
    parser.add_argument("--fvd-weights", help="(not implemented in this version)")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (("--lpips-weights", args.lpips_weights), ("--fvd-weights", args.fvd_weights)):
        if value is not None:
            print(
                f"xdyna_jax.eval: error: {flag} {value}: LPIPS and FVD are not implemented in this version",
                file=sys.stderr,
            )
            return 2
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
        )
    except EvalInputError as e:
        print(f"xdyna_jax.eval: error: {e}", file=sys.stderr)
        return 2
    report["skipped"]["lpips_fvd"] = LEARNED_METRICS_NOTE
    print(format_table(report))
    for name, why in report["skipped"].items():
        if name != "lpips_fvd":
            print(f"{name} skipped: {why}")
    print(LEARNED_METRICS_NOTE)
    if args.json:
        print(f"wrote {write_json(args.json, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
