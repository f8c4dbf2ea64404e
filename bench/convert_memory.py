"""Wall time and peak RSS of the X-Dyna converters and exports on full-size fakes of the release.

    python -m bench.convert_memory                  # full size (11.5 GiB of fakes under the temp dir)
    python -m bench.convert_memory --scale 0.5      # every width halved: about a quarter of the bytes
    python -m bench.convert_memory --keep fakes/     # keep (and reuse) the fakes in fakes/
    python -m bench.convert_memory --dynamictrl      # the DynamiCtrl transformer (5.8 B params, 11.5 GB bf16)
    python -m bench.convert_memory --dynamictrl --layers 2   # the same with 2 of its 42 blocks (quick check)

The fakes are random weights in the release's file layouts: an SD 1.5 diffusers folder (unet, vae,
text_encoder as safetensors), the X-Dyna UNet .ckpt (`state_dict` wrapper, DDP `module.` prefixes, motion
modules v1 with their pe buffers, Dynamics-Adapter, IP-Adapter projections), the pose and S-Face ControlNet
.ckpt files, ip-adapter-plus_sd15.bin and a CLIP ViT-H/14 image_encoder/ folder. Each converter and export
runs in a fresh `python -m convert` process; its peak RSS is that process's own (wait4's rusage).

--dynamictrl instead writes a DynamiCtrl pipeline folder whose transformer is full size (random bf16,
generated tensor by tensor into `diffusion_pytorch_model-0000k-of-0000n.safetensors` shards of 5 GB + the
index, as the release's), with a tiny VAE / T5 / tokenizer beside it, and measures `convert dynamictrl`
(bf16, the default), `export` of that bundle, and `convert dynamictrl --dtype fp32`. Disk: about 35 GB at
the peak (fakes + the fp32 bundle); outputs are deleted as soon as they are measured.
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


# ------------------------------------------------------------------------------------------------ DynamiCtrl


def _random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random finite bf16 values (|x| in [2^-7, 2^-6)) made from random bits: fast, one tensor at a time."""
    import ml_dtypes

    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    return ((bits & 0x807F) | 0x3C00).view(ml_dtypes.bfloat16)


def _write_random_part(folder: Path, model_cls, config, foreign: dict, stem: str, seed: int) -> int:
    """config.json + random bf16 weights in the layout of `model_cls(config)`, 5 GB shards; returns bytes."""
    import ml_dtypes
    from flax import nnx

    from convert.io import parse_size, write_sharded_safetensors_from
    from convert.state import to_torch_layout, torch_key
    from xdyna_jax.nn.shape_only import shape_only_model

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(foreign, indent=2))
    specs = {}
    for path, var in nnx.to_flat_state(nnx.state(shape_only_model(model_cls, config), nnx.Param)):
        shape = to_torch_layout(path[-1], np.empty(var.shape, np.bool_)).shape
        specs[torch_key(path)] = (np.dtype(ml_dtypes.bfloat16), tuple(shape))
    rng = np.random.default_rng(seed)
    write_sharded_safetensors_from(
        specs, lambda key: _random_bf16(rng, specs[key][1]), folder, stem, parse_size("5GB")
    )
    return sum(2 * int(np.prod(shape)) for _, shape in specs.values())


def _write_tiny_tokenizer(folder: Path) -> None:
    import io

    import sentencepiece as spm

    words = ("person", "dress", "walks", "dances", "red", "blue", "wall", "park", "arms", "turns")
    corpus = [" ".join(words[(i * k) % len(words)] for k in range(1, 8)) for i in range(40)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=24,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 0, "model_max_length": 226}))


def build_dynamictrl_fakes(root: Path, layers: int) -> None:
    """A DynamiCtrl pipeline folder: full-size transformer (`layers` blocks), tiny VAE / T5 / tokenizer."""
    from xdyna_jax.models.cogvideox import CogVideoXConfig
    from xdyna_jax.models.dynamictrl import DynamiCtrlTransformerModel
    from xdyna_jax.models.t5 import T5Config, T5EncoderModel
    from xdyna_jax.models.vae_cogvideox import AutoencoderKLCogVideoX, CogVideoXVAEConfig
    from xdyna_jax.schedulers.cogvideox import CogVideoXSchedulerConfig

    folder = root / "DynamiCtrl"
    transformer = CogVideoXConfig(num_layers=layers)
    total = _write_random_part(
        folder / "transformer",
        DynamiCtrlTransformerModel,
        transformer,
        transformer.to_diffusers("DynamiCtrlTransformerModel"),
        "diffusion_pytorch_model",
        0,
    )
    vae = CogVideoXVAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    _write_random_part(
        folder / "vae", AutoencoderKLCogVideoX, vae, vae.to_diffusers(), "diffusion_pytorch_model", 1
    )
    t5 = T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    _write_random_part(folder / "text_encoder", T5EncoderModel, t5, t5.to_transformers(), "model", 2)
    _write_tiny_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "CogVideoXDDIMScheduler", **CogVideoXSchedulerConfig().to_diffusers()})
    )
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXImageToVideoPipeline"}))
    (root / "fakes.json").write_text(json.dumps({"dynamictrl_layers": layers, "transformer_bytes": total}))


def run_dynamictrl(root: Path, layers: int) -> None:
    stamp = root / "fakes.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()).get("dynamictrl_layers") == layers):
        shutil.rmtree(root, ignore_errors=True)
        build = run_measured(
            [
                "bench.convert_memory",
                "--build-only",
                "--dynamictrl",
                "--layers",
                str(layers),
                "--keep",
                str(root),
            ]
        )
        print(f"built DynamiCtrl fakes ({layers} blocks) in {build['wall_s']} s", flush=True)
    total = json.loads(stamp.read_text())["transformer_bytes"]
    shards = sorted((root / "DynamiCtrl" / "transformer").glob("*.safetensors"))
    print(f"transformer: {total / 1e9:.2f} GB bf16 ({total // 2 / 1e9:.2f} B params) in {len(shards)} shards")
    src, bf16, fp32, exported = root / "DynamiCtrl", root / "out_bf16", root / "out_fp32", root / "exported"
    plan = [
        (
            "convert dynamictrl (bf16)",
            ["convert", "dynamictrl", "--input", str(src), "--output", str(bf16)],
            [],
        ),
        (
            "export diffusers (bf16 bundle)",
            ["convert", "export", "--input", str(bf16), "--output", str(exported)],
            [bf16, exported],
        ),
        (
            "convert dynamictrl --dtype fp32",
            ["convert", "dynamictrl", "--input", str(src), "--output", str(fp32), "--dtype", "fp32"],
            [fp32],
        ),
    ]
    print(f"{'step':<46}{'wall s':>8}{'peak RSS GiB':>14}")
    for name, cmd, delete_after in plan:
        r = run_measured(cmd)
        print(f"{name:<46}{r['wall_s']:>8}{r['peak_rss_gib']:>14}", flush=True)
        for path in delete_after:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=1.0, help="width factor of every model (1: the release's)")
    p.add_argument("--keep", help="folder for the fakes, kept afterwards (reused if built at the same scale)")
    p.add_argument("--only", help="run only the steps whose name contains this text (e.g. 'export')")
    p.add_argument(
        "--dynamictrl", action="store_true", help="the DynamiCtrl converter on a full-size transformer"
    )
    p.add_argument(
        "--layers", type=int, default=42, help="--dynamictrl: transformer blocks (42: the release's)"
    )
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)  # the builder worker
    args = p.parse_args(argv)

    if args.build_only:
        if args.dynamictrl:
            build_dynamictrl_fakes(Path(args.keep), args.layers)
        else:
            build_fakes(Path(args.keep), args.scale)
        return
    if args.dynamictrl:
        root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="dynamictrl-fakes-"))
        try:
            run_dynamictrl(root, args.layers)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
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
