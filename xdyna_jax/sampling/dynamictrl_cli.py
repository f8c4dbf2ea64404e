"""sample.py's DynamiCtrl half: the inputs of a DynamiCtrl run read and checked, the pipeline loaded and called.

    python sample.py --model bundles/dynamictrl --reference me.png --pose dance_pose.mp4 \\
        --prompt "a woman in a red dress dances in a bright studio" --out me_dance.mp4
    python sample.py --model bundles/dynamictrl --reference me.png --pose dance.mp4 \\
        --dwpose yolox_l.onnx dw-ll_ucoco_384.onnx --prompt "..." --frames 37 --grid grid.mp4
    python sample.py --model bundles/mask_c01 --reference me.png --reference-mask me_mask.png --pose ...

Pose sources (`--pose`), as for X-Dyna:
- a rendered pose video: its frames used as they are (resized to H x W, bilinear), every stride-th one;
  frame 0 should be the reference's pose, as the release's `--pose_video` expects;
- keypoints (an OpenPose JSON folder or a DWPose-style .npy, framed for the output as X-Dyna reads them),
  or the raw driving video with `--dwpose DET.onnx POSE.onnx` (DWPose on every frame used, uncropped, as the
  release): retargeted onto the reference person and drawn MimicMotion style after the reference's own pose
  (`conditioning.mimicmotion_pose`). The reference's keypoints come from `--reference-pose FILE` (OpenPose
  JSON or a one-frame .npy, in the photo's pixels) or from DWPose on the photo cut to H x W as the release
  cuts it.
`--frames` counts output frames, frame 0 included (the reference's pose, so the video starts on the reference);
by default every pose frame the source has at the stride: a pose video's frames, or 1 + the driving frames
(the release takes 37). The video plays at the source's fps / stride, else at 16 fps (the release's export
default). `--reference-mask MASK.png` (the Mask variants): a picture the reference's size whose bright pixels
(every channel > 200, the threshold of the release's mask videos) keep the reference and the rest black it out.

Everything here that can fail raises `InputError` (or the library's `MediaError` / `BundleError`) before the
transformer is compiled; sample.py turns each into one `error:` line.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("sample")

# the release's export fps (its script's --fps default); used when the pose source records none
DEFAULT_FPS = 16.0
DEFAULTS = dict(guidance=3.0, height=1360, width=768, dtype="bf16")
# flags only X-Dyna reads: given with a DynamiCtrl bundle they stop the run
XDYNA_ONLY = (
    "face",
    "landmarks",
    "align_pose",
    "align_method",
    "window",
    "overlap",
    "window_batch",
    "devices",
)
# what --reference-mask keeps: pixels whose every channel is above this
MASK_THRESHOLD = 200


class InputError(ValueError):
    """An input or option of a DynamiCtrl run that makes it impossible."""


@dataclasses.dataclass
class Inputs:
    """Everything a DynamiCtrl run needs, read and checked."""

    pipeline: object  # sampling.dynamictrl.DynamiCtrlPipeline
    reference: np.ndarray  # uint8 (H0, W0, 3), the photo as read
    poses: np.ndarray  # uint8 (F, H, W, 3): the pose video, frame 0 the reference's pose
    mask: np.ndarray | None  # bool (H0, W0) or None
    fps: float


def read_mask(path: str | Path, reference_hw: tuple[int, int]) -> np.ndarray:
    """--reference-mask: bool (H0, W0), True where the reference is kept; the reference's size."""
    from xdyna_jax.io.video import read_image

    mask = read_image(path)
    if mask.shape[:2] != tuple(reference_hw):
        raise InputError(
            f"--reference-mask {path} is {mask.shape[0]}x{mask.shape[1]} but the reference is "
            f"{reference_hw[0]}x{reference_hw[1]} (height x width): give a mask of the reference's size"
        )
    keep = (mask > MASK_THRESHOLD).all(-1)
    if not keep.any():
        raise InputError(f"--reference-mask {path} keeps nothing (no pixel above {MASK_THRESHOLD})")
    return keep


def check_options(args) -> None:
    """The DynamiCtrl-only rules that need no file read."""
    from xdyna_jax.io.driving import holds_keypoints

    if not args.prompt or not args.prompt.strip():
        raise InputError(f"--model {args.model} is a DynamiCtrl pipeline: --prompt TEXT is required")
    if not args.guidance >= 1:
        raise InputError(
            f"--guidance must be >= 1 (1 turns classifier-free guidance off), got {args.guidance}"
        )
    keypoints = holds_keypoints(args.pose)
    if not keypoints and not args.dwpose and args.reference_pose:
        raise InputError(
            f"--reference-pose retargets keypoints, but --pose {args.pose} is a rendered pose video "
            "(used as it is): give keypoints or the raw driving video with --dwpose"
        )
    if keypoints and args.dwpose and args.reference_pose:
        raise InputError(
            f"--dwpose would find nothing: --pose {args.pose} already holds keypoints and "
            "--reference-pose gives the reference's"
        )
    if keypoints and not args.dwpose and not args.reference_pose:
        raise InputError(
            f"--pose {args.pose} holds keypoints, which are retargeted onto the reference person: give the "
            "reference's keypoints with --reference-pose FILE, or --dwpose to find them"
        )


def _extractor(args):
    if not args.dwpose:
        return None
    from xdyna_jax.conditioning.extractors import DWPoseOnnx, ExtractorUnavailable

    det, pose = args.dwpose
    try:
        return DWPoseOnnx(det, pose)
    except (ExtractorUnavailable, FileNotFoundError) as e:
        raise InputError(f"--dwpose: {e}") from e
    except Exception as e:  # onnxruntime rejecting a file
        raise InputError(
            f"--dwpose {det} {pose}: cannot load the ONNX models ({type(e).__name__}: {e})"
        ) from e


def _reference_pose(args, photo: np.ndarray, extractor):
    """The reference person in pixels of the H x W canvas the release finds it on."""
    from xdyna_jax.conditioning.mimicmotion_pose import pose_reference_image, reference_pose_to_canvas
    from xdyna_jax.io.driving import read_reference_pose

    if args.reference_pose:
        pose = read_reference_pose(args.reference_pose)
        return reference_pose_to_canvas(pose, photo.shape[:2], args.height, args.width)
    return extractor(pose_reference_image(photo, args.height, args.width))


def _driving_keypoints(args, extractor, count: int | None):
    """(PoseFrames, the size of the image they are in (h, w), the source's fps or None)."""
    from tqdm import tqdm

    from xdyna_jax.io.driving import holds_keypoints, read_keypoints_json_folder, read_keypoints_npy
    from xdyna_jax.io.video import read_video

    source = Path(args.pose)
    if holds_keypoints(source):
        read = read_keypoints_json_folder if source.is_dir() else read_keypoints_npy
        return read(source)[:: args.stride][:count], (args.height, args.width), None
    video, fps = read_video(source, stride=args.stride, limit=count)
    bar = tqdm(video, desc="pose keypoints", unit="frame", file=sys.stderr)
    return [extractor(f) for f in bar], video.shape[1:3], fps


def read_poses(args, photo: np.ndarray, extractor) -> tuple[np.ndarray, float | None]:
    """The pose video (uint8 (F, H, W, 3), frame 0 the reference's pose) and the source's fps or None."""
    from xdyna_jax.conditioning.mimicmotion_pose import dynamictrl_pose_video
    from xdyna_jax.io.driving import holds_keypoints, resize_frames
    from xdyna_jax.io.video import read_video

    height, width, wanted = args.height, args.width, args.frames
    if not holds_keypoints(args.pose) and extractor is None:
        frames, fps = read_video(args.pose, stride=args.stride, limit=wanted)
        if wanted is not None and len(frames) < wanted:
            raise InputError(
                f"--pose {args.pose} has {len(frames)} frames at stride {args.stride}; --frames asks for {wanted}"
            )
        return resize_frames(frames, height, width), fps
    reference = _reference_pose(args, photo, extractor)  # before the long pass over the driving video
    driving, driving_hw, fps = _driving_keypoints(args, extractor, None if wanted is None else wanted - 1)
    if wanted is not None and len(driving) < wanted - 1:
        raise InputError(
            f"--pose {args.pose} has {len(driving)} driving frames at stride {args.stride}; --frames {wanted} "
            f"needs {wanted - 1} after the reference's pose"
        )
    try:
        video = dynamictrl_pose_video(
            reference, driving, height, width, 1 + len(driving), driving_size=driving_hw
        )
    except ValueError as e:  # nobody to retarget onto, or nobody in the driving video
        raise InputError(f"--pose {args.pose}: {e}") from e
    return video, fps


def load_pipeline(args):
    from xdyna_jax.nn.compute import Compute
    from xdyna_jax.sampling.dynamictrl import DynamiCtrlPipeline

    start = time.perf_counter()
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    pipe = DynamiCtrlPipeline.load(args.model, compute=Compute(dtype=dtype), param_dtype=dtype)
    log.info("loaded %s (%s) in %.1f s", args.model, args.dtype, time.perf_counter() - start)
    return pipe


def prepare(args) -> Inputs:
    """Every DynamiCtrl check and input read, the pipeline loaded; nothing compiled yet."""
    from xdyna_jax.io.video import read_image

    check_options(args)
    photo = read_image(args.reference)
    mask = read_mask(args.reference_mask, photo.shape[:2]) if args.reference_mask else None
    extractor = _extractor(args)  # its weights found before any video is read
    poses, source_fps = read_poses(args, photo, extractor)
    pipe = load_pipeline(args)
    multiple, most_steps = pipe.size_multiple, pipe.scheduler.config.num_train_timesteps
    if args.steps > most_steps:
        raise InputError(
            f"--steps must be at most {most_steps} (the scheduler's training steps), got {args.steps}"
        )
    if args.height % multiple or args.width % multiple:
        raise InputError(
            f"--height and --width must be multiples of {multiple}, got {args.height}x{args.width}"
        )
    fps = args.fps or (source_fps / args.stride if source_fps else DEFAULT_FPS)
    return Inputs(pipeline=pipe, reference=photo, poses=poses, mask=mask, fps=fps)


def sample(args, inputs: Inputs) -> np.ndarray:
    """Run the pipeline: uint8 (F, H, W, 3), F the pose video's frame count."""
    n = len(inputs.poses)
    log.info(
        "%d frames at %g fps (%.2f s of video), %dx%d, %d steps, guidance %g, seed %d",
        n, inputs.fps, n / inputs.fps, args.height, args.width, args.steps, args.guidance, args.seed,
    )  # fmt: skip
    start = time.perf_counter()
    frames = inputs.pipeline(
        inputs.reference, inputs.poses, args.prompt, args.negative_prompt or "", num_frames=n,
        steps=args.steps, guidance=args.guidance, seed=args.seed, height=args.height, width=args.width,
        dtype={"fp32": "float32", "bf16": "bfloat16"}[args.dtype], reference_mask=inputs.mask, progress=True,
    )  # fmt: skip
    log.info("sampled in %.1f s", time.perf_counter() - start)
    return np.asarray(frames)
