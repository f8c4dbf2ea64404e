"""Background motion: how much the scene behind the character moves, generated vs ground truth.

Between each pair of consecutive frames, dense optical flow (OpenCV's Farnebäck method on the grey frames,
the settings below) gives every pixel a displacement in pixels. The flow energy is the mean squared
displacement magnitude over the background: the pixels outside the character's mask in both frames (the
mask grows the skeleton capsules of the driving keypoints by a margin, `regions.character_mask`). The
score compares the generated video's energy with the target's: a model that freezes a moving scene has a
ratio near 0, one that makes a still scene swim a ratio above 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import cv2
import numpy as np

from xdyna_jax.conditioning.pose import PoseFrame
from xdyna_jax.eval.regions import character_mask

# Farnebäck settings (OpenCV's documented example values): pyramid scale, levels, window, iterations,
# polynomial neighbourhood and its Gaussian sigma.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
# Below this energy (an RMS displacement of about 0.03 pixels) a background is still: video compression
# alone moves that much, so a ratio against it would be noise and is not reported.
STILL_ENERGY = 1e-3


def default_limb_width(height: int, width: int) -> float:
    """A limb width for the mask when no palette gives one: 3% of the shorter side, at least 3 pixels."""
    return max(3.0, 0.03 * min(height, width))


def flow_energy(frames: np.ndarray, background: np.ndarray | None = None) -> float:
    """Mean squared Farnebäck flow magnitude (pixels^2 per pixel) of uint8 (T, H, W, 3) frames over the
    pixels where `background` (T, H, W) bool is true in both frames of a pair (everywhere when None). NaN
    when no pixel counts."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 2:
        raise ValueError(f"flow_energy needs uint8 (T >= 2, H, W, 3) frames, got shape {frames.shape}")
    if background is not None and background.shape != frames.shape[:3]:
        raise ValueError(f"background mask {background.shape} does not match frames {frames.shape[:3]}")
    grey = [cv2.cvtColor(np.ascontiguousarray(f, np.uint8), cv2.COLOR_RGB2GRAY) for f in frames]
    total, count = 0.0, 0
    for t in range(len(frames) - 1):
        flow = cv2.calcOpticalFlowFarneback(grey[t], grey[t + 1], None, **FARNEBACK)
        energy = flow[..., 0].astype(np.float64) ** 2 + flow[..., 1].astype(np.float64) ** 2
        if background is None:
            total, count = total + energy.sum(), count + energy.size
        else:
            pair = background[t] & background[t + 1]
            total, count = total + energy[pair].sum(), count + int(pair.sum())
    return total / count if count else math.nan


def background_masks(
    poses: Sequence[PoseFrame], height: int, width: int, *, limb_width: float, margin: float | None = None
) -> np.ndarray:
    """(T, H, W) bool: outside the character in each frame; margin defaults to one limb width."""
    margin = limb_width if margin is None else margin
    return np.stack([~character_mask(p, height, width, limb_width=limb_width, margin=margin) for p in poses])


@dataclasses.dataclass(frozen=True)
class BackgroundMotion:
    """Flow energies (pixels^2) outside the character. ratio: generated / target (NaN when the target's
    background is still, energy below STILL_ENERGY); difference: generated - target; background_share:
    the share of pixel pairs counted."""

    generated_energy: float
    target_energy: float
    ratio: float
    difference: float
    background_share: float


def background_motion(
    generated: np.ndarray,
    target: np.ndarray,
    poses: Sequence[PoseFrame],
    *,
    limb_width: float | None = None,
    margin: float | None = None,
) -> BackgroundMotion:
    """Compare the background flow energy of generated and target uint8 (T, H, W, 3) videos, both masked by
    the character of the driving keypoints (one PoseFrame per frame, frame pixels)."""
    generated, target = np.asarray(generated), np.asarray(target)
    if generated.shape != target.shape or len(poses) != len(generated):
        raise ValueError(
            f"background_motion: generated {generated.shape}, target {target.shape}, {len(poses)} poses"
        )
    height, width = generated.shape[1:3]
    limb_width = default_limb_width(height, width) if limb_width is None else limb_width
    background = background_masks(poses, height, width, limb_width=limb_width, margin=margin)
    gen = flow_energy(generated, background)
    tgt = flow_energy(target, background)
    share = float((background[1:] & background[:-1]).mean())
    return BackgroundMotion(
        generated_energy=gen,
        target_energy=tgt,
        ratio=gen / tgt if tgt >= STILL_ENERGY else math.nan,
        difference=gen - tgt,
        background_share=share,
    )
