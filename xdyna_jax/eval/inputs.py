"""Reading what the evaluation compares: two videos (mp4 files or folders of PNG frames), the driving
keypoints and the identity's palette, checked against each other before any metric runs.

Nothing is resized or trimmed: a generated video that differs from its target in frame count or frame size,
keypoints that do not cover every frame, or a palette drawn at another size stop the evaluation with one
error naming the files involved.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from xdyna_jax.conditioning.pose import PoseFrame
from xdyna_jax.eval.palette import Palette
from xdyna_jax.io.driving import read_keypoints_npy
from xdyna_jax.io.video import MediaError, read_image, read_video


class EvalInputError(ValueError):
    """Inputs that cannot be evaluated together (missing, unreadable, or of mismatched sizes)."""


def natural_key(path: Path):
    """frame2.png before frame10.png: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def read_frames(path: str | Path) -> np.ndarray:
    """A video file, or a folder of PNG frames (in natural name order), -> uint8 (T, H, W, 3) RGB."""
    path = Path(path)
    try:
        if path.is_dir():
            files = sorted((p for p in path.iterdir() if p.suffix.lower() == ".png"), key=natural_key)
            if not files:
                raise EvalInputError(f"{path}: a folder of frames must hold .png files; found none")
            frames = [read_image(p) for p in files]
            sizes = {f.shape for f in frames}
            if len(sizes) > 1:
                raise EvalInputError(f"{path}: frames of different sizes {sorted(sizes)}")
            return np.stack(frames)
        return read_video(path)[0]
    except MediaError as e:
        raise EvalInputError(str(e)) from e


def _describe(frames: np.ndarray) -> str:
    return f"{len(frames)} frames of {frames.shape[2]}x{frames.shape[1]}"


def check_same_video_shape(generated: np.ndarray, target: np.ndarray, generated_path, target_path) -> None:
    """One error naming both files when the two videos differ in frame count or size."""
    if generated.shape != target.shape:
        raise EvalInputError(
            f"generated {generated_path} has {_describe(generated)} but target {target_path} has "
            f"{_describe(target)}; they are compared frame by frame at one size and nothing is resized"
        )


def check_palette_size(palette: Palette, frames: np.ndarray, palette_path, video_path) -> None:
    """The palette records the size its clip was drawn at; the frames must have it."""
    if (palette.height, palette.width) != frames.shape[1:3]:
        raise EvalInputError(
            f"palette {palette_path} is for {palette.width}x{palette.height} frames but {video_path} has "
            f"{_describe(frames)}; nothing is resized"
        )


def read_eval_keypoints(path: str | Path, frames: np.ndarray, video_path) -> list[PoseFrame]:
    """A DWPose-style keypoint .npy ((T, 134, 3) or (T, 18, 3) x, y, score) -> one PoseFrame per video
    frame in pixels of the frames (fractions are scaled by the frame size). T must equal the frame count."""
    try:
        poses = read_keypoints_npy(path)
    except MediaError as e:
        raise EvalInputError(str(e)) from e
    if len(poses) != len(frames):
        raise EvalInputError(
            f"keypoints {path} have {len(poses)} frames but {video_path} has {_describe(frames)}"
        )
    height, width = frames.shape[1:3]
    return [p.to_pixels(height, width) for p in poses]
