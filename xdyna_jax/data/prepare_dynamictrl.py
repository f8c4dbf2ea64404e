"""Videos + pose + captions -> a DynamiCtrl fine-tuning dataset: latents and text embeddings computed once.

    python -m xdyna_jax.data.prepare --model dynamictrl --bundle bundles/dynamictrl --videos data/videos \\
        --pose-videos data/poses --captions data/prompts.txt --id-token "BW_STYLE " \\
        --frames 37 --height 1360 --width 768 --clips-per-video 4 --output data/dynamictrl

The release fine-tunes on `videos/<name>.mp4`, DWPose-rendered `poses/<name>.mp4` of the same length and a
`prompts.txt` of `name#####caption` lines (a caption per video; `name` is the video's file name or stem).
Its VAE and T5 are frozen, so this step runs them ahead of training and the train step reads only what
they would produce (`training/dynamictrl_objective.py`). Per video, `--clips-per-video` clips are cut as
the release cuts one per step: `--frames` consecutive frames from a start drawn in 1..`--max-start-frame`
(capped where the video ends; 0 when the video has exactly `--frames`), each frame plainly resized to
H x W (no crop). Each clip becomes one example `<stem>.<k>.npz`:

    latents        float32 (F', h, w, C)  a VAE posterior sample of the clip, x the scaling factor
    image_latents  float32 (1, h, w, C)   the clip's frame 0 after pixel noise x + sigma * n with
                                          log sigma ~ N(-3, 0.5) (`reference_pixel_noise`), encoded as a
                                          one-frame video, a posterior sample x the scaling factor
    pose_latents   float32 (F', h, w, C)  the clip's pose frames, encoded alike
    text           float32 (L, D)         T5's embedding of id_token + caption (L = the transformer's
                                          max_text_seq_length, 226; no attention mask, as the release)
    name, start, reference_sigma          the video's stem, the clip's first frame, the noise level drawn

F' = (frames - 1) / 4 + 1 must be even for CogVideoX1.5's temporal patch (37 -> 10). Pose comes from
`--pose-videos DIR` (rendered skeleton videos, resized like the frames) or `--poses DIR` (keypoints as
`python -m xdyna_jax.data.prepare` reads them, in the video's pixels or fractions, drawn MimicMotion-style
as DynamiCtrl's pose videos are). Every draw (clip starts, the posterior samples, the reference noise)
comes from `--seed`, so the same inputs and seed give the same dataset. T5 runs first, over every caption,
and is released before the VAE is read, so they never hold memory together.

Everything is checked before anything is computed (the bundle's parts, a caption and a pose source for
every video with the video's frame count, videos long enough for a clip, sizes the VAE and the patch
divide); the dataset is written into a temporary folder beside --output and renamed into place when
complete, so a failed run leaves nothing. `dataset.json` records the sizes, the options and every clip.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xdyna_jax.io.atomic import atomic_folder

FORMAT = "xdyna_jax.dynamictrl/1"
INFO_FILE = "dataset.json"
CAPTION_SEPARATOR = "#####"
EXAMPLE_KEYS = ("latents", "image_latents", "pose_latents", "text")
DTYPES = ("float32", "bfloat16")


class PrepareError(ValueError):
    """Bad input to the DynamiCtrl preparation: the message names the file or option."""


def build_parser(
    prog: str = "python -m xdyna_jax.data.prepare --model dynamictrl",
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Videos + poses + captions -> a DynamiCtrl dataset (latents, T5 embeddings)."
    )
    p.add_argument("--model", choices=("dynamictrl",), default="dynamictrl", help=argparse.SUPPRESS)
    p.add_argument("--bundle", required=True, help="DynamiCtrl pipeline bundle (`convert dynamictrl`)")
    p.add_argument("--videos", required=True, help="folder of <name>.mp4 training videos")
    pose = p.add_mutually_exclusive_group(required=True)
    pose.add_argument(
        "--pose-videos", help="folder of <name>.mp4 rendered pose videos (the release's poses/)"
    )
    pose.add_argument("--poses", help="folder of <name>/ OpenPose JSON folders or <name>.npy keypoints")
    p.add_argument("--captions", required=True, help="the release's prompts.txt: name#####caption lines")
    p.add_argument("--id-token", default="", help="prefixed to every caption (the release uses 'BW_STYLE ')")
    p.add_argument("--frames", type=int, default=37, help="frames per clip, 1 + 4k with an even 1 + k")
    p.add_argument("--height", type=int, default=1360)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--clips-per-video", type=int, default=1)
    p.add_argument("--max-start-frame", type=int, default=30, help="clips start at 1..this (the release)")
    p.add_argument("--reference-noise-log-mean", type=float, default=-3.0)
    p.add_argument("--reference-noise-log-std", type=float, default=0.5)
    p.add_argument(
        "--tiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="encode in tiles as diffusers' enable_tiling (default); --no-tiling: whole frames (small sizes)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="VAE and T5 compute dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="dataset folder to create (must not exist)")
    return p


# ------------------------------------------------------------------------------------------------------
# Inputs, checked before anything is computed
# ------------------------------------------------------------------------------------------------------


def read_captions(path: str | Path) -> dict[str, str]:
    """`name#####caption` lines -> {stem: caption}; blank lines skipped, names given with or without their
    video suffix."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"--captions {path}: no such file")
    captions: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, sep, caption = line.partition(CAPTION_SEPARATOR)
        name = name.strip()
        if not sep or not name:
            raise PrepareError(f"{path}:{number}: expected name{CAPTION_SEPARATOR}caption, got {line[:80]!r}")
        stem = Path(name).stem if Path(name).suffix.lower() in _video_suffixes() else name
        if stem in captions:
            raise PrepareError(f"{path}:{number}: a second caption for {stem}")
        captions[stem] = caption.strip()
    return captions


def _video_suffixes() -> tuple[str, ...]:
    from xdyna_jax.data.prepare import VIDEO_SUFFIXES

    return VIDEO_SUFFIXES


def _check_options(args, temporal: int, multiple: int, patch_t: int) -> None:
    if args.frames < 1 or (args.frames - 1) % temporal:
        raise PrepareError(f"--frames must be 1 + {temporal}k, got {args.frames}")
    latent = (args.frames - 1) // temporal + 1
    if latent % patch_t:
        raise PrepareError(
            f"--frames {args.frames} gives {latent} latent frames; the transformer's temporal patch of "
            f"{patch_t} needs a multiple of it (the release's 37 gives 10)"
        )
    for name, value in (("--height", args.height), ("--width", args.width)):
        if value < multiple or value % multiple:
            raise PrepareError(f"{name} must be a positive multiple of {multiple}, got {value}")
    if args.clips_per_video < 1:
        raise PrepareError(f"--clips-per-video must be >= 1, got {args.clips_per_video}")
    if args.max_start_frame < 0:
        raise PrepareError(f"--max-start-frame must be >= 0, got {args.max_start_frame}")
    if args.reference_noise_log_std < 0:
        raise PrepareError(f"--reference-noise-log-std must be >= 0, got {args.reference_noise_log_std}")


class _Bundle:
    """The bundle's part folders and configs (weights are read later, one network at a time)."""

    def __init__(self, folder: str):
        from xdyna_jax.bundle import BundleError, read_meta
        from xdyna_jax.models.cogvideox import CogVideoXConfig
        from xdyna_jax.models.vae_cogvideox import CogVideoXVAEConfig

        self.path = Path(folder)
        manifest = self.path / "manifest.json"
        try:
            kind = json.loads(manifest.read_text()).get("kind")
        except (OSError, ValueError) as e:
            raise PrepareError(f"--bundle {folder}: no readable manifest.json ({e})") from e
        if kind != "dynamictrl":
            raise PrepareError(f"--bundle {folder}: a {kind!r} pipeline bundle, expected 'dynamictrl'")
        parts = {
            "transformer": "dynamictrl_transformer",
            "vae": "cogvideox_vae",
            "text_encoder": "t5_encoder",
        }
        metas = {}
        for name, part_kind in parts.items():
            try:
                metas[name] = read_meta(self.path / name)
            except (BundleError, FileNotFoundError) as e:
                raise PrepareError(f"--bundle {folder}: {e}") from e
            if metas[name]["kind"] != part_kind:
                raise PrepareError(
                    f"--bundle {folder}: {name}/ holds a {metas[name]['kind']!r} bundle, expected {part_kind!r}"
                )
        if not (self.path / "tokenizer").is_dir():
            raise PrepareError(f"--bundle {folder}: no tokenizer/ folder")
        self.transformer = CogVideoXConfig.from_dict(metas["transformer"]["config"])
        self.vae = CogVideoXVAEConfig.from_dict(metas["vae"]["config"])

    def load(self, name: str, kind: str, dtype: str):
        from xdyna_jax.bundle import load
        from xdyna_jax.nn.compute import Compute

        return load(self.path / name, compute=Compute(dtype=dtype), expected_kind=kind)


def _pose_source(args, video: Path, count: int):
    """The video's pose input, checked: ("video", path) or ("keypoints", PoseFrames)."""
    from xdyna_jax.data.prepare import PrepareError as XDynaPrepareError
    from xdyna_jax.data.prepare import probe_video, read_pose_file

    if args.pose_videos:
        path = Path(args.pose_videos) / video.name
        if not path.is_file():
            found = sorted(Path(args.pose_videos).glob(f"{video.stem}.*"))
            if not found:
                raise PrepareError(f"--pose-videos: no pose video for {video.name} in {args.pose_videos}")
            path = found[0]
        n, _, _ = probe_video(path)
        if n != count:
            raise PrepareError(f"{path}: {n} pose frames but video {video.name} has {count}")
        return "video", path
    try:
        return "keypoints", read_pose_file(Path(args.poses), video.stem, count)
    except XDynaPrepareError as e:
        raise PrepareError(str(e)) from e


def clip_starts(count: int, frames: int, clips: int, max_start: int, rng: np.random.Generator) -> list[int]:
    """`clips` first frames for clips of `frames` in a video of `count`: uniform in 1..max_start as the
    release draws them, capped where the video ends (0 when the video has exactly `frames`)."""
    last = min(max_start, count - frames)
    first = min(1, last)
    return [int(s) for s in rng.integers(first, last + 1, size=clips)]


class _Plan:
    """Everything checked: the videos, their captions, pose sources, frame counts and clip starts."""

    def __init__(self, args):
        from xdyna_jax.data.prepare import PrepareError as XDynaPrepareError
        from xdyna_jax.data.prepare import find_videos, probe_video

        if Path(args.output).exists():
            raise PrepareError(f"--output {args.output} already exists")
        self.bundle = _Bundle(args.bundle)
        vae, dit = self.bundle.vae, self.bundle.transformer
        _check_options(
            args, vae.temporal_compression_ratio, vae.spatial_scale * dit.patch_size, dit.patch_size_t or 1
        )
        if vae.latent_channels != dit.out_channels:
            raise PrepareError(
                f"--bundle: the VAE has {vae.latent_channels} latent channels, the transformer gives "
                f"{dit.out_channels}"
            )
        try:
            self.videos = find_videos(args.videos)
        except XDynaPrepareError as e:
            raise PrepareError(str(e)) from e
        captions = read_captions(args.captions)
        missing = [v.name for v in self.videos if v.stem not in captions]
        if missing:
            raise PrepareError(
                f"--captions {args.captions}: no caption for {len(missing)} video(s), first {missing[0]}"
            )
        self.captions = {v.stem: args.id_token + captions[v.stem] for v in self.videos}
        from xdyna_jax.bundle import build_abstract

        check_tiling(build_abstract(self.bundle.path / "vae"), args)  # a shape-only VAE: nothing is read
        self.poses, self.clips, self.fps = {}, [], {}
        for i, video in enumerate(self.videos):
            count, _, fps = probe_video(video)
            if count < args.frames:
                raise PrepareError(f"{video}: {count} frames, fewer than a clip's --frames {args.frames}")
            self.fps[video.stem] = fps
            self.poses[video.stem] = _pose_source(args, video, count)
            rng = np.random.default_rng([args.seed, i])
            for k, start in enumerate(
                clip_starts(count, args.frames, args.clips_per_video, args.max_start_frame, rng)
            ):
                self.clips.append((video, k, start))


# ------------------------------------------------------------------------------------------------------
# Computing the examples
# ------------------------------------------------------------------------------------------------------


def reference_pixel_noise(frames, key, log_mean: float, log_std: float):
    """(frames (B, ..., H, W, 3) in [-1, 1] + sigma * N(0, 1), sigma (B,)), log sigma ~ N(log_mean, log_std)
    per example: what the release does to the reference frame before the VAE encodes it."""
    import jax
    import jax.numpy as jnp

    k_sigma, k_noise = jax.random.split(key)
    b = frames.shape[0]
    sigma = jnp.exp(log_mean + log_std * jax.random.normal(k_sigma, (b,)))
    x = jnp.asarray(frames, jnp.float32)
    noise = jax.random.normal(k_noise, x.shape, jnp.float32)
    return x + sigma.reshape(b, *(1,) * (x.ndim - 1)) * noise, sigma


def encode_captions(bundle: _Bundle, captions: Sequence[str], dtype: str) -> list[np.ndarray]:
    """T5 embeddings (L, D) float32 of each caption, padded / truncated to the transformer's text length."""
    import jax.numpy as jnp
    from flax import nnx

    from xdyna_jax.conditioning.t5_tokenizer import T5Tokenizer

    tokenizer = T5Tokenizer.from_folder(bundle.path / "tokenizer")
    encoder = bundle.load("text_encoder", "t5_encoder", dtype)
    run = nnx.jit(lambda enc, ids: enc(ids).astype(jnp.float32))
    out = []
    for caption in captions:  # one at a time: XXL activations for one 226-token row
        ids, _ = tokenizer([caption], max_length=bundle.transformer.max_text_seq_length)
        out.append(np.asarray(run(encoder, jnp.asarray(ids)))[0])
    del encoder
    return out


def _signed(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32) / 127.5 - 1.0


def check_tiling(vae, args) -> None:
    """Tiled encoding keeps the latent size only where the tiles fit the frames (diffusers' tiling has no
    final crop): checked on shapes (nothing computed) before any clip is encoded."""
    import jax
    import jax.numpy as jnp

    if not args.tiling:
        return
    s = vae.config.spatial_scale
    pixels = jax.ShapeDtypeStruct((1, 1, args.height, args.width, 3), jnp.float32)
    latents = jax.eval_shape(lambda x: vae.encode(x, use_tiling=True)[0], pixels)
    if latents.shape[2:4] != (args.height // s, args.width // s):
        raise PrepareError(
            f"the VAE's tiles do not fit {args.height}x{args.width} frames (tiled encoding gives "
            f"{latents.shape[2]}x{latents.shape[3]} latents, not {args.height // s}x{args.width // s}); pass "
            "--no-tiling or another size"
        )


def _posterior_sample(vae, video, key, tiling: bool):
    import jax
    import jax.numpy as jnp

    mean, logvar = vae.encode(jnp.asarray(video), use_tiling=tiling)
    sample = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return np.asarray(sample * vae.config.scaling_factor, np.float32)


def pose_frames(source, video: Path, start: int, frames: int, height: int, width: int, raw_hw) -> np.ndarray:
    """uint8 (frames, H, W, 3) pose frames of the clip: the rendered video's, resized, or the keypoints
    drawn MimicMotion-style on the plainly resized canvas."""
    from xdyna_jax.conditioning.mimicmotion_pose import draw_pose_mimicmotion
    from xdyna_jax.io.driving import pose_to_canvas, resize_frames
    from xdyna_jax.io.video import read_video

    kind, value = source
    if kind == "video":
        poses, _ = read_video(value)
        return resize_frames(np.ascontiguousarray(poses[start : start + frames]), height, width)
    box = (0, 0, raw_hw[1], raw_hw[0])  # the whole frame: a plain resize moves points like pixels
    drawn = []
    for f in value[start : start + frames]:
        drawn.append(draw_pose_mimicmotion(pose_to_canvas(f, raw_hw, box, height, width), height, width))
    return np.stack(drawn)


def build_examples(args, plan: _Plan, folder: Path, progress: bool) -> list[dict]:
    """Write every clip's example into `folder`; returns the clips' entries for dataset.json."""
    import jax
    from tqdm import tqdm

    from xdyna_jax.io.driving import resize_frames
    from xdyna_jax.io.video import read_video

    stems = list(plan.captions)
    embedded = encode_captions(plan.bundle, [plan.captions[s] for s in stems], args.dtype)
    texts = dict(zip(stems, embedded, strict=True))
    vae = plan.bundle.load("vae", "cogvideox_vae", args.dtype)  # T5 is gone: never both in memory
    tiling = args.tiling
    base = jax.random.key(args.seed)
    entries, cached = [], (None, None)
    bar = tqdm(plan.clips, desc="clips", unit="clip", file=sys.stderr, disable=not progress)
    for i, (video, k, start) in enumerate(bar):
        if cached[0] != video:
            cached = (video, read_video(video)[0])
        raw = cached[1]
        clip = resize_frames(np.ascontiguousarray(raw[start : start + args.frames]), args.height, args.width)
        k_video, k_noise, k_image, k_pose = jax.random.split(jax.random.fold_in(base, i), 4)
        reference, sigma = reference_pixel_noise(
            _signed(clip[:1])[None], k_noise, args.reference_noise_log_mean, args.reference_noise_log_std
        )
        poses = pose_frames(
            plan.poses[video.stem], video, start, args.frames, args.height, args.width, raw.shape[1:3]
        )
        example = {
            "latents": _posterior_sample(vae, _signed(clip)[None], k_video, tiling)[0],
            "image_latents": _posterior_sample(vae, reference, k_image, tiling)[0],
            "pose_latents": _posterior_sample(vae, _signed(poses)[None], k_pose, tiling)[0],
            "text": texts[video.stem],
            "name": np.str_(video.stem),
            "start": np.int64(start),
            "reference_sigma": np.float32(sigma[0]),
        }
        name = f"{video.stem}.{k}.npz"
        np.savez(folder / name, **example)
        entries.append(
            {"file": name, "video": video.stem, "start": start, "reference_sigma": float(sigma[0])}
        )
    return entries


def prepare(args, *, progress: bool = False) -> Path:
    """Check every input, then write the dataset into a temporary sibling and rename it to --output."""
    plan = _Plan(args)
    output = Path(args.output)
    with atomic_folder(output) as tmp:
        clips = build_examples(args, plan, tmp, progress)
        first = np.load(tmp / clips[0]["file"])
        info = {
            "format": FORMAT,
            "model": "dynamictrl",
            "frames": args.frames,
            "height": args.height,
            "width": args.width,
            "shapes": {k: list(first[k].shape) for k in EXAMPLE_KEYS},
            "bundle": str(args.bundle),
            "value": "VAE posterior samples x scaling factor; T5 embeddings without attention mask",
            "num_videos": len(plan.videos),
            "num_clips": len(clips),
            "captions": plan.captions,
            "clips": clips,
            "options": {k: v for k, v in vars(args).items() if k != "output" and v not in (None, False)},
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return output


def read_dataset_info(folder: str | Path) -> dict | None:
    """A DynamiCtrl dataset's dataset.json, or None when `folder` is not one."""
    file = Path(folder) / INFO_FILE
    if not file.is_file():
        return None
    info = json.loads(file.read_text())
    return info if info.get("format") == FORMAT else None


def main(argv: Sequence[str] | None = None) -> int:
    from xdyna_jax.io.video import MediaError

    args = build_parser().parse_args(argv)
    try:
        output = prepare(args, progress=True)
    except (PrepareError, MediaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {output}", file=sys.stderr)
    return 0
