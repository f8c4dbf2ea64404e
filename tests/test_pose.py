"""Pose skeletons: rendering against the annotator's OpenCV drawing and hand-computed pixels, readers, and
driving-pose alignment."""

import colorsys
import dataclasses
import json
import math

import cv2
import numpy as np
import pytest

from xdyna_jax.conditioning.pose import (
    LIMBS,
    PoseFrame,
    align_global,
    align_limbs,
    align_poses,
    draw_pose,
    from_arrays,
    from_dwpose,
    limb_ratios,
    read_openpose_folder,
    read_openpose_json,
    resolve_stick_scale,
    to_arrays,
    write_openpose_json,
)

BLACK = (0, 0, 0)


def frame_with(points: dict, hands: dict | None = None) -> PoseFrame:
    """Frame with the given body joints {index: (x, y)} at score 1, everything else missing."""
    frame = PoseFrame.empty()
    for j, xy in points.items():
        frame.body[j], frame.body_scores[j] = xy, 1.0
    for (side, k), xy in (hands or {}).items():
        frame.hands[side, k], frame.hand_scores[side, k] = xy, 1.0
    return frame


def px(image, x, y):
    return tuple(int(v) for v in image[y, x])


# ------------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------------


def test_two_joint_limb_and_joint_colours():
    # neck (1) -> right shoulder (2) is limbSeq [2, 3] (1-based) = limb 0, colour [255, 0, 0] at 0.6.
    image = draw_pose(frame_with({1: (100, 100), 2: (60, 100)}), 200, 200)
    assert image.shape == (200, 200, 3) and image.dtype == np.uint8
    assert px(image, 80, 100) == (153, 0, 0)  # limb midpoint
    assert px(image, 80, 104) == (153, 0, 0) and px(image, 80, 105) == BLACK  # half-width 4
    assert px(image, 100, 100) == (255, 85, 0)  # neck = joint 1 colour, full strength
    assert px(image, 60, 100) == (255, 170, 0)  # right shoulder = joint 2 colour
    ys, xs = np.nonzero(image.any(-1))
    assert xs.min() >= 56 and xs.max() <= 104 and ys.min() >= 96 and ys.max() <= 104  # nothing else drawn


HEAD = {0: (100, 60), 1: (100, 100), 14: (90, 50), 15: (110, 50), 16: (80, 55), 17: (120, 55)}


def test_head_skeleton_only_when_asked():
    off = draw_pose(frame_with(HEAD), 200, 200)  # X-Dyna default: no head skeleton
    assert px(off, 100, 80) == (0, 0, 153)  # neck-nose limb (limb 12, [0, 0, 255] * 0.6) is kept
    assert px(off, 100, 60) == (255, 0, 0)  # nose joint kept
    for x, y in [(90, 50), (110, 50), (80, 55), (120, 55), (95, 55)]:  # eyes, ears, nose-eye limb
        assert px(off, x, y) == BLACK

    on = draw_pose(frame_with(HEAD), 200, 200, draw_head=True)
    assert px(on, 90, 50) == (170, 0, 255)  # right eye = joint 14
    assert px(on, 80, 55) == (255, 0, 170)  # right ear = joint 16
    assert px(on, 95, 55) == (51, 0, 153)  # nose-right eye = limb 13, [85, 0, 255] * 0.6


def test_hands_drawn_and_switched_off():
    # Left hand points 0 and 5: edge (0, 5) is edge 4, hue 4/20 -> hsv_to_rgb = (0.8, 1, 0) * 255.
    frame = frame_with({}, hands={(0, 0): (40, 150), (0, 5): (80, 150)})
    image = draw_pose(frame, 200, 200)
    assert px(image, 60, 150) == (204, 255, 0)
    assert px(image, 60, 149) == px(image, 60, 151) == (204, 255, 0) and px(image, 60, 153) == BLACK  # 2 px
    assert px(image, 40, 150) == px(image, 80, 150) == (0, 0, 255)  # keypoint dots, the annotator's tuple
    assert px(image, 84, 150) == (0, 0, 255) and px(image, 85, 150) == BLACK  # dot radius 4
    assert not draw_pose(frame, 200, 200, draw_hands=False).any()


@pytest.mark.parametrize("missing", ["low_score", "nan"])
def test_missing_joint_draws_nothing(missing):
    frame = frame_with({1: (100, 100), 2: (60, 100)})
    if missing == "low_score":
        frame.body_scores[2] = 0.2
    else:
        frame.body[2] = np.nan
    image = draw_pose(frame, 200, 200)
    assert px(image, 80, 100) == BLACK and px(image, 60, 100) == BLACK
    assert px(image, 100, 100) == (255, 85, 0)  # the neck itself still drawn
    frame.hands[1, :2], frame.hand_scores[1, :2] = [(20, 20), (40, 20)], [0.2, 1.0]
    image = draw_pose(frame, 200, 200)
    assert not image[15:26, 15:35].any()  # low-score hand point: no dot, no edge to it
    assert px(image, 40, 20) == (0, 0, 255)  # its visible neighbour keeps its dot


def test_non_square_resolution_and_normalised_input():
    frame = frame_with({1: (500, 880), 2: (400, 880)})
    image = draw_pose(frame, 896, 512)
    assert image.shape == (896, 512, 3) and image.dtype == np.uint8
    assert px(image, 500, 880) == (255, 85, 0) and px(image, 450, 880) == (153, 0, 0)
    norm = draw_pose(frame.to_normalized(896, 512), 896, 512)
    assert np.array_equal(norm, image)


def test_stick_scale_doubles_widths():
    frame = frame_with({1: (100, 100), 2: (40, 100)})
    column = lambda image: int(image[:, 70].any(-1).sum())  # limb thickness at the midpoint
    one, two = draw_pose(frame, 200, 200), draw_pose(frame, 200, 200, stick_scale=2.0)
    assert column(one) == 2 * 4 + 1 and column(two) == 2 * 8 + 1
    assert px(one, 107, 100) == BLACK and px(two, 107, 100) == (255, 85, 0)  # joint radius 4 -> 8
    assert resolve_stick_scale("auto", 1024, 512) == 2.0


# The DWPose annotator's tables: limb pairs (1-based joint numbers; it draws the first 17) and colours.
ANNOTATOR_LIMBS = [
    [2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
    [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18],
]  # fmt: skip
ANNOTATOR_COLORS = [
    [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
    [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
    [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85],
]  # fmt: skip
ANNOTATOR_HAND_EDGES = [
    [0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [5, 6], [6, 7], [7, 8], [0, 9], [9, 10], [10, 11], [11, 12],
    [0, 13], [13, 14], [14, 15], [15, 16], [0, 17], [17, 18], [18, 19], [19, 20],
]  # fmt: skip


def annotator_drawing(kps, scores, height, width, *, head, hands, face):
    """DWPose's detector post-processing and drawing, redone here with cv2 from the annotator's rules.

    kps (134, 2) pixels and scores (134,) in DWPose's whole-body layout. The detector normalises by W, H,
    keeps a body joint when its score > 0.3 and marks any other point scoring < 0.3 with -1; the drawing
    multiplies back by W, H and truncates. Without the head skeleton the eyes and ears count as missing.
    """
    cand = kps / [float(width), float(height)]
    body, body_ok = cand[:18], scores[:18] > 0.3
    if not head:
        body_ok[14:18] = False
    others = np.where((scores < 0.3)[:, None], -1.0, cand)
    canvas = np.zeros((height, width, 3), np.uint8)
    for i in range(17):
        j, k = ANNOTATOR_LIMBS[i][0] - 1, ANNOTATOR_LIMBS[i][1] - 1
        if not (body_ok[j] and body_ok[k]):
            continue
        xs, ys = body[[j, k], 0] * float(width), body[[j, k], 1] * float(height)
        length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        poly = cv2.ellipse2Poly(
            (int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), 4), int(angle), 0, 360, 1
        )
        cv2.fillConvexPoly(canvas, poly, ANNOTATOR_COLORS[i])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(18):
        if body_ok[i]:
            center = (int(body[i, 0] * width), int(body[i, 1] * height))
            cv2.circle(canvas, center, 4, ANNOTATOR_COLORS[i], thickness=-1)
    to_px = lambda p: (int(p[0] * width), int(p[1] * height))
    shown = lambda q: q[0] > 0.01 and q[1] > 0.01
    for peaks in [others[92:113], others[113:134]] if hands else []:
        for e, (a, b) in enumerate(ANNOTATOR_HAND_EDGES):
            p, q = to_px(peaks[a]), to_px(peaks[b])
            if shown(p) and shown(q):
                color = np.array(colorsys.hsv_to_rgb(e / 20.0, 1.0, 1.0)) * 255
                cv2.line(canvas, p, q, color.tolist(), thickness=2)
        for p in map(to_px, peaks):
            if shown(p):
                cv2.circle(canvas, p, 4, (0, 0, 255), thickness=-1)
    for p in map(to_px, others[24:92]) if face else []:
        if shown(p):
            cv2.circle(canvas, p, 3, (255, 255, 255), thickness=-1)
    return canvas


def random_wholebody(seed, height, width):
    """134 keypoints spread over (and a little beyond) the frame, a third of them scoring below 0.3."""
    rng = np.random.default_rng(seed)
    kps = rng.uniform(-8, 8, (134, 2)) + rng.uniform(0, 1, (134, 2)) * [width, height]
    hand_roots = kps[[7, 4]]  # hands near the wrists, so the edges are short as in real poses
    kps[92:113] = hand_roots[0] + rng.normal(0, 12, (21, 2))
    kps[113:134] = hand_roots[1] + rng.normal(0, 12, (21, 2))
    kps[24:92] = kps[0] + rng.normal(0, 10, (68, 2))
    scores = rng.uniform(0, 1, 134)
    scores[:5] = 0.9  # nose, neck, right arm always drawn
    return kps, scores


@pytest.mark.parametrize(
    "seed, head, hands, face",
    [(0, False, True, False), (1, True, True, True), (2, True, False, True), (3, False, True, True)],
)
def test_pose_image_equals_annotator_drawing(seed, head, hands, face):
    height, width = 160, 128  # not square: x scales by W, y by H
    kps, scores = random_wholebody(seed, height, width)
    expected = annotator_drawing(kps, scores, height, width, head=head, hands=hands, face=face)
    stack = lambda idx: np.concatenate([kps[idx], scores[idx, None]], -1)
    (frame,) = from_arrays(
        stack(slice(0, 18))[None],
        np.stack([stack(slice(92, 113)), stack(slice(113, 134))])[None],
        stack(slice(24, 92))[None],
    )
    got = draw_pose(frame, height, width, draw_head=head, draw_hands=hands, draw_face=face)
    assert got.dtype == np.uint8 and got.shape == (height, width, 3)
    assert (expected > 0).any(-1).sum() > 1000  # a substantial drawing, not two black images
    np.testing.assert_array_equal(got, expected)
    # The same person in normalised coordinates draws the same image.
    normalized = draw_pose(frame.to_normalized(height, width), height, width, draw_head=head,
                           draw_hands=hands, draw_face=face)  # fmt: skip
    np.testing.assert_array_equal(normalized, expected)


# ------------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------------


def reference_frame() -> PoseFrame:
    body = np.array(
        [[256, 150], [256, 200], [216, 200], [206, 270], [200, 330], [296, 200], [306, 270], [312, 330],
         [236, 340], [234, 440], [232, 540], [276, 340], [278, 440], [280, 540], [248, 142], [264, 142],
         [240, 148], [272, 148]], np.float64,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    hands = np.stack([body[7] + rng.uniform(-15, 15, (21, 2)), body[4] + rng.uniform(-15, 15, (21, 2))])
    hands[:, 0] = body[[7, 4]]  # hand root on the wrist
    face = body[0] + rng.uniform(-10, 10, (68, 2))
    return PoseFrame(
        body, np.full(18, 0.9), hands, np.full((2, 21), 0.8), face=face, face_scores=np.full(68, 0.7)
    )


def openpose_entry(frame: PoseFrame, body25: bool = False) -> dict:
    rows = np.concatenate([frame.body, frame.body_scores[:, None]], 1)
    if body25:  # insert MidHip at 8 and six foot points at 19..24
        rows = np.concatenate([rows[:8], [[1, 2, 0.5]], rows[8:], np.full((6, 3), 7.0)])
    hand = np.concatenate([frame.hands[0], frame.hand_scores[0][:, None]], 1)
    face = np.concatenate([frame.face, frame.face_scores[:, None]], 1)
    face = np.concatenate([face, [[5, 5, 0.5], [6, 6, 0.5]]])  # OpenPose's 70 points end with the pupils
    return {
        "person_id": [-1],
        "pose_keypoints_2d": rows.reshape(-1).tolist(),
        "hand_left_keypoints_2d": hand.reshape(-1).tolist(),
        "hand_right_keypoints_2d": [],
        "face_keypoints_2d": face.reshape(-1).tolist(),
    }


@pytest.mark.parametrize("body25", [False, True])
def test_read_openpose_json(tmp_path, body25):
    ref = reference_frame()
    ref.body[3], ref.body_scores[3] = 0.0, 0.0  # OpenPose writes a missing joint as 0, 0, 0
    path = tmp_path / "f_keypoints.json"
    path.write_text(json.dumps({"version": 1.3, "people": [openpose_entry(ref, body25)]}))
    got = read_openpose_json(path)
    np.testing.assert_allclose(got.body, ref.body)
    np.testing.assert_allclose(got.body_scores, ref.body_scores)
    assert not got.body_visible()[3]
    np.testing.assert_allclose(got.hands[0], ref.hands[0])
    assert not got.hands_visible().any(-1)[1]  # empty right hand = missing
    np.testing.assert_allclose(got.face, ref.face)
    np.testing.assert_allclose(got.face_scores, ref.face_scores)


def test_openpose_folder_order_and_round_trip(tmp_path):
    ref = reference_frame()
    for n in (10, 2, 1):  # unpadded numbers: lexicographic order would be wrong
        frame = dataclasses.replace(ref, body=ref.body + [n, 0])
        write_openpose_json(frame, tmp_path / f"clip_{n}_keypoints.json")
    frames = read_openpose_folder(tmp_path)
    assert [f.body[1, 0] - 256 for f in frames] == [1, 2, 10]
    np.testing.assert_allclose(frames[0].hands, ref.hands + [0, 0])
    np.testing.assert_allclose(frames[0].face, ref.face)
    (tmp_path / "clip_0_keypoints.json").write_text('{"people": []}')  # nobody detected: empty frame
    assert not read_openpose_folder(tmp_path)[0].body_visible().any()
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(ValueError, match="notes.json: no frame number"):
        read_openpose_folder(tmp_path)


def test_malformed_openpose_files_name_the_file(tmp_path):
    bad = tmp_path / "bad_0.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad_0.json.*not valid JSON"):
        read_openpose_json(bad)
    short = tmp_path / "short_1.json"
    short.write_text(json.dumps({"people": [{"pose_keypoints_2d": [0.0] * 57}]}))
    with pytest.raises(ValueError, match="short_1.json.*54 .*75"):
        read_openpose_json(short)
    with pytest.raises(ValueError, match="no 'people'"):
        (tmp_path / "x_2.json").write_text("[1, 2]")
        read_openpose_json(tmp_path / "x_2.json")


def test_array_and_dwpose_constructors():
    ref = reference_frame()
    body, hands, face = to_arrays([ref, ref])
    frames = from_arrays(body, hands, face)
    assert len(frames) == 2 and np.array_equal(frames[1].hands, ref.hands)
    np.testing.assert_array_equal(frames[0].face, ref.face)
    assert not from_arrays(body, hands)[0].face_visible().any()  # no face given: all missing
    with pytest.raises(ValueError, match=r"\(T, 18, 3\)"):
        from_arrays(body[:, :17])
    with pytest.raises(ValueError, match="PoseFrame.body must have shape"):
        PoseFrame(np.zeros((17, 2)), np.zeros(17))

    # DWPose annotator dict, 2 people; person 1 has joint 5 missing and its right hand missing.
    candidate = np.random.default_rng(1).uniform(0, 1, (36, 2))
    subset = np.arange(36, dtype=np.float64).reshape(2, 18)
    subset[1, 5] = -1
    dw_hands = np.random.default_rng(2).uniform(0, 1, (4, 21, 2))
    dw_hands[3] = -1  # right hand of person 1
    dw_faces = np.random.default_rng(3).uniform(0, 1, (2, 68, 2))
    dw_faces[1, 10] = -1
    frame = from_dwpose(candidate, subset, dw_hands, dw_faces, person=1)
    assert frame.normalized and not frame.body_visible()[5] and frame.body_visible().sum() == 17
    np.testing.assert_allclose(frame.body[0], candidate[18])
    np.testing.assert_allclose(frame.hands[0], dw_hands[1])
    assert not frame.hands_visible()[1].any()
    assert frame.face_visible().sum() == 67 and np.array_equal(frame.face[11], dw_faces[1, 11])
    with pytest.raises(ValueError, match=r"faces must have shape \(2, 68, 2\)"):
        from_dwpose(candidate, subset, faces=dw_faces[:1])


# ------------------------------------------------------------------------------------------------------
# Alignment
# ------------------------------------------------------------------------------------------------------

GROUP_SCALE = {
    "shoulder": 1.1,
    "upper_arm": 1.4,
    "lower_arm": 0.8,
    "torso": 1.2,
    "upper_leg": 0.9,
    "lower_leg": 1.3,
}
LIMB_GROUP = {
    (1, 2): "shoulder", (1, 5): "shoulder", (2, 3): "upper_arm", (5, 6): "upper_arm", (3, 4): "lower_arm",
    (6, 7): "lower_arm", (1, 8): "torso", (1, 11): "torso", (8, 9): "upper_leg", (11, 12): "upper_leg",
    (9, 10): "lower_leg", (12, 13): "lower_leg",
}  # fmt: skip


def reshape_person(frame: PoseFrame, scales: dict, s: float, shift) -> PoseFrame:
    """Another body: each bone group scaled by scales[group] (head: 1), then the whole body by s, moved."""
    body = frame.body.copy()
    for parent, child in LIMBS:  # parents first
        k = scales.get(LIMB_GROUP.get((parent, child)), 1.0)
        body[child] = body[parent] + k * (frame.body[child] - frame.body[parent])
    hands = frame.hands.copy()
    for i, wrist in enumerate((7, 4)):
        hands[i] = body[wrist] + scales.get("lower_arm", 1.0) * (frame.hands[i] - frame.body[wrist])
    face = body[0] + (frame.face - frame.body[0])  # the head keeps its size
    return PoseFrame(
        body, frame.body_scores, hands, frame.hand_scores, face=face, face_scores=frame.face_scores
    ).map_points(lambda p: p * s + shift)


def rotate_forearm(frame: PoseFrame, degrees: float) -> PoseFrame:
    """Rotate the right forearm and right hand about the elbow (motion that keeps bone lengths)."""
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    rot = lambda p: frame.body[3] + (p - frame.body[3]) @ np.array([[c, s], [-s, c]])
    body, hands = frame.body.copy(), frame.hands.copy()
    body[4], hands[1] = rot(body[4]), rot(hands[1])
    return PoseFrame(
        body, frame.body_scores, hands, frame.hand_scores, face=frame.face, face_scores=frame.face_scores
    )


def bone_lengths(frame: PoseFrame) -> np.ndarray:
    return np.array([np.linalg.norm(frame.body[a] - frame.body[b]) for a, b in LIMBS])


def test_align_global_recovers_scaled_shifted_reference():
    ref = reference_frame()
    anchor = reshape_person(ref, {}, 1.3, (40.0, -25.0))
    driving = [anchor] + [rotate_forearm(anchor, 20 * t) for t in (1, 2)]
    driving[2] = PoseFrame(driving[2].body + [15, 5], anchor.body_scores, driving[2].hands + [15, 5])
    out = align_global(driving, ref)
    np.testing.assert_allclose(out[0].body, ref.body, atol=1.0)
    np.testing.assert_allclose(out[0].hands, ref.hands, atol=1.0)
    np.testing.assert_allclose(out[0].face, ref.face, atol=1.0)
    for t in (1, 2):  # motion relative to the anchor is kept, at the reference's scale
        np.testing.assert_allclose(
            out[t].body - out[0].body, (driving[t].body - anchor.body) / 1.3, atol=1e-6
        )
    assert align_poses(driving, ref, method="global")[2].body.tolist() == out[2].body.tolist()


def test_align_global_places_neck_and_feet():
    ref = reference_frame()
    long_legs = reshape_person(ref, {"lower_leg": 1.5}, 0.7, (10.0, 30.0))
    aligned = align_global([long_legs], ref)[0]
    assert abs(aligned.body[1, 0] - ref.body[1, 0]) < 1e-6  # neck x on the reference's neck
    assert abs(aligned.body[[10, 13], 1].max() - ref.body[[10, 13], 1].max()) < 1e-6  # feet on its ground
    no_feet = PoseFrame(long_legs.body, np.where(np.isin(np.arange(18), [10, 13]), 0.0, 0.9))
    aligned = align_global([no_feet], ref)[0]
    np.testing.assert_allclose(aligned.body[1], ref.body[1], atol=1e-6)  # without feet: the neck


def test_align_limbs_recovers_reference_proportions():
    ref = reference_frame()
    anchor = reshape_person(ref, GROUP_SCALE, 1.25, (-30.0, 20.0))
    driving = [anchor, rotate_forearm(anchor, 35.0)]
    out = align_limbs(driving, ref)
    np.testing.assert_allclose(out[0].body, ref.body, atol=1.0)
    np.testing.assert_allclose(out[0].hands, ref.hands, atol=1.0)
    np.testing.assert_allclose(out[0].face, ref.face, atol=1.0)
    np.testing.assert_allclose(bone_lengths(out[1]), bone_lengths(ref), atol=1.0)
    direction = lambda f: (f.body[4] - f.body[3]) / np.linalg.norm(f.body[4] - f.body[3])
    np.testing.assert_allclose(direction(out[1]), direction(driving[1]), atol=1e-6)  # the motion is kept
    # global alignment alone cannot fix the proportions
    assert np.abs(bone_lengths(align_global(driving, ref)[0]) - bone_lengths(ref)).max() > 5


def test_align_limbs_with_missing_joints():
    ref = reference_frame()
    anchor = reshape_person(ref, GROUP_SCALE, 1.25, (-30.0, 20.0))
    anchor.body[6], anchor.body_scores[6] = np.nan, 0.0  # left elbow lost in the driving video
    out = align_limbs([anchor], ref)[0]
    assert np.isnan(out.body[6]).all() and out.body_scores[6] == 0
    right_arm = [2, 3, 4]
    np.testing.assert_allclose(
        out.body[right_arm], ref.body[right_arm], atol=1.0
    )  # ratio from the right side
    assert np.isfinite(out.body[7]).all()  # left wrist hangs from the left shoulder

    ref_no_hips = PoseFrame(
        ref.body, np.where(np.isin(np.arange(18), [8, 11]), 0.0, 0.9), ref.hands, ref.hand_scores
    )
    full = reshape_person(ref, GROUP_SCALE, 1.25, (0.0, 0.0))
    ratios = limb_ratios(full, ref_no_hips)
    assert ratios["torso"] == ratios["base"] == ratios["upper_leg"]  # unmeasurable groups fall back to base
    np.testing.assert_allclose(ratios["upper_arm"], 1 / (1.4 * 1.25))
    out = align_limbs([full], ref_no_hips)[0]
    np.testing.assert_allclose(bone_lengths(out)[2:6], bone_lengths(ref)[2:6], atol=1.0)  # arms still exact


def test_alignment_errors():
    ref = reference_frame()
    with pytest.raises(ValueError, match="pixel coordinates"):
        align_limbs([ref.to_normalized(896, 512)], ref)
    with pytest.raises(ValueError, match="no body bone"):
        align_global([PoseFrame.empty()], ref)
    with pytest.raises(ValueError, match="anchor_frame 3 out of range"):
        align_limbs([ref], ref, anchor_frame=3)
    with pytest.raises(ValueError, match="unknown alignment method"):
        align_poses([ref], ref, method="affine")
