"""S-Face conditions: 68-point face landmarks -> local (eyes + mouth) and global (face box) RGB maps.

Follows the official release (bytedance/X-Dyna, ``inference_xdyna.py``,
``extract_local_feature_from_single_img`` and ``animatediff/data/nms.py`` ``compute_increased_bbox``):

- global map: the driving frame's own RGB pixels inside an expanded face box, black elsewhere. The box is the
  landmark bounding box, centre ± (1.35, 1.25, 1.35, 1.45) * max(w, h) for left/top/right/bottom, each
  truncated with ``int()``, then clipped to the frame.
- local map: the frame's RGB pixels inside three rectangles, black elsewhere. Centres (x, y) =
  ``round(mean(lmk[43:48]))``, ``round(mean(lmk[37:42]))`` (eyes) and ``round(mean(lmk[49:68]))`` (mouth)
  -- 0-based Python slices, so each skips the first point of its part (42, 36, 48), exactly as released.
  Half-sizes (box_w // 8, box_h // 8) (the release writes ``int(box_w / 512 * 64)``); rectangle =
  rows [cy - hy, cy + hy), columns [cx - hx, cx + hx).
- Both maps keep the full frame geometry (no crop). The ControlNet input is concat[local, global] on channels,
  each min-max normalised over the whole video (``normalize_frames``).

Deliberate differences from the release, all for frames the release mishandles:
- No face in a frame: we reuse the last good box and landmarks on the current frame's pixels. The release
  means to do the same, but never stores the new box (``last_bbox`` stays [0, 0, 0, 0]), so its maps go black.
  Before the first face is seen the maps are black (nothing to reuse).
- Rectangles and boxes are clipped to the frame. The release slices with possibly negative starts, which
  NumPy wraps around, so a rectangle touching the top/left border disappears there.
- ``sticky_box=True`` turns on the box stabilisation the release wrote but never reaches (same
  ``last_bbox`` bug): keep the previous box while the new landmark bounding box lies inside it.
- A constant video (e.g. no face anywhere) normalises to zeros; the release divides 0 by 0 (NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Expansion of the landmark bbox as multiples of max(w, h), measured from its centre (release values).
BOX_EXPAND = (1.35, 1.25, 1.35, 1.45)  # left, top, right, bottom
# Landmark slices exactly as released (0-based; see the module docstring).
LEFT_EYE = slice(43, 48)
RIGHT_EYE = slice(37, 42)
MOUTH = slice(49, 68)

Box = tuple[int, int, int, int]


def _check_landmarks(landmarks) -> np.ndarray:
    lmk = np.asarray(landmarks, dtype=np.float64)
    if lmk.shape != (68, 2):
        raise ValueError(f"face landmarks must have shape (68, 2) (x, y), got {lmk.shape}")
    return lmk


def _check_frame(frame) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"frame must be an (H, W, 3) RGB image, got shape {frame.shape}")
    return frame


def face_box(landmarks, frame_hw: tuple[int, int]) -> Box:
    """Expanded face box ``(x0, y0, x1, y1)`` (half-open pixel ranges) clipped to a frame of size ``(H, W)``.

    Arithmetic in float64; the release gets float32 landmarks from face_alignment, so a coordinate sitting
    exactly on an integer boundary may truncate one pixel differently there.
    """
    lmk = _check_landmarks(landmarks)
    (x_min, y_min), (x_max, y_max) = lmk.min(axis=0), lmk.max(axis=0)
    cx, cy = (x_min + x_max) * 0.5, (y_min + y_max) * 0.5
    length = max(x_max - x_min, y_max - y_min)
    f_left, f_top, f_right, f_bot = BOX_EXPAND
    # int() truncates toward zero, as in the release; clipping then makes the sign irrelevant.
    x0, y0 = int(cx - f_left * length), int(cy - f_top * length)
    x1, y1 = int(cx + f_right * length), int(cy + f_bot * length)
    h, w = frame_hw
    # The release clips only x0, y0 from below and x1, y1 from above; clipping all four also keeps a box
    # that lies partly off-frame a valid (possibly empty) slice.
    return (min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h))


def global_face_map(frame_rgb, box: Box) -> np.ndarray:
    """The frame's pixels inside ``box``, black elsewhere (same shape and dtype as the frame)."""
    frame = _check_frame(frame_rgb)
    x0, y0, x1, y1 = box
    out = np.zeros_like(frame)
    out[y0:y1, x0:x1] = frame[y0:y1, x0:x1]
    return out


def part_centers(landmarks) -> np.ndarray:
    """Integer (x, y) centres of (left eye, right eye, mouth), shape (3, 2), rounded half-to-even as np.round."""
    lmk = _check_landmarks(landmarks)
    parts = (LEFT_EYE, RIGHT_EYE, MOUTH)
    return np.stack([np.round(lmk[p].mean(axis=0)) for p in parts]).astype(np.int64)


def local_rects(landmarks, box: Box, frame_hw: tuple[int, int]) -> list[Box]:
    """The three local rectangles ``(x0, y0, x1, y1)`` (eyes, mouth), clipped to the frame."""
    x0, y0, x1, y1 = box
    half_x, half_y = (x1 - x0) // 8, (y1 - y0) // 8
    h, w = frame_hw
    rects = []
    for cx, cy in part_centers(landmarks):
        rects.append(
            (
                int(np.clip(cx - half_x, 0, w)),
                int(np.clip(cy - half_y, 0, h)),
                int(np.clip(cx + half_x, 0, w)),
                int(np.clip(cy + half_y, 0, h)),
            )
        )
    return rects


def local_face_map(frame_rgb, landmarks, box: Box) -> np.ndarray:
    """The frame's pixels inside the two eye and the mouth rectangles, black elsewhere."""
    frame = _check_frame(frame_rgb)
    out = np.zeros_like(frame)
    for x0, y0, x1, y1 in local_rects(landmarks, box, frame.shape[:2]):
        out[y0:y1, x0:x1] = frame[y0:y1, x0:x1]
    return out


def _inside(landmarks: np.ndarray, box: Box) -> bool:
    """Release test for reusing a box: the raw landmark bbox lies inside it."""
    (x_min, y_min), (x_max, y_max) = landmarks.min(axis=0), landmarks.max(axis=0)
    x0, y0, x1, y1 = box
    return bool(x_min >= x0 and y_min >= y0 and x_max <= x1 and y_max <= y1)


def sface_maps(
    frames: Sequence[np.ndarray],
    landmarks: Sequence[np.ndarray | None],
    *,
    sticky_box: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Local and global S-Face maps for a video: ``(local (T,H,W,3), global (T,H,W,3))``, frame dtype.

    ``landmarks[t]`` is the (68, 2) array for frame t, or None when no face was found there. A frame without
    a face reuses the last good box and landmarks (applied to its own pixels); frames before the first face
    are black. ``sticky_box`` keeps the previous box while the face stays inside it (see module docstring).
    """
    if len(frames) != len(landmarks):
        raise ValueError(f"got {len(frames)} frames but {len(landmarks)} landmark entries")
    if len(frames) == 0:
        raise ValueError("sface_maps needs at least one frame")
    first = _check_frame(frames[0])
    local = np.zeros((len(frames), *first.shape), first.dtype)
    glob = np.zeros_like(local)
    box: Box | None = None
    last_lmk: np.ndarray | None = None
    for t, (frame, lmk) in enumerate(zip(frames, landmarks, strict=True)):
        frame = _check_frame(frame)
        if frame.shape != first.shape:
            raise ValueError(f"frame {t} has shape {frame.shape}, frame 0 has {first.shape}")
        if lmk is not None:
            lmk = _check_landmarks(lmk)
            if not (sticky_box and box is not None and _inside(lmk, box)):
                box = face_box(lmk, frame.shape[:2])
            last_lmk = lmk
        if box is None:  # no face seen yet: leave the frame black
            continue
        glob[t] = global_face_map(frame, box)
        local[t] = local_face_map(frame, last_lmk, box)
    return local, glob


def normalize_frames(x) -> np.ndarray:
    """Release normalisation of one condition video (T, H, W, C) -> float32 in [0, 1].

    VaeImageProcessor.preprocess (uint8 / 255 -> 2x - 1; float input is taken to be in [0, 1] already, as
    diffusers does), then min-max over the whole video tensor (``prepare_condition``). Min-max cancels any
    positive affine scaling, so a float video in [0, 255] gives the same result up to rounding. A constant
    video (e.g. all black) returns zeros instead of the release's 0/0 NaNs.
    """
    x = np.asarray(x)
    if x.ndim != 4 or x.size == 0:
        raise ValueError(f"expected a non-empty (T, H, W, C) video, got shape {x.shape}")
    x = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x.astype(np.float32)
    x = np.float32(2.0) * x - np.float32(1.0)
    lo, hi = x.min(), x.max()
    if hi == lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def face_condition(local, global_) -> np.ndarray:
    """The 6-channel S-Face ControlNet input, concat[local, global] on the last axis (release order)."""
    local, global_ = np.asarray(local), np.asarray(global_)
    if local.shape != global_.shape:
        raise ValueError(f"local maps {local.shape} and global maps {global_.shape} differ in shape")
    return np.concatenate([local, global_], axis=-1)
