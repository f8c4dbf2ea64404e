"""Where the character is in a frame, from its driving keypoints (limb capsules, the torso, a mask of the
whole character) or from its colours (`color_match`), as boolean (H, W) images. Pixel (row i, column j) has its centre at x = j, y = i, the
keypoints' pixel convention.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from xdyna_jax.conditioning.pose import HAND_EDGES, LIMBS, NOSE, PoseFrame

# The torso quadrilateral's corners, in order round it: right shoulder, left shoulder, left hip, right hip.
TORSO_CORNERS = (2, 5, 11, 8)
HEAD_POINTS = (14, 15, 16, 17)  # eyes and ears: the head disc around the nose reaches the farthest
_SUBPIXEL_BITS = 4  # OpenCV polygon filling takes fixed-point coordinates with this many fraction bits


def color_match(frame: np.ndarray, color, tolerance: int) -> np.ndarray:
    """(H, W) bool: pixels of a uint8 (H, W, 3) frame whose every channel is within `tolerance` of `color`."""
    difference = np.abs(np.asarray(frame, np.int16) - np.asarray(color, np.int16))
    return np.all(difference <= tolerance, axis=-1)


def capsule_mask(height: int, width: int, p0, p1, radius: float) -> np.ndarray:
    """(H, W) bool: the pixels whose centres lie within `radius` of the segment p0-p1 (x, y pixels); a
    rectangle with half-disc ends, a disc when p0 == p1."""
    mask = np.zeros((height, width), bool)
    p0 = np.asarray(p0, np.float64)
    p1 = np.asarray(p1, np.float64)
    lo = np.floor(np.minimum(p0, p1) - radius).astype(int)
    hi = np.ceil(np.maximum(p0, p1) + radius).astype(int)
    x0, y0 = max(lo[0], 0), max(lo[1], 0)
    x1, y1 = min(hi[0], width - 1), min(hi[1], height - 1)
    if x0 > x1 or y0 > y1:  # wholly outside the frame
        return mask
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
    points = np.stack([xs, ys], -1).astype(np.float64)
    direction = p1 - p0
    length2 = float(direction @ direction)
    # the nearest point of the segment: the projection clamped to its ends
    t = np.zeros(points.shape[:2]) if length2 == 0 else np.clip((points - p0) @ direction / length2, 0, 1)
    nearest = p0 + t[..., None] * direction
    mask[y0 : y1 + 1, x0 : x1 + 1] = np.sum((points - nearest) ** 2, -1) <= radius**2
    return mask


def visible_limbs(pose: PoseFrame, min_score: float = 0.3) -> list[int]:
    """Indices into `LIMBS` whose two joints are both visible (finite, score > min_score)."""
    visible = pose.body_visible(min_score)
    return [i for i, (a, b) in enumerate(LIMBS) if visible[a] and visible[b]]


def limb_capsules(
    pose: PoseFrame, height: int, width: int, widths, limbs, min_score: float = 0.3
) -> dict[int, np.ndarray]:
    """{limb index: its capsule mask} for the given limbs that are visible in `pose`; widths: one capsule
    diameter (pixels) for all, or a sequence indexed by limb."""
    shown = set(visible_limbs(pose, min_score))
    diameter = (lambda i: widths[i]) if np.ndim(widths) else (lambda i: widths)
    return {
        i: capsule_mask(height, width, pose.body[LIMBS[i][0]], pose.body[LIMBS[i][1]], diameter(i) / 2)
        for i in limbs
        if i in shown
    }


def _fill_polygon(height: int, width: int, points: np.ndarray) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    fixed = np.round(np.asarray(points, np.float64) * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(mask, [fixed.reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return mask.astype(bool)


def torso_mask(pose: PoseFrame, height: int, width: int, min_score: float = 0.3) -> np.ndarray | None:
    """(H, W) bool: the quadrilateral of the shoulders and hips, or None unless all four are visible."""
    visible = pose.body_visible(min_score)
    if not all(visible[j] for j in TORSO_CORNERS):
        return None
    return _fill_polygon(height, width, pose.body[list(TORSO_CORNERS)])


def character_mask(
    pose: PoseFrame, height: int, width: int, *, limb_width: float, margin: int, min_score: float = 0.3
) -> np.ndarray:
    """(H, W) bool: everywhere the character may cover, from its keypoints, grown by `margin` pixels.

    The union of: every visible body limb's capsule (limb_width wide); a disc at every visible joint (same
    width); a disc round the nose reaching the farthest visible eye or ear (the head); the hands' edges as
    capsules half a limb wide; the convex hull of the visible face landmarks. Then dilated by a disc of
    radius `margin`, so blur and shading round the drawn character stay inside.
    """
    mask = np.zeros((height, width), bool)
    radius = limb_width / 2
    for capsule in limb_capsules(pose, height, width, limb_width, range(len(LIMBS)), min_score).values():
        mask |= capsule
    visible = pose.body_visible(min_score)
    for joint in np.flatnonzero(visible):
        mask |= capsule_mask(height, width, pose.body[joint], pose.body[joint], radius)
    if visible[NOSE]:
        reach = [np.linalg.norm(pose.body[j] - pose.body[NOSE]) for j in HEAD_POINTS if visible[j]]
        head = max([radius, *reach])
        mask |= capsule_mask(height, width, pose.body[NOSE], pose.body[NOSE], head)
    for hand, shown in zip(pose.hands, pose.hands_visible(min_score), strict=True):
        for a, b in HAND_EDGES:
            if shown[a] and shown[b]:
                mask |= capsule_mask(height, width, hand[a], hand[b], max(radius / 2, 1.0))
    face = pose.face[pose.face_visible(min_score)]
    if len(face) >= 3:
        hull = cv2.convexHull(face.astype(np.float32)).reshape(-1, 2)
        mask |= _fill_polygon(height, width, hull)
    if margin > 0:
        size = 2 * int(math.ceil(margin)) + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        mask = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
    return mask
