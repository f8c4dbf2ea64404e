"""Frame bookkeeping and image preprocessing of the DynamiCtrl pipeline.

The CogVideoX VAE turns 1 + 4k pixel frames into 1 + k latent frames, and the 1.5 transformer patches
latent frames in pairs. The release handles neither constraint for every frame count: it pads the noise to an
even latent count but not the pose latents (an odd count fails in the transformer), and it returns 4 F'
decoded frames for an even F' and leaves trimming to its script. Here every count works:

1. the pose frames are padded to the next 1 + 4k count by repeating the last one (`pad_frames`);
2. their F' latent frames are padded to a multiple of patch_size_t: the pose latents by repeating their last
   frame, the image latents with zeros, the noise by drawing that many frames (`pad_latent_frames`);
3. after denoising the padded latent frames are dropped, the F' others decoded (4 F' - 3 frames for an odd
   F', 4 F' for an even one) and the video trimmed to the requested count.
`FramePlan` holds every one of these counts.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from PIL import Image

from xdyna_jax.models.vae_cogvideox import CogVideoXVAEConfig


@dataclasses.dataclass(frozen=True)
class FramePlan:
    """The frame counts of one video, from the requested count to what the VAE and transformer see."""

    num_frames: int  # frames returned
    pixel_frames: int  # pose frames encoded: the next 1 + 4k >= num_frames (the last pose repeated)
    latent_frames: int  # F': latent frames the VAE makes of them (and decodes at the end)
    padded_latent_frames: int  # F' rounded up to the transformer's patch_size_t (what is denoised)
    decoded_frames: int  # frames the VAE decodes from F' latent frames (>= num_frames, then trimmed)

    @classmethod
    def for_count(cls, num_frames: int, vae: CogVideoXVAEConfig, patch_size_t: int | None) -> FramePlan:
        if not isinstance(num_frames, int | np.integer) or isinstance(num_frames, bool) or num_frames < 1:
            raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
        ratio = vae.temporal_compression_ratio
        pixel_frames = 1 + ratio * -(-(int(num_frames) - 1) // ratio)
        latent_frames = vae.encoded_num_frames(pixel_frames)
        pt = patch_size_t or 1
        plan = cls(
            num_frames=int(num_frames),
            pixel_frames=pixel_frames,
            latent_frames=latent_frames,
            padded_latent_frames=pt * -(-latent_frames // pt),
            decoded_frames=vae.decoded_num_frames(latent_frames),
        )
        if plan.decoded_frames < plan.num_frames:  # cannot happen with CogVideoX's chunking; say so if it did
            raise ValueError(f"{plan}: the VAE would decode fewer frames than requested")
        return plan


def pad_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """frames (N, ...) -> (count, ...): the last frame repeated (count >= N)."""
    if count < len(frames):
        raise ValueError(f"cannot pad {len(frames)} frames to {count}")
    return np.concatenate([frames, np.repeat(frames[-1:], count - len(frames), axis=0)])


def pad_latent_frames(latents: jnp.ndarray, count: int, *, repeat_last: bool) -> jnp.ndarray:
    """latents (B, F', h, w, C) -> (B, count, h, w, C): the last latent frame repeated, or zeros after it."""
    extra = count - latents.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {latents.shape[1]} latent frames to {count}")
    if extra == 0:
        return latents
    tail = latents[:, -1:] if repeat_last else jnp.zeros_like(latents[:, -1:])
    return jnp.concatenate([latents, jnp.repeat(tail, extra, axis=1)], axis=1)


def masked_reference(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The reference with every pixel where mask is 0 / False set to black (the Mask variants' input)."""
    if mask is None:
        return image
    return np.where(np.asarray(mask)[..., None] != 0, image, np.zeros_like(image))


def resize_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H0, W0, 3) -> uint8 (height, width, 3): PIL's Lanczos resize of the whole image, no crop (how
    diffusers' image processor resizes the release's PIL reference)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=Image.LANCZOS))


def signed_pixels(frames: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (x / 255, then normalised with mean and std 0.5)."""
    return (np.asarray(frames, np.float32) / 255.0 - 0.5) / 0.5


def uint8_frames(video: np.ndarray) -> np.ndarray:
    """Decoded frames in about [-1, 1] -> uint8, as diffusers' video postprocessing rounds them."""
    unit = np.clip(np.asarray(video, np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.round(unit * 255).astype(np.uint8)
