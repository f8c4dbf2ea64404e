"""Pose error: how far each limb of the generated character is from where the driving keypoints put it.

A synthetic identity draws every limb in its own palette colour, so a limb can be found in a generated frame
without a pose detector: the pixels within the palette's tolerance of the limb's colour (every channel at
most `tolerance` away), with specks smaller than `min_pixels` (8-connected components) dropped as stray
matches. From those pixels:

- the centroid, compared with the midpoint of the driving segment (`centroid` error);
- the principal segment: the pixels' main axis through the centroid, from the farthest pixel on one side to
  the farthest on the other, each end pulled in by the capsule's radius ((width - 1) / 2 between pixel centres,
  the palette's width for that limb), compared with the two driving joints: the mean of the two end-to-joint distances, ends paired
  with joints whichever way is nearer, since a colour does not tell the two ends apart (`segment` error).
  Unlike the centroid this also sees a limb turned or stretched about its middle.

Scored are the (frame, limb) pairs whose two joints are visible in the driving keypoints, whose midpoint
lies in the frame and whose palette colour is given; with `seen_in` (the ground-truth frames), only those
where the limb is also found in the ground truth, since a limb hidden behind other parts (or a head limb
under the eyes) cannot be found in any rendering and would only add the same misses to every score. A
limb not found in the frames is a miss. Reported: the
detection rate, the mean distances over the limbs found, and capped means over every scored pair, in which a
distance counts at most `cap_px` and a miss counts `cap_px` (so one number ranks both a model that loses
limbs and one that misplaces them). The default cap is a tenth of the frame diagonal.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import cv2
import numpy as np

from xdyna_jax.conditioning.pose import LIMBS, PoseFrame
from xdyna_jax.eval.palette import Palette
from xdyna_jax.eval.regions import color_match, visible_limbs

CAP_DIAGONAL_SHARE = 0.1


def default_cap_px(height: int, width: int) -> float:
    """A tenth of the frame diagonal: a limb farther than this is as wrong as a lost one."""
    return CAP_DIAGONAL_SHARE * math.hypot(height, width)


def default_min_pixels(limb_width: float) -> int:
    """A quarter of a limb-width square (at least 4 pixels): smaller colour matches are taken as stray
    pixels; a limb mostly hidden behind another part still counts while this much of it shows."""
    return max(4, math.ceil(limb_width**2 / 4))


@dataclasses.dataclass(frozen=True)
class LimbLocation:
    """A limb found by colour: centroid (x, y), principal segment ends (2, 2) x, y, pixel count."""

    centroid: np.ndarray
    ends: np.ndarray
    pixels: int


def locate_limb(
    frame: np.ndarray, color, tolerance: int, limb_width: float, min_pixels: int | None = None
) -> LimbLocation | None:
    """Find one limb in a uint8 (H, W, 3) frame by its colour; None when fewer than `min_pixels` remain
    after dropping matching components smaller than that."""
    min_pixels = default_min_pixels(limb_width) if min_pixels is None else min_pixels
    mask = color_match(frame, color, tolerance).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    kept = [label for label in range(1, count) if stats[label, cv2.CC_STAT_AREA] >= min_pixels]
    if not kept:
        return None
    ys, xs = np.nonzero(np.isin(labels, kept))
    points = np.stack([xs, ys], -1).astype(np.float64)
    centroid = points.mean(0)
    centred = points - centroid
    _, vectors = np.linalg.eigh(centred.T @ centred)
    axis = vectors[:, -1]  # eigh sorts eigenvalues ascending: the last vector is the main axis
    along = centred @ axis
    inset = (limb_width - 1) / 2
    start, stop = along.min() + inset, along.max() - inset
    if start > stop:  # shorter than it is wide: both ends at the middle of the extent
        start = stop = (along.min() + along.max()) / 2
    ends = centroid + np.array([start, stop])[:, None] * axis
    return LimbLocation(centroid=centroid, ends=ends, pixels=len(points))


def segment_distance(ends: np.ndarray, joints: np.ndarray) -> float:
    """Mean distance between two found ends and two joints, paired the nearer way round."""
    straight = np.linalg.norm(ends - joints, axis=-1).mean()
    crossed = np.linalg.norm(ends[::-1] - joints, axis=-1).mean()
    return float(min(straight, crossed))


@dataclasses.dataclass(frozen=True)
class PoseError:
    """Pose error of one video against its driving keypoints (pixels).

    scored: (frame, limb) pairs looked for; found: those located; seen_in_reference: whether pairs were
    scored only where the ground truth shows the limb. centroid_px / segment_px: mean distance
    over the found ones (NaN if none); *_capped_px: mean over all scored pairs of min(distance, cap_px), a
    miss counting cap_px. per_limb_detection: each limb's detection rate (NaN where never scored).
    """

    scored: int
    found: int
    detection_rate: float
    centroid_px: float
    segment_px: float
    centroid_capped_px: float
    segment_capped_px: float
    cap_px: float
    per_limb_detection: tuple[float, ...]
    seen_in_reference: bool


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def pose_error(
    frames: np.ndarray,
    poses: Sequence[PoseFrame],
    palette: Palette,
    *,
    cap_px: float | None = None,
    min_pixels: int | None = None,
    min_score: float = 0.3,
    seen_in: np.ndarray | None = None,
) -> PoseError:
    """Locate each palette-coloured limb in uint8 (T, H, W, 3) frames and compare it with the driving
    keypoints (one PoseFrame per frame, in the frames' pixels); seen_in: ground-truth frames of the same
    shape, to score only the limbs they show. See the module docstring for the rules."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or len(frames) != len(poses):
        raise ValueError(f"pose_error: {len(poses)} poses for frames of shape {frames.shape}")
    if seen_in is not None and np.shape(seen_in) != frames.shape:
        raise ValueError(f"pose_error: seen_in {np.shape(seen_in)} does not match frames {frames.shape}")
    height, width = frames.shape[1:3]
    cap_px = default_cap_px(height, width) if cap_px is None else float(cap_px)
    centroid, segment, centroid_capped, segment_capped = [], [], [], []
    tries = np.zeros(len(LIMBS))
    hits = np.zeros(len(LIMBS))
    for t, (frame, pose) in enumerate(zip(frames, poses, strict=True)):
        for limb in visible_limbs(pose, min_score):
            color = palette.limbs[limb]
            joints = pose.body[list(LIMBS[limb])]
            middle = joints.mean(0)
            if color is None or not (0 <= middle[0] <= width - 1 and 0 <= middle[1] <= height - 1):
                continue
            width_px = palette.limb_widths[limb]
            if (
                seen_in is not None
                and locate_limb(seen_in[t], color, palette.tolerance, width_px, min_pixels) is None
            ):
                continue
            tries[limb] += 1
            found = locate_limb(frame, color, palette.tolerance, width_px, min_pixels)
            if found is None:
                centroid_capped.append(cap_px)
                segment_capped.append(cap_px)
                continue
            hits[limb] += 1
            centroid.append(float(np.linalg.norm(found.centroid - middle)))
            segment.append(segment_distance(found.ends, joints))
            centroid_capped.append(min(centroid[-1], cap_px))
            segment_capped.append(min(segment[-1], cap_px))
    scored = int(tries.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        per_limb = tuple(float(r) for r in hits / tries)
    return PoseError(
        scored=scored,
        found=len(centroid),
        detection_rate=len(centroid) / scored if scored else math.nan,
        centroid_px=_mean(centroid),
        segment_px=_mean(segment),
        centroid_capped_px=_mean(centroid_capped),
        segment_capped_px=_mean(segment_capped),
        cap_px=cap_px,
        per_limb_detection=per_limb,
        seen_in_reference=seen_in is not None,
    )


def palette_coverage(image: np.ndarray, palette: Palette, *, min_pixels: int | None = None) -> float:
    """The share of the palette's limb colours found (`locate_limb`) anywhere in one uint8 (H, W, 3) image:
    near 1 for a reference image of this identity, near 0 when the palette belongs to someone else."""
    if all(c is None for c in palette.limbs):
        return math.nan
    found = [
        locate_limb(image, color, palette.tolerance, palette.limb_widths[i], min_pixels) is not None
        for i, color in enumerate(palette.limbs)
        if color is not None
    ]
    return float(np.mean(found))
