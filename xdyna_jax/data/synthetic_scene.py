"""Moving backgrounds of the synthetic world: waves, drifting clouds, falling particles, swaying plants.

Each is a parametric animated layer stack over a vertical gradient, fixed by a seed, rendered for T frames
at any size. All colours are muted: chroma (distance from the grey axis) at most `MAX_BACKGROUND_CHROMA`.
Chroma is a convex function of the colour, so every blend of these colours (gradients, anti-aliased edges,
soft clouds) stays as muted, which keeps every background pixel far from the dancers' saturated limb
colours (`synthetic_character`).
"""

from __future__ import annotations

import cv2
import numpy as np

from xdyna_jax.data.synthetic_character import MAX_BACKGROUND_CHROMA

BACKGROUNDS = ("waves", "clouds", "particles", "plants")
_GREY = np.ones(3) / np.sqrt(3)


def muted(rng: np.random.Generator, lightness: tuple[float, float], hue=None, chroma=None) -> np.ndarray:
    """A random muted colour (float RGB): grey level in `lightness` plus a tint of chroma at most the
    background bound, towards `hue` (an RGB direction) or a random one."""
    direction = rng.normal(size=3) if hue is None else np.asarray(hue, np.float64) + 0.3 * rng.normal(size=3)
    direction = direction - (direction @ _GREY) * _GREY  # orthogonal to grey
    direction /= max(np.linalg.norm(direction), 1e-9)
    c = rng.uniform(0.4, 0.95) * MAX_BACKGROUND_CHROMA if chroma is None else chroma
    grey = rng.uniform(*lightness)
    return grey + c * direction  # grey in [30, 225] and |direction| components <= 0.82 keep it in range


def _gradient(rng, height: int, width: int, top_light, bottom_light, hue=None) -> np.ndarray:
    top, bottom = muted(rng, top_light, hue), muted(rng, bottom_light, hue)
    ramp = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top + (bottom - top) * ramp, (height, width, 3)).astype(np.float32)


def _over(frames: np.ndarray, alpha: np.ndarray, color) -> np.ndarray:
    return frames + alpha[..., None] * (np.asarray(color, np.float32) - frames)


def _waves(rng, t, height: int, width: int) -> np.ndarray:
    sky = _gradient(rng, height, width, (150, 200), (185, 225), hue=(-1, 0, 1))
    frames = np.repeat(sky[None], len(t), 0)
    x = np.arange(width, dtype=np.float32)[None, None, :]
    y = np.arange(height, dtype=np.float32)[None, :, None]
    horizon = rng.uniform(0.45, 0.6) * height
    bands = 4
    for k in range(bands):  # far to near: lower, darker, bigger, faster
        level = horizon + (height - horizon) * k / bands
        amp = (0.01 + 0.012 * k) * height * rng.uniform(0.7, 1.3)
        wavelength = width * rng.uniform(0.35, 0.8) * (1 + 0.3 * k)
        speed = rng.uniform(0.15, 0.4) * (1 + 0.5 * k) * rng.choice([-1, 1])
        phase = rng.uniform(0, 2 * np.pi)
        tt = t[:, None, None]
        crest = level + amp * (
            np.sin(2 * np.pi * (x / wavelength - speed * tt) + phase)
            + 0.4 * np.sin(2 * np.pi * (2.3 * x / wavelength + 1.7 * speed * tt) + 2 * phase)
        )
        color = muted(rng, (150 - 25 * k, 175 - 25 * k), hue=(-1, 0.2, 1))
        frames = _over(frames, np.clip(y - crest + 0.5, 0, 1), color)
    return frames


def _clouds(rng, t, height: int, width: int) -> np.ndarray:
    frames = np.repeat(_gradient(rng, height, width, (120, 170), (175, 215), hue=(-1, 0, 1))[None], len(t), 0)
    x = np.arange(width, dtype=np.float32)[None, None, :]
    y = np.arange(height, dtype=np.float32)[None, :, None]
    # a static line of hills at the bottom under the sky
    hills = height * (
        0.85 + 0.04 * np.sin(2 * np.pi * x[0] / width * rng.uniform(1, 2.5) + rng.uniform(0, 6))
    )
    frames = _over(
        frames,
        np.repeat(np.clip(y[0] - hills + 0.5, 0, 1)[None], len(t), 0),
        muted(rng, (80, 120), hue=(0, 1, -0.5)),
    )
    span = 1.6 * width  # clouds wrap around a loop wider than the frame
    for _ in range(int(rng.integers(3, 6))):
        cx0, cy = rng.uniform(0, span), rng.uniform(0.08, 0.6) * height
        speed = rng.uniform(0.04, 0.12) * width * rng.choice([-1, 1])  # pixels per second
        color = muted(rng, (205, 240), chroma=rng.uniform(0, 8))
        density = np.zeros((len(t), height, width), np.float32)
        for _ in range(int(rng.integers(3, 6))):  # puffs
            dx, dy = rng.uniform(-0.12, 0.12) * width, rng.uniform(-0.04, 0.03) * height
            r = rng.uniform(0.05, 0.11) * width
            cx = (cx0 + dx + speed * t) % span - 0.3 * width
            density += np.exp(-((x - cx[:, None, None]) ** 2 + (y - cy - dy) ** 2) / (2 * r * r))
        frames = _over(frames, np.clip(1.6 * density - 0.35, 0, 0.92), color)
    return frames


def _particles(rng, t, height: int, width: int) -> np.ndarray:
    frames = np.repeat(_gradient(rng, height, width, (35, 70), (70, 110))[None], len(t), 0)
    count = int(rng.integers(25, 45) * (height * width) / (128 * 96)) + 1
    x0, y0 = rng.uniform(0, width, count), rng.uniform(0, height, count)
    fall = rng.uniform(0.1, 0.35, count) * height  # pixels per second
    drift, freq, phase = rng.uniform(1, 4, count), rng.uniform(0.3, 1.0, count), rng.uniform(0, 6, count)
    radius = rng.uniform(0.006, 0.016, count) * max(height, width)
    colors = [muted(rng, (170, 240), chroma=rng.uniform(0, MAX_BACKGROUND_CHROMA)) for _ in range(count)]
    scale = 1 << 4
    for i, ti in enumerate(t):
        ys = (y0 + fall * ti) % (height + 4 * radius) - 2 * radius
        xs = x0 + drift * np.sin(2 * np.pi * freq * ti + phase)
        for j in range(count):  # each disc composited inside its own small box
            pad = radius[j] + 2
            x0, y0 = max(int(xs[j] - pad), 0), max(int(ys[j] - pad), 0)
            x1, y1 = min(int(xs[j] + pad) + 2, width), min(int(ys[j] + pad) + 2, height)
            if x0 >= x1 or y0 >= y1:
                continue
            mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
            centre = (int(round((xs[j] - x0) * scale)), int(round((ys[j] - y0) * scale)))
            cv2.circle(mask, centre, int(round(radius[j] * scale)), 255, -1, cv2.LINE_AA, 4)
            box = frames[i, y0:y1, x0:x1]
            box[...] = _over(box, mask.astype(np.float32) / 255, colors[j])
    return frames


def _plants(rng, t, height: int, width: int) -> np.ndarray:
    frames = np.repeat(
        _gradient(rng, height, width, (150, 200), (120, 160), hue=(1, 0.6, -1))[None], len(t), 0
    )
    ground = rng.uniform(0.82, 0.9) * height
    y = np.arange(height, dtype=np.float32)[:, None]
    floor = np.broadcast_to(np.clip(y - ground + 0.5, 0, 1), (height, width))
    frames = _over(frames, np.repeat(floor[None], len(t), 0), muted(rng, (70, 100), hue=(1, 0.5, -1)))
    scale = 1 << 4
    for _ in range(int(rng.integers(4, 8))):
        base_x = rng.uniform(0, width)
        segments = int(rng.integers(5, 9))
        seg_len = rng.uniform(0.05, 0.09) * height
        lean, amp = rng.uniform(-0.25, 0.25), rng.uniform(0.04, 0.12)
        freq, phase = rng.uniform(0.3, 0.8), rng.uniform(0, 2 * np.pi)
        thickness = max(1, int(round(0.012 * height)))
        leaf = rng.uniform(0.025, 0.045) * height
        color = muted(rng, (60, 110), hue=(-0.5, 1, -0.5))
        for i, ti in enumerate(t):
            sway = amp * np.sin(2 * np.pi * freq * ti + phase)
            angles = np.cumsum(np.full(segments, lean / segments) + sway * np.linspace(0.2, 1.5, segments))
            steps = np.stack([np.sin(angles), -np.cos(angles)], -1) * seg_len
            base = np.array([base_x, ground + 2])
            pts = np.concatenate([base[None], base + np.cumsum(steps, 0)])
            mask = np.zeros((height, width), np.uint8)
            fixed = np.round(pts * scale).astype(np.int32)
            cv2.polylines(mask, [fixed], False, 255, thickness, cv2.LINE_AA, 4)
            for k in range(1, segments, 2):  # leaves on alternate sides
                side = 1 if k % 4 == 1 else -1
                angle = np.degrees(angles[k]) + 90 + side * 50
                centre = tuple(
                    int(v)
                    for v in np.round(
                        (
                            pts[k]
                            + 0.6 * leaf * np.array([np.cos(np.radians(angle)), np.sin(np.radians(angle))])
                        )
                        * scale
                    )
                )
                axes = (int(round(leaf * scale)), int(round(0.35 * leaf * scale)))
                cv2.ellipse(mask, centre, axes, angle, 0, 360, 255, -1, cv2.LINE_AA, 4)
            frames[i] = _over(frames[i], mask.astype(np.float32) / 255, color)
    return frames


_RENDERERS = {"waves": _waves, "clouds": _clouds, "particles": _particles, "plants": _plants}


def render_background(
    kind: str, seed: int, num_frames: int, height: int, width: int, fps: float
) -> np.ndarray:
    """float32 (T, H, W, 3) RGB in [0, 255]: background `kind` (one of BACKGROUNDS), animated at `fps`,
    the same for the same seed."""
    if kind not in _RENDERERS:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got {kind!r}")
    rng = np.random.default_rng([0xB6, BACKGROUNDS.index(kind), int(seed)])
    t = np.arange(num_frames, dtype=np.float32) / np.float32(fps)
    return np.clip(_RENDERERS[kind](rng, t, height, width), 0, 255).astype(np.float32)


def pick_background(seed: int, *, scene: bool = False) -> str:
    """The background a character clip (or, with `scene`, a scene-only clip) gets when none is asked for."""
    return BACKGROUNDS[int(np.random.default_rng([0xB7, int(scene), int(seed)]).integers(len(BACKGROUNDS)))]
