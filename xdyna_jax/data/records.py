"""The on-disk training dataset: array_record shards of one record per video, plus `dataset.json`.

Layout of a dataset folder (written by `xdyna_jax.data.prepare`):

    dataset.json                              sizes, counts, options, one entry per video (record order)
    videos.array_record-00000-of-00002        records 0 .. k-1
    videos.array_record-00001-of-00002        records k ..

The shards are plain ArrayRecord files (the format tfds writes for `file_format="array_record"`, with tfds's
shard naming), read by `grain.sources.ArrayRecordDataSource` in `dataset.json`'s file order. The records are
not tfds's tf.Example protos, whose decoder needs TensorFlow; each record is the bytes of a NumPy `.npz`
archive (`np.savez`, read with `allow_pickle=False`) holding, for a video of T frames at the dataset's
H x W canvas:

    name          str            the video's file stem
    fps           float64        frames per second of the source (NaN when the file records none)
    scene         bool           a scene video (no person: no keypoints, blank conditions)
    frames        the T frames, uint8 (T, H, W, 3) RGB, cropped and resized as the release crops driving
                  frames (`io.driving.crop_box`): stored by `codec` (see `encode_frames`)
    body          float32 (T, 18, 3)     OpenPose-18 x, y, score per frame, canvas pixels (NaN: missing)
    hands         float32 (T, 2, 21, 3)  [left, right] hand x, y, score, canvas pixels
    landmarks     float32 (T, 68, 2)     68 face landmarks x, y, canvas pixels (NaN: no face that frame)
    patches       cross-identity face frames (T, H, W, 3), stored like `frames` (prefix `patches`)
    latents       float32 (T, H/8, W/8, C) VAE latents of `frames` (posterior mean, scaled for the UNet)

body/hands are absent for scene videos, landmarks/patches/latents when the dataset was prepared without
them. Keeping each video whole in one record lets a clip sampler draw any window and any reference frame of
it with one read; with a compressed codec only the frames a clip uses are decoded.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import threading
from pathlib import Path

import cv2
import numpy as np

FORMAT = "xdyna_jax.data/1"
INFO_FILE = "dataset.json"
CODECS = ("png", "jpeg", "raw")


class DatasetError(ValueError):
    """A dataset folder or record that cannot be used (missing, wrong format, mismatched options)."""


def shard_names(num_shards: int) -> list[str]:
    """tfds's shard naming: `videos.array_record-00000-of-00003`, ..."""
    return [f"videos.array_record-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


# ------------------------------------------------------------------------------------------------------
# Frames
# ------------------------------------------------------------------------------------------------------


def encode_frames(frames: np.ndarray, codec: str, prefix: str, *, jpeg_quality: int = 95) -> dict:
    """uint8 (T, H, W, 3) RGB -> the record's arrays for them.

    raw: `<prefix>` the array itself. png / jpeg: `<prefix>_data` uint8 (every frame's file bytes, one after
    another) and `<prefix>_offsets` int64 (T + 1,) (frame t is data[offsets[t]:offsets[t + 1]]), plus
    `<prefix>_codec`. png is lossless; jpeg (quality `jpeg_quality`) is ~5x smaller on real footage.
    """
    if codec not in CODECS:
        raise ValueError(f"frame codec must be one of {CODECS}, got {codec!r}")
    if codec == "raw":
        return {prefix: np.ascontiguousarray(frames, np.uint8), f"{prefix}_codec": np.str_(codec)}
    ext, params = (".png", []) if codec == "png" else (".jpg", [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    blobs = []
    for frame in frames:
        ok, blob = cv2.imencode(ext, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), params)
        if not ok:
            raise ValueError(f"OpenCV could not encode a frame as {codec}")
        blobs.append(blob.reshape(-1))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return {
        f"{prefix}_data": np.concatenate(blobs),
        f"{prefix}_offsets": offsets,
        f"{prefix}_codec": np.str_(codec),
    }


def decode_frames(record, prefix: str, indices) -> np.ndarray:
    """Frames `indices` of the record's `<prefix>` frames -> uint8 (len(indices), H, W, 3) RGB."""
    codec = str(record[f"{prefix}_codec"])
    if codec == "raw":
        return np.asarray(record[prefix])[np.asarray(indices)]
    data, offsets = record[f"{prefix}_data"], record[f"{prefix}_offsets"]
    out = []
    for t in indices:
        bgr = cv2.imdecode(data[offsets[t] : offsets[t + 1]], cv2.IMREAD_COLOR)
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return np.stack(out)


# ------------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------------


def encode_record(arrays: dict) -> bytes:
    """The record's arrays -> `.npz` bytes (uncompressed: frames are already compressed by their codec)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


_READ_LOCK = threading.Lock()


class Record:
    """One record opened lazily: `record[key]` reads only that member of the archive (cached)."""

    def __init__(self, data: bytes, where: str = "record"):
        try:
            self._npz = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:
            raise DatasetError(f"{where}: not an xdyna_jax.data record ({type(e).__name__}: {e})") from e
        self._cache: dict = {}
        self.where = where

    def __contains__(self, key: str) -> bool:
        return key in self._npz.files

    def __getitem__(self, key: str):
        if key not in self._cache:
            if key not in self._npz.files:
                raise DatasetError(f"{self.where}: no {key!r} (it has {sorted(self._npz.files)})")
            # one member at a time: np.load parses each member's header with ast.literal_eval, and CPython
            # before 3.11.8 / 3.12.1 (gh-106905) can fail that from several threads at once with "SystemError: AST
            # constructor recursion depth mismatch" -- which killed a training run's grain reader threads
            with _READ_LOCK:
                self._cache[key] = self._npz[key]
        return self._cache[key]

    @property
    def name(self) -> str:
        return str(self["name"])

    @property
    def num_frames(self) -> int:
        if "frames" in self:
            return len(self["frames"])
        return len(self["frames_offsets"]) - 1


# ------------------------------------------------------------------------------------------------------
# dataset.json
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What `dataset.json` says about a dataset folder."""

    path: Path
    height: int
    width: int
    scene: bool
    codec: str
    files: tuple[str, ...]
    videos: tuple[dict, ...]  # per record: name, frames, fps, source_hw
    keypoints: bool
    landmarks: bool
    patches: bool
    latent_shape: tuple[int, ...] | None  # (h, w, C) per frame
    options: dict

    @property
    def num_frames(self) -> tuple[int, ...]:
        return tuple(v["frames"] for v in self.videos)

    def shard_paths(self) -> list[str]:
        return [str(self.path / f) for f in self.files]


def write_info(folder: Path, info: dict) -> None:
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1, allow_nan=True) + "\n")


def read_info(folder: str | Path) -> DatasetInfo:
    """A dataset folder's `dataset.json` -> DatasetInfo; one clear error when it is not a dataset."""
    folder = Path(folder)
    path = folder / INFO_FILE
    if not path.is_file():
        raise DatasetError(f"{folder}: not an xdyna_jax.data dataset (no {INFO_FILE}; make one with prepare)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e
    if raw.get("format") != FORMAT:
        raise DatasetError(f"{path}: format {raw.get('format')!r}, this code reads {FORMAT!r}")
    missing = [f for f in raw["files"] if not (folder / f).is_file()]
    if missing:
        raise DatasetError(f"{folder}: shard file {missing[0]} named in {INFO_FILE} is missing")
    latent = raw.get("latent_shape")
    return DatasetInfo(
        path=folder,
        height=int(raw["height"]),
        width=int(raw["width"]),
        scene=bool(raw["scene"]),
        codec=raw["codec"],
        files=tuple(raw["files"]),
        videos=tuple(raw["videos"]),
        keypoints=bool(raw["has"]["keypoints"]),
        landmarks=bool(raw["has"]["landmarks"]),
        patches=bool(raw["has"]["face_patches"]),
        latent_shape=None if latent is None else tuple(latent),
        options=raw.get("options", {}),
    )


def fps_value(fps: float | None) -> float:
    return math.nan if fps is None else float(fps)
