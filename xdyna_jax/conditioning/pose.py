"""Pose skeletons: keypoint frames, OpenPose/DWPose readers, skeleton rendering, driving-pose alignment.

X-Dyna's Pose ControlNet reads an OpenPose-18 body + hands skeleton drawn on black, without the head skeleton
(eyes/ears dropped, nose-neck kept), as rendered by the DWPose ControlNet annotator
(IDEA-Research/DWPose, ControlNet-v1-1-nightly/annotator/dwpose/util.py). ``draw_pose`` reproduces that
drawing with PIL/NumPy only:

- 17 limbs (the annotator lists 19 pairs but only draws the first 17; the ear-shoulder pairs never appear),
  each a filled ellipse polygon (OpenCV ``ellipse2Poly`` rebuilt here, 1-degree steps) with semi-axes
  (length/2, 4), drawn in full colour in order (later limbs cover earlier ones); then the whole limb layer
  is multiplied by 0.6.
- 18 joints on top, filled circles of radius 4 in the full joint colour (OpenCV's midpoint circle, exact).
- Hands on top: 20 edges, 2-px lines coloured by an HSV hue ramp, then 21 keypoints as radius-4 dots of
  colour (0, 0, 255). The annotator writes these tuples into an RGB canvas, so the dots are *blue* in the
  images the ControlNet saw (X-Dyna's assets/poses/*.mp4 show blue dots); this module writes RGB alike.

Pixel differences to OpenCV are confined to polygon/line edges (both are non-anti-aliased rasterisers with
slightly different edge rules). Coordinates: pixels (x right, y down), or normalised to [0, 1] when
``PoseFrame.normalized`` (DWPose's convention; converted with ``x * W, y * H`` at drawing time).

Alignment (``align_global``, ``align_limbs``): the X-Dyna release expects driving poses pre-aligned to the
reference person but never published that code, so this is our own, documented, simple version.
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# ------------------------------------------------------------------------------------------------------
# Skeleton tables (OpenPose COCO-18 order; hands in OpenPose/COCO-WholeBody 21-point order)
# ------------------------------------------------------------------------------------------------------

JOINT_NAMES = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist", "r_hip",
    "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)  # fmt: skip
NOSE, NECK, R_WRIST, L_WRIST, R_ANKLE, L_ANKLE = 0, 1, 4, 7, 10, 13
HEAD_JOINTS = (14, 15, 16, 17)  # eyes, ears: not drawn without the head skeleton

# The annotator's limbSeq (1-based) minus one, first 17 pairs. Each pair is (parent, child) of the
# kinematic tree rooted at the neck, listed parents-first, so the alignment walks this same table.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
HEAD_LIMBS = (13, 14, 15, 16)  # nose-eye, eye-ear (both sides); limb 12 (neck-nose) stays

# Limb i and joint i are drawn in COLORS[i] (RGB); limbs at 0.6 of it.
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
LIMB_ALPHA = 0.6

HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)  # fmt: skip
HAND_POINT_COLOR = (0, 0, 255)  # the annotator's tuple, stored as-is in an RGB canvas: blue

# Reference sizes in pixels (the annotator's constants, used at every resolution).
STICK_WIDTH, JOINT_RADIUS, HAND_LINE_THICKNESS, HAND_POINT_RADIUS = 4, 4, 2, 4

# BODY_25 -> COCO-18: drop MidHip (8) and the six foot points (19-24).
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
HANDS_ORDER = ("left", "right")  # PoseFrame.hands[0] is the left hand (DWPose and OpenPose JSON agree)
HAND_WRISTS = (L_WRIST, R_WRIST)


def hand_edge_color(index: int) -> tuple[int, int, int]:
    """Colour of hand edge ``index``: hsv_to_rgb([i / 20, 1, 1]) * 255, rounded like OpenCV's cvRound."""
    rgb = colorsys.hsv_to_rgb(index / len(HAND_EDGES), 1.0, 1.0)  # same formula as matplotlib's
    return tuple(int(v) for v in np.rint(np.array(rgb) * 255.0))  # rint = round half to even = cvRound


# ------------------------------------------------------------------------------------------------------
# PoseFrame
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PoseFrame:
    """One person's keypoints in one frame.

    body (18, 2) x/y in OpenPose COCO-18 order, body_scores (18,); hands (2, 21, 2) [left, right] and
    hand_scores (2, 21). A missing point has NaN coordinates or score 0. ``normalized``: coordinates are
    fractions of the image width/height instead of pixels. Hands default to all-missing.
    """

    body: np.ndarray
    body_scores: np.ndarray
    hands: np.ndarray | None = None
    hand_scores: np.ndarray | None = None
    normalized: bool = False

    def __post_init__(self):
        if self.hands is None:
            self.hands = np.full((2, 21, 2), np.nan)
        if self.hand_scores is None:
            self.hand_scores = np.zeros((2, 21))
        for name, shape in (
            ("body", (18, 2)),
            ("body_scores", (18,)),
            ("hands", (2, 21, 2)),
            ("hand_scores", (2, 21)),
        ):
            value = np.array(getattr(self, name), dtype=np.float64)  # a copy: frames never share buffers
            if value.shape != shape:
                raise ValueError(f"PoseFrame.{name} must have shape {shape}, got {value.shape}")
            setattr(self, name, value)

    @classmethod
    def empty(cls, normalized: bool = False) -> PoseFrame:
        """A frame where nobody was detected."""
        return cls(np.full((18, 2), np.nan), np.zeros(18), normalized=normalized)

    def body_visible(self, min_score: float = 0.3) -> np.ndarray:
        """(18,) bool: finite and score > min_score (DWPose keeps body points with score > 0.3)."""
        return np.isfinite(self.body).all(-1) & (self.body_scores > min_score)

    def hands_visible(self, min_score: float = 0.3) -> np.ndarray:
        """(2, 21) bool: finite, score > 0 and >= min_score (DWPose drops hand points scoring < 0.3)."""
        s = self.hand_scores
        return np.isfinite(self.hands).all(-1) & (s >= min_score) & (s > 0)

    def to_pixels(self, height: int, width: int) -> PoseFrame:
        """Pixel-coordinate copy (identity if already in pixels)."""
        if not self.normalized:
            return dataclasses.replace(self)
        scale = np.array([width, height], np.float64)
        return dataclasses.replace(self, body=self.body * scale, hands=self.hands * scale, normalized=False)

    def to_normalized(self, height: int, width: int) -> PoseFrame:
        """Normalised-coordinate copy (identity if already normalised)."""
        if self.normalized:
            return dataclasses.replace(self)
        scale = np.array([width, height], np.float64)
        return dataclasses.replace(self, body=self.body / scale, hands=self.hands / scale, normalized=True)


# ------------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------------


def _triplets(values, count: int, where: str) -> np.ndarray:
    """Flat [x, y, c, x, y, c, ...] -> (count, 3); OpenPose writes (0, 0, 0) for a missing point."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (count * 3,):
        raise ValueError(
            f"{where}: expected {count * 3} numbers ({count} keypoints x 3), got shape {arr.shape}"
        )
    return arr.reshape(count, 3)


def read_openpose_json(path, *, person: int = 0, normalized: bool = False) -> PoseFrame:
    """One OpenPose JSON file -> PoseFrame of ``people[person]`` (empty frame when nobody is listed).

    ``pose_keypoints_2d`` may be COCO-18 (54 numbers) or BODY_25 (75, converted to COCO-18); hands come from
    ``hand_left_keypoints_2d`` / ``hand_right_keypoints_2d`` (63 numbers each; absent or empty = missing).
    Set ``normalized`` if OpenPose ran with ``--keypoint_scale`` 3 or 4 (coordinates in [0, 1]).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("people"), list):
        raise ValueError(f"{path}: not an OpenPose keypoint file (no 'people' list)")
    people = data["people"]
    if person >= len(people):
        return PoseFrame.empty(normalized)
    entry = people[person]
    if not isinstance(entry, dict) or "pose_keypoints_2d" not in entry:
        raise ValueError(f"{path}: people[{person}] has no 'pose_keypoints_2d'")

    flat = entry["pose_keypoints_2d"]
    n = len(flat) // 3 if isinstance(flat, list) else -1
    if n == 25:
        body = _triplets(flat, 25, f"{path}: pose_keypoints_2d")[list(BODY25_TO_COCO18)]
    elif n == 18:
        body = _triplets(flat, 18, f"{path}: pose_keypoints_2d")
    else:
        size = len(flat) if isinstance(flat, list) else type(flat).__name__
        raise ValueError(
            f"{path}: pose_keypoints_2d must hold 54 (COCO-18) or 75 (BODY_25) numbers, got {size}"
        )

    hands, hand_scores = np.full((2, 21, 2), np.nan), np.zeros((2, 21))
    for i, side in enumerate(HANDS_ORDER):
        flat = entry.get(f"hand_{side}_keypoints_2d") or []
        if len(flat):
            h = _triplets(flat, 21, f"{path}: hand_{side}_keypoints_2d")
            hands[i], hand_scores[i] = h[:, :2], h[:, 2]
    return PoseFrame(body[:, :2], body[:, 2], hands, hand_scores, normalized)


def _frame_number(path: Path) -> int:
    """OpenPose names frames like ``clip_000000000012_keypoints.json``: the last digit run is the frame."""
    runs = re.findall(r"\d+", path.stem)
    if not runs:
        raise ValueError(f"{path}: no frame number in the file name")
    return int(runs[-1])


def read_openpose_folder(directory, *, person: int = 0, normalized: bool = False) -> list[PoseFrame]:
    """All ``*.json`` files of an OpenPose ``--write_json`` folder, in frame-number order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    files = sorted(directory.glob("*.json"), key=lambda p: (_frame_number(p), p.name))
    if not files:
        raise ValueError(f"{directory}: no OpenPose .json files")
    return [read_openpose_json(p, person=person, normalized=normalized) for p in files]


def write_openpose_json(frame: PoseFrame, path) -> None:
    """Write one frame as OpenPose COCO-18 JSON (missing points as 0, 0, 0, like OpenPose)."""

    def flat(xy, scores, visible):
        rows = np.concatenate([xy, scores[:, None]], axis=1)
        rows[~visible] = 0.0
        return [float(v) for v in rows.reshape(-1)]

    person = {
        "person_id": [-1],
        "pose_keypoints_2d": flat(frame.body, frame.body_scores, frame.body_visible(0.0)),
    }
    hand_visible = frame.hands_visible(0.0)
    for i, side in enumerate(HANDS_ORDER):
        person[f"hand_{side}_keypoints_2d"] = flat(frame.hands[i], frame.hand_scores[i], hand_visible[i])
    Path(path).write_text(json.dumps({"version": 1.3, "people": [person]}))


def from_arrays(body, hands=None, *, normalized: bool = False) -> list[PoseFrame]:
    """Stacked (x, y, score) arrays -> frames: body (T, 18, 3), hands (T, 2, 21, 3) [left, right] or None.

    For DWPose's 134-point whole-body output (``keypoints`` (T, 134, 2), ``scores`` (T, 134)) stack
    x, y, score and pass ``body = kps[:, :18]``, ``hands = stack([kps[:, 92:113], kps[:, 113:134]], 1)``.
    """
    body = np.asarray(body, np.float64)
    if body.ndim != 3 or body.shape[1:] != (18, 3):
        raise ValueError(f"from_arrays: body must have shape (T, 18, 3), got {body.shape}")
    if hands is None:
        hands = np.zeros((body.shape[0], 2, 21, 3))
        hands[..., :2] = np.nan
    hands = np.asarray(hands, np.float64)
    if hands.shape != (body.shape[0], 2, 21, 3):
        raise ValueError(f"from_arrays: hands must have shape ({body.shape[0]}, 2, 21, 3), got {hands.shape}")
    return [
        PoseFrame(b[:, :2], b[:, 2], h[..., :2], h[..., 2], normalized)
        for b, h in zip(body, hands, strict=True)
    ]


def to_arrays(frames: Sequence[PoseFrame]) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``from_arrays``: body (T, 18, 3), hands (T, 2, 21, 3)."""
    body = np.stack([np.concatenate([f.body, f.body_scores[:, None]], -1) for f in frames])
    hands = np.stack([np.concatenate([f.hands, f.hand_scores[..., None]], -1) for f in frames])
    return body, hands


def from_dwpose(candidate, subset, hands=None, *, person: int = 0) -> PoseFrame:
    """The DWPose annotator's pose dict pieces -> a normalised PoseFrame.

    ``candidate`` (K, >=2) normalised x, y; ``subset`` (N, >=18) candidate index per joint or -1 (missing);
    ``hands`` (2N, 21, 2) normalised with -1 for missing, stacked as [left of every person, right of every
    person] (DWPose's ``vstack``). The annotator keeps no scores: visible points get score 1.
    """
    candidate, subset = np.asarray(candidate, np.float64), np.asarray(subset, np.float64)
    if candidate.ndim != 2 or candidate.shape[1] < 2:
        raise ValueError(f"from_dwpose: candidate must have shape (K, 2), got {candidate.shape}")
    if subset.ndim != 2 or subset.shape[1] < 18:
        raise ValueError(f"from_dwpose: subset must have shape (N, 18), got {subset.shape}")
    if not 0 <= person < len(subset):
        raise ValueError(f"from_dwpose: person {person} out of range ({len(subset)} people)")
    index = subset[person, :18].astype(int)
    if index.max(initial=-1) >= len(candidate):
        raise ValueError(f"from_dwpose: subset index {index.max()} beyond {len(candidate)} candidates")
    seen = index >= 0
    body = np.full((18, 2), np.nan)
    body[seen] = candidate[index[seen], :2]
    frame = PoseFrame(body, seen.astype(np.float64), normalized=True)
    if hands is not None:
        hands = np.asarray(hands, np.float64)
        n = len(subset)
        if hands.shape != (2 * n, 21, 2):
            raise ValueError(f"from_dwpose: hands must have shape ({2 * n}, 21, 2), got {hands.shape}")
        pair = hands[[person, n + person]]
        ok = (pair >= 0).all(-1)  # DWPose marks missing hand points with -1
        frame.hands = np.where(ok[..., None], pair, np.nan)
        frame.hand_scores = ok.astype(np.float64)
    return frame


# ------------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------------

# OpenCV's SinTable: sin of whole degrees, written with 7 decimals as float literals.
_SIN = np.round(np.sin(np.deg2rad(np.arange(451))), 7).astype(np.float32).astype(np.float64)


def ellipse_polygon(center: tuple[int, int], axes: tuple[int, int], angle: int) -> list[tuple[int, int]]:
    """OpenCV ``ellipse2Poly(center, axes, angle, 0, 360, delta=1)``: integer vertices, repeats dropped."""
    angle %= 360  # OpenCV maps angle into [0, 360]; sin/cos are the same either way
    cos_a, sin_a = _SIN[450 - angle], _SIN[angle]
    t = np.arange(361)
    x, y = axes[0] * _SIN[450 - t], axes[1] * _SIN[t]
    px = np.rint(center[0] + x * cos_a - y * sin_a).astype(int)  # cvRound: round half to even
    py = np.rint(center[1] + x * sin_a + y * cos_a).astype(int)
    points: list[tuple[int, int]] = []
    for p in zip(px.tolist(), py.tolist(), strict=True):
        if not points or p != points[-1]:
            points.append(p)
    return points if len(points) > 1 else [tuple(center)] * 2


def circle_pixels(cx: int, cy: int, radius: int) -> list[tuple[int, int]]:
    """Pixels of OpenCV's filled non-AA circle (its midpoint algorithm, spans mirrored in 4 octant pairs)."""
    pixels = []
    err, dx, dy, plus, minus = 0, radius, 0, 1, 2 * radius - 1
    while dx >= dy:
        for y, half in ((cy - dy, dx), (cy + dy, dx), (cy - dx, dy), (cy + dx, dy)):
            pixels.extend((x, y) for x in range(cx - half, cx + half + 1))
        dy += 1
        err += plus
        plus += 2
        if err > 0:
            err -= minus
            dx -= 1
            minus -= 2
    return pixels


def _thick_line(draw: ImageDraw.ImageDraw, p0, p1, color, thickness: int) -> None:
    """OpenCV ``line(thickness>1)``: a quad of half-width thickness/2 plus round caps of that radius."""
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    if thickness <= 1:
        draw.line([p0, p1], fill=color, width=1)
        return
    if length > 0:
        half = thickness / 2 + (thickness & 1) * 0.5
        ox, oy = (y1 - y0) / length * half, (x0 - x1) / length * half
        quad = [(x0 + ox, y0 + oy), (x0 - ox, y0 - oy), (x1 - ox, y1 - oy), (x1 + ox, y1 + oy)]
        draw.polygon(quad, fill=color, outline=color)
    cap = int(thickness / 2 + 0.5)
    for x, y in (p0, p1):
        draw.point(circle_pixels(x, y, cap), fill=color)


def resolve_stick_scale(stick_scale, height: int, width: int) -> float:
    """A number is used as is; ``"auto"`` = max(H, W) / 512 (reference widths at a 512-px long side)."""
    if stick_scale == "auto":
        return max(height, width) / 512.0
    stick_scale = float(stick_scale)
    if not stick_scale > 0:
        raise ValueError(f"stick_scale must be positive or 'auto', got {stick_scale}")
    return stick_scale


def draw_pose(
    frame: PoseFrame,
    height: int,
    width: int,
    *,
    draw_head: bool = False,
    draw_hands: bool = True,
    min_score: float = 0.3,
    stick_scale: float | str = 1.0,
) -> np.ndarray:
    """Render one frame's skeleton: uint8 RGB (height, width, 3) on black, as the DWPose annotator draws it.

    ``draw_head=False`` (X-Dyna's ``--no_head_skeleton``) omits the eye/ear limbs and joints; nose and the
    neck-nose limb stay. Body points need score > min_score, hand points score >= min_score (the annotator's
    two tests) and, like the annotator's ``> eps`` test, integer pixel coordinates >= 1.
    ``stick_scale`` multiplies every width (limb half-width 4, joint radius 4, hand line 2, hand dot 4; each
    rounded, at least 1). The default 1.0 is the reference: DWPose uses these sizes at any resolution, and
    X-Dyna's 896x512 pose videos were drawn so. ``"auto"`` scales by max(H, W) / 512 instead.
    """
    scale = resolve_stick_scale(stick_scale, height, width)
    size = lambda base: max(1, int(round(base * scale)))
    frame = frame.to_pixels(height, width)
    body, visible = frame.body, frame.body_visible(min_score)
    if not draw_head:
        visible[list(HEAD_JOINTS)] = False

    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    stick = size(STICK_WIDTH)
    for i, (a, b) in enumerate(LIMBS):
        if not (visible[a] and visible[b]):
            continue
        # Same integer truncations as the annotator: centre, half-length and angle all go through int().
        (xa, ya), (xb, yb) = body[a], body[b]
        center = (int((xa + xb) / 2), int((ya + yb) / 2))
        half_length = int(math.hypot(xa - xb, ya - yb) / 2)
        angle = int(math.degrees(math.atan2(ya - yb, xa - xb)))
        polygon = ellipse_polygon(center, (half_length, stick), angle)
        draw.polygon(polygon, fill=COLORS[i], outline=COLORS[i])  # outline: OpenCV fills its edges too

    # The annotator dims the whole limb layer at once ((canvas * 0.6).astype(uint8)), then draws joints.
    image = Image.fromarray((np.asarray(image) * LIMB_ALPHA).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for i in np.flatnonzero(visible):
        x, y = body[i]
        draw.point(circle_pixels(int(x), int(y), size(JOINT_RADIUS)), fill=COLORS[i])

    if draw_hands:
        hand_ok = frame.hands_visible(min_score)
        for hand, ok in zip(frame.hands, hand_ok, strict=True):
            ints = [(int(x), int(y)) if k else (0, 0) for (x, y), k in zip(hand, ok, strict=True)]
            points = [p if p[0] >= 1 and p[1] >= 1 else None for p in ints]  # int coords > eps, as DWPose
            for e, (a, b) in enumerate(HAND_EDGES):
                if points[a] is not None and points[b] is not None:
                    _thick_line(draw, points[a], points[b], hand_edge_color(e), size(HAND_LINE_THICKNESS))
            for p in points:
                if p is not None:
                    draw.point(circle_pixels(*p, size(HAND_POINT_RADIUS)), fill=HAND_POINT_COLOR)
    return np.asarray(image, dtype=np.uint8).copy()


def draw_poses(frames: Sequence[PoseFrame], height: int, width: int, **kwargs) -> np.ndarray:
    """``draw_pose`` over a sequence -> uint8 (T, H, W, 3)."""
    return np.stack([draw_pose(f, height, width, **kwargs) for f in frames])


# ------------------------------------------------------------------------------------------------------
# Alignment of a driving pose sequence to the reference person
# ------------------------------------------------------------------------------------------------------

# Bone groups whose length ratio (reference / driving anchor frame) rescales the driving bones; left and
# right are pooled so one foreshortened or hidden side does not decide the ratio alone.
BONE_GROUPS = {
    "shoulder": ((1, 2), (1, 5)),
    "upper_arm": ((2, 3), (5, 6)),
    "lower_arm": ((3, 4), (6, 7)),
    "torso": ((1, 8), (1, 11)),
    "upper_leg": ((8, 9), (11, 12)),
    "lower_leg": ((9, 10), (12, 13)),
    "head": ((1, 0), (0, 14), (14, 16), (0, 15), (15, 17)),
}
_GROUP_OF_LIMB = {bone: group for group, bones in BONE_GROUPS.items() for bone in bones}
_PARENT = {child: parent for parent, child in LIMBS}
_BODY_BONES = tuple(bone for group, bones in BONE_GROUPS.items() if group != "head" for bone in bones)


def _length_ratio(driving: PoseFrame, reference: PoseFrame, bones, min_score: float) -> float | None:
    """sum(reference bone lengths) / sum(driving bone lengths) over the bones visible in both, or None."""
    dv, rv = driving.body_visible(min_score), reference.body_visible(min_score)
    d = r = 0.0
    for a, b in bones:
        if dv[a] and dv[b] and rv[a] and rv[b]:
            d += float(np.linalg.norm(driving.body[a] - driving.body[b]))
            r += float(np.linalg.norm(reference.body[a] - reference.body[b]))
    return r / d if d > 1e-6 and r > 1e-6 else None


def limb_ratios(driving: PoseFrame, reference: PoseFrame, *, min_score: float = 0.3) -> dict[str, float]:
    """Per-group length ratios reference/driving, plus ``"base"``.

    ``base`` is the torso ratio, else the ratio over all body bones (a group that cannot be measured in
    both frames falls back to it). Raises ValueError when no body bone is visible in both frames.
    """
    overall = _length_ratio(driving, reference, _BODY_BONES, min_score)
    if overall is None:
        raise ValueError(
            "cannot align poses: no body bone is visible in both the reference and the anchor frame"
        )
    base = _length_ratio(driving, reference, BONE_GROUPS["torso"], min_score) or overall
    ratios = {
        g: _length_ratio(driving, reference, bones, min_score) or base for g, bones in BONE_GROUPS.items()
    }
    ratios["base"] = base
    return ratios


def _anchor_offset(anchor: PoseFrame, reference: PoseFrame, min_score: float, match_feet: bool) -> np.ndarray:
    """Translation taking the (already rescaled) anchor frame onto the reference.

    x: the neck onto the reference's neck (else the mean of the joints visible in both). y: the feet line
    (lowest ankle among the ankles visible in both) onto the reference's, so the person stands on the
    reference's ground; without visible ankles, the neck (or mean) as for x.
    """
    dv, rv = anchor.body_visible(min_score), reference.body_visible(min_score)
    both = dv & rv
    if both[NECK]:
        offset = reference.body[NECK] - anchor.body[NECK]
    elif both.any():
        offset = reference.body[both].mean(0) - anchor.body[both].mean(0)
    else:
        raise ValueError("cannot align poses: no joint is visible in both the reference and the anchor frame")
    ankles = [j for j in (R_ANKLE, L_ANKLE) if both[j]]
    if match_feet and ankles:
        offset[1] = reference.body[ankles, 1].max() - anchor.body[ankles, 1].max()
    return offset


def _check_pixels(frames: Sequence[PoseFrame], reference: PoseFrame) -> None:
    if reference.normalized or any(f.normalized for f in frames):
        raise ValueError(
            "align poses in pixel coordinates: bone lengths in normalised coordinates depend on the aspect "
            "ratio; convert with frame.to_pixels(height, width) first"
        )


def _anchor(driving: Sequence[PoseFrame], anchor_frame: int) -> PoseFrame:
    if not driving:
        raise ValueError("cannot align an empty driving sequence")
    if not -len(driving) <= anchor_frame < len(driving):
        raise ValueError(f"anchor_frame {anchor_frame} out of range for {len(driving)} driving frames")
    return driving[anchor_frame]


def align_global(
    driving: Sequence[PoseFrame],
    reference: PoseFrame,
    *,
    anchor_frame: int = 0,
    min_score: float = 0.3,
    match_feet: bool = True,
) -> list[PoseFrame]:
    """One scale + one offset for the whole sequence: p' = s * p + t.

    s = summed body-bone lengths of the reference / of the anchor driving frame (bones visible in both);
    t puts the anchor's neck on the reference's neck and its feet line on the reference's (see
    ``_anchor_offset``). Motion relative to the anchor frame is kept, scaled by s. Hands move with the body.
    All poses must be in pixel coordinates of the output canvas.
    """
    anchor = _anchor(driving, anchor_frame)
    _check_pixels(driving, reference)
    s = _length_ratio(anchor, reference, _BODY_BONES, min_score)
    if s is None:
        raise ValueError(
            "cannot align poses: no body bone is visible in both the reference and the anchor frame"
        )
    scaled = dataclasses.replace(anchor, body=anchor.body * s)
    t = _anchor_offset(scaled, reference, min_score, match_feet)
    return [dataclasses.replace(f, body=f.body * s + t, hands=f.hands * s + t) for f in driving]


def _rescale_bones(frame: PoseFrame, ratios: dict[str, float], min_score: float) -> PoseFrame:
    """Rebuild one frame from the neck outward with every bone vector multiplied by its group's ratio.

    The neck itself goes to base * neck, so the body's path across the frame scales like the torso. A joint
    whose parent is not visible hangs from its nearest visible ancestor (that vector scaled by ``base``),
    or, with no visible ancestor, is scaled about the origin like the neck. Hands hang from their wrists,
    scaled by the lower-arm ratio. Missing points stay missing.
    """
    base = ratios["base"]
    xy, visible = frame.body, frame.body_visible(min_score)
    out = xy * base  # the fallback for the neck and orphans; NaN stays NaN
    for parent, child in LIMBS:
        ancestor, ratio = parent, ratios[_GROUP_OF_LIMB[(parent, child)]]
        while ancestor is not None and not visible[ancestor]:
            ancestor, ratio = _PARENT.get(ancestor), base
        if ancestor is not None:
            out[child] = out[ancestor] + ratio * (xy[child] - xy[ancestor])
    hands = frame.hands * base
    for i, wrist in enumerate(HAND_WRISTS):
        if visible[wrist]:
            hands[i] = out[wrist] + ratios["lower_arm"] * (frame.hands[i] - xy[wrist])
    return dataclasses.replace(frame, body=out, hands=hands)


def align_limbs(
    driving: Sequence[PoseFrame],
    reference: PoseFrame,
    *,
    anchor_frame: int = 0,
    min_score: float = 0.3,
    match_feet: bool = True,
) -> list[PoseFrame]:
    """Give the driving person the reference's proportions, then place it like ``align_global``.

    Per-group length ratios (``limb_ratios``: shoulders, upper/lower arms, torso, upper/lower legs, head;
    left and right pooled) are measured once, on the anchor driving frame against the reference, and
    applied to every frame's bone vectors along the kinematic tree from the neck outward, so bone
    directions (the motion) are kept and bone lengths become the reference's. Pick an anchor frame whose
    pose resembles the reference's (limbs not foreshortened); frame 0 by default. Pixel coordinates only.
    """
    anchor = _anchor(driving, anchor_frame)
    _check_pixels(driving, reference)
    ratios = limb_ratios(anchor, reference, min_score=min_score)
    rescaled = [_rescale_bones(f, ratios, min_score) for f in driving]
    t = _anchor_offset(rescaled[anchor_frame], reference, min_score, match_feet)
    return [dataclasses.replace(f, body=f.body + t, hands=f.hands + t) for f in rescaled]


def align_poses(
    driving: Sequence[PoseFrame],
    reference: PoseFrame,
    *,
    anchor_frame: int = 0,
    method: str = "limbs",
    min_score: float = 0.3,
    match_feet: bool = True,
) -> list[PoseFrame]:
    """Align a driving sequence to the reference person: ``method`` "limbs" (``align_limbs``) or "global"."""
    fns = {"limbs": align_limbs, "global": align_global}
    if method not in fns:
        raise ValueError(f"unknown alignment method {method!r}; use 'limbs' or 'global'")
    return fns[method](
        driving, reference, anchor_frame=anchor_frame, min_score=min_score, match_feet=match_feet
    )
