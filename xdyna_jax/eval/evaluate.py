"""One evaluation run: read and cross-check the inputs, compute every metric they allow, and gather the
results in a JSON-ready dict (`evaluate`); `write_json` stores it atomically.

Metrics needing the driving keypoints (pose, identity, background motion) are computed for the generated
video and for the target, the ground-truth rendering. The generated video's pose and identity errors are
taken only where the target shows each limb (and the clothing), so parts hidden in every rendering do not
weigh on the score; the target's are taken on their own (every part the keypoints call visible), so they
show how much of the character is findable and what the measurement itself leaves (shading, overlaps,
compression). The background motion is the generated video's against the target's.

LPIPS joins the image metrics when the user passes a local backbone file (`lpips_weights`). FVD compares
two sets of videos, not one pair: `evaluate_video_sets` scores folders of videos with a local I3D detector.
Both come from `learned_metrics`, which imports torch and lpips only when asked.
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
    natural_key,
    read_eval_keypoints,
    read_frames,
)
from xdyna_jax.eval.learned_metrics import (
    FVD_MIN_FRAMES,
    FVD_PAIR_NOTE,
    LEARNED_METRICS_NOTE,
    LPIPS_MIN_SIDE,
    fvd_from_features,
    i3d_features,
    load_i3d,
    load_lpips,
    lpips_distances,
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
    lpips_weights: str | Path | None = None,
    lpips_net: str = "alex",
) -> dict:
    """Evaluate a generated video (mp4 or PNG folder) against its target -> a dict:

    image: l1 (0-255 scale), psnr_db (float64 PSNR, frame mean; None = infinite, identical frames), ssim
    (None for frames under 11 x 11), lpips (frame mean, with `lpips_weights`: a torchvision AlexNet or VGG16
    state dict for `lpips_net` "alex" or "vgg"; else None), and their per-frame lists; pose / identity:
    {"generated": ..., "target": ...} (with a palette and keypoints); background_motion (with keypoints);
    reference: palette_coverage (with a reference image and a palette); skipped: {metric: why}. NaN and
    infinities are None. Every mismatch between the inputs, and an unusable LPIPS weights file, raises
    EvalInputError before any metric runs.
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
    lpips_model = None
    if lpips_weights is not None:
        if lpips_net in LPIPS_MIN_SIDE and min(height, width) < LPIPS_MIN_SIDE[lpips_net]:
            side = LPIPS_MIN_SIDE[lpips_net]
            raise EvalInputError(
                f"LPIPS ({lpips_net}) needs frames of at least {side} x {side} pixels; {generated_path} has "
                f"{width}x{height}"
            )
        lpips_model = load_lpips(lpips_weights, lpips_net)

    psnrs = psnr_per_frame(generated, target)
    ssim_fits = min(height, width) >= SSIM_WINDOW
    ssims = ssim_per_frame(generated, target) if ssim_fits else None
    lpips_values = None if lpips_model is None else lpips_distances(lpips_model, generated, target)
    report: dict = {
        "format": REPORT_FORMAT,
        "inputs": {
            "generated": str(generated_path),
            "target": str(target_path),
            "keypoints": None if keypoints_path is None else str(keypoints_path),
            "palette": None if palette_path is None else str(palette_path),
            "reference": None if reference_path is None else str(reference_path),
            "lpips_weights": None if lpips_weights is None else str(lpips_weights),
            "lpips_net": None if lpips_weights is None else lpips_net,
        },
        "frames": len(generated),
        "height": height,
        "width": width,
        "image": {
            "l1": l1_error(generated, target),
            "psnr_db": float(np.mean(psnrs)),
            "ssim": None if ssims is None else float(np.mean(ssims)),
            "lpips": None if lpips_values is None else float(np.mean(lpips_values)),
            "psnr_db_per_frame": psnrs,
            "ssim_per_frame": ssims,
            "lpips_per_frame": lpips_values,
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
    if lpips_weights is None:
        skipped["lpips_fvd"] = LEARNED_METRICS_NOTE
    else:
        skipped["fvd"] = FVD_PAIR_NOTE
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


def video_set(path: str | Path) -> list[Path] | None:
    """The videos a folder holds as a set for FVD: its .mp4 files and its sub-folders of PNG frames, in
    natural name order. None when `path` is not such a folder (a video file or a folder of PNG frames is one
    video; a missing path is none)."""
    path = Path(path)
    if not path.is_dir():
        return None
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]  # e.g. an interrupted write's file
    if any(p.is_file() and p.suffix.lower() == ".png" for p in entries):
        return None
    videos = [
        p
        for p in entries
        if (p.is_file() and p.suffix.lower() == ".mp4")
        or (p.is_dir() and any(q.suffix.lower() == ".png" for q in p.iterdir()))
    ]
    return sorted(videos, key=natural_key) or None


def evaluate_video_sets(
    generated_path: str | Path, target_path: str | Path, *, fvd_weights: str | Path | None
) -> dict:
    """FVD between a folder of generated videos and a folder of target videos (`video_set`) -> a dict:

    fvd (the Fréchet distance of the two sets' I3D features), fvd_features (their size, 400 for I3D),
    frames (every video's frame count), videos: {"generated": [names], "target": [names]}. `fvd_weights` is
    the I3D TorchScript detector (i3d_torchscript.pt). Each side needs at least 2 videos, all of one length
    of at least FVD_MIN_FRAMES frames; the frame sizes may differ (the detector resizes to its input). The
    two sets need not be paired or of one size. FVD from few videos is a noisy, biased estimate: papers use
    hundreds or thousands.
    """
    sets = {}
    for side, path in (("generated", generated_path), ("target", target_path)):
        if not Path(path).exists():
            raise EvalInputError(f"{side} {path}: no such file or folder")
        videos = video_set(path)
        if videos is None or len(videos) < 2:
            what = "a single video" if videos is None else "a folder of 1 video"
            raise EvalInputError(
                f"FVD compares two sets of videos and needs at least 2 videos per side: {side} {path} is "
                f"{what}; pass folders of mp4 files (or of PNG-frame folders)"
            )
        sets[side] = videos
    if fvd_weights is None:
        raise EvalInputError(
            f"{generated_path} and {target_path} are folders of videos, which are scored by FVD only: pass "
            "--fvd-weights (the I3D detector, i3d_torchscript.pt)"
        )
    detector = load_i3d(fvd_weights)
    first = None
    features = {}
    for side, videos in sets.items():
        rows = []
        for video in videos:
            frames = read_frames(video)  # one at a time: a set of long videos need not fit in memory
            if len(frames) < FVD_MIN_FRAMES:
                raise EvalInputError(
                    f"{video} has {len(frames)} frames; FVD needs at least {FVD_MIN_FRAMES} (I3D's temporal "
                    "receptive field)"
                )
            if first is None:
                first = (video, len(frames))
            elif len(frames) != first[1]:
                raise EvalInputError(
                    f"{video} has {len(frames)} frames but {first[0]} has {first[1]}; FVD compares clips of "
                    "one length and nothing is trimmed"
                )
            rows.append(i3d_features(detector, frames[None], where=fvd_weights)[0])
        features[side] = np.stack(rows)
    report = {
        "format": REPORT_FORMAT,
        "inputs": {
            "generated": str(generated_path),
            "target": str(target_path),
            "fvd_weights": str(fvd_weights),
        },
        "videos": {side: [p.name for p in videos] for side, videos in sets.items()},
        "frames": first[1],
        "fvd": fvd_from_features(features["generated"], features["target"]),
        "fvd_features": features["generated"].shape[1],
        "skipped": {
            "per_video": "L1, PSNR, SSIM, LPIPS, pose, identity and background motion compare one video "
            "with its target: pass single videos (an mp4 or a folder of PNG frames each)"
        },
    }
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
