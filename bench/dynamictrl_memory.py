"""Memory of DynamiCtrl's sampling and SFT step at the release's size, compiled from shapes only (no weights).

    python -m bench.dynamictrl_memory                          # sampling: the step, T5, a VAE decode tile-chunk
    python -m bench.dynamictrl_memory --parts step --attention-chunk 1024
    python -m bench.dynamictrl_memory --parts step --dump-to dump/       # + the biggest buffers of the step
    python -m bench.dynamictrl_memory --tiny                   # a tiny config, seconds (for checks)
    python -m bench.dynamictrl_memory --task train             # the SFT step on 8, 16 and 32 devices
    python -m bench.dynamictrl_memory --task train --layers 4 --devices 8 --no-flops   # quick: 4 blocks

task "sample" (one device) is what a 24 GB card has to hold while `DynamiCtrlPipeline` runs, at the release's
README setting: 37 frames at 1360x768 (HxW), CFG batch 2, bf16 weights and activations. Three programs run
one after the other and never share the device, so each is measured on its own:
  - `sample_t5`: the T5-v1.1-XXL encoder on (2, 226) token ids ([negative ; prompt]); it runs first and is
    released before the transformer is loaded;
  - `sample` (the peak that matters): one denoising step as the sampling loop runs it: the DynamiCtrl
    transformer (CogVideoX1.5-5B-I2V + 42 Pose-adaptive LayerNorms, 48 heads x 64, in_channels 32) on
    [noisy ; image] latents for both CFG halves with the pose latents in both (CFG on text only), the
    guidance combination in float32 and the CogVideoX DPM step (v-prediction, zero-SNR, trailing, 25
    steps); latents F' = 10 x 170 x 96 (odd F' would be padded by one frame), 20,400 video + 226 text
    tokens. The latents and the previous step's x0 are donated (each step's outputs replace them);
    the RoPE tables are arguments, computed once on the host as the pipelines do;
  - `sample_vae_decode`: one program of the tiled VAE decode: one 30 x 45 latent tile (240 x 360 pixels)
    of one 2-latent-frame chunk with its causal-conv cache (the cache in is donated to the cache out).
Attention: on a GPU the step would run a fused (cuDNN flash) kernel, which XLA:CPU cannot compile; its
"dot_product" fallback here is plain XLA attention, which would hold 2 x 48 x 20,626^2 float32 scores
(152 GiB). The CPU analysis uses the "chunked" backend: one head and `--attention-chunk` queries at a time
(a chunk x 20,626 float32 score block, 40 MiB at 512), which bounds the attention's memory by O(chunk x L)
as a flash kernel bounds it by O(block x block); the rest of the step (projections, feed-forward, norms,
residual streams) is the same program on any backend, so the figure is representative of (and, for the
attention, an upper bound on) the fused-kernel program.

Per-device peak is XLA's compiled memory analysis, as bench/sample_memory.py computes it: arguments +
outputs + temporaries - aliased (outputs written into donated arguments). XLA:CPU has no bf16 matmul: it
widens both operands of each dot to float32, so the temporaries also hold float32 copies of the dot inputs
of a block (a GPU would not); see --dump-to for what they are. Each program compiles in its own process
(its own peak RSS) at XLA:CPU's cheapest code generation (the buffer assignment, and so the memory
analysis, is decided before code generation; --full-codegen to check).

What to look for in the step (--dump-to prints the largest temporaries live at its peak): at inference a
block's activations die when the next block starts, so the temporaries should not grow with the depth
(--layers 2 shows one block's worth: ~4 GiB, mostly the feed-forward's 41,252 x 12,288 hidden layer in bf16
plus XLA:CPU's float32 copy of it). Two things make them grow: the pose tokens' stream depends only on the
pose latents and the time embedding, so the scheduler may compute every block's control tokens before the
first block and hold all 42 (0.47 GiB each here); and each "chunked" attention's output stack (the size
of its padded queries, 0.24 GiB) may be allocated up front for all 42 blocks. Both are fixed by data
dependencies in the code (`DynamiCtrlBlock` ties its control stream to its video input; the chunked
attention writes its results into the carried query blocks): 42.19 GiB before, 15.46 after.

One line per program:
task=<sample|sample_t5|sample_vae_decode> devices=1 peak_gib_per_device=<x>   (arguments ..., temporaries ...)

task "train" is the SFT step as train.py compiles it (`Trainer.compile`) for configs/train_dynamictrl.py's
release recipe: the whole 5.8 B transformer trains (trainable set `transformer`) on fp32 master weights with
AdamW's two fp32 moments, bf16 compute, "chunked" attention (the config's 512-query blocks), every DiT block
under "full" remat; one micro-batch (grad_accum_steps 1: the accumulation scan holds one at a time anyway)
of --batch-per-device clips per device, each the README clip's precomputed batch (latents, image latent,
pose latents 10 x 170 x 96 x 16 and T5 text 226 x 4096, float32). The layout is the config's sharding
section: FSDP over all N devices (mesh data=1 fsdp=N tensor=1), every parameter and moment sharded by its
rules, the batch over (data, fsdp), and the rules passed to the compile, so the blocks' activation
constraints keep every stream split over the examples and the chunked attention runs per device. Each N
compiles in its own process with N simulated CPU devices (--xla_force_host_platform_device_count); the
per-device peak is XLA's compiled memory analysis of that device's program, as above.

What it took to fit (per device, 42 blocks): without activation constraints XLA kept the examples whole
and split the weights' contracting dimension instead, holding the global batch's feed-forward activation
on every device (8 x 20,626 x 12,288 float32: 7.6 GiB at 8 devices, for 2 blocks); autodiff of each
chunked attention's loop started its key / value gradients from zeros that XLA:CPU allocated at the
program's start, two 0.12 GiB buffers per block (9.9 GiB); and full remat kept every block's control
stream (20,400 x 3072 bf16, 0.12 GiB a block) beside its video stream, although the control stream depends
only on the pose tokens and temb: a block now recomputes its control input in the backward pass from the
stream at the start of its 6-block segment (`models/dynamictrl.py`, `training/remat.py`), 7 kept instead
of 42, for a few LayerNorms of elementwise work per block. XLA:CPU's YNNPACK library fusions (reductions,
dots) take their operands as materialised arrays, so each LayerNorm's backward held its per-token
statistics broadcast to full (tokens x 3072) float32 arrays (4.2 of a 2-block step's 11.3 GiB of
temporaries); TPU and GPU fusions read them in place, so the train task compiles without them (--ynn keeps
them). What stays: per block the video+text stream (0.12 GiB), and one block's backward working set (the
feed-forward's 20,626 x 12,288 hidden layer in bf16 several times over and XLA:CPU's float32 copy of a dot
operand, the attention's heads, the LayerNorms' float32 statistics): ~6 GiB whatever the depth.

FLOPs (task train): XLA's cost analysis counts a loop body once (the chunked attention's loop), so they
come from a separate lowering of the same step on one device with "xla" attention and no remat, on
--batch-per-device clips; the count is of that lowered graph (no compile). Model FLOPs: remat's
recomputation is not in them, as MFU counts. Per step = per device x N; the v5e line is the step time at
50 % MFU of a TPU v5e chip (197 TFLOP/s bf16).

task=train devices=<N> peak_gib_per_device=<x> tflops_per_step=<y>   (mesh ..., per device: arguments ...)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import time

GIB = 2**30
FRAMES, HEIGHT, WIDTH = 37, 1360, 768  # the release's README setting (H x W)
TEXT_TOKENS = 226
STEPS, OFS = 25, 2.0  # README: 25 steps; the 1.5 I2V pipelines pass ofs = 2.0
CFG_BATCH = 2  # [negative ; prompt]
SPATIAL, TEMPORAL = 8, 4  # VAE compression (pixels per latent pixel, frames per latent frame)
DEFAULT_CHUNK = 512
SAMPLE_TARGET_GIB = 22  # the target for the step: fits a 24 GB card (the release needs 28.4 GB)
# XLA:CPU's cheapest code generation; the memory analysis is the same (see bench/train_memory.py).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SAMPLE_PARTS = ("t5", "step", "vae_decode")
TRAIN_TARGET_GIB = 16  # the target for the SFT step on 32 devices: a TPU v5e chip's HBM
# XLA:CPU hands reductions and dots to YNNPACK library fusions, whose operands must exist as arrays: the
# backward of every LayerNorm then holds its per-token statistics broadcast to full (tokens x 3072) float32
# arrays (4.2 of a 2-block step's 11.3 GiB of temporaries). A TPU's or GPU's fusions read them in place.
NO_YNN_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
V5E_PEAK_FLOPS, MFU = 197e12, 0.5  # bf16 FLOP/s of one TPU v5e chip; the step time's assumed utilisation


# -- sizes ------------------------------------------------------------------------------------------------


def latent_frames(num_frames: int, patch_size_t: int = 2) -> int:
    """Latent frames the transformer sees for `num_frames` video frames: (F - 1) // 4 + 1 after the
    pipeline pads F to 1 + 4k, rounded up to a multiple of patch_size_t (noise and pose latents padded
    by one frame where F' is odd)."""
    padded = 1 + TEMPORAL * -(-(num_frames - 1) // TEMPORAL)
    f = (padded - 1) // TEMPORAL + 1
    return -(-f // patch_size_t) * patch_size_t


@dataclasses.dataclass(frozen=True)
class Size:
    frames: int = FRAMES
    height: int = HEIGHT
    width: int = WIDTH
    text: int = TEXT_TOKENS

    @property
    def latent(self) -> tuple[int, int]:
        return self.height // SPATIAL, self.width // SPATIAL


def _transformer_config(tiny: bool, chunk: int, attention: str = "chunked", layers: int | None = None):
    from xdyna_jax.models.cogvideox import CogVideoXConfig
    from xdyna_jax.nn.compute import Compute

    compute = Compute(dtype="bfloat16", attention=attention, attention_chunk=chunk)
    if tiny:
        cfg = CogVideoXConfig(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=8,
            out_channels=4,
            time_embed_dim=32,
            ofs_embed_dim=32,
            text_embed_dim=32,
            num_layers=2,
            compute=compute,
        )
    else:
        cfg = CogVideoXConfig(compute=compute)  # the defaults are CogVideoX1.5-5B-I2V's (in_channels 32)
    return cfg if layers is None else dataclasses.replace(cfg, num_layers=layers)


TINY_SIZE = Size(frames=5, height=128, width=128, text=8)  # latent 2 x 16 x 16: 64 video + 8 text tokens


def _bf16_shapes(tree):
    """Every leaf of a shape-only parameter tree as a bf16 ShapeDtypeStruct (the release runs bf16)."""
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), tree)


def _options(params, fast: bool, dump_to: str | None) -> dict:
    from xdyna_jax.nn.bf16_weights import compiler_options_for

    options = dict(compiler_options_for(params) or {})
    if fast:
        options.update(FAST_COMPILE)
    if dump_to:
        options.update(xla_dump_to=dump_to, xla_dump_hlo_as_text=True)
    return options


# -- the programs -----------------------------------------------------------------------------------------


def dynamictrl_scheduler():
    """The DPM scheduler as the release configures it (CogVideoX-5B family's config, trailing spacing)."""
    from xdyna_jax.schedulers.cogvideox import CogVideoXDPMScheduler, CogVideoXSchedulerConfig

    return CogVideoXDPMScheduler(
        CogVideoXSchedulerConfig(
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            snr_shift_scale=1.0,
            timestep_spacing="trailing",
            clip_sample=False,
        )
    )


def sampling_step(cfg, size: Size = Size(), steps: int = STEPS):
    """(jitted step, its abstract arguments) of one denoising step of DynamiCtrl sampling on one device.

    step(params, latents, image_latents, pose_latents, text, rope, timestep, timestep_back, x0_back, noise,
    guidance) -> (latents, x0): the transformer on the CFG batch (text differs; noisy, image and pose
    latents the same in both halves), v = v_u + s (v_c - v_u) in float32, the DPM step; the latents go
    back to bf16 as the release casts them. latents and x0_back are donated.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from xdyna_jax.models.cogvideox import rotary_tables
    from xdyna_jax.models.dynamictrl import DynamiCtrlTransformerModel
    from xdyna_jax.nn.shape_only import shape_only_model

    graph, params = nnx.split(shape_only_model(DynamiCtrlTransformerModel, cfg))
    params = _bf16_shapes(params)
    scheduler = dynamictrl_scheduler()

    def step(
        params,
        latents,
        image_latents,
        pose_latents,
        text,
        rope,
        timestep,
        timestep_back,
        x0_back,
        noise,
        guidance,
    ):
        model = nnx.merge(graph, params)
        x = jnp.concatenate([latents, image_latents], axis=-1)
        v = model(
            jnp.concatenate([x] * CFG_BATCH),
            text,
            timestep,
            jnp.concatenate([pose_latents] * CFG_BATCH),
            ofs=OFS,
            image_rotary_emb=rope,
        ).astype(jnp.float32)
        v_uncond, v_cond = jnp.split(v, 2)
        v = v_uncond + guidance * (v_cond - v_uncond)
        new, x0 = scheduler.step(
            v, timestep, latents, steps, noise, old_pred_original_sample=x0_back, timestep_back=timestep_back
        )
        return new.astype(latents.dtype), x0

    f = latent_frames(size.frames, cfg.patch_size_t or 1)
    h, w = size.latent
    c = cfg.out_channels
    bf16, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    rope = jax.eval_shape(lambda: rotary_tables(cfg, f, h, w))
    latent = jax.ShapeDtypeStruct((1, f, h, w, c), bf16)
    args = (
        params,
        latent,  # x_t, bf16 as the release keeps it between steps
        latent,  # image latent in frame 0, zeros after
        latent,  # pose latents
        jax.ShapeDtypeStruct((CFG_BATCH, size.text, cfg.text_embed_dim), bf16),  # [negative ; prompt]
        rope,
        jax.ShapeDtypeStruct((), i32),
        jax.ShapeDtypeStruct((), i32),
        jax.ShapeDtypeStruct((1, f, h, w, c), f32),  # the previous step's x0 (float32, as returned)
        jax.ShapeDtypeStruct((1, f, h, w, c), f32),  # this step's noise draw
        jax.ShapeDtypeStruct((), f32),
    )
    return step, args


def t5_encode(tiny: bool, size: Size = Size()):
    """(encode, its abstract arguments): the T5-v1.1-XXL encoder, bf16, on (2, text) token ids."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from xdyna_jax.models.t5 import T5Config, T5EncoderModel
    from xdyna_jax.nn.compute import Compute
    from xdyna_jax.nn.shape_only import shape_only_model

    compute = Compute(dtype="bfloat16")
    if tiny:
        cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, compute=compute)
    else:
        cfg = T5Config(compute=compute)  # the defaults are T5-v1.1-XXL's encoder
    graph, params = nnx.split(shape_only_model(T5EncoderModel, cfg))

    def encode(params, ids):
        return nnx.merge(graph, params)(ids)

    return encode, (_bf16_shapes(params), jax.ShapeDtypeStruct((CFG_BATCH, size.text), jnp.int32))


def vae_decode_tile_chunk(tiny: bool):
    """(the VAE's jitted chunk program, its abstract arguments) for one tiled decode program: a latent
    tile of the default tiling (30 x 45 for CogVideoX's VAE) over one chunk of 2 latent frames, with the
    causal cache a previous chunk leaves (the model donates it)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from xdyna_jax.models import vae_cogvideox as vae
    from xdyna_jax.nn.compute import Compute
    from xdyna_jax.nn.shape_only import shape_only_model

    compute = Compute(dtype="bfloat16")
    if tiny:
        cfg = vae.CogVideoXVAEConfig(
            block_out_channels=(8, 8, 16, 16),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            sample_height=64,
            sample_width=64,
            compute=compute,
        )
    else:
        cfg = vae.CogVideoXVAEConfig(compute=compute)
    graph, params = nnx.split(shape_only_model(vae.AutoencoderKLCogVideoX, cfg))
    params = _bf16_shapes(params)
    tile = vae.CogVideoXTiling.for_config(cfg).latent_tile(cfg.spatial_scale)
    z = jax.ShapeDtypeStruct((1, vae.LATENT_FRAMES_PER_CHUNK, *tile, cfg.latent_channels), jnp.bfloat16)
    # the model's own chunk program (what `decode` runs per tile and chunk), so this measures that program
    program = vae._chunk_program
    _, cache = program.eval_shape(graph, "decode_chunk", params, z, None)

    def decode(params, z, cache):
        return program(graph, "decode_chunk", params, z, cache)

    return decode, (params, z, cache), tile


# -- measuring --------------------------------------------------------------------------------------------


def memory_of(fn, args, *, donate: tuple[int, ...] = (), options: dict | None = None) -> dict:
    """Compiled memory analysis of jit(fn)(*args) on one device, in bytes, plus the compile time."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile(options or None)
    mem = compiled.memory_analysis()
    out = {
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
    }
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    out["compile_s"] = time.perf_counter() - t0
    return out


def _param_bytes(tree) -> int:
    import jax

    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def peak_live_buffers(dump_to: str, count: int = 10) -> list[str]:
    """The largest temporaries live at the peak of the dumped program (XLA's live-range report of the
    module with the biggest one; arguments left out), each with its shape and the JAX op it comes from."""
    reports = [f for f in os.listdir(dump_to) if f.endswith("cpu_after_optimizations-live-range.txt")]
    if not reports:
        return []
    report = max((os.path.join(dump_to, f) for f in reports), key=os.path.getsize)
    with open(report) as fh:
        text = fh.read()
    peak = re.search(r"Live ranges at \d+ \(peak\):\n(.*?)\n  \S", text, re.S)
    if not peak:
        return []
    live = re.findall(r"^\s+(\S+)\{\}: (\d+) bytes", peak.group(1), re.M)
    hlo_path = report.replace("-live-range.txt", ".txt")
    hlo = open(hlo_path).read() if os.path.exists(hlo_path) else ""
    lines = []
    for name, size in sorted(live, key=lambda item: -int(item[1])):
        m = re.search(rf"^\s*(?:ROOT )?%{re.escape(name)} = (\S+) (.*)$", hlo, re.M)
        if m and " parameter(" in f" {m.group(2)}":
            continue  # an argument (weights, latents): counted in "arguments"
        shape = m.group(1) if m else "?"
        op = re.search(r'op_name="([^"]*)"', m.group(2)) if m else None
        lines.append(f"{int(size) / GIB:7.3f} GiB  {shape:<28} {name} {op.group(1) if op else ''}".rstrip())
        if len(lines) == count:
            break
    return lines


def sample_worker(
    part: str, tiny: bool, chunk: int, fast: bool, dump_to: str | None, layers: int | None = None
) -> dict:
    size = TINY_SIZE if tiny else Size()
    extra = {}
    if part == "step":
        cfg = _transformer_config(tiny, chunk, layers=layers)
        fn, args = sampling_step(cfg, size)
        donate = (1, 8)  # latents, x0_back
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        _, f, h, w, _ = args[1].shape
        extra["tokens"] = f // pt * (h // p) * (w // p) + size.text
        extra["layers"] = cfg.num_layers
    elif part == "t5":
        fn, args = t5_encode(tiny, size)
        donate = ()
    elif part == "vae_decode":
        fn, args, tile = vae_decode_tile_chunk(tiny)
        donate = (2,)  # the cache, as the model's chunk program donates it
        extra["tile"] = list(tile)
    else:
        raise ValueError(f"unknown sample part {part!r}; choose from {SAMPLE_PARTS}")
    r = memory_of(fn, args, donate=donate, options=_options(args[0], fast, dump_to))
    r.update(extra)
    r["param_bytes"] = _param_bytes(args[0])
    r["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if dump_to:
        r["biggest"] = peak_live_buffers(dump_to)
    return r


def _line(task: str, r: dict, note: str) -> str:
    return (
        f"task={task} devices=1 peak_gib_per_device={r['peak_bytes'] / GIB:.2f}   (arguments "
        f"{r['argument_bytes'] / GIB:.2f} GiB of which weights {r['param_bytes'] / GIB:.2f}, temporaries "
        f"{r['temp_bytes'] / GIB:.2f} GiB, outputs {r['output_bytes'] / GIB:.2f} GiB "
        f"({r['alias_bytes'] / GIB:.2f} aliased); {note}compile {r['compile_s']:.0f} s, host RSS "
        f"{r['rss_gib']:.1f} GiB)"
    )


def run_sample(a) -> None:
    """task=sample: T5, the denoising step and one VAE decode tile-chunk, each in its own process."""
    from bench.common import spawn

    size = TINY_SIZE if a.tiny else Size()
    common = [*(["--tiny"] if a.tiny else []), *(["--full-codegen"] if a.full_codegen else [])]
    common += [
        "--attention-chunk",
        str(a.attention_chunk),
        *(["--layers", str(a.layers)] if a.layers else []),
    ]
    for part in a.parts.split(","):
        dump = os.path.join(a.dump_to, part) if a.dump_to else None
        try:
            r = spawn(
                "bench.dynamictrl_memory", ["--worker", part, *common, *(["--dump-to", dump] if dump else [])]
            )
        except RuntimeError as err:
            if part != "vae_decode":
                raise
            print(
                f"# task=sample_vae_decode skipped: the VAE chunk program did not build ({err})", flush=True
            )
            continue
        if part == "step":
            f = latent_frames(size.frames)
            h, w = size.latent
            note = (
                f"{r['layers']} blocks, {size.frames} frames {size.height}x{size.width} -> latent {f}x{h}x{w}, "
                f"{r['tokens']} tokens, "
                f"CFG batch {CFG_BATCH}, bf16, 'chunked' attention chunk {a.attention_chunk}; "
            )
            task = "sample"
            met = "met" if r["peak_bytes"] / GIB <= SAMPLE_TARGET_GIB else "NOT met"
            note += f"target <= {SAMPLE_TARGET_GIB} GiB {met}; "
        elif part == "t5":
            note = f"T5 encoder on ({CFG_BATCH}, {size.text}) ids, bf16; "
            task = "sample_t5"
        else:
            note = f"one {r['tile'][0]}x{r['tile'][1]} latent tile x 2 latent frames with its cache, bf16; "
            task = "sample_vae_decode"
        print(_line(task, r, note), flush=True)
        for b in r.get("biggest", []):
            print(f"#   live at the peak: {b}", flush=True)


# -- the SFT step (task train) ----------------------------------------------------------------------------


def train_setup(
    *,
    tiny: bool,
    batch: int,
    layers: int | None = None,
    attention: str | None = None,
    remat: str | None = None,
    size: Size | None = None,
):
    """(trainer, abstract TrainState, abstract batch) of the SFT step of configs/train_dynamictrl.py's
    release recipe (trainable set `transformer`, AdamW on fp32 master weights, bf16 compute, the config's
    remat) with one micro-batch of `batch` clips: shapes only, nothing allocated.

    `attention` / `remat` override the config's (the FLOP count lowers with "xla" attention and no remat);
    `tiny`: the config's tiny transformer sizes with the release's recipe otherwise.
    """
    import jax
    import jax.numpy as jnp

    from configs import train_dynamictrl
    from xdyna_jax.models.cogvideox import CogVideoXConfig
    from xdyna_jax.models.dynamictrl import DynamiCtrlTransformerModel
    from xdyna_jax.nn.compute import Compute
    from xdyna_jax.nn.shape_only import shape_only_model
    from xdyna_jax.training.step import Trainer

    tcfg = train_dynamictrl.get_config("release")
    tcfg.step.grad_accum_steps = 1  # one micro-batch: the accumulation scan holds one at a time anyway
    if remat is not None:
        tcfg.step.remat.transformer_blocks = remat
    step_cfg, opt_cfg, obj_cfg = train_dynamictrl.training_configs(tcfg)
    compute = Compute(**{**tcfg.compute.to_dict(), **({"attention": attention} if attention else {})})
    if tiny:
        cfg = CogVideoXConfig.from_diffusers(train_dynamictrl.TINY_TRANSFORMER, compute)
    else:
        cfg = CogVideoXConfig(compute=compute)  # CogVideoX1.5-5B-I2V's sizes, the release's base
    if size is None:
        size = (
            TINY_TRAIN_SIZE if tiny else Size(frames=int(tcfg.frames), height=tcfg.height, width=tcfg.width)
        )
    h, w = size.latent
    if tiny:  # RoPE's "slice" tables span the sample size: a tiny model on larger latents needs it as large
        cfg = dataclasses.replace(
            cfg, sample_height=max(h, cfg.sample_height), sample_width=max(w, cfg.sample_width)
        )
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=layers)
    model = shape_only_model(DynamiCtrlTransformerModel, cfg)
    trainer = Trainer(model, step_cfg, opt_cfg, obj_cfg)
    trainable, frozen = trainer.split(model)
    # the trainer's X-Dyna CFG slot (null image tokens) goes unused by DynamiCtrl: a (1, 1) placeholder
    null_tokens = jax.ShapeDtypeStruct((1, 1), jnp.float32)
    state = jax.eval_shape(trainer.init_state, trainable, frozen, null_tokens, jax.random.key(0))
    f = latent_frames(size.frames, cfg.patch_size_t or 1)
    c = cfg.out_channels
    f32 = jnp.float32
    # the batch as data preparation hands it over (float32 latents and T5 embeddings: 10 + 3.7 MB a clip)
    batch_shapes = {
        "latents": jax.ShapeDtypeStruct((batch, f, h, w, c), f32),
        "image_latents": jax.ShapeDtypeStruct((batch, 1, h, w, c), f32),
        "pose_latents": jax.ShapeDtypeStruct((batch, f, h, w, c), f32),
        "text": jax.ShapeDtypeStruct((batch, size.text, cfg.text_embed_dim), f32),
    }
    p, pt = cfg.patch_size, cfg.patch_size_t or 1
    info = {
        "layers": cfg.num_layers,
        "video_tokens": f // pt * (h // p) * (w // p),
        "text_tokens": size.text,
        "latent": [f, h, w, c],
        "attention_chunk": compute.attention_chunk,
    }
    return trainer, state, batch_shapes, info


TINY_TRAIN_SIZE = Size(frames=5, height=64, width=64, text=8)  # the tiny config's latents (2, 8, 8)


def _count(tree) -> int:
    import math

    import jax

    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def train_worker(
    tiny: bool, layers: int | None, batch_per_device: int, fast: bool, dump_to: str | None, ynn: bool = False
) -> dict:
    """Compile the SFT step on every (simulated) device of this process as train.py does (the config's
    sharding section: FSDP over all devices, its rules passed to `Trainer.compile`); per-device memory."""
    import jax

    from bench.common import compile_sharded_step
    from configs import train_dynamictrl

    n_dev = jax.device_count()
    trainer, state, batch, info = train_setup(tiny=tiny, batch=n_dev * batch_per_device, layers=layers)
    sharding = train_dynamictrl.get_config("release").sharding
    options = dict(FAST_COMPILE) if fast else {}
    if not ynn:
        options.update(NO_YNN_FUSIONS)
    if dump_to:
        options.update(xla_dump_to=dump_to, xla_dump_hlo_as_text=True)
    compiled, compile_s, mesh = compile_sharded_step(trainer, state, batch, sharding, options)
    r = {
        **{f"{k}_bytes": v for k, v in compiled.memory.items()},
        **info,
        "mesh": dict(mesh.shape),
        "trainable_params": _count(state.trainable),
        "state_bytes": _param_bytes(state),
        "compile_s": compile_s,
        "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if dump_to:
        r["biggest"] = peak_live_buffers(dump_to)
    return r


def train_flops_worker(tiny: bool, layers: int | None, batch_per_device: int) -> dict:
    """FLOPs of one SFT step on `batch_per_device` clips (one device's work under FSDP), by the lowered
    graph's cost analysis with "xla" attention and no remat: no loops, so every FLOP is counted once
    (XLA counts a loop body once), and no recomputation (model FLOPs, as MFU counts them)."""
    import jax

    trainer, state, batch, _ = train_setup(
        tiny=tiny, batch=batch_per_device, layers=layers, attention="xla", remat="none"
    )
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    cost = jax.jit(trainer.train_step).lower(state, batch, key).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {"flops_per_device": float(cost["flops"])}


def _spawn_on(devices: int, args: list[str]) -> dict:
    """A worker of this module in a fresh process with `devices` simulated CPU devices."""
    from bench.common import spawn

    saved = {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}
    flags = [f for f in (saved["XLA_FLAGS"] or "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        return spawn("bench.dynamictrl_memory", ["--worker", *args])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_train(a) -> None:
    """task=train: the SFT step on each of --devices simulated devices, each count in its own process."""
    common = [
        "--batch-per-device",
        str(a.batch_per_device),
        *(["--tiny"] if a.tiny else []),
        *(["--layers", str(a.layers)] if a.layers else []),
    ]
    per_device = float("nan")
    if not a.no_flops:
        per_device = _spawn_on(1, ["train_flops", *common])["flops_per_device"]
        print(
            f"# FLOPs: lowered cost analysis of the SFT step on {a.batch_per_device} clip(s), 'xla' attention, "
            f"no remat = {per_device / 1e12:.1f} TFLOP per device per step",
            flush=True,
        )
    for n in (int(d) for d in a.devices.split(",")):
        dump = os.path.join(a.dump_to, f"train_devices{n}") if a.dump_to else None
        args = [
            "train",
            *common,
            *(["--full-codegen"] if a.full_codegen else []),
            *(["--ynn"] if a.ynn else []),
        ]
        r = _spawn_on(n, [*args, *(["--dump-to", dump] if dump else [])])
        mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
        peak = r["peak_bytes"] / GIB
        met = "met" if peak <= TRAIN_TARGET_GIB else "NOT met"
        flops = "" if per_device != per_device else f" tflops_per_step={per_device * n / 1e12:.0f}"
        step_s = per_device / (MFU * V5E_PEAK_FLOPS)
        print(
            f"task=train devices={n} peak_gib_per_device={peak:.2f}{flops}   ({r['layers']} blocks, mesh "
            f"{mesh}, global batch {n * a.batch_per_device}, {r['video_tokens']} video + {r['text_tokens']} "
            f"text tokens; per device: arguments {r['argument_bytes'] / GIB:.2f} GiB (state "
            f"{r['state_bytes'] / n / GIB:.2f} of it), temporaries {r['temp_bytes'] / GIB:.2f} GiB, outputs "
            f"{r['output_bytes'] / GIB:.2f} GiB ({r['alias_bytes'] / GIB:.2f} aliased)"
            + (
                ""
                if per_device != per_device
                else f", {per_device / 1e12:.0f} TFLOP, v5e at {MFU:.0%} MFU {step_s:.1f} s/step"
            )
            + f"; {r['trainable_params'] / 1e9:.2f} B params trained; target <= {TRAIN_TARGET_GIB} GiB at "
            f"32 devices {met if n == 32 else 'n/a'}; compile {r['compile_s']:.0f} s, host RSS "
            f"{r['rss_gib']:.1f} GiB)",
            flush=True,
        )
        for b in r.get("biggest", []):
            print(f"#   live at the peak: {b}", flush=True)


TASKS = {"sample": run_sample, "train": run_train}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sample", choices=tuple(TASKS))
    p.add_argument(
        "--parts",
        default=",".join(SAMPLE_PARTS),
        help=f"comma-separated programs of task sample: {SAMPLE_PARTS}",
    )
    p.add_argument("--attention-chunk", type=int, default=DEFAULT_CHUNK, help="queries per 'chunked' block")
    p.add_argument("--layers", type=int, help="transformer blocks of the step (default: all 42; to explore)")
    p.add_argument("--tiny", action="store_true", help="tiny configs (seconds, for checks)")
    p.add_argument("--dump-to", help="XLA dump folder per program; also prints the biggest buffers")
    p.add_argument(
        "--full-codegen", action="store_true", help="compile at XLA:CPU's default optimisation level"
    )
    p.add_argument("--devices", default="8,16,32", help="task train: comma-separated device counts")
    p.add_argument("--batch-per-device", type=int, default=1, help="task train: clips per device")
    p.add_argument(
        "--ynn", action="store_true", help="task train: keep XLA:CPU's YNNPACK fusions (see the docstring)"
    )
    p.add_argument("--no-flops", action="store_true", help="task train: skip the FLOP count")
    p.add_argument("--worker", choices=(*SAMPLE_PARTS, "train", "train_flops"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker == "train":
        r = train_worker(a.tiny, a.layers, a.batch_per_device, not a.full_codegen, a.dump_to, a.ynn)
        print(json.dumps(r), flush=True)
        return
    if a.worker == "train_flops":
        print(json.dumps(train_flops_worker(a.tiny, a.layers, a.batch_per_device)), flush=True)
        return
    if a.worker:
        r = sample_worker(a.worker, a.tiny, a.attention_chunk, not a.full_codegen, a.dump_to, a.layers)
        print(json.dumps(r), flush=True)
        return
    TASKS[a.task](a)


if __name__ == "__main__":
    main()
