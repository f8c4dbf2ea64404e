"""Context windows for videos longer than one window: which driven frames each UNet call sees.

X-Dyna's release denoises a long video in overlapping windows of `window` driven frames (16), consecutive
window starts `window - overlap` (12) apart, the last window wrapping around to the first frames (a closed
loop, so every frame sees as many neighbours as any other). Each denoising step shifts every window by
one random `offset` in [0, window); a frame's prediction is the mean over the windows that contain it.
A video of at most `window` frames is one window of all its frames, and the offset does not apply.

Indices count driven frames (0 = the first driven frame); the reference frame, which joins every window
at position 0 of the UNet input, is not part of a window.
"""

from __future__ import annotations

import numpy as np


def window_length(num_frames: int, window: int = 16) -> int:
    """How many driven frames one window holds: the whole video when it is short enough."""
    return min(num_frames, window)


def num_windows(num_frames: int, window: int = 16, overlap: int = 4) -> int:
    """Windows per step: 1 for a short video, else one per start 0, window-overlap, ... below num_frames."""
    _check(num_frames, window, overlap)
    if num_frames <= window:
        return 1
    return -(-num_frames // (window - overlap))


def context_windows(num_frames: int, *, window: int = 16, overlap: int = 4, offset: int = 0) -> np.ndarray:
    """(num_windows, window_length) int32 frame indices of one denoising step, shifted by `offset`."""
    _check(num_frames, window, overlap)
    if num_frames <= window:
        return np.arange(num_frames, dtype=np.int32)[None]
    if not 0 <= offset < window:
        raise ValueError(f"offset must be in [0, {window}), got {offset}")
    starts = np.arange(0, num_frames, window - overlap)
    return ((starts[:, None] + np.arange(window)[None] + offset) % num_frames).astype(np.int32)


def frame_counts(windows: np.ndarray, num_frames: int) -> np.ndarray:
    """(num_frames,) how many windows contain each frame: the divisor of the per-frame mean."""
    return np.bincount(np.asarray(windows).reshape(-1), minlength=num_frames).astype(np.int32)


def _check(num_frames: int, window: int, overlap: int) -> None:
    if num_frames < 1:
        raise ValueError(f"a video needs at least 1 driven frame, got {num_frames}")
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(
            f"need window >= 1 and 0 <= overlap < window, got window={window}, overlap={overlap}"
        )
