"""Train X-Dyna (stage 1 from converted SD 1.5 + AnimateDiff + IP-Adapter bundles, or continue an X-Dyna
bundle), or fine-tune DynamiCtrl.

    python train.py --config stage1 --init motion_unet=bundles/animatediff --init ip_adapter=bundles/ip \\
        --init sd15=bundles/sd15 --data data/human --scene-data data/scenes --output runs/stage1
    python train.py --config stage2 --init xdyna=runs/stage1/bundle --data data/human --output runs/stage2 \\
        --set batch_size=16 --set optimizer.ema_decay=0.9999
    python train.py ... --output runs/stage1 --resume         # continue after a pre-emption
    python train.py --config dynamictrl --init dynamictrl=bundles/dynamictrl --data data/dynamictrl \\
        --output runs/dynamictrl                                  # DynamiCtrl SFT on a prepared dataset

--config is a config of configs/train_xdyna.py (stage1, stage2, all), of configs/train_dynamictrl.py
(dynamictrl: the release's recipe; dynamictrl_tiny: the tests' tiny model), or a path to a Python file with
`get_config()` (`FILE.py:ARG` passes ARG); `--set key.sub=value` overrides one entry (a Python literal, else
a string). The run writes OUTPUT/checkpoints (orbax), OUTPUT/tensorboard and, at the end, OUTPUT/bundle: an
X-Dyna (or DynamiCtrl) bundle sample.py loads. On a TPU pod or a GPU cluster every process runs the same
command; each reads its own share of the data (see README "Training").

Errors in the options, the config or the init bundles stop the run with one `error: ...` line and exit
status 2 before anything is compiled; a NaN/Inf loss stops it with exit status 3 and the last good
checkpoint kept.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import sys
from pathlib import Path

import ml_collections

log = logging.getLogger("train")
NAMED_CONFIGS = ("stage1", "stage2", "all", "dynamictrl", "dynamictrl_tiny")
# --set may create keys only inside these free-form sections
OPEN_SECTIONS = ("compiler_options",)


class UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train X-Dyna (two stages) or fine-tune DynamiCtrl, on one device or a mesh."
    )
    p.add_argument(
        "--config",
        default="stage1",
        help="stage1 | stage2 | all | dynamictrl | dynamictrl_tiny, or FILE.py[:ARG]",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config entry")
    p.add_argument(
        "--init",
        action="append",
        default=[],
        metavar="KEY=DIR",
        help="starting bundles (xdyna_jax/training/start.py)",
    )
    p.add_argument(
        "--data", required=True, help="training clips: a prepared dataset or a folder of .npz examples"
    )
    p.add_argument("--scene-data", help="scene clips (no person) mixed in")
    p.add_argument("--val-data", help="held-out clips for the validation loss")
    p.add_argument("--output", required=True, help="run folder: checkpoints/, tensorboard/, bundle/")
    p.add_argument("--steps", type=int, help="total optimizer steps (overrides train.steps)")
    p.add_argument("--devices", type=int, help="use only the first N devices (default: all)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT's latest checkpoint")
    return p


def load_config(spec: str) -> ml_collections.ConfigDict:
    """A named config of configs/train_xdyna.py or `FILE.py[:ARG]`'s get_config([ARG])."""
    if spec in ("dynamictrl", "dynamictrl_tiny"):
        from configs import train_dynamictrl

        return train_dynamictrl.get_config("tiny" if spec == "dynamictrl_tiny" else "release")
    if spec in NAMED_CONFIGS:
        from configs import train_xdyna

        return train_xdyna.get_config(spec)
    file, _, arg = spec.partition(":")
    path = Path(file)
    if path.suffix != ".py" or not path.is_file():
        raise UsageError(f"--config {spec!r}: not one of {NAMED_CONFIGS} nor an existing .py file")
    module_spec = importlib.util.spec_from_file_location(f"_train_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UsageError(f"--config {path}: defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: ml_collections.ConfigDict, pairs: list[str]) -> ml_collections.ConfigDict:
    """`key.sub=value` entries set in `cfg`; an unknown key is an error naming the keys of its section."""
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE")
        *parents, leaf = key.split(".")
        node = cfg
        for i, name in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                raise UsageError(f"--set {key}: the config has no section {'.'.join(parents[: i + 1])!r}")
            node = node[name]
        if not isinstance(node, ml_collections.ConfigDict):
            raise UsageError(f"--set {key}: {'.'.join(parents)} is not a section")
        value = _literal(text)
        if leaf not in node:
            if parents and parents[0] in OPEN_SECTIONS:
                node[leaf] = value
                continue
            raise UsageError(
                f"--set {key}: unknown key; {'.'.join(parents) or 'the config'} has {sorted(node)}"
            )
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise UsageError(f"--set {key}={text}: {e}") from e
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("train").setLevel(logging.INFO)  # orbax logs every file at INFO through absl
    logging.getLogger("xdyna_jax").setLevel(logging.INFO)
    from xdyna_jax.training import loop

    loop.initialize_distributed()  # before anything touches the devices
    from xdyna_jax.training.batch import BatchError
    from xdyna_jax.training.checkpoint import CheckpointError
    from xdyna_jax.training.init import InitError
    from xdyna_jax.training.sources import SourceError
    from xdyna_jax.training.trainable import TrainableSetError

    try:
        cfg = apply_overrides(load_config(args.config), args.set)
        if args.steps is not None:
            cfg.train.steps = args.steps
        spec = loop.RunSpec(
            config=cfg,
            init=args.init,
            data=args.data,
            output=args.output,
            scene_data=args.scene_data,
            val_data=args.val_data,
            resume=args.resume,
            devices=args.devices,
        )
        loop.train(spec)
    except loop.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (
        UsageError,
        InitError,
        SourceError,
        BatchError,
        CheckpointError,
        TrainableSetError,
        loop.RunError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
