"""Training clips from prepared datasets (`xdyna_jax.data.prepare`), as a grain pipeline.

    cfg = DataConfig(human="data/human", scene="data/scene", scene_ratio=0.25, batch_size=2)
    it = make_iterator(cfg)                      # this process's share (jax.process_index / process_count)
    batch = next(it)                             # dict of numpy arrays, leading axis batch_size
    saved = it.get_state()                       # store with the checkpoint ...
    it = make_iterator(cfg); it.set_state(saved) # ... and the resumed run reads exactly what came next

An example (one clip of N = `num_frames` driven frames, `stride` frames apart, from one video):

    frames         uint8 (1 + N, H, W, 3)   index 0 the reference: another frame of the same video, drawn
                                            uniformly from those not in the clip
    latents        float32 (1 + N, h, w, C) the same frames' stored VAE latents (datasets prepared with
                                            --latents only)
    pose           uint8 (N, H, W, 3)       the driven frames' skeletons, drawn by
                                            `conditioning.pose.draw_poses(..., draw_head=False)`, as the Pose
                                            ControlNet saw them; all zero for scene clips
    face           uint8 (N, H, W, 6)       S-Face condition, concat[local, global] maps
                                            (`conditioning.face.sface_maps` + `face_condition`); zero for
                                            scene clips; absent when `face` resolves to "none"
    scene          bool                     a clip of the scene dataset
    video          int32                    the record the clip came from (bookkeeping, not a model input)
    frame_indices  int32 (1 + N,)           its frames in that video, reference first (bookkeeping)

`face` selects the S-Face source: "patches" renders the maps from the dataset's cross-identity face
patches (the video re-enacted by another identity, `--face-patches`) inside the clip's own face boxes, as
the paper trains the S-Face ControlNet (stage 2), so the maps carry expression but not the identity the
reference shows; "own" renders them from the clip's own frames, the weaker variant (the face condition then
also leaks the target face's identity, which the model can learn to copy); "auto" takes patches when the
dataset has them, else its own face when it has landmarks, else no face condition; "none" leaves it out.
The maps stay uint8: the release's per-video min-max normalisation (`face.normalize_frames`) belongs to the
model input, not the data.

Augmentation (`augment.py`), one draw per clip, applied alike to frames, face patches, keypoints and
landmarks: a horizontal flip with probability `flip_prob` (left/right keypoints swap slots), and a zoom by a
factor uniform in [1, `max_scale`] cut back to H x W at a uniform offset. Stored latents cannot follow
either, so a dataset with latents needs flip_prob = 0 and max_scale = 1.

Order and determinism. Each dataset is an endless stream of clips: its videos shuffled (reshuffled every
epoch, one clip per video per epoch), each clip's window, reference and augmentation drawn from grain's
per-index generator, all seeded from `seed`. With a scene dataset the two streams are interleaved in the
proportion scene_ratio : 1 - scene_ratio (grain's `MapDataset.mix`, a fixed deterministic interleave). The
resulting global stream is split between processes element by element (process p takes elements p, p + P,
p + 2P, ...) before batching: every process reads all videos, the processes' shares are disjoint and
together are exactly the one-process stream, whatever the process count. Each element depends on its index
alone, so the iterator's state is one position, and a restored iterator continues exactly.
"""

from __future__ import annotations

import dataclasses
import logging

import grain
import numpy as np

from xdyna_jax.conditioning.face import face_condition, sface_maps
from xdyna_jax.conditioning.pose import draw_poses, from_arrays
from xdyna_jax.data.augment import (
    flip_keypoints,
    flip_landmarks,
    zoom_crop_frames,
    zoom_crop_points,
    zoom_size,
)
from xdyna_jax.data.records import DatasetError, DatasetInfo, Record, decode_frames, read_info

log = logging.getLogger(__name__)

FACE_MODES = ("auto", "patches", "own", "none")
BOOKKEEPING_KEYS = ("video", "frame_indices")  # in every example, for logs and tests; not model inputs


@dataclasses.dataclass(frozen=True)
class DataConfig:
    human: str  # a prepared human dataset folder
    scene: str | None = None  # a prepared --scene dataset folder
    scene_ratio: float = 0.0  # share of scene clips in the stream (needs `scene`)
    num_frames: int = 16  # driven frames per clip (N)
    stride: int = 1  # frames between consecutive clip frames
    flip_prob: float = 0.5
    max_scale: float = 1.0  # zoom-crop factor drawn from [1, max_scale]; 1 = no zoom
    face: str = "auto"  # see the module docstring
    batch_size: int | None = None  # examples per batch on this process; None yields single examples
    seed: int = 0
    num_threads: int = 4  # grain reader threads
    prefetch: int = 8  # elements (or batches) read ahead

    def __post_init__(self):
        if self.num_frames < 1 or self.stride < 1:
            raise ValueError(
                f"data.num_frames and data.stride must be >= 1, got {self.num_frames}, {self.stride}"
            )
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"data.flip_prob must be in [0, 1], got {self.flip_prob}")
        if not self.max_scale >= 1.0:
            raise ValueError(f"data.max_scale must be >= 1, got {self.max_scale}")
        if not 0.0 <= self.scene_ratio < 1.0:
            raise ValueError(f"data.scene_ratio must be in [0, 1), got {self.scene_ratio}")
        if (self.scene is None) != (self.scene_ratio == 0.0):
            raise ValueError(
                "data.scene and data.scene_ratio go together: a scene dataset needs a ratio > 0 and a ratio "
                f"needs a scene dataset (got scene={self.scene!r}, scene_ratio={self.scene_ratio})"
            )
        if self.face not in FACE_MODES:
            raise ValueError(f"data.face must be one of {FACE_MODES}, got {self.face!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1 or None, got {self.batch_size}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"data.seed must be in [0, 2**32), got {self.seed}")

    @property
    def augments(self) -> bool:
        return self.flip_prob > 0.0 or self.max_scale > 1.0


def resolve_face(mode: str, info: DatasetInfo) -> str:
    """ "patches", "own" or "none" for a human dataset (see the module docstring)."""
    if mode == "auto":
        return "patches" if info.patches else "own" if info.landmarks else "none"
    if mode == "patches" and not info.patches:
        raise DatasetError(
            f"{info.path}: data.face='patches' but the dataset has no face patches (--face-patches)"
        )
    if mode == "own" and not info.landmarks:
        raise DatasetError(f"{info.path}: data.face='own' but the dataset has no landmarks (--faces)")
    return mode


class _Videos(grain.sources.RandomAccessDataSource):
    """The usable records of a dataset: element i = (record index, record bytes)."""

    def __init__(self, info: DatasetInfo, keep: list[int]):
        self._source = grain.sources.ArrayRecordDataSource(info.shard_paths())
        self._keep = keep

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, i):
        k = self._keep[i]
        return k, self._source[k]


@dataclasses.dataclass(frozen=True)
class ClipSampler:
    """(record index, record bytes), generator -> one training example (see the module docstring)."""

    info: DatasetInfo
    num_frames: int
    stride: int
    flip_prob: float
    max_scale: float
    face: str  # "patches" | "own" | "none"; for a scene dataset: whether to emit a zero face

    def __call__(self, element, rng: np.random.Generator) -> dict:
        index, data = element
        rec = Record(data, f"{self.info.path} record {index}")
        h, w, n = self.info.height, self.info.width, self.num_frames
        total = self.info.videos[index]["frames"]
        # every draw is made whatever the options, so turning one augmentation off keeps the others' draws
        start = int(rng.integers(0, total - (n - 1) * self.stride))
        clip = start + self.stride * np.arange(n)
        others = np.setdiff1d(np.arange(total), clip)
        reference = int(others[rng.integers(len(others))])
        flip = bool(rng.random() < self.flip_prob)
        scale = float(rng.uniform(1.0, self.max_scale))
        zh, zw = zoom_size(h, w, scale)
        offset = (int(rng.integers(0, zh - h + 1)), int(rng.integers(0, zw - w + 1)))

        def frames_of(prefix, indices):
            out = zoom_crop_frames(decode_frames(rec, prefix, indices), scale, offset)
            return np.ascontiguousarray(out[:, :, ::-1]) if flip else out

        def points_of(key, indices):
            return zoom_crop_points(np.asarray(rec[key], np.float64)[indices], h, w, scale, offset)

        indices = np.concatenate([[reference], clip])
        example = {
            "frames": frames_of("frames", indices),
            "scene": np.bool_(self.info.scene),
            "video": np.int32(index),
            "frame_indices": indices.astype(np.int32),
        }
        if self.info.latent_shape is not None:
            example["latents"] = np.asarray(rec["latents"][indices], np.float32)
        if self.info.scene:
            example["pose"] = np.zeros((n, h, w, 3), np.uint8)
            if self.face != "none":
                example["face"] = np.zeros((n, h, w, 6), np.uint8)
            return example

        body, hands = points_of("body", clip), points_of("hands", clip)
        if flip:
            body, hands = flip_keypoints(body, hands, w)
        example["pose"] = draw_poses(from_arrays(body, hands), h, w, draw_head=False)
        if self.face != "none":
            landmarks = points_of("landmarks", clip)
            if flip:
                landmarks = flip_landmarks(landmarks, w)
            pixels = frames_of("patches", clip) if self.face == "patches" else example["frames"][1:]
            found = [m if np.isfinite(m).all() else None for m in landmarks]
            example["face"] = face_condition(*sface_maps(list(pixels), found))
        return example


def _usable(info: DatasetInfo, cfg: DataConfig) -> list[int]:
    """Records long enough for a clip plus a separate reference frame; the rest are skipped with a warning."""
    need = max((cfg.num_frames - 1) * cfg.stride + 1, cfg.num_frames + 1)
    keep = [i for i, t in enumerate(info.num_frames) if t >= need]
    if len(keep) < len(info.videos):
        short = [info.videos[i]["name"] for i in range(len(info.videos)) if i not in set(keep)]
        log.warning(
            "%s: %d videos shorter than %d frames skipped: %s", info.path, len(short), need, short[:5]
        )
    if not keep:
        raise DatasetError(
            f"{info.path}: no video has the {need} frames a clip of {cfg.num_frames} at stride {cfg.stride} "
            "plus a reference needs"
        )
    return keep


def _stream(info: DatasetInfo, cfg: DataConfig, face: str, seeds) -> grain.MapDataset:
    shuffle_seed, clip_seed = (int(s) for s in seeds)
    sampler = ClipSampler(info, cfg.num_frames, cfg.stride, cfg.flip_prob, cfg.max_scale, face)
    videos = grain.MapDataset.source(_Videos(info, _usable(info, cfg)))
    return videos.shuffle(seed=shuffle_seed).repeat().random_map(sampler, seed=clip_seed)


def _check_pair(human: DatasetInfo, scene: DatasetInfo) -> None:
    if not scene.scene:
        raise DatasetError(f"{scene.path}: data.scene names a dataset not prepared with --scene")
    if (scene.height, scene.width) != (human.height, human.width):
        raise DatasetError(
            f"{scene.path}: frames are {scene.height}x{scene.width} but the human dataset's "
            f"({human.path}) are {human.height}x{human.width}"
        )
    if scene.latent_shape != human.latent_shape:
        raise DatasetError(
            f"{scene.path}: latents {scene.latent_shape} but the human dataset's ({human.path}) are "
            f"{human.latent_shape} (prepare both with the same --latents, or neither)"
        )


def clip_dataset(cfg: DataConfig) -> grain.MapDataset:
    """The global (all processes') endless stream of examples, indexable by position."""
    human = read_info(cfg.human)
    if human.scene:
        raise DatasetError(f"{human.path}: data.human names a --scene dataset")
    infos = [human]
    if cfg.scene is not None:
        infos.append(read_info(cfg.scene))
        _check_pair(human, infos[1])
    if cfg.augments and human.latent_shape is not None:
        raise DatasetError(
            f"{human.path}: the dataset stores VAE latents, which cannot be flipped or zoomed with the "
            f"frames; set data.flip_prob = 0 and data.max_scale = 1 (got {cfg.flip_prob}, {cfg.max_scale})"
        )
    face = resolve_face(cfg.face, human)
    seeds = np.random.SeedSequence(cfg.seed).generate_state(4)
    streams = [_stream(info, cfg, face, seeds[2 * i : 2 * i + 2]) for i, info in enumerate(infos)]
    if len(streams) == 1:
        return streams[0]
    return grain.MapDataset.mix(streams, weights=[1.0 - cfg.scene_ratio, cfg.scene_ratio])


def make_dataset(cfg: DataConfig, shard: grain.sharding.ShardOptions | None = None) -> grain.IterDataset:
    """This process's share of the stream (`shard`, default `ShardByJaxProcess()`), batched, read ahead by
    `num_threads` threads."""
    shard = grain.sharding.ShardByJaxProcess() if shard is None else shard
    if not 0 <= shard.shard_index < shard.shard_count:
        raise ValueError(f"shard index {shard.shard_index} not in [0, {shard.shard_count})")
    ds = clip_dataset(cfg)[shard.shard_index :: shard.shard_count]
    if cfg.batch_size is not None:
        ds = ds.batch(cfg.batch_size, drop_remainder=True)
    return ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
    )


def make_iterator(cfg: DataConfig, shard: grain.sharding.ShardOptions | None = None) -> grain.DatasetIterator:
    """`iter(make_dataset(...))`: a grain DatasetIterator (get_state / set_state for checkpoints)."""
    return iter(make_dataset(cfg, shard))


def strip_bookkeeping(batch: dict) -> dict:
    """The batch without `BOOKKEEPING_KEYS` (what a train step takes)."""
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS}
