"""sample.py end to end on a tiny X-Dyna bundle saved to disk (random weights): the mp4 has the frames, size
and fps asked for, the same seed gives the same video, the grid is written, and each bad input stops the run
with one `error:` line, exit status 2 and no output."""

import json
import shutil
import types

import numpy as np
import pytest
from oracle import FakeDWPose, save_xdyna_folder, standing_pose, tiny_xdyna

import sample
from xdyna_jax.conditioning.pose import PoseFrame, align_poses, draw_poses, write_openpose_json
from xdyna_jax.io.video import read_image, read_video, write_video

H, W = 24, 16  # multiples of the tiny bundle's size_multiple (4)


def smooth_frames(n, h, w):
    y, x = np.mgrid[:h, :w]
    base = np.stack([x * 255 // w, y * 255 // h, np.zeros_like(x)], axis=-1)
    return np.stack([np.clip(base + 20 * i, 0, 255) for i in range(n)]).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    parts = tiny_xdyna(root)
    save_xdyna_folder(parts, root / "xdyna")
    shutil.copytree(root / "xdyna", root / "no_face", ignore=lambda d, names: ["controlnet_face"])
    import imageio.v2 as imageio

    imageio.imwrite(root / "ref.png", np.random.default_rng(0).integers(0, 256, (37, 23, 3), dtype=np.uint8))
    write_video(root / "pose.mp4", smooth_frames(7, H, W), fps=10)  # stride 2 -> 4 frames at 5 fps
    write_video(root / "face.mp4", smooth_frames(7, 32, 32), fps=10)  # cropped to 24:16, then resized
    landmarks = np.random.default_rng(1).uniform(12, 20, (7, 68, 2))
    np.save(root / "landmarks.npy", landmarks)
    np.save(root / "short_landmarks.npy", landmarks[:5])
    write_video(root / "face_short.mp4", smooth_frames(5, 32, 32), fps=10)
    body = [np.concatenate([p.body, p.body_scores[:, None]], 1) for p in [PoseFrame.empty()] * 6]
    np.save(root / "kps.npy", np.nan_to_num(np.stack(body)))
    write_openpose_json(standing_pose((37, 23)), root / "ref_pose.json")
    np.save(root / "two_ref_poses.npy", np.zeros((2, 18, 3)))
    for name in ("det.onnx", "pose.onnx"):  # never loaded: the tests stand in for onnxruntime
        (root / name).write_bytes(b"onnx")
    (root / "bad.png").write_bytes(b"not an image")
    (root / "empty.mp4").write_bytes(b"")
    (root / "other").mkdir()
    (root / "other" / "manifest.json").write_text(json.dumps({"kind": "animatediff"}))
    return root


def argv(root, out, *extra):
    return [
        "--model", str(root / "xdyna"), "--reference", str(root / "ref.png"), "--pose", str(root / "pose.mp4"),
        "--out", str(out), "--height", str(H), "--width", str(W), "--steps", "2", "--stride", "2",
        "--devices", "1", "--no-compile-cache", *extra,
    ]  # fmt: skip


def test_video_has_the_frames_size_and_fps_and_the_seed_fixes_it(files, tmp_path):
    face = ["--face", str(files / "face.mp4"), "--landmarks", str(files / "landmarks.npy")]
    out, grid, pngs = tmp_path / "a.mp4", tmp_path / "grid.mp4", tmp_path / "frames"
    run = argv(files, out, *face, "--frames", "3", "--grid", str(grid), "--frames-dir", str(pngs))
    assert sample.main(run) == 0
    video, fps = read_video(out)
    assert video.shape == (3, H, W, 3) and fps == pytest.approx(5.0)  # 10 fps source / stride 2
    grid_video, _ = read_video(grid)
    assert grid_video.shape == (3, H, 4 * W, 3)  # pose | local | global | result
    assert sample.main(argv(files, tmp_path / "b.mp4", *face, "--frames", "3")) == 0
    np.testing.assert_array_equal(video, read_video(tmp_path / "b.mp4")[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4", "frames", "grid.mp4"]
    pngs = [read_image(p) for p in sorted(pngs.iterdir())]
    # the PNGs are exact; the mp4 loses most on these noise-like frames (4:2:0 chroma)
    assert len(pngs) == 3 and np.abs(np.stack(pngs).astype(int) - video).mean() < 32


def test_eight_devices_decode_a_saved_bundles_video(files, tmp_path):
    """Loaded from disk, the VAE sits on one device while the loop leaves the latents on the 8-device mesh:
    decoding must still run (it once failed there: "incompatible devices"). That 8 devices give the frames of
    one is tests/test_xdyna_pipeline.py's."""
    window = ["--frames", "3", "--window", "2", "--overlap", "1", "--steps", "1"]
    assert sample.main([*argv(files, tmp_path / "a.mp4", *window), "--devices", "8"]) == 0
    assert read_video(tmp_path / "a.mp4")[0].shape == (3, H, W, 3)


def test_window_and_overlap_reach_the_pipeline(files, tmp_path, monkeypatch):
    """A model trained on short clips samples with its own window: --window/--overlap set the schedule (the
    schedule itself is tested in test_windows.py; here the call stands in for the pipeline)."""
    from xdyna_jax.sampling.xdyna import XDynaPipeline

    seen = []

    def stand_in(self, reference, poses, faces, *, num_frames, window, overlap, **kwargs):
        seen.append((window, overlap))
        return np.zeros((num_frames, H, W, 3), np.uint8)

    monkeypatch.setattr(XDynaPipeline, "__call__", stand_in)
    assert sample.main(argv(files, tmp_path / "a.mp4", "--frames", "4")) == 0
    assert (
        sample.main(argv(files, tmp_path / "b.mp4", "--frames", "4", "--window", "2", "--overlap", "1")) == 0
    )
    assert seen == [(16, 4), (2, 1)]
    assert read_video(tmp_path / "b.mp4")[0].shape == (4, H, W, 3)


def test_fps_is_the_sources_over_the_stride_else_15_unless_given(files, tmp_path):
    fps = lambda *extra: sample.prepare(sample.build_parser().parse_args(argv(files, "o.mp4", *extra)))[-1]
    assert fps("--fps", "12") == 12.0
    assert fps("--pose", str(files / "kps.npy")) == 15.0  # keypoints record no frame rate


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(reference="missing.png"), "--reference .*missing.png: no such file"),
        (dict(reference="bad.png"), "bad.png: cannot read as an image"),
        (dict(pose="empty.mp4"), "empty.mp4: "),
        (["--frames", "5"], "has 4 frames at stride 2; --frames asks for 5"),
        (["--frames", "0"], "--frames must be >= 1"),
        (["--window", "0"], "--window must be >= 1"),
        (["--window", "4", "--overlap", "4"], "--overlap must be >= 0 and below --window 4, got 4"),
        (["--height", "26"], "multiples of 4, got 26x16"),
        (
            dict(model="no_face", extra=["--face", "face.mp4", "--landmarks", "landmarks.npy"]),
            "no controlnet_face/",
        ),
        (["--face", "face.mp4", "--landmarks", "missing.npy"], "--landmarks .*missing.npy: no such file"),
        (["--face", "face_short.mp4", "--landmarks", "short_landmarks.npy"], "has 4 frames .* has 3"),
        (
            ["--face", "face.mp4", "--landmarks", "short_landmarks.npy"],
            "4 driving frames but 3 landmark frames at stride 2",
        ),
        (dict(model="other"), "unknown pipeline kind 'animatediff'"),
        (["--align-pose"], "needs driving keypoints, but --pose .*pose.mp4 is a rendered skeleton video"),
        (dict(pose="kps.npy", extra=["--align-pose"]), "--align-pose needs the reference's keypoints"),
        (["--reference-pose", "ref_pose.json"], "--reference-pose is an --align-pose option"),
        (["--align-method", "global"], "--align-method is an --align-pose option"),
        (["--dwpose", "missing.onnx", "pose.onnx"], "--dwpose: DWPose detector ONNX file .*missing.onnx"),
        (
            ["--dwpose", "det.onnx", "pose.onnx"],
            "--dwpose: DWPoseOnnx needs the optional package 'onnxruntime'",
        ),
        (dict(pose="kps.npy", extra=["--dwpose", "det.onnx", "pose.onnx"]), "--dwpose would find nothing"),
        (
            dict(pose="kps.npy", extra=["--align-pose", "--reference-pose", "two_ref_poses.npy"]),
            r"two_ref_poses.npy: reference keypoints must be one frame.*got \(2, 18, 3\)",
        ),
        (  # kps.npy holds nobody
            dict(pose="kps.npy", extra=["--align-pose", "--reference-pose", "ref_pose.json"]),
            "kps.npy: cannot align poses",
        ),
    ],
)
def test_bad_inputs_give_one_error_line_and_no_output(files, tmp_path, capsys, monkeypatch, change, message):
    import re
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed, wherever the tests run
    suffixes = (".mp4", ".npy", ".json", ".onnx")
    paths = lambda args: [str(files / a) if a.endswith(suffixes) else a for a in args]
    if isinstance(change, list):
        args = argv(files, tmp_path / "out.mp4", *paths(change))
    else:
        args = argv(files, tmp_path / "out.mp4", *paths(change.pop("extra", [])))
        for flag, value in change.items():
            args[args.index(f"--{flag}") + 1] = str(files / value)
    assert (
        sample.main([*args, "--grid", str(tmp_path / "grid.mp4"), "--frames-dir", str(tmp_path / "f")]) == 2
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert list(tmp_path.iterdir()) == []


def test_dwpose_finds_both_people_and_the_driving_pose_is_aligned(files, monkeypatch):
    from xdyna_jax.conditioning import extractors
    from xdyna_jax.io.driving import crop_box, pose_to_canvas, reference_keypoints

    made = []
    monkeypatch.setattr(extractors, "DWPoseOnnx", lambda *paths: made.append(FakeDWPose(*paths)) or made[-1])
    # what this test checks is read before the bundle: skip loading its weights
    monkeypatch.setattr(sample, "_load_pipeline", lambda args: types.SimpleNamespace(size_multiple=4))
    dwpose = ["--dwpose", str(files / "det.onnx"), str(files / "pose.onnx")]
    # the raw driving video is face.mp4: 32 x 32, cut to the 16:24 canvas
    extra = ["--pose", str(files / "face.mp4"), *dwpose, "--align-pose", "--frames", "3"]
    args = sample.build_parser().parse_args(argv(files, "o.mp4", *extra))
    _, reference, poses, *_ = sample.prepare(args)
    assert len(made) == 1 and made[0].paths == (str(files / "det.onnx"), str(files / "pose.onnx"))
    assert [f.shape for f in made[0].frames] == [(37, 23, 3)] + [(32, 32, 3)] * 3  # photo, then the video
    driving = read_video(files / "face.mp4", stride=2, limit=3)[0]
    box = crop_box((32, 32), H, W)
    found = [pose_to_canvas(FakeDWPose()(f), (32, 32), box, H, W) for f in driving]
    target = reference_keypoints(reference, H, W, extractor=FakeDWPose())
    np.testing.assert_array_equal(
        poses, draw_poses(align_poses(found, target, method="limbs"), H, W, draw_head=False)
    )
    assert not np.array_equal(poses, draw_poses(found, H, W, draw_head=False))


def test_compile_cache_keeps_small_programs(tmp_path):
    import jax

    names = [
        "jax_enable_compilation_cache",
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    ]
    before = {n: getattr(jax.config, n) for n in names}
    try:
        sample.configure_compile_cache(tmp_path / "cache")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
        sample.configure_compile_cache(None)
        assert not jax.config.jax_enable_compilation_cache
    finally:
        for n, v in before.items():
            jax.config.update(n, v)
