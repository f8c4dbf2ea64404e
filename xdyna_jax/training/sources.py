"""Where training examples come from: the protocol the loop reads, and a folder-of-npz source.

An example source is an iterator of example dicts that can report and restore its position:

    next(source) -> {"frames": uint8 (1 + N, H, W, 3), ...}     # index 0 = the reference frame
    source.get_state() -> JSON-able (dict, list, str, ... or bytes)
    source.set_state(state)                                      # continue exactly where get_state was

Example keys (batch.py turns them into the step's batch):
  frames     uint8 (1 + N, H, W, 3) RGB; frame 0 is the reference (from the same video), 1..N the driven clip;
  latents    float (1 + N, h, w, C) precomputed VAE latents (as `vae.latents_from_images`), instead of
             frames: the VAE is then skipped; `reference` (uint8 (H', W', 3)) then gives the IP image;
  reference  optional uint8 image for the IP-Adapter tokens (default: frames[0]);
  pose       uint8 / float (N or 1 + N, H, W, 3) rendered skeletons; face (N or 1 + N, H, W, 6) S-Face maps
             (with 1 + N frames the reference's own condition, index 0, is not used).

Each process reads only its own share of the global batch; the source is responsible for sharding by
process (the grain pipeline in `xdyna_jax.data` does it; `NpzClips` here takes every process_count-th file).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

EXAMPLE_SUFFIX = ".npz"


@runtime_checkable
class ExampleSource(Protocol):
    def __iter__(self) -> Iterator[dict]: ...

    def __next__(self) -> dict: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


class SourceError(ValueError):
    """A data folder that cannot feed training (missing, empty, unreadable example)."""


class NpzClips:
    """A folder of `*.npz` examples (one clip each, the keys of the module docstring), read in a shuffled
    order that is fixed by `seed` and reshuffled every epoch; endless. Process p of P reads files p, p + P, ...
    of the sorted list. The position is (epoch, index), so a restored source yields exactly what the
    interrupted one would have."""

    def __init__(self, folder: str | Path, *, seed: int = 0, process_index: int = 0, process_count: int = 1):
        folder = Path(folder)
        if not folder.is_dir():
            raise SourceError(f"data folder {folder} does not exist")
        files = sorted(folder.glob(f"*{EXAMPLE_SUFFIX}"))[process_index::process_count]
        if not files:
            raise SourceError(f"{folder} holds no {EXAMPLE_SUFFIX} examples for process {process_index}")
        self.folder, self.files, self.seed = folder, files, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files))

    def __iter__(self) -> NpzClips:
        return self

    def __next__(self) -> dict:
        file = self.files[self._order[self.index]]
        self.index += 1
        if self.index == len(self.files):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._shuffled(self.epoch)
        try:
            with np.load(file) as data:
                return {k: data[k] for k in data.files}
        except Exception as e:  # zip / pickle / format errors: one message naming the file
            raise SourceError(f"cannot read training example {file}: {e}") from e

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "files": len(self.files)}

    def set_state(self, state: dict) -> None:
        if state.get("files") != len(self.files):
            raise SourceError(
                f"{self.folder}: the checkpoint's data position is for {state.get('files')} files per "
                f"process, this folder has {len(self.files)}"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffled(self.epoch)


def write_npz_example(path: str | Path, example: dict) -> Path:
    """One example as an `.npz` file NpzClips reads (for small datasets, debugging and tests)."""
    path = Path(path)
    np.savez(path, **{k: np.asarray(v) for k, v in example.items()})
    return path


class MixedSource:
    """Human clips mixed with scene clips (no person: blank pose / face conditions), a fraction `ratio` of
    the examples from `scene`, chosen by a seeded draw per example, so the mix is part of the position."""

    def __init__(self, human: ExampleSource, scene: ExampleSource, ratio: float, seed: int = 0):
        if not 0.0 <= ratio <= 1.0:
            raise SourceError(f"scene ratio must be in [0, 1], got {ratio}")
        self.human, self.scene, self.ratio, self.seed = human, scene, ratio, seed
        self.count = 0

    def __iter__(self) -> MixedSource:
        return self

    def __next__(self) -> dict:
        from_scene = np.random.default_rng([self.seed, self.count]).random() < self.ratio
        self.count += 1
        if not from_scene:
            return next(self.human)
        example = dict(next(self.scene))
        n = len(example["frames"] if "frames" in example else example["latents"]) - 1
        hw = np.shape(example["frames"])[1:3] if "frames" in example else np.shape(example["reference"])[:2]
        example.setdefault("pose", np.zeros((n, *hw, 3), np.uint8))
        example.setdefault("face", np.zeros((n, *hw, 6), np.uint8))
        return example

    def get_state(self) -> dict:
        return {"count": self.count, "human": self.human.get_state(), "scene": self.scene.get_state()}

    def set_state(self, state: dict) -> None:
        self.count = int(state["count"])
        self.human.set_state(state["human"])
        self.scene.set_state(state["scene"])


class PreparedClips:
    """A dataset written by `python -m xdyna_jax.data.prepare`, through its grain clip pipeline (sharded by
    process, augmented, human and scene clips mixed there); the position is grain's iterator state."""

    def __init__(self, cfg, process_index: int, process_count: int):
        import grain

        from xdyna_jax.data.pipeline import make_iterator

        self._it = make_iterator(cfg, grain.sharding.ShardOptions(process_index, process_count))

    def __iter__(self) -> PreparedClips:
        return self

    def __next__(self) -> dict:
        from xdyna_jax.data.pipeline import strip_bookkeeping

        example = strip_bookkeeping(next(self._it))
        example.pop("scene", None)  # scene clips already carry blank conditions
        return example

    def get_state(self) -> Any:
        return self._it.get_state()

    def set_state(self, state: Any) -> None:
        self._it.set_state(state)


def open_source(
    folder: str | Path,
    *,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    scene: str | Path | None = None,
    scene_ratio: float = 0.1,
    clips: dict | None = None,
) -> ExampleSource:
    """The example source of a data folder (and of a scene folder mixed in): folders of `.npz` examples,
    or datasets written by `python -m xdyna_jax.data.prepare` (read through its grain pipeline, with the
    clip options `clips`: num_frames, stride, flip_prob, max_scale, face; see `xdyna_jax.data.DataConfig`)."""
    shard = dict(process_index=process_index, process_count=process_count)
    folder = Path(folder)
    if folder.is_dir() and any(folder.glob(f"*{EXAMPLE_SUFFIX}")):
        human = NpzClips(folder, seed=seed, **shard)
        if scene is None:
            return human
        return MixedSource(human, NpzClips(scene, seed=seed + 1, **shard), scene_ratio, seed)
    if (folder / "dataset.json").is_file():
        from xdyna_jax.data.pipeline import DataConfig

        cfg = DataConfig(
            human=str(folder),
            scene=None if scene is None else str(scene),
            scene_ratio=0.0 if scene is None else scene_ratio,
            seed=seed,
            **(clips or {}),
        )
        return PreparedClips(cfg, process_index, process_count)
    raise SourceError(
        f"{folder} holds no {EXAMPLE_SUFFIX} examples and no dataset.json (python -m xdyna_jax.data.prepare)"
    )
