"""Identity error: whether the generated character wears the reference identity's colours where its limbs
and clothes should be.

Colour distance is CIELAB ΔE*ab (CIE 1976: Euclidean distance in L*a*b*), so one unit is about one
just-noticeable difference whatever the hue; pass space="rgb" for plain Euclidean distance on 0-255 RGB
instead. The pixels are taken as sRGB with a D65 white and converted in float64 by the standard formulas
(OpenCV's float conversion rounds a* and b* to 1/64 and is ~0.1 off in L*, too coarse for small ΔE).

- Limbs: for each frame and each limb whose two joints are visible, the region where that limb should be:
  its capsule round the driving segment, as wide as the palette's width for it, without the pixels of the other limbs' capsules
  (where limbs overlap, which one shows depends on drawing order). The region's mean colour in the
  generated frame is compared with the limb's palette colour. Averaged over every (frame, limb) region.
- Clothing: the torso quadrilateral (shoulders and hips, all four visible) without the limb capsules. A
  pattern mixes several clothing colours, so each pixel is compared with the nearest clothing colour;
  averaged over the region's pixels, then over frames.
- Overall: the mean of the limb and clothing errors (whichever exist).

With `seen_in` (the ground-truth frames), each region keeps only the pixels where the ground truth shows
that part: within the palette's tolerance of the limb's colour, or of a clothing colour. So a limb hidden
behind an arm, or the face drawn over the head limbs, does not count as the wrong colour, and the ground
truth itself scores near 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from xdyna_jax.conditioning.pose import LIMBS, PoseFrame
from xdyna_jax.eval.palette import Palette
from xdyna_jax.eval.regions import color_match, limb_capsules, torso_mask

SPACES = ("lab", "rgb")


# sRGB primaries -> CIE XYZ (IEC 61966-2-1), and the D65 white point the Lab coordinates are relative to
SRGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
D65_WHITE = np.array([0.95047, 1.0, 1.08883])
_LAB_EPSILON, _LAB_KAPPA = 216 / 24389, 24389 / 27  # the CIE's exact constants for the cube-root knee


def srgb_to_lab(rgb) -> np.ndarray:
    """(..., 3) sRGB on 0-255 -> float64 CIE L*a*b* (L* in 0-100) for a D65 white."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)  # undo the sRGB curve
    t = (linear @ SRGB_TO_XYZ.T) / D65_WHITE
    f = np.where(t > _LAB_EPSILON, np.cbrt(t), (_LAB_KAPPA * t + 16) / 116)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], -1)


def to_space(rgb, space: str = "lab") -> np.ndarray:
    """(..., 3) RGB on 0-255 -> float64 coordinates of `space`: L*a*b* or the RGB itself."""
    if space == "rgb":
        return np.asarray(rgb, np.float64)
    if space != "lab":
        raise ValueError(f"colour space must be one of {SPACES}, got {space!r}")
    return srgb_to_lab(rgb)


def color_distance(a, b, space: str = "lab") -> np.ndarray:
    """Distance between RGB colours (0-255, broadcasting (..., 3)): ΔE*ab for "lab", Euclidean for "rgb"."""
    return np.linalg.norm(to_space(a, space) - to_space(b, space), axis=-1)


@dataclasses.dataclass(frozen=True)
class IdentityError:
    """Identity error of one video (units of `space`: ΔE*ab, or 0-255 RGB distance).

    limbs: mean over `limb_regions` (frame, limb) regions; clothing: mean over `clothing_frames` frames;
    overall: mean of the two that exist (NaN when neither); per_limb: each limb's mean (NaN if never seen);
    seen_in_reference: whether regions were cut to where the ground truth shows each part.
    """

    space: str
    limbs: float
    limb_regions: int
    clothing: float
    clothing_frames: int
    overall: float
    per_limb: tuple[float, ...]
    seen_in_reference: bool


def identity_error(
    frames: np.ndarray,
    poses: Sequence[PoseFrame],
    palette: Palette,
    *,
    space: str = "lab",
    min_score: float = 0.3,
    seen_in: np.ndarray | None = None,
) -> IdentityError:
    """Colour distance of each limb region and the clothing region of uint8 (T, H, W, 3) frames to the
    palette, the regions placed by the driving keypoints (one PoseFrame per frame, frame pixels) and,
    with `seen_in` (ground-truth frames of the same shape), cut to where the ground truth shows each part."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or len(frames) != len(poses):
        raise ValueError(f"identity_error: {len(poses)} poses for frames of shape {frames.shape}")
    if seen_in is not None and np.shape(seen_in) != frames.shape:
        raise ValueError(f"identity_error: seen_in {np.shape(seen_in)} does not match frames {frames.shape}")
    if space not in SPACES:
        raise ValueError(f"colour space must be one of {SPACES}, got {space!r}")
    height, width = frames.shape[1:3]
    drawn = [i for i, c in enumerate(palette.limbs) if c is not None]
    clothing_colors = to_space(np.array(palette.clothing, np.float64).reshape(-1, 3), space)
    per_limb: list[list[float]] = [[] for _ in LIMBS]
    clothing: list[float] = []
    for t, (frame, pose) in enumerate(zip(frames, poses, strict=True)):
        capsules = limb_capsules(pose, height, width, palette.limb_widths, drawn, min_score)
        coverage = np.zeros((height, width), np.int32)
        for capsule in capsules.values():
            coverage += capsule
        for limb, capsule in capsules.items():
            own = capsule & (coverage == 1)  # no other limb's capsule reaches these pixels
            if seen_in is not None:
                own &= color_match(seen_in[t], palette.limbs[limb], palette.tolerance)
            if own.any():
                mean = frame[own].astype(np.float64).mean(0)
                per_limb[limb].append(float(color_distance(mean, palette.limbs[limb], space)))
        torso = torso_mask(pose, height, width, min_score)
        if torso is None or not len(clothing_colors):
            continue
        cloth = torso & (coverage == 0)
        if seen_in is not None:
            cloth &= np.any([color_match(seen_in[t], c, palette.tolerance) for c in palette.clothing], axis=0)
        if cloth.any():
            pixels = to_space(frame[cloth], space)
            nearest = np.linalg.norm(pixels[:, None] - clothing_colors[None], axis=-1).min(1)
            clothing.append(float(nearest.mean()))
    regions = [d for limb in per_limb for d in limb]
    limbs = float(np.mean(regions)) if regions else math.nan
    clothes = float(np.mean(clothing)) if clothing else math.nan
    parts = [v for v in (limbs, clothes) if not math.isnan(v)]
    return IdentityError(
        space=space,
        limbs=limbs,
        limb_regions=len(regions),
        clothing=clothes,
        clothing_frames=len(clothing),
        overall=float(np.mean(parts)) if parts else math.nan,
        per_limb=tuple(float(np.mean(v)) if v else math.nan for v in per_limb),
        seen_in_reference=seen_in is not None,
    )
