"""Command line: `python -m convert <source> --input ... --output ...` (see README)."""

from __future__ import annotations

import argparse
import sys

from convert.io import ConversionError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert", description="PyTorch checkpoints <-> xdyna-jax bundles"
    )
    sub = p.add_subparsers(dest="command", required=True)

    sd = sub.add_parser("sd15", help="Stable Diffusion 1.x (diffusers folder or single file) -> bundles")
    sd.add_argument(
        "--input", required=True, help="diffusers SD1.5 folder, or a .safetensors/.ckpt single file"
    )
    sd.add_argument("--output", required=True, help="output folder (unet/, vae/, text_encoder/, tokenizer/)")
    sd.add_argument("--tokenizer", help="tokenizer folder (vocab.json, merges.txt) for a single-file input")
    sd.add_argument(
        "--config-from", help="diffusers folder whose config.json files describe a non-SD1.5 single file"
    )
    sd.add_argument(
        "--use-ema", action="store_true", help="single file: take the UNet from its model_ema.* copy"
    )
    sd.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    ex = sub.add_parser("export", help="bundles -> diffusers folder or SD single file")
    ex.add_argument("--input", required=True, help="a `convert sd15` output folder, or one bundle")
    ex.add_argument(
        "--output", required=True, help="output folder (diffusers) or .safetensors file (single-file)"
    )
    ex.add_argument("--layout", choices=("diffusers", "single-file"), default="diffusers")
    ex.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "sd15":
            from convert.sd15 import convert_sd15

            out = convert_sd15(
                args.input,
                args.output,
                tokenizer=args.tokenizer,
                config_from=args.config_from,
                use_ema=args.use_ema,
                overwrite=args.overwrite,
            )
        else:
            from convert.export import export

            out = export(args.input, args.output, args.layout, overwrite=args.overwrite)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
