"""Command line: `python -m convert <source> --input ... --output ...` (see README).

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> Path`;
register it in COMMANDS (name -> (module, one-line help)).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from convert.io import ConversionError

COMMANDS: dict[str, tuple[str, str]] = {
    "sd15": ("convert.sd15", "Stable Diffusion 1.x (diffusers folder or single file) -> bundles"),
    "controlnet": ("convert.controlnet", "ControlNet checkpoint <-> controlnet bundle"),
    "ip-adapter": ("convert.ip_adapter", "IP-Adapter-plus .bin + CLIP image encoder -> bundles"),
    "export": ("convert.export", "bundles -> diffusers folder or SD single file"),
    "animatediff": (
        "convert.animatediff",
        "AnimateDiff motion modules + SD 1.5 UNet bundle -> video UNet bundle",
    ),
    "xdyna-unet": ("convert.xdyna_unet", "official X-Dyna UNet checkpoint -> video UNet bundle"),
    "xdyna": ("convert.xdyna", "the whole X-Dyna release (+ SD 1.5 + IP-Adapter-plus) -> one X-Dyna bundle"),
    "dynamictrl": (
        "convert.dynamictrl",
        "the DynamiCtrl release (CogVideoX1.5-I2V folder) -> one DynamiCtrl bundle",
    ),
    "cogvideox": (
        "convert.cogvideox",
        "a stock CogVideoX / CogVideoX1.5 (-I2V) diffusers folder -> one bundle",
    ),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert", description="PyTorch checkpoints <-> xdyna-jax bundles"
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        out = importlib.import_module(COMMANDS[args.command][0]).run(args)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
