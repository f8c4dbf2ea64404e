"""Driving inputs of an animation, read from disk into the pipeline's condition images.

Pose sources (`read_pose_source`), all giving uint8 (T, H, W, 3) skeletons on black:
- a rendered skeleton video (as X-Dyna's example poses): its frames, resized to H x W if needed (bilinear);
- a folder of OpenPose JSON files (one per frame) or a DWPose-style `.npy` of keypoints: drawn at H x W the
  way the Pose ControlNet saw its training poses (no head skeleton);
- a raw driving video with a pose extractor (`conditioning.extractors.DWPoseOnnx`): the keypoints found in
  each frame, drawn alike.
Keypoint sources can be aligned to the reference person (`align_to`, `conditioning.pose.align_poses`).
Face (`read_face_maps`): the driving video and its 68-point landmarks per frame -> the S-Face local and
global maps at H x W.

Coordinates. Every keypoint ends up in pixels of the H x W output canvas before it is aligned or drawn:
- Keypoint files of the driving pose are taken as framed for the output, like a skeleton video (which is
  stretched to H x W): their pixels are the canvas's, and coordinates given as fractions are fractions of
  the canvas.
- Points found in raw footage (the driving video's landmarks and DWPose keypoints, the reference photo's
  keypoints) are in that image's pixels, or fractions of its width and height. They follow the image's
  preprocessing: the driving frames are cut to the output aspect as the release does (centre columns, or
  rows a quarter of the excess from the top so the head stays in, `crop_box`), the reference photo as the
  pipeline does (centred, `reference_crop_box`), then resized to H x W. A point moves as `cv2.resize`
  moves pixel centres: x' = (x - x0 + 0.5) * W / crop_w - 0.5 (`points_to_canvas`), so pose, face and
  reference stay registered.
- A file's coordinates are fractions when every point not marked missing (negative, as DWPose writes -1)
  lies in [0, 1]; otherwise they are pixels. OpenPose JSON and `.npy` files follow the same rule.

Every reader takes the same `stride` (every stride-th frame from the first), so pose and face stay in step.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from xdyna_jax.conditioning.extractors import PoseExtractor
from xdyna_jax.conditioning.face import sface_maps
from xdyna_jax.conditioning.pose import (
    PoseFrame,
    align_poses,
    draw_poses,
    from_arrays,
    read_openpose_folder,
    read_openpose_json,
)
from xdyna_jax.io.video import MediaError, read_video


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, h, w, C) uint8 -> (T, height, width, C), OpenCV bilinear; unchanged when already that size."""
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in frames])


# ------------------------------------------------------------------------------------------------------
# Image coordinates -> output canvas
# ------------------------------------------------------------------------------------------------------


def _aspect_crop(frame_hw, height: int, width: int, rows_share: int) -> tuple[int, int, int, int]:
    """(x0, y0, crop_w, crop_h): the largest width:height box, the size truncated to int; centred
    horizontally, vertically 1/rows_share of the excess rows above it."""
    h, w = frame_hw
    if w / h > width / height:
        crop_w = int(h * width / height)
        return (w - crop_w) // 2, 0, crop_w, h
    crop_h = int(w * height / width)
    return 0, (h - crop_h) // rows_share, w, crop_h


def crop_box(frame_hw: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """(x0, y0, crop_w, crop_h) of the release's driving-frame crop to width:height: the centre columns of a
    too-wide frame, or the rows a quarter of the excess from the top of a too-tall one."""
    return _aspect_crop(frame_hw, height, width, 4)


def reference_crop_box(image_hw: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """(x0, y0, crop_w, crop_h) of the reference photo's crop (`sampling.xdyna.crop_and_resize`: centred
    both ways, the release's int arithmetic)."""
    return _aspect_crop(image_hw, height, width, 2)


def points_to_canvas(
    points: np.ndarray, box: tuple[int, int, int, int], height: int, width: int
) -> np.ndarray:
    """(..., 2) x, y pixels of an image -> pixels of the H x W canvas that crops `box` out of it and resizes
    the crop; pixel centres map as cv2.resize maps them. NaN stays NaN."""
    x0, y0, crop_w, crop_h = box
    scale = np.array([width / crop_w, height / crop_h])
    return (np.asarray(points, np.float64) - np.array([x0, y0]) + 0.5) * scale - 0.5


def pose_to_canvas(
    frame: PoseFrame, image_hw: tuple[int, int], box: tuple[int, int, int, int], height: int, width: int
) -> PoseFrame:
    """A pose found in an image of size `image_hw` (pixels, or fractions of it) -> canvas pixels."""
    pixels = frame.to_pixels(*image_hw)
    return pixels.map_points(lambda p: points_to_canvas(p, box, height, width), normalized=False)


# ------------------------------------------------------------------------------------------------------
# Keypoint files
# ------------------------------------------------------------------------------------------------------


def _are_fractions(xy: np.ndarray) -> bool:
    """The file-wide rule: fractions when every point not marked missing (NaN, or negative as DWPose's -1)
    lies in [0, 1] (and there is at least one); pixels otherwise."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    present = xy[np.isfinite(xy).all(-1) & (xy >= 0).all(-1)]
    return bool(len(present)) and float(present.max()) <= 1.0


def _with_fraction_rule(frames: list[PoseFrame]) -> list[PoseFrame]:
    """Frames read as pixels -> marked normalised when the whole sequence passes `_are_fractions`."""
    xy = np.concatenate([np.concatenate([f.body, f.hands.reshape(-1, 2), f.face]) for f in frames])
    if not _are_fractions(xy):
        return frames
    return [dataclasses.replace(f, normalized=True) for f in frames]


def _frames_from_keypoints(points: np.ndarray, where: Path) -> list[PoseFrame]:
    """(T, 134, 3) or (T, 18, 3) x, y, score -> PoseFrames (coordinates by `_are_fractions`)."""
    if points.ndim != 3 or points.shape[1:] not in ((134, 3), (18, 3)) or len(points) == 0:
        raise MediaError(
            f"{where}: keypoints must be (T, 134, 3) or (T, 18, 3) x, y, score, got {points.shape}"
        )
    normalized = _are_fractions(points[..., :2])
    if points.shape[1] == 18:
        return from_arrays(points, normalized=normalized)
    hands = np.stack([points[:, 92:113], points[:, 113:134]], axis=1)
    return from_arrays(points[:, :18], hands, points[:, 24:92], normalized=normalized)


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise MediaError(f"{path}: no such keypoint file")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise MediaError(f"{path}: cannot read as a .npy keypoint array ({type(e).__name__}: {e})") from e


def read_keypoints_npy(path: str | Path) -> list[PoseFrame]:
    """A DWPose-style keypoint file -> PoseFrames (pixels, or fractions by the module's rule).

    Accepted layouts, T frames: (T, 134, 3) whole-body x, y, score (DWPose's order: body 0-17, face 24-91,
    left hand 92-112, right hand 113-133), or (T, 18, 3) body only.
    """
    path = Path(path)
    return _frames_from_keypoints(_load_npy(path), path)


def read_keypoints_json_folder(directory: str | Path) -> list[PoseFrame]:
    """An OpenPose `--write_json` folder -> PoseFrames in frame-number order (pixels, or fractions by the
    module's rule)."""
    try:
        return _with_fraction_rule(read_openpose_folder(directory))
    except (ValueError, OSError) as e:  # bad JSON names the file
        raise MediaError(str(e)) from e


def read_reference_pose(path: str | Path) -> PoseFrame:
    """The reference person's keypoints, in the reference photo's pixels (or fractions of it): an OpenPose
    JSON file (its first person), or a .npy of one frame: (134, 3) / (18, 3), or (1, 134, 3) / (1, 18, 3)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        if not path.is_file():
            raise MediaError(f"{path}: no such keypoint file")
        try:
            return _with_fraction_rule([read_openpose_json(path)])[0]
        except (ValueError, OSError) as e:
            raise MediaError(str(e)) from e
    if suffix != ".npy":
        raise MediaError(f"{path}: reference keypoints must be an OpenPose .json or a keypoint .npy file")
    points = _load_npy(path)
    if points.shape in ((134, 3), (18, 3)):
        points = points[None]
    if points.shape not in ((1, 134, 3), (1, 18, 3)):
        raise MediaError(
            f"{path}: reference keypoints must be one frame, (134, 3) or (18, 3) x, y, score "
            f"(or (1, 134, 3) / (1, 18, 3)), got {points.shape}"
        )
    return _frames_from_keypoints(points, path)[0]


def reference_keypoints(
    image: np.ndarray,
    height: int,
    width: int,
    *,
    pose_file: str | Path | None = None,
    extractor: PoseExtractor | None = None,
) -> PoseFrame:
    """The reference person's keypoints in canvas pixels, read from `pose_file` (in the photo's pixels) or
    found in the photo by `extractor`, then moved by the pipeline's reference crop and resize."""
    if (pose_file is None) == (extractor is None):
        raise ValueError("reference_keypoints: give exactly one of pose_file and extractor")
    pose = read_reference_pose(pose_file) if pose_file is not None else extractor(image)
    image_hw = image.shape[:2]
    return pose_to_canvas(pose, image_hw, reference_crop_box(image_hw, height, width), height, width)


# ------------------------------------------------------------------------------------------------------
# Driving pose
# ------------------------------------------------------------------------------------------------------


def holds_keypoints(source: str | Path) -> bool:
    """Whether a pose source is keypoints (an OpenPose JSON folder or a .npy) rather than a video."""
    source = Path(source)
    return source.is_dir() or source.suffix.lower() == ".npy"


def detect_poses(
    frames: Sequence[np.ndarray], extractor: PoseExtractor, height: int, width: int, *, progress: bool = False
) -> list[PoseFrame]:
    """Raw driving frames (same size) -> each frame's pose found by `extractor`, in canvas pixels (the
    frames' driving crop and resize applied to the points, as for face landmarks)."""
    from tqdm import tqdm

    image_hw = frames[0].shape[:2]
    box = crop_box(image_hw, height, width)
    bar = tqdm(frames, desc="pose keypoints", unit="frame", file=sys.stderr, disable=not progress)
    return [pose_to_canvas(extractor(f), image_hw, box, height, width) for f in bar]


def read_driving_keypoints(
    source: str | Path,
    height: int,
    width: int,
    *,
    stride: int = 1,
    limit: int | None = None,
    extractor: PoseExtractor | None = None,
    progress: bool = False,
) -> tuple[list[PoseFrame], float | None]:
    """A keypoint source (JSON folder, .npy), or a raw video with `extractor` -> (PoseFrames in canvas
    pixels, the source's fps or None). Every stride-th frame, at most `limit` of them."""
    source = Path(source)
    if source.is_dir():
        frames = read_keypoints_json_folder(source)[::stride][:limit]
    elif source.suffix.lower() == ".npy":
        frames = read_keypoints_npy(source)[::stride][:limit]
    elif extractor is None:
        raise MediaError(f"{source}: a video holds no keypoints; finding them needs a pose extractor")
    else:
        video, fps = read_video(source, stride=stride, limit=limit)
        return detect_poses(video, extractor, height, width, progress=progress), fps
    return [f.to_pixels(height, width) for f in frames], None


def read_pose_source(
    source: str | Path,
    height: int,
    width: int,
    *,
    stride: int = 1,
    limit: int | None = None,
    extractor: PoseExtractor | None = None,
    align_to: PoseFrame | None = None,
    align_method: str = "limbs",
    progress: bool = False,
) -> tuple[np.ndarray, float | None]:
    """A pose source -> (uint8 (T, H, W, 3) skeletons, the source's fps or None when it records none).
    Keeps every stride-th frame, at most `limit` of them.

    source: a skeleton video, an OpenPose JSON folder, a keypoint .npy, or (with `extractor`) a raw driving
    video. align_to: the reference person in canvas pixels (`reference_keypoints`); the driving keypoints
    are aligned to it with `align_poses(method=align_method)` before drawing (keypoint sources only).
    """
    if not holds_keypoints(source) and extractor is None:
        if align_to is not None:
            raise MediaError(f"{source}: a rendered skeleton video holds no keypoints to align")
        frames, fps = read_video(source, stride=stride, limit=limit)
        return resize_frames(frames, height, width), fps
    frames, fps = read_driving_keypoints(
        source, height, width, stride=stride, limit=limit, extractor=extractor, progress=progress
    )
    if align_to is not None:
        try:
            frames = align_poses(frames, align_to, method=align_method)
        except ValueError as e:  # nothing visible in both, or an unknown method
            raise MediaError(f"{source}: {e}") from e
    return draw_poses(frames, height, width, draw_head=False), fps


def read_landmarks(path: str | Path) -> np.ndarray:
    """(T, 68, 2) float x, y pixel landmarks per driving frame; a frame whose points are NaN had no face."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such landmark file")
    try:
        landmarks = np.load(path, allow_pickle=False)
    except Exception as e:
        raise MediaError(f"{path}: cannot read as a .npy landmark array ({type(e).__name__}: {e})") from e
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 2) or len(landmarks) == 0:
        raise MediaError(f"{path}: landmarks must be (T, 68, 2) x, y per frame, got {landmarks.shape}")
    return landmarks.astype(np.float64)


def read_face_maps(
    video: str | Path,
    landmarks: np.ndarray | Callable[[np.ndarray], np.ndarray | None],
    height: int,
    width: int,
    *,
    stride: int = 1,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The driving video and its face landmarks -> S-Face (local, global) uint8 (T', H, W, 3) maps of every
    stride-th frame (at most `limit`).

    landmarks: (T, 68, 2) x, y in the video's pixels, one per video frame (NaN: no face), or an extractor
    (`conditioning.extractors.FaceLandmarkExtractor`) run on each cropped and resized frame, as the release.
    """
    frames, _ = read_video(video, stride=stride, limit=limit)
    box = x0, y0, crop_w, crop_h = crop_box(frames.shape[1:3], height, width)
    cropped = resize_frames(frames[:, y0 : y0 + crop_h, x0 : x0 + crop_w], height, width)
    if callable(landmarks):
        return sface_maps(list(cropped), [landmarks(f) for f in cropped])
    landmarks = np.asarray(landmarks, np.float64)[::stride]
    # the whole video was read unless limited: then both must cover the same frames
    if len(landmarks) < len(frames) or (limit is None and len(landmarks) != len(frames)):
        raise MediaError(
            f"{video}: {len(frames)} driving frames but {len(landmarks)} landmark frames at stride {stride}"
        )
    mapped = points_to_canvas(landmarks[: len(frames)], box, height, width)
    return sface_maps(list(cropped), [m if np.isfinite(m).all() else None for m in mapped])
