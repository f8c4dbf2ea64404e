"""The synthetic world: determinism, palette colours where the keypoints say, faces that move, scene clips
without characters, and files that `python -m xdyna_jax.data.prepare` ingests."""

import json

import cv2
import grain
import numpy as np
import pytest

from xdyna_jax.conditioning.pose import LIMBS
from xdyna_jax.data import prepare, read_info
from xdyna_jax.data.records import Record, decode_frames
from xdyna_jax.data.synthetic import PALETTE_FORMAT, main, render_clip, render_scene, write_world
from xdyna_jax.data.synthetic_character import (
    LIMB_SHADE,
    MAX_BACKGROUND_CHROMA,
    TOLERANCE,
    chroma,
    limb_color_pool,
)
from xdyna_jax.data.synthetic_draw import BACKGROUND, FACE, LEFT_HAND, MIXED, RIGHT_HAND, point_scores
from xdyna_jax.data.synthetic_scene import BACKGROUNDS
from xdyna_jax.io.video import read_video, write_video

H, W, T = 128, 96, 12
SHADE = int(max(-LIMB_SHADE[0], LIMB_SHADE[1]))  # a limb's fully covered pixels stay this close


@pytest.fixture(scope="module")
def clips():
    return [render_clip(i, 40 + i, T, H, W, background=bg) for i, bg in enumerate(BACKGROUNDS)]


def _segment_distance(xs, ys, a, b):
    ab = b - a
    t = np.clip(((xs - a[0]) * ab[0] + (ys - a[1]) * ab[1]) / max(ab @ ab, 1e-9), 0, 1)
    return np.hypot(xs - (a[0] + t * ab[0]), ys - (a[1] + t * ab[1]))


def test_same_seeds_same_clip_other_seeds_other_clip(clips):
    again = render_clip(0, 40, T, H, W, background=BACKGROUNDS[0])
    first = clips[0]
    for name in ("frames", "body", "hands", "face", "feet", "labels"):
        assert np.array_equal(getattr(first, name), getattr(again, name), equal_nan=True), name
    assert first.palette == again.palette and first.frames.dtype == np.uint8
    assert first.frames.shape == (T, H, W, 3) and first.body.shape == (T, 18, 3)
    assert first.hands.shape == (T, 2, 21, 3) and first.face.shape == (T, 68, 2)
    other_identity = render_clip(1, 40, T, H, W, background=BACKGROUNDS[0])
    assert other_identity.palette["limbs"] != first.palette["limbs"]
    assert not np.array_equal(other_identity.frames, first.frames)
    other_motion = render_clip(0, 41, T, H, W, background=BACKGROUNDS[0])
    assert other_motion.palette["limbs"] == first.palette["limbs"]
    assert np.abs(other_motion.body[..., :2] - first.body[..., :2]).max() > 5
    # a dance, and a smooth one: joints move, never more than a few pixels from one frame to the next
    step = np.linalg.norm(np.diff(first.body[..., :2], axis=0), axis=-1)
    assert step.max() > 1 and step.max() < 0.08 * H


def test_palette_colours_are_far_apart_and_from_every_background(clips):
    for identity in range(6):
        palette = render_clip(identity, 0, 1, 32, 32).palette
        assert palette["format"] == PALETTE_FORMAT and palette["identity"] == identity
        assert palette["tolerance"] == TOLERANCE and len(palette["limbs"]) == len(LIMBS) == 17
        colours = np.array(palette["limbs"] + palette["clothing"], float)
        gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + 1e9 * np.eye(len(colours))
        assert gaps.min() >= 60
        # skin and lips are the other saturated colours: no limb colour within 60 of them
        for other in (palette["skin"], palette["lips"]):
            assert np.linalg.norm(colours - np.array(other, float), axis=-1).min() >= 60
        # backgrounds are muted; a muted colour is at least (limb chroma - its chroma) from a limb colour
        assert chroma(colours).min() - MAX_BACKGROUND_CHROMA >= 60
    for clip in clips:  # every background pixel (labelled background) is muted
        background = clip.frames[clip.labels == BACKGROUND]
        assert len(background) > 0.5 * T * H * W and chroma(background).max() <= MAX_BACKGROUND_CHROMA + 1


def test_limbs_show_their_palette_colour_where_the_keypoints_put_them(clips):
    ys, xs = np.mgrid[:H, :W]
    shown = 0
    for clip in clips:
        colours = np.array(clip.palette["limbs"], float)
        radii = np.array(clip.palette["limb_widths"]) / 2
        for t in range(T):
            frame, labels = clip.frames[t].astype(float), clip.labels[t]
            for k, (a, b) in enumerate(LIMBS):
                pa, pb = clip.body[t, a, :2], clip.body[t, b, :2]
                x, y = np.round((pa + pb) / 2).astype(int)
                if 0 <= x < W and 0 <= y < H and labels[y, x] == k:  # the midpoint is not covered
                    shown += 1
                    assert np.abs(frame[y, x] - colours[k]).max() <= SHADE
                # every fully covered pixel of this colour lies on the bone between the two keypoints
                close = (np.abs(frame - colours[k]).max(-1) <= 25) & (labels >= 0)
                if close.any():
                    dist = _segment_distance(xs[close], ys[close], pa, pb)
                    assert dist.max() <= radii[k] + 0.5, (k, dist.max())
    assert shown >= 0.65 * len(clips) * T * len(LIMBS)  # most midpoints are in view
    # hands are drawn at their keypoints: the palm's middle shows the hand
    palms = [(c.labels[t], c.hands[t, s, [0, 5, 9, 13, 17], :2].mean(0), p) for c in clips for t in range(T)
             for s, p in ((0, LEFT_HAND), (1, RIGHT_HAND))]  # fmt: skip
    on = [
        lab[int(round(y)), int(round(x))] == p
        for lab, (x, y), p in palms
        if 0 <= x < W - 1 and 0 <= y < H - 1
    ]
    assert np.mean(on) > 0.8


def test_mp4_round_trip_keeps_limb_cores_within_the_tolerance(clips, tmp_path):
    clip = clips[1]
    write_video(tmp_path / "c.mp4", clip.frames, fps=12)
    decoded, _ = read_video(tmp_path / "c.mp4")
    worst = []
    for t in range(T):
        for k, colour in enumerate(clip.palette["limbs"]):
            # the core: pixels two or more pixels inside the part of the limb that is in view
            core = cv2.erode((clip.labels[t] == k).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            if core.any():
                worst.append(np.abs(decoded[t][core].astype(float) - colour).max())
    assert len(worst) > 5 * T and max(worst) <= clip.palette["tolerance"]


def test_eyes_and_mouth_open_and_close(tmp_path):
    clip = render_clip(7, 3, 24, 384, 288)  # a face big enough to see its eyes
    face = clip.face
    eye_width = np.linalg.norm(face[:, 39] - face[:, 36], axis=-1)
    eyes = np.linalg.norm(face[:, [37, 38, 43, 44]] - face[:, [41, 40, 47, 46]], axis=-1).mean(-1) / eye_width
    mouth = np.linalg.norm(face[:, 62] - face[:, 66], axis=-1) / np.linalg.norm(
        face[:, 54] - face[:, 48], axis=-1
    )
    assert eyes.max() > 0.4 and eyes.min() < 0.05, eyes
    assert mouth.max() > 0.25 and mouth.min() < 0.02, mouth
    # the picture agrees: eye whites show in the most open frame, none in the shut one
    ys, xs = np.mgrid[:384, :288]

    def white(t):  # near-white pixels of the face, within an eye's width of an eye's middle
        near = [np.hypot(xs - c[0], ys - c[1]) < w for c, w in ((clip.body[t, 14], eye_width[t]),
                                                                  (clip.body[t, 15], eye_width[t]))]  # fmt: skip
        bright = (clip.frames[t].astype(int) > 200).all(-1) & np.isin(clip.labels[t], (FACE, MIXED))
        return (bright & (near[0] | near[1])).sum()

    assert white(int(eyes.argmax())) > 0 and white(int(eyes.argmin())) == 0
    np.testing.assert_allclose(clip.body[:, 14, :2], face[:, 36:42].mean(1))  # OpenPose eyes = landmarks


def test_scene_clips_have_no_character_colours():
    pool = limb_color_pool()
    for kind in BACKGROUNDS:
        frames, got = render_scene(3, 6, 64, 48, background=kind)
        assert got == kind and frames.shape == (6, 64, 48, 3)
        assert chroma(frames).max() <= MAX_BACKGROUND_CHROMA + 1
        near = np.abs(frames.reshape(-1, 1, 3).astype(float) - pool[None]).max(-1) <= TOLERANCE
        assert not near.any()
        assert np.abs(np.diff(frames.astype(float), axis=0)).mean() > 0.05, kind  # the scene moves
    assert np.array_equal(render_scene(3, 2, 32, 32)[0], render_scene(3, 2, 32, 32)[0])


def test_points_off_canvas_or_hidden_score_zero():
    clip = render_clip(2, 9, 8, 128, 40)  # a narrow canvas: the arms leave it
    for points in (clip.body, clip.hands.reshape(8, 42, 3), clip.feet):
        off = (points[..., 0] < 0) | (points[..., 0] > 39) | (points[..., 1] < 0) | (points[..., 1] > 127)
        assert (points[..., 2][off] == 0).all()
    assert ((clip.hands[..., 0] > 39) | (clip.hands[..., 0] < 0)).any()
    top = np.full((10, 10), BACKGROUND, np.int8)
    top[5, 5] = 3  # the right forearm covers (5, 5)
    points = np.array([[5.2, 4.8], [5.0, 5.0], [2.0, 2.0], [-1.0, 3.0], [3.0, 9.6]])
    owners = [{3}, {7}, {7}, {7}, {7}]  # (5, 5) is the first point's own limb, the second's is hidden
    np.testing.assert_array_equal(point_scores(points, top, owners), [1, 0, 1, 0, 0])


def _records(path):
    info = read_info(path)
    source = grain.sources.ArrayRecordDataSource(info.shard_paths())
    return info, [Record(source[i]) for i in range(len(source))]


def test_a_world_on_disk_that_prepare_ingests(tmp_path, monkeypatch):
    root, h, w, frames = tmp_path / "world", 48, 32, 6
    args = ["--out", str(root), "--identities", "2", "--clips-per-identity", "1", "--scenes", "1"]
    args += ["--frames", str(frames), "--height", str(h), "--width", str(w), "--seed", "1"]
    assert main(args) == 0
    assert main(args) == 2  # the folder exists now
    world = json.loads((root / "world.json").read_text())
    stems = [c["stem"] for c in world["clips"]]
    assert world["identities"] == [10000, 10001] and stems == ["id010000_m000", "id010001_m000"]
    assert sorted(p.name for p in root.iterdir()) == [
        "faces", "palettes", "poses", "references", "scenes", "videos", "world.json"
    ]  # fmt: skip
    palette = json.loads((root / "palettes" / f"{stems[0]}.json").read_text())
    expected = render_clip(10000, 10_000_000, frames, h, w)
    assert palette == expected.palette
    assert {"format", "identity", "limbs", "limb_width", "skin", "clothing", "background", "height", "width",
            "tolerance"} <= palette.keys()  # fmt: skip
    keypoints = np.load(root / "poses" / f"{stems[0]}.npy")
    assert keypoints.shape == (frames, 134, 3) and keypoints.dtype == np.float32
    np.testing.assert_allclose(keypoints, expected.keypoints(), atol=1e-4)
    assert (root / "references" / "id010001.png").is_file() and (
        root / "scenes" / "scene010000.mp4"
    ).is_file()

    human, scene = tmp_path / "human", tmp_path / "scene"
    prep = ["--height", str(h), "--width", str(w)]
    assert prepare.main(["--videos", str(root / "videos"), "--poses", str(root / "poses"), "--faces",
                         str(root / "faces"), *prep, "--output", str(human)]) == 0  # fmt: skip
    assert prepare.main(["--videos", str(root / "scenes"), "--scene", *prep, "--output", str(scene)]) == 0
    info, recs = _records(human)
    assert [r.name for r in recs] == stems and info.videos[0]["frames"] == frames
    rec = recs[0]
    np.testing.assert_allclose(rec["body"], keypoints[:, :18], atol=1e-4)
    np.testing.assert_allclose(rec["hands"][:, 0], keypoints[:, 92:113], atol=1e-4)
    np.testing.assert_allclose(rec["landmarks"], np.load(root / "faces" / f"{stems[0]}.npy"), atol=1e-4)
    video = decode_frames(rec, "frames", range(frames)).astype(float)
    assert np.abs(video - expected.frames).mean() < 6  # the mp4's frames, lossy
    assert _records(scene)[1][0]["scene"]

    # a failure on the way leaves nothing behind
    import xdyna_jax.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "render_scene", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_world(tmp_path / "broken", 1, 1, 1, 2, 32, 32, seed=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["human", "scene", "world"]
