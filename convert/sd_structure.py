"""SD 1.x UNet / ControlNet structure read off diffusers-named tensor shapes, for files without a config.

SD 1.x fixes the block layout (widths 1x, 2x, 4x, 4x the base, cross-attention in all but the deepest
level), so only the sizes fine-tunes change are read: input channels, base width, context width, projection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from convert.io import ConversionError
from convert.state import tensor_shape

# The first cross-attention transformer of down block 0; every SD 1.x UNet and ControlNet has it.
_FIRST_ATTENTION = "down_blocks.0.attentions.0."
# SD 2.x's OpenCLIP context: its heads are 64 channels wide rather than 8 per layer, which shapes cannot show.
_SD2_CONTEXT = 1024


def sd1x_unet_fields(state: Mapping[str, Any], source: str, hint: str = "") -> dict:
    """in_channels, block_out_channels, cross_attention_dim, use_linear_projection of UNetConfig /
    ControlNetConfig. A missing key is one ConversionError naming it (+ `hint`); SD 2.x is refused."""
    hint = hint or "not an SD 1.x-shaped model?"
    width, in_channels = tensor_shape(state, "conv_in.weight", source, hint)[:2]
    to_k = _FIRST_ATTENTION + "transformer_blocks.0.attn2.to_k.weight"
    context = tensor_shape(state, to_k, source, hint)[1]
    if context == _SD2_CONTEXT:
        raise ConversionError(
            f"{source}: looks like an SD 2.x model ({to_k} has context dim {context}, SD 1.x has 768); "
            "pass --config-from with its config"
        )
    proj_in = tensor_shape(state, _FIRST_ATTENTION + "proj_in.weight", source, hint)
    return dict(
        in_channels=in_channels,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        cross_attention_dim=context,
        use_linear_projection=len(proj_in) == 2,  # Linear [out, in] vs 1x1 Conv2d [out, in, 1, 1]
    )
