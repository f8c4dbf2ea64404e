"""Sample previews of a training run: every `train.sample_every` steps, a short video of one fixed held-out
clip sampled from the current weights, for TensorBoard.

The clip is the first example of the validation data when the run has some (--val-data), else of the
training data, read by a source of its own, without augmentation and from the unsharded order, so every
preview of a run, resumed or not, animates the same reference photo with the same poses (and S-Face maps)
from the same seed: what changes between two previews is the weights alone.

The sampler is the one `sample.py` runs, `XDynaPipeline`, over the run's own models as training holds them:
the denoiser merged from the state's weights (the EMA when the export would take it, `train.export_ema`;
frozen weights in `step.frozen_dtype`, activations in the run's compute dtype), the VAE and IP-Adapter
encoders the batch builder already holds on the mesh (no second copy), the release's DDIM schedule,
`train.sample_steps` steps, the pipeline's default guidance. The pipeline is built once per run, so its
window step (compiled with the run's `compiler_options`, like the train step) and its encode / decode
programs compile once and serve every preview. Sampling runs between two train steps, driven from the host;
it never enters the compiled train step and draws nothing from the run's keys.

Previews need a single-process run: the pipeline copies its frames to the host, which a multi-process
run's global arrays do not allow; there the run logs a warning and makes none.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from xdyna_jax.sampling.bundles import XDYNA_SCHEDULER, XDyna
from xdyna_jax.sampling.xdyna import XDynaPipeline
from xdyna_jax.training.sources import open_source
from xdyna_jax.training.start import load_tokenizer
from xdyna_jax.training.step import Trainer, TrainState

log = logging.getLogger("train")


class PreviewError(ValueError):
    """A preview clip the run's model cannot animate (missing condition, wrong size)."""


@dataclasses.dataclass(frozen=True)
class PreviewClip:
    """What the pipeline takes: the reference photo, the driven frames' pose maps and S-Face maps."""

    reference: np.ndarray  # uint8 (h, w, 3)
    poses: np.ndarray  # (N, H, W, 3) rendered skeletons (uint8, or float in [0, 1])
    faces: np.ndarray | None  # (N, H, W, 6) S-Face maps, or None without an S-Face ControlNet


def preview_clip(
    example: dict, *, frames: int, height: int, width: int, pose: bool, face: bool, where: str
) -> PreviewClip:
    """The pipeline's inputs from a training example (sources.py describes its keys): the reference photo
    is `reference` or frames[0], as in training; the conditions are those of the N driven frames."""
    if "reference" in example:
        reference = np.asarray(example["reference"])
    elif "frames" in example:
        reference = np.asarray(example["frames"])[0]
    else:
        raise PreviewError(f"{where}: neither 'frames' nor 'reference' to take the reference photo from")

    def condition(name: str, channels: int) -> np.ndarray:
        if name not in example:
            raise PreviewError(f"{where}: the model reads a {name} condition but the example has no {name!r}")
        x = np.asarray(example[name])
        if x.ndim != 4 or x.shape[0] < frames or x.shape[1:] != (height, width, channels):
            raise PreviewError(
                f"{where}: {name} must be (>= {frames}, {height}, {width}, {channels}), got {x.shape}"
            )
        return x[-frames:]

    # the pipeline always takes pose maps; a model without a pose ControlNet never reads them
    poses = condition("pose", 3) if pose else np.zeros((frames, height, width, 3), np.uint8)
    return PreviewClip(reference, poses, condition("face", 6) if face else None)


class SamplePreview:
    """`preview(state) -> uint8 frames (N, H, W, 3)` of the fixed clip at the state's weights."""

    def __init__(
        self,
        trainer: Trainer,
        state: TrainState,
        parts: XDyna,
        clip: PreviewClip,
        *,
        steps: int,
        seed: int,
        height: int,
        width: int,
        use_ema: bool,
        compiler_options: dict | None = None,
    ):
        """parts: the run's models but the denoiser (taken from each state); its text encoder and tokenizer
        give the empty-prompt embedding once, here, and are released then. compiler_options: the run's XLA
        options, for the window step's compile."""
        if steps < 1:
            raise PreviewError(f"train.sample_steps must be >= 1, got {steps}")
        if parts.vae is None:
            raise PreviewError("sample previews need the run's VAE to decode the frames")
        self.trainer, self.clip, self.use_ema = trainer, clip, use_ema and state.ema is not None
        self.options = dict(steps=steps, seed=seed, height=height, width=width)
        # one pipeline for the run: its compiled window step is reused by every preview
        self.pipeline = XDynaPipeline(
            dataclasses.replace(parts, denoiser=self._denoiser(state)), compiler_options=compiler_options
        )
        self.pipeline.empty_prompt()

    def _denoiser(self, state: TrainState) -> nnx.Module:
        weights = state.ema if self.use_ema else state.trainable
        return nnx.merge(self.trainer.graphdef, weights, state.frozen)

    def __call__(self, state: TrainState) -> np.ndarray:
        pipe = self.pipeline
        # the state's buffers are donated to the next train step: the denoiser is merged from this state
        # (no copy) and used only within this call
        pipe.parts = dataclasses.replace(pipe.parts, denoiser=self._denoiser(state))
        c = self.clip
        return pipe(c.reference, c.poses, c.faces, num_frames=len(c.poses), **self.options)


def preview_for_run(
    cfg: ml_collections.ConfigDict,
    *,
    data: str | Path,
    clips: dict,
    trainer: Trainer,
    state: TrainState,
    encoders: tuple,
    text_encoder: nnx.Module,
    tokenizer: Path,
) -> SamplePreview | None:
    """The run's preview (see the module docstring), or None when `train.sample_every` is 0 or beyond
    `train.steps` (no preview step in the run) or the run has several processes. data: the validation folder
    if any, else the training folder; clips: the run's clip options (augmentation is switched off here);
    encoders: `BatchBuilder.encoders()`."""
    if not 0 < int(cfg.train.sample_every) <= int(cfg.train.steps):
        return None
    if jax.process_count() > 1:
        log.warning("train.sample_every: sample previews need a single-process run; none are made")
        return None
    source = open_source(data, seed=int(cfg.seed), clips={**clips, "flip_prob": 0.0, "max_scale": 1.0})
    denoiser = trainer.model(state)
    clip = preview_clip(
        next(source),
        frames=int(cfg.frames),
        height=int(cfg.height),
        width=int(cfg.width),
        pose=denoiser.pose_controlnet is not None,
        face=denoiser.face_controlnet is not None,
        where=f"the first clip of {data} (the sample preview's)",
    )
    vae, image_encoder, resampler = encoders
    parts = XDyna(
        denoiser=denoiser,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(tokenizer),
        image_encoder=image_encoder,
        resampler=resampler,
        scheduler=XDYNA_SCHEDULER,  # what the exported bundle's scheduler/ holds
        manifest={"kind": "xdyna"},
    )
    return SamplePreview(
        trainer,
        state,
        parts,
        clip,
        steps=int(cfg.train.sample_steps),
        seed=int(cfg.seed),
        height=int(cfg.height),
        width=int(cfg.width),
        use_ema=bool(cfg.train.export_ema),
        compiler_options=cfg.compiler_options.to_dict(),
    )
