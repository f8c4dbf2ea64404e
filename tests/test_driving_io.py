"""Driving and reference keypoints onto the output canvas: points land where cv2.resize moves their pixel,
DWPose keypoints of a raw video are found in its own pixels and drawn on the canvas, alignment to the
reference person is `align_poses` on canvas pixels, and keypoint files read as pixels or fractions alike."""

import cv2
import numpy as np
import pytest
from oracle import FakeDWPose, standing_pose

from xdyna_jax.conditioning.pose import align_poses, draw_poses, to_arrays, write_openpose_json
from xdyna_jax.io.driving import (
    crop_box,
    points_to_canvas,
    pose_to_canvas,
    read_driving_keypoints,
    read_pose_source,
    read_reference_pose,
    reference_crop_box,
    reference_keypoints,
)
from xdyna_jax.io.video import MediaError, read_video, write_video
from xdyna_jax.sampling.xdyna import crop_and_resize

H, W = 48, 32


def test_reference_crop_box_is_the_pipelines_crop():
    rng = np.random.default_rng(0)
    for hw in [(61, 30), (37, 23), (20, 50)]:  # too tall (odd excess), too tall, too wide
        image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        x0, y0, cw, ch = reference_crop_box(hw, H, W)
        resized = cv2.resize(image[y0 : y0 + ch, x0 : x0 + cw], (W, H), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(crop_and_resize(image, H, W), resized)


@pytest.mark.parametrize("box_of", [crop_box, reference_crop_box])
@pytest.mark.parametrize("hw", [(61, 30), (30, 61), (96, 64), (100, 45)])
def test_points_land_where_cv2_resize_moves_their_pixel(box_of, hw):
    # channels 0, 1 of the image hold each pixel's own x, y: bilinear resizing of this linear ramp writes
    # into every canvas pixel the source position its centre samples (away from the clamped border)
    y, x = np.mgrid[: hw[0], : hw[1]].astype(np.float32)
    image = np.stack([x, y, np.zeros_like(x)], -1)
    box = x0, y0, cw, ch = box_of(hw, H, W)
    canvas = cv2.resize(image[y0 : y0 + ch, x0 : x0 + cw], (W, H), interpolation=cv2.INTER_LINEAR)
    v, u = np.mgrid[2 : H - 2, 2 : W - 2]
    np.testing.assert_allclose(
        points_to_canvas(canvas[2:-2, 2:-2, :2], box, H, W), np.stack([u, v], -1), atol=1e-3
    )


def test_reference_keypoints_follow_the_photos_crop(tmp_path):
    photo = np.zeros((60, 30, 3), np.uint8)  # too tall for 32:48: rows 7..52 kept, 30 x 45 -> 32 x 48
    pose = standing_pose((60, 30))
    pose.body[1] = 15, 20  # the neck
    write_openpose_json(pose, tmp_path / "ref.json")
    neck = reference_keypoints(photo, H, W, pose_file=tmp_path / "ref.json").body[1]
    np.testing.assert_allclose(neck, [(15 + 0.5) * 32 / 30 - 0.5, (20 - 7 + 0.5) * 48 / 45 - 0.5])
    found = reference_keypoints(photo, H, W, extractor=FakeDWPose())
    np.testing.assert_allclose(found.body[0], points_to_canvas([15, 9], (0, 7, 30, 45), H, W))


def test_raw_video_keypoints_are_found_in_its_pixels_and_drawn_on_the_canvas(tmp_path):
    frames = np.stack([np.full((40, 32, 3), 40 * i, np.uint8) for i in range(5)])
    write_video(tmp_path / "dance.mp4", frames, fps=10)
    extractor = FakeDWPose()
    skeletons, fps = read_pose_source(tmp_path / "dance.mp4", H, W, stride=2, limit=2, extractor=extractor)
    decoded = read_video(tmp_path / "dance.mp4", stride=2, limit=2)[0]
    assert fps == 10 and len(extractor.frames) == 2
    np.testing.assert_array_equal(np.stack(extractor.frames), decoded)  # the raw frames, uncropped
    box = crop_box((40, 32), H, W)  # too wide: the centre 26 of 32 columns
    expected = [pose_to_canvas(FakeDWPose()(f), (40, 32), box, H, W) for f in decoded]
    np.testing.assert_array_equal(skeletons, draw_poses(expected, H, W, draw_head=False))
    assert not np.array_equal(skeletons[0], skeletons[1])  # the wrist moved
    with pytest.raises(MediaError, match="holds no keypoints"):
        read_driving_keypoints(tmp_path / "dance.mp4", H, W)
    with pytest.raises(MediaError, match="skeleton video holds no keypoints to align"):
        read_pose_source(tmp_path / "dance.mp4", H, W, align_to=expected[0])


@pytest.mark.parametrize("method", ["limbs", "global"])
def test_alignment_is_align_poses_on_canvas_pixels(tmp_path, method):
    driving = [standing_pose((H, W), raise_right_wrist=0.05 * i) for i in range(3)]
    body = to_arrays(driving)[0]
    np.save(tmp_path / "driving.npy", body)
    photo = np.zeros((80, 70, 3), np.uint8)
    reference = standing_pose((80, 70))
    reference.body[8:14, 1] += 6  # longer legs
    np.save(tmp_path / "ref.npy", to_arrays([reference])[0][0])  # one frame, (18, 3)
    target = reference_keypoints(photo, H, W, pose_file=tmp_path / "ref.npy")
    aligned, _ = read_pose_source(tmp_path / "driving.npy", H, W, align_to=target, align_method=method)
    expected = draw_poses(align_poses(driving, target, method=method), H, W, draw_head=False)
    np.testing.assert_array_equal(aligned, expected)
    assert not np.array_equal(aligned, read_pose_source(tmp_path / "driving.npy", H, W)[0])


def test_reference_pose_files_in_every_layout_agree(tmp_path):
    pose = standing_pose((80, 70))
    write_openpose_json(pose, tmp_path / "ref.json")
    body = to_arrays([pose])[0][0]
    whole = np.zeros((134, 3))
    whole[:18] = body
    layouts = {"18.npy": body, "1x18.npy": body[None], "134.npy": whole, "1x134.npy": whole[None]}
    for name, points in layouts.items():
        np.save(tmp_path / name, points)
    for name in ["ref.json", *layouts]:
        np.testing.assert_allclose(read_reference_pose(tmp_path / name).body, pose.body, err_msg=name)
    np.save(tmp_path / "two.npy", np.stack([body, body]))
    with pytest.raises(MediaError, match=r"two.npy: reference keypoints must be one frame.*got \(2, 18, 3\)"):
        read_reference_pose(tmp_path / "two.npy")
    with pytest.raises(MediaError, match="must be an OpenPose .json or a keypoint .npy"):
        read_reference_pose(tmp_path / "ref.png")


def test_keypoint_files_in_fractions_draw_like_pixels(tmp_path):
    pixels = standing_pose((H, W))
    fractions = pixels.to_normalized(H, W)
    fractions.body[3], fractions.body_scores[3] = -1, 0.0  # DWPose marks a missing point with -1
    pixels.body_scores[3] = 0.0
    expected = draw_poses([pixels], H, W, draw_head=False)
    np.save(tmp_path / "fractions.npy", to_arrays([fractions])[0])
    (tmp_path / "json").mkdir()
    write_openpose_json(fractions, tmp_path / "json" / "clip_000000000000_keypoints.json")
    for source in [tmp_path / "fractions.npy", tmp_path / "json"]:
        np.testing.assert_array_equal(read_pose_source(source, H, W)[0], expected, err_msg=str(source))
