"""One X-Dyna sampling window step on this machine: xdyna-jax vs PyTorch (diffusers), same weights, one run.

    python -m bench.sample_cpu                     # tiny and mid, ~15-20 min on the 2-core machine
    python -m bench.sample_cpu --sizes tiny --repeats 5
    python -m bench.sample_cpu --sizes mid --repeats 2 --skip-e2e --jax-batched-cfg
    python -m bench.sample_cpu --sizes mid --skip-e2e --skip-xdyna --rounds 2 \
        --xla-option xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT

The window step is what `XDynaPipeline` runs once per window and denoising step: the pose and S-Face
ControlNets on the window's driven frames (once, for both CFG halves: the halves differ only in their image
tokens), the UNet on [reference ; driven frames] for the unconditional and the conditional half, and the
per-frame accumulation of the predictions.

PyTorch runs diffusers' `UNetMotionModel` (SD 1.5 UNet + AnimateDiff v1 motion modules) with diffusers'
own IP-Adapter attention processors in every spatial attn2, and two `ControlNetModel`s; random weights
(seeded, every parameter perturbed so no zero-initialised path hides a difference) are converted for JAX
with our key tables (motion modules: `diffusers_motion_to_original`; IP-Adapter: `to_k_ip` / `to_v_ip`).
PyTorch times both ways of running the CFG halves (one batch of 2, or one half after the other) and keeps
the faster one; JAX runs them as the pipeline does by default (`sequential_cfg=True`).

diffusers has no Dynamics-Adapter (X-Dyna's reference attention, `to_q_ff` / `to_out_ff` in every attn1),
no GroupNorm pooled over the frames of a window and no reference frame that bypasses the motion modules,
so two JAX variants are timed:
  - like_for_like: our UNet configured as diffusers' model (adapter off, per-frame resnet GroupNorm,
    diffusers' motion GroupNorm over frames, every frame through the motion modules, IP-Adapter on); the
    same function as the PyTorch step, checked numerically (rel err < 1e-4 is printed);
  - xdyna: the pipeline's real step (the release's UNet: adapter on, GroupNorm over frames, reference frame
    skipped by the motion modules); more work than the PyTorch step, which stays the like-for-like one.
End to end: `XDynaPipeline.__call__` on the xdyna variant with a VAE, CLIP text and image encoders and a
resampler of random weights (mid: SD 1.5's VAE and text encoder, a small image encoder; the empty prompt's
ids are given directly, there being no tokenizer files here): a first call (every compile) and a second.

Sizes: tiny = the tests' tiny X-Dyna (channels 32/64, cross-attention width 16, 4 IP tokens), latent 12x8,
1 + 16 frames; mid = SD 1.5's widths (320/640/1280/1280, 2 layers, 8 heads, context 768, 16 IP tokens) on a
256x128 canvas (latent 32x16), 1 + 8 frames. Both fp32, PyTorch with as many threads as cores under
inference_mode, JAX with its automatic conv formulation (nn/conv.py) and any --xla-option given to the
window step's compile (XDynaPipeline's compiler_options). Times are the minimum over the repeats after a
warm-up and over --rounds worker processes (each times PyTorch, then JAX): the least disturbed run on a
shared machine, so report the load average printed with it. Each size runs in its own process(es).
Result lines: task=sample_step size=<tiny|mid> variant=<like_for_like|xdyna> jax_s=.. torch_s=.. ratio=..
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import time

import numpy as np

from bench.common import spawn, time_calls
from bench.dit_cpu import parse_xla_options

TEXT_TOKENS = 77
TIMESTEP = 500
PERTURB = 0.02  # added to every torch parameter (0.05 makes the mid-size activations grow too large)


@dataclasses.dataclass(frozen=True)
class Size:
    """One benchmark configuration: diffusers kwargs of the torch models, window shape, end-to-end parts."""

    unet: dict  # UNet2DConditionModel kwargs
    motion: dict  # MotionAdapter kwargs (block_out_channels and layers come from `unet`)
    cond_embedding: tuple[int, ...]  # ControlNet conditioning_embedding_out_channels
    latent: tuple[int, int]
    frames: int  # driven frames per window (+ 1 reference)
    ip_tokens: int
    e2e_frames: int
    e2e_steps: int
    e2e_parts: dict  # {"vae", "text", "vision", "resampler"}: kwargs of our configs

    @property
    def downscale(self) -> int:
        """Condition (pixel) size / latent size: 2 per ControlNet embedding stage after the first."""
        return 2 ** (len(self.cond_embedding) - 1)

    @property
    def cross(self) -> int:
        return self.unet.get("cross_attention_dim", 1280)


# The tests' tiny X-Dyna (tests/oracle.py TINY_UNET, TINY_VAE, tiny_xdyna): 12x8 latent of a 24x16 canvas.
TINY = Size(
    unet=dict(
        block_out_channels=(32, 64),
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=2,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    motion=dict(motion_num_attention_heads=8, motion_norm_num_groups=8),
    cond_embedding=(8, 16),
    latent=(12, 8),
    frames=16,
    ip_tokens=4,
    e2e_frames=20,
    e2e_steps=3,
    e2e_parts=dict(
        vae=dict(
            block_out_channels=(8, 16),
            norm_num_groups=4,
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
        ),
        text=dict(
            hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000
        ),
        vision=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=16,
        ),
        resampler=dict(dim=16, depth=1, dim_head=8, heads=2, num_queries=4, embedding_dim=32, output_dim=16),
    ),
)
# SD 1.5's UNet and ControlNet widths (diffusers defaults with a 768 context), AnimateDiff v1 motion modules.
MID = Size(
    unet=dict(cross_attention_dim=768),
    motion=dict(motion_num_attention_heads=8, motion_norm_num_groups=32),
    cond_embedding=(16, 32, 96, 256),
    latent=(32, 16),
    frames=8,
    ip_tokens=16,
    e2e_frames=8,
    e2e_steps=1,
    e2e_parts=dict(
        vae={},  # SD 1.5's
        text={},  # SD 1.5's CLIP ViT-L/14 text encoder
        vision=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
        ),
        resampler=dict(embedding_dim=64),  # ip-adapter-plus_sd15's resampler, fed by the small encoder
    ),
)
SIZES = {"tiny": TINY, "mid": MID}


# --------------------------------------------------------------------------------------------- PyTorch side


def torch_models(size: Size, seed: int = 0, perturb: float = PERTURB) -> list:
    """[UNetMotionModel with IP-Adapter processors, pose ControlNetModel, face ControlNetModel], every
    parameter perturbed by `perturb` * N(0, 1) (0: diffusers' initialisation, e.g. for timing alone)."""
    import torch
    from diffusers import ControlNetModel, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import MultiIPAdapterImageProjection
    from diffusers.utils import logging

    logging.set_verbosity_error()  # from_unet2d's notice about float32 modules
    torch.manual_seed(seed)
    widths = size.unet.get("block_out_channels", (320, 640, 1280, 1280))
    adapter = MotionAdapter(
        block_out_channels=widths,
        motion_layers_per_block=size.unet.get("layers_per_block", 2),
        motion_max_seq_length=24,  # AnimateDiff v1, as X-Dyna
        use_motion_mid_block=False,
        **size.motion,
    )
    unet = UNetMotionModel.from_unet2d(UNet2DConditionModel(**size.unet), adapter)
    procs = {}
    for name, attn in unet.attn_processors.items():
        spatial_cross = ".attentions." in name and name.endswith("attn2.processor")
        if spatial_cross:
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
            attn = IPAdapterAttnProcessor2_0(hidden, size.cross, num_tokens=(size.ip_tokens,), scale=1.0)
        procs[name] = attn
    unet.set_attn_processor(procs)
    # IP tokens come in already projected (by the resampler), so the image projection is the identity;
    # this is how diffusers' own IP-Adapter loader wires the tokens to the processors
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([torch.nn.Identity()])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    encoder = {k: v for k, v in size.unet.items() if k != "up_block_types"}
    nets = [unet.eval()]
    for channels in (3, 6):
        nets.append(
            ControlNetModel(
                **encoder,
                conditioning_channels=channels,
                conditioning_embedding_out_channels=size.cond_embedding,
            ).eval()
        )
    if not perturb:
        return nets
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * perturb)
    return nets


class TorchWindowStep:
    """The pipeline's window step in PyTorch: ControlNets once on the driven frames, UNet per CFG half
    (`batched`: both halves as one batch of 2), predictions added to a per-frame total."""

    def __init__(self, unet, pose_controlnet, face_controlnet, *, batched: bool):
        self.unet, self.pose, self.face, self.batched = unet, pose_controlnet, face_controlnet, batched

    def __call__(self, latents, t, context, pose, face, total):
        """latents (1 + N, C, h, w) with frame 0 the reference; context (2, text + ip, D) [uncond; cond] with
        the same text in both; pose / face (N, c, 8h, 8w); total (2, N, C, h, w) -> total + predictions."""
        import torch

        n = latents.shape[0] - 1
        steps = torch.full((n,), t, dtype=torch.long, device=latents.device)
        text = context[:1, :TEXT_TOKENS].expand(n, -1, -1)
        residuals = None
        for net, cond in ((self.pose, pose), (self.face, face)):
            down, mid = net(latents[1:], steps, text, cond, return_dict=False)  # text tokens only
            res = [*down, mid]
            residuals = res if residuals is None else [a + r for a, r in zip(residuals, res, strict=True)]
        # a zero residual for the reference frame, as X-Dyna adds none there
        residuals = [torch.cat([torch.zeros_like(r[:1]), r]) for r in residuals]
        window = latents.permute(1, 0, 2, 3)[None]  # (1, C, F, h, w)
        frames = n + 1
        text = context[:, :TEXT_TOKENS].repeat_interleave(frames, dim=0)  # (2 * F, 77, D)
        image = context[:, TEXT_TOKENS:, None]  # (2, 1 image, tokens, D); the UNet repeats it per frame
        if self.batched:
            both = lambda r: torch.cat([r, r])
            eps = self.unet(
                torch.cat([window, window]),
                t,
                text,
                added_cond_kwargs={"image_embeds": [image]},
                down_block_additional_residuals=[both(r) for r in residuals[:-1]],
                mid_block_additional_residual=both(residuals[-1]),
            ).sample
        else:
            eps = torch.cat(
                [
                    self.unet(
                        window,
                        t,
                        text[i * frames : (i + 1) * frames],
                        added_cond_kwargs={"image_embeds": [image[i : i + 1]]},
                        down_block_additional_residuals=residuals[:-1],
                        mid_block_additional_residual=residuals[-1],
                    ).sample
                    for i in range(2)
                ]
            )
        return total + eps[:, :, 1:].permute(0, 2, 1, 3, 4)  # (2, N, C, h, w); the reference's dropped


def step_inputs(size: Size, seed: int = 0) -> dict[str, np.ndarray]:
    """NHWC inputs of one window step: latents, conditions in [0, 1], context [text ; image tokens] x 2."""
    rng = np.random.default_rng(seed)
    h, w = size.latent
    n, s = size.frames, size.downscale
    text = rng.standard_normal((1, TEXT_TOKENS, size.cross)).astype(np.float32)
    image = rng.standard_normal((2, size.ip_tokens, size.cross)).astype(np.float32)
    return {
        "latents": rng.standard_normal((1 + n, h, w, 4)).astype(np.float32),
        "pose": rng.uniform(0, 1, (n, s * h, s * w, 3)).astype(np.float32),
        "face": rng.uniform(0, 1, (n, s * h, s * w, 6)).astype(np.float32),
        "context": np.concatenate([np.repeat(text, 2, axis=0), image], axis=1),
    }


def torch_step_runner(models, x: dict, batched: bool, device: str = "cpu", dtype=None):
    """A no-argument call of the torch window step on `x` (the step_inputs, cast to `dtype` on `device`)
    and a holder of its output (the float32 per-frame total)."""
    import torch

    step = TorchWindowStep(*models, batched=batched)
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype or torch.float32)
    nchw = lambda a: to(a.transpose(0, 3, 1, 2))
    latents, pose, face = nchw(x["latents"]), nchw(x["pose"]), nchw(x["face"])
    context = to(x["context"])
    n, h, w = pose.shape[0], *latents.shape[2:]
    zeros = torch.zeros((2, n, 4, h, w), device=device)
    out = {}

    def run():
        with torch.inference_mode():
            out["total"] = step(latents, TIMESTEP, context, pose, face, zeros)

    return run, out


def time_torch(models, x: dict, repeats: int) -> dict:
    """Both CFG ways; the faster one's min time, its name, its output (2, N, h, w, C) and every time."""
    res = {}
    for name, batched in (("batched", True), ("sequential", False)):
        run, out = torch_step_runner(models, x, batched)
        res[name] = (min(time_calls(run, repeats)), out["total"].numpy().transpose(0, 1, 3, 4, 2))
    best = min(res, key=lambda k: res[k][0])
    return {
        "torch_s": res[best][0],
        "torch_cfg": best,
        "torch_s_by_cfg": {k: v[0] for k, v in res.items()},
        "output": res[best][1],
    }


# --------------------------------------------------------------------------------------------- JAX side


def as_like_for_like(xdyna_unet):
    """The release's UNetConfig turned into what diffusers' UNetMotionModel (with IP-Adapter processors)
    computes: no Dynamics-Adapter, per-frame resnet GroupNorm, the motion GroupNorm pooled over frames as
    diffusers does, every frame through the motion modules."""
    return dataclasses.replace(
        xdyna_unet,
        dynamics_adapter=False,
        groupnorm_over_frames=False,
        motion_groupnorm_across_frames=True,
        skip_reference_frame=False,
    )


def unet_configs(size: Size):
    """(like_for_like, xdyna) UNetConfigs of `size`: the first computes what the torch UNet does, the
    second is the release's UNet (X-Dyna's Dynamics-Adapter, GroupNorm over frames, reference skipped)."""
    from xdyna_jax.models.unet import UNetConfig

    xdyna = dataclasses.replace(
        UNetConfig.from_diffusers(size.unet),
        motion_modules=True,
        motion_mid_block=False,
        motion_max_len=24,
        motion_heads=size.motion["motion_num_attention_heads"],
        motion_norm_groups=size.motion["motion_norm_num_groups"],
        ip_adapter_tokens=size.ip_tokens,
        dynamics_adapter=True,
        groupnorm_over_frames=True,
        skip_reference_frame=True,
    )
    return as_like_for_like(xdyna), xdyna


def jax_unet_state(torch_unet) -> dict[str, np.ndarray]:
    """UNetMotionModel + IP processors state dict (numpy views) under our names."""
    from convert.animatediff_keys import diffusers_motion_to_original

    state = {}
    for k, v in torch_unet.state_dict().items():
        if "pos_embed" in k:  # sinusoidal buffers; our motion modules compute the table
            continue
        k = k.replace(".processor.to_k_ip.0.", ".to_k_ip.").replace(".processor.to_v_ip.0.", ".to_v_ip.")
        state[k] = v.detach().numpy()
    motion = {k: v for k, v in state.items() if ".motion_modules." in k}
    rest = {k: v for k, v in state.items() if ".motion_modules." not in k}
    return {**rest, **diffusers_motion_to_original(motion)}


def jax_denoiser(size: Size, models: list):
    """The like-for-like XDynaDenoiser with the weights of the torch `models` (as `torch_models` returns);
    empties that list, freeing each torch model once converted (the mid size is ~8 GB of float32 per
    framework, so both copies at once would not leave room for anything else)."""
    from convert.state import load_torch_state
    from xdyna_jax.models.controlnet import ControlNetConfig, ControlNetModel
    from xdyna_jax.models.unet import UNet
    from xdyna_jax.models.xdyna import XDynaDenoiser
    from xdyna_jax.nn.shape_only import shape_only_model

    like, _ = unet_configs(size)
    unet = load_torch_state(shape_only_model(UNet, like), jax_unet_state(models[0]), source="UNetMotionModel")
    nets = [unet]
    for i, name in ((1, "pose"), (2, "face")):
        models[i - 1] = None
        gc.collect()
        cfg = ControlNetConfig.from_diffusers(dict(models[i].config))
        state = {k: v.detach().numpy() for k, v in models[i].state_dict().items()}
        nets.append(
            load_torch_state(shape_only_model(ControlNetModel, cfg), state, source=f"{name} ControlNet")
        )
    models.clear()
    gc.collect()
    return XDynaDenoiser(*nets)


def _flat_params(module) -> dict:
    from flax import nnx

    return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def fill_random_(module, seed: int, scale: float = PERTURB, like=None):
    """Give every parameter of a shape-only `module` a value: the same array as `like`'s parameter of that
    path where there is one (shared, not copied), else scale * N(0, 1) (norm scales 1 + that)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    known = _flat_params(like) if like is not None else {}
    for path, var in _flat_params(module).items():
        if path in known:
            var.set_value(known[path].get_value())
            continue
        base = 1.0 if path[-1] == "scale" else 0.0
        var.set_value(jnp.asarray(base + scale * rng.standard_normal(var.shape), jnp.float32))
    return module


def xdyna_denoiser(size: Size, like_denoiser):
    """The release's denoiser sharing the like-for-like one's weights; its Dynamics-Adapter random."""
    from xdyna_jax.models.unet import UNet
    from xdyna_jax.models.xdyna import XDynaDenoiser
    from xdyna_jax.nn.shape_only import shape_only_model

    _, xdyna = unet_configs(size)
    unet = fill_random_(shape_only_model(UNet, xdyna), seed=7, like=like_denoiser.unet)
    return XDynaDenoiser(unet, like_denoiser.pose_controlnet, like_denoiser.face_controlnet)


def _pipeline(denoiser, sequential_cfg: bool = True, compiler_options: dict | None = None, **parts):
    from xdyna_jax.sampling.bundles import XDYNA_SCHEDULER, XDyna
    from xdyna_jax.sampling.xdyna import XDynaPipeline

    names = ("vae", "text_encoder", "tokenizer", "image_encoder", "resampler")
    parts = XDyna(denoiser, *(parts.get(k) for k in names), XDYNA_SCHEDULER, {})
    return XDynaPipeline(parts, sequential_cfg=sequential_cfg, compiler_options=compiler_options)


def jax_step_args(pipe, x: dict):
    """The arguments `denoise` passes the compiled window step for one window holding every driven frame."""
    import jax.numpy as jnp
    from flax import nnx

    n = x["pose"].shape[0]
    conds = {k: jnp.asarray(x[k]) for k in ("pose", "face", "context")}
    latents = jnp.asarray(x["latents"])
    total = jnp.zeros((2, n, *latents.shape[1:]), jnp.float32)
    frames = jnp.arange(n, dtype=jnp.int32)[None]
    return (
        (nnx.split(pipe.parts.denoiser)[1], conds),
        latents,
        jnp.int32(TIMESTEP),
        frames,
        jnp.ones(1, bool),
        total,
    )


def time_jax_step(pipe, x: dict, repeats: int) -> dict:
    """Compile seconds (trace + lower + compile, with the pipeline's compiler options), min seconds per
    window step, the output."""
    args = jax_step_args(pipe, x)
    t0 = time.perf_counter()
    compiled = pipe._step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = {}

    def run():
        out["total"] = compiled(*args).block_until_ready()

    return {
        "jax_s": min(time_calls(run, repeats)),
        "compile_s": compile_s,
        "output": np.asarray(out["total"]),
    }


class EmptyPromptIds:
    """Stands in for the CLIP tokenizer: the pipeline only encodes the empty prompt, [bos, eos, eos ...]."""

    def __init__(self, vocab_size: int):
        self.bos, self.eos = vocab_size - 2, vocab_size - 1  # CLIP's 49406 / 49407 at the real vocabulary

    def __call__(self, texts):
        if any(texts):
            raise ValueError("EmptyPromptIds encodes only the empty prompt")
        return np.array([[self.bos] + [self.eos] * (TEXT_TOKENS - 1)] * len(texts), np.int32)


def e2e_parts(size: Size) -> dict:
    """VAE, text encoder, image encoder and resampler of random weights, plus the prompt ids."""
    from xdyna_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from xdyna_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
    from xdyna_jax.models.resampler import Resampler, ResamplerConfig
    from xdyna_jax.models.vae import AutoencoderKL, VAEConfig
    from xdyna_jax.nn.shape_only import shape_only_model

    spec = size.e2e_parts
    text = CLIPTextConfig(**spec["text"])
    resampler = ResamplerConfig(
        **{"num_queries": size.ip_tokens, "output_dim": size.cross, **spec["resampler"]}
    )
    build = lambda cls, cfg, seed: fill_random_(shape_only_model(cls, cfg), seed)
    return {
        "vae": build(AutoencoderKL, VAEConfig(**spec["vae"]), 3),
        "text_encoder": build(CLIPTextModel, text, 4),
        "tokenizer": EmptyPromptIds(text.vocab_size),
        "image_encoder": build(CLIPVisionModelWithProjection, CLIPVisionConfig(**spec["vision"]), 5),
        "resampler": build(Resampler, resampler, 6),
    }


def time_e2e(size: Size, denoiser, xla_options: dict | None = None) -> dict:
    """Seconds of a first (compiling) and a second `XDynaPipeline.__call__` (`xla_options`: of its window
    step's compile; the VAE and encoders keep XLA's defaults)."""
    pipe = _pipeline(denoiser, compiler_options=xla_options, **e2e_parts(size))
    h, w = (size.downscale * d for d in size.latent)
    n = size.e2e_frames
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (h + 7, w + 3, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    faces = rng.integers(0, 256, (n, h, w, 6), dtype=np.uint8)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        frames = pipe(reference, poses, faces, steps=size.e2e_steps, height=h, width=w, num_frames=n)
        times.append(time.perf_counter() - t0)
    assert frames.shape == (n, h, w, 3)
    return {"e2e_cold_s": times[0], "e2e_warm_s": times[1], "e2e_frames": n, "e2e_steps": size.e2e_steps}


def rel_err(actual, expected) -> float:
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def like_for_like_check(size: Size, seed: int = 0) -> float:
    """rel err of our like-for-like window step against the PyTorch one (batched CFG), one call each."""
    models = torch_models(size, seed)
    x = step_inputs(size, seed)
    run, out = torch_step_runner(models, x, batched=True)
    run()
    expected = out["total"].numpy().transpose(0, 1, 3, 4, 2)
    pipe = _pipeline(jax_denoiser(size, models))
    got = pipe._step(*jax_step_args(pipe, x))
    return rel_err(got, expected)


# --------------------------------------------------------------------------------------------- driver


def worker(
    name: str,
    repeats: int,
    e2e: bool,
    jax_batched_cfg: bool,
    xla_options: dict | None = None,
    xdyna: bool = True,
) -> dict:
    import torch

    size = SIZES[name]
    torch.set_num_threads(os.cpu_count())
    models = torch_models(size)
    x = step_inputs(size)
    res = time_torch(models, x, repeats)
    expected = res.pop("output")
    like = jax_denoiser(size, models)  # empties `models`: the torch weights are freed
    r = time_jax_step(_pipeline(like, compiler_options=xla_options), x, repeats)
    res["rel_err"] = rel_err(r.pop("output"), expected)
    res["like_for_like"] = r
    if jax_batched_cfg:  # the pipeline's other CFG mode (more memory)
        r = time_jax_step(_pipeline(like, False, xla_options), x, repeats)
        r["rel_err"] = rel_err(r.pop("output"), expected)
        res["like_for_like_batched_cfg"] = r
    if xdyna or e2e:
        xdyna_den = xdyna_denoiser(size, like)
        del like
    if xdyna:
        r = time_jax_step(_pipeline(xdyna_den, compiler_options=xla_options), x, repeats)
        r.pop("output")
        res["xdyna"] = r
    if e2e:
        res.update(time_e2e(size, xdyna_den, xla_options))
    res["threads"] = torch.get_num_threads()
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return res


def merge_rounds(runs: list[dict]) -> dict:
    """One result of several worker processes: every time the minimum over the rounds (the rel errs the
    worst), the rest as the first round has it."""
    r = dict(runs[0])
    r["torch_s_by_cfg"] = {k: min(x["torch_s_by_cfg"][k] for x in runs) for k in r["torch_s_by_cfg"]}
    r["torch_cfg"] = min(r["torch_s_by_cfg"], key=r["torch_s_by_cfg"].get)
    r["torch_s"] = r["torch_s_by_cfg"][r["torch_cfg"]]
    r["rel_err"] = max(x["rel_err"] for x in runs)
    for variant in ("like_for_like", "like_for_like_batched_cfg", "xdyna"):
        if variant in r:
            r[variant] = dict(r[variant], jax_s=min(x[variant]["jax_s"] for x in runs))
            if "rel_err" in r[variant]:
                r[variant]["rel_err"] = max(x[variant]["rel_err"] for x in runs)
    r["rounds"] = len(runs)
    return r


def report(name: str, r: dict, xla_options: list[str] = ()) -> None:
    size = SIZES[name]
    frames = f"1+{size.frames}"
    latent = "x".join(map(str, size.latent))
    r.setdefault("like_for_like", {})["rel_err"] = r["rel_err"]
    for variant in ("like_for_like", "like_for_like_batched_cfg", "xdyna"):
        if variant not in r:
            continue
        j = r[variant]
        print(
            f"task=sample_step size={name} variant={variant} jax_s={j['jax_s']:.3f} torch_s={r['torch_s']:.3f} "
            f"ratio={j['jax_s'] / r['torch_s']:.2f}"
            + (f" rel_err={j['rel_err']:.1e}" if "rel_err" in j else "")
            + f" jax_compile_s={j['compile_s']:.1f}"
            + "".join(f" xla_option={o}" for o in xla_options),
            flush=True,
        )
    torch_ways = ", ".join(f"{k} {v:.3f} s" for k, v in r["torch_s_by_cfg"].items())
    print(
        f"  (one window of {frames} frames, latent {latent}, CFG 2, fp32; PyTorch timed with the CFG halves "
        f"{torch_ways} -> {r['torch_cfg']} kept, {r['threads']} threads; JAX halves one after the other "
        f"(as XDynaPipeline's default; like_for_like_batched_cfg: as one batch); "
        f"like_for_like = same function as PyTorch, {'agrees' if r['rel_err'] < 1e-4 else 'DISAGREES'} "
        f"(rel err {r['rel_err']:.1e} < 1e-4); xdyna = the pipeline's real step, with the Dynamics-Adapter "
        f"PyTorch does not run; peak RSS {r['peak_rss_gib']:.1f} GiB; min over {r.get('rounds', 1)} "
        f"round(s); load average {os.getloadavg()})",
        flush=True,
    )
    if "e2e_cold_s" in r:
        print(
            f"task=sample_e2e size={name} frames={r['e2e_frames']} steps={r['e2e_steps']} "
            f"first_call_s={r['e2e_cold_s']:.1f} second_call_s={r['e2e_warm_s']:.1f}",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="tiny,mid")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up (min is kept)")
    p.add_argument("--skip-e2e", action="store_true", help="no XDynaPipeline.__call__ timing")
    p.add_argument(
        "--jax-batched-cfg", action="store_true", help="also time JAX with the CFG halves as one batch"
    )
    p.add_argument("--skip-xdyna", action="store_true", help="time only the like-for-like JAX step")
    p.add_argument("--rounds", type=int, default=1, help="worker processes per size (min over them)")
    p.add_argument(
        "--xla-option", action="append", default=[], help="KEY=VALUE XLA compiler option for JAX (repeatable)"
    )
    p.add_argument("--worker", choices=sorted(SIZES), help=argparse.SUPPRESS)
    a = p.parse_args()
    options = parse_xla_options(a.xla_option)  # checked here too, before any worker starts
    if a.worker:  # child process: one size
        res = worker(a.worker, a.repeats, not a.skip_e2e, a.jax_batched_cfg, options, not a.skip_xdyna)
        print(json.dumps(res))
        return
    if a.rounds < 1:
        p.error(f"--rounds must be at least 1, got {a.rounds}")
    for name in a.sizes.split(","):
        if name not in SIZES:
            p.error(f"unknown size {name!r}; choose from {sorted(SIZES)}")
        args = ["--worker", name, "--repeats", str(a.repeats)]
        args += ["--skip-e2e"] * a.skip_e2e + ["--jax-batched-cfg"] * a.jax_batched_cfg
        args += ["--skip-xdyna"] * a.skip_xdyna
        args += [arg for opt in a.xla_option for arg in ("--xla-option", opt)]
        print(f"load average {os.getloadavg()}", flush=True)
        report(name, merge_rounds([spawn(__spec__.name, args) for _ in range(a.rounds)]), a.xla_option)


if __name__ == "__main__":
    main()
