"""`python -m convert dynamictrl`: the DynamiCtrl release (a CogVideoX1.5-I2V pipeline folder) -> a pipeline bundle.

    python -m convert dynamictrl --input DynamiCtrl/ --output bundles/dynamictrl
    python -m convert dynamictrl --input DynamiCtrl/ --transformer Dynamictrl-Mask_C01/ --output bundles/mask_c01

The release's transformer is CogVideoX1.5-5B-I2V's plus one Pose-adaptive LayerNorm per block
(`transformer_blocks.i.control_norm1.{linear,norm}`); a Mask variant (Dynamictrl-Mask_B01 / _C01: config.json
and shards at its root) replaces it. Parts become bundles of kinds dynamictrl_transformer, cogvideox_vae and
t5_encoder, bf16 like the release unless `--dtype fp32`; manifest.json names the pipeline kind "dynamictrl".
A stock CogVideoX transformer is refused (its control_norm1 keys are missing). See convert/cogvideox_folder.py.
"""

from __future__ import annotations

from pathlib import Path

from convert import cogvideox_folder


def convert_dynamictrl(
    input: str | Path,
    output: str | Path,
    *,
    transformer: str | Path | None = None,
    dtype: str = "bf16",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert the DynamiCtrl pipeline folder `input` (transformer from `transformer` if given) at `output`."""
    return cogvideox_folder.convert_pipeline_folder(
        "dynamictrl",
        input,
        output,
        transformer=transformer,
        dtype=dtype,
        overwrite=overwrite,
        progress=progress,
    )


def add_arguments(p) -> None:
    cogvideox_folder.add_arguments(p, transformer_option=True)


def run(args) -> Path:
    return convert_dynamictrl(
        args.input, args.output, transformer=args.transformer, dtype=args.dtype, overwrite=args.overwrite
    )
