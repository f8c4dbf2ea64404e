"""`DynamiCtrlPipeline`: a reference photo + rendered pose frames + a prompt -> the animated frames.

What one call does, in the release's order (DynamiCtrl's pipeline, after diffusers' CogVideoX image-to-video):
1. the reference is resized to the output size with PIL's Lanczos filter, no crop (for the Mask variants its
   background or clothes are first blacked out by `reference_mask`), and VAE-encoded as a 1-frame video
   (a posterior sample); the image latents are that latent in frame 0 and zeros after it, scaled by the VAE's
   scaling factor when its config's `invert_scale_latents` is false and left unscaled when it is true (the
   release's rule: stock diffusers divides by the factor instead);
2. the pose frames go through the VAE as one video (a posterior sample times the scaling factor, always);
3. T5 encodes [negative prompt ; prompt] (226 tokens, no attention mask) once: classifier-free guidance is on
   the text only; pose and image latents condition both halves;
4. CogVideoX's DPM sampler over `steps` trailing timesteps (the release builds `CogVideoXDPMScheduler` from the
   bundle's scheduler config, whatever class it names, and overrides its spacing to "trailing"; so does this
   pipeline), v = v_u + s (v_c - v_u), ofs 2.0 (`dynamictrl_loop.py`);
5. the latents are divided by the scaling factor and decoded with tiling, then returned as uint8.
Every frame count works (the release needs (F - 1) / 4 + 1 even): see `dynamictrl_frames.py` for the padding
and trimming. The output has exactly `num_frames` frames.

Randomness: one seed -> `jax.random.key(seed)` split into the reference latent's posterior draw, the pose
latents' posterior draw, the initial noise and one DPM noise per step (`Draws`); `draws=` passes them
explicitly (keys or the normal draws themselves).

Memory: T5 (9.5 GB in bf16) and the transformer (11.6 GB) never hold device memory at the same time. A
pipeline from `DynamiCtrlPipeline.load(folder)` reads neither until a call needs it: T5 is read for the
prompts, used once, and its arrays deleted; only then is the transformer read. A later call with other
prompts first moves the transformer's weights to host memory (numpy), reads T5 again, deletes it, and moves
the transformer back. The last prompts' embeddings are kept, so repeated calls with them skip T5.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xdyna_jax.bundle import BundleError, load, read_bundle_json, read_meta
from xdyna_jax.conditioning.t5_tokenizer import T5Tokenizer
from xdyna_jax.models.cogvideox import CogVideoXConfig, rotary_tables
from xdyna_jax.models.dynamictrl import DynamiCtrlTransformerModel
from xdyna_jax.models.t5 import T5Config
from xdyna_jax.models.vae_cogvideox import CogVideoXTiling
from xdyna_jax.nn.bf16_weights import compiler_options_for
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model
from xdyna_jax.sampling.bundles import DynamiCtrl, read_manifest
from xdyna_jax.sampling.dynamictrl_frames import (
    FramePlan,
    masked_reference,
    pad_frames,
    pad_latent_frames,
    resize_reference,
    signed_pixels,
    uint8_frames,
)
from xdyna_jax.sampling.dynamictrl_loop import DynamiCtrlConditions, compiled_dpm_step, denoise
from xdyna_jax.schedulers.cogvideox import CogVideoXDPMScheduler, CogVideoXSchedulerConfig

DTYPES = ("bfloat16", "float32")
OFS = 2.0  # the 1.5 I2V offset every CogVideoX1.5 pipeline passes

# Compiled once per process and shape (module-level, so every pipeline and call shares it).
_encode_text = nnx.jit(lambda encoder, ids: encoder(ids))


def _is_key(x) -> bool:
    return jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


@dataclasses.dataclass(frozen=True)
class Draws:
    """Every random input of one call; each is a PRNG key or the standard-normal draw itself.

    image: the reference latent's posterior draw, (1, 1, h, w, C) when given as values;
    pose: the pose latents' posterior draw, (1, F', h, w, C);
    initial: the initial noise, (1, F'p, h, w, C) (F'p = F' padded to the transformer's patch_size_t);
    steps: one DPM noise per step, (steps,) keys or (steps, 1, F'p, h, w, C) values.
    """

    image: jax.Array
    pose: jax.Array
    initial: jax.Array
    steps: jax.Array

    @classmethod
    def from_seed(cls, seed: int, steps: int) -> Draws:
        image, pose, initial, per_step = jax.random.split(jax.random.key(seed), 4)
        return cls(image, pose, initial, jax.random.split(per_step, steps))

    def check(self, shapes: dict[str, tuple[int, ...]], steps: int) -> None:
        """Each draw a key or an array of the shape in `shapes` (steps: one key or one draw per step)."""
        for name in ("image", "pose", "initial", "steps"):
            value = getattr(self, name)
            if name == "steps":
                want = (steps, *shapes["initial"])
                ok = tuple(value.shape) == ((steps,) if _is_key(value) else want)
                what = f"({steps},) keys or values of shape {want}"
            else:
                want = shapes[name]
                ok = (_is_key(value) and value.shape == ()) or tuple(np.shape(value)) == want
                what = f"a single key or values of shape {want}"
            if not ok:
                raise ValueError(f"draws.{name} must be {what}, got shape {tuple(np.shape(value))}")


def _normal(draw, shape) -> jax.Array:
    return jax.random.normal(draw, shape, jnp.float32) if _is_key(draw) else jnp.asarray(draw, jnp.float32)


def _delete(tree) -> None:
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


@functools.lru_cache(maxsize=16)
def _graphdef(model_cls, config):
    return nnx.split(shape_only_model(model_cls, config))[0]


def with_compute_dtype(module: nnx.Module, dtype: str) -> nnx.Module:
    """`module` computing in `dtype` (the same weight arrays, no copy; its other compute settings kept)."""
    config = module.config
    if config.compute.dtype == dtype:
        return module
    config = dataclasses.replace(config, compute=dataclasses.replace(config.compute, dtype=dtype))
    return nnx.merge(_graphdef(type(module), config), nnx.state(module))


@functools.lru_cache(maxsize=8)
def _transformer_step(graphdef, ofs, scheduler: CogVideoXSchedulerConfig, steps, sequential_cfg, options):
    def denoiser(params, hidden, text, t, control, rope):
        model = nnx.merge(graphdef, params)
        return model(hidden, text, t, control, ofs=ofs, image_rotary_emb=rope)

    return compiled_dpm_step(
        denoiser,
        CogVideoXDPMScheduler(scheduler),
        steps,
        sequential_cfg=sequential_cfg,
        compiler_options=dict(options) if options else None,
    )


class _Weights:
    """One network's weights: on the device, parked in host memory, or unread (read by `loader` on demand)."""

    def __init__(self, what: str, module: nnx.Module | None = None, loader: Callable | None = None):
        self.what, self._module, self._loader, self._parked = what, module, loader, None

    @property
    def on_device(self) -> bool:
        return self._module is not None

    @property
    def available(self) -> bool:
        return self._module is not None or self._parked is not None or self._loader is not None

    def module(self) -> nnx.Module:
        """The module with its weights on the device (read, or moved back from host memory, if needed)."""
        if self._module is None:
            if self._parked is not None:
                graphdef, host, shardings = self._parked
                self._module, self._parked = nnx.merge(graphdef, jax.device_put(host, shardings)), None
            elif self._loader is not None:
                self._module = self._loader()
            else:
                raise RuntimeError(
                    f"the {self.what} was released and this pipeline has no bundle to re-read it"
                )
        return self._module

    def park(self) -> None:
        """Move the weights to host memory (numpy copies) and free their device buffers."""
        if self._module is not None:
            graphdef, state = nnx.split(self._module)
            shardings = jax.tree_util.tree_map(lambda a: a.sharding, state)
            self._parked = (graphdef, jax.tree_util.tree_map(np.array, state), shardings)
            _delete(state)
            self._module = None

    def release(self) -> None:
        """Free the weights (device buffers deleted); a later `module()` reads them again if it can."""
        if self._module is not None:
            _delete(nnx.state(self._module))
        self._module = self._parked = None


class DynamiCtrlPipeline:
    """`DynamiCtrlPipeline.load(bundle)(reference, pose_frames, prompt)` -> uint8 frames (F, H, W, 3)."""

    def __init__(
        self,
        parts: DynamiCtrl,
        *,
        sequential_cfg: bool = False,
        tiling: CogVideoXTiling | None = None,
    ):
        """From parts already loaded (`load_dynamictrl`): T5 and the transformer then both sit on the device
        from the start (use `load(folder)` to avoid that); T5 is released after its first use, so this
        pipeline can encode only one pair of prompts.

        sequential_cfg: run the two CFG halves one after the other (less activation memory) instead of as
        one batch of 2 (the release). tiling: the VAE's tile sizes (default: half its sample size, 240 x 360
        pixels for CogVideoX's VAE, as diffusers' `enable_tiling`).
        """
        self._setup(
            transformer=_Weights("transformer", parts.transformer),
            text_encoder=_Weights("text encoder", parts.text_encoder),
            transformer_config=parts.transformer.config,
            text_config=parts.text_encoder.config,
            vae=parts.vae,
            tokenizer=parts.tokenizer,
            scheduler=parts.scheduler,
            scheduler_class=parts.scheduler_class,
            manifest=parts.manifest,
            sequential_cfg=sequential_cfg,
            tiling=tiling,
        )

    @classmethod
    def load(
        cls,
        bundle: str | Path | DynamiCtrl,
        *,
        compute: Compute | None = None,
        param_dtype: str | None = None,
        sequential_cfg: bool = False,
        tiling: CogVideoXTiling | None = None,
    ) -> DynamiCtrlPipeline:
        """A DynamiCtrl pipeline bundle (`python -m convert dynamictrl`), or parts already loaded.

        The VAE and tokenizer are read now, T5 and the transformer when a call needs them (see the module
        notes on memory). compute: the networks' compute settings (precision, attention backend; the dtype is
        each call's `dtype`); param_dtype: cast the weights while reading (default: as stored, bf16 for the
        release).
        """
        if isinstance(bundle, DynamiCtrl):
            return cls(bundle, sequential_cfg=sequential_cfg, tiling=tiling)
        path = Path(bundle)
        manifest = read_manifest(path)
        if manifest["kind"] != "dynamictrl":
            raise BundleError(
                f"{path / 'manifest.json'} describes a {manifest['kind']!r} pipeline, expected 'dynamictrl'"
            )
        for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not (path / name).is_dir():
                raise BundleError(f"{path} is missing its {name}/ folder")

        def config_of(name, kind, config_cls):
            meta = read_meta(path / name)
            if meta["kind"] != kind:
                raise BundleError(f"{path / name} holds a {meta['kind']!r} bundle, expected {kind!r}")
            config = config_cls.from_dict(meta["config"])
            return config if compute is None else dataclasses.replace(config, compute=compute)

        def loader(name, kind):
            return lambda: load(path / name, compute=compute, expected_kind=kind, param_dtype=param_dtype)

        scheduler = read_bundle_json(path / "scheduler", "scheduler_config.json", "scheduler config folder")
        self = cls.__new__(cls)
        self._setup(
            transformer=_Weights("transformer", loader=loader("transformer", "dynamictrl_transformer")),
            text_encoder=_Weights("text encoder", loader=loader("text_encoder", "t5_encoder")),
            transformer_config=config_of("transformer", "dynamictrl_transformer", CogVideoXConfig),
            text_config=config_of("text_encoder", "t5_encoder", T5Config),
            vae=loader("vae", "cogvideox_vae")(),
            tokenizer=T5Tokenizer.from_folder(path / "tokenizer"),
            scheduler=CogVideoXSchedulerConfig.from_diffusers(scheduler),
            scheduler_class=scheduler.get("_class_name", "CogVideoXDDIMScheduler"),
            manifest=manifest,
            sequential_cfg=sequential_cfg,
            tiling=tiling,
        )
        return self

    def _setup(
        self, *, transformer, text_encoder, transformer_config, text_config, vae, tokenizer, scheduler,
        scheduler_class, manifest, sequential_cfg, tiling,
    ) -> None:  # fmt: skip
        cfg, z = transformer_config, vae.config.latent_channels
        if cfg.out_channels != z or cfg.in_channels != 2 * z:
            raise ValueError(
                f"DynamiCtrlPipeline: the transformer takes {cfg.in_channels} and gives {cfg.out_channels} "
                f"channels, the VAE's latents have {z} (expected {2 * z} in, {z} out)"
            )
        if text_config.d_model != cfg.text_embed_dim:
            raise ValueError(
                f"DynamiCtrlPipeline: T5 gives {text_config.d_model}-wide embeddings, the transformer takes "
                f"{cfg.text_embed_dim}"
            )
        if tokenizer is None:
            raise ValueError("DynamiCtrlPipeline: the bundle has no tokenizer")
        self._transformer, self._text_encoder = transformer, text_encoder
        self.transformer_config, self.text_config = transformer_config, text_config
        self.vae, self.tokenizer, self.manifest = vae, tokenizer, manifest
        self.scheduler_class = scheduler_class  # what the bundle names; the DPM sampler runs regardless
        self.scheduler = CogVideoXDPMScheduler(dataclasses.replace(scheduler, timestep_spacing="trailing"))
        self.sequential_cfg = sequential_cfg
        self.tiling = tiling
        self._text_cache: tuple[tuple, jax.Array] | None = None
        self._sizes_that_tile: set[tuple[int, int]] = set()  # frame sizes whose tiling was checked

    # -- what sits where -------------------------------------------------------------------------------

    def resident_parts(self) -> set[str]:
        """The networks whose weights are in device memory now ("vae", "transformer", "text_encoder")."""
        parts = {"vae"}
        if self._transformer.on_device:
            parts.add("transformer")
        if self._text_encoder.on_device:
            parts.add("text_encoder")
        return parts

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE's downscale times the transformer's patch."""
        return self.vae.config.spatial_scale * self.transformer_config.patch_size

    # -- the steps of a call ---------------------------------------------------------------------------

    def encode_prompts(self, prompt: str, negative_prompt: str | None, dtype: str) -> jax.Array:
        """(2, L, D) [negative ; prompt] T5 embeddings in `dtype` ((1, L, D) for negative_prompt=None).

        T5 is used once and released; the transformer is parked in host memory meanwhile (module notes).
        """
        key = (prompt, negative_prompt, dtype)
        if self._text_cache is not None and self._text_cache[0] == key:
            return self._text_cache[1]
        self._text_cache = None
        self._transformer.park()
        prompts = [prompt] if negative_prompt is None else [negative_prompt, prompt]
        ids, _ = self.tokenizer(prompts, max_length=self.transformer_config.max_text_seq_length)
        encoder = with_compute_dtype(self._text_encoder.module(), dtype)
        text = _encode_text(encoder, jnp.asarray(ids)).astype(dtype)
        del encoder
        self._text_encoder.release()
        self._text_cache = (key, text)
        return text

    def latent_shapes(self, plan: FramePlan, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """The shapes of the reference latent ("image"), the pose latents ("pose") and the denoised latents
        ("initial"), each (1, frames, h, w, C)."""
        s, c = self.vae.config.spatial_scale, self.vae.config.latent_channels
        grid = (height // s, width // s, c)
        return {
            "image": (1, 1, *grid),
            "pose": (1, plan.latent_frames, *grid),
            "initial": (1, plan.padded_latent_frames, *grid),
        }

    def _posterior_sample(self, video: np.ndarray, draw, dtype: str) -> jax.Array:
        vae = with_compute_dtype(self.vae, dtype)
        mean, logvar = vae.encode(jnp.asarray(video), use_tiling=True, tiling=self.tiling)
        return mean + jnp.exp(0.5 * logvar) * _normal(draw, mean.shape)

    def prepare(self, reference: np.ndarray, poses: np.ndarray, plan: FramePlan, draws: Draws, dtype: str):
        """(image latents, pose latents, initial noise), each (1, F'p, h, w, C) in `dtype`.

        reference: uint8 (H, W, 3) at the output size (masked already); poses: uint8 (num_frames, H, W, 3).
        """
        sf = self.vae.config.scaling_factor
        image_scale = 1.0 if self.vae.config.invert_scale_latents else sf  # the release's rule (module notes)
        image = self._posterior_sample(signed_pixels(reference)[None, None], draws.image, dtype)
        image = jnp.asarray(image * image_scale, dtype)
        image = pad_latent_frames(image, plan.padded_latent_frames, repeat_last=False)
        video = signed_pixels(pad_frames(poses, plan.pixel_frames))[None]
        pose = jnp.asarray(self._posterior_sample(video, draws.pose, dtype) * sf, dtype)
        if pose.shape[1] != plan.latent_frames:
            raise RuntimeError(f"the VAE made {pose.shape[1]} latent frames of {plan}")
        pose = pad_latent_frames(pose, plan.padded_latent_frames, repeat_last=True)
        initial = _normal(draws.initial, image.shape) * self.scheduler.init_noise_sigma
        return image, pose, initial.astype(dtype)

    def decode(self, latents: jax.Array, plan: FramePlan, dtype: str) -> np.ndarray:
        """Denoised latents (1, F'p, h, w, C) -> uint8 (num_frames, H, W, 3): the padded latent frames
        dropped, the scaling undone, decoded with tiling, trimmed to the requested frames."""
        latents = latents[:, : plan.latent_frames] / self.vae.config.scaling_factor
        vae = with_compute_dtype(self.vae, dtype)
        video = vae.decode(latents, use_tiling=True, tiling=self.tiling)
        if video.shape[1] != plan.decoded_frames:
            raise RuntimeError(f"the VAE decoded {video.shape[1]} frames of {plan}")
        return uint8_frames(video[0, : plan.num_frames])

    def compiled_step(self, dtype: str, steps: int, params) -> Callable:
        """The compiled DPM step for this transformer, dtype and step count, shared by every pipeline of the
        process (weights are its arguments, so nothing of one pipeline stays alive in it)."""
        config = dataclasses.replace(
            self.transformer_config, compute=dataclasses.replace(self.transformer_config.compute, dtype=dtype)
        )
        options = compiler_options_for(params)
        return _transformer_step(
            _graphdef(DynamiCtrlTransformerModel, config),
            OFS if config.ofs_embed_dim else None,
            self.scheduler.config,
            steps,
            self.sequential_cfg,
            tuple(sorted(options.items())) if options else None,
        )

    # -- checks ----------------------------------------------------------------------------------------

    def _check(
        self, reference_image, pose_frames, prompt, negative_prompt, num_frames, steps, guidance, seed,
        height, width, dtype, reference_mask, draws, progress,
    ) -> tuple[FramePlan, tuple | None]:  # fmt: skip
        """Every input error, raised before anything is compiled; returns the frame plan and RoPE tables."""
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int | np.integer) or value < m or value % m:
                raise ValueError(f"{name} must be a positive multiple of {m}, got {value!r}")
        if not isinstance(steps, int | np.integer) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if steps > self.scheduler.config.num_train_timesteps:
            raise ValueError(
                f"steps must be at most {self.scheduler.config.num_train_timesteps}, got {steps}"
            )
        if (
            isinstance(guidance, bool)
            or not isinstance(guidance, int | float | np.integer | np.floating)
            or not math.isfinite(guidance)
            or guidance < 1
        ):
            raise ValueError(f"guidance must be a finite number >= 1 (1 turns CFG off), got {guidance!r}")
        if draws is None and (not isinstance(seed, int | np.integer) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if draws is not None and not isinstance(draws, Draws):
            raise TypeError(f"draws must be a Draws, got {type(draws).__name__}")
        if not (isinstance(progress, bool) or callable(progress)):
            raise TypeError(f"progress must be a bool or a callable taking a step count, got {progress!r}")
        image = np.asarray(reference_image) if isinstance(reference_image, np.ndarray) else None
        if (
            image is None
            or image.dtype != np.uint8
            or image.ndim != 3
            or image.shape[2] != 3
            or min(image.shape[:2]) < 1
        ):
            raise ValueError(
                "reference_image must be a uint8 (H, W, 3) RGB array, got "
                f"{getattr(reference_image, 'dtype', type(reference_image).__name__)} {np.shape(reference_image)}"
            )
        if reference_mask is not None:
            mask = np.asarray(reference_mask)
            if mask.shape != image.shape[:2] or mask.dtype not in (np.bool_, np.uint8):
                raise ValueError(
                    f"reference_mask must be bool or uint8 of the reference's size {image.shape[:2]}, got "
                    f"{mask.dtype} {mask.shape}"
                )
        poses = pose_frames
        if (
            not isinstance(poses, np.ndarray)
            or poses.dtype != np.uint8
            or poses.ndim != 4
            or poses.shape[1:] != (height, width, 3)
            or len(poses) < 1
        ):
            raise ValueError(
                f"pose_frames must be uint8 (F, {height}, {width}, 3) skeleton frames at the output size, got "
                f"{getattr(poses, 'dtype', type(poses).__name__)} {np.shape(poses)}"
            )
        n = len(poses) if num_frames is None else num_frames
        if not isinstance(n, int | np.integer) or isinstance(n, bool) or not 1 <= n <= len(poses):
            raise ValueError(f"num_frames must be in [1, {len(poses)}] (the pose frames given), got {n!r}")
        negative = negative_prompt if guidance > 1 else None
        if self._text_cache is None or self._text_cache[0] != (prompt, negative, dtype):
            if not self._text_encoder.available:
                raise RuntimeError(
                    "the text encoder was released after encoding the previous prompts; a pipeline built from "
                    "loaded parts encodes one pair of prompts (use DynamiCtrlPipeline.load(folder))"
                )
        plan = FramePlan.for_count(int(n), self.vae.config, self.transformer_config.patch_size_t)
        shapes = self.latent_shapes(plan, height, width)
        if draws is not None:
            draws.check(shapes, steps)
        cfg = self.transformer_config
        rope = None
        if cfg.use_rotary_positional_embeddings:
            rope = rotary_tables(cfg, *shapes["initial"][1:4])  # host-side; raises for a grid too large
        self._check_tiles(height, width)
        return plan, rope

    def _check_tiles(self, height: int, width: int) -> None:
        """Tiled encode / decode keep the frame size only when the tiles fit it (diffusers' tiling has no
        final crop): traced for shapes only (nothing compiled) when the frames are larger than a tile."""
        tiling = self.tiling or CogVideoXTiling.for_config(self.vae.config)
        small = height <= tiling.tile_sample_min_height and width <= tiling.tile_sample_min_width
        if small or (height, width) in self._sizes_that_tile:
            return
        s, c = self.vae.config.spatial_scale, self.vae.config.latent_channels
        vae, pixels = self.vae, jax.ShapeDtypeStruct((1, 1, height, width, 3), jnp.float32)
        latents = jax.eval_shape(lambda x: vae.encode(x, use_tiling=True, tiling=self.tiling)[0], pixels)
        frames = jax.eval_shape(
            lambda z: vae.decode(z, use_tiling=True, tiling=self.tiling),
            jax.ShapeDtypeStruct((1, 1, height // s, width // s, c), jnp.float32),
        )
        if latents.shape[2:4] != (height // s, width // s) or frames.shape[2:4] != (height, width):
            raise ValueError(
                f"the VAE's tiles ({tiling}) do not fit {height}x{width} frames: tiled encoding gives "
                f"{latents.shape[2]}x{latents.shape[3]} latents, tiled decoding {frames.shape[2]}x"
                f"{frames.shape[3]} frames; choose another size or pass other `tiling` to the pipeline"
            )
        self._sizes_that_tile.add((height, width))

    # -- the call --------------------------------------------------------------------------------------

    def __call__(
        self,
        reference_image: np.ndarray,
        pose_frames: np.ndarray,
        prompt: str,
        negative_prompt: str = "",
        *,
        num_frames: int | None = None,
        steps: int = 25,
        guidance: float = 3.0,
        seed: int = 0,
        height: int = 1360,
        width: int = 768,
        dtype: str = "bfloat16",
        reference_mask: np.ndarray | None = None,
        draws: Draws | None = None,
        progress: bool | Callable[[int], None] = True,
    ) -> np.ndarray:
        """reference_image uint8 (H0, W0, 3) RGB; pose_frames uint8 (F, height, width, 3) rendered skeletons
        (frame 0: the reference's own pose); prompt: describes the person and background -> uint8
        (num_frames, height, width, 3) for the first num_frames pose frames (default all).

        guidance: CFG scale on the text (1: no CFG, the negative prompt unused). dtype: the networks' compute
        dtype and the dtype latents and embeddings are kept in between steps. reference_mask: bool / uint8
        (H0, W0), 0 where the reference is blacked out (the Mask_B01 / Mask_C01 variants). draws: explicit
        random draws (`Draws`), replacing those of `seed`. progress: a tqdm bar over the steps on stderr
        (True), none (False), or a callable given 1 after each step.
        """
        plan, rope = self._check(
            reference_image, pose_frames, prompt, negative_prompt, num_frames, steps, guidance, seed,
            height, width, dtype, reference_mask, draws, progress,
        )  # fmt: skip
        draws = draws or Draws.from_seed(int(seed), int(steps))
        text = self.encode_prompts(prompt, negative_prompt if guidance > 1 else None, dtype)

        reference = resize_reference(masked_reference(reference_image, reference_mask), height, width)
        image, pose, latents = self.prepare(reference, pose_frames[: plan.num_frames], plan, draws, dtype)
        conditions = DynamiCtrlConditions(image_latents=image, pose_latents=pose, text=text, rope=rope)

        params = nnx.state(self._transformer.module())  # read (or moved back) only after T5 is gone
        step = self.compiled_step(dtype, int(steps), params)
        timesteps = self.scheduler.timesteps(int(steps))
        bar = None
        if progress is True:
            from tqdm import tqdm

            bar = tqdm(total=len(timesteps), desc="denoising", unit="step", file=sys.stderr)
        try:
            latents = denoise(
                None, params, latents, conditions, self.scheduler, timesteps, draws.steps,
                guidance=float(guidance), progress=bar.update if bar is not None else (progress or None),
                compiled_step=step,
            )  # fmt: skip
        finally:
            if bar is not None:
                bar.close()
        return self.decode(latents, plan, dtype)
