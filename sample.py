"""Animate a reference photo with a driving pose (and face) sequence: the X-Dyna and DynamiCtrl samplers'
command line. The bundle's manifest says which pipeline runs; flags the other pipeline alone reads are refused.

    python sample.py --model bundles/xdyna --reference me.png --pose dance_pose.mp4 --out me_dance.mp4
    python sample.py --model bundles/xdyna --reference me.png --pose keypoints/ --stride 2 --frames 48 \\
        --face dance.mp4 --landmarks dance_landmarks.npy --grid me_dance_grid.mp4 --frames-dir me_dance/ --dtype bf16
    python sample.py --model bundles/xdyna --reference me.png --pose dance.mp4 --face dance.mp4 \\
        --dwpose yolox_l.onnx dw-ll_ucoco_384.onnx --align-pose --out me_dance.mp4

Pose sources: a rendered skeleton video, a folder of OpenPose JSON files, a DWPose-style keypoint .npy, or,
with `--dwpose DET.onnx POSE.onnx`, the raw driving video (DWPose finds the keypoints in every frame used).
Keypoint files are taken as framed for the output (pixels of the H x W canvas, or fractions of it); points
found in a video or photo follow that image's crop and resize onto the canvas (see xdyna_jax/io/driving.py).
`--align-pose` gives the driving person the reference's proportions and place (`align_poses`, method
`--align-method`, default limbs); it needs keypoints on both sides: a keypoint source or `--dwpose` for the
driving pose, and `--reference-pose FILE` (OpenPose JSON or a one-frame .npy, in the photo's pixels) or
`--dwpose` for the reference. Face: the driving video and its (T, 68, 2) landmarks (`--landmarks`, in the
video's pixels), or landmarks found with face_alignment from weights already on disk. Every source is read
at the same `--stride`; the video plays at the source's fps divided by the stride (15 fps when the source
records none).

Every input is checked before anything is compiled: a bad one stops the run with one `error: ...` line on
stderr and exit status 2, and nothing is written. Videos appear atomically (a failed run leaves no file).
JAX's persistent compilation cache is on by default, so a second run of the same shapes skips compiling.

DynamiCtrl bundles (`python -m convert dynamictrl`) take a text prompt and the same pose sources; the pose
is retargeted onto the reference and drawn as the release draws it (xdyna_jax/sampling/dynamictrl_cli.py):

    python sample.py --model bundles/dynamictrl --reference me.png --pose dance.mp4 \\
        --dwpose yolox_l.onnx dw-ll_ucoco_384.onnx --prompt "a woman in a red dress dances" --out me_dance.mp4

Their defaults follow the release: guidance 3.0, 1360x768, bf16, 16 fps when the source records none, and
`--frames` counts the output frames with frame 0 the reference's pose.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger("sample")

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# The release saves at 15 fps whatever the driving video's rate; we use it when the source records none.
DEFAULT_FPS = 15.0
# The release's context windows (--window / --overlap change them, e.g. for a model trained on shorter clips).
WINDOW, OVERLAP = 16, 4
# Options whose defaults depend on the pipeline (the DynamiCtrl ones live in sampling/dynamictrl_cli.py).
XDYNA_DEFAULTS = dict(guidance=7.5, height=896, width=512, dtype="fp32", window=WINDOW, overlap=OVERLAP)
# flags only DynamiCtrl reads
DYNAMICTRL_ONLY = ("prompt", "negative_prompt", "reference_mask")
SAMPLED_KINDS = ("xdyna", "dynamictrl")


class UsageError(ValueError):
    """An input or option that makes the run impossible; reported as one line before any work."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Animate a reference image with a driving pose (and face) sequence (X-Dyna, DynamiCtrl)."
    )
    p.add_argument(
        "--model", required=True, help="pipeline bundle folder (python -m convert xdyna / dynamictrl)"
    )
    p.add_argument("--reference", required=True, help="reference photo (any image format imageio reads)")
    p.add_argument(
        "--pose",
        required=True,
        help="skeleton video, folder of OpenPose JSON, DWPose-style .npy, or a raw video with --dwpose",
    )
    p.add_argument(
        "--dwpose",
        nargs=2,
        metavar=("DET.onnx", "POSE.onnx"),
        help="DWPose ONNX detector and pose models: find keypoints in a raw --pose video (and the reference)",
    )
    p.add_argument(
        "--align-pose", action="store_true", help="align the driving pose to the reference person's body"
    )
    p.add_argument(
        "--reference-pose",
        help="the reference's keypoints (X-Dyna: for --align-pose; DynamiCtrl: to retarget keypoints onto): "
        "OpenPose .json or 1-frame .npy, in the photo's pixels",
    )
    p.add_argument(
        "--align-method", choices=("limbs", "global"), help="--align-pose: per-limb (default) or one scale"
    )
    p.add_argument("--face", help="driving video for the S-Face maps (needs a controlnet_face/ bundle)")
    p.add_argument("--landmarks", help="(T, 68, 2) .npy face landmarks per driving frame of --face")
    p.add_argument("--prompt", help="DynamiCtrl (required): what the video shows")
    p.add_argument("--negative-prompt", help="DynamiCtrl: the unconditional prompt (default empty)")
    p.add_argument(
        "--reference-mask",
        help="DynamiCtrl Mask variants: image of the reference's size; pixels not bright (> 200) are blacked out",
    )
    p.add_argument("--out", required=True, help="output mp4")
    p.add_argument("--grid", help="also write pose | (face maps |) result side by side to this mp4")
    p.add_argument("--frames-dir", help="also write the result frames as PNGs into this new folder")
    p.add_argument(
        "--frames",
        type=int,
        help="frames to make (default: every driving frame at the stride; DynamiCtrl: frame 0 is the "
        "reference's pose, then the driving frames)",
    )
    p.add_argument("--stride", type=int, default=1, help="use every S-th driving frame (default 1)")
    p.add_argument(
        "--fps", type=float, help="output fps (default: the source's fps / stride, else 15; DynamiCtrl 16)"
    )
    p.add_argument("--steps", type=int, default=25, help="DDIM / DPM steps (default 25)")
    p.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (X-Dyna 7.5, DynamiCtrl 3.0)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--height", type=int, help="output height (X-Dyna 896, DynamiCtrl 1360)")
    p.add_argument("--width", type=int, help="output width (X-Dyna 512, DynamiCtrl 768)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (X-Dyna fp32, DynamiCtrl bf16)")
    p.add_argument("--window", type=int, help=f"X-Dyna: driven frames per context window (default {WINDOW})")
    p.add_argument("--overlap", type=int, help=f"X-Dyna: frames two windows share (default {OVERLAP})")
    p.add_argument(
        "--window-batch", type=int, help="context windows per compiled call (default: the device count)"
    )
    p.add_argument("--devices", type=int, help="split window batches over this many devices (default all)")
    p.add_argument("--compile-cache-dir", help="JAX persistent compilation cache (default: a user cache dir)")
    p.add_argument("--no-compile-cache", action="store_true", help="turn the compilation cache off")
    return p


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xdyna_jax" / "jax_compilation_cache"


def configure_compile_cache(directory: str | Path | None) -> None:
    """Persist every compiled program under `directory` (small ones too); None turns the cache off."""
    import jax

    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # JAX skips programs that compile in under a second; the window step of a small run is one of them
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _given(args, flag: str) -> bool:
    value = getattr(args, flag)
    return value is not None and value is not False


def resolve_kind(args) -> str:
    """The --model bundle's pipeline kind, from its manifest; fills that kind's defaults into `args` and
    refuses the flags only the other kind reads. Idempotent (the kind is kept on `args`)."""
    from xdyna_jax.bundle import BundleError
    from xdyna_jax.sampling import dynamictrl_cli
    from xdyna_jax.sampling.bundles import read_manifest

    if getattr(args, "kind", None):
        return args.kind
    if not Path(args.model).exists():
        raise UsageError(f"--model {args.model}: no such file or folder")
    try:
        kind = read_manifest(args.model)["kind"]
    except BundleError as e:
        raise UsageError(str(e)) from e
    if kind not in SAMPLED_KINDS:
        kinds = " and ".join(map(repr, SAMPLED_KINDS))
        raise UsageError(f"--model {args.model} is a {kind!r} pipeline; sample.py samples {kinds} pipelines")
    if kind == "xdyna":
        foreign, owner, this = DYNAMICTRL_ONLY, "a DynamiCtrl", "an X-Dyna"
    else:
        foreign, owner, this = dynamictrl_cli.XDYNA_ONLY, "an X-Dyna", "a DynamiCtrl"
    for flag in filter(lambda f: _given(args, f), foreign):
        raise UsageError(
            f"--{flag.replace('_', '-')} is {owner} option, but --model {args.model} is {this} pipeline"
        )
    defaults = XDYNA_DEFAULTS if kind == "xdyna" else dynamictrl_cli.DEFAULTS
    for flag, value in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    args.kind = kind
    return kind


def _check_options(args) -> None:
    """Checks that need no file: cheap, so they come first."""
    positive = {"--stride": args.stride, "--steps": args.steps}
    if args.window is not None:
        positive["--window"] = args.window
    if args.frames is not None:
        positive["--frames"] = args.frames
    if args.window_batch is not None:
        positive["--window-batch"] = args.window_batch
    if args.devices is not None:
        positive["--devices"] = args.devices
    for flag, value in positive.items():
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.overlap is not None and not 0 <= args.overlap < args.window:
        raise UsageError(f"--overlap must be >= 0 and below --window {args.window}, got {args.overlap}")
    if args.fps is not None and not args.fps > 0:
        raise UsageError(f"--fps must be positive, got {args.fps}")
    if args.height < 1 or args.width < 1:
        raise UsageError(f"--height and --width must be positive, got {args.height}x{args.width}")
    if args.landmarks and not args.face:
        raise UsageError("--landmarks gives the landmarks of the --face video: pass --face too")
    for flag in ("model", "reference", "pose", "face", "landmarks", "reference_pose", "reference_mask"):
        value = getattr(args, flag)
        if value is not None and not Path(value).exists():
            raise UsageError(f"--{flag.replace('_', '-')} {value}: no such file or folder")
    if args.kind == "xdyna":
        _check_pose_options(args)
    out = Path(args.out)
    if out.suffix.lower() != ".mp4" or (args.grid and Path(args.grid).suffix.lower() != ".mp4"):
        raise UsageError("--out and --grid must name .mp4 files")
    if args.grid and Path(args.grid).resolve() == out.resolve():
        raise UsageError("--grid must differ from --out")
    if args.frames_dir and Path(args.frames_dir).exists():
        raise UsageError(f"--frames-dir {args.frames_dir} already exists")


def _check_pose_options(args) -> None:
    """Which pose flags go together: alignment needs keypoints of both people; no flag may go unused."""
    from xdyna_jax.io.driving import holds_keypoints

    for flag in ("reference_pose", "align_method"):
        if getattr(args, flag) is not None and not args.align_pose:
            raise UsageError(f"--{flag.replace('_', '-')} is an --align-pose option: pass --align-pose too")
    keypoints = holds_keypoints(args.pose)
    if args.align_pose and not keypoints and not args.dwpose:
        raise UsageError(
            f"--align-pose needs driving keypoints, but --pose {args.pose} is a rendered skeleton video: "
            "give a keypoint source (OpenPose JSON folder, .npy) or the raw driving video with --dwpose"
        )
    if args.align_pose and not args.reference_pose and not args.dwpose:
        raise UsageError(
            "--align-pose needs the reference's keypoints: --reference-pose FILE, or --dwpose to find them"
        )
    if args.dwpose and keypoints and not (args.align_pose and not args.reference_pose):
        raise UsageError(
            f"--dwpose would find nothing: --pose {args.pose} already holds keypoints"
            + (" and --reference-pose gives the reference's" if args.reference_pose else "")
        )


def _pose_extractor(args):
    """DWPose from the two --dwpose ONNX files, or None without the flag."""
    if not args.dwpose:
        return None
    from xdyna_jax.conditioning.extractors import DWPoseOnnx, ExtractorUnavailable

    det, pose = args.dwpose
    try:
        return DWPoseOnnx(det, pose)
    except (ExtractorUnavailable, FileNotFoundError) as e:
        raise UsageError(f"--dwpose: {e}") from e
    except Exception as e:  # onnxruntime rejecting a file: name both, whichever it was
        raise UsageError(
            f"--dwpose {det} {pose}: cannot load the ONNX models ({type(e).__name__}: {e})"
        ) from e


def _check_bundle_folders(args) -> None:
    """The parts the options need, from the folder alone (before loading weights)."""
    if args.face and not (Path(args.model) / "controlnet_face").is_dir():
        raise UsageError(
            f"--face needs an S-Face ControlNet, but {args.model} has no controlnet_face/ bundle"
        )


def _face_landmarks(args) -> np.ndarray | object:
    """--landmarks as an array, else a face_alignment extractor built from weights already on disk."""
    from xdyna_jax.io.driving import read_landmarks

    if args.landmarks:
        return read_landmarks(args.landmarks)
    from xdyna_jax.conditioning.extractors import ExtractorUnavailable, FaceAlignmentLandmarks

    try:
        return FaceAlignmentLandmarks()
    except (ExtractorUnavailable, FileNotFoundError) as e:
        raise UsageError(
            f"--face without --landmarks finds landmarks with face_alignment from local weights: {e}"
        ) from e


def prepare(args):
    """Every check and input read; returns what the run needs. Raises before any compile."""
    from xdyna_jax.bundle import BundleError
    from xdyna_jax.io.driving import read_face_maps, read_pose_source, reference_keypoints
    from xdyna_jax.io.video import MediaError, read_image, video_fps

    try:
        resolve_kind(args)
        _check_options(args)
        _check_bundle_folders(args)
        height, width = args.height, args.width
        reference = read_image(args.reference)
        # every extractor is built (its weights found) before the first one runs over a long video
        extractor = _pose_extractor(args)
        landmarks = _face_landmarks(args) if args.face else None
        align_to = None
        if args.align_pose:  # the reference person on the output canvas, as the pipeline crops the photo
            pose_file = args.reference_pose
            align_to = reference_keypoints(
                reference, height, width, pose_file=pose_file, extractor=None if pose_file else extractor
            )
        poses, source_fps = read_pose_source(
            args.pose, height, width, stride=args.stride, limit=args.frames, extractor=extractor,
            align_to=align_to, align_method=args.align_method or "limbs", progress=True,
        )  # fmt: skip
        if args.frames is not None and len(poses) < args.frames:
            raise UsageError(
                f"--pose {args.pose} has {len(poses)} frames at stride {args.stride}; --frames asks for {args.frames}"
            )
        local = glob = None
        if args.face:
            local, glob = read_face_maps(
                args.face, landmarks, height, width, stride=args.stride, limit=args.frames
            )
            if len(local) != len(poses):
                raise UsageError(
                    f"the pose sequence ({args.pose}) has {len(poses)} frames at stride {args.stride} but the "
                    f"face video ({args.face}) has {len(local)}"
                )
            source_fps = source_fps or video_fps(args.face)
        pipe = _load_pipeline(args)
        m = pipe.size_multiple
        if height % m or width % m:
            raise UsageError(f"--height and --width must be multiples of {m}, got {height}x{width}")
    except (UsageError, MediaError, BundleError) as e:
        raise UsageError(str(e)) from e
    fps = args.fps or (source_fps / args.stride if source_fps else DEFAULT_FPS)
    return pipe, reference, poses, local, glob, fps


def _load_pipeline(args):
    from xdyna_jax.nn.compute import Compute
    from xdyna_jax.sampling import XDyna, load_pipeline
    from xdyna_jax.sampling.xdyna import XDynaPipeline

    start = time.perf_counter()
    dtype = DTYPES[args.dtype]
    # frozen weights are cast to the compute dtype while loading: a bf16 run keeps half the bytes resident
    parts = load_pipeline(args.model, compute=Compute(dtype=dtype), param_dtype=dtype)
    if not isinstance(parts, XDyna):  # only "xdyna" is registered today; other kinds get their own sampler
        raise UsageError(f"--model {args.model}: sample.py cannot sample a {type(parts).__name__} pipeline")
    pipe = XDynaPipeline(parts)
    p = pipe.parts
    if args.face and p.denoiser.face_controlnet is None:
        raise UsageError(f"--face needs an S-Face ControlNet, but {args.model} has none")
    if p.denoiser.pose_controlnet is None:
        raise UsageError(f"{args.model} has no controlnet_pose/ bundle: nothing would follow --pose")
    if p.denoiser.unet.config.ip_adapter_tokens and (p.image_encoder is None or p.resampler is None):
        raise UsageError(
            f"{args.model}: its UNet takes IP-Adapter tokens but it has no image_encoder/resampler"
        )
    if p.tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer/ folder")
    log.info("loaded %s (%s) in %.1f s", args.model, args.dtype, time.perf_counter() - start)
    return pipe


def _mesh_and_batch(args):
    """The `data` mesh over the devices asked for (None for one) and the windows per call, a multiple of it."""
    import jax

    from xdyna_jax.sharding import make_mesh

    available = len(jax.devices())
    devices = min(args.devices or available, available)
    batch = args.window_batch or devices
    if batch % devices:
        raise UsageError(f"--window-batch {batch} must be a multiple of the {devices} devices used")
    mesh = make_mesh(data=devices, devices=jax.devices()[:devices]) if devices > 1 else None
    return mesh, batch


def grid_frames(poses, local, glob, result) -> np.ndarray:
    """pose | local face map | global face map | result, side by side (face maps only when given)."""
    columns = [poses[: len(result)]]
    if local is not None:
        columns += [local[: len(result)], glob[: len(result)]]
    return np.concatenate([*columns, result], axis=2)


def write_outputs(args, frames: np.ndarray, grid: np.ndarray | None, fps: float) -> None:
    """--out, then --grid and --frames-dir, each appearing whole or not at all."""
    from xdyna_jax.io.video import write_frames, write_video

    write_video(args.out, frames, fps=fps)
    log.info("wrote %s (seed %d)", args.out, args.seed)
    if args.grid:
        write_video(args.grid, grid, fps=fps)
        log.info("wrote %s", args.grid)
    if args.frames_dir:
        write_frames(args.frames_dir, frames)
        log.info("wrote %d frames to %s", len(frames), args.frames_dir)


def run_dynamictrl(args) -> int:
    """A DynamiCtrl bundle: its inputs (sampling/dynamictrl_cli.py), the run, pose | result as the grid."""
    from xdyna_jax.bundle import BundleError
    from xdyna_jax.io.video import MediaError
    from xdyna_jax.sampling import dynamictrl_cli

    try:
        try:
            _check_options(args)
            inputs = dynamictrl_cli.prepare(args)
        except (dynamictrl_cli.InputError, MediaError, BundleError) as e:
            raise UsageError(str(e)) from e
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    frames = dynamictrl_cli.sample(args, inputs)
    grid = np.concatenate([inputs.poses[: len(frames)], frames], axis=2) if args.grid else None
    write_outputs(args, frames, grid, inputs.fps)
    return 0


def run(args) -> int:
    from tqdm import tqdm

    from xdyna_jax.conditioning.face import face_condition
    from xdyna_jax.sampling.xdyna import num_window_calls

    try:
        if resolve_kind(args) == "dynamictrl":
            return run_dynamictrl(args)
        pipe, reference, poses, local, glob, fps = prepare(args)
        mesh, window_batch = _mesh_and_batch(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(poses)
    faces = None if local is None else face_condition(local, glob)
    log.info(
        "%d frames at %g fps (%.2f s of video), %dx%d, %d steps, guidance %g, seed %d",
        n, fps, n / fps, args.height, args.width, args.steps, args.guidance, args.seed,
    )  # fmt: skip
    total = num_window_calls(n, args.steps, args.window, args.overlap, window_batch)
    start = time.perf_counter()
    with tqdm(total=total, desc="denoising", unit="call", file=sys.stderr) as bar:
        frames = pipe(
            reference, poses, faces, num_frames=n, steps=args.steps, guidance=args.guidance,
            seed=args.seed, height=args.height, width=args.width, window=args.window,
            overlap=args.overlap, window_batch=window_batch, mesh=mesh, progress=bar.update,
        )  # fmt: skip
    log.info("sampled in %.1f s", time.perf_counter() - start)
    grid = grid_frames(poses, local, glob, frames) if args.grid else None
    write_outputs(args, frames, grid, fps)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # JAX warns on every fork; ffmpeg's child process execs straight away, which is safe
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    if not log.handlers:  # our lines only: the libraries' INFO logs (orbax's per-file loads) stay quiet
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # a library may have configured the root logger: print each line once
    configure_compile_cache(
        None if args.no_compile_cache else (args.compile_cache_dir or default_cache_dir())
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
