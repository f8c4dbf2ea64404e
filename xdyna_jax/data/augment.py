"""Geometric augmentation of a training clip: horizontal flip and random zoom-crop, applied alike to the
frames and to every point on them (pose keypoints, face landmarks), so conditions stay registered.

Points are x, y canvas pixels with pixel centres at integers (as `io.driving.points_to_canvas` maps them):
- flip: x' = W - 1 - x, and every left/right pair swaps its slot (OpenPose-18 joints, the two hands, the
  68 landmarks' mirror order), so "the right wrist" is still the person's right wrist in the mirrored image
  (the Pose ControlNet colours each joint by its slot);
- zoom-crop by s >= 1 at offset (ox, oy) of the zoomed image: the frame is resized to (round(H s),
  round(W s)) with OpenCV bilinear and cut back to H x W; a point moves as cv2.resize moves pixel centres,
  x' = (x + 0.5) * (W' / W) - 0.5 - ox.
NaN (missing) points stay NaN.
"""

from __future__ import annotations

import cv2
import numpy as np

# OpenPose COCO-18 left/right pairs (shoulder, elbow, wrist, hip, knee, ankle, eye, ear).
BODY_MIRROR = np.arange(18)
for _r, _l in ((2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17)):
    BODY_MIRROR[_r], BODY_MIRROR[_l] = _l, _r

# The 68-point (iBUG) landmarks of the mirrored face: jaw reversed, brows swapped and reversed, nose line
# kept, nostrils reversed, eyes swapped (corner for corner), mouth reversed about its centre line.
LANDMARK_MIRROR = np.array(
    [*range(16, -1, -1), *range(26, 21, -1), *range(21, 16, -1), 27, 28, 29, 30, *range(35, 30, -1),
     45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
     *range(54, 47, -1), *range(59, 54, -1), *range(64, 59, -1), 67, 66, 65]
)  # fmt: skip


def flip_points(points: np.ndarray, width: int) -> np.ndarray:
    """(..., 2) x, y (or (..., 3) x, y, score) -> mirrored about the canvas's vertical centre line."""
    out = np.array(points, copy=True)
    out[..., 0] = (width - 1) - out[..., 0]
    return out


def flip_keypoints(body: np.ndarray, hands: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """body (T, 18, 3), hands (T, 2, 21, 3) [left, right] -> the mirrored person's, sides swapped."""
    return flip_points(body, width)[:, BODY_MIRROR], flip_points(hands, width)[:, ::-1]


def flip_landmarks(landmarks: np.ndarray, width: int) -> np.ndarray:
    """(T, 68, 2) -> the mirrored face's landmarks, in the 68-point order."""
    return flip_points(landmarks, width)[:, LANDMARK_MIRROR]


def zoom_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(H', W') of a frame zoomed by `scale` (at least H x W)."""
    return max(height, round(height * scale)), max(width, round(width * scale))


def zoom_crop_frames(frames: np.ndarray, scale: float, offset: tuple[int, int]) -> np.ndarray:
    """(T, H, W, C) -> each frame zoomed by `scale` (bilinear) and cut at offset (oy, ox) back to H x W."""
    t, h, w = frames.shape[:3]
    zh, zw = zoom_size(h, w, scale)
    if (zh, zw) == (h, w):
        return frames
    oy, ox = offset
    return np.stack(
        [cv2.resize(f, (zw, zh), interpolation=cv2.INTER_LINEAR)[oy : oy + h, ox : ox + w] for f in frames]
    )


def zoom_crop_points(
    points: np.ndarray, height: int, width: int, scale: float, offset: tuple[int, int]
) -> np.ndarray:
    """(..., 2 or 3) canvas points -> where `zoom_crop_frames` moves them (a third column passes through)."""
    zh, zw = zoom_size(height, width, scale)
    out = np.array(points, np.float64, copy=True)
    oy, ox = offset
    out[..., 0] = (out[..., 0] + 0.5) * (zw / width) - 0.5 - ox
    out[..., 1] = (out[..., 1] + 0.5) * (zh / height) - 0.5 - oy
    return out
