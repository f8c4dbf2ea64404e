"""From data examples to the train step's batch, as global arrays over the mesh.

Per process, the host stacks its share of the global batch (sources.py describes an example): frames as
uint8, the reference image CLIP-preprocessed (PIL, as the sampler does), pose and face maps normalised per
clip as the sampler normalises its condition videos (`conditioning.face.normalize_frames`). Each array
becomes one global array with `jax.make_array_from_process_local_data` (on one process too, so the
multi-host path is the one that runs). One jitted program then computes, on the mesh, with the frozen
encoders: the VAE latents of every frame (a posterior sample; skipped for precomputed latents), the
IP-Adapter tokens of the reference (CLIP vision penultimate states -> Resampler) and the empty-prompt text
embedding (computed once at construction) repeated per example.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xdyna_jax.conditioning.clip_image import preprocess_clip_image
from xdyna_jax.conditioning.face import normalize_frames
from xdyna_jax.sharding import replicated

# Batch rows spread over every mesh axis that holds a data shard (the rules' "batch": data and fsdp).
BATCH_AXES = ("data", "fsdp")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples split over the `data` and `fsdp` axes (FSDP devices each take their own examples)."""
    return NamedSharding(mesh, PartitionSpec(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def empty_prompt_embedding(text_encoder: nnx.Module, tokenizer) -> jax.Array:
    """(1, L, D) float32 embedding of the empty prompt, the only prompt X-Dyna trains and samples with."""
    ids = jnp.asarray(tokenizer([""]))
    return nnx.jit(lambda enc, i: enc(i))(text_encoder, ids).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Layout:
    """What every batch of a run holds: its sizes and which conditions the model reads."""

    global_batch: int
    frames: int  # driven frames N (the window is 1 + N)
    height: int
    width: int
    pose: bool
    face: bool


class BatchError(ValueError):
    """An example that does not fit the run (shape, dtype, missing condition)."""


class BatchBuilder:
    """`builder(examples, key) -> batch` for `Trainer.train_step` (see the module docstring).

    `examples` is this process's share of the global batch (global_batch / process_count examples).
    Encoder weights are placed by `param_shardings(state) -> shardings` when given, else replicated.
    """

    def __init__(
        self,
        layout: Layout,
        *,
        vae: nnx.Module | None,
        image_encoder: nnx.Module,
        resampler: nnx.Module,
        text_embedding: jax.Array,
        mesh: Mesh,
        param_shardings: Callable | None = None,
    ):
        self.layout, self.mesh = layout, mesh
        self.sharding = batch_sharding(mesh)
        shards = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)
        if layout.global_batch % shards or layout.global_batch % jax.process_count():
            raise BatchError(
                f"batch_size {layout.global_batch} does not split over the mesh's {shards} batch shards "
                f"(axes {BATCH_AXES}) and {jax.process_count()} processes"
            )
        self.local_batch = layout.global_batch // jax.process_count()
        rep = replicated(mesh)

        def place(module):
            if module is None:
                return None, None
            graph, state = nnx.split(module)
            sh = param_shardings(state) if param_shardings else jax.tree_util.tree_map(lambda _: rep, state)
            return graph, jax.device_put(state, sh)

        self._vae, self._vision, self._resampler = place(vae), place(image_encoder), place(resampler)
        self.text = jax.device_put(jnp.asarray(text_embedding, jnp.float32), rep)
        self._program = jax.jit(self._encode, out_shardings=self.sharding)

    # ------------------------------------------------------------------------------------------ host side

    def _condition(self, example: dict, name: str, channels: int, where: str) -> np.ndarray:
        lay = self.layout
        if name not in example:
            raise BatchError(f"{where}: the model reads a {name} condition but the example has no {name!r}")
        x = np.asarray(example[name])
        if (
            x.ndim != 4
            or x.shape[0] not in (lay.frames, lay.frames + 1)
            or x.shape[1:]
            != (
                lay.height,
                lay.width,
                channels,
            )
        ):
            raise BatchError(
                f"{where}: {name} must be ({lay.frames} or {lay.frames + 1}, {lay.height}, {lay.width}, "
                f"{channels}), got {x.shape}"
            )
        return normalize_frames(x[-lay.frames :])  # the driven frames' maps, normalised over the clip

    def host_arrays(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        """This process's examples as stacked numpy arrays (checked, preprocessed)."""
        lay = self.layout
        if len(examples) != self.local_batch:
            raise BatchError(f"got {len(examples)} examples, this process's share is {self.local_batch}")
        with_latents = ["latents" in e for e in examples]
        if any(with_latents) and not all(with_latents):
            raise BatchError("a batch mixes examples with precomputed latents and examples with frames")
        out: dict[str, list] = {}
        for i, ex in enumerate(examples):
            where = f"example {i} of the batch"
            if with_latents[0]:
                lat = np.asarray(ex["latents"], np.float32)
                if lat.ndim != 4 or lat.shape[0] != lay.frames + 1:
                    raise BatchError(f"{where}: latents must be ({lay.frames + 1}, h, w, C), got {lat.shape}")
                out.setdefault("latents", []).append(lat)
                if "reference" not in ex and "frames" not in ex:
                    raise BatchError(
                        f"{where}: precomputed latents need a 'reference' image for the IP tokens"
                    )
            else:
                if self._vae is None:
                    raise BatchError(f"{where}: frames given but the run has no VAE to encode them")
                if "frames" not in ex:
                    raise BatchError(f"{where}: neither 'frames' nor 'latents' (keys {sorted(ex)})")
                frames = np.asarray(ex["frames"])
                want = (lay.frames + 1, lay.height, lay.width, 3)
                if frames.dtype != np.uint8 or frames.shape != want:
                    raise BatchError(
                        f"{where}: frames must be uint8 {want}, got {frames.dtype} {frames.shape}"
                    )
                out.setdefault("frames", []).append(frames)
            reference = ex["reference"] if "reference" in ex else np.asarray(ex["frames"])[0]
            out.setdefault("clip_pixels", []).append(preprocess_clip_image(np.asarray(reference))[0])
            if lay.pose:
                out.setdefault("pose", []).append(self._condition(ex, "pose", 3, where))
            if lay.face:
                out.setdefault("face", []).append(self._condition(ex, "face", 6, where))
        return {k: np.stack(v) for k, v in out.items()}

    def global_arrays(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Each process's rows assembled into global arrays split over the batch axes."""
        p = jax.process_count()
        return {
            k: jax.make_array_from_process_local_data(self.sharding, v, (v.shape[0] * p, *v.shape[1:]))
            for k, v in local.items()
        }

    # ------------------------------------------------------------------------------------------ device side

    def _encode(self, weights, arrays, key):
        vae_state, vision_state, resampler_state = weights
        out = {}
        if "frames" in arrays:
            vae = nnx.merge(self._vae[0], vae_state)
            frames = arrays["frames"]
            keys = jax.random.split(key, frames.shape[1])

            # one frame position of every example at a time: the encoder's activations for a single frame
            def encode(xs):
                images, k = xs
                return vae.latents_from_images(images.astype(jnp.float32) / 127.5 - 1.0, k)

            latents = jax.lax.map(encode, (jnp.moveaxis(frames, 1, 0), keys))
            out["latents"] = jnp.moveaxis(latents, 0, 1).astype(jnp.float32)
        else:
            out["latents"] = arrays["latents"]
        vision = nnx.merge(self._vision[0], vision_state)
        resampler = nnx.merge(self._resampler[0], resampler_state)
        hidden = vision(arrays["clip_pixels"]).hidden_states[-2]
        out["image_tokens"] = resampler(hidden).astype(jnp.float32)
        b = out["latents"].shape[0]
        out["text"] = jnp.broadcast_to(self.text, (b, *self.text.shape[1:]))
        for k in ("pose", "face"):
            if k in arrays:
                out[k] = arrays[k]
        return out

    def _weights(self):
        return tuple(m[1] for m in (self._vae, self._vision, self._resampler))

    def encoders(self) -> tuple[nnx.Module | None, nnx.Module, nnx.Module]:
        """(VAE or None, CLIP vision, Resampler) over the weights placed on the mesh (no copy), for other
        programs of the run to share (the sample previews)."""
        return tuple(
            None if m[0] is None else nnx.merge(*m) for m in (self._vae, self._vision, self._resampler)
        )

    def __call__(self, examples: Sequence[dict], key: jax.Array) -> dict[str, jax.Array]:
        arrays = self.global_arrays(self.host_arrays(examples))
        return self._program(self._weights(), arrays, key)
