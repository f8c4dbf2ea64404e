"""Driving inputs of an animation, read from disk into the pipeline's condition images.

Pose sources (`read_pose_source`), all giving uint8 (T, H, W, 3) skeletons on black:
- a rendered skeleton video (as X-Dyna's example poses): its frames, resized to H x W if needed (bilinear);
- a folder of OpenPose JSON files (one per frame) or a DWPose-style `.npy` of keypoints: drawn at H x W the
  way the Pose ControlNet saw its training poses (no head skeleton).
Face (`read_face_maps`): the driving video and its 68-point landmarks per frame -> the S-Face local and
global maps at H x W. The driving frames are first cut to the output aspect as the release does (centre
crop, the vertical offset a quarter of the excess so the head stays in), then resized; the landmarks are
mapped the same way, so given landmarks are in the pixels of the original driving video.

Every reader takes the same `stride` (every stride-th frame from the first), so pose and face stay in step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from xdyna_jax.conditioning.face import sface_maps
from xdyna_jax.conditioning.pose import draw_poses, from_arrays, read_openpose_folder
from xdyna_jax.io.video import MediaError, read_video


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, h, w, C) uint8 -> (T, height, width, C), OpenCV bilinear; unchanged when already that size."""
    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in frames])


def read_keypoints_npy(path: str | Path) -> list:
    """A DWPose-style keypoint file -> PoseFrames (pixel coordinates unless all lie in [0, 1]).

    Accepted layouts, T frames: (T, 134, 3) whole-body x, y, score (DWPose's order: body 0-17, face 24-91,
    left hand 92-112, right hand 113-133), or (T, 18, 3) body only.
    """
    path = Path(path)
    try:
        points = np.load(path, allow_pickle=False)
    except Exception as e:
        raise MediaError(f"{path}: cannot read as a .npy keypoint array ({type(e).__name__}: {e})") from e
    if points.ndim != 3 or points.shape[1:] not in ((134, 3), (18, 3)) or len(points) == 0:
        raise MediaError(
            f"{path}: keypoints must be (T, 134, 3) or (T, 18, 3) x, y, score, got {points.shape}"
        )
    xy = points[..., :2][np.isfinite(points[..., :2])]
    normalized = bool(xy.size) and float(xy.min()) >= 0.0 and float(xy.max()) <= 1.0
    if points.shape[1] == 18:
        return from_arrays(points, normalized=normalized)
    hands = np.stack([points[:, 92:113], points[:, 113:134]], axis=1)
    return from_arrays(points[:, :18], hands, points[:, 24:92], normalized=normalized)


def read_pose_source(
    source: str | Path, height: int, width: int, *, stride: int = 1, limit: int | None = None
) -> tuple[np.ndarray, float | None]:
    """A skeleton video, an OpenPose JSON folder or a keypoint .npy -> (uint8 (T, H, W, 3) skeletons, the
    source's fps or None when it records none). Keeps every stride-th frame, at most `limit` of them."""
    source = Path(source)
    if source.is_dir():
        try:
            frames = read_openpose_folder(source)[::stride][:limit]
        except (ValueError, OSError) as e:  # bad JSON names the file
            raise MediaError(str(e)) from e
        return draw_poses(frames, height, width, draw_head=False), None
    if source.suffix.lower() == ".npy":
        if not source.is_file():
            raise MediaError(f"{source}: no such keypoint file")
        frames = read_keypoints_npy(source)[::stride][:limit]
        return draw_poses(frames, height, width, draw_head=False), None
    frames, fps = read_video(source, stride=stride, limit=limit)
    return resize_frames(frames, height, width), fps


def crop_box(frame_hw: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """(x0, y0, crop_w, crop_h) of the release's driving-frame crop to width:height: the centre columns of a
    too-wide frame, or the rows a quarter of the excess from the top of a too-tall one."""
    h, w = frame_hw
    if w / h > width / height:
        crop_w = int(h * width / height)
        return (w - crop_w) // 2, 0, crop_w, h
    crop_h = int(w * height / width)
    return 0, (h - crop_h) // 4, w, crop_h


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
    x0, y0, crop_w, crop_h = crop_box(frames.shape[1:3], height, width)
    cropped = resize_frames(frames[:, y0 : y0 + crop_h, x0 : x0 + crop_w], height, width)
    if callable(landmarks):
        return sface_maps(list(cropped), [landmarks(f) for f in cropped])
    landmarks = np.asarray(landmarks, np.float64)[::stride]
    # the whole video was read unless limited: then both must cover the same frames
    if len(landmarks) < len(frames) or (limit is None and len(landmarks) != len(frames)):
        raise MediaError(
            f"{video}: {len(frames)} driving frames but {len(landmarks)} landmark frames at stride {stride}"
        )
    scale = np.array([width / crop_w, height / crop_h])
    # pixel centres map as cv2.resize maps them: (x + 0.5) * scale - 0.5
    mapped = (landmarks[: len(frames)] - np.array([x0, y0]) + 0.5) * scale - 0.5
    return sface_maps(list(cropped), [m if np.isfinite(m).all() else None for m in mapped])
