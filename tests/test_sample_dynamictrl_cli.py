"""sample.py with a DynamiCtrl bundle, end to end: a tiny fake DynamiCtrl release (random weights, written by the
PyTorch classes) converted with `python -m convert dynamictrl`, then sampled through the command line. The mp4
has the frames, size and fps asked for, the same seed gives the same video and another seed another, keypoint
sources are retargeted and drawn after the reference's own pose, and each bad input stops the run with one
`error:` line, exit status 2 and nothing written.

Frame counts: 9 (an odd latent count, padded for the transformer) and 13 (an even one, decoded to 16 and
trimmed) run here; they share the transformer's compiled step (4 latent frames each). 8 x 8 pixels keep the
tiny VAE below its tiling threshold."""

import json
import re
import sys

import numpy as np
import pytest
from oracle import FakeDWPose, standing_pose
from oracle_dynamictrl_release import write_release

import sample
from convert.__main__ import main as convert_main
from xdyna_jax.conditioning.mimicmotion_pose import (
    dynamictrl_pose_video,
    pose_reference_image,
    reference_pose_to_canvas,
)
from xdyna_jax.conditioning.pose import write_openpose_json
from xdyna_jax.io.driving import read_keypoints_npy, read_reference_pose
from xdyna_jax.io.video import read_image, read_video, write_video
from xdyna_jax.sampling import dynamictrl_cli

H = W = 8
# ffmpeg's child process execs straight away (sample.main says the same to its warnings filter)
pytestmark = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")
PHOTO_HW = (37, 23)
CACHE_FLAGS = (
    "jax_enable_compilation_cache",
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


def noise_video(n, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def walking(n, image_hw):
    """(n, 18, 3) x, y, score: the standing person in an image's pixels, stepping right and raising a wrist."""
    frames = []
    for t in range(n):
        f = standing_pose(image_hw, raise_right_wrist=0.02 * t)
        frames.append(np.concatenate([f.body + [0.1 * t, 0.0], f.body_scores[:, None]], 1))
    return np.stack(frames)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import imageio.v2 as imageio
    import jax

    root = tmp_path_factory.mktemp("dynamictrl_cli")
    write_release(root / "release", control=True)
    assert (
        convert_main(["dynamictrl", "--input", str(root / "release"), "--output", str(root / "bundle")]) == 0
    )
    imageio.imwrite(root / "ref.png", noise_video(1, *PHOTO_HW, seed=0)[0])
    mask = np.zeros((*PHOTO_HW, 3), np.uint8)
    mask[5:30, 4:20] = 255
    imageio.imwrite(root / "mask.png", mask)
    imageio.imwrite(root / "small_mask.png", mask[:20])
    write_video(root / "pose.mp4", noise_video(18, H, W, seed=1), fps=20)  # stride 2 -> 9 frames at 10 fps
    write_video(root / "raw.mp4", noise_video(4, 32, 48, seed=2), fps=12)  # a raw driving video
    np.save(root / "kps.npy", walking(15, (H, W)))
    write_openpose_json(standing_pose(PHOTO_HW), root / "ref_pose.json")
    for name, kind in (("xdyna", "xdyna"), ("manifest_only", "dynamictrl")):  # what the kind check reads
        (root / name).mkdir()
        (root / name / "manifest.json").write_text(json.dumps({"kind": kind}))
    for name in ("det.onnx", "pose.onnx"):  # never loaded: the tests stand in for onnxruntime
        (root / name).write_bytes(b"onnx")
    before = {n: getattr(jax.config, n) for n in CACHE_FLAGS}
    yield root
    for n, v in before.items():  # the runs turned the persistent cache on in root: put it back
        jax.config.update(n, v)


def argv(root, out, *extra):
    # fp32 compiles faster than bf16 on CPU; the compilation cache makes every run after the first of its
    # shapes skip compiling
    return [
        "--model", str(root / "bundle"), "--reference", str(root / "ref.png"), "--pose", str(root / "pose.mp4"),
        "--prompt", "a woman in a red dress dances", "--out", str(out), "--height", str(H), "--width", str(W),
        "--steps", "2", "--dtype", "fp32", "--compile-cache-dir", str(root / "cache"), *extra,
    ]  # fmt: skip


@pytest.mark.slow  # CI time (the suite is near 20 min): make test-slow
def test_video_has_the_frames_size_and_fps_and_the_seed_fixes_it(files, tmp_path):
    out, grid, pngs = tmp_path / "a.mp4", tmp_path / "grid.mp4", tmp_path / "frames"
    assert sample.main(argv(files, out, "--stride", "2", "--grid", str(grid), "--frames-dir", str(pngs))) == 0
    video, fps = read_video(out)
    assert video.shape == (9, H, W, 3) and fps == pytest.approx(10.0)  # 20 fps source / stride 2
    assert read_video(grid)[0].shape == (9, H, 2 * W, 3)  # pose | result
    frames = np.stack([read_image(p) for p in sorted(pngs.iterdir())])
    assert frames.shape == (9, H, W, 3)
    assert (
        sample.main(argv(files, tmp_path / "b.mp4", "--stride", "2", "--frames-dir", str(tmp_path / "b")))
        == 0
    )
    np.testing.assert_array_equal(
        np.stack([read_image(p) for p in sorted((tmp_path / "b").iterdir())]), frames
    )
    assert sample.main(argv(files, tmp_path / "c.mp4", "--stride", "2", "--seed", "1")) == 0
    assert not np.array_equal(read_video(tmp_path / "c.mp4")[0], video)
    mask = ["--reference-mask", str(files / "mask.png"), "--frames-dir", str(tmp_path / "d")]
    assert sample.main(argv(files, tmp_path / "d.mp4", "--stride", "2", *mask)) == 0
    masked = np.stack([read_image(p) for p in sorted((tmp_path / "d").iterdir())])
    assert masked.shape == frames.shape and not np.array_equal(masked, frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.mp4", "b", "b.mp4", "c.mp4", "d", "d.mp4", "frames", "grid.mp4"
    ]  # fmt: skip


def test_keypoints_are_retargeted_after_the_references_pose(files, tmp_path):
    kps = ["--pose", str(files / "kps.npy"), "--reference-pose", str(files / "ref_pose.json")]
    args = sample.build_parser().parse_args(argv(files, tmp_path / "o.mp4", *kps, "--frames", "13"))
    sample.resolve_kind(args)
    inputs = dynamictrl_cli.prepare(args)
    reference = reference_pose_to_canvas(read_reference_pose(files / "ref_pose.json"), PHOTO_HW, H, W)
    expected = dynamictrl_pose_video(reference, read_keypoints_npy(files / "kps.npy"), H, W, 13)
    np.testing.assert_array_equal(inputs.poses, expected)
    assert inputs.fps == 16.0  # keypoints record no frame rate: the release's export default
    # (the pipeline at 13 frames runs in tests/test_dynamictrl_pipeline.py; a CLI run here would only compile again)


def test_dwpose_finds_the_reference_in_the_cropped_photo_and_the_driving_pose_in_raw_frames(
    files, monkeypatch
):
    from xdyna_jax.conditioning import extractors

    made = []
    monkeypatch.setattr(extractors, "DWPoseOnnx", lambda *paths: made.append(FakeDWPose(*paths)) or made[-1])
    dwpose = ["--dwpose", str(files / "det.onnx"), str(files / "pose.onnx")]
    args = sample.build_parser().parse_args(argv(files, "o.mp4", "--pose", str(files / "raw.mp4"), *dwpose))
    sample.resolve_kind(args)
    inputs = dynamictrl_cli.prepare(args)
    photo = read_image(files / "ref.png")
    # the photo as the release cuts it to H x W, then each raw (uncropped) driving frame
    assert [f.shape for f in made[0].frames] == [(H, W, 3)] + [(32, 48, 3)] * 4
    np.testing.assert_array_equal(made[0].frames[0], pose_reference_image(photo, H, W))
    raw = read_video(files / "raw.mp4")[0]
    driving = [FakeDWPose()(f) for f in raw]
    reference = FakeDWPose()(pose_reference_image(photo, H, W))
    expected = dynamictrl_pose_video(reference, driving, H, W, 5, driving_size=(32, 48))
    np.testing.assert_array_equal(inputs.poses, expected)
    assert inputs.fps == pytest.approx(12.0)


def test_each_kind_gets_its_defaults_and_given_flags_stay(files):
    def resolved(model, *extra):
        base = ["--model", str(files / model), "--reference", "r.png", "--pose", "p.mp4", "--out", "o.mp4"]
        args = sample.build_parser().parse_args([*base, *extra])
        assert sample.resolve_kind(args) == model.replace("manifest_only", "dynamictrl")
        return args.guidance, args.height, args.width, args.dtype, args.steps

    assert resolved("manifest_only", "--prompt", "x") == (3.0, 1360, 768, "bf16", 25)  # the release's
    assert resolved("xdyna") == (7.5, 896, 512, "fp32", 25)  # X-Dyna's, as before
    assert resolved("manifest_only", "--guidance", "6", "--width", "576", "--dtype", "fp32") == (
        6.0, 1360, 576, "fp32", 25
    )  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--no-prompt"], "is a DynamiCtrl pipeline: --prompt TEXT is required"),
        (["--reference-mask", "small_mask.png"], r"small_mask.png is 20x23 but the reference is 37x23"),
        (["--face", "pose.mp4"], "--face is an X-Dyna option, but --model .* is a DynamiCtrl pipeline"),
        (["--window-batch", "2"], "--window-batch is an X-Dyna option"),
        (["--window", "8"], "--window is an X-Dyna option"),
        (["--model", "xdyna"], "--prompt is a DynamiCtrl option, but --model .*xdyna is an X-Dyna pipeline"),
        (
            ["--pose", "kps.npy"],
            "holds keypoints, which are retargeted .* --reference-pose FILE, or --dwpose",
        ),
        (
            ["--reference-pose", "ref_pose.json"],
            "--reference-pose retargets keypoints, but --pose .*pose.mp4",
        ),
        (["--frames", "19"], "has 18 frames at stride 1; --frames asks for 19"),
        (
            ["--pose", "kps.npy", "--reference-pose", "ref_pose.json", "--frames", "17"],
            "has 15 driving frames at stride 1; --frames 17 needs 16 after the reference's pose",
        ),
        (["--guidance", "0.5"], "--guidance must be >= 1"),
        (["--steps", "1001"], "--steps must be at most 1000"),
        (["--height", "12"], "multiples of 8, got 12x8"),
        (
            ["--dwpose", "det.onnx", "pose.onnx"],
            "--dwpose: DWPoseOnnx needs the optional package 'onnxruntime'",
        ),
    ],
)
def test_bad_inputs_give_one_error_line_and_no_output(files, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed, wherever the tests run
    args = argv(
        files, tmp_path / "out.mp4", "--grid", str(tmp_path / "grid.mp4"), "--frames-dir", str(tmp_path / "f")
    )
    extra = [str(files / a) if a.endswith((".mp4", ".npy", ".json", ".png", ".onnx")) else a for a in extra]
    if extra[0] == "--no-prompt":
        i = args.index("--prompt")
        del args[i : i + 2]
        extra = []
    for flag in ("--model", "--pose", "--height"):  # replace a flag already given
        if flag in extra:
            i, j = args.index(flag), extra.index(flag)
            args[i + 1] = extra[j + 1] if flag != "--model" else str(files / "xdyna")
            del extra[j : j + 2]
    assert sample.main([*args, *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert list(tmp_path.iterdir()) == []
