"""LPIPS and FVD from weights the user keeps on disk: nothing here downloads.

LPIPS (Zhang et al. 2018) runs through the `lpips` package. Its linear layers, calibrated on human judgements,
ship inside that package; the backbone is read from a torchvision state dict the user passes:
`alexnet-owt-7be5be79.pth` (net "alex", the default) or `vgg16-397923af.pth` (net "vgg"), keys
`features.0.weight`, ... (a full torchvision file also holds `classifier.*`, which LPIPS does not use and is
ignored). The file is read with `torch.load(..., weights_only=True)`, so it cannot run code. Frames are RGB
scaled to [-1, 1], as lpips expects; one distance per frame (`lpips_distances`).

FVD (Unterthiner et al. 2018) uses the I3D detector in the form StyleGAN-V and content-debiased FVD
distribute, the TorchScript file `i3d_torchscript.pt` (read with `torch.jit.load`, not unpickled). The
convention implemented here: the detector is called as

    detector(videos, rescale=False, resize=True, return_features=True)

on float32 `videos` of shape (N, 3, T, H, W), RGB in [-1, 1] (`rescale=False`: the caller has already scaled
them; `resize=True`: the detector itself resizes the frames to its 224 x 224 input), and returns (N, 400)
features, the Kinetics-400 logits before the softmax. The Fréchet distance between the two feature sets'
Gaussians is computed in float64 (`frechet_distance`).

torch, torchvision, lpips and scipy are imported only when a metric is asked for; without them the error says
`pip install 'xdyna-jax[eval]'`.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from pathlib import Path

import numpy as np

from xdyna_jax.eval.inputs import EvalInputError

INSTALL_HINT = "pip install 'xdyna-jax[eval]'"
LPIPS_NETS = ("alex", "vgg")
LPIPS_BACKBONES = {"alex": "AlexNet", "vgg": "VGG16"}
# The smallest frame side each backbone's layers accept: AlexNet's stride-4 11 x 11 conv and two 3 x 3 stride-2
# max-pools leave nothing of a frame under 31 pixels; VGG16's four 2 x 2 pools before relu5_3 need 16.
LPIPS_MIN_SIDE = {"alex": 31, "vgg": 16}
# I3D's temporal receptive field: Inception-I3D, which the detector ports, halves time in its first
# convolution and in two later max-pools (8x in all, 'same' padding: 9 frames -> 5 -> 3 -> 2), then averages
# over a window of 2 time steps, so under 9 frames nothing is left to average and the detector fails. We
# require 10, one frame of margin; FVD is usually reported on 16-frame clips.
FVD_MIN_FRAMES = 10
I3D_CALL = {"rescale": False, "resize": True, "return_features": True}

LEARNED_METRICS_NOTE = (
    "LPIPS and FVD skipped: their pretrained networks do not ship with xdyna-jax; pass --lpips-weights (a "
    "torchvision AlexNet or VGG16 state dict) and, with folders of videos, --fvd-weights (i3d_torchscript.pt)"
)
FVD_PAIR_NOTE = "FVD compares two sets of videos: pass folders of at least 2 videos each with --fvd-weights"


class LearnedMetricError(EvalInputError):
    """Weights that cannot be used (missing, not the expected format or layout) or a missing package."""


def _one_line(error: BaseException, *, last: bool = False) -> str:
    """One line of an exception's message (torch's are often many lines long)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if last else lines[0]


def _require(module: str, metric: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LearnedMetricError(f"{metric} needs the {module.split('.')[0]} package: {INSTALL_HINT}") from e


def import_lpips():
    """The `lpips` package, importable even beside a torchvision built for another torch variant."""
    torch = _require("torch", "LPIPS")
    try:
        import lpips
    except ImportError as e:
        raise LearnedMetricError(f"LPIPS needs the lpips and torchvision packages: {INSTALL_HINT}") from e
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        # A torchvision wheel made for another torch build (PyPI's CUDA torchvision beside a CPU-only torch)
        # cannot load its compiled ops (NMS, RoI pooling), and its import then stops where it registers
        # their meta kernels. LPIPS needs only the plain AlexNet / VGG16 layer definitions, so import once
        # more with that registration module stubbed; torchvision's compiled ops stay unusable, as they were.
        name = "torchvision._meta_registrations"
        sys.modules.setdefault(name, types.ModuleType(name))
        try:
            import lpips
        except RuntimeError as again:
            raise LearnedMetricError(
                f"torchvision does not import beside torch {torch.__version__} ({_one_line(again)}); "
                f"install the torchvision that pairs with it: {INSTALL_HINT}"
            ) from again
    return lpips


def _read_state_dict(path: Path, torch) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file fails in format-specific ways (zip, pickle, EOF)
        raise LearnedMetricError(
            f"{path}: not a PyTorch state dict (torch.load, weights only: {_one_line(e)})"
        ) from e
    if not isinstance(state, dict):
        raise LearnedMetricError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def _load_backbone(backbone, state: dict, path: Path, net: str, torch) -> None:
    """Copy a torchvision `features.*` state dict into lpips' backbone slices, checking every key and shape.

    lpips splits torchvision's `features` into slice1 ... slice5 but adds each layer under its original
    index, so its "slice2.3.weight" is torchvision's "features.3.weight": the mapping is key for key.
    """
    own = backbone.state_dict()
    wanted = {f"features.{key.split('.', 1)[1]}": key for key in own}
    layout = f"a torchvision {LPIPS_BACKBONES[net]} state dict (features.0.weight, ...) for --lpips-net {net}"
    for key, value in state.items():
        if isinstance(key, str) and key.startswith("classifier."):
            continue  # torchvision's full-model files carry the classifier; LPIPS uses only the features
        if key not in wanted:
            raise LearnedMetricError(f"{path}: unexpected key {key!r}; expected {layout}")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise LearnedMetricError(f"{path}: key {key!r} is not a floating-point tensor; expected {layout}")
        need = tuple(own[wanted[key]].shape)
        if tuple(value.shape) != need:
            raise LearnedMetricError(
                f"{path}: key {key!r} has shape {tuple(value.shape)}, {LPIPS_BACKBONES[net]} needs {need}; "
                f"expected {layout}"
            )
    missing = [key for key in wanted if key not in state]
    if missing:
        raise LearnedMetricError(f"{path}: missing key {missing[0]!r}; expected {layout}")
    backbone.load_state_dict({wanted[key]: state[key] for key in wanted}, strict=True)


def load_lpips(weights_path: str | Path, net: str = "alex"):
    """lpips' LPIPS module (eval mode, CPU) with its packaged linear layers and the backbone read from
    `weights_path`, a torchvision AlexNet (net "alex") or VGG16 (net "vgg") state dict."""
    if net not in LPIPS_NETS:
        raise ValueError(f"net must be one of {LPIPS_NETS}, got {net!r}")
    path = Path(weights_path)
    if not path.is_file():
        raise LearnedMetricError(f"{path}: no such LPIPS backbone weights file")
    lpips = import_lpips()
    import torch

    state = _read_state_dict(path, torch)
    with warnings.catch_warnings():
        # lpips still asks torchvision for `pretrained=False`, which torchvision answers with a deprecation
        # warning; pnet_rand=True is what keeps it from downloading the ImageNet backbone
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    _load_backbone(model.net, state, path, net, torch)
    return model.eval()


def _signed(frames: np.ndarray, torch):
    """uint8 (..., H, W, 3) RGB -> float32 in [-1, 1], same layout."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0


def lpips_distances(model, generated: np.ndarray, target: np.ndarray, *, batch_size: int = 8) -> np.ndarray:
    """LPIPS of each frame pair of two uint8 (T, H, W, 3) RGB videos -> float64 (T,)."""
    import torch

    generated, target = np.asarray(generated), np.asarray(target)
    if generated.shape != target.shape or generated.ndim != 4 or generated.shape[-1] != 3:
        raise ValueError(
            f"expected two (T, H, W, 3) videos of one shape, got {generated.shape}, {target.shape}"
        )
    out = []
    with torch.no_grad():
        for start in range(0, len(generated), batch_size):
            pair = [
                _signed(v[start : start + batch_size], torch).permute(0, 3, 1, 2) for v in (generated, target)
            ]
            out.append(model(*pair).reshape(-1).double().numpy())
    return np.concatenate(out)


def load_i3d(path: str | Path):
    """The I3D TorchScript detector (eval mode, CPU) from `path` (i3d_torchscript.pt)."""
    path = Path(path)
    if not path.is_file():
        raise LearnedMetricError(f"{path}: no such I3D detector file")
    torch = _require("torch", "FVD")
    try:
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript in favour of torch.export, but the community's I3D detector
            # is distributed as a TorchScript file, and loading one runs no Python pickle
            warnings.simplefilter("ignore", DeprecationWarning)
            detector = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch.jit.load reports a non-TorchScript file with assorted error types
        raise LearnedMetricError(f"{path}: not a TorchScript file (torch.jit.load: {_one_line(e)})") from e
    return detector.eval()


def i3d_features(detector, videos: np.ndarray, *, where: str | Path = "the I3D detector") -> np.ndarray:
    """uint8 (N, T, H, W, 3) RGB videos -> the detector's float64 (N, D) features (D = 400 for I3D).

    The videos go in as float32 (N, 3, T, H, W) in [-1, 1], called with I3D_CALL (see the module docstring).
    """
    import torch

    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, T, H, W, 3) videos, got {videos.dtype} {videos.shape}")
    if videos.shape[1] < FVD_MIN_FRAMES:
        raise EvalInputError(
            f"FVD needs videos of at least {FVD_MIN_FRAMES} frames (I3D's temporal receptive field), got "
            f"{videos.shape[1]}"
        )
    x = _signed(videos, torch).permute(0, 4, 1, 2, 3).contiguous()
    try:
        with torch.no_grad():
            features = detector(x, **I3D_CALL)
    except RuntimeError as e:  # TorchScript reports failures inside the detector as RuntimeError
        raise LearnedMetricError(
            f"{where}: failed on videos of shape {tuple(x.shape)} ({_one_line(e, last=True)})"
        ) from e
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != len(videos):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise LearnedMetricError(f"{where}: returned {shape} for {len(videos)} videos, not (N, features)")
    return features.double().numpy()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> float64 mean (D,) and covariance (D, D) (unbiased, N - 1); needs N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64:

        ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))

    with scipy.linalg.sqrtm. The product of two covariances has real eigenvalues >= 0, so its principal
    square root is real; rounding leaves small imaginary parts, and the real part is taken.
    """
    scipy_linalg = _require("scipy.linalg", "FVD")
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    root = scipy_linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        # covariances of fewer videos than features are singular, and the square root of their product can
        # break down; a tiny ridge on both makes it well defined while moving the distance negligibly
        ridge = 1e-6 * np.eye(len(sigma1))
        root = scipy_linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(np.real(root)))


def fvd_from_features(generated: np.ndarray, target: np.ndarray) -> float:
    """FVD of two (N, D) I3D feature sets (N may differ between them, each at least 2)."""
    return frechet_distance(*feature_statistics(generated), *feature_statistics(target))
