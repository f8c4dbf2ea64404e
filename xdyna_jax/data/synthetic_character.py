"""Synthetic dancers: who they are (an identity's palette and proportions) and how they move (keypoints).

An identity is a non-negative int. It fixes a palette and a body: every one of the 17 OpenPose limbs
(`conditioning.pose.LIMBS`) gets its own colour, the torso wears a two-colour clothing pattern, and the skin,
lips, hair and shoes have theirs; bone lengths and limb width vary a little around human-like proportions.
A motion seed fixes a dance: sums of low-frequency sinusoids on joint angles, body sway and bounce, head
tilt, blinks, a singing mouth, curling fingers. `pose_keypoints` turns an identity and a motion into the
exact keypoints of every frame on an H x W canvas: OpenPose-18 body, 6 feet points, 2 x 21 hand points
(OpenPose hand order) and 68 face landmarks (iBUG order), all in pixels (x right, y down, pixel centres at
integers).

Colour rules, so that an evaluation can find each limb by its palette colour:
- Limb and clothing colours come from a grid of levels `COLOR_LEVELS` (61 apart) with chroma (distance
  from the grey axis) at least `MIN_LIMB_CHROMA`: two of them differ by >= 61 in some channel.
- Shading adds the same offset to all three channels, within `LIMB_SHADE` inside a limb (`CLOTH_SHADE` on
  clothing), so every fully covered limb pixel is within max(|LIMB_SHADE|) = 22 per channel of its palette
  colour, and >= 39 per channel from every other limb's or the clothing's palette colour.
- Backgrounds use only colours of chroma <= `MAX_BACKGROUND_CHROMA` (a convex set, so blends stay in it),
  >= 63 from every limb colour in RGB distance; hair, shoes, eyes and mouth are low-chroma as well.
- Skin and lips are the only other saturated colours; no limb colour is picked whose tolerance box a
  shaded skin or lip pixel can enter.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from xdyna_jax.conditioning.pose import LIMBS

COLOR_LEVELS = (8, 69, 130, 191, 252)
MIN_LIMB_CHROMA = 90.0
MAX_BACKGROUND_CHROMA = 27.0
LIMB_SHADE = (-22.0, 14.0)  # offset added to all channels, axis (+14) to rim (-22)
CLOTH_SHADE = (-18.0, 10.0)
SKIN_SHADE = (-30.0, 12.0)  # skin ellipses, hands, and the darker lines drawn on them
LIP_SHADE = (-12.0, 6.0)
# Per-channel distance from a limb's palette colour that an evaluation may accept: covers the shading and
# the H.264 round trip of the mp4 files (measured in tests/test_synthetic.py), and stays below the 39
# that separates a limb's pixels from every other palette colour.
TOLERANCE = 30
CLOTHING_COLORS = 2

SKIN_TONES = (
    (255, 224, 196), (241, 194, 167), (224, 172, 135), (198, 134, 100), (160, 105, 75), (120, 78, 55),
    (92, 60, 44),
)  # fmt: skip
HAIR_COLORS = ((28, 26, 25), (62, 50, 42), (92, 80, 68), (150, 140, 130), (205, 198, 188))  # low chroma
SHOE_COLORS = ((36, 36, 40), (70, 66, 62), (225, 225, 220))
PATTERNS = ("stripes", "checks", "dots", "bands")
HAIR_STYLES = ("short", "long", "bun")

# Body sizes as fractions of the body height (crown to soles), before each identity's own variation.
PROPORTIONS = {
    "head": 0.058,  # half the head height (the face-frame unit)
    "neck": 0.13,  # neck joint to nose
    "torso": 0.285,  # neck joint to mid-hip
    "shoulder": 0.105,  # half the shoulder width
    "hip": 0.065,  # half the hip width
    "upper_arm": 0.165,
    "forearm": 0.145,
    "thigh": 0.23,
    "shin": 0.23,
    "hand": 0.075,
    "foot": 0.045,
    "limb_width": 0.068,
}


def chroma(colors) -> np.ndarray:
    """Distance of RGB colours (..., 3) from the grey axis."""
    c = np.asarray(colors, np.float64)
    return np.linalg.norm(c - c.mean(-1, keepdims=True), axis=-1)


def limb_color_pool() -> np.ndarray:
    """(N, 3) the saturated grid colours limbs and clothing are drawn from."""
    grid = np.array(list(itertools.product(COLOR_LEVELS, repeat=3)), np.float64)
    return grid[chroma(grid) >= MIN_LIMB_CHROMA]


def _reaches(color, shade: tuple[float, float], candidates: np.ndarray) -> np.ndarray:
    """(N,) bool: a pixel of `color` shaded anywhere in `shade` comes within TOLERANCE (+1) per channel of
    a candidate colour."""
    offsets = np.arange(np.floor(shade[0]), np.ceil(shade[1]) + 1)
    shaded = np.asarray(color, np.float64)[None, :] + offsets[:, None]  # (S, 3)
    gap = np.abs(shaded[None, :, :] - candidates[:, None, :]).max(-1)  # (N, S) per-channel max
    return (gap <= TOLERANCE + 1).any(-1)


@dataclasses.dataclass(frozen=True)
class Identity:
    """One synthetic person. Colours are uint8 RGB; proportions are fractions of the body height."""

    seed: int
    limb_colors: np.ndarray  # (17, 3) in LIMBS order
    clothing: np.ndarray  # (CLOTHING_COLORS, 3)
    skin: np.ndarray
    lips: np.ndarray
    hair: np.ndarray
    shoes: np.ndarray
    pattern: str
    hair_style: str
    proportions: dict
    height_fraction: float  # body height / canvas height


def check_seed(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def make_identity(identity: int) -> Identity:
    """The identity's palette and body, the same for the same int on every machine."""
    seed = check_seed("identity", identity)
    rng = np.random.default_rng([0x1D, seed])
    skin = np.array(SKIN_TONES[rng.integers(len(SKIN_TONES))], np.float64)
    skin = np.clip(skin + rng.uniform(-8, 8, 3), 0, 255).round()
    lips = np.clip(0.72 * skin + 0.28 * np.array([190.0, 70.0, 80.0]), 0, 255).round()
    pool = limb_color_pool()
    far = lambda c: np.linalg.norm(pool - c, axis=-1) >= 60
    pool = pool[~_reaches(skin, SKIN_SHADE, pool) & ~_reaches(lips, LIP_SHADE, pool) & far(skin) & far(lips)]
    chosen = pool[rng.choice(len(pool), size=len(LIMBS) + CLOTHING_COLORS, replace=False)]
    proportions = {k: v * float(rng.uniform(0.93, 1.07)) for k, v in PROPORTIONS.items()}
    proportions["limb_width"] = PROPORTIONS["limb_width"] * float(rng.uniform(0.9, 1.15))
    proportions["head"] = min(proportions["head"], 0.45 * proportions["neck"])  # chin above the neck's middle
    as_u8 = lambda c: np.asarray(c, np.float64).round().astype(np.uint8)
    return Identity(
        seed=seed,
        limb_colors=as_u8(chosen[: len(LIMBS)]),
        clothing=as_u8(chosen[len(LIMBS) :]),
        skin=as_u8(skin),
        lips=as_u8(lips),
        hair=as_u8(HAIR_COLORS[rng.integers(len(HAIR_COLORS))]),
        shoes=as_u8(SHOE_COLORS[rng.integers(len(SHOE_COLORS))]),
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
        proportions=proportions,
        height_fraction=float(rng.uniform(0.74, 0.82)),
    )


# ------------------------------------------------------------------------------------------------------
# Motion
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Motion:
    """Per-frame dance parameters; angles in radians, pairs as [right, left]."""

    sway: np.ndarray  # (T,) pelvis x offset, fraction of the canvas width
    hop: np.ndarray  # (T,) lift off the ground, fraction of the body height
    lean: np.ndarray  # (T,) torso tilt, + leans towards +x
    neck_tilt: np.ndarray  # (T,) neck direction relative to the torso
    head_roll: np.ndarray  # (T,) head rotation relative to the neck
    yaw: np.ndarray  # (T,) face features shifted sideways, fraction of the head unit
    arm_raise: np.ndarray  # (T, 2) upper arm away from the body (0: hanging)
    elbow: np.ndarray  # (T, 2) forearm bend towards the body
    leg_spread: np.ndarray  # (T, 2) thigh away from the body
    knee: np.ndarray  # (T, 2) knee bend (shortens the leg, knees outward)
    wrist: np.ndarray  # (T, 2) hand rotation relative to the forearm
    finger_curl: np.ndarray  # (T, 2) 0 open .. 1 fist
    eyes_open: np.ndarray  # (T,) 1 open .. 0 shut
    mouth_open: np.ndarray  # (T,) 0 shut .. 1 wide


def _squash(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Smoothly limit x to (lo, hi) (tanh around the middle), keeping curves smooth."""
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    return mid + half * np.tanh((x - mid) / half)


def make_motion(motion_seed: int, num_frames: int, fps: float) -> Motion:
    """A dance of `num_frames` frames at `fps`; the same seed gives the same dance on every identity."""
    seed = check_seed("motion_seed", motion_seed)
    rng = np.random.default_rng([0x30, seed])
    t = np.arange(num_frames) / float(fps)
    tempo = rng.uniform(0.3, 0.65)  # beats per second of this dance

    def curve(amplitude: float, max_speed: float, shape=()) -> np.ndarray:
        """Sum of sinusoids at 0.5, 1 and 2 beats (jittered), random phases: (T, *shape). Amplitudes are
        scaled down where needed so the curve never changes faster than `max_speed` per second."""
        amp = (
            amplitude
            * rng.uniform(0.3, 1.0, (3, *shape))
            / np.array([0.5, 1.0, 2.0]).reshape(3, *[1] * len(shape))
        )
        freq = (
            tempo
            * np.array([0.5, 1.0, 2.0]).reshape(3, *[1] * len(shape))
            * rng.uniform(0.85, 1.15, (3, *shape))
        )
        phase = rng.uniform(0, 2 * np.pi, (3, *shape))
        amp = amp * np.minimum(1.0, max_speed / (2 * np.pi * freq * amp).sum(0))
        tt = t.reshape(1, -1, *[1] * len(shape))
        return (amp[:, None] * np.sin(2 * np.pi * freq[:, None] * tt + phase[:, None])).sum(0)

    deg = np.pi / 180
    arm_base = rng.uniform(15, 70, 2) * deg
    elbow_base = rng.uniform(10, 70, 2) * deg
    # blinks every 0.9-1.8 s from 0.2-0.9 s on, each centred on a frame so the eyes shut fully there
    blink_every, first = rng.uniform(0.9, 1.8), rng.uniform(0.2, 0.9)
    blinks = np.round((first + blink_every * np.arange(int(t[-1] / blink_every) + 2)) * fps) / fps
    half_blink = 1.6 / fps  # about three frames per blink
    closeness = np.clip(1 - np.abs(t[:, None] - blinks[None, :]) / half_blink, 0, 1)
    eyes = 1 - (0.5 - 0.5 * np.cos(np.pi * closeness)).max(-1)
    eyes = eyes * (0.9 + 0.1 * np.tanh(curve(1.0, 2.0)))
    mouth_freq, mouth_phase = rng.uniform(0.8, 1.6), rng.uniform(0, 2 * np.pi)
    singing = 0.35 + 0.75 * np.sin(2 * np.pi * mouth_freq * t + mouth_phase) + 0.1 * curve(1.0, 4.0)
    mouth = np.clip(singing, 0, 1)
    return Motion(
        sway=0.07 * np.tanh(curve(1.0, 1.5)),
        hop=0.02 * np.clip(curve(1.0, 4.0), 0, None),
        lean=_squash(curve(7 * deg, 25 * deg), -12 * deg, 12 * deg),
        neck_tilt=_squash(curve(8 * deg, 35 * deg), -15 * deg, 15 * deg),
        head_roll=_squash(curve(8 * deg, 35 * deg), -15 * deg, 15 * deg),
        yaw=0.12 * np.tanh(curve(1.0, 2.0)),
        arm_raise=_squash(arm_base + curve(55 * deg, 150 * deg, (2,)), -25 * deg, 160 * deg),
        elbow=_squash(elbow_base + curve(50 * deg, 150 * deg, (2,)), -40 * deg, 140 * deg),
        leg_spread=_squash(4 * deg + curve(9 * deg, 30 * deg, (2,)), -6 * deg, 30 * deg),
        knee=_squash(15 * deg + curve(18 * deg, 60 * deg, (2,)), 0.0, 60 * deg),
        wrist=_squash(curve(25 * deg, 90 * deg, (2,)), -50 * deg, 50 * deg),
        finger_curl=_squash(0.35 + curve(0.4, 1.5, (2,)), 0.0, 1.0),
        eyes_open=eyes,
        mouth_open=mouth,
    )


def rest_motion(num_frames: int = 1) -> Motion:
    """A neutral stance (arms a little out, eyes open, mouth shut): reference images."""
    deg = np.pi / 180
    zeros, pair = np.zeros(num_frames), lambda v: np.full((num_frames, 2), v)
    return Motion(
        sway=zeros, hop=zeros, lean=zeros, neck_tilt=zeros, head_roll=zeros, yaw=zeros,
        arm_raise=pair(22 * deg), elbow=pair(18 * deg), leg_spread=pair(5 * deg), knee=pair(6 * deg),
        wrist=pair(0.0), finger_curl=pair(0.2), eyes_open=np.ones(num_frames), mouth_open=zeros,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------
# Keypoints
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pose:
    """Exact keypoints of a clip (pixels) and the head's frame, from which the drawing works."""

    body: np.ndarray  # (T, 18, 2) OpenPose order
    feet: np.ndarray  # (T, 6, 2) left big toe, small toe, heel, then right (DWPose order)
    hands: np.ndarray  # (T, 2, 21, 2) [left, right], OpenPose hand order
    face: np.ndarray  # (T, 68, 2) iBUG order
    head_center: np.ndarray  # (T, 2)
    head_angle: np.ndarray  # (T,) rotation of the face frame
    head_unit: float  # half the head height, pixels
    body_height: float  # pixels
    limb_width: int  # pixels (capsule diameter)


def _dir(theta):
    """Unit vector at angle theta from straight down, + towards +x: (..., 2)."""
    return np.stack([np.sin(theta), np.cos(theta)], -1)


def _frame_point(center, angle, local):
    """Points given in a rotated frame (x across, y down) -> image: center (T, 2), angle (T,), local
    (T, N, 2) or (N, 2) -> (T, N, 2)."""
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x, y = local[..., 0], local[..., 1]
    return center[:, None, :] + np.stack([c * x - s * y, s * x + c * y], -1)


def face_layout(eyes_open, mouth_open, yaw) -> np.ndarray:
    """(T, 68, 2) landmarks in the face frame (units of the head unit; centre 0, crown y=-1, chin y=+1)."""
    eyes_open, mouth_open, yaw = (np.asarray(v, np.float64)[:, None] for v in (eyes_open, mouth_open, yaw))
    T = len(eyes_open)
    pts = np.zeros((T, 68, 2))
    phi = np.pi - np.arange(17) * np.pi / 16
    pts[:, :17] = np.stack([0.74 * np.cos(phi), 0.05 + 0.95 * np.sin(phi)], -1)  # jaw, right ear to left
    bx = np.linspace(-0.56, -0.14, 5)
    brow = np.stack([bx, -0.3 - 0.08 * np.sin(np.linspace(0.3, 2.8, 5))], -1)
    pts[:, 17:22] = brow
    pts[:, 22:27] = brow[::-1] * [-1, 1]
    pts[:, 27:31] = np.stack([np.zeros(4), np.linspace(-0.14, 0.35, 4)], -1)  # bridge to tip (30)
    pts[:, 31:36] = np.stack([np.linspace(-0.14, 0.14, 5), [0.4, 0.42, 0.44, 0.42, 0.4]], -1)
    h = 0.11 * eyes_open  # half the eye opening
    for first, cx, outer in ((36, -0.34, -1), (42, 0.34, 1)):
        # right eye: 36 outer corner, 37 38 upper lid, 39 inner; left eye: 42 inner ... 45 outer
        xs = cx + np.array([0.17, 0.06, -0.06, -0.17, -0.06, 0.06]) * outer
        ys = np.stack([0 * h, -h, -h, 0 * h, h, h], 1)[..., 0]
        pts[:, first : first + 6] = np.stack([np.broadcast_to(xs, ys.shape), -0.1 + ys], -1)
    m = 0.16 * mouth_open
    outer_x = np.array([-0.3, -0.2, -0.08, 0.0, 0.08, 0.2, 0.3, 0.2, 0.08, 0.0, -0.08, -0.2])
    outer_y = np.array([0.62, 0.57, 0.54, 0.56, 0.54, 0.57, 0.62, 0.67, 0.7, 0.71, 0.7, 0.67])
    lower = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1], np.float64)
    pts[:, 48:60] = np.stack([np.broadcast_to(outer_x, (T, 12)), outer_y + lower * m], -1)
    inner_x = np.array([-0.22, -0.08, 0.0, 0.08, 0.22, 0.08, 0.0, -0.08])
    inner_y = np.full(8, 0.62)  # shut lips meet
    inner_lower = np.array([0, 0, 0, 0, 0, 1, 1, 1], np.float64)
    pts[:, 60:68] = np.stack([np.broadcast_to(inner_x, (T, 8)), inner_y + inner_lower * m], -1)
    pts[:, 17:, 0] += 0.15 * yaw  # the face turns a little; the jaw outline stays
    return pts


# Canonical right hand, palm to the camera, fingers along +y (local y), thumb towards local -x:
# (along, across) per point in OpenPose order, units of the hand length.
_HAND_ALONG = np.array(
    [0, .18, .32, .45, .56, .45, .64, .76, .86, .47, .67, .8, .91, .45, .63, .75, .84, .41, .56, .66, .74]
)  # fmt: skip
_HAND_ACROSS = np.array(
    [0, -.2, -.34, -.45, -.53, -.17, -.2, -.21, -.22, -.05, -.05, -.05, -.05, .07, .08, .09, .1, .18, .22,
     .25, .27]
)  # fmt: skip
_FINGER_BASE = np.array([0, 0, 1, 2, 3, 0, 5, 6, 7, 0, 9, 10, 11, 0, 13, 14, 15, 0, 17, 18, 19])


def hand_layout(curl) -> np.ndarray:
    """(T, 21, 2) right-hand points (local x across, y along, hand lengths); `curl` (T,) shortens every
    finger beyond its knuckle (a curling hand seen from the palm)."""
    curl = np.asarray(curl, np.float64)[:, None]
    base = np.stack([_HAND_ACROSS, _HAND_ALONG], -1)
    knuckles = np.array([1, 5, 9, 13, 17])
    keep = np.ones(21, bool)
    keep[knuckles] = False
    keep[0] = False
    pts = np.broadcast_to(base, (len(curl), 21, 2)).copy()
    for i in np.flatnonzero(keep):  # parents come first in OpenPose order
        bone = base[i] - base[_FINGER_BASE[i]]
        pts[:, i] = pts[:, _FINGER_BASE[i]] + bone * (1 - 0.6 * curl)
    return pts


def pose_keypoints(identity: Identity, motion: Motion, height: int, width: int) -> Pose:
    """Forward kinematics of the dance on the identity's body, placed on an H x W canvas."""
    T = len(motion.lean)
    B = min(identity.height_fraction * height, 1.15 * width)
    P = {k: v * B for k, v in identity.proportions.items()}
    lean = motion.lean
    up = _dir(np.pi - lean)  # (T, 2)
    across = np.stack([np.cos(lean), np.sin(lean)], -1)
    body = np.zeros((T, 18, 2))
    pelvis = np.zeros((T, 2))
    neck = pelvis + P["torso"] * up
    body[:, 1] = neck
    body[:, 2], body[:, 5] = neck - P["shoulder"] * across, neck + P["shoulder"] * across
    body[:, 8], body[:, 11] = pelvis - P["hip"] * across, pelvis + P["hip"] * across
    for side, (sh, el, wr) in enumerate(((2, 3, 4), (5, 6, 7))):
        sign = -1.0 if side == 0 else 1.0  # the right side is towards -x
        upper = sign * motion.arm_raise[:, side] - lean
        fore = upper - sign * motion.elbow[:, side]
        body[:, el] = body[:, sh] + P["upper_arm"] * _dir(upper)
        body[:, wr] = body[:, el] + P["forearm"] * _dir(fore)
    for side, (hip, kn, an) in enumerate(((8, 9, 10), (11, 12, 13))):
        sign = -1.0 if side == 0 else 1.0
        k = motion.knee[:, side]
        thigh = sign * (motion.leg_spread[:, side] + 0.35 * k) - 0.3 * lean
        shin = sign * (motion.leg_spread[:, side] - 0.35 * k) - 0.3 * lean
        shorten = np.cos(k / 2)[:, None]
        body[:, kn] = body[:, hip] + P["thigh"] * shorten * _dir(thigh)
        body[:, an] = body[:, kn] + P["shin"] * shorten * _dir(shin)
    f = P["foot"]
    # feet seen from the front: toes below the ankle, big toe inwards (DWPose order: left foot first)
    feet_local = np.array([[-0.25, 0.85], [0.45, 0.75], [0.0, 0.45]]) * f  # left foot; x mirrored for right
    feet = np.concatenate(
        [body[:, 13, None] + feet_local, body[:, 10, None] + feet_local * [-1, 1]], axis=1
    )  # (T, 6, 2)

    # head: the nose ends the neck; the face frame is rotated by the neck's and the head's own tilt
    u = P["head"]
    neck_angle = lean + motion.neck_tilt
    nose = neck + P["neck"] * _dir(np.pi - neck_angle)
    head_angle = neck_angle + motion.head_roll
    face_local = face_layout(motion.eyes_open, motion.mouth_open, motion.yaw)
    nose_local = face_local[:, 30] * u  # the OpenPose nose is the nose tip landmark
    c, s = np.cos(head_angle), np.sin(head_angle)
    offset = np.stack(
        [c * nose_local[:, 0] - s * nose_local[:, 1], s * nose_local[:, 0] + c * nose_local[:, 1]], -1
    )
    center = nose - offset
    face = _frame_point(center, head_angle, face_local * u)
    body[:, 0] = face[:, 30]
    body[:, 14], body[:, 15] = face[:, 36:42].mean(1), face[:, 42:48].mean(1)
    ears_local = np.array([[-0.8, 0.0], [0.8, 0.0]]) * u
    body[:, 16:18] = _frame_point(center, head_angle, ears_local)

    hands = np.zeros((T, 2, 21, 2))
    for slot, (el, wr, side) in enumerate(((6, 7, 1), (3, 4, 0))):  # slot 0: left hand
        forearm = body[:, wr] - body[:, el]
        theta = np.arctan2(forearm[:, 0], forearm[:, 1]) + motion.wrist[:, side]  # angle from down
        local = hand_layout(motion.finger_curl[:, side]) * P["hand"]
        if side == 1:  # the left hand is the mirror image
            local = local * [-1, 1]
        hands[:, slot] = _frame_point(body[:, wr], -theta, local)

    # place the pelvis so the lower foot stands on the ground line (minus the hop), sway sideways
    everything = np.concatenate([body, feet, hands.reshape(T, 42, 2), face], 1)
    lowest = feet[..., 1].max(1)
    ground = 0.5 * height + 0.5 * B
    shift = np.stack([0.5 * width + motion.sway * width, ground - lowest - motion.hop * B], -1)[:, None]
    everything = everything + shift
    body, feet = everything[:, :18], everything[:, 18:24]
    hands, face = everything[:, 24:66].reshape(T, 2, 21, 2), everything[:, 66:]
    return Pose(
        body=body, feet=feet, hands=hands, face=face, head_center=center + shift[:, 0],
        head_angle=head_angle, head_unit=float(u), body_height=float(B),
        limb_width=max(3, int(round(P["limb_width"]))),
    )  # fmt: skip
