"""Wall time and peak RSS of the X-Dyna converters and exports on full-size fakes of the release.

    python -m bench.convert_memory                  # full size (11.5 GiB of fakes under the temp dir)
    python -m bench.convert_memory --scale 0.5      # every width halved: about a quarter of the bytes
    python -m bench.convert_memory --keep fakes/     # keep (and reuse) the fakes in fakes/

The fakes are random weights in the release's file layouts: an SD 1.5 diffusers folder (unet, vae,
text_encoder as safetensors), the X-Dyna UNet .ckpt (`state_dict` wrapper, DDP `module.` prefixes, motion
modules v1 with their pe buffers, Dynamics-Adapter, IP-Adapter projections), the pose and S-Face ControlNet
.ckpt files, ip-adapter-plus_sd15.bin and a CLIP ViT-H/14 image_encoder/ folder. Each converter and export
runs in a fresh `python -m convert` process; its peak RSS is that process's own (wait4's rusage).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GIB = 2**30


# ------------------------------------------------------------------------------------------------ fakes


def _configs(scale: float) -> dict:
    from xdyna_jax.models.clip_text import CLIPTextConfig
    from xdyna_jax.models.clip_vision import CLIPVisionConfig
    from xdyna_jax.models.controlnet import ControlNetConfig
    from xdyna_jax.models.resampler import ResamplerConfig
    from xdyna_jax.models.unet import UNetConfig
    from xdyna_jax.models.vae import VAEConfig

    def w(n: int, multiple: int = 32) -> int:  # a scaled width GroupNorm (32 groups) and heads still divide
        return max(multiple, int(round(n * scale / multiple)) * multiple)

    widths = tuple(w(c) for c in (320, 640, 1280, 1280))
    cross = w(768, 64)
    sd_unet = UNetConfig(block_out_channels=widths, cross_attention_dim=cross)
    xdyna_unet = dataclasses.replace(
        sd_unet,
        dynamics_adapter=True,
        ip_adapter_tokens=16,
        skip_reference_frame=True,
        motion_modules=True,
        motion_max_len=24,
        motion_mid_block=False,
        groupnorm_over_frames=True,
    )
    image_hidden = w(1280, 64)
    return dict(
        sd_unet=sd_unet,
        xdyna_unet=xdyna_unet,
        controlnet_pose=ControlNetConfig(block_out_channels=widths, cross_attention_dim=cross),
        controlnet_face=ControlNetConfig(
            block_out_channels=widths, cross_attention_dim=cross, conditioning_channels=6
        ),
        vae=VAEConfig(block_out_channels=tuple(w(c) for c in (128, 256, 512, 512))),
        text_encoder=CLIPTextConfig(
            hidden_size=cross, intermediate_size=4 * cross, num_attention_heads=cross // 64
        ),
        image_encoder=CLIPVisionConfig(
            hidden_size=image_hidden,
            intermediate_size=4 * image_hidden,
            num_attention_heads=image_hidden // 80,
        ),
        resampler=ResamplerConfig(dim=cross, heads=cross // 64, embedding_dim=image_hidden, output_dim=cross),
    )


def _random_state(model_cls, config, seed: int, prefix: str = "") -> dict:
    """PyTorch-named random torch tensors for model_cls(config), from a shape-only model (nothing eager)."""
    import torch
    from flax import nnx

    from convert.state import to_torch_layout, torch_key
    from xdyna_jax.nn.shape_only import shape_only_model

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(shape_only_model(model_cls, config), nnx.Param)):
        shape = to_torch_layout(path[-1], np.empty(var.shape, np.bool_)).shape
        t = torch.randn(shape, generator=gen).mul_(0.02)
        if path[-1] == "scale":
            t.add_(1.0)
        out[prefix + torch_key(path)] = t
    return out


def build_fakes(root: Path, scale: float) -> None:
    """Write every fake file under root (one model in memory at a time)."""
    import torch
    from safetensors.torch import save_file

    from convert.ip_adapter import ip_adapter_attn2_names
    from convert.video_unet import with_pe_buffers
    from xdyna_jax.models.clip_text import CLIPTextModel
    from xdyna_jax.models.clip_vision import CLIPVisionModelWithProjection
    from xdyna_jax.models.controlnet import ControlNetModel
    from xdyna_jax.models.resampler import Resampler
    from xdyna_jax.models.unet import UNet
    from xdyna_jax.models.vae import AutoencoderKL
    from xdyna_jax.nn.shape_only import shape_only_model

    cfg = _configs(scale)

    def folder(path: Path, config: dict, weights: str, state: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(config, indent=2))
        save_file(state, str(path / weights))

    sd15 = root / "sd15"
    folder(
        sd15 / "unet",
        cfg["sd_unet"].to_diffusers(),
        "diffusion_pytorch_model.safetensors",
        _random_state(UNet, cfg["sd_unet"], 0),
    )
    folder(
        sd15 / "vae",
        cfg["vae"].to_diffusers(),
        "diffusion_pytorch_model.safetensors",
        _random_state(AutoencoderKL, cfg["vae"], 1),
    )
    folder(
        sd15 / "text_encoder",
        cfg["text_encoder"].to_transformers(),
        "model.safetensors",
        _random_state(CLIPTextModel, cfg["text_encoder"], 2, prefix="text_model."),
    )

    release = root / "X-Dyna"
    release.mkdir(parents=True, exist_ok=True)
    unet_state = _random_state(UNet, cfg["xdyna_unet"], 3)
    pe = with_pe_buffers(shape_only_model(UNet, cfg["xdyna_unet"]), unet_state)
    unet_state.update({k: torch.from_numpy(v) for k, v in pe.items() if k.endswith("pos_encoder.pe")})
    ip = {
        f"{2 * k + 1}.{p}.weight": unet_state[f"{name}.{p}.weight"].clone()
        for k, name in enumerate(ip_adapter_attn2_names(cfg["xdyna_unet"]))
        for p in ("to_k_ip", "to_v_ip")
    }
    torch.save(
        {"state_dict": {"module." + k: v for k, v in unet_state.items()}},
        release / "unet-checkpoint-epoch-5.ckpt",
    )
    del unet_state, pe
    for name, file, seed in (
        ("controlnet_pose", "controlnet-checkpoint-epoch-5.ckpt", 4),
        ("controlnet_face", "controlnet-face-checkpoint-epoch-2.ckpt", 5),
    ):
        torch.save(_random_state(ControlNetModel, cfg[name], seed), release / file)

    models = root / "IP-Adapter" / "models"
    folder(
        models / "image_encoder",
        cfg["image_encoder"].to_transformers(),
        "model.safetensors",
        _random_state(CLIPVisionModelWithProjection, cfg["image_encoder"], 6),
    )
    torch.save(
        {"image_proj": _random_state(Resampler, cfg["resampler"], 7), "ip_adapter": ip},
        models / "ip-adapter-plus_sd15.bin",
    )
    (root / "fakes.json").write_text(json.dumps({"scale": scale}))


# ------------------------------------------------------------------------------------------------ steps


def run_measured(args: list[str]) -> dict:
    """`python -m <args>` in a fresh process: wall seconds and that process's peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2)}


def steps(root: Path, out: Path) -> list[tuple[str, list[str]]]:
    bundle, release = out / "xdyna", root / "X-Dyna"
    return [
        (
            "convert xdyna",
            [
                "convert",
                "xdyna",
                "--release",
                str(release),
                "--sd15",
                str(root / "sd15"),
                "--ip-adapter",
                str(root / "IP-Adapter"),
                "--output",
                str(bundle),
            ],
        ),
        (
            "convert xdyna-unet",
            [
                "convert",
                "xdyna-unet",
                "--input",
                str(release / "unet-checkpoint-epoch-5.ckpt"),
                "--output",
                str(out / "unet_only"),
            ],
        ),
        (
            "export release (unet + 2 ControlNet .ckpt)",
            [
                "convert",
                "export",
                "--layout",
                "release",
                "--input",
                str(bundle),
                "--output",
                str(out / "release"),
            ],
        ),
        (
            "export diffusers (pose ControlNet)",
            [
                "convert",
                "export",
                "--layout",
                "diffusers",
                "--input",
                str(bundle / "controlnet_pose"),
                "--output",
                str(out / "cn_diffusers"),
            ],
        ),
        (
            "export diffusers (VAE)",
            [
                "convert",
                "export",
                "--layout",
                "diffusers",
                "--input",
                str(bundle / "vae"),
                "--output",
                str(out / "vae_diffusers"),
            ],
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="width factor of every model (1: the release's)")
    p.add_argument("--keep", help="folder for the fakes, kept afterwards (reused if built at the same scale)")
    p.add_argument("--only", help="run only the steps whose name contains this text (e.g. 'export')")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)  # the builder worker
    args = p.parse_args(argv)

    if args.build_only:
        build_fakes(Path(args.keep), args.scale)
        return
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="xdyna-fakes-"))
    try:
        stamp = root / "fakes.json"
        if not (stamp.is_file() and json.loads(stamp.read_text())["scale"] == args.scale):
            shutil.rmtree(root, ignore_errors=True)
            build = run_measured(
                ["bench.convert_memory", "--build-only", "--keep", str(root), "--scale", str(args.scale)]
            )
            print(f"built fakes at scale {args.scale} in {build['wall_s']} s", flush=True)
        sizes = {
            f.name: f.stat().st_size for f in root.rglob("*") if f.is_file() and f.stat().st_size > 2**20
        }
        print(f"fakes: {sum(sizes.values()) / GIB:.2f} GiB in {len(sizes)} files", flush=True)
        out = Path(tempfile.mkdtemp(prefix="xdyna-out-", dir=root))
        print(f"{'step':<46}{'wall s':>8}{'peak RSS GiB':>14}")
        for name, cmd in steps(root, out):
            if args.only and args.only not in name:
                continue
            r = run_measured(cmd)
            print(f"{name:<46}{r['wall_s']:>8}{r['peak_rss_gib']:>14}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
