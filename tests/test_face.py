"""S-Face maps (face.py) on synthetic landmarks.

Expected values are worked out by hand from the release's formulas (see face.py's docstring), not by
calling the code under test a second time.
"""

import numpy as np
import pytest

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


def test_normalize_frames():
    x = np.zeros((2, 1, 2, 1), np.uint8)
    x[0, 0] = [[10], [20]]
    x[1, 0] = [[20], [30]]  # min-max over the whole window: frame 0 tops out at 0.5, not 1
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
