"""Evaluation of generated animations against their ground truth (numpy and OpenCV, no learned networks).

- `metrics`: L1 (0-255 scale), PSNR (float64 on 0-255 values), SSIM (Wang et al., Gaussian window 11).
- `pose_metrics`: each limb found in the frames by its palette colour vs the driving keypoints (pixels).
- `identity_metrics`: colour distance (CIELAB ΔE76) of the limb and clothing regions to the palette.
- `motion_metrics`: Farnebäck optical-flow energy outside the character, generated vs target.
- `palette`, `inputs`, `regions`: the palette file, reading and cross-checking inputs, keypoint regions.
- `evaluate`: one run over files, as `python -m xdyna_jax.eval` performs it.
"""

from xdyna_jax.eval.evaluate import evaluate, write_json
from xdyna_jax.eval.identity_metrics import IdentityError, color_distance, identity_error
from xdyna_jax.eval.inputs import EvalInputError, read_frames
from xdyna_jax.eval.metrics import l1_error, psnr, psnr_per_frame, ssim, ssim_map, ssim_per_frame
from xdyna_jax.eval.motion_metrics import BackgroundMotion, background_motion, flow_energy
from xdyna_jax.eval.palette import Palette, PaletteError, palette_from_dict, read_palette
from xdyna_jax.eval.pose_metrics import LimbLocation, PoseError, locate_limb, palette_coverage, pose_error

__all__ = [
    "BackgroundMotion",
    "EvalInputError",
    "IdentityError",
    "LimbLocation",
    "Palette",
    "PaletteError",
    "PoseError",
    "background_motion",
    "color_distance",
    "evaluate",
    "flow_energy",
    "identity_error",
    "l1_error",
    "locate_limb",
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
    "write_json",
]
