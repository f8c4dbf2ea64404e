"""Evaluation of generated animations against their ground truth (numpy and OpenCV; learned metrics only from
weights the user passes).

- `metrics`: L1 (0-255 scale), PSNR (float64 on 0-255 values), SSIM (Wang et al., Gaussian window 11).
- `pose_metrics`: each limb found in the frames by its palette colour vs the driving keypoints (pixels).
- `identity_metrics`: colour distance (CIELAB ΔE76) of the limb and clothing regions to the palette.
- `motion_metrics`: Farnebäck optical-flow energy outside the character, generated vs target.
- `learned_metrics`: LPIPS (the lpips package, a local torchvision AlexNet/VGG16 backbone file) and FVD (a
  local I3D TorchScript detector, Fréchet distance in float64); torch, lpips and scipy load only when used.
- `palette`, `inputs`, `regions`: the palette file, reading and cross-checking inputs, keypoint regions.
- `evaluate`: one run over files, as `python -m xdyna_jax.eval` performs it (`evaluate_video_sets`: FVD of two
  folders of videos).
"""

from xdyna_jax.eval.evaluate import evaluate, evaluate_video_sets, video_set, write_json
from xdyna_jax.eval.identity_metrics import IdentityError, color_distance, identity_error
from xdyna_jax.eval.inputs import EvalInputError, read_frames
from xdyna_jax.eval.learned_metrics import (
    LearnedMetricError,
    feature_statistics,
    frechet_distance,
    fvd_from_features,
    i3d_features,
    load_i3d,
    load_lpips,
    lpips_distances,
)
from xdyna_jax.eval.metrics import l1_error, psnr, psnr_per_frame, ssim, ssim_map, ssim_per_frame
from xdyna_jax.eval.motion_metrics import BackgroundMotion, background_motion, flow_energy
from xdyna_jax.eval.palette import Palette, PaletteError, palette_from_dict, read_palette
from xdyna_jax.eval.pose_metrics import LimbLocation, PoseError, locate_limb, palette_coverage, pose_error

__all__ = [
    "BackgroundMotion",
    "EvalInputError",
    "IdentityError",
    "LearnedMetricError",
    "LimbLocation",
    "Palette",
    "PaletteError",
    "PoseError",
    "background_motion",
    "color_distance",
    "evaluate",
    "evaluate_video_sets",
    "feature_statistics",
    "flow_energy",
    "frechet_distance",
    "fvd_from_features",
    "i3d_features",
    "identity_error",
    "l1_error",
    "load_i3d",
    "load_lpips",
    "locate_limb",
    "lpips_distances",
    "palette_coverage",
    "palette_from_dict",
    "pose_error",
    "psnr",
    "psnr_per_frame",
    "read_frames",
    "read_palette",
    "ssim",
    "ssim_map",
    "ssim_per_frame",
    "video_set",
    "write_json",
]
