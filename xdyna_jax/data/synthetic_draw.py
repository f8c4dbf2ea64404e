"""Drawing a synthetic dancer (`synthetic_character`) over its background, frame by frame.

Limbs are capsules computed exactly (distance to the bone segment), shaded by the distance from the bone's
axis; torso, head and hair are signed-distance shapes too; shoes, hands and face features are OpenCV
anti-aliased polygons and lines rasterised into small masks. Every layer is composited over the ones below
with its coverage, and each pixel records the part it shows (`labels`): a part id (`PART_NAMES`),
`BACKGROUND`, or `MIXED` where anti-aliasing blends two parts.

Back to front: long hair, legs, shoes, torso (clothing pattern), the neck-shoulder and neck-hip limbs
(straps over the clothing), the neck, the head (hair, face), the head limbs (nose-eye, eye-ear), face
features (brows, eyes, nose, mouth), then each arm with its hand (the right one first).
"""

from __future__ import annotations

import cv2
import numpy as np

from xdyna_jax.conditioning.pose import JOINT_NAMES, LIMBS
from xdyna_jax.data.synthetic_character import CLOTH_SHADE, LIMB_SHADE, Identity, Pose

PART_NAMES = (
    *(f"{JOINT_NAMES[a]}-{JOINT_NAMES[b]}" for a, b in LIMBS),
    "clothing", "skin", "hair", "face", "left_hand", "right_hand", "shoes",
)  # fmt: skip
CLOTHING, SKIN, HAIR, FACE, LEFT_HAND, RIGHT_HAND, SHOES = range(len(LIMBS), len(LIMBS) + 7)
BACKGROUND, MIXED = -1, -2
LEG_LIMBS, STRAP_LIMBS, NECK_LIMB, HEAD_LIMBS = (7, 8, 10, 11), (6, 9, 0, 1), 12, (13, 14, 15, 16)
ARMS = (((2, 3), 4, RIGHT_HAND, 1), ((4, 5), 7, LEFT_HAND, 0))  # (limbs, wrist, hand part, hand slot)

EYE_WHITE = (236, 236, 232)
DARK = (38, 32, 30)  # pupils, lids, closed eyes
MOUTH_INSIDE = (70, 38, 42)
SUBPIXEL = 4  # OpenCV's fractional bits for drawing coordinates


def limb_radii(limb_width: int) -> np.ndarray:
    """(17,) capsule radius per limb: half the limb width, the neck 0.35 of it, the head limbs 0.08 (at
    least 1.5 px, so they keep a fully covered core)."""
    radii = np.full(len(LIMBS), limb_width / 2)
    radii[NECK_LIMB] = max(1.5, 0.35 * limb_width)
    radii[list(HEAD_LIMBS)] = max(1.5, 0.08 * limb_width)
    return radii


class _Painter:
    """One frame being composited: the image (float RGB), the top part per pixel (coverage >= 0.5) and
    whether a pixel blends parts."""

    def __init__(self, background: np.ndarray):
        self.image = np.array(background, np.float32)
        self.height, self.width = self.image.shape[:2]
        self.top = np.full((self.height, self.width), BACKGROUND, np.int8)
        self.mixed = np.zeros((self.height, self.width), bool)
        self._xs = np.arange(self.width, dtype=np.float32)
        self._ys = np.arange(self.height, dtype=np.float32)

    def box(self, points, pad: float):
        """(x0, y0, x1, y1) pixel box around the points, clipped to the frame; None when outside it."""
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        x0, y0 = np.floor(pts.min(0) - pad).astype(int)
        x1, y1 = np.ceil(pts.max(0) + pad).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, self.width), min(y1, self.height)
        return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None

    def grid(self, box):
        """Pixel-centre coordinates of the box: xs (1, w) and ys (h, 1), broadcasting to (h, w)."""
        x0, y0, x1, y1 = box
        return self._xs[None, x0:x1], self._ys[y0:y1, None]

    def paint(self, box, alpha: np.ndarray, color, part: int) -> None:
        x0, y0, x1, y1 = box
        region = self.image[y0:y1, x0:x1]
        region += alpha[..., None] * (np.asarray(color, np.float32) - region)
        self.top[y0:y1, x0:x1][alpha >= 0.5] = part
        mixed = self.mixed[y0:y1, x0:x1]
        mixed[alpha >= 1] = False
        mixed[(alpha > 0) & (alpha < 1)] = True

    def labels(self) -> np.ndarray:
        return np.where(self.mixed, MIXED, self.top).astype(np.int8)

    def mask(self, box, draw) -> np.ndarray:
        """Coverage in [0, 1] of what `draw(mask, to_px)` rasterises with OpenCV into the box; `to_px` turns
        frame points into the mask's fixed-point coordinates."""
        x0, y0, x1, y1 = box
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        offset = np.array([x0, y0], np.float64)
        draw(mask, lambda p: np.round((np.asarray(p) - offset) * (1 << SUBPIXEL)).astype(np.int32))
        return mask.astype(np.float32) / 255.0


def _capsule(p: _Painter, a, b, radius: float, base, part: int) -> None:
    """A limb: the points within `radius` of segment a-b, brightest on the axis."""
    box = p.box([a, b], radius + 1)
    if box is None:
        return
    xs, ys = p.grid(box)
    ab = np.asarray(b, np.float32) - np.asarray(a, np.float32)
    length2 = max(float(ab @ ab), 1e-9)
    t = np.clip(((xs - a[0]) * ab[0] + (ys - a[1]) * ab[1]) / length2, 0, 1)
    d = np.hypot(xs - (a[0] + t * ab[0]), ys - (a[1] + t * ab[1]))
    alpha = np.clip(radius + 0.5 - d, 0, 1)
    lo, hi = LIMB_SHADE
    shade = hi - (hi - lo) * np.minimum(d / radius, 1) ** 2
    p.paint(box, alpha, np.asarray(base, np.float32) + shade[..., None], part)


def _ellipse(p: _Painter, center, axes, angle: float, base, shade, part: int) -> None:
    """A filled ellipse (semi-axes along the rotated x and y), shaded from its middle (shade[1]) to its rim
    (shade[0])."""
    a, b = axes
    box = p.box([center], max(a, b) + 1)
    if box is None:
        return
    xs, ys = p.grid(box)
    dx, dy = xs - center[0], ys - center[1]
    c, s = np.cos(angle), np.sin(angle)
    qx, qy = c * dx + s * dy, -s * dx + c * dy
    k = np.sqrt((qx / a) ** 2 + (qy / b) ** 2)
    grad = np.sqrt((qx / a**2) ** 2 + (qy / b**2) ** 2) / np.maximum(k, 1e-6)
    sdf = (k - 1) / np.maximum(grad, 1e-6)  # first-order distance to the outline
    alpha = np.clip(0.5 - sdf, 0, 1)
    tone = shade[1] - (shade[1] - shade[0]) * np.minimum(k, 1) ** 2
    p.paint(box, alpha, np.asarray(base, np.float32) + tone[..., None], part)


def _torso(p: _Painter, identity: Identity, body: np.ndarray, limb_width: int) -> None:
    """The torso quad, shoulders to hips widened by the limbs' width, in the identity's clothing pattern."""
    neck, r_sh, l_sh, r_hip, l_hip = body[[1, 2, 5, 8, 11]]
    across = l_sh - r_sh
    across = across / max(np.linalg.norm(across), 1e-6)
    down = np.array([-across[1], across[0]])
    half = 0.3 * limb_width
    corners = np.stack(
        [
            r_sh - half * across,
            l_sh + half * across,
            l_hip + half * (across + down),
            r_hip - half * (across - down),
        ]
    )
    box = p.box(corners, 1)
    if box is None:
        return
    xs, ys = p.grid(box)
    edges = np.roll(corners, -1, 0) - corners
    normals = np.stack([edges[:, 1], -edges[:, 0]], -1)
    normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-6)
    area = np.sum(corners[:, 0] * np.roll(corners[:, 1], -1) - np.roll(corners[:, 0], -1) * corners[:, 1])
    if area < 0:
        normals = -normals
    sdf = np.max(
        [(xs - c[0]) * n[0] + (ys - c[1]) * n[1] for c, n in zip(corners, normals, strict=True)], axis=0
    )
    alpha = np.clip(0.5 - sdf, 0, 1)
    width = max(np.linalg.norm(l_sh - r_sh) / 2, 1.0)
    height = max(np.linalg.norm((r_hip + l_hip) / 2 - neck), 1.0)
    u = ((xs - neck[0]) * across[0] + (ys - neck[1]) * across[1]) / width
    v = ((xs - neck[0]) * down[0] + (ys - neck[1]) * down[1]) / height
    if identity.pattern == "stripes":
        second = np.floor(v * 7) % 2 == 1
    elif identity.pattern == "checks":
        second = (np.floor(u * 2.5) + np.floor(v * 5)) % 2 == 1
    elif identity.pattern == "dots":
        second = ((u * 2.5) % 1 - 0.5) ** 2 + ((v * 5) % 1 - 0.5) ** 2 < 0.09
    else:  # bands: a collar and a belt
        second = (v < 0.12) | ((v > 0.55) & (v < 0.72))
    # hard pattern edges: a blend of two saturated colours could look like a third palette colour
    c1, c2 = (np.asarray(c, np.float32) for c in identity.clothing[:2])
    lo, hi = CLOTH_SHADE
    tone = hi - (hi - lo) * np.minimum(np.abs(u) / 1.3, 1) ** 2
    p.paint(box, alpha, np.where(second[..., None], c2, c1) + tone[..., None], CLOTHING)


def _shoe(p: _Painter, identity: Identity, ankle, toes, limb_width: int) -> None:
    big, small, heel = toes
    side = (small - big) / max(np.linalg.norm(small - big), 1e-6)
    top = [ankle - 0.45 * limb_width * side, ankle + 0.45 * limb_width * side]
    points = np.stack([*top, small, big, heel])
    box = p.box(points, 2)
    if box is None:
        return

    def draw(mask, to_px):
        hull = cv2.convexHull(to_px(points))
        cv2.fillConvexPoly(mask, hull, 255, cv2.LINE_AA, SUBPIXEL)

    p.paint(box, p.mask(box, draw), np.asarray(identity.shoes, np.float32), SHOES)


def _hand(p: _Painter, identity: Identity, points: np.ndarray, hand_length: float, part: int) -> None:
    """A palm polygon and four fingers plus a thumb as thick lines: a dark outline, then the skin."""
    thickness = max(2, int(round(0.13 * hand_length)))
    box = p.box(points, thickness + 2)
    if box is None:
        return
    palm = points[[0, 1, 2, 5, 9, 13, 17]]
    fingers = [points[[0, 1, 2, 3, 4]], *(points[[b, b + 1, b + 2, b + 3]] for b in (5, 9, 13, 17))]

    def draw(extra: int):
        def fn(mask, to_px):
            cv2.fillConvexPoly(mask, cv2.convexHull(to_px(palm)), 255, cv2.LINE_AA, SUBPIXEL)
            if extra:
                cv2.polylines(mask, [cv2.convexHull(to_px(palm))], True, 255, extra, cv2.LINE_AA, SUBPIXEL)
            cv2.polylines(
                mask, [to_px(f) for f in fingers], False, 255, thickness + extra, cv2.LINE_AA, SUBPIXEL
            )

        return fn

    skin = np.asarray(identity.skin, np.float32)
    p.paint(box, p.mask(box, draw(1)), skin - 28, part)
    p.paint(box, p.mask(box, draw(0)), skin + 4, part)


def _head(p: _Painter, identity: Identity, pose: Pose, t: int) -> None:
    u, angle = pose.head_unit, float(pose.head_angle[t])
    center = pose.head_center[t]
    c, s = np.cos(angle), np.sin(angle)
    at = lambda x, y: center + np.array([c * x - s * y, s * x + c * y]) * u
    hair = np.asarray(identity.hair, np.float32)
    _ellipse(p, at(0, -0.06), (0.84 * u, 1.05 * u), angle, hair, (-10, 8), HAIR)
    if identity.hair_style == "bun":
        _ellipse(p, at(0, -1.12), (0.36 * u, 0.3 * u), angle, hair, (-10, 8), HAIR)
    _ellipse(p, at(0, 0.1), (0.74 * u, 0.9 * u), angle, identity.skin, (-16, 10), SKIN)


def _face_features(p: _Painter, identity: Identity, pose: Pose, t: int) -> None:
    lm = pose.face[t]
    u = pose.head_unit
    box = p.box(lm, 0.3 * u + 2)
    if box is None:
        return
    thin = max(1, int(round(0.08 * u)))
    skin = np.asarray(identity.skin, np.float32)

    def lines(chains, closed=False, thickness=thin):
        def fn(mask, to_px):
            cv2.polylines(
                mask, [to_px(lm[list(c)]) for c in chains], closed, 255, thickness, cv2.LINE_AA, SUBPIXEL
            )

        return fn

    def polygons(chains):
        def fn(mask, to_px):
            for c in chains:
                cv2.fillPoly(mask, [to_px(lm[list(c)])], 255, cv2.LINE_AA, SUBPIXEL)

        return fn

    p.paint(
        box,
        p.mask(box, lines([range(17, 22), range(22, 27)])),
        np.asarray(identity.hair, np.float32) - 10,
        FACE,
    )
    p.paint(box, p.mask(box, lines([range(27, 31), range(31, 36)])), skin - 28, FACE)
    for first in (36, 42):
        eye = lm[first : first + 6]
        opening = np.linalg.norm(eye[[1, 2]] - eye[[5, 4]], axis=-1).mean()
        if opening > 0.12 * u:
            white = p.mask(box, polygons([range(first, first + 6)]))
            p.paint(box, white, EYE_WHITE, FACE)
            centre = eye.mean(0)
            radius = min(0.1 * u, 0.4 * opening)

            def pupil(mask, to_px, centre=centre, radius=radius):
                cv2.circle(
                    mask,
                    tuple(int(v) for v in to_px(centre)),
                    int(radius * (1 << SUBPIXEL)),
                    255,
                    -1,
                    cv2.LINE_AA,
                    SUBPIXEL,
                )

            p.paint(box, np.minimum(p.mask(box, pupil), white), DARK, FACE)
            p.paint(box, p.mask(box, lines([range(first, first + 4)])), DARK, FACE)
        else:  # shut: the lid line
            p.paint(box, p.mask(box, lines([[first, first + 3]])), DARK, FACE)
    p.paint(box, p.mask(box, polygons([range(48, 60)])), identity.lips, FACE)
    inner = lm[60:68]
    if np.linalg.norm(inner[[1, 2, 3]] - inner[[7, 6, 5]], axis=-1).mean() > 0.05 * u:
        p.paint(box, p.mask(box, polygons([range(60, 68)])), MOUTH_INSIDE, FACE)


def draw_frame(
    background: np.ndarray, identity: Identity, pose: Pose, t: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame t of the dancer over `background` (H, W, 3) -> (float RGB image, top part (H, W) int8 with
    coverage >= 0.5, labels (H, W) int8 as the module describes)."""
    p = _Painter(background)
    body, w = pose.body[t], pose.limb_width
    radius = w / 2
    head_radius = limb_radii(w)[HEAD_LIMBS[0]]
    colors = identity.limb_colors.astype(np.float32)
    limb = lambda k, r=radius: _capsule(p, body[LIMBS[k][0]], body[LIMBS[k][1]], r, colors[k], k)
    if identity.hair_style == "long":
        c, s = np.cos(pose.head_angle[t]), np.sin(pose.head_angle[t])
        back = pose.head_center[t] + np.array([-s, c]) * 0.45 * pose.head_unit
        u = pose.head_unit
        _ellipse(p, back, (0.95 * u, 1.5 * u), float(pose.head_angle[t]), identity.hair, (-10, 6), HAIR)
    for k in LEG_LIMBS:
        limb(k)
    feet = pose.feet[t]
    _shoe(p, identity, body[13], feet[0:3], w)
    _shoe(p, identity, body[10], feet[3:6], w)
    _torso(p, identity, body, w)
    for k in STRAP_LIMBS:
        limb(k)
    limb(NECK_LIMB, limb_radii(w)[NECK_LIMB])
    _head(p, identity, pose, t)
    for k in HEAD_LIMBS:
        limb(k, head_radius)
    _face_features(p, identity, pose, t)
    hand_length = identity.proportions["hand"] * pose.body_height
    for limbs, _, part, slot in ARMS:
        for k in limbs:
            limb(k)
        _hand(p, identity, pose.hands[t, slot], hand_length, part)
    return p.image, p.top, p.labels()


# ------------------------------------------------------------------------------------------------------
# Which keypoints a frame shows
# ------------------------------------------------------------------------------------------------------


def _body_owners() -> list[set[int]]:
    owners = [set() for _ in JOINT_NAMES]
    for k, (a, b) in enumerate(LIMBS):
        owners[a].add(k)
        owners[b].add(k)
    for j in (0, 14, 15, 16, 17):
        owners[j] |= {SKIN, HAIR, FACE}
    for j in (1, 2, 5, 8, 11):
        owners[j].add(CLOTHING)
    owners[4].add(RIGHT_HAND)
    owners[7].add(LEFT_HAND)
    owners[10].add(SHOES)
    owners[13].add(SHOES)
    return owners


BODY_OWNERS = _body_owners()
FEET_OWNERS = [{SHOES, 11}] * 3 + [{SHOES, 8}] * 3
HAND_OWNERS = ({LEFT_HAND, 5}, {RIGHT_HAND, 3})
FACE_HIDERS = {2, 3, 4, 5, LEFT_HAND, RIGHT_HAND}  # only the arms are drawn over the face


def point_scores(points: np.ndarray, top: np.ndarray, owners) -> np.ndarray:
    """(N,) 1.0 for points on the canvas whose pixel shows one of their owner parts (or nothing drawn),
    0.0 for points off the canvas or hidden behind another part. `owners`: one set per point, or a
    callable part -> hides."""
    h, w = top.shape
    scores = np.zeros(len(points))
    for i, (x, y) in enumerate(points):
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            continue
        part = int(top[int(round(y)), int(round(x))])
        hidden = owners(part) if callable(owners) else part not in owners[i] and part != BACKGROUND
        scores[i] = 0.0 if hidden else 1.0
    return scores
