"""`python -m convert cogvideox`: a stock CogVideoX / CogVideoX1.5 (-I2V) diffusers folder -> a pipeline bundle.

    python -m convert cogvideox --input CogVideoX1.5-5B-I2V/ --output bundles/cogvideox15_i2v [--dtype fp32]

The folder's transformer/, vae/ and text_encoder/ (sharded safetensors) become one model bundle each
(kinds cogvideox_transformer, cogvideox_vae, t5_encoder), streamed tensor by tensor; tokenizer/ and the
scheduler config are copied; manifest.json names the pipeline kind "cogvideox". A DynamiCtrl transformer
(control_norm1 keys) is refused with a pointer to `convert dynamictrl`. See convert/cogvideox_folder.py.
"""

from __future__ import annotations

from pathlib import Path

from convert import cogvideox_folder


def convert_cogvideox(
    input: str | Path,
    output: str | Path,
    *,
    dtype: str = "bf16",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert the diffusers CogVideoX pipeline folder `input` into a "cogvideox" pipeline bundle at `output`."""
    return cogvideox_folder.convert_pipeline_folder(
        "cogvideox", input, output, dtype=dtype, overwrite=overwrite, progress=progress
    )


def add_arguments(p) -> None:
    cogvideox_folder.add_arguments(p, transformer_option=False)


def run(args) -> Path:
    return convert_cogvideox(args.input, args.output, dtype=args.dtype, overwrite=args.overwrite)
