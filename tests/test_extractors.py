"""The optional extractors (extractors.py) on fake ONNX / face_alignment backends, and their OpenCV steps
against the DWPose annotator's rules written out here."""

import sys
import types

import cv2
import numpy as np
import pytest

from xdyna_jax.conditioning import extractors as ex

H, W = 200, 160


def yolox_nms(boxes, scores, iou_threshold):
    """The annotator's greedy NMS: best score first, drop boxes overlapping a kept one by IoU above the
    threshold, box sizes counted YOLOX's way (x1 - x0 + 1)."""
    area = lambda b: (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    keep, order = [], list(np.argsort(scores)[::-1])
    while order:
        best, order = order[0], order[1:]
        keep.append(best)
        rest = boxes[order]
        lo, hi = np.maximum(boxes[best, :2], rest[:, :2]), np.minimum(boxes[best, 2:], rest[:, 2:])
        inter = np.prod(np.maximum(0.0, hi - lo + 1), axis=-1)
        iou = inter / (area(boxes[best]) + area(rest) - inter)
        order = [i for i, v in zip(order, iou, strict=True) if v <= iou_threshold]
    return keep


@pytest.mark.parametrize("seed", range(3))
def test_person_boxes_match_annotator_nms(seed):
    rng = np.random.default_rng(seed)
    n, ratio = 200, 1.6
    decoded = np.zeros((n, 6))
    decoded[:, :2] = rng.uniform(0, 640, (n, 2))  # centres
    decoded[:, 2:4] = rng.uniform(4, 200, (n, 2))  # sizes
    decoded[:, 4], decoded[:, 5] = rng.uniform(0, 1, n), rng.uniform(0, 1, n)  # objectness, P(person)
    cx, cy, w, h = decoded[:, :4].T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) / ratio
    scores = decoded[:, 4] * decoded[:, 5]
    candidates = np.flatnonzero(scores > 0.1)
    kept = candidates[yolox_nms(boxes[candidates], scores[candidates], 0.45)]
    expected = boxes[kept[scores[kept] > 0.3]]
    got = ex.person_boxes(decoded, ratio)
    assert len(expected) >= 5
    np.testing.assert_array_equal(got, expected)


def test_pose_crop_is_the_annotators_affine_warp():
    # Box 40 x 100 at (30, 20): padded 50 x 125, widened to the 288:384 aspect -> 93.75 x 125.
    center, scale, matrix = ex.pose_crop(np.array([30.0, 20.0, 70.0, 120.0]), (288, 384))
    np.testing.assert_allclose(center, [50, 70])
    np.testing.assert_allclose(scale, [93.75, 125])
    # Uniform zoom 288 / 93.75 about the box centre, which lands on the input centre (144, 192).
    k = 288 / 93.75
    np.testing.assert_allclose(matrix, [[k, 0, 144 - 50 * k], [0, k, 192 - 70 * k]], rtol=1e-6, atol=1e-4)
    frame = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    crop = cv2.warpAffine(frame, matrix, (288, 384), flags=cv2.INTER_LINEAR)
    assert crop[192, 144].tolist() == frame[70, 50].tolist()  # the centres coincide exactly


def test_dwpose_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="yolox_missing.onnx"):
        ex.DWPoseOnnx(tmp_path / "yolox_missing.onnx", tmp_path / "pose.onnx")


def test_dwpose_missing_package(tmp_path, monkeypatch):
    det, pose = tmp_path / "det.onnx", tmp_path / "pose.onnx"
    det.write_bytes(b"x")
    pose.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ex.ExtractorUnavailable, match="pip install onnxruntime") as err:
        ex.DWPoseOnnx(det, pose)
    assert isinstance(err.value, ImportError)
    # With a (fake) onnxruntime present, both sessions are built from the given files.
    built = []
    fake = types.SimpleNamespace(
        InferenceSession=lambda path, providers: built.append((path, providers)) or path
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    model = ex.DWPoseOnnx(det, pose)
    assert built == [(str(det), ["CPUExecutionProvider"]), (str(pose), ["CPUExecutionProvider"])]
    assert (model.det_session, model.pose_session) == (str(det), str(pose))


class _FakeSession:
    def __init__(self, shape, run):
        self._shape, self._run, self.inputs = shape, run, []

    def get_inputs(self):
        return [types.SimpleNamespace(name="input", shape=self._shape)]

    def run(self, output_names, feed):
        assert output_names is None and list(feed) == ["input"]
        self.inputs.append(feed["input"])
        return self._run(feed["input"])


def _fake_detector():
    """Raw YOLOX output (1, 8400, 85) for a 640x640 input with known anchors (see test below)."""
    raw = np.zeros((1, 8400, 85), np.float32)

    def anchor(index, dxy, wh, obj, cls):
        raw[0, index, :2] = dxy
        raw[0, index, 2:4] = np.log(wh)
        raw[0, index, 4] = obj
        raw[0, index, 5 : 5 + len(cls)] = cls

    anchor(40 * 80 + 40, (0, 0), (20, 40), 1.0, [0.9])  # stride 8, cell (40, 40): 320, 320, 160 x 320
    anchor(40 * 80 + 41, (-1, 0), (20, 40), 1.0, [0.8])  # same box, lower score: NMS removes it
    anchor(10 * 80 + 10, (0, 0), (4, 4), 1.0, [0.05, 0.99])  # not a person
    anchor(70 * 80 + 10, (0, 0), (4, 4), 1.0, [0.2])  # person below the 0.3 keep threshold
    # stride 32 level starts at 6400 + 1600; cell (5, 15), offset 0.5: centre (176, 496), 64 x 64.
    anchor(8000 + 15 * 20 + 5, (0.5, 0.5), (2, 2), 1.0, [0.5])

    def run(x):
        assert x.shape == (1, 3, 640, 640) and x.dtype == np.float32
        return [raw]

    return _FakeSession([1, 3, 640, 640], run)


def _fake_pose():
    """SimCC logits (1, 133, 576) / (1, 133, 768): every keypoint peaks at the crop centre unless set below."""
    sx, sy = np.zeros((1, 133, 576), np.float32), np.zeros((1, 133, 768), np.float32)
    peaks = {k: (288, 384, 1.0, 1.0) for k in range(133)}
    peaks[5] = (144, 192, 0.9, 0.95)  # left shoulder, score min(0.9, 0.95)
    peaks[6] = (432, 192, 0.8, 0.85)  # right shoulder
    peaks[0] = (10, 10, -0.5, -0.2)  # nose, negative score -> location -1
    peaks[91] = (0, 0, 1.0, 1.0)  # left hand, first point
    peaks[112] = (576 - 1, 0, 1.0, 1.0)  # right hand, first point
    for k, (bx, by, vx, vy) in peaks.items():
        sx[0, k] = -1.0 if vx < 0 else 0.0
        sy[0, k] = -1.0 if vy < 0 else 0.0
        sx[0, k, bx], sy[0, k, by] = vx, vy
    return _FakeSession([1, 3, 384, 288], lambda x: [sx, sy])


def test_dwpose_decodes_fake_sessions():
    # Frame 200 x 160 with R = x, G = y: letterbox ratio min(640/200, 640/160) = 3.2, resized 512 x 640.
    yy, xx = np.mgrid[0:H, 0:W]
    frame = np.stack([xx, yy, np.full_like(xx, 7)], -1).astype(np.uint8)
    det, pose = _fake_detector(), _fake_pose()
    model = ex.DWPoseOnnx.from_sessions(det, pose)

    # Detector input: resized gradient on the left, 114 padding right of column 512.
    boxes = model.detect(frame)
    x = det.inputs[-1]
    letterboxed = cv2.resize(frame, (512, 640), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(x[0, :, :, :512].transpose(1, 2, 0), letterboxed)
    assert (x[0, :, :, 512:] == 114).all()
    assert x[0, 0, 10, 320] == 100  # (320 + 0.5) / 3.2 - 0.5 = 99.66 -> 100
    # Boxes in frame pixels: (240, 160, 400, 480) / 3.2 and (144, 464, 208, 528) / 3.2; best first.
    np.testing.assert_allclose(boxes, [[75, 50, 125, 150], [45, 145, 65, 165]], atol=1e-9)

    kpts, scores = model.estimate(frame)
    assert kpts.shape == (2, 134, 2) and scores.shape == (2, 134)
    # Box 1: centre (100, 100), size 50 x 100 -> padded 62.5 x 125 -> aspect 0.75: 93.75 x 125.
    # x = bin / 2 / 288 * 93.75 + 53.125, y = bin / 2 / 384 * 125 + 37.5.
    crop = pose.inputs[0][0].transpose(1, 2, 0) * ex.POSE_STD + ex.POSE_MEAN
    assert round(crop[192, 144, 0]) == 100 and round(crop[192, 144, 1]) == 100  # crop centre = box centre
    assert round(crop[192, 0, 0]) == 53 and round(crop[96, 144, 1]) == 69  # 53.125, 100 - 96 / 3.072
    p = kpts[0]
    np.testing.assert_allclose(p[2], [123.4375, 68.75])  # OpenPose 2 = right shoulder (COCO 6)
    np.testing.assert_allclose(p[5], [76.5625, 68.75])  # OpenPose 5 = left shoulder (COCO 5)
    np.testing.assert_allclose(p[1], [100.0, 68.75])  # neck = shoulders' mean
    np.testing.assert_allclose(scores[0, [1, 2, 5]], [1.0, 0.8, 0.9], rtol=1e-6)
    np.testing.assert_allclose(p[0], [-0.5 / 288 * 93.75 + 53.125, -0.5 / 384 * 125 + 37.5])
    assert scores[0, 0] == pytest.approx(-0.5)
    np.testing.assert_allclose(p[92], [53.125, 37.5])  # left hand starts at 92
    np.testing.assert_allclose(p[113], [575 / 2 / 288 * 93.75 + 53.125, 37.5])  # right hand at 113
    np.testing.assert_allclose(p[4], [100.0, 100.0])  # a centre-peaked point lands on the box centre
    # Box 2: centre (55, 155), 20 x 20 -> 25 x 25 -> 25 x 33.33; centre-peaked points land on its centre.
    np.testing.assert_allclose(kpts[1, 4], [55.0, 155.0])
    np.testing.assert_allclose(kpts[1, 92], [55 - 12.5, 155 - 50 / 3])


def test_dwpose_neck_invisible_when_a_shoulder_is():
    kp = np.zeros((1, 133, 2))
    sc = np.ones((1, 133))
    sc[0, 6] = 0.3  # not > 0.3
    _, scores = ex.to_openpose_order(kp, sc)
    assert scores[0, 1] == 0.0 and scores[0, 5] == 1.0


def _fake_face_alignment(monkeypatch, calls, landmarks):
    """Install a minimal fake `face_alignment` package that calls its loader like the real one."""
    api = types.ModuleType("face_alignment.api")
    api.load_file_from_url = lambda url, *a, **k: pytest.fail("the real downloader must never run")

    class FaceAlignment:
        def __init__(self, landmarks_type, device="cuda", flip_input=False, face_detector="sfd",
                     face_detector_kwargs=None, compile=True):  # fmt: skip
            fan = sys.modules["face_alignment.api"].load_file_from_url("https://x/2DFAN4-11f355bf06.pth.tar")
            calls.append(dict(type=landmarks_type, device=device, flip=flip_input, detector=face_detector,
                              detector_kwargs=face_detector_kwargs, compile=compile, fan=fan))  # fmt: skip

        def get_landmarks_from_image(self, image):
            assert image.dtype == np.uint8
            return landmarks

    pkg = types.ModuleType("face_alignment")
    pkg.FaceAlignment, pkg.LandmarksType, pkg.api = FaceAlignment, types.SimpleNamespace(TWO_D=1), api
    sfd = types.ModuleType("face_alignment.detection.sfd.sfd_detector")
    sfd.models_urls = {"s3fd": "https://x/s3fd-619a316812.pth"}
    for name, mod in [("face_alignment", pkg), ("face_alignment.api", api)]:
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "face_alignment.detection.sfd.sfd_detector", sfd)


def test_face_alignment_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "face_alignment", None)
    with pytest.raises(ex.ExtractorUnavailable, match="pip install face-alignment"):
        ex.FaceAlignmentLandmarks()


def test_face_alignment_uses_local_files_only(tmp_path, monkeypatch):
    calls = []
    faces = [np.arange(136, dtype=np.float64).reshape(68, 2), np.zeros((68, 2))]
    _fake_face_alignment(monkeypatch, calls, faces)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    # Nothing cached: clear errors naming the expected files; nothing is downloaded.
    with pytest.raises(FileNotFoundError, match=str(cache / "s3fd-619a316812.pth")):
        ex.FaceAlignmentLandmarks()
    cache.mkdir(parents=True)
    (cache / "s3fd-619a316812.pth").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="2DFAN4-11f355bf06.pth.tar"):
        ex.FaceAlignmentLandmarks()
    with pytest.raises(FileNotFoundError, match="fan_missing.pth"):
        ex.FaceAlignmentLandmarks(fan_path=tmp_path / "fan_missing.pth")
    (cache / "2DFAN4-11f355bf06.pth.tar").write_bytes(b"x")
    model = ex.FaceAlignmentLandmarks()
    expected = dict(type=1, device="cpu", flip=True, detector="sfd", compile=False)
    expected["detector_kwargs"] = {"path_to_detector": str(cache / "s3fd-619a316812.pth")}
    assert calls[-1] == dict(expected, fan=str(cache / "2DFAN4-11f355bf06.pth.tar"))
    # Explicit files win over the cache.
    fan, sfd = tmp_path / "fan.pth", tmp_path / "sfd.pth"
    fan.write_bytes(b"x")
    sfd.write_bytes(b"x")
    ex.FaceAlignmentLandmarks(fan_path=fan, detector_path=sfd)
    assert calls[-1]["fan"] == str(fan) and calls[-1]["detector_kwargs"] == {"path_to_detector": str(sfd)}
    # First face, float32 (68, 2); None when nothing is detected.
    frame = np.zeros((8, 8, 3), np.uint8)
    out = model(frame)
    assert out.dtype == np.float32 and out.shape == (68, 2) and out[1, 0] == 2.0
    model.model.get_landmarks_from_image = lambda image: None
    assert model(frame) is None


def test_wholebody_to_pose_frame():
    kp = np.arange(134 * 2, dtype=np.float64).reshape(134, 2)
    pf = ex.wholebody_to_pose_frame(kp, np.arange(134) / 134)
    assert pf.body.shape == (18, 2) and pf.hands.shape == (2, 21, 2) and pf.hand_scores.shape == (2, 21)
    np.testing.assert_array_equal(pf.body[17], kp[17])
    np.testing.assert_array_equal(pf.hands[0, 0], kp[92])  # left hand first
    np.testing.assert_array_equal(pf.hands[1, 20], kp[133])
    np.testing.assert_array_equal(pf.face[[0, 67]], kp[[24, 91]])  # face: 24-91
    assert pf.body_scores[3] == np.float32(3 / 134) and pf.hand_scores[1, 0] == np.float32(113 / 134)
    assert pf.face_scores[0] == np.float32(24 / 134)
