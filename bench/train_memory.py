"""Memory and FLOPs of the full-size X-Dyna stage-1 train step, compiled from shapes only (no weights).

    python -m bench.train_memory                          # 8 and 32 devices, per-layer remat, 1 example/device
    python -m bench.train_memory --devices 8 --remat none,dots,full,none/full
                                                          # BLOCK[/LAYER]: policy of the blocks / of the
                                                          # resnets, attentions, motion modules inside
    python -m bench.train_memory --tiny --devices 1,8      # the configs/tiny.py model, seconds

The step is the one train.py compiles (`Trainer.compile`): stage 1 of the paper's model (SD 1.5 UNet +
Dynamics-Adapter + IP-Adapter 16 tokens + AnimateDiff v1 motion modules, and the pose ControlNet; no S-Face
ControlNet, which stage 2 adds) on windows of 1 reference + 16 driven frames at 896x512 (latents 112x64),
bf16 compute with the default "chunked" attention, fp32 master weights for the trainable set (adapter
to_q_ff/to_out_ff, pose ControlNet, motion modules) with their AdamW moments, the frozen rest in bf16.
The layout is train.py's default sharding section: FSDP over all N devices (mesh data=1 fsdp=N tensor=1),
every parameter and moment sharded by the config's rules, the batch split over (data, fsdp), so the global
batch is N x --batch-per-device examples. Remat policies (training/remat.py) apply to every down, mid and
up block of the UNet and the ControlNet alike, to the resnets, spatial transformers and motion modules
inside them, and to the ControlNet's conditioning embedding.

Each N compiles in its own process with N simulated CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count); per-device memory is XLA's compiled memory analysis of that
device's program: arguments (state + batch shard), temporaries, and peak = arguments + temporaries +
outputs not aliased to a donated argument.

FLOPs: XLA's cost analysis counts a loop body once (the chunked attention's loops, the micro-batch scan),
so they come from a separate lowering of the same step on one device with "xla" attention (no loop), no
remat and no micro-batches, on --batch-per-device
examples; the count is of that lowered (unoptimised) graph, which needs no compile. These are model
FLOPs: remat's recomputation is not in them, as MFU conventionally counts. Per device = that count (FSDP splits the examples, not the work of one example);
per step = per device x N. The v5e line is the step time at 50 % MFU of a TPU v5e chip (197 TFLOP/s bf16):
FLOPs per device / (0.5 x 197e12).

One line per N and remat policy:
task=train devices=<N> peak_gib_per_device=<x> tflops_per_step=<y> ... (see `main`)
"""

from __future__ import annotations

import argparse
import json
import os

GIB = 2**30
V5E_PEAK_FLOPS = 197e12  # bf16 FLOP/s of one TPU v5e chip
MFU = 0.5
TEXT_TOKENS = 77  # the empty prompt's CLIP embedding, as train.py feeds it
BLOCKS = ("down_blocks", "mid_block", "up_blocks")
# XLA:CPU's cheapest code generation. Buffer assignment, and with it the memory analysis, is decided on the
# optimised HLO before code generation, so it is the same; the compile takes a fraction of the time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _model_config(tiny: bool):
    if tiny:
        from configs.tiny import get_config
    else:
        from configs.xdyna_sd15 import get_config
    return get_config()


def stage1_setup(
    *,
    tiny: bool,
    remat: str,
    attention: str,
    batch: int,
    frames: int | None = None,
    layer_remat: str = "none",
):
    """(trainer, abstract TrainState, abstract batch) of the stage-1 step: shapes only, nothing allocated.

    The denoiser comes from `shape_only_model` (ShapeDtypeStruct leaves); the state is `jax.eval_shape` of
    `Trainer.init_state`, so the fp32 master weights, bf16 frozen weights and AdamW moments are shapes too.
    """
    import jax
    import jax.numpy as jnp

    from configs.models import model_configs
    from configs.train_xdyna import get_config as train_config
    from xdyna_jax.models.controlnet import ControlNetModel
    from xdyna_jax.models.unet import UNet
    from xdyna_jax.models.xdyna import XDynaDenoiser
    from xdyna_jax.nn.compute import Compute
    from xdyna_jax.nn.shape_only import shape_only_model
    from xdyna_jax.training.remat import LAYERS
    from xdyna_jax.training.sections import training_configs
    from xdyna_jax.training.step import Trainer

    model_cfg = _model_config(tiny)
    tcfg = train_config("stage1")
    tcfg.step.remat = {block: remat for block in BLOCKS} | {layer: layer_remat for layer in LAYERS}
    tcfg.step.grad_accum_steps = 1
    step_cfg, opt_cfg, obj_cfg = training_configs(tcfg)
    compute = Compute(**{**tcfg.compute.to_dict(), "attention": attention})
    model_cfg.compute = compute.__dict__
    cfgs = model_configs(model_cfg)
    denoiser = XDynaDenoiser(
        shape_only_model(UNet, cfgs["unet"]), shape_only_model(ControlNetModel, cfgs["controlnet_pose"])
    )
    trainer = Trainer(denoiser, step_cfg, opt_cfg, obj_cfg)
    trainable, frozen = trainer.split(denoiser)
    unet = cfgs["unet"]
    width = unet.cross_attention_dim
    null_tokens = jax.ShapeDtypeStruct((unet.ip_adapter_tokens, width), jnp.float32)
    state = jax.eval_shape(trainer.init_state, trainable, frozen, null_tokens, jax.random.key(0))

    n = int(model_cfg.frames if frames is None else frames)
    height, wide = int(model_cfg.height), int(model_cfg.width)
    down = cfgs["controlnet_pose"].cond_downscale  # condition pixels per latent pixel (8 for SD 1.5)
    f32 = jnp.float32
    batch_shapes = {
        "latents": jax.ShapeDtypeStruct((batch, 1 + n, height // down, wide // down, unet.in_channels), f32),
        "text": jax.ShapeDtypeStruct((batch, TEXT_TOKENS, width), f32),
        "image_tokens": jax.ShapeDtypeStruct((batch, unet.ip_adapter_tokens, width), f32),
        "pose": jax.ShapeDtypeStruct(
            (batch, n, height, wide, cfgs["controlnet_pose"].conditioning_channels), f32
        ),
    }
    return trainer, state, batch_shapes


def _count(tree) -> int:
    import math

    import jax

    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def memory_worker(tiny: bool, remat: str, batch_per_device: int, dump_to: str | None, fast: bool) -> dict:
    """Compile the sharded step on every (simulated) device of this process; its per-device memory."""
    import jax

    from bench.common import compile_sharded_step
    from configs.train_xdyna import get_config as train_config

    n_dev = jax.device_count()
    block, _, layer = remat.partition("/")
    trainer, state, batch = stage1_setup(
        tiny=tiny,
        remat=block,
        layer_remat=layer or "none",
        attention="chunked",
        batch=n_dev * batch_per_device,
    )
    sharding = train_config("stage1").sharding
    options = dict(FAST_COMPILE) if fast else {}
    if dump_to:
        options.update(xla_dump_to=dump_to, xla_dump_hlo_as_text=True)
    compiled, compile_s, mesh = compile_sharded_step(trainer, state, batch, sharding, options)
    return {
        **{f"{k}_bytes": v for k, v in compiled.memory.items()},
        "mesh": dict(mesh.shape),
        "trainable_params": _count(state.trainable),
        "frozen_params": _count(state.frozen),
        "compile_s": compile_s,
    }


def flops_worker(tiny: bool, batch_per_device: int) -> dict:
    """FLOPs of one step on `batch_per_device` examples (one device's work), by the lowered graph's cost
    analysis with "xla" attention and no remat (no loops: every FLOP counted once)."""
    import jax

    trainer, state, batch = stage1_setup(tiny=tiny, remat="none", attention="xla", batch=batch_per_device)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    cost = jax.jit(trainer.train_step).lower(state, batch, key).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {"flops_per_device": float(cost["flops"])}


def _spawn(devices: int, args: list[str]) -> dict:
    """A worker of this module in a fresh process with `devices` simulated CPU devices."""
    from bench.common import spawn

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    saved = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        return spawn("bench.train_memory", ["--worker", *args])
    finally:
        if saved is None:
            os.environ.pop("XLA_FLAGS")
        else:
            os.environ["XLA_FLAGS"] = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="8,32", help="comma-separated device counts (one process each)")
    p.add_argument(
        "--remat",
        default="none/full",
        help="comma-separated BLOCK[/LAYER] policies (none|dots|full) of every block / every layer in them",
    )
    p.add_argument("--batch-per-device", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="the configs/tiny.py model (seconds, for checks)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one lowering less)")
    p.add_argument("--dump-to", help="XLA dump folder (buffer assignment, HLO) of each memory compile")
    p.add_argument(
        "--full-codegen", action="store_true", help="compile at XLA:CPU's default optimisation level"
    )
    p.add_argument("--worker", choices=("memory", "flops"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker == "memory":
        memory = memory_worker(a.tiny, a.remat, a.batch_per_device, a.dump_to, not a.full_codegen)
        print(json.dumps(memory), flush=True)
        return
    if a.worker == "flops":
        print(json.dumps(flops_worker(a.tiny, a.batch_per_device)), flush=True)
        return

    common = ["--batch-per-device", str(a.batch_per_device), *(["--tiny"] if a.tiny else [])]
    memory_args = [*common, *(["--full-codegen"] if a.full_codegen else [])]
    per_device = float("nan")
    if not a.no_flops:
        per_device = _spawn(1, ["flops", *common])["flops_per_device"]
        print(
            f"# FLOPs: lowered cost analysis of the step on {a.batch_per_device} example(s), 'xla' attention, "
            f"no remat, no micro-batches = {per_device / 1e12:.2f} TFLOP per device per step",
            flush=True,
        )
    for n in (int(d) for d in a.devices.split(",")):
        for remat in a.remat.split(","):
            dump = os.path.join(a.dump_to, f"devices{n}_{remat.replace('/', '_')}") if a.dump_to else None
            r = _spawn(n, ["memory", *memory_args, "--remat", remat, *(["--dump-to", dump] if dump else [])])
            mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
            step_s = per_device / (MFU * V5E_PEAK_FLOPS)
            print(
                f"task=train devices={n} peak_gib_per_device={r['peak_bytes'] / GIB:.2f} "
                f"tflops_per_step={per_device * n / 1e12:.1f}   (remat {remat}, mesh {mesh}, global batch "
                f"{n * a.batch_per_device}; per device: arguments {r['argument_bytes'] / GIB:.2f} GiB, "
                f"temporaries {r['temp_bytes'] / GIB:.2f} GiB, outputs {r['output_bytes'] / GIB:.2f} GiB "
                f"({r['alias_bytes'] / GIB:.2f} aliased), {per_device / 1e12:.2f} TFLOP; "
                f"v5e at {MFU:.0%} MFU: {step_s:.2f} s/step; trainable {r['trainable_params'] / 1e6:.0f} M "
                f"fp32 + frozen {r['frozen_params'] / 1e6:.0f} M bf16 params; compile {r['compile_s']:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
