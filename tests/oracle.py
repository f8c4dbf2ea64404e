"""Helpers shared by the tests: error metric, weight perturbation, torch <-> numpy, the tiny configs and the
fake model folders several test files build."""

from __future__ import annotations

import json
import re

import numpy as np
from tokenizers.pre_tokenizers import ByteLevel

from xdyna_jax.nn.shape_only import shape_only_model


def rel_err(actual, expected) -> float:
    """max |a - b| / max |b| (the metric of docs/conventions.md)."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def perturb_(torch_module, seed: int = 0, scale: float = 0.05) -> None:
    """Add noise to every parameter so no zero-initialised or unit-initialised path hides a bug."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in torch_module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def torch_state(torch_module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in torch_module.state_dict().items()}


def nchw(x_nhwc: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
    return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


def jitted(model):
    """model's __call__ under jax.jit (tiny models run op by op are slower than one compile)."""
    import jax
    from flax import nnx

    graph, state = nnx.split(model)
    fn = jax.jit(lambda s, *a, **k: nnx.merge(graph, s)(*a, **k), static_argnames=("ip_scale",))
    return lambda *a, **k: fn(state, *a, **k)


def random_torch_state(model_cls, config, seed: int = 0) -> dict[str, np.ndarray]:
    """A random PyTorch-named state dict for `model_cls(config)` without building the model eagerly
    (eager NNX init compiles one XLA kernel per parameter shape: slow for SD-structured models)."""
    from flax import nnx

    from convert.state import to_torch_layout, torch_key

    abstract = shape_only_model(model_cls, config)
    rng = np.random.default_rng(seed)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape = to_torch_layout(path[-1], np.empty(var.shape, np.bool_)).shape
        base = 1.0 if path[-1] == "scale" else 0.0
        out[torch_key(path)] = (base + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    return out


# XLA:CPU options for programs that run once or a few times on tiny arrays, where compiling is the cost:
# as a jit's compiler_options, and as train.py --set overrides
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_COMPILE_SETS = [f"compiler_options.{k}={v}" for k, v in FAST_COMPILE.items()]

# The small two-block UNet most tests use (diffusers' own unit-test shape, cross-attention width 16).
TINY_UNET = dict(
    block_out_channels=(32, 64),
    norm_num_groups=8,
    cross_attention_dim=16,
    attention_head_dim=2,
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


# CLIP tokenizer folders (test_clip_tokenizer, test_convert_sd15).
# A hand-written merge list in a valid order (every merge's result is a vocabulary entry and every part
# exists before it is used), with overlapping pairs ("l l", "a a") and end-of-word merges.
TOKENIZER_MERGES = [
    "t h", "th e</w>", "h e", "a n", "an d</w>", "i n", "in g</w>", "o n", "e r", "l l", "ll o</w>",
    "e ll", "h ell", "hell o</w>", "c a", "ca t</w>", "p h", "ph o", "pho t", "phot o</w>", "e d</w>",
    "e s</w>", "a r", "s t", "st ar", "star s</w>", "a a", "aa a</w>", "1 9", "' s</w>", "Ã ©", "Ã ©</w>",
    "ca f", "caf Ã©</w>", ". .", ".. .</w>",
]  # fmt: skip


def write_tokenizer(folder, *, sd15_configs=True, pad_token="<|endoftext|>"):
    """vocab = 256 byte symbols, their `</w>` forms, merge results, then the two special tokens (as CLIP)."""
    folder.mkdir()
    base = sorted(ByteLevel.alphabet())  # CLIP order: printable bytes ("!" = 0) first, then U+0100...
    tokens = base + [b + "</w>" for b in base]
    for merge in TOKENIZER_MERGES:
        a, b = merge.split(" ")
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(TOKENIZER_MERGES) + "\n", encoding="utf-8"
    )
    if sd15_configs:  # as in SD 1.5's tokenizer/ folder
        special = lambda c: {
            "content": c,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }
        config = {
            "bos_token": special("<|startoftext|>"),
            "eos_token": special("<|endoftext|>"),
            "unk_token": special("<|endoftext|>"),
            "pad_token": pad_token,
            "do_lower_case": True,
            "model_max_length": 77,
            "tokenizer_class": "CLIPTokenizer",
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        tokens_map = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        (folder / "special_tokens_map.json").write_text(json.dumps(tokens_map))
    return folder


# The tiny SD 1.x pipeline the converter tests write as a diffusers folder: its UNet's cross-attention width
# is the text encoder's hidden size (32).
# One block: eager init and real-Rngs traces stay cheap (every distinct parameter shape costs a compile,
# and nnx.eval_shape with real Rngs grows with the square of the parameter count).
ONE_BLOCK = dict(
    block_out_channels=(8,),
    down_block_types=("CrossAttnDownBlock2D",),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=8,
    attention_head_dim=2,
)
TINY_SD_UNET = dict(TINY_UNET, cross_attention_dim=32, sample_size=8)
TINY_VAE = dict(
    block_out_channels=(8, 16),
    norm_num_groups=4,
    layers_per_block=1,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)
TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=1000,
    max_position_embeddings=77,
)


def make_models(unet_kw, vae_kw, clip_kw, seed=0):
    """diffusers UNet and VAE and a transformers CLIP text encoder, each perturbed with its own seed."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    models = (
        UNet2DConditionModel(**unet_kw),
        AutoencoderKL(**vae_kw),
        CLIPTextModel(CLIPTextConfig(**clip_kw)),
    )
    for i, m in enumerate(models):
        perturb_(m, seed + i)
    return models


def write_diffusers_folder(folder, models):
    """An SD 1.x diffusers folder: the three models of `make_models`, a tokenizer and a DDIM scheduler."""
    from diffusers import DDIMScheduler

    unet, vae, clip = models
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    clip.save_pretrained(folder / "text_encoder")
    write_tokenizer(folder / "tokenizer")
    DDIMScheduler(beta_schedule="linear", steps_offset=1).save_pretrained(folder / "scheduler")
    return folder


def diffusers_resampler(cfg, seed=0):
    """diffusers' IPAdapterPlusImageProjection for our ResamplerConfig `cfg`, perturbed."""
    import torch
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    torch.manual_seed(seed)
    ref = IPAdapterPlusImageProjection(
        embed_dims=cfg.embedding_dim,
        output_dims=cfg.output_dim,
        hidden_dims=cfg.dim,
        depth=cfg.depth,
        dim_head=cfg.dim_head,
        heads=cfg.heads,
        num_queries=cfg.num_queries,
        ffn_ratio=cfg.ff_mult,
    ).eval()
    perturb_(ref, seed)
    return ref


_RESAMPLER_RENAMES = [
    (r"^layers\.(\d+)\.ln0\.", r"layers.\1.0.norm1."),
    (r"^layers\.(\d+)\.ln1\.", r"layers.\1.0.norm2."),
    (r"^layers\.(\d+)\.attn\.to_q\.", r"layers.\1.0.to_q."),
    (r"^layers\.(\d+)\.attn\.to_out\.0\.", r"layers.\1.0.to_out."),
    (r"^layers\.(\d+)\.ff\.0\.", r"layers.\1.1.0."),
    (r"^layers\.(\d+)\.ff\.1\.net\.0\.proj\.", r"layers.\1.1.1."),
    (r"^layers\.(\d+)\.ff\.1\.net\.2\.", r"layers.\1.1.3."),
]


def to_original(state: dict) -> dict:
    """diffusers IPAdapterPlusImageProjection keys -> ip-adapter-plus .bin `image_proj` keys."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^layers\.(\d+)\.attn\.to_([kv])\.weight$", key)
        if m:
            if m.group(2) == "k":  # to_kv = [to_k; to_v] along the output rows
                v = state[f"layers.{m.group(1)}.attn.to_v.weight"]
                out[f"layers.{m.group(1)}.0.to_kv.weight"] = np.concatenate([value, v], axis=0)
            continue
        for pattern, repl in _RESAMPLER_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


# X-Dyna sampling: the release's "uniform" context schedule, as its code loops (step 0 in the release).
def _ordered_halving(val: int) -> float:
    return int(f"{val:064b}"[::-1], 2) / (1 << 64)


def release_context_windows(step, num_frames, size=16, stride=1, overlap=4, closed_loop=True, offset=0):
    """The release's schedule (a generator over windows), plus its per-step frame offset."""
    if num_frames <= size:
        yield list(range(num_frames))
        return
    stride = min(stride, int(np.ceil(np.log2(num_frames / size))) + 1)
    for context_step in 1 << np.arange(stride):
        pad = int(round(num_frames * _ordered_halving(step)))
        for j in range(
            int(_ordered_halving(step) * context_step) + pad,
            num_frames + pad + (0 if closed_loop else -overlap),
            size * context_step - overlap,
        ):
            yield [(e + offset) % num_frames for e in range(j, j + size * context_step, context_step)]


# A tiny X-Dyna with every part and random weights (test_xdyna_pipeline, test_sample_cli): cross-attention
# width 16, a latent of 12x8 for 24x16 frames (the 9x9 reflect-padded blur needs more than 4 pixels).
TINY_XDYNA_CROSS = 16


def _random_model(cls, config, seed):
    from convert.state import load_torch_state

    return load_torch_state(
        shape_only_model(cls, config), random_torch_state(cls, config, seed), source="test"
    )


def tiny_xdyna(tmp_path):
    """An `XDyna` (UNet with adapter, IP tokens and motion modules; pose and face ControlNets; VAE; CLIP text
    and vision; resampler), its tokenizer written under tmp_path/tokenizer."""
    from xdyna_jax.models.clip_text import CLIPTextConfig
    from xdyna_jax.models.clip_vision import CLIPVisionConfig
    from xdyna_jax.models.controlnet import ControlNetConfig
    from xdyna_jax.models.resampler import ResamplerConfig
    from xdyna_jax.models.unet import UNetConfig
    from xdyna_jax.models.vae import VAEConfig

    cross = TINY_XDYNA_CROSS
    unet = UNetConfig(
        **TINY_UNET,
        dynamics_adapter=True,
        ip_adapter_tokens=4,
        motion_modules=True,
        motion_max_len=24,
        motion_norm_groups=8,
        groupnorm_over_frames=True,
        skip_reference_frame=True,
    )
    encoder = {k: TINY_UNET[k] for k in TINY_UNET if k != "up_block_types"}
    pose_cn = ControlNetConfig(
        **encoder, conditioning_channels=3, conditioning_embedding_out_channels=(8, 16)
    )
    face_cn = ControlNetConfig(
        **encoder, conditioning_channels=6, conditioning_embedding_out_channels=(8, 16)
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=16
    )
    resampler = ResamplerConfig(
        dim=16, depth=1, dim_head=8, heads=2, num_queries=4, embedding_dim=32, output_dim=cross
    )
    text = CLIPTextConfig(**dict(TINY_CLIP, hidden_size=cross))
    return _random_xdyna(tmp_path, unet, pose_cn, face_cn, VAEConfig(**TINY_VAE), text, vision, resampler)


def _random_xdyna(tmp_path, unet, pose_cn, face_cn, vae, text, vision, resampler):
    """An XDyna of random models of these configs (seeds 0..6), its tokenizer written under tmp_path."""
    from xdyna_jax.conditioning.clip_tokenizer import CLIPTokenizer
    from xdyna_jax.models.clip_text import CLIPTextModel
    from xdyna_jax.models.clip_vision import CLIPVisionModelWithProjection
    from xdyna_jax.models.controlnet import ControlNetModel
    from xdyna_jax.models.resampler import Resampler
    from xdyna_jax.models.unet import UNet
    from xdyna_jax.models.vae import AutoencoderKL
    from xdyna_jax.training.scratch import assemble_xdyna

    models = {
        "unet": _random_model(UNet, unet, 0),
        "controlnet_pose": _random_model(ControlNetModel, pose_cn, 1),
        "controlnet_face": _random_model(ControlNetModel, face_cn, 2),
        "vae": _random_model(AutoencoderKL, vae, 3),
        "text_encoder": _random_model(CLIPTextModel, text, 4),
        "image_encoder": _random_model(CLIPVisionModelWithProjection, vision, 5),
        "resampler": _random_model(Resampler, resampler, 6),
    }
    return assemble_xdyna(models, CLIPTokenizer.from_folder(write_tokenizer(tmp_path / "tokenizer")))


def save_xdyna_folder(parts, folder, *, face=True):
    """`parts` (an XDyna, e.g. `tiny_xdyna`) saved as the pipeline folder `convert xdyna` writes (the tiny
    tokenizer written afresh); face=False leaves out controlnet_face/."""
    from xdyna_jax import save

    folder.mkdir(parents=True)
    models = {
        "unet": parts.denoiser.unet,
        "controlnet_pose": parts.denoiser.pose_controlnet,
        "controlnet_face": parts.denoiser.face_controlnet if face else None,
        "vae": parts.vae,
        "text_encoder": parts.text_encoder,
        "image_encoder": parts.image_encoder,
        "resampler": parts.resampler,
    }
    for name, module in models.items():
        if module is not None:
            save(module, folder / name)
    write_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(parts.scheduler.to_diffusers()))
    (folder / "manifest.json").write_text(json.dumps(dict(parts.manifest)))
    return folder


# A standing person as fractions of the image (x, y), OpenPose COCO-18 order: arms hang, the feet near the
# bottom. Every joint scores 1.
STANDING_BODY = (
    (0.50, 0.15), (0.50, 0.25), (0.40, 0.26), (0.36, 0.40), (0.34, 0.55), (0.60, 0.26), (0.64, 0.40),
    (0.66, 0.55), (0.45, 0.55), (0.45, 0.72), (0.45, 0.90), (0.55, 0.55), (0.55, 0.72), (0.55, 0.90),
    (0.48, 0.13), (0.52, 0.13), (0.46, 0.14), (0.54, 0.14),
)  # fmt: skip


def standing_pose(image_hw, *, raise_right_wrist: float = 0.0):
    """The standing person in the pixels of an (h, w) image; raise_right_wrist lifts the right wrist by
    that fraction of the height (a motion to follow)."""
    from xdyna_jax.conditioning.pose import PoseFrame

    body = np.array(STANDING_BODY) * np.array([image_hw[1], image_hw[0]])
    body[4, 1] -= raise_right_wrist * image_hw[0]
    return PoseFrame(body, np.ones(18))


class FakeDWPose:
    """Stands in for `conditioning.extractors.DWPoseOnnx(det, pose)`: the standing person of each frame, in
    its pixels, the right wrist raised by the frame's mean brightness (so frames differ); keeps the frames."""

    def __init__(self, det_onnx_path=None, pose_onnx_path=None):
        self.paths, self.frames = (det_onnx_path, pose_onnx_path), []

    def __call__(self, frame):
        self.frames.append(frame)
        return standing_pose(frame.shape[:2], raise_right_wrist=0.2 * float(frame.mean()) / 255)


def moving_square_video(num_frames: int, size=(48, 64), *, seed: int = 0, tint=(0, 0, 0)) -> np.ndarray:
    """uint8 (T, h, w, 3): a colour gradient with a bright square sliding right one pixel a frame (each
    seed starts it elsewhere); `tint` is added everywhere (a face patch video is the video, tinted)."""
    h, w = size
    y, x = np.mgrid[:h, :w]
    base = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 60 + 40 * seed)], -1)
    frames = np.repeat(base[None], num_frames, axis=0)
    for t in range(num_frames):
        x0, y0 = (3 * seed + t) % (w - 8), (5 * seed) % (h - 8)
        frames[t, y0 : y0 + 8, x0 : x0 + 8] = 250
    return np.clip(frames + np.array(tint), 0, 255).astype(np.uint8)


def face_landmarks(num_frames: int, size=(48, 64), seed: int = 0) -> np.ndarray:
    """(T, 68, 2) x, y pixels: a fixed cloud of 68 points around the standing person's head, drifting."""
    rng = np.random.default_rng(seed)
    h, w = size
    cloud = rng.uniform([-0.06 * w, -0.08 * h], [0.06 * w, 0.08 * h], (68, 2)) + [0.5 * w, 0.15 * h]
    return cloud[None] + 0.2 * np.arange(num_frames)[:, None, None] * np.array([1.0, 0.5])


def write_training_inputs(root, names=("a", "b", "c"), *, num_frames: int = 24, size=(48, 64), scene=False):
    """Inputs of `xdyna_jax.data.prepare` under root: videos/<name>.mp4 (moving squares, 10 fps) and, for
    human videos, poses/ (OpenPose JSON folders for even-numbered videos, (T, 18, 3) .npy for the others;
    the standing person, right wrist rising), faces/<name>.npy landmarks and patches/<name>.mp4 (the video
    tinted). Returns {"videos", "poses", "faces", "patches"} -> folder (only "videos" for scene)."""
    from pathlib import Path

    from xdyna_jax.conditioning.pose import to_arrays, write_openpose_json
    from xdyna_jax.io.video import write_video

    root = Path(root)
    dirs = {k: root / k for k in (("videos",) if scene else ("videos", "poses", "faces", "patches"))}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        frames = moving_square_video(num_frames, size, seed=i + (10 if scene else 0))
        write_video(dirs["videos"] / f"{name}.mp4", frames, fps=10)
        if scene:
            continue
        poses = [standing_pose(size, raise_right_wrist=0.2 * t / num_frames) for t in range(num_frames)]
        if i % 2 == 0:
            (dirs["poses"] / name).mkdir()
            for t, pose in enumerate(poses):
                write_openpose_json(pose, dirs["poses"] / name / f"{name}_{t:012d}_keypoints.json")
        else:
            np.save(dirs["poses"] / f"{name}.npy", to_arrays(poses)[0])
        np.save(dirs["faces"] / f"{name}.npy", face_landmarks(num_frames, size, seed=i))
        write_video(
            dirs["patches"] / f"{name}.mp4",
            moving_square_video(num_frames, size, seed=i, tint=(0, 0, 90)),
            fps=10,
        )
    return dirs


def one_block_xdyna(tmp_path, *, vae_scaling_factor: float = 0.18215, width: int = 8):
    """The smallest X-Dyna with every part, random weights (test_train_loop, test_overfit: its train step
    compiles in seconds): one-block UNet (adapter, 2 IP tokens, motion modules) and ControlNets, a VAE that
    keeps the resolution, 2-layer CLIP vision, 1-layer CLIP text; its tokenizer written under
    tmp_path/tokenizer. `vae_scaling_factor` is the VAE's latent scale (SD's by default); `width` the channels
    of the UNet's and the ControlNets' one block."""
    from xdyna_jax.models.clip_text import CLIPTextConfig
    from xdyna_jax.models.clip_vision import CLIPVisionConfig
    from xdyna_jax.models.controlnet import ControlNetConfig
    from xdyna_jax.models.resampler import ResamplerConfig
    from xdyna_jax.models.unet import UNetConfig
    from xdyna_jax.models.vae import VAEConfig

    block = dict(ONE_BLOCK, block_out_channels=(width,))
    unet = UNetConfig(
        **block, up_block_types=("CrossAttnUpBlock2D",), dynamics_adapter=True, ip_adapter_tokens=2,
        motion_modules=True, motion_max_len=24, motion_norm_groups=4, motion_heads=2,
        groupnorm_over_frames=True, skip_reference_frame=True,
    )  # fmt: skip

    def controlnet(channels):
        return ControlNetConfig(
            **block, conditioning_channels=channels, conditioning_embedding_out_channels=(4,)
        )

    vae = VAEConfig(block_out_channels=(8,), norm_num_groups=4, layers_per_block=1, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                    scaling_factor=vae_scaling_factor)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                              projection_dim=8, patch_size=56)  # fmt: skip
    resampler = ResamplerConfig(
        dim=8, depth=1, dim_head=4, heads=2, num_queries=2, embedding_dim=16, output_dim=8
    )
    text = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                          vocab_size=1000, max_position_embeddings=77)  # fmt: skip
    return _random_xdyna(tmp_path, unet, controlnet(3), controlnet(6), vae, text, vision, resampler)


def tensorboard_values(folder):
    """(step, summary value) of every summary in the TensorBoard event files under `folder`, in the order
    written (event files are TFRecords: length, its CRC, the Event proto, its CRC)."""
    import struct
    from pathlib import Path

    from tensorboardX.proto.event_pb2 import Event

    for file in sorted(Path(folder).rglob("events.out.tfevents.*")):
        data, i = file.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                yield event.step, value


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] of every scalar summary under `folder`, in the order written."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for step, value in tensorboard_values(folder):
        if value.HasField("simple_value"):
            scalars.setdefault(value.tag, []).append((step, value.simple_value))
    return scalars


def tensorboard_images(folder) -> dict[str, list[tuple[int, np.ndarray]]]:
    """tag -> [(step, uint8 (H, W, C) image), ...] of every image summary under `folder` (PNGs decoded)."""
    import io

    from PIL import Image

    images: dict[str, list[tuple[int, np.ndarray]]] = {}
    for step, value in tensorboard_values(folder):
        if value.HasField("image"):
            png = Image.open(io.BytesIO(value.image.encoded_image_string))
            images.setdefault(value.tag, []).append((step, np.asarray(png)))
    return images


def assert_placed_by_rules(module, reference, mesh, rules) -> int:
    """Every param of `module` (loaded onto shards) sits on the sharding its logical axis names get from
    `rules` on `mesh` and equals the same param of `reference` (loaded on one device) bit for bit; returns
    how many are split over `fsdp` (a check that sharding happened at all)."""
    import jax
    from flax import nnx

    from xdyna_jax.sharding import param_shardings

    params = nnx.state(module, nnx.Param)
    wanted = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(param_shardings(params, mesh, rules))}
    ref = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(reference, nnx.Param))}
    assert set(wanted) == set(ref), "the two modules have different params"
    split = 0
    for path, var in nnx.to_flat_state(params):
        value, sharding = var.get_value(), wanted[tuple(path)]
        assert value.sharding == sharding, (path, value.sharding, sharding)
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ref[tuple(path)]), err_msg=str(path))
        split += "fsdp" in jax.tree_util.tree_leaves(tuple(sharding.spec))
    return split
