"""Pose skeletons: keypoint frames, OpenPose/DWPose readers, skeleton rendering, driving-pose alignment.

X-Dyna's Pose ControlNet reads an OpenPose-18 body + hands skeleton drawn on black by the DWPose ControlNet
annotator, without the head skeleton (eyes and ears dropped, nose and the neck-nose limb kept) and without
face dots. ``draw_pose`` makes the same OpenCV calls in the same order, so its images equal the annotator's:

- Limbs: the first 17 of the annotator's 19 body pairs (it never draws the two ear-shoulder pairs). Each is
  ``cv2.ellipse2Poly`` around the truncated midpoint, semi-axes (int(length / 2), 4), angle
  int(degrees(atan2(dy, dx))), one-degree steps, filled by ``cv2.fillConvexPoly`` in the full limb colour;
  later limbs cover earlier ones. Then the whole canvas is scaled by 0.6 (truncated to uint8).
- Joints on top: ``cv2.circle`` radius 4, filled, in the full joint colour.
- Hands on top: 20 edges as ``cv2.line`` of thickness 2, coloured along an HSV hue ramp, then 21 dots as
  filled ``cv2.circle`` radius 4 in (0, 0, 255). The annotator writes these tuples into the canvas it
  treats as RGB, so the dots are *blue* in the images the ControlNet saw (X-Dyna's example pose videos
  show blue dots); this module writes RGB alike.
- Face (``draw_face=True``): 68 filled white dots of radius 3, as the annotator draws DWPose's face points.

Coordinates: pixels (x right, y down), or fractions of width/height when ``PoseFrame.normalized`` (DWPose's
convention; scaled by ``x * W, y * H`` before drawing).

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

import cv2
import numpy as np

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
FACE_POINT_COLOR = (255, 255, 255)

# Reference sizes in pixels (the annotator's constants, used at every resolution).
STICK_WIDTH, JOINT_RADIUS, HAND_LINE_THICKNESS, HAND_POINT_RADIUS, FACE_POINT_RADIUS = 4, 4, 2, 4, 3

# BODY_25 -> COCO-18: drop MidHip (8) and the six foot points (19-24).
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
HANDS_ORDER = ("left", "right")  # PoseFrame.hands[0] is the left hand (DWPose and OpenPose JSON agree)
HAND_WRISTS = (L_WRIST, R_WRIST)


def hand_edge_color(index: int) -> tuple[float, float, float]:
    """Colour of hand edge ``index``: hsv_to_rgb(i / 20, 1, 1) * 255, unrounded (OpenCV rounds it)."""
    return tuple(255.0 * v for v in colorsys.hsv_to_rgb(index / len(HAND_EDGES), 1.0, 1.0))


# ------------------------------------------------------------------------------------------------------
# PoseFrame
# ------------------------------------------------------------------------------------------------------

_FRAME_SHAPES = {
    "body": (18, 2), "body_scores": (18,), "hands": (2, 21, 2), "hand_scores": (2, 21), "face": (68, 2),
    "face_scores": (68,),
}  # fmt: skip


@dataclasses.dataclass
class PoseFrame:
    """One person's keypoints in one frame.

    body (18, 2) x/y in OpenPose COCO-18 order, body_scores (18,); hands (2, 21, 2) [left, right] and
    hand_scores (2, 21); face (68, 2) and face_scores (68,) in the 68-landmark order DWPose uses. A
    missing point has NaN coordinates or score 0. ``normalized``: coordinates are fractions of the image
    width/height instead of pixels. Hands and face default to all-missing.
    """

    body: np.ndarray
    body_scores: np.ndarray
    hands: np.ndarray | None = None
    hand_scores: np.ndarray | None = None
    normalized: bool = False
    face: np.ndarray | None = None
    face_scores: np.ndarray | None = None

    def __post_init__(self):
        for name, shape in _FRAME_SHAPES.items():
            value = getattr(self, name)
            if value is None:  # hands or face not given: all missing
                value = np.zeros(shape) if name.endswith("_scores") else np.full(shape, np.nan)
            value = np.array(value, dtype=np.float64)  # a copy: frames never share buffers
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
        return np.isfinite(self.hands).all(-1) & (self.hand_scores >= min_score) & (self.hand_scores > 0)

    def face_visible(self, min_score: float = 0.3) -> np.ndarray:
        """(68,) bool: the hands' rule (DWPose drops face points scoring < 0.3 alike)."""
        return np.isfinite(self.face).all(-1) & (self.face_scores >= min_score) & (self.face_scores > 0)

    def map_points(self, fn, *, normalized: bool | None = None) -> PoseFrame:
        """Copy with ``fn`` applied to the (..., 2) coordinates of body, hands and face alike."""
        return dataclasses.replace(
            self,
            body=fn(self.body),
            hands=fn(self.hands),
            face=fn(self.face),
            normalized=self.normalized if normalized is None else normalized,
        )

    def to_pixels(self, height: int, width: int) -> PoseFrame:
        """Pixel-coordinate copy (identity if already in pixels)."""
        if not self.normalized:
            return dataclasses.replace(self)
        return self.map_points(lambda p: p * np.array([width, height], np.float64), normalized=False)

    def to_normalized(self, height: int, width: int) -> PoseFrame:
        """Normalised-coordinate copy (identity if already normalised)."""
        if self.normalized:
            return dataclasses.replace(self)
        return self.map_points(lambda p: p / np.array([width, height], np.float64), normalized=True)


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
    ``hand_left_keypoints_2d`` / ``hand_right_keypoints_2d`` (63 numbers each; absent or empty = missing),
    the face from ``face_keypoints_2d`` (OpenPose's 70 points, of which the 68 landmarks before the two
    pupils are kept; or 68). Set ``normalized`` if OpenPose ran with ``--keypoint_scale`` 3 or 4 (coordinates in [0, 1]).
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
    flat = entry.get("face_keypoints_2d") or []
    face = np.zeros((68, 3))
    face[:, :2] = np.nan
    if len(flat):
        face = _triplets(flat, 70 if len(flat) == 210 else 68, f"{path}: face_keypoints_2d")[:68]
    return PoseFrame(body[:, :2], body[:, 2], hands, hand_scores, normalized, face[:, :2], face[:, 2])


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
    """Write one frame as OpenPose COCO-18 JSON (missing points, and the face's two pupils, as 0, 0, 0)."""

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
    person["face_keypoints_2d"] = flat(frame.face, frame.face_scores, frame.face_visible(0.0)) + [0.0] * 6
    Path(path).write_text(json.dumps({"version": 1.3, "people": [person]}))


def _stacked(name: str, value, shape: tuple[int, ...]) -> np.ndarray:
    """(x, y, score) array of ``shape`` + (3,), all points missing when ``value`` is None."""
    if value is None:
        value = np.zeros((*shape, 3))
        value[..., :2] = np.nan
    value = np.asarray(value, np.float64)
    if value.shape != (*shape, 3):
        raise ValueError(f"from_arrays: {name} must have shape {(*shape, 3)}, got {value.shape}")
    return value


def from_arrays(body, hands=None, face=None, *, normalized: bool = False) -> list[PoseFrame]:
    """Stacked (x, y, score) arrays -> frames: body (T, 18, 3), hands (T, 2, 21, 3) [left, right] or None,
    face (T, 68, 3) or None.

    For DWPose's 134-point whole-body output (``keypoints`` (T, 134, 2), ``scores`` (T, 134)) stack
    x, y, score and pass ``body = kps[:, :18]``, ``hands = stack([kps[:, 92:113], kps[:, 113:134]], 1)``,
    ``face = kps[:, 24:92]``.
    """
    body = np.asarray(body, np.float64)
    if body.ndim != 3 or body.shape[1:] != (18, 3):
        raise ValueError(f"from_arrays: body must have shape (T, 18, 3), got {body.shape}")
    hands = _stacked("hands", hands, (len(body), 2, 21))
    face = _stacked("face", face, (len(body), 68))
    return [
        PoseFrame(b[:, :2], b[:, 2], h[..., :2], h[..., 2], normalized, f[:, :2], f[:, 2])
        for b, h, f in zip(body, hands, face, strict=True)
    ]


def to_arrays(frames: Sequence[PoseFrame]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of ``from_arrays``: body (T, 18, 3), hands (T, 2, 21, 3), face (T, 68, 3)."""
    stack = lambda xy, score: np.stack([np.concatenate([xy(f), score(f)[..., None]], -1) for f in frames])
    return (
        stack(lambda f: f.body, lambda f: f.body_scores),
        stack(lambda f: f.hands, lambda f: f.hand_scores),
        stack(lambda f: f.face, lambda f: f.face_scores),
    )


def from_dwpose(candidate, subset, hands=None, faces=None, *, person: int = 0) -> PoseFrame:
    """The DWPose annotator's pose dict pieces -> a normalised PoseFrame.

    ``candidate`` (K, >=2) normalised x, y; ``subset`` (N, >=18) candidate index per joint or -1 (missing);
    ``hands`` (2N, 21, 2) normalised with -1 for missing, stacked as [left of every person, right of every
    person] (DWPose's ``vstack``); ``faces`` (N, 68, 2) likewise. The annotator keeps no scores: visible
    points get score 1.
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
        frame.hands, frame.hand_scores = _dwpose_points(hands[[person, n + person]])
    if faces is not None:
        faces = np.asarray(faces, np.float64)
        if faces.shape != (len(subset), 68, 2):
            raise ValueError(f"from_dwpose: faces must have shape ({len(subset)}, 68, 2), got {faces.shape}")
        frame.face, frame.face_scores = _dwpose_points(faces[person])
    return frame


def _dwpose_points(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DWPose marks a missing hand or face point with -1: -> (NaN where missing, score 1 / 0)."""
    ok = (points >= 0).all(-1)
    return np.where(ok[..., None], points, np.nan), ok.astype(np.float64)


# ------------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------------


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
    draw_face: bool = False,
    min_score: float = 0.3,
    stick_scale: float | str = 1.0,
) -> np.ndarray:
    """Render one frame's skeleton: uint8 RGB (height, width, 3) on black, as the DWPose annotator draws it.

    ``draw_head=False`` (X-Dyna's ``--no_head_skeleton``) omits the eye/ear limbs and joints; the nose and
    the neck-nose limb stay. ``draw_face`` adds the face dots (off: X-Dyna's poses have none). Which points
    count, as in the annotator: body points with score > min_score; hand and face points with
    score >= min_score whose truncated pixel coordinates are both >= 1 (its ``> eps`` test).
    ``stick_scale`` multiplies every size (limb half-width 4, joint radius 4, hand line 2, hand dot 4, face
    dot 3; each rounded, at least 1). The default 1.0 is the reference: DWPose uses these sizes at any
    resolution, and X-Dyna's 896x512 pose videos were drawn so. ``"auto"`` scales by max(H, W) / 512.
    """
    scale = resolve_stick_scale(stick_scale, height, width)
    size = lambda base: max(1, int(round(base * scale)))
    frame = frame.to_pixels(height, width)
    body, visible = frame.body, frame.body_visible(min_score)
    if not draw_head:
        visible[list(HEAD_JOINTS)] = False

    canvas = np.zeros((height, width, 3), np.uint8)
    for i, (a, b) in enumerate(LIMBS):
        if visible[a] and visible[b]:
            # The annotator truncates the centre, the half-length and the angle with int().
            (xa, ya), (xb, yb) = body[a], body[b]
            center = (int((xa + xb) / 2), int((ya + yb) / 2))
            axes = (int(math.hypot(xa - xb, ya - yb) / 2), size(STICK_WIDTH))
            angle = int(math.degrees(math.atan2(ya - yb, xa - xb)))
            cv2.fillConvexPoly(canvas, cv2.ellipse2Poly(center, axes, angle, 0, 360, 1), COLORS[i])
    # The limbs are dimmed as one layer before the joints go on top.
    canvas = (canvas * LIMB_ALPHA).astype(np.uint8)
    for i in np.flatnonzero(visible):
        cv2.circle(canvas, (int(body[i, 0]), int(body[i, 1])), size(JOINT_RADIUS), COLORS[i], thickness=-1)

    if draw_hands:
        for hand, ok in zip(frame.hands, frame.hands_visible(min_score), strict=True):
            points = _drawable(hand, ok)
            for e, (a, b) in enumerate(HAND_EDGES):
                if points[a] and points[b]:
                    thickness = size(HAND_LINE_THICKNESS)
                    cv2.line(canvas, points[a], points[b], hand_edge_color(e), thickness=thickness)
            for p in filter(None, points):
                cv2.circle(canvas, p, size(HAND_POINT_RADIUS), HAND_POINT_COLOR, thickness=-1)
    if draw_face:
        for p in filter(None, _drawable(frame.face, frame.face_visible(min_score))):
            cv2.circle(canvas, p, size(FACE_POINT_RADIUS), FACE_POINT_COLOR, thickness=-1)
    return canvas


def _drawable(points: np.ndarray, visible: np.ndarray) -> list[tuple[int, int] | None]:
    """Truncated pixel positions of visible hand/face points, None where the annotator skips one."""
    truncated = [(int(x), int(y)) if ok else (0, 0) for (x, y), ok in zip(points, visible, strict=True)]
    return [p if min(p) >= 1 else None for p in truncated]


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
    ``_anchor_offset``). Motion relative to the anchor frame is kept, scaled by s. Hands and face move
    with the body.
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
    return [f.map_points(lambda p: p * s + t) for f in driving]


def _rescale_bones(frame: PoseFrame, ratios: dict[str, float], min_score: float) -> PoseFrame:
    """Rebuild one frame from the neck outward with every bone vector multiplied by its group's ratio.

    The neck itself goes to base * neck, so the body's path across the frame scales like the torso. A joint
    whose parent is not visible hangs from its nearest visible ancestor (that vector scaled by ``base``),
    or, with no visible ancestor, is scaled about the origin like the neck. Hands hang from their wrists,
    scaled by the lower-arm ratio, the face from the nose, scaled by the head ratio (each scaled like the
    neck when that joint is missing). Missing points stay missing.
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
    face = out[NOSE] + ratios["head"] * (frame.face - xy[NOSE]) if visible[NOSE] else frame.face * base
    return dataclasses.replace(frame, body=out, hands=hands, face=face)


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
    return [f.map_points(lambda p: p + t) for f in rescaled]


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
