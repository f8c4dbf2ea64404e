"""transformers CLIPTextModel state dict <-> xdyna_jax.models.clip_text.CLIPTextModel.

Two key styles exist for the same weights: real SD 1.5 files (transformers 4) put everything under
`text_model.`; transformers 5 saves CLIPTextModel without that level. Both load; export writes the prefixed
style by default because that is what SD 1.5 folders and single-file checkpoints contain.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from convert.io import ConversionError
from convert.state import export_torch_state, load_torch_state
from xdyna_jax.models.clip_text import CLIPTextModel

PREFIX = "text_model."
# A buffer (0..76) that older transformers saved with the weights; positions are implicit in our model.
_IGNORE = (r"^embeddings\.position_ids$",)


def load_clip_text_state(
    model: CLIPTextModel, state_dict: Mapping[str, np.ndarray], source: str
) -> CLIPTextModel:
    """Fill `model` (concrete or nnx.eval_shape) from CLIPTextModel weights, with or without `text_model.`."""
    stripped: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        name = key.removeprefix(PREFIX)
        if name in stripped:
            raise ConversionError(f"{source}: {name!r} appears both with and without the {PREFIX!r} prefix")
        stripped[name] = value
    return load_torch_state(model, stripped, source=source, ignore=_IGNORE)


def export_clip_text_state(model: CLIPTextModel, prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """The model as a float32 CLIPTextModel state dict; prefix="" gives transformers 5's key style."""
    return {prefix + key: value for key, value in export_torch_state(model).items()}
