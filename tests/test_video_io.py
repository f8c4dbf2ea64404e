"""Media I/O: mp4 round trip at the given fps and size, atomic writes, one clear error per unreadable file,
and the driving inputs (skeleton video, OpenPose JSON, keypoint .npy, face maps) read at a stride."""

import numpy as np
import pytest

from xdyna_jax.conditioning.pose import PoseFrame, draw_poses, write_openpose_json
from xdyna_jax.io import driving
from xdyna_jax.io.video import MediaError, read_image, read_video, video_fps, write_video


def frames(n=5, h=24, w=16, seed=0):
    # smooth frames survive H.264 nearly unchanged; the frame index is the brightness, to check order
    y, x = np.mgrid[:h, :w]
    base = np.stack([x * 255 // w, y * 255 // h, np.zeros_like(x)], axis=-1)
    return np.stack([np.clip(base + 30 * i, 0, 255) for i in range(n)]).astype(np.uint8)


def test_mp4_round_trip_keeps_count_size_fps_and_stride(tmp_path):
    video = frames(6)
    path = write_video(tmp_path / "a.mp4", video, fps=7.5)
    back, fps = read_video(path)
    assert back.shape == video.shape and fps == pytest.approx(7.5) and video_fps(path) == pytest.approx(7.5)
    assert np.abs(back.astype(int) - video).mean() < 4  # lossy, but close
    strided, _ = read_video(path, stride=2, limit=2)
    np.testing.assert_array_equal(strided, back[[0, 2]])
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]  # no temporary file left


def test_failed_write_leaves_neither_the_target_nor_a_temporary(tmp_path, monkeypatch):
    from imageio.plugins.ffmpeg import FfmpegFormat

    original = FfmpegFormat.Writer._append_data
    written = []

    def fail_on_second_frame(self, im, meta):
        if written:
            raise RuntimeError("disk full")
        written.append(original(self, im, meta))

    monkeypatch.setattr(FfmpegFormat.Writer, "_append_data", fail_on_second_frame)
    with pytest.raises(RuntimeError, match="disk full"):
        write_video(tmp_path / "b.mp4", frames(3), fps=10)
    assert written and list(tmp_path.iterdir()) == []


def test_unreadable_media_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "bad.mp4").write_bytes(b"")
    with pytest.raises(MediaError, match="no such image file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="bad.png: cannot read as an image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(MediaError, match="bad.mp4: "):
        read_video(tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match="even frame sizes"):
        write_video(tmp_path / "c.mp4", frames(2, h=23), fps=10)


def test_grey_and_rgba_images_read_as_rgb(tmp_path):
    import imageio.v2 as imageio

    rgba = np.random.default_rng(0).integers(0, 256, (9, 7, 4), dtype=np.uint8)
    imageio.imwrite(tmp_path / "a.png", rgba)
    imageio.imwrite(tmp_path / "g.png", rgba[..., 0])
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), np.repeat(rgba[..., :1], 3, axis=2))


def _poses(n):
    rng = np.random.default_rng(1)
    return [PoseFrame(rng.uniform(2, 14, (18, 2)), np.ones(18)) for _ in range(n)]


def test_pose_sources_json_folder_npy_and_video_agree(tmp_path):
    poses = _poses(5)
    (tmp_path / "json").mkdir()
    for i, p in enumerate(poses):
        write_openpose_json(p, tmp_path / "json" / f"clip_{i:012d}_keypoints.json")
    expected = draw_poses(poses[::2], 24, 16, draw_head=False)
    from_json, fps = driving.read_pose_source(tmp_path / "json", 24, 16, stride=2)
    assert fps is None
    np.testing.assert_array_equal(from_json, expected)
    body = np.stack([np.concatenate([p.body, p.body_scores[:, None]], 1) for p in poses])
    np.save(tmp_path / "kps.npy", body)
    from_npy, _ = driving.read_pose_source(tmp_path / "kps.npy", 24, 16, stride=2, limit=2)
    np.testing.assert_array_equal(from_npy, expected[:2])
    # a skeleton video at another size is resized to the output size
    write_video(tmp_path / "pose.mp4", frames(4, h=48, w=32), fps=8)
    from_video, fps = driving.read_pose_source(tmp_path / "pose.mp4", 24, 16, stride=3)
    assert from_video.shape == (2, 24, 16, 3) and fps == pytest.approx(8)
    np.save(tmp_path / "bad.npy", np.zeros((3, 17, 3)))
    with pytest.raises(MediaError, match=r"bad.npy: keypoints must be \(T, 134, 3\)"):
        driving.read_pose_source(tmp_path / "bad.npy", 24, 16)


def test_face_maps_crop_like_the_release_and_map_given_landmarks(tmp_path):
    # too tall for 24:16: rows from a quarter of the excess: crop 30 of 40 rows from row 2
    assert driving.crop_box((40, 20), 24, 16) == (0, 2, 20, 30)
    assert driving.crop_box((20, 40), 24, 16) == (13, 0, 13, 20)  # too wide: centre columns
    write_video(tmp_path / "face.mp4", frames(4, h=48, w=32), fps=8)
    rng = np.random.default_rng(2)
    landmarks = rng.uniform(10, 22, (4, 68, 2))  # video pixels of the 48x32 frames
    landmarks[1] = np.nan  # no face in frame 1: frame 2 (stride 2 keeps 0, 2) still has one
    local, glob = driving.read_face_maps(tmp_path / "face.mp4", landmarks, 24, 16, stride=2)
    assert local.shape == glob.shape == (2, 24, 16, 3) and local.dtype == np.uint8
    # the same maps as the landmarks an extractor finds on the cropped, resized frames (here: mapped)
    crop = iter((landmarks[::2] + 0.5) * 0.5 - 0.5)  # 48x32 is 24:16 already: no crop, scale 1/2
    local2, glob2 = driving.read_face_maps(tmp_path / "face.mp4", lambda f: next(crop), 24, 16, stride=2)
    np.testing.assert_array_equal(local, local2)
    np.testing.assert_array_equal(glob, glob2)
    with pytest.raises(MediaError, match="4 driving frames but 3 landmark frames"):
        driving.read_face_maps(tmp_path / "face.mp4", landmarks[:3], 24, 16)
