"""Training data: prepare (videos -> array_record dataset) and the grain clip pipeline."""

import dataclasses
import json
import re
import shutil

import grain
import numpy as np
import pytest
from oracle import FakeDWPose, face_landmarks, standing_pose, write_training_inputs

from xdyna_jax.conditioning.pose import COLORS, R_WRIST
from xdyna_jax.data import DataConfig, DatasetError, clip_dataset, make_iterator, prepare, read_info
from xdyna_jax.data.augment import BODY_MIRROR, LANDMARK_MIRROR
from xdyna_jax.data.records import Record, decode_frames
from xdyna_jax.io.driving import crop_box, points_to_canvas, pose_to_canvas
from xdyna_jax.io.video import read_video

H, W = 48, 32  # canvas; the videos are 48 x 64, so prepare cuts their centre 32 columns
N = 4  # driven frames per clip in these tests
SRC = (48, 64)


def human_args(dirs, output, *extra):
    return [
        "--videos", str(dirs["videos"]), "--poses", str(dirs["poses"]), "--faces", str(dirs["faces"]),
        "--face-patches", str(dirs["patches"]), "--height", str(H), "--width", str(W), "--output", str(output),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    dirs = write_training_inputs(root / "human_in")
    scene_dirs = write_training_inputs(root / "scene_in", names=("s1", "s2"), scene=True)
    assert prepare.main(human_args(dirs, root / "human")) == 0
    scene = ["--videos", str(scene_dirs["videos"]), "--scene", "--height", str(H), "--width", str(W)]
    assert prepare.main([*scene, "--output", str(root / "scene")]) == 0
    return {"root": root, "inputs": dirs, "human": str(root / "human"), "scene": str(root / "scene")}


def records(path):
    info = read_info(path)
    source = grain.sources.ArrayRecordDataSource(info.shard_paths())
    return info, [Record(source[i]) for i in range(len(source))]


def take(it, k):
    return [next(it) for _ in range(k)]


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_prepare_stores_frames_keypoints_and_landmarks_on_the_canvas(data):
    info, recs = records(data["human"])
    meta = json.loads((info.path / "dataset.json").read_text())
    assert meta["num_videos"] == 3 and meta["num_frames"] == 72 and meta["height"] == H
    assert meta["has"] == {"keypoints": True, "landmarks": True, "face_patches": True, "latents": False}
    assert [r.name for r in recs] == ["a", "b", "c"] and [v["frames"] for v in info.videos] == [24] * 3
    box = crop_box(SRC, H, W)
    for i, rec in enumerate(recs):  # a and c from OpenPose JSON folders, b from a .npy
        raw, fps = read_video(info.path.parent / "human_in" / "videos" / f"{rec.name}.mp4")
        x0, _, cw, _ = box
        assert fps == 10.0 and float(rec["fps"]) == 10.0 and not rec["scene"]
        np.testing.assert_array_equal(rec["frames_codec"], "png")
        np.testing.assert_array_equal(decode_frames(rec, "frames", range(24)), raw[:, :, x0 : x0 + cw])
        pose = standing_pose(SRC, raise_right_wrist=0.2 * 5 / 24)
        np.testing.assert_allclose(
            rec["body"][5, :, :2], pose_to_canvas(pose, SRC, box, H, W).body, atol=1e-4
        )
        expected = points_to_canvas(face_landmarks(24, SRC, seed=i), box, H, W)
        np.testing.assert_allclose(rec["landmarks"], expected, atol=1e-4)
        assert rec["hands"].shape == (24, 2, 21, 3) and "patches_data" in rec
    _, scene = records(data["scene"])
    assert all(r["scene"] and "body" not in r and "landmarks" not in r for r in scene)


def test_clips_have_the_batch_contract_and_follow_the_seed(data):
    cfg = DataConfig(human=data["human"], num_frames=N, stride=2, max_scale=1.3, batch_size=2, num_threads=2)
    shard = grain.sharding.ShardOptions(0, 1)
    first = take(make_iterator(cfg, shard), 3)
    b = first[0]
    assert b["frames"].shape == (2, 1 + N, H, W, 3) and b["frames"].dtype == np.uint8
    assert b["pose"].shape == (2, N, H, W, 3) and b["face"].shape == (2, N, H, W, 6)
    assert b["scene"].dtype == np.bool_ and not b["scene"].any() and "latents" not in b
    for idx in b["frame_indices"]:  # a window at stride 2, the reference outside it
        assert (np.diff(idx[1:]) == 2).all() and idx[0] not in idx[1:]
    assert all(same(x, y) for x, y in zip(first, take(make_iterator(cfg, shard), 3), strict=True))
    other = take(make_iterator(dataclasses.replace(cfg, seed=1), shard), 3)
    assert not all(same(x, y) for x, y in zip(first, other, strict=True))
    # stage 2 reads the face from the cross-identity patches (tinted), else from the clip's own frames
    own = take(make_iterator(dataclasses.replace(cfg, face="own"), shard), 1)[0]
    np.testing.assert_array_equal(own["frames"], b["frames"])
    assert own["face"].any() and not np.array_equal(own["face"], b["face"])


def test_flip_mirrors_frames_and_swaps_left_and_right(data):
    assert (
        sorted(BODY_MIRROR[BODY_MIRROR]) == list(range(18))
        and (BODY_MIRROR[BODY_MIRROR] == np.arange(18)).all()
    )
    assert (LANDMARK_MIRROR[LANDMARK_MIRROR] == np.arange(68)).all() and len(set(LANDMARK_MIRROR)) == 68
    kw = dict(human=data["human"], num_frames=N, face="none")
    plain = clip_dataset(DataConfig(**kw, flip_prob=0.0))[0]
    flipped = clip_dataset(DataConfig(**kw, flip_prob=1.0))[0]
    np.testing.assert_array_equal(flipped["frames"], plain["frames"][:, :, ::-1])
    t = plain["frame_indices"][1]
    _, recs = records(data["human"])
    body = recs[int(plain["video"])]["body"][t]
    (xr, yr), (xl, yl) = body[R_WRIST, :2], body[7, :2]  # right and left wrist, unflipped
    assert tuple(plain["pose"][0, int(yr), int(xr)]) == COLORS[R_WRIST]
    # mirrored, the person's right wrist is where the left one was, mirrored, and keeps its colour
    assert tuple(flipped["pose"][0, int(yl), int(W - 1 - xl)]) == COLORS[R_WRIST]


def test_scene_clips_mix_in_by_the_ratio_with_blank_conditions(data):
    cfg = DataConfig(human=data["human"], scene=data["scene"], scene_ratio=0.25, num_frames=2)
    ds = clip_dataset(cfg)
    draws = [ds[i] for i in range(120)]
    share = np.mean([d["scene"] for d in draws])
    assert 0.2 <= share <= 0.3, share
    scene = next(d for d in draws if d["scene"])
    assert not scene["pose"].any() and not scene["face"].any() and scene["face"].shape == (2, H, W, 6)
    assert scene["frames"].any()


def test_processes_take_disjoint_shares_that_make_up_the_one_process_stream(data):
    cfg = DataConfig(human=data["human"], scene=data["scene"], scene_ratio=0.25, num_frames=2, face="none")
    whole = take(make_iterator(cfg, grain.sharding.ShardOptions(0, 1)), 8)
    halves = [take(make_iterator(cfg, grain.sharding.ShardOptions(p, 2)), 4) for p in (0, 1)]
    assert all(same(whole[2 * i + p], halves[p][i]) for i in range(4) for p in (0, 1))


def test_iterator_state_resumes_exactly(data):
    cfg = DataConfig(human=data["human"], num_frames=N, stride=2, max_scale=1.2, batch_size=2, num_threads=2)
    shard = grain.sharding.ShardOptions(0, 1)
    it = make_iterator(cfg, shard)
    take(it, 2)
    state = it.get_state()
    expected = take(it, 2)
    resumed = make_iterator(cfg, shard)
    resumed.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
    assert all(same(x, y) for x, y in zip(expected, take(resumed, 2), strict=True))


def test_extractors_and_latents(data, tmp_path, monkeypatch):
    from flax import nnx
    from oracle import TINY_VAE

    import xdyna_jax
    from xdyna_jax.conditioning import extractors
    from xdyna_jax.models.vae import AutoencoderKL, VAEConfig

    vae = AutoencoderKL(VAEConfig(**TINY_VAE), rngs=nnx.Rngs(0))
    xdyna_jax.save(vae, tmp_path / "vae")
    monkeypatch.setattr(extractors, "DWPoseOnnx", FakeDWPose)
    lmk = face_landmarks(1, (H, W))[0]
    monkeypatch.setattr(
        extractors, "FaceAlignmentLandmarks", lambda **kw: lambda f: lmk if f.mean() > 90 else None
    )
    dirs = write_training_inputs(tmp_path / "in", names=("x", "y"), num_frames=8)
    args = ["--videos", str(dirs["videos"]), "--dwpose", "det.onnx", "pose.onnx", "--face-alignment"]
    out = tmp_path / "ds"
    assert (
        prepare.main(
            [
                *args,
                "--latents",
                str(tmp_path / "vae"),
                "--height",
                str(H),
                "--width",
                str(W),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    info, (rec, _) = records(out)
    assert info.latent_shape == (H // 2, W // 2, 4)
    raw, _ = read_video(dirs["videos"] / "x.mp4")
    found = pose_to_canvas(FakeDWPose()(raw[3]), SRC, crop_box(SRC, H, W), H, W)
    np.testing.assert_allclose(rec["body"][3, :, :2], found.body, atol=1e-4)
    assert np.isfinite(rec["landmarks"][0]).all() == (raw[0][:, 16:48].mean() > 90)
    frames = prepare.canvas_frames(raw[:2], H, W).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(rec["latents"][:2], vae.latents_from_images(frames), rtol=1e-5, atol=1e-5)

    with pytest.raises(DatasetError, match="cannot be flipped or zoomed"):
        clip_dataset(DataConfig(human=str(out), num_frames=N))
    clip = clip_dataset(DataConfig(human=str(out), num_frames=N, flip_prob=0.0))[0]
    stored = records(out)[1][int(clip["video"])]["latents"]
    np.testing.assert_array_equal(clip["latents"], stored[clip["frame_indices"]])


def _break(case, dirs, tmp):
    if case == "unreadable video":
        (dirs["videos"] / "z.mp4").write_bytes(b"not a video")
        return [], "z.mp4: cannot read as a video"
    if case == "missing keypoint frame":
        (dirs["poses"] / "a" / "a_000000000007_keypoints.json").unlink()
        return [], r"poses/a: 23 OpenPose JSON files but video a has 24 frames \(no file for frame 7\)"
    if case == "landmark shape":
        np.save(dirs["faces"] / "b.npy", np.zeros((24, 68, 3)))
        return [], r"b.npy: landmarks must be \(T, 68, 2\)"
    if case == "landmark count":
        np.save(dirs["faces"] / "c.npy", np.zeros((23, 68, 2)))
        return [], "c.npy: 23 landmark frames but video c has 24"
    if case == "extractor weights":
        args = ["--videos", str(dirs["videos"]), "--dwpose", str(tmp / "none.onnx"), str(tmp / "p.onnx")]
        return [
            *args,
            "--height",
            str(H),
            "--width",
            str(W),
        ], "--dwpose: DWPose detector ONNX file .* not found"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["unreadable video", "missing keypoint frame", "landmark shape", "landmark count", "extractor weights"],
)
def test_bad_input_gives_one_error_naming_the_file_and_writes_nothing(data, tmp_path, capsys, case):
    dirs = {k: tmp_path / "in" / k for k in data["inputs"]}
    shutil.copytree(data["root"] / "human_in", tmp_path / "in")
    argv, message = _break(case, dirs, tmp_path)
    output = tmp_path / "out" / "ds"
    argv = [*argv, "--output", str(output)] if argv else human_args(dirs, output)
    assert prepare.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "out").exists()
