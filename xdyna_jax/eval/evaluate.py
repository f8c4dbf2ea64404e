"""One evaluation run: read and cross-check the inputs, compute every metric they allow, and gather the
results in a JSON-ready dict (`evaluate`); `write_json` stores it atomically.

Metrics needing the driving keypoints (pose, identity, background motion) are computed for the generated
video and for the target, the ground-truth rendering. The generated video's pose and identity errors are
taken only where the target shows each limb (and the clothing), so parts hidden in every rendering do not
weigh on the score; the target's are taken on their own (every part the keypoints call visible), so they
show how much of the character is findable and what the measurement itself leaves (shading, overlaps,
compression). The background motion is the generated video's against the target's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from xdyna_jax.eval.identity_metrics import identity_error
from xdyna_jax.eval.inputs import (
    EvalInputError,
    check_palette_size,
    check_same_video_shape,
    read_eval_keypoints,
    read_frames,
)
from xdyna_jax.eval.metrics import SSIM_WINDOW, l1_error, psnr_per_frame, ssim_per_frame
from xdyna_jax.eval.motion_metrics import background_motion
from xdyna_jax.eval.palette import PaletteError, read_palette
from xdyna_jax.eval.pose_metrics import palette_coverage, pose_error
from xdyna_jax.io.video import MediaError, read_image

REPORT_FORMAT = "xdyna-eval/1"


def _plain(value):
    """Dataclasses, tuples and numpy scalars -> JSON types; NaN and infinities -> None."""
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate(
    generated_path: str | Path,
    target_path: str | Path,
    *,
    keypoints_path: str | Path | None = None,
    palette_path: str | Path | None = None,
    reference_path: str | Path | None = None,
    pose_cap_px: float | None = None,
    color_space: str = "lab",
    min_score: float = 0.3,
) -> dict:
    """Evaluate a generated video (mp4 or PNG folder) against its target -> a dict:

    image: l1 (0-255 scale), psnr_db (float64 PSNR, frame mean; None = infinite, identical frames), ssim
    (None for frames under 11 x 11), and their per-frame lists; pose / identity: {"generated": ...,
    "target": ...} (with a palette and keypoints); background_motion (with keypoints); reference:
    palette_coverage (with a reference image and a palette); skipped: {metric: why}. NaN and infinities
    are None. Every mismatch between the inputs raises EvalInputError before any metric runs.
    """
    generated = read_frames(generated_path)
    target = read_frames(target_path)
    check_same_video_shape(generated, target, generated_path, target_path)
    palette = poses = reference = None
    if palette_path is not None and keypoints_path is None:
        raise EvalInputError(
            f"palette {palette_path} given without keypoints: the pose and identity errors need the "
            "driving keypoints (--keypoints) to know where each limb should be"
        )
    try:
        palette = read_palette(palette_path) if palette_path is not None else None
    except PaletteError as e:
        raise EvalInputError(str(e)) from e
    if palette is not None:
        check_palette_size(palette, generated, palette_path, generated_path)
    if keypoints_path is not None:
        poses = read_eval_keypoints(keypoints_path, generated, generated_path)
    if reference_path is not None:
        try:
            reference = read_image(reference_path)
        except MediaError as e:
            raise EvalInputError(str(e)) from e

    height, width = generated.shape[1:3]
    psnrs = psnr_per_frame(generated, target)
    ssim_fits = min(height, width) >= SSIM_WINDOW
    ssims = ssim_per_frame(generated, target) if ssim_fits else None
    report: dict = {
        "format": REPORT_FORMAT,
        "inputs": {
            "generated": str(generated_path),
            "target": str(target_path),
            "keypoints": None if keypoints_path is None else str(keypoints_path),
            "palette": None if palette_path is None else str(palette_path),
            "reference": None if reference_path is None else str(reference_path),
        },
        "frames": len(generated),
        "height": height,
        "width": width,
        "image": {
            "l1": l1_error(generated, target),
            "psnr_db": float(np.mean(psnrs)),
            "ssim": None if ssims is None else float(np.mean(ssims)),
            "psnr_db_per_frame": psnrs,
            "ssim_per_frame": ssims,
        },
        "pose": None,
        "identity": None,
        "background_motion": None,
        "reference": None,
        "skipped": {},
    }
    skipped = report["skipped"]
    if not ssim_fits:
        skipped["ssim"] = f"needs frames of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels"
    if palette is not None:
        # the generated video is scored where the ground truth shows each part; the target on its own, so
        # its numbers show how much of the character the keypoints see and what the measurement leaves
        report["pose"] = {
            "generated": pose_error(
                generated, poses, palette, cap_px=pose_cap_px, min_score=min_score, seen_in=target
            ),
            "target": pose_error(target, poses, palette, cap_px=pose_cap_px, min_score=min_score),
        }
        report["identity"] = {
            "generated": identity_error(
                generated, poses, palette, space=color_space, min_score=min_score, seen_in=target
            ),
            "target": identity_error(target, poses, palette, space=color_space, min_score=min_score),
        }
    else:
        skipped["pose"] = skipped["identity"] = (
            "needs --keypoints and --palette (the identity's limb colours)"
        )
    if poses is None:
        skipped["background_motion"] = "needs --keypoints (to mask out the character)"
    elif len(generated) < 2:
        skipped["background_motion"] = "needs at least 2 frames"
    else:
        report["background_motion"] = background_motion(
            generated, target, poses, limb_width=None if palette is None else palette.limb_width
        )
    if reference is not None and palette is not None:
        report["reference"] = {"palette_coverage": palette_coverage(reference, palette)}
    elif reference is not None:
        skipped["reference"] = "a reference image is checked against the palette; needs --palette"
    return _plain(report)


def write_json(path: str | Path, report: dict) -> Path:
    """Write `report` as JSON (strict: no NaN) to a temporary sibling and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2, allow_nan=False)
            f.write("\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's file is private; the report gets the usual mode
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path
