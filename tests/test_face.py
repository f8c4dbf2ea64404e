"""S-Face maps (face.py) and the optional extractors (extractors.py), on synthetic landmarks and fake backends.

Expected values are worked out by hand from the release's formulas (see face.py's docstring), not by
calling the code under test a second time.
"""

import dataclasses
import sys
import types

import numpy as np
import pytest

from xdyna_jax.conditioning import extractors as ex
from xdyna_jax.conditioning.face import (
    face_box,
    face_condition,
    global_face_map,
    local_face_map,
    local_rects,
    normalize_frames,
    part_centers,
    sface_maps,
)

H, W = 200, 160


def synthetic_landmarks(dx=0.0, dy=0.0):
    """68 points with bbox x [60, 100], y [80, 130]; eye/mouth slices averaging to (90,95), (70,95), (80,120).

    The points the release's slices skip (42, 36, 48) sit elsewhere, so including them would move the centres.
    """
    lmk = np.full((68, 2), [80.0, 105.0])
    lmk[0], lmk[16], lmk[8], lmk[19] = (60, 90), (100, 90), (80, 130), (75, 80)  # jaw ends, chin, brow
    lmk[43:48] = [(88, 95), (92, 95), (90, 93), (90, 97), (90, 95)]
    lmk[42] = (70, 85)
    lmk[37:42] = [(68, 95), (72, 95), (70, 93), (70, 97), (70, 95)]
    lmk[36] = (95, 120)
    lmk[49:68] = (80, 120)
    lmk[48] = (62, 128)
    return lmk + [dx, dy]


def random_frames(n, seed=0):
    # Values 1..255 so that "black" (0) is never a legitimate copied pixel.
    return list(np.random.default_rng(seed).integers(1, 256, (n, H, W, 3), dtype=np.uint8))


def masked(frame, rects):
    out = np.zeros_like(frame)
    for x0, y0, x1, y1 in rects:
        out[y0:y1, x0:x1] = frame[y0:y1, x0:x1]
    return out


# Hand-computed: length = max(40, 50) = 50, centre (80, 105).
# left int(80 - 67.5) = 12, top int(105 - 62.5) = 42, right int(147.5) = 147, bottom int(177.5) = 177.
BOX = (12, 42, 147, 177)
# Half sizes 135 // 8 = 16; rectangles [c - 16, c + 16) around (90, 95), (70, 95), (80, 120).
RECTS = [(74, 79, 106, 111), (54, 79, 86, 111), (64, 104, 96, 136)]


def test_face_box_expansion():
    assert face_box(synthetic_landmarks(), (H, W)) == BOX


def test_face_box_clipped_at_borders():
    # Top-left: bbox x [10, 50], y [10, 60], centre (30, 35): int(-37.5) = -37 -> 0, int(-27.5) -> 0,
    # int(97.5) = 97, int(107.5) = 107.
    assert face_box(synthetic_landmarks(-50, -70), (H, W)) == (0, 0, 97, 107)
    # Bottom-right: centre (130, 165): int(62.5) = 62, int(102.5) = 102, 197 -> W, 237 -> H.
    assert face_box(synthetic_landmarks(50, 60), (H, W)) == (62, 102, W, H)


def test_part_centers_use_release_slices():
    np.testing.assert_array_equal(part_centers(synthetic_landmarks()), [[90, 95], [70, 95], [80, 120]])


def test_local_map_rectangles():
    frame = random_frames(1)[0]
    assert local_rects(synthetic_landmarks(), BOX, (H, W)) == RECTS
    local = local_face_map(frame, synthetic_landmarks(), BOX)
    np.testing.assert_array_equal(local, masked(frame, RECTS))
    # Spot checks at the half-open edges of the left-eye rectangle.
    assert (local[79, 74] == frame[79, 74]).all() and (local[110, 105] == frame[110, 105]).all()
    assert (local[111, 100] == 0).all() and (local[95, 106] == 0).all() and (local[78, 90] == 0).all()


def test_local_rect_clipped_not_wrapped():
    # An eye centred at (3, 3) with half size 8: the release's slice [-5:11] would be empty; ours is [0, 11).
    lmk = np.full((68, 2), 20.0)
    lmk[0], lmk[1] = (0, 0), (40, 40)  # bbox 40x40 at the corner -> box (0, 0, 64, 64) in a 64x64 frame
    lmk[37:42] = (3, 3)
    box = face_box(lmk, (64, 64))
    assert box == (0, 0, 64, 64)
    assert local_rects(lmk, box, (64, 64))[1] == (0, 0, 11, 11)


def test_global_map_is_frame_inside_box():
    frame = random_frames(1)[0]
    glob = global_face_map(frame, BOX)
    np.testing.assert_array_equal(glob, masked(frame, [BOX]))
    assert glob.dtype == np.uint8


def test_sface_maps_keep_last_good_face():
    frames = random_frames(5, seed=1)
    a, b = synthetic_landmarks(), synthetic_landmarks(-50, -70)
    local, glob = sface_maps(frames, [None, a, None, b, None])
    assert local.shape == glob.shape == (5, H, W, 3)
    # Before any face: black.
    assert not local[0].any() and not glob[0].any()
    rects_b = local_rects(b, (0, 0, 97, 107), (H, W))
    expected = [
        (1, BOX, RECTS),
        (2, BOX, RECTS),
        (3, (0, 0, 97, 107), rects_b),
        (4, (0, 0, 97, 107), rects_b),
    ]
    for t, box, rects in expected:
        # Missing faces (t = 2, 4) reuse the last box and landmarks on their own pixels.
        np.testing.assert_array_equal(glob[t], masked(frames[t], [box]), err_msg=f"global, frame {t}")
        np.testing.assert_array_equal(local[t], masked(frames[t], rects), err_msg=f"local, frame {t}")


def test_sface_maps_sticky_box():
    frames = random_frames(2, seed=2)
    moved = synthetic_landmarks(3, 2)  # its bbox stays inside BOX
    _, free = sface_maps(frames, [synthetic_landmarks(), moved])
    _, sticky = sface_maps(frames, [synthetic_landmarks(), moved], sticky_box=True)
    np.testing.assert_array_equal(sticky[1], masked(frames[1], [BOX]))
    # Without it the box follows the face: centre (83, 107) -> (15, 44, 150, 179).
    np.testing.assert_array_equal(free[1], masked(frames[1], [(15, 44, 150, 179)]))


def test_sface_maps_input_errors():
    frames = random_frames(2)
    with pytest.raises(ValueError, match="2 frames but 1"):
        sface_maps(frames, [None])
    with pytest.raises(ValueError, match=r"\(68, 2\)"):
        sface_maps(frames, [None, np.zeros((5, 2))])
    with pytest.raises(ValueError, match="frame 1 has shape"):
        sface_maps([frames[0], frames[1][:10]], [None, None])


def test_normalize_clip():
    x = np.zeros((2, 1, 2, 1), np.uint8)
    x[0, 0] = [[10], [20]]
    x[1, 0] = [[20], [30]]  # min-max over the whole clip: frame 0 tops out at 0.5, not 1
    expected = np.array([0.0, 0.5, 0.5, 1.0], np.float32).reshape(x.shape)
    out = normalize_frames(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_allclose(normalize_frames(x / 255.0), expected, atol=1e-6)  # float input in [0, 1]
    black = normalize_frames(np.zeros((3, 4, 4, 3), np.uint8))
    assert black.shape == (3, 4, 4, 3) and not black.any() and np.isfinite(black).all()
    with pytest.raises(ValueError, match="T, H, W, C"):
        normalize_frames(np.zeros((4, 4, 3)))


def test_face_condition_channel_order():
    local, glob = np.ones((2, 4, 4, 3), np.float32), np.full((2, 4, 4, 3), 2.0, np.float32)
    cond = face_condition(local, glob)
    assert cond.shape == (2, 4, 4, 6)
    assert (cond[..., :3] == 1).all() and (cond[..., 3:] == 2).all()
    with pytest.raises(ValueError, match="differ in shape"):
        face_condition(local, glob[:1])


# ------------------------------------------------------------------------------------------------------
# Extractors
# ------------------------------------------------------------------------------------------------------


def test_resampling_matches_opencv_geometry():
    # cv2.resize([[0, 100]], (4, 1), INTER_LINEAR) == [0, 25, 75, 100] (half-pixel centres, edge clamp).
    row = np.array([[[0], [100]]], np.uint8)
    np.testing.assert_array_equal(ex.resize_bilinear(row, 4, 1)[0, :, 0], [0, 25, 75, 100])
    img = np.arange(1, 13, dtype=np.uint8).reshape(3, 4, 1)
    # Integer translation by (+2, +1): out[y, x] = img[y - 1, x - 2], zero outside (BORDER_CONSTANT).
    out = ex.warp_affine_bilinear(img, np.array([[1.0, 0, 2], [0, 1.0, 1]]), 4, 3)
    expected = np.zeros_like(img)
    expected[1:, 2:] = img[:2, :2]
    np.testing.assert_array_equal(out, expected)
    # Half-pixel shift averages neighbours: (1 + 2) / 2 = 1.5 -> rint 2; (2 + 3) / 2 = 2.5 -> 2 (half-even).
    half = ex.warp_affine_bilinear(img, np.array([[1.0, 0, -0.5], [0, 1.0, 0]]), 3, 1)
    np.testing.assert_array_equal(half[0, :, 0], [2, 2, 4])


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


def test_wholebody_to_pose_frame(monkeypatch):
    # A stand-in for pose.py's PoseFrame (written separately) checks the slicing into body and hands.
    @dataclasses.dataclass
    class PoseFrame:
        body: np.ndarray
        body_scores: np.ndarray
        hands: np.ndarray
        hand_scores: np.ndarray

    monkeypatch.setitem(
        sys.modules, "xdyna_jax.conditioning.pose", types.SimpleNamespace(PoseFrame=PoseFrame)
    )
    kp = np.arange(134 * 2, dtype=np.float64).reshape(134, 2)
    pf = ex.wholebody_to_pose_frame(kp, np.arange(134) / 134)
    assert pf.body.shape == (18, 2) and pf.hands.shape == (2, 21, 2) and pf.hand_scores.shape == (2, 21)
    np.testing.assert_array_equal(pf.body[17], kp[17])
    np.testing.assert_array_equal(pf.hands[0, 0], kp[92])  # left hand first
    np.testing.assert_array_equal(pf.hands[1, 20], kp[133])
    assert pf.body_scores[3] == np.float32(3 / 134) and pf.hand_scores[1, 0] == np.float32(113 / 134)
