"""`XDynaPipeline`: a reference photo + driving pose (and face) images -> the animated frames.

What one call does, in the release's order:
1. the reference is centre-cropped to the output aspect and resized with OpenCV (bilinear, uint8), then
   VAE-encoded (a posterior sample); the CLIP image embedding is taken from the *uncropped* photo;
2. the empty prompt is encoded once per pipeline (its text encoder is then released); the IP-Adapter tokens of the photo form the conditional half of CFG,
   those of an all-zero normalised image the unconditional half;
3. the initial latents repeat the reference latent, Bernoulli-mixed with a blurred copy and noised
   (`init_latents.py`);
4. DDIM over context windows with CFG (`loop.py`); the ControlNets run once per window for both halves,
   since the halves differ only in their image tokens;
5. the driven frames are decoded a few at a time and returned as uint8.
Every random draw (VAE posterior, blur mask, initial noise, window offsets, DDIM eta noise) comes from one
seed through `jax.random`, so the same inputs and seed give the same frames.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdyna_jax.conditioning.clip_image import preprocess_clip_image, uncond_pixel_values
from xdyna_jax.conditioning.face import normalize_frames
from xdyna_jax.nn.bf16_weights import compiler_options_for
from xdyna_jax.nn.compute import Compute
from xdyna_jax.sampling.bundles import XDyna, load_xdyna
from xdyna_jax.sampling.init_latents import initial_latents
from xdyna_jax.sampling.loop import compiled_window_step, denoise, draw_window_offsets, window_batches
from xdyna_jax.sampling.windows import context_windows
from xdyna_jax.schedulers import DDIMScheduler

# Compiled once per process and shape (module-level, so every pipeline and call shares them).
_encode = nnx.jit(lambda vae, images, key: vae.latents_from_images(images, key))
_decode = nnx.jit(lambda vae, latents: vae.images_from_latents(latents))
_encode_text = nnx.jit(lambda encoder, ids: encoder(ids))
_image_tokens = nnx.jit(lambda encoder, resampler, pixels: resampler(encoder(pixels).hidden_states[-2]))


def crop_and_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The release's reference preprocessing: centre crop to width:height (size truncated, offset halved),
    then OpenCV's bilinear resize on uint8 (its fixed-point arithmetic, as the release)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise ValueError(f"reference image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    if w / h > width / height:  # too wide: keep the full height
        crop = int(h * width / height)
        image = image[:, (w - crop) // 2 : (w - crop) // 2 + crop]
    else:
        crop = int(w * height / width)
        image = image[(h - crop) // 2 : (h - crop) // 2 + crop]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


@dataclasses.dataclass(frozen=True)
class Draws:
    """Every random input of one call; `Draws.from_seed` splits them off one seed."""

    vae: jax.Array  # key of the reference latent's posterior sample
    init: jax.Array  # key of the blur mask and the initial noise
    offsets: np.ndarray  # (steps,) window shifts
    eta: jax.Array | None  # (steps,) keys of the DDIM noise, when eta > 0

    @classmethod
    def from_seed(cls, seed: int, steps: int, window: int, eta: float) -> Draws:
        vae, init, offsets, noise = jax.random.split(jax.random.key(seed), 4)
        return cls(
            vae,
            init,
            draw_window_offsets(offsets, steps, window),
            jax.random.split(noise, steps) if eta > 0 else None,
        )


class XDynaPipeline:
    """`XDynaPipeline.load(bundle)(reference, poses, faces)` -> uint8 frames (N, H, W, 3)."""

    def __init__(self, parts: XDyna, *, sequential_cfg: bool = True, compiler_options: dict | None = None):
        """sequential_cfg: run the two CFG halves one after the other (less memory) or as one batch.
        compiler_options: more XLA options of the window step's compile (e.g. a training run's)."""
        self.parts = parts
        self.sequential_cfg = sequential_cfg
        self._empty_prompt = None
        self.scheduler = DDIMScheduler(parts.scheduler)
        self._graph = nnx.split(parts.denoiser)[0]
        # every call of the same shapes reuses its compile; bf16 weights on CPU need their XLA options
        options = {**(compiler_options_for(nnx.state(parts.denoiser)) or {}), **(compiler_options or {})}
        self._step = compiled_window_step(self.window_fn, options or None)

    def window_fn(self, params, windows, t, frames):
        """(2, W, 1 + L, ...) noise predictions [uncond; cond] of W windows."""
        weights, conds = params
        denoiser = nnx.merge(self._graph, weights)
        w = windows.shape[0]
        text_len = conds["context"].shape[1] - denoiser.unet.config.ip_adapter_tokens
        text = jnp.repeat(conds["context"][:1, :text_len], w, axis=0)
        pose = conds["pose"][frames]
        face = conds["face"][frames] if "face" in conds else None
        # the CFG halves differ only in their image tokens: one ControlNet pass serves both
        down, mid = denoiser.control_residuals(windows, t, text, pose, face, 1.0, 1.0)
        contexts = jnp.repeat(conds["context"][:, None], w, axis=1)  # (2, W, L, D): uncond, cond
        if self.sequential_cfg:
            # one half after the other: only one half's activations are live (13.8 instead of 20.3 GiB for
            # a full-size fp32 window; a Python loop instead of lax.map lets XLA keep both, 51 GiB)
            return jax.lax.map(lambda context: denoiser.unet(windows, t, context, down, mid), contexts)
        both = lambda r: None if r is None else jnp.concatenate([r, r])
        down = None if down is None else [both(r) for r in down]
        eps = denoiser.unet(
            jnp.concatenate([windows, windows]),
            t,
            contexts.reshape(2 * w, *contexts.shape[2:]),
            down,
            both(mid),
        )
        return eps.reshape(2, w, *eps.shape[1:])

    def empty_prompt(self) -> jax.Array:
        """(1, L, D) text embedding of the empty prompt, the only prompt X-Dyna uses. Computed on first use;
        the pipeline then drops its text encoder (weights kept resident for one constant)."""
        if self._empty_prompt is None:
            p = self.parts
            self._empty_prompt = _encode_text(p.text_encoder, jnp.asarray(p.tokenizer([""])))
            self.parts = dataclasses.replace(p, text_encoder=None)
        return self._empty_prompt

    @classmethod
    def load(cls, path: str | Path, *, dtype: str = "float32") -> XDynaPipeline:
        """A converted X-Dyna bundle (`python -m convert xdyna`). dtype is the compute dtype; in bfloat16 the
        frozen weights are also cast while loading, halving what stays resident."""
        return cls(load_xdyna(path, compute=Compute(dtype=dtype), param_dtype=dtype))

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE's downscale times the UNet's."""
        unet = self.parts.denoiser.unet.config
        return self.parts.vae.config.downscale * 2 ** (len(unet.block_out_channels) - 1)

    def _check(self, reference, poses, faces, num_frames, height, width) -> int:
        m = self.size_multiple
        if height < m or width < m or height % m or width % m:
            raise ValueError(f"height and width must be positive multiples of {m}, got {height}x{width}")
        poses = np.asarray(poses)
        if poses.ndim != 4 or poses.shape[1:] != (height, width, 3):
            raise ValueError(f"poses must be (N, {height}, {width}, 3) skeleton images, got {poses.shape}")
        if faces is not None:
            if self.parts.denoiser.face_controlnet is None:
                raise ValueError(
                    "face maps were given but this bundle has no S-Face ControlNet (controlnet_face/)"
                )
            if np.shape(faces) != (len(poses), height, width, 6):
                raise ValueError(
                    f"faces must be ({len(poses)}, {height}, {width}, 6) S-Face maps, got {np.shape(faces)}"
                )
        n = len(poses) if num_frames is None else num_frames
        if not 1 <= n <= len(poses):
            raise ValueError(f"num_frames must be in [1, {len(poses)}] (the driving frames given), got {n}")
        if self._empty_prompt is None and self.parts.tokenizer is None:
            raise ValueError("this X-Dyna bundle has no tokenizer/ folder")
        if self.parts.denoiser.unet.config.ip_adapter_tokens and (
            self.parts.image_encoder is None or self.parts.resampler is None
        ):
            raise ValueError(
                "this X-Dyna UNet takes IP-Adapter tokens but the bundle has no image_encoder/resampler"
            )
        return n

    def __call__(
        self,
        reference_image: np.ndarray,
        poses: np.ndarray,
        faces: np.ndarray | None = None,
        *,
        num_frames: int | None = None,
        steps: int = 25,
        guidance: float = 7.5,
        seed: int = 0,
        height: int = 896,
        width: int = 512,
        window: int = 16,
        overlap: int = 4,
        window_batch: int = 1,
        decode_batch: int = 4,
        eta: float = 0.0,
        draws: Draws | None = None,
        progress: Callable[[int], None] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        output: str = "uint8",
    ) -> np.ndarray:
        """reference_image uint8 (h, w, 3) RGB; poses uint8 (N', H, W, 3) rendered skeletons; faces (N', H, W, 6)
        S-Face maps or None -> uint8 frames (num_frames, H, W, 3) for the first num_frames driving frames.

        mesh: split each batch of `window_batch` windows over the mesh's `data` axis (several devices).
        output: "uint8" frames, or "float" frames in [0, 1] (float32, before rounding).
        """
        if output not in ("uint8", "float"):
            raise ValueError(f"output must be 'uint8' or 'float', got {output!r}")
        n = self._check(reference_image, poses, faces, num_frames, height, width)
        p = self.parts
        draws = draws or Draws.from_seed(seed, steps, window, eta)
        conds = {"pose": jnp.asarray(normalize_frames(np.asarray(poses)[:n]))}
        if faces is not None:
            conds["face"] = jnp.asarray(normalize_frames(np.asarray(faces)[:n]))

        pixels = crop_and_resize(reference_image, height, width).astype(np.float32) / 127.5 - 1.0
        reference = _encode(p.vae, jnp.asarray(pixels[None]), draws.vae)[0]
        context = jnp.repeat(self.empty_prompt(), 2, axis=0)  # [uncond; cond]
        if p.denoiser.unet.config.ip_adapter_tokens:
            images = np.concatenate([uncond_pixel_values(), preprocess_clip_image(reference_image)])
            tokens = _image_tokens(p.image_encoder, p.resampler, jnp.asarray(images))
            context = jnp.concatenate([context, tokens], axis=1)
        conds["context"] = context

        timesteps = self.scheduler.timesteps(steps)
        latents = initial_latents(reference, n, self.scheduler, int(timesteps[0]), key=draws.init)
        _, weights = nnx.split(p.denoiser)
        latents = denoise(
            self.window_fn, (weights, conds), latents, self.scheduler, timesteps, guidance=guidance,
            offsets=draws.offsets, window=window, overlap=overlap, window_batch=window_batch,
            eta=eta, noise_keys=draws.eta, progress=progress, mesh=mesh, compiled_step=self._step,
        )  # fmt: skip
        frames = self.decode(latents[1:], decode_batch)
        return frames if output == "float" else np.round(frames * 255).astype(np.uint8)

    def decode(self, latents: jax.Array, batch: int = 4) -> np.ndarray:
        """Latents (N, h, w, C) -> float32 frames in [0, 1], `batch` frames per VAE call (one compile: the last
        batch is padded)."""
        # on the host first: the loop leaves the latents on its mesh (every device of the `data` axis) while the
        # VAE sits where it was loaded, and jit refuses arguments committed to different devices
        latents = np.asarray(latents)
        frames = []
        for i in range(0, len(latents), batch):
            z = latents[i : i + batch]
            padded = jnp.concatenate([z, jnp.repeat(z[-1:], batch - len(z), axis=0)]) if len(z) < batch else z
            frames.append(np.asarray(_decode(self.parts.vae, padded))[: len(z)])
        return np.clip(np.concatenate(frames) / 2 + 0.5, 0.0, 1.0)


def num_window_calls(
    num_frames: int, steps: int, window: int = 16, overlap: int = 4, window_batch: int = 1
) -> int:
    """How many compiled window-step calls a run makes (for a progress bar's total)."""
    windows = context_windows(num_frames, window=window, overlap=overlap)
    return steps * len(window_batches(windows, window_batch)[0])
