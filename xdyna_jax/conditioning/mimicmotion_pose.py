"""DynamiCtrl's pose video: DWPose keypoints retargeted onto the reference person, drawn MimicMotion style.

The DynamiCtrl release builds its pose condition the way MimicMotion does:

1. The reference photo is resized to cover H x W (aspect kept, sizes rounded up) and centre-cropped to it
   (`pose_reference_image`); DWPose runs on that image. Its pose, drawn, is frame 0 of the pose video.
2. DWPose runs on every raw driving frame (not cropped; the keypoints are fractions of the driving frame's
   fh x fw). One affine map per video takes them onto the reference (`fit_retarget`), in those fractions:
   - joints used: nose, neck, shoulders, hips, knees, ankles, eyes, ears (`RETARGET_JOINTS`; never elbows
     or wrists), those visible in the reference (score > 0.3);
   - y: least squares y_ref ~ ay * y_drv + by over every (frame, joint) pair; then `by` is replaced so that
     the nose of driving frame 0 lands on the reference's nose height: by = y_ref[nose] - ay * y_drv0[nose];
   - x: the same pixel scale, ax = ay / ((fh / fw) / H * W), and bx = mean(x_ref - ax * x_drv);
   - body, hands and face of every frame move by it (scores kept).
   In pixels this is one uniform scale s = ay * H / fh for both axes plus a translation, so the driving
   person keeps their proportions and is resized and moved to the reference's height and place.
3. Each pose is drawn on a black canvas whose shorter side is 2160 pixels, at sizes fixed in those pixels
   (`draw_pose_mimicmotion`), then resized to W x H. The colour tuples are written into a canvas the release
   then converts BGR -> RGB, so the images hold every tuple with its channels reversed (limb 0, the
   (255, 0, 0) neck-right-shoulder limb, comes out blue; hand dots red).

The release's own quirks are kept where they shape the result: the reference pose is taken on the cropped
photo while the pipeline is given the whole photo stretched to H x W; points are taken as DWPose gives them,
whatever their score, when fitting (a point we hold no position for, NaN or score 0 as OpenPose writes a
missing one, is left out). Where the release pairs the reference's first visible joint with the driving
nose (which matters only when the reference's nose is hidden), we pair the same joint on both sides.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from collections.abc import Sequence

import cv2
import numpy as np

from xdyna_jax.conditioning.pose import COLORS, HAND_EDGES, LIMBS, PoseFrame

# Joints fitted when retargeting (OpenPose-18 order): all but the elbows (3, 6) and wrists (4, 7), whose
# motion would pull the fit around.
RETARGET_JOINTS = (0, 1, 2, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17)
# The release's visibility rule for the reference's joints: DWPose's subset keeps scores above 0.3.
VISIBLE_SCORE = 0.3

# Drawing (MimicMotion's constants, in pixels of the 2160-pixel canvas).
CANVAS_SHORT_SIDE = 2160
STICK_HALF_WIDTH, JOINT_RADIUS, HAND_LINE_THICKNESS, HAND_POINT_RADIUS, FACE_POINT_RADIUS = 4, 4, 2, 4, 3
LIMB_DIMMING = 0.6
# A hand or face point is drawn when both truncated canvas coordinates exceed this (i.e. are >= 1).
_EPS = 0.01


# ------------------------------------------------------------------------------------------------------
# Retargeting
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Retarget:
    """x' = ax * x + bx, y' = ay * y + by, with x, y fractions of the driving frame and x', y' fractions of
    the H x W canvas (the release's coordinates)."""

    ax: float
    ay: float
    bx: float
    by: float

    def apply(self, frame: PoseFrame, driving_size: tuple[int, int], height: int, width: int) -> PoseFrame:
        """A driving frame (pixels of driving_size, or fractions of it) -> the mapped frame in canvas pixels."""
        fractions = frame.to_normalized(*driving_size)
        a, b = np.array([self.ax, self.ay]), np.array([self.bx, self.by])
        canvas = np.array([width, height], np.float64)
        return fractions.map_points(lambda p: (p * a + b) * canvas, normalized=False)


def _usable(points: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Points with a position: finite and a score above 0 (OpenPose writes (0, 0, 0) for a missing one)."""
    return np.isfinite(points).all(-1) & (scores > 0)


def fit_retarget(
    driving: Sequence[PoseFrame],
    reference: PoseFrame,
    *,
    height: int,
    width: int,
    driving_size: tuple[int, int] | None = None,
) -> Retarget:
    """The release's affine map from the driving person onto the reference (see the module docstring).

    driving: the driving frames, in pixels of a driving_size = (fh, fw) image or fractions of it (default
    (height, width): keypoints already framed for the canvas). reference: the reference person in pixels of
    the H x W canvas (or fractions of it). Frame 0 of `driving` anchors the height.
    """
    if not driving:
        raise ValueError("cannot retarget an empty driving sequence")
    fh, fw = driving_size or (height, width)
    ref = reference.to_normalized(height, width)
    joints = [j for j in RETARGET_JOINTS if ref.body_visible(VISIBLE_SCORE)[j]]
    if not joints:
        raise ValueError(
            "cannot retarget the driving pose: none of the reference's nose, neck, shoulders, hips, knees, "
            "ankles, eyes or ears is visible (score > 0.3)"
        )
    frames = [f.to_normalized(fh, fw) for f in driving]
    drv, target = [], []
    for f in frames:
        ok = _usable(f.body, f.body_scores)
        drv += [f.body[j] for j in joints if ok[j]]
        target += [ref.body[j] for j in joints if ok[j]]
    drv, target = np.asarray(drv).reshape(-1, 2), np.asarray(target).reshape(-1, 2)
    if len(np.unique(drv[:, 1])) < 2:
        raise ValueError(
            "cannot retarget the driving pose: fewer than two distinct heights among the driving joints "
            f"{list(joints)} that the reference shows"
        )
    ay, _ = np.polyfit(drv[:, 1], target[:, 1], 1)
    first = frames[0]
    anchors = [j for j in joints if _usable(first.body, first.body_scores)[j]]
    if not anchors:
        raise ValueError(
            "cannot retarget the driving pose: driving frame 0 shows none of the joints the reference shows "
            "(it anchors the height)"
        )
    anchor = anchors[0]  # the nose, unless hidden
    by = ref.body[anchor, 1] - ay * first.body[anchor, 1]
    ax = ay / ((fh / fw) / height * width)
    bx = float(np.mean(target[:, 0] - ax * drv[:, 0]))
    return Retarget(ax=float(ax), ay=float(ay), bx=bx, by=float(by))


def retarget_poses(
    driving: Sequence[PoseFrame],
    reference: PoseFrame,
    *,
    height: int,
    width: int,
    driving_size: tuple[int, int] | None = None,
) -> list[PoseFrame]:
    """The driving frames moved onto the reference person by `fit_retarget`: PoseFrames in pixels of the
    H x W canvas (body, hands and face alike; scores unchanged; missing points stay missing)."""
    size = driving_size or (height, width)
    fit = fit_retarget(driving, reference, height=height, width=width, driving_size=size)
    return [fit.apply(f, size, height, width) for f in driving]


# ------------------------------------------------------------------------------------------------------
# The reference photo
# ------------------------------------------------------------------------------------------------------


def _cover_resize(image_hw: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, top, left): the release's resize to cover height x width (aspect kept, the
    long side rounded up) and the offsets of its centre crop (torchvision's rounding)."""
    h, w = image_hw
    if h / w < height / width:
        rh, rw = height, math.ceil(height / (h / w))
    else:
        rh, rw = math.ceil(width * (h / w)), width
    return rh, rw, int(round((rh - height) / 2.0)), int(round((rw - width) / 2.0))


def pose_reference_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The image the release finds the reference pose in: the photo resized to cover H x W (bilinear, no
    antialiasing, as torchvision's tensor resize it calls) and centre-cropped to it. uint8 (H, W, 3)."""
    rh, rw, top, left = _cover_resize(image.shape[:2], height, width)
    resized = cv2.resize(np.ascontiguousarray(image), (rw, rh), interpolation=cv2.INTER_LINEAR)
    return resized[top : top + height, left : left + width]


def reference_pose_to_canvas(
    pose: PoseFrame, image_hw: tuple[int, int], height: int, width: int
) -> PoseFrame:
    """Keypoints of the reference photo (its pixels, or fractions of it) -> pixels of `pose_reference_image`
    (pixel centres move as a resize moves them, then the crop's offset)."""
    rh, rw, top, left = _cover_resize(image_hw, height, width)
    h, w = image_hw
    scale, offset = np.array([rw / w, rh / h]), np.array([left, top], np.float64)
    pixels = pose.to_pixels(h, w)
    return pixels.map_points(lambda p: (p + 0.5) * scale - 0.5 - offset, normalized=False)


# ------------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------------


def canvas_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) of the canvas poses are drawn on: scaled so its shorter side is 2160 pixels (truncated)."""
    short = min(height, width)
    scale = CANVAS_SHORT_SIDE / short if short != CANVAS_SHORT_SIDE else 1.0
    return int(height * scale), int(width * scale)


def _scaled(color, factor: float) -> tuple[int, ...]:
    """A colour tuple dimmed by a confidence, each channel truncated (OpenCV saturates above 255)."""
    return tuple(int(c * factor) for c in color)


def _draw_body(canvas: np.ndarray, xy: np.ndarray, scores: np.ndarray) -> np.ndarray:
    finite = np.isfinite(xy).all(-1)
    for i, (a, b) in enumerate(LIMBS):  # the first 17 pairs: the ear-shoulder pairs are never drawn
        if scores[a] < VISIBLE_SCORE or scores[b] < VISIBLE_SCORE or not (finite[a] and finite[b]):
            continue
        (xa, ya), (xb, yb) = xy[a], xy[b]
        center = (int((xa + xb) / 2), int((ya + yb) / 2))
        axes = (int(math.hypot(xa - xb, ya - yb) / 2), STICK_HALF_WIDTH)
        angle = int(math.degrees(math.atan2(ya - yb, xa - xb)))
        polygon = cv2.ellipse2Poly(center, axes, angle, 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, _scaled(COLORS[i], scores[a] * scores[b]))
    canvas = (canvas * LIMB_DIMMING).astype(np.uint8)
    for i in np.flatnonzero(finite & (scores > VISIBLE_SCORE)):
        center = (int(xy[i, 0]), int(xy[i, 1]))
        cv2.circle(canvas, center, JOINT_RADIUS, _scaled(COLORS[i], scores[i]), thickness=-1)
    return canvas


def _truncated(point: np.ndarray) -> tuple[int, int] | None:
    """Truncated canvas position of a hand/face point, None when the release would skip it."""
    if not np.isfinite(point).all():
        return None
    x, y = int(point[0]), int(point[1])
    return (x, y) if x > _EPS and y > _EPS else None


def _draw_hands(canvas: np.ndarray, hands: np.ndarray, scores: np.ndarray) -> None:
    for points, conf in zip(hands, scores, strict=True):
        at = [_truncated(p) for p in points]
        for e, (a, b) in enumerate(HAND_EDGES):
            if at[a] and at[b]:
                strength = int(conf[a] * conf[b] * 255)
                hue = colorsys.hsv_to_rgb(e / len(HAND_EDGES), 1.0, 1.0)
                color = tuple(c * strength for c in hue)
                cv2.line(canvas, at[a], at[b], color, thickness=HAND_LINE_THICKNESS)
        for p, s in zip(at, conf, strict=True):
            if p:
                cv2.circle(canvas, p, HAND_POINT_RADIUS, (0, 0, int(s * 255)), thickness=-1)


def _draw_face(canvas: np.ndarray, face: np.ndarray, scores: np.ndarray) -> None:
    for point, s in zip(face, scores, strict=True):
        p = _truncated(point)
        if p:
            grey = int(s * 255)
            cv2.circle(canvas, p, FACE_POINT_RADIUS, (grey, grey, grey), thickness=-1)


def draw_pose_mimicmotion(frame: PoseFrame, height: int, width: int) -> np.ndarray:
    """One pose drawn as DynamiCtrl's pose videos are: uint8 RGB (height, width, 3) on black.

    `frame` is in pixels of the H x W image (or fractions of it). On the 2160-pixel canvas (`canvas_size`):
    - limbs (the 17 OpenPose pairs, head included, ear-shoulder excluded) where both ends score >= 0.3:
      filled ellipses through the truncated midpoint, semi-axes (int(length / 2), 4), the truncated angle,
      in the limb colour times both scores; the whole canvas then dimmed to 0.6;
    - joints scoring > 0.3: filled circles of radius 4 in the joint colour times the score;
    - hands (no score threshold): the 20 edges as lines of thickness 2 in the hue ramp times
      int(score_a * score_b * 255) / 255, then the 21 points as filled circles of radius 4 in
      (0, 0, int(score * 255));
    - face: the 68 points as filled circles of radius 3 in grey int(score * 255);
    hand and face points only where both truncated coordinates are >= 1. Then the canvas is resized to
    W x H (bilinear) and its channels reversed (see the module docstring).
    """
    ch, cw = canvas_size(height, width)
    f = frame.to_normalized(height, width)
    to_canvas = np.array([cw, ch], np.float64)
    canvas = np.zeros((ch, cw, 3), np.uint8)
    canvas = _draw_body(canvas, f.body * to_canvas, f.body_scores)
    _draw_hands(canvas, f.hands * to_canvas, f.hand_scores)
    _draw_face(canvas, f.face * to_canvas, f.face_scores)
    if (ch, cw) != (height, width):
        canvas = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(canvas[..., ::-1])


def dynamictrl_pose_video(
    reference: PoseFrame,
    driving: Sequence[PoseFrame],
    height: int,
    width: int,
    num_frames: int,
    *,
    driving_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """The pose video DynamiCtrl is conditioned on: uint8 (num_frames, H, W, 3).

    Frame 0 is the reference's own pose (canvas pixels, not retargeted); frames 1.. are the first
    num_frames - 1 driving frames (pixels of driving_size, default the canvas's, or fractions of it),
    retargeted onto the reference with the map fitted on those frames. Picking every n-th driving frame
    is the caller's.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    used = list(driving[: num_frames - 1])
    if len(used) < num_frames - 1:
        raise ValueError(
            f"{num_frames} pose frames need {num_frames - 1} driving frames after the reference's, "
            f"got {len(driving)}"
        )
    frames = [reference.to_pixels(height, width)]
    if used:
        frames += retarget_poses(used, reference, height=height, width=width, driving_size=driving_size)
    return np.stack([draw_pose_mimicmotion(f, height, width) for f in frames])
