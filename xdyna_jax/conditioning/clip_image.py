"""CLIP image preprocessing, as transformers' `CLIPImageProcessor()` with its defaults.

X-Dyna (and IP-Adapter) prepare the reference image for the CLIP image encoder with the default processor:
  1. resize so the shorter side is 224, the longer side `int(224 * long / short)` (truncated), PIL bicubic
     on the uint8 image (so the resized pixels are rounded back to uint8);
  2. center crop 224 x 224 (top = (h - 224) // 2, left = (w - 224) // 2);
  3. rescale by 1/255 (in float64, then float32) and normalise with the OpenAI CLIP mean / std.
That is the PIL code path of transformers 4.x (which X-Dyna pins) and of transformers 5's
`CLIPImageProcessorPil`; doing the same PIL calls here reproduces it bit for bit. (transformers 5's
torchvision backend, used when torchvision is installed, resamples slightly differently.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Image.Image | np.ndarray


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # as the processor's do_convert_rgb: drops alpha, expands grey
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(
            f"expected a PIL image or a uint8 (H, W, 3) RGB array, got {a.dtype} array of shape {a.shape}"
        )
    return Image.fromarray(a)


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize to shorter side `size`, keeping the aspect ratio with transformers' rounding (floor)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def preprocess_clip_image(
    images: ImageLike | Sequence[ImageLike],
    *,
    size: int = 224,
    crop_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """One image or a list (PIL, or uint8 HWC RGB arrays of any size) -> float32 (B, crop, crop, 3) NHWC.

    A single image gives B = 1. The result is what CLIPVisionModelWithProjection takes as pixel_values.
    """
    if crop_size > size:
        raise ValueError(f"crop_size {crop_size} larger than the resized shorter side {size}")
    single = isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3)
    batch = [images] if single else list(images)
    if not batch:
        raise ValueError("preprocess_clip_image: no images given")
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    out = []
    for image in batch:
        a = np.asarray(resize_shortest_side(_to_pil(image), size))
        top, left = (a.shape[0] - crop_size) // 2, (a.shape[1] - crop_size) // 2
        a = a[top : top + crop_size, left : left + crop_size]
        # transformers rescales in float64 and casts once, then normalises in float32: same order here.
        a = (a.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append((a - mean32) / std32)
    return np.stack(out)


def uncond_pixel_values(batch: int = 1, crop_size: int = 224) -> np.ndarray:
    """X-Dyna's negative image prompt: an all-zero *normalised* tensor (the mean colour), not zero tokens."""
    return np.zeros((batch, crop_size, crop_size, 3), np.float32)
