"""Frame-by-frame image metrics between a generated video and its target: L1, PSNR and SSIM.

All three take uint8 (or float) pixels on the 0-255 scale, as one image (H, W, C) / (H, W) or a video
(T, H, W, C), and compute in float64. Videos are scored frame by frame and the per-frame values averaged
with equal weight. The two inputs must have the same shape; nothing is resized.
"""

from __future__ import annotations

import cv2
import numpy as np

DATA_RANGE = 255.0

# Wang, Bovik, Sheikh & Simoncelli (2004), "Image quality assessment: from error visibility to structural
# similarity": an 11 x 11 circular-symmetric Gaussian window of standard deviation 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_frames(generated, target) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as float64 (T, H, W, C) arrays of the same shape."""
    generated = np.asarray(generated)
    target = np.asarray(target)
    if generated.shape != target.shape:
        raise ValueError(f"generated {generated.shape} and target {target.shape} must have the same shape")
    if generated.ndim == 2:  # one grey image
        generated, target = generated[None, ..., None], target[None, ..., None]
    elif generated.ndim == 3:  # one (H, W, C) image
        generated, target = generated[None], target[None]
    elif generated.ndim != 4:
        raise ValueError(f"expected (H, W), (H, W, C) or (T, H, W, C) pixels, got shape {generated.shape}")
    if generated.size == 0:
        raise ValueError(f"empty input, shape {generated.shape}")
    return generated.astype(np.float64), target.astype(np.float64)


def l1_error(generated, target) -> float:
    """Mean absolute difference on the 0-255 scale (not [0, 1]): the mean over every pixel and channel of
    |generated - target|, computed in float64. 0 means identical; a uniform offset of d gives d."""
    generated, target = _as_frames(generated, target)
    return float(np.mean(np.abs(generated - target)))


def psnr_per_frame(generated, target, *, data_range: float = DATA_RANGE) -> np.ndarray:
    """(T,) peak signal-to-noise ratio of each frame in dB: 10 log10(data_range^2 / MSE), the MSE taken over
    the frame's pixels and channels in float64 on 0-255 values. A frame equal to its target has MSE 0 and
    PSNR +inf.

    This is the float computation. Some papers report a PSNR from uint8 arrays subtracted without a cast,
    where differences wrap modulo 256 and the numbers are not comparable with these.
    """
    generated, target = _as_frames(generated, target)
    mse = np.mean((generated - target) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def psnr(generated, target, *, data_range: float = DATA_RANGE) -> float:
    """The mean over frames of `psnr_per_frame` (dB; float64 on 0-255 values, not the uint8-wrapping
    variant). +inf when any frame equals its target exactly."""
    return float(np.mean(psnr_per_frame(generated, target, data_range=data_range)))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """(size,) 1-D Gaussian exp(-x^2 / (2 sigma^2)) over the integer offsets around the centre, summing to 1.
    Its outer product with itself is the normalised 2-D window (the 2-D Gaussian separates)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    window = np.exp(-(offsets**2) / (2 * sigma**2))
    return window / window.sum()


def _window_mean(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """The Gaussian-weighted mean of every full window inside `image` (H, W) -> (H - n + 1, W - n + 1): the
    "valid" part only, so no border padding enters the statistics."""
    filtered = cv2.sepFilter2D(image, cv2.CV_64F, window, window, borderType=cv2.BORDER_REFLECT)
    margin = (len(window) - 1) // 2
    return filtered[margin : image.shape[0] - margin, margin : image.shape[1] - margin]


def ssim_map(x: np.ndarray, y: np.ndarray, *, data_range: float = DATA_RANGE) -> np.ndarray:
    """The SSIM index of every 11 x 11 window of two single-channel (H, W) images -> (H - 10, W - 10).

    With Gaussian-weighted local means mu, variances sigma^2 and covariance sigma_xy (weights summing to 1,
    no N / (N - 1) correction), C1 = (K1 L)^2 and C2 = (K2 L)^2 for the data range L:
        SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"ssim_map takes two (H, W) images of one shape, got {x.shape} and {y.shape}")
    if min(x.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, got {x.shape}")
    window = gaussian_window()
    mu_x, mu_y = _window_mean(x, window), _window_mean(y, window)
    var_x = _window_mean(x * x, window) - mu_x**2
    var_y = _window_mean(y * y, window) - mu_y**2
    cov_xy = _window_mean(x * y, window) - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim_per_frame(generated, target, *, data_range: float = DATA_RANGE) -> np.ndarray:
    """(T,) SSIM of each frame: the mean of `ssim_map` over the window positions, per colour channel, then
    averaged over the channels. 1 for identical frames.

    This is the single-scale index of Wang et al. as their reference implementation computes it (valid
    windows only, no automatic downsampling of large images), on the 0-255 data range.
    """
    generated, target = _as_frames(generated, target)
    return np.array(
        [
            np.mean(
                [ssim_map(g[..., c], t[..., c], data_range=data_range).mean() for c in range(g.shape[-1])]
            )
            for g, t in zip(generated, target, strict=True)
        ]
    )


def ssim(generated, target, *, data_range: float = DATA_RANGE) -> float:
    """The mean over frames of `ssim_per_frame` (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, 0-255)."""
    return float(np.mean(ssim_per_frame(generated, target, data_range=data_range)))
