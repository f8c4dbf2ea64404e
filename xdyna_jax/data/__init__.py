"""Training data: from real videos, or from the synthetic world.

- `prepare.py` (`python -m xdyna_jax.data.prepare`): a folder of videos (+ keypoints, landmarks, face
  patches, or extraction with the conditioning extractors) -> an array_record dataset at the training size;
- `records.py`: that dataset's on-disk format (`dataset.json`, one `.npz`-encoded record per video);
- `augment.py`: flip and zoom-crop of frames and points together;
- `pipeline.py`: the grain pipeline sampling training clips (reference + N frames, pose and S-Face
  conditions rendered by `xdyna_jax.conditioning`), mixing human and scene data, sharded by process, with a
  checkpointable iterator;
- `synthetic.py` (`python -m xdyna_jax.data.synthetic`): a procedural world of palette-coloured characters
  and moving scenes, written in the layout `prepare` ingests (`synthetic_character`, `synthetic_draw`,
  `synthetic_scene` hold its parts).
"""

from xdyna_jax.data.pipeline import DataConfig, clip_dataset, make_dataset, make_iterator, strip_bookkeeping
from xdyna_jax.data.records import DatasetError, read_info

__all__ = [
    "DataConfig",
    "DatasetError",
    "clip_dataset",
    "make_dataset",
    "make_iterator",
    "read_info",
    "strip_bookkeeping",
]
