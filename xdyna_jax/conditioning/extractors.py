"""Optional keypoint extractors for driving videos: DWPose (ONNX) for pose, face_alignment for 68 landmarks.

Neither backend is a dependency of xdyna-jax: each is imported only when its extractor is built, and a
missing package raises ``ExtractorUnavailable`` saying what to install. Nothing here downloads weights:
every weight file is a local path the user gives (or, for face_alignment, a file already in its cache).

- ``DWPoseOnnx(det_onnx_path, pose_onnx_path)``: YOLOX person detector + RTMPose whole-body (SimCC) model,
  e.g. ``yolox_l.onnx`` and ``dw-ll_ucoco_384.onnx`` from the DWPose release. Same pre/post-processing as
  the DWPose ControlNet annotator, with the same OpenCV calls: bilinear ``cv2.resize`` into the detector's
  letterbox, NMS, ``cv2.getAffineTransform`` + bilinear ``cv2.warpAffine`` for the pose crop.
- ``FaceAlignmentLandmarks``: ``face_alignment.FaceAlignment(LandmarksType 2D, flip_input=True)`` with the
  SFD detector, as in X-Dyna's ``inference_xdyna.py``; returns the first detected face or None.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from xdyna_jax.conditioning.pose import PoseFrame


class ExtractorUnavailable(ImportError):
    """An optional extractor's package is not installed."""


class PoseExtractor(Protocol):
    def __call__(self, frame: np.ndarray) -> PoseFrame:
        """RGB uint8 (H, W, 3) frame -> the most confident person's keypoints (pixel coordinates)."""
        ...


class FaceLandmarkExtractor(Protocol):
    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        """RGB uint8 (H, W, 3) frame -> (68, 2) float32 (x, y) pixel landmarks, or None if no face."""
        ...


def _import(module: str, pip_name: str, why: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ExtractorUnavailable(
            f"{why} needs the optional package '{pip_name}', which is not importable ({e}). "
            f"Install it with: pip install {pip_name}"
        ) from e


def _existing_file(path, what: str) -> Path:
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def _check_frame(frame) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) frame, got {frame.dtype} {frame.shape}")
    return frame


# --------------------------------------------------------------------------------------------------------
# DWPose: YOLOX person detection
# --------------------------------------------------------------------------------------------------------

DET_PAD_VALUE = 114  # YOLOX letterbox fill
DET_NMS_IOU, DET_SCORE_NMS, DET_SCORE_KEEP = 0.45, 0.1, 0.3  # DWPose onnxdet.py thresholds


def yolox_preprocess(img: np.ndarray, input_hw: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Resize keeping aspect to fit ``input_hw``, pad bottom/right with 114 -> (1, 3, h, w) float32, ratio."""
    in_h, in_w = input_hw
    r = min(in_h / img.shape[0], in_w / img.shape[1])
    rh, rw = int(img.shape[0] * r), int(img.shape[1] * r)
    padded = np.full((in_h, in_w, 3), DET_PAD_VALUE, np.uint8)
    padded[:rh, :rw] = cv2.resize(img, (rw, rh), interpolation=cv2.INTER_LINEAR)
    # YOLOX takes raw 0..255 values, channel-first, no mean/std.
    return padded.transpose(2, 0, 1)[None].astype(np.float32), r


def yolox_decode(
    raw: np.ndarray, input_hw: tuple[int, int], strides: Sequence[int] = (8, 16, 32)
) -> np.ndarray:
    """Raw YOLOX head output (A, 5 + classes) -> (A, 4 + 1 + classes) with xywh (centre) boxes in input pixels."""
    grids, steps = [], []
    for s in strides:
        xv, yv = np.meshgrid(np.arange(input_hw[1] // s), np.arange(input_hw[0] // s))
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        steps.append(np.full((grids[-1].shape[0], 1), s))
    grid, step = np.concatenate(grids), np.concatenate(steps)
    if raw.shape[0] != grid.shape[0]:
        raise ValueError(
            f"detector gave {raw.shape[0]} anchors, expected {grid.shape[0]} for input {input_hw}"
        )
    out = raw.astype(np.float64).copy()
    out[:, :2] = (out[:, :2] + grid) * step
    out[:, 2:4] = np.exp(out[:, 2:4]) * step
    return out


def person_boxes(decoded: np.ndarray, ratio: float) -> np.ndarray:
    """Decoded YOLOX predictions -> person boxes (n, 4) xyxy in frame pixels, best score first.

    DWPose runs class-aware NMS over all classes and then keeps class 0 with score > 0.3; NMS never mixes
    classes, so running it on class 0 alone gives the same boxes. Its NMS measures boxes YOLOX's way,
    (x1 - x0 + 1) wide; OpenCV's takes x, y, w, h, so widths and heights go in with that +1.
    """
    cx, cy, w, h = decoded[:, :4].T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) / ratio
    scores = decoded[:, 4] * decoded[:, 5]  # objectness * P(person)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2] + 1], -1)
    kept = np.asarray(cv2.dnn.NMSBoxes(xywh, scores, DET_SCORE_NMS, DET_NMS_IOU), np.int64).reshape(-1)
    return boxes[kept[scores[kept] > DET_SCORE_KEEP]].reshape(-1, 4)


# --------------------------------------------------------------------------------------------------------
# DWPose: RTMPose whole-body keypoints (SimCC)
# --------------------------------------------------------------------------------------------------------

POSE_MEAN = np.array([123.675, 116.28, 103.53])
POSE_STD = np.array([58.395, 57.12, 57.375])
SIMCC_SPLIT_RATIO = 2.0
BOX_PADDING = 1.25
# COCO-WholeBody (17 body) -> OpenPose-18 order after inserting the neck at 17 (DWPose wholebody.py).
MMPOSE_IDX = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
OPENPOSE_IDX = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
VISIBLE = 0.3  # DWPose's visibility threshold (neck score, drawing)


def pose_crop(box: np.ndarray, input_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box xyxy -> (centre, scale (w, h) padded 1.25x and widened to the model aspect, 2x3 warp matrix).

    The matrix maps the box onto the model input (a uniform scale ``w_in / scale_w`` taking the box centre
    to the input's centre). As in DWPose it comes from ``cv2.getAffineTransform`` on three float32 point
    pairs: the centres, the points half a width above them, and the points half a width left of those.
    """
    x0, y0, x1, y1 = np.asarray(box, np.float64)
    center = np.array([x0 + x1, y0 + y1]) * 0.5
    sw, sh = (x1 - x0) * BOX_PADDING, (y1 - y0) * BOX_PADDING
    aspect = input_wh[0] / input_wh[1]
    scale = np.array([sw, sw / aspect]) if sw > sh * aspect else np.array([sh * aspect, sh])

    def triangle(centre, half_width):
        up = centre + [0.0, -half_width]
        return np.float32([centre, up, up + [-half_width, 0.0]])

    out_center = np.array([input_wh[0], input_wh[1]], np.float64) * 0.5
    matrix = cv2.getAffineTransform(triangle(center, scale[0] * 0.5), triangle(out_center, input_wh[0] * 0.5))
    return center, scale, matrix


def simcc_decode(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SimCC logits (K, Wx), (K, Wy) -> keypoints (K, 2) in model-input pixels, scores (K,).

    Argmax per axis divided by the split ratio; score = min of the two maxima; a keypoint with score <= 0
    gets location -1 (before division, as in DWPose).
    """
    locs = np.stack([simcc_x.argmax(-1), simcc_y.argmax(-1)], -1).astype(np.float32)
    scores = np.minimum(simcc_x.max(-1), simcc_y.max(-1))
    locs[scores <= 0] = -1
    return locs / SIMCC_SPLIT_RATIO, scores


def to_openpose_order(keypoints: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO-WholeBody (n, 133) -> DWPose/OpenPose layout (n, 134): neck inserted, body reordered.

    Result: 0-17 OpenPose body, 18-23 feet, 24-91 face, 92-112 left hand, 113-133 right hand. The neck is
    the shoulders' mean, with score 1 if both shoulders score > 0.3, else 0.
    """
    info = np.concatenate([keypoints, scores[..., None]], -1)
    neck = info[:, [5, 6]].mean(axis=1)
    neck[:, 2] = np.logical_and(info[:, 5, 2] > VISIBLE, info[:, 6, 2] > VISIBLE)
    info = np.insert(info, 17, neck, axis=1)
    info[:, OPENPOSE_IDX] = info[:, MMPOSE_IDX]
    return info[..., :2], info[..., 2]


def _input_hw(session, default: tuple[int, int]) -> tuple[int, int]:
    """Static (h, w) of an ONNX model's NCHW input, or ``default`` when those dims are symbolic."""
    shape = list(session.get_inputs()[0].shape)[2:]
    return (shape[0], shape[1]) if all(isinstance(d, int) for d in shape) else default


class DWPoseOnnx:
    """DWPose whole-body pose from two ONNX files (YOLOX detector, RTMPose-SimCC); CPU by default.

    ``__call__`` returns a ``PoseFrame`` for the most confident person (pixel coordinates); ``estimate``
    returns every detected person in DWPose's 134-point OpenPose layout. With no person detected the whole
    frame is used as the box, as DWPose does. Build from existing sessions with ``from_sessions``.
    """

    def __init__(self, det_onnx_path, pose_onnx_path, providers: Sequence[str] = ("CPUExecutionProvider",)):
        det = _existing_file(det_onnx_path, "DWPose detector ONNX file (e.g. yolox_l.onnx)")
        pose = _existing_file(pose_onnx_path, "DWPose pose ONNX file (e.g. dw-ll_ucoco_384.onnx)")
        ort = _import("onnxruntime", "onnxruntime", "DWPoseOnnx")
        self.det_session = ort.InferenceSession(str(det), providers=list(providers))
        self.pose_session = ort.InferenceSession(str(pose), providers=list(providers))

    @classmethod
    def from_sessions(cls, det_session, pose_session) -> DWPoseOnnx:
        """Use already-built sessions (anything with onnxruntime's ``get_inputs`` / ``run``)."""
        self = cls.__new__(cls)
        self.det_session, self.pose_session = det_session, pose_session
        return self

    def detect(self, frame: np.ndarray) -> np.ndarray:
        """Person boxes (n, 4) xyxy in frame pixels, best first."""
        frame = _check_frame(frame)
        input_hw = _input_hw(self.det_session, (640, 640))
        x, ratio = yolox_preprocess(frame, input_hw)
        raw = self.det_session.run(None, {self.det_session.get_inputs()[0].name: x})[0]
        return person_boxes(yolox_decode(np.asarray(raw)[0], input_hw), ratio)

    def estimate(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints (n, 134, 2) in frame pixels and scores (n, 134), DWPose layout (``to_openpose_order``)."""
        frame = _check_frame(frame)
        boxes = self.detect(frame)
        if len(boxes) == 0:
            boxes = np.array([[0.0, 0.0, frame.shape[1], frame.shape[0]]])
        in_h, in_w = _input_hw(self.pose_session, (384, 288))
        name = self.pose_session.get_inputs()[0].name
        all_kpts, all_scores = [], []
        for box in boxes:
            center, scale, matrix = pose_crop(box, (in_w, in_h))
            crop = cv2.warpAffine(frame, matrix, (in_w, in_h), flags=cv2.INTER_LINEAR)
            crop = (crop - POSE_MEAN) / POSE_STD
            simcc_x, simcc_y = self.pose_session.run(
                None, {name: crop.transpose(2, 0, 1)[None].astype(np.float32)}
            )[:2]
            kpts, scores = simcc_decode(np.asarray(simcc_x)[0], np.asarray(simcc_y)[0])
            all_kpts.append(kpts / np.array([in_w, in_h]) * scale + center - scale / 2)
            all_scores.append(scores)
        return to_openpose_order(np.stack(all_kpts), np.stack(all_scores))

    def __call__(self, frame: np.ndarray) -> PoseFrame:
        keypoints, scores = self.estimate(frame)
        return wholebody_to_pose_frame(keypoints[0], scores[0])


def wholebody_to_pose_frame(keypoints: np.ndarray, scores: np.ndarray) -> PoseFrame:
    """One person's 134-point DWPose layout -> ``PoseFrame`` (body 18, hands [left, right] x 21, face 68)."""
    kp, sc = np.asarray(keypoints, np.float32), np.asarray(scores, np.float32)
    return PoseFrame(
        body=kp[:18],
        body_scores=sc[:18],
        hands=np.stack([kp[92:113], kp[113:134]]),
        hand_scores=np.stack([sc[92:113], sc[113:134]]),
        face=kp[24:92],
        face_scores=sc[24:92],
    )


# --------------------------------------------------------------------------------------------------------
# face_alignment (FAN) 68-point landmarks
# --------------------------------------------------------------------------------------------------------


def _torch_hub_checkpoint(url: str) -> Path:
    """Where face_alignment/torch.hub cache a downloaded file: <torch.hub.get_dir()>/checkpoints/<name>."""
    torch = sys.modules.get("torch")  # the real face_alignment has imported it (honours torch.hub.set_dir)
    if torch is not None:
        hub = Path(torch.hub.get_dir())
    else:  # torch.hub.get_dir()'s rule, without paying for a torch import
        home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
        hub = Path(home).expanduser() / "hub"
    return hub / "checkpoints" / os.path.basename(url.split("?")[0])


class FaceAlignmentLandmarks:
    """68 2-D landmarks with ``face_alignment`` (FAN + SFD detector, flip_input=True, as X-Dyna).

    face_alignment downloads its weights when they are not in torch.hub's cache and has no switch to stop
    it. This wrapper never lets it: the FAN file is ``fan_path`` or, if None, the file of the installed
    version's URL inside ``<torch.hub.get_dir()>/checkpoints`` (TORCH_HOME); the SFD detector likewise
    (``detector_path``, e.g. ``s3fd-619a316812.pth``). A missing file raises FileNotFoundError naming the
    path and the URL to fetch it from by hand. The FAN file must match the installed face_alignment version
    (1.5: ``2DFAN4-11f355bf06.pth.tar``; 1.4: a TorchScript ``.zip``).
    """

    def __init__(self, device: str = "cpu", fan_path=None, detector_path=None):
        fa = _import("face_alignment", "face-alignment", "FaceAlignmentLandmarks")
        api = importlib.import_module("face_alignment.api")
        if detector_path is None:
            sfd = importlib.import_module("face_alignment.detection.sfd.sfd_detector")
            url = sfd.models_urls["s3fd"]
            detector = _existing_file(_torch_hub_checkpoint(url), f"face_alignment SFD weights (from {url})")
        else:
            detector = _existing_file(detector_path, "face_alignment SFD detector weights")
        fan = None if fan_path is None else _existing_file(fan_path, "face_alignment FAN weights")

        def local_only(url, *args, **kwargs):
            # Stands in for face_alignment's download-if-missing loader while the model is built.
            if fan is not None:
                return str(fan)
            return str(_existing_file(_torch_hub_checkpoint(url), f"face_alignment FAN weights (from {url})"))

        types = fa.LandmarksType
        two_d = getattr(types, "TWO_D", None) or types._2D  # 1.4+: TWO_D; older: _2D
        kwargs = {"device": device, "flip_input": True, "face_detector": "sfd"}
        kwargs["face_detector_kwargs"] = {"path_to_detector": str(detector)}
        if "compile" in inspect.signature(fa.FaceAlignment).parameters:
            kwargs["compile"] = False  # 1.5 would torch.compile and write a cache under ~/.cache
        with _patched(api, "load_file_from_url", local_only):
            self.model = fa.FaceAlignment(two_d, **kwargs)

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        faces = self.model.get_landmarks_from_image(_check_frame(frame))
        if not faces:  # None (no face) or empty
            return None
        return np.asarray(faces[0], np.float32)[:, :2]  # the release takes the first face


@contextlib.contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)
