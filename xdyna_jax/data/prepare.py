"""Videos -> a training dataset (`xdyna_jax.data.records` describes the format).

    python -m xdyna_jax.data.prepare --videos clips/ --poses clips_pose/ --faces clips_lmk/ \\
        --height 896 --width 512 --output data/human
    python -m xdyna_jax.data.prepare --videos clips/ --dwpose yolox_l.onnx dw-ll_ucoco_384.onnx \\
        --face-alignment --face-patches clips_reenacted/ --latents bundles/xdyna --height 896 --width 512 \\
        --output data/human
    python -m xdyna_jax.data.prepare --videos scenes/ --scene --height 896 --width 512 --output data/scene
    python -m xdyna_jax.data.prepare --model dynamictrl --bundle bundles/dynamictrl --videos videos/ \\
        --pose-videos poses/ --captions prompts.txt --output data/dynamictrl      # see prepare_dynamictrl.py

`--model xdyna` (the default) prepares X-Dyna's dataset, described here; `--model dynamictrl` DynamiCtrl's
(latents and T5 embeddings computed ahead; its options: `--model dynamictrl --help`).

Inputs, per video `<stem>.mp4` (also .mov, .mkv, .avi, .webm) in --videos:
- pose keypoints (human videos; one of):
  --poses DIR: `DIR/<stem>/` an OpenPose `--write_json` folder (one file per frame), or `DIR/<stem>.npy`
  DWPose-style (T, 134, 3) / (T, 18, 3) x, y, score; one entry per video frame, in the video's pixels (or
  fractions of its width and height, by the rule of `io.driving`);
  --dwpose DET.onnx POSE.onnx: found in each frame by `conditioning.extractors.DWPoseOnnx`.
- face landmarks (optional; one of): --faces DIR: `DIR/<stem>.npy` (T, 68, 2) x, y in the video's pixels,
  NaN rows where there is no face; --face-alignment: found by `FaceAlignmentLandmarks` on each cropped and
  resized frame (as the release finds them), from weights already on disk (--fan-weights / --sfd-weights).
- --face-patches DIR (needs landmarks): `DIR/<stem>.mp4`, the same video with its face re-enacted by another
  identity (a portrait reenactment network's output pasted back where the face was cut from), frame for
  frame and at the video's frame size. Stage 2 renders its S-Face condition from these pixels inside the
  clip's own face boxes, so the face ControlNet learns expression, not identity.
- --scene: scene videos (no person): no keypoints or landmarks are read or found.
- --latents BUNDLE (a VAE bundle, or an X-Dyna pipeline folder with vae/): each frame's latent stored, so
  training skips the encoder. The latent is the VAE posterior's mean (not a sample), scaled by the VAE's
  scaling factor, so a dataset is deterministic; H and W must be multiples of the VAE's downscale.

Every frame is cut to the H:W aspect as the release cuts driving frames (`io.driving.crop_box`) and resized
to H x W; keypoints and landmarks move with it (`io.driving.points_to_canvas`).

Every input is checked before anything is written: an unreadable video, a keypoint folder or file whose
frame count differs from its video's, landmarks of the wrong shape, missing extractor weights, an unusable
bundle each stop the run with one `error: ...` line naming the file (exit status 2). The dataset is built
in a temporary folder beside --output and renamed into place when complete, so a failed run leaves nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xdyna_jax.data.records import (
    CODECS,
    FORMAT,
    encode_frames,
    encode_record,
    fps_value,
    shard_names,
    write_info,
)
from xdyna_jax.io.atomic import atomic_folder
from xdyna_jax.io.driving import (
    crop_box,
    detect_poses,
    points_to_canvas,
    pose_to_canvas,
    read_keypoints_json_folder,
    read_keypoints_npy,
    read_landmarks,
    resize_frames,
)
from xdyna_jax.io.video import MediaError, read_video

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")
LATENT_BATCH = 8  # frames per VAE call: bounds the encoder's activation memory at 896 x 512


class PrepareError(ValueError):
    """Bad input to prepare: the message names the file or option."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m xdyna_jax.data.prepare",
        description="Videos (+ keypoints, landmarks, face patches) -> an X-Dyna training dataset.",
    )
    p.add_argument(
        "--model", choices=("xdyna", "dynamictrl"), default="xdyna", help="whose dataset (dynamictrl: see "
        "`--model dynamictrl --help`)"
    )  # fmt: skip
    p.add_argument("--videos", required=True, help="folder of videos, one record each")
    pose = p.add_mutually_exclusive_group()
    pose.add_argument("--poses", help="folder of <stem>/ OpenPose JSON folders or <stem>.npy keypoints")
    pose.add_argument("--dwpose", nargs=2, metavar=("DET_ONNX", "POSE_ONNX"), help="find poses with DWPose")
    face = p.add_mutually_exclusive_group()
    face.add_argument("--faces", help="folder of <stem>.npy (T, 68, 2) landmarks in the video's pixels")
    face.add_argument("--face-alignment", action="store_true", help="find landmarks with face_alignment")
    p.add_argument("--fan-weights", help="face_alignment FAN weights (default: its torch.hub cache file)")
    p.add_argument("--sfd-weights", help="face_alignment SFD detector weights (default: its cache file)")
    p.add_argument("--face-patches", help="folder of <stem>.mp4 cross-identity face re-enactments")
    p.add_argument("--scene", action="store_true", help="scene videos: no person, no keypoints")
    p.add_argument("--latents", metavar="BUNDLE", help="VAE (or X-Dyna pipeline) bundle: store latents")
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--codec", choices=CODECS, default="png", help="how frames are stored (png: lossless)")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--videos-per-shard", type=int, default=64)
    p.add_argument("--output", required=True, help="dataset folder to create (must not exist)")
    return p


# ------------------------------------------------------------------------------------------------------
# Checks (nothing written)
# ------------------------------------------------------------------------------------------------------


def _check_options(args) -> None:
    if args.height < 8 or args.width < 8:
        raise PrepareError(f"--height and --width must be at least 8, got {args.height}x{args.width}")
    if args.videos_per_shard < 1:
        raise PrepareError(f"--videos-per-shard must be >= 1, got {args.videos_per_shard}")
    if not 1 <= args.jpeg_quality <= 100:
        raise PrepareError(f"--jpeg-quality must be in 1..100, got {args.jpeg_quality}")
    has_face = bool(args.faces or args.face_alignment)
    if args.scene:
        given = [f for f, v in (("--poses", args.poses), ("--dwpose", args.dwpose), ("--faces", args.faces),
                                ("--face-alignment", args.face_alignment),
                                ("--face-patches", args.face_patches)) if v]  # fmt: skip
        if given:
            raise PrepareError(f"--scene videos have no person: drop {', '.join(given)}")
    elif not (args.poses or args.dwpose):
        raise PrepareError("human videos need keypoints: give --poses DIR or --dwpose DET POSE (or --scene)")
    if args.face_patches and not has_face:
        raise PrepareError("--face-patches are framed by the clip's face: give --faces or --face-alignment")
    if (args.fan_weights or args.sfd_weights) and not args.face_alignment:
        raise PrepareError("--fan-weights / --sfd-weights are for --face-alignment")
    if os.path.lexists(args.output):
        raise PrepareError(f"--output {args.output} already exists")
    for flag in ("videos", "poses", "faces", "face_patches"):
        folder = getattr(args, flag)
        if folder is not None and not Path(folder).is_dir():
            raise PrepareError(f"--{flag.replace('_', '-')} {folder}: no such folder")


def find_videos(folder: str | Path) -> list[Path]:
    videos = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise PrepareError(f"--videos {folder}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    stems = [v.stem for v in videos]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise PrepareError(f"--videos {folder}: two videos named {twice[0]} (records are named by stem)")
    return videos


def probe_video(path: Path) -> tuple[int, tuple[int, int], float | None]:
    """(frame count, (h, w), fps) of a video, by decoding it all (a header's frame count can be wrong),
    without keeping the frames."""
    import imageio.v2 as imageio

    count, size = 0, None
    try:
        with imageio.get_reader(path, format="FFMPEG") as reader:
            fps = reader.get_meta_data().get("fps")
            for frame in reader:
                if size is None:
                    size = frame.shape[:2]
                elif frame.shape[:2] != size:
                    raise MediaError(f"{path}: frames of different sizes")
                count += 1
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"{path}: cannot read as a video ({type(e).__name__}: {e})") from e
    if count == 0:
        raise MediaError(f"{path}: the video has no frames")
    return count, size, (float(fps) if fps else None)


def _missing_json_frame(folder: Path) -> str:
    """' (no file for frame k)' when an OpenPose folder's frame numbers skip one, else ''."""
    numbers = sorted(
        int(re.findall(r"\d+", p.stem)[-1]) for p in folder.glob("*.json") if re.search(r"\d", p.stem)
    )
    gaps = [n for n, m in zip(numbers, numbers[1:], strict=False) if m != n + 1]
    first = numbers[0] if numbers else 0
    if first > 0:
        return f" (no file for frame {first - 1})"
    return f" (no file for frame {gaps[0] + 1})" if gaps else ""


def read_pose_file(poses: Path, stem: str, num_frames: int):
    """The video's keypoint source in --poses -> its PoseFrames (the video's pixels or fractions)."""
    folder, npy = poses / stem, poses / f"{stem}.npy"
    if folder.is_dir() and npy.is_file():
        raise PrepareError(f"{poses}: both {folder.name}/ and {npy.name} hold keypoints for {stem}; keep one")
    if folder.is_dir():
        frames, what = read_keypoints_json_folder(folder), f"{folder}: {{}} OpenPose JSON files"
    elif npy.is_file():
        frames, what = read_keypoints_npy(npy), f"{npy}: {{}} keypoint frames"
    else:
        raise PrepareError(f"{poses}: no keypoints for video {stem} (expected {folder.name}/ or {npy.name})")
    if len(frames) != num_frames:
        hint = _missing_json_frame(folder) if folder.is_dir() else ""
        raise PrepareError(what.format(len(frames)) + f" but video {stem} has {num_frames} frames{hint}")
    return frames


def read_landmark_file(faces: Path, stem: str, num_frames: int) -> np.ndarray:
    path = faces / f"{stem}.npy"
    landmarks = read_landmarks(path)  # shape checked, names the file
    if len(landmarks) != num_frames:
        raise PrepareError(f"{path}: {len(landmarks)} landmark frames but video {stem} has {num_frames}")
    return landmarks


def _pose_extractor(args):
    from xdyna_jax.conditioning.extractors import DWPoseOnnx, ExtractorUnavailable

    det, pose = args.dwpose
    try:
        return DWPoseOnnx(det, pose)
    except (ExtractorUnavailable, FileNotFoundError) as e:
        raise PrepareError(f"--dwpose: {e}") from e
    except Exception as e:  # onnxruntime rejecting a file
        raise PrepareError(
            f"--dwpose {det} {pose}: cannot load the ONNX models ({type(e).__name__}: {e})"
        ) from e


def _face_extractor(args):
    from xdyna_jax.conditioning.extractors import ExtractorUnavailable, FaceAlignmentLandmarks

    try:
        return FaceAlignmentLandmarks(fan_path=args.fan_weights, detector_path=args.sfd_weights)
    except (ExtractorUnavailable, FileNotFoundError) as e:
        raise PrepareError(f"--face-alignment: {e}") from e


def _vae(bundle: str, height: int, width: int):
    """The VAE of a VAE bundle or of an X-Dyna pipeline folder (its vae/ bundle)."""
    from xdyna_jax.bundle import BundleError, load

    path = Path(bundle)
    if not (path / "model.json").is_file() and (path / "vae" / "model.json").is_file():
        path = path / "vae"
    try:
        vae = load(path, expected_kind="vae")
    except (BundleError, FileNotFoundError) as e:
        raise PrepareError(f"--latents {bundle}: {e}") from e
    m = vae.config.downscale
    if height % m or width % m:
        raise PrepareError(f"--latents: --height and --width must be multiples of {m}, got {height}x{width}")
    return vae


class _Plan:
    """Everything checked: per video its frame count and the inputs already read."""

    def __init__(self, args):
        _check_options(args)
        self.videos = find_videos(args.videos)
        self.info, self.poses, self.landmarks = [], {}, {}
        for video in self.videos:
            count, size, fps = probe_video(video)
            self.info.append({"name": video.stem, "frames": count, "fps": fps_value(fps), "source_hw": size})
            if args.poses:
                self.poses[video.stem] = read_pose_file(Path(args.poses), video.stem, count)
            if args.faces:
                self.landmarks[video.stem] = read_landmark_file(Path(args.faces), video.stem, count)
            if args.face_patches:
                patch = Path(args.face_patches) / f"{video.stem}.mp4"
                if not patch.is_file():
                    raise PrepareError(f"--face-patches: no {patch} for video {video.name}")
                p_count, p_size, _ = probe_video(patch)
                if (p_count, p_size) != (count, size):
                    raise PrepareError(
                        f"{patch}: {p_count} frames of {p_size[1]}x{p_size[0]}, but video {video.name} has "
                        f"{count} of {size[1]}x{size[0]} (patches are the video re-enacted, frame for frame)"
                    )
        self.pose_extractor = _pose_extractor(args) if args.dwpose else None
        self.face_extractor = _face_extractor(args) if args.face_alignment else None
        self.vae = _vae(args.latents, args.height, args.width) if args.latents else None


# ------------------------------------------------------------------------------------------------------
# Building records
# ------------------------------------------------------------------------------------------------------


def canvas_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Raw frames -> the release's driving crop to H:W, resized to H x W."""
    x0, y0, crop_w, crop_h = crop_box(frames.shape[1:3], height, width)
    return resize_frames(np.ascontiguousarray(frames[:, y0 : y0 + crop_h, x0 : x0 + crop_w]), height, width)


def _encode_latents(vae, frames: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp
    from flax import nnx

    encode = nnx.jit(lambda model, images: model.latents_from_images(images))  # key None: posterior mean
    out = []
    for i in range(0, len(frames), LATENT_BATCH):
        pixels = frames[i : i + LATENT_BATCH].astype(np.float32) / 127.5 - 1.0
        out.append(np.asarray(encode(vae, jnp.asarray(pixels)), np.float32))
    return np.concatenate(out)


def build_record(args, plan: _Plan, video: Path) -> dict:
    """One video -> the record's arrays."""
    from xdyna_jax.conditioning.pose import to_arrays

    h, w = args.height, args.width
    raw, fps = read_video(video)
    frames = canvas_frames(raw, h, w)
    arrays = {"name": np.str_(video.stem), "fps": np.float64(fps_value(fps)), "scene": np.bool_(args.scene)}
    arrays.update(encode_frames(frames, args.codec, "frames", jpeg_quality=args.jpeg_quality))
    if not args.scene:
        box = crop_box(raw.shape[1:3], h, w)
        if plan.pose_extractor is not None:
            poses = detect_poses(list(raw), plan.pose_extractor, h, w)
        else:
            poses = [pose_to_canvas(f, raw.shape[1:3], box, h, w) for f in plan.poses[video.stem]]
        body, hands, _ = to_arrays(poses)
        arrays["body"], arrays["hands"] = body.astype(np.float32), hands.astype(np.float32)
        if plan.face_extractor is not None:
            found = [plan.face_extractor(f) for f in frames]
            landmarks = np.stack([np.full((68, 2), np.nan) if m is None else np.asarray(m) for m in found])
        elif video.stem in plan.landmarks:
            landmarks = points_to_canvas(plan.landmarks[video.stem], box, h, w)
        else:
            landmarks = None
        if landmarks is not None:
            arrays["landmarks"] = landmarks.astype(np.float32)
    if args.face_patches:
        patches, _ = read_video(Path(args.face_patches) / f"{video.stem}.mp4")
        arrays.update(
            encode_frames(canvas_frames(patches, h, w), args.codec, "patches", jpeg_quality=args.jpeg_quality)
        )
    if plan.vae is not None:
        arrays["latents"] = _encode_latents(plan.vae, frames)
    return arrays


def _write_dataset(args, plan: _Plan, folder: Path, progress: bool) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    per = args.videos_per_shard
    names = shard_names(-(-len(plan.videos) // per))
    latent_shape = None
    bar = tqdm(plan.videos, desc="videos", unit="video", file=sys.stderr, disable=not progress)
    writer = None
    for i, video in enumerate(bar):
        if i % per == 0:
            if writer is not None:
                writer.close()
            # group_size 1: every record is its own chunk, so random access reads one record
            writer = ArrayRecordWriter(str(folder / names[i // per]), "group_size:1")
        arrays = build_record(args, plan, video)
        if "latents" in arrays:
            latent_shape = list(arrays["latents"].shape[1:])
        writer.write(encode_record(arrays))
    writer.close()
    return {
        "format": FORMAT,
        "height": args.height,
        "width": args.width,
        "scene": bool(args.scene),
        "codec": args.codec,
        "num_videos": len(plan.videos),
        "num_frames": sum(v["frames"] for v in plan.info),
        "files": names,
        "has": {
            "keypoints": not args.scene,
            "landmarks": bool(args.faces or args.face_alignment),
            "face_patches": bool(args.face_patches),
            "latents": plan.vae is not None,
        },
        "latent_shape": latent_shape,
        "latents": None
        if plan.vae is None
        else {"bundle": str(args.latents), "value": "posterior mean x scaling_factor (no sample)"},
        "options": {
            k: v for k, v in vars(args).items() if k not in ("output", "model") and v not in (None, False)
        },
        "videos": plan.info,
    }


def prepare(args, *, progress: bool = False) -> Path:
    """Check every input, then build the dataset in a temporary sibling and rename it to --output."""
    plan = _Plan(args)
    output = Path(args.output)
    with atomic_folder(output) as tmp:
        write_info(tmp, _write_dataset(args, plan, tmp, progress))
    return output


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--model", choices=("xdyna", "dynamictrl"), default="xdyna")
    # JAX warns on every fork; ffmpeg's child process execs straight away, which is safe
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    if which.parse_known_args(argv)[0].model == "dynamictrl":
        from xdyna_jax.data import prepare_dynamictrl

        return prepare_dynamictrl.main(argv)
    args = build_parser().parse_args(argv)
    try:
        output = prepare(args, progress=True)
    except (PrepareError, MediaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
