"""Evaluation metrics against hand-computed values on small arrays, and the `python -m xdyna_jax.eval` CLI."""

import json
import math
import runpy
import sys
from unittest import mock

import cv2
import numpy as np
import pytest

from xdyna_jax.conditioning.pose import LIMBS, PoseFrame
from xdyna_jax.eval import (
    EvalInputError,
    background_motion,
    color_distance,
    evaluate,
    flow_energy,
    identity_error,
    l1_error,
    locate_limb,
    palette_from_dict,
    pose_error,
    psnr,
    psnr_per_frame,
    ssim,
    ssim_map,
)
from xdyna_jax.eval.__main__ import main
from xdyna_jax.eval.identity_metrics import srgb_to_lab
from xdyna_jax.eval.regions import capsule_mask
from xdyna_jax.io.video import write_frames, write_video

SIZE = 96
BACKGROUND = (128, 128, 128)
# A standing figure in a 96 x 96 frame, OpenPose COCO-18 order (x, y pixels).
BODY = np.array(
    [
        (48, 20), (48, 30), (38, 32), (32, 44), (26, 56), (58, 32), (64, 44), (70, 56), (42, 58),
        (40, 72), (40, 86), (54, 58), (56, 72), (56, 86), (45, 18), (51, 18), (42, 20), (54, 20),
    ],
    np.float64,
)  # fmt: skip
# The limbs the test scenes draw: forearms and shins, which touch neither each other nor the torso.
DRAWN = {3: (230, 30, 30), 5: (30, 200, 40), 8: (40, 60, 230), 11: (240, 220, 20)}
CLOTHING = ((200, 40, 200), (20, 200, 200))
# cv2.line of thickness 5 paints a capsule about 6 pixels wide (exactly the 6-wide capsule when vertical,
# a few pixels more when slanted), so the palette says 6
LINE_THICKNESS, LIMB_WIDTH = 5, 6


def palette_dict(tolerance=0, limbs=None):
    limbs = DRAWN if limbs is None else limbs
    return {
        "format": "xdyna-synthetic-palette/1",
        "identity": 7,
        "limbs": [list(limbs[i]) if i in limbs else None for i in range(len(LIMBS))],
        "limb_width": LIMB_WIDTH,
        "skin": [230, 190, 160],
        "clothing": [list(c) for c in CLOTHING],
        "background": "flat",
        "height": SIZE,
        "width": SIZE,
        "tolerance": tolerance,
    }


def pose(body=BODY, scores=None):
    return PoseFrame(body, np.ones(18) if scores is None else scores)


def draw_scene(limb_shift=(0, 0), color_shift=(0, 0, 0), background=None):
    """uint8 (96, 96, 3): background, the torso in clothing stripes, the drawn limbs (moved by limb_shift
    pixels, their colours and the clothing's moved by color_shift)."""
    frame = np.empty((SIZE, SIZE, 3), np.uint8)
    frame[:] = BACKGROUND if background is None else background
    shift = np.array(color_shift)
    torso = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillPoly(torso, [BODY[[2, 5, 11, 8]].astype(np.int32).reshape(-1, 1, 2)], 1)
    torso = cv2.dilate(torso, np.ones((5, 5), np.uint8)).astype(bool)  # painted beyond the metric's region
    stripes = (np.arange(SIZE) // 3 % 2)[:, None] * np.ones(SIZE, int)
    for k, color in enumerate(CLOTHING):
        frame[torso & (stripes == k)] = np.array(color) + shift
    for limb, color in DRAWN.items():
        a, b = (tuple(int(v) for v in BODY[j] + limb_shift) for j in LIMBS[limb])
        cv2.line(frame, a, b, tuple(int(v) for v in np.array(color) + shift), thickness=LINE_THICKNESS)
    return frame


# ------------------------------------------------------------------------------------------------------
# L1, PSNR, SSIM
# ------------------------------------------------------------------------------------------------------


def test_l1_and_psnr_of_known_offsets():
    rng = np.random.default_rng(0)
    target = rng.integers(10, 246, (3, 16, 16, 3)).astype(np.uint8)
    for d in (1, 5, 9):
        assert l1_error(target + np.uint8(d), target) == pytest.approx(d, abs=1e-12)
        assert psnr(target + np.uint8(d), target) == pytest.approx(20 * math.log10(255 / d), abs=1e-9)
        # below the target: uint8 subtraction would wrap to 256 - d; the float computation does not
        assert psnr(target - np.uint8(d), target) == pytest.approx(20 * math.log10(255 / d), abs=1e-9)
    # half the pixels off by 4, half exact: L1 = 2, MSE = 8
    generated = target.astype(np.int16)
    generated[:, :8] += 4
    assert l1_error(generated, target) == pytest.approx(2.0)
    assert psnr(generated, target) == pytest.approx(10 * math.log10(255**2 / 8))
    per_frame = psnr_per_frame(np.concatenate([target[:1], target[1:] + np.uint8(3)]), target)
    assert per_frame[0] == math.inf and per_frame[1:] == pytest.approx(20 * math.log10(255 / 3))
    with pytest.raises(ValueError, match="same shape"):
        l1_error(target[:2], target)


def _ssim_by_loops(x, y):
    """The SSIM equations evaluated window by window (an oracle for the filtered implementation)."""
    offsets = np.arange(11) - 5.0
    weights = np.exp(-(offsets[:, None] ** 2 + offsets[None] ** 2) / (2 * 1.5**2))
    weights /= weights.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (weights * a).sum(), (weights * b).sum()
            va, vb = (weights * (a - ma) ** 2).sum(), (weights * (b - mb) ** 2).sum()
            cov = (weights * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return np.array(values).reshape(x.shape[0] - 10, x.shape[1] - 10)


def test_ssim_identical_constant_and_window_oracle():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (2, 20, 24, 3)).astype(np.uint8)
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    # constant images a and b: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1) everywhere
    a, b = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), abs=1e-12)
    x = rng.integers(0, 256, (17, 19)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 30, x.shape), 0, 255)
    np.testing.assert_allclose(ssim_map(x, y), _ssim_by_loops(x, y), rtol=1e-10, atol=1e-12)
    # per channel, then the channel mean
    pair = np.stack([x, y, x], -1), np.stack([y, y, 255 - x], -1)
    expected = np.mean([_ssim_by_loops(pair[0][..., c], pair[1][..., c]).mean() for c in range(3)])
    assert ssim(*pair) == pytest.approx(expected, rel=1e-10)
    assert 0.5 < ssim(x, y) < 0.99
    with pytest.raises(ValueError, match="at least 11"):
        ssim(image[:, :10], image[:, :10])


# ------------------------------------------------------------------------------------------------------
# Pose and identity errors
# ------------------------------------------------------------------------------------------------------


def test_capsule_mask_is_the_pixels_within_radius():
    mask = capsule_mask(9, 20, (5, 4), (12, 4), 2.0)
    # a horizontal capsule: rows 2-6 between the ends, discs of radius 2 round (5, 4) and (12, 4)
    ys, xs = np.mgrid[:9, :20]
    nearest_x = np.clip(xs, 5, 12)
    np.testing.assert_array_equal(mask, (xs - nearest_x) ** 2 + (ys - 4) ** 2 <= 4)
    assert mask.sum() == 8 * 5 + 2 * 4  # 8 columns x 5 rows, plus 3 + 1 pixels beyond each end


def test_pose_error_of_known_offsets():
    palette = palette_from_dict(palette_dict())
    frame = draw_scene()
    dx, dy = 3, 4
    moved = draw_scene(limb_shift=(dx, dy))
    for limb, color in DRAWN.items():
        here = locate_limb(frame, color, 0, LIMB_WIDTH)
        there = locate_limb(moved, color, 0, LIMB_WIDTH)
        np.testing.assert_allclose(there.centroid - here.centroid, (dx, dy), atol=1e-9)
        # unmoved: centroid on the segment's midpoint, ends on the joints (within rasterisation)
        joints = BODY[list(LIMBS[limb])]
        assert np.linalg.norm(here.centroid - joints.mean(0)) < 0.3
        assert min(np.abs(here.ends - joints).max(), np.abs(here.ends[::-1] - joints).max()) < 1.0
    exact = pose_error(frame[None], [pose()], palette)
    assert exact.scored == 4 and exact.detection_rate == 1.0
    assert exact.centroid_px < 0.3 and exact.segment_px < 1.0
    shifted = pose_error(np.stack([moved, moved]), [pose(), pose()], palette)
    assert shifted.scored == 8 and shifted.found == 8
    assert shifted.centroid_px == pytest.approx(5.0, abs=0.3)
    assert shifted.segment_px == pytest.approx(5.0, abs=1.0)
    assert shifted.centroid_capped_px == pytest.approx(shifted.centroid_px)
    # one limb missing from the frame: a miss, counted at the cap; a joint not visible: not scored
    missing = frame.copy()
    missing[70:90, 50:62] = BACKGROUND  # the left shin
    scores = np.ones(18)
    scores[4] = 0.0  # the right wrist: the right forearm (limb 3) is not scored
    result = pose_error(missing[None], [pose(scores=scores)], palette, cap_px=20.0)
    assert result.scored == 3 and result.found == 2
    assert result.detection_rate == pytest.approx(2 / 3)
    assert result.centroid_capped_px == pytest.approx((2 * result.centroid_px + 20.0) / 3)
    assert result.per_limb_detection[11] == 0.0 and math.isnan(result.per_limb_detection[3])
    assert result.per_limb_detection[5] == 1.0
    # scored only where the ground truth shows the limb: the shin hidden there is not held against a model
    seen = pose_error(moved[None], [pose()], palette, seen_in=missing[None])
    assert seen.scored == 3 and seen.found == 3 and seen.seen_in_reference
    assert seen.centroid_px == pytest.approx(5.0, abs=0.3)


def test_identity_error_exact_and_shifted_colours():
    palette = palette_from_dict(palette_dict())
    exact = identity_error(draw_scene()[None], [pose()], palette)
    assert exact.limb_regions == 4 and exact.clothing_frames == 1
    assert exact.limbs == pytest.approx(0.0, abs=1e-9) and exact.clothing == pytest.approx(0.0, abs=1e-9)
    shifted = draw_scene(color_shift=(3, 4, 0))[None]
    rgb = identity_error(shifted, [pose()], palette, space="rgb")
    assert rgb.limbs == pytest.approx(5.0) and rgb.clothing == pytest.approx(5.0)
    assert rgb.overall == pytest.approx(5.0)
    # cut to where the ground truth shows each part: a limb missing there is left out
    hidden = draw_scene()
    hidden[66:92, 50:62] = BACKGROUND  # the left shin, all of it
    seen = identity_error(shifted, [pose()], palette, space="rgb", seen_in=hidden[None])
    assert seen.limb_regions == 3 and math.isnan(seen.per_limb[11]) and seen.limbs == pytest.approx(5.0)
    lab = identity_error(shifted, [pose()], palette)
    expected = np.mean([color_distance(np.array(c) + (3, 4, 0), c) for c in DRAWN.values()])
    assert lab.limbs == pytest.approx(expected, rel=1e-4)


# Published CIELAB coordinates of sRGB colours (D65 white): the primaries, white, black and mid grey.
LAB_REFERENCE = {
    (255, 0, 0): (53.2408, 80.0925, 67.2032),
    (0, 255, 0): (87.7347, -86.1827, 83.1793),
    (0, 0, 255): (32.2970, 79.1875, -107.8602),
    (255, 255, 255): (100.0, 0.0, 0.0),
    (0, 0, 0): (0.0, 0.0, 0.0),
    (128, 128, 128): (53.5850, 0.0, 0.0),
}


def test_lab_distance_matches_published_values():
    for rgb, lab in LAB_REFERENCE.items():
        np.testing.assert_allclose(srgb_to_lab(rgb), lab, atol=2e-3)
    assert float(color_distance((0, 0, 0), (255, 255, 255))) == pytest.approx(100.0, abs=1e-5)
    red, blue = np.array(LAB_REFERENCE[(255, 0, 0)]), np.array(LAB_REFERENCE[(0, 0, 255)])
    assert float(color_distance((255, 0, 0), (0, 0, 255))) == pytest.approx(
        np.linalg.norm(red - blue), abs=5e-3
    )
    assert float(color_distance((255, 0, 0), (0, 0, 255), space="rgb")) == pytest.approx(255 * math.sqrt(2))


# ------------------------------------------------------------------------------------------------------
# Background motion
# ------------------------------------------------------------------------------------------------------


def _moving_background(frames: int, step: int):
    rng = np.random.default_rng(2)
    texture = cv2.GaussianBlur(rng.integers(0, 256, (SIZE, SIZE * 2, 3)).astype(np.uint8), (0, 0), 2)
    texture = cv2.normalize(texture, None, 0, 255, cv2.NORM_MINMAX)
    return [texture[:, t * step : t * step + SIZE] for t in range(frames)]


def test_background_motion_static_and_moving():
    static = np.stack([draw_scene()] * 4)
    assert flow_energy(static) == pytest.approx(0.0, abs=1e-6)
    moving = []
    for background in _moving_background(4, 2):
        frame = draw_scene()
        character = np.any(frame != BACKGROUND, -1)
        moving.append(np.where(character[..., None], frame, background))
    moving = np.stack(moving)
    result = background_motion(static, moving, [pose()] * 4, limb_width=LIMB_WIDTH)
    assert result.generated_energy == pytest.approx(0.0, abs=1e-6)
    assert 2.0 < result.target_energy < 6.0  # 2 pixels a frame: energy near 2^2
    assert result.ratio == pytest.approx(0.0, abs=1e-6)
    assert result.difference == pytest.approx(-result.target_energy)
    assert 0.3 < result.background_share < 1.0
    same = background_motion(moving, moving, [pose()] * 4, limb_width=LIMB_WIDTH)
    assert same.ratio == pytest.approx(1.0) and same.difference == 0.0


# ------------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------------


def _keypoint_file(path, frames):
    points = np.zeros((frames, 134, 3))
    points[..., :2] = -1.0  # DWPose's mark for a missing point (score 0)
    points[:, :18, :2] = BODY
    points[:, :18, 2] = 0.9
    np.save(path, points)
    return path


def test_cli_on_mp4_files(tmp_path, capsys):
    target = np.stack([draw_scene()] * 4)
    generated = np.stack([draw_scene(limb_shift=(3, 4))] * 4)
    write_video(tmp_path / "target.mp4", target, fps=8)
    write_video(tmp_path / "generated.mp4", generated, fps=8)
    keypoints = _keypoint_file(tmp_path / "drive.npy", 4)
    (tmp_path / "palette.json").write_text(json.dumps(palette_dict(tolerance=40)))
    out = tmp_path / "scores" / "eval.json"
    args = ["--generated", str(tmp_path / "generated.mp4"), "--target", str(tmp_path / "target.mp4")]
    args += ["--keypoints", str(keypoints), "--palette", str(tmp_path / "palette.json")]
    args += ["--reference", str(tmp_path / "ref.png"), "--json", str(out)]
    cv2.imwrite(str(tmp_path / "ref.png"), draw_scene()[..., ::-1])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "PSNR dB (float64" in printed and "pose error, centroid px" in printed
    assert "LPIPS and FVD skipped" in printed
    report = json.loads(out.read_text())
    assert report["frames"] == 4 and report["height"] == report["width"] == SIZE
    assert 0 < report["image"]["l1"] < 20 and 10 < report["image"]["psnr_db"] < 40
    pose_gen, pose_target = report["pose"]["generated"], report["pose"]["target"]
    assert pose_gen["detection_rate"] == 1.0 and pose_target["detection_rate"] == 1.0
    assert pose_gen["centroid_px"] == pytest.approx(5.0, abs=0.7) and pose_target["centroid_px"] < 0.7
    assert report["identity"]["target"]["limbs"] < report["identity"]["generated"]["limbs"]
    assert report["background_motion"]["generated_energy"] < 0.1
    assert report["reference"]["palette_coverage"] == 1.0
    assert "lpips_fvd" in report["skipped"]


def test_cli_rejects_mismatched_inputs(tmp_path, capsys):
    frames = np.stack([draw_scene()] * 3)
    write_frames(tmp_path / "three", frames)
    write_frames(tmp_path / "two", frames[:2])
    write_frames(tmp_path / "small", frames[:, :64, :64])
    gen, two, small = (str(tmp_path / n) for n in ("three", "two", "small"))
    assert main(["--generated", gen, "--target", two]) == 2
    message = capsys.readouterr().err
    assert gen in message and two in message and "3 frames of 96x96" in message and "2 frames" in message
    with pytest.raises(EvalInputError, match="64x64.*nothing is resized"):
        evaluate(gen, small)
    _keypoint_file(tmp_path / "short.npy", 2)
    with pytest.raises(EvalInputError, match="short.npy have 2 frames"):
        evaluate(gen, gen, keypoints_path=tmp_path / "short.npy")
    (tmp_path / "palette.json").write_text(json.dumps({**palette_dict(), "height": 128}))
    with pytest.raises(EvalInputError, match="palette.json is for 96x128"):
        evaluate(
            gen,
            gen,
            keypoints_path=_keypoint_file(tmp_path / "k.npy", 3),
            palette_path=tmp_path / "palette.json",
        )
    with pytest.raises(EvalInputError, match="without keypoints"):
        evaluate(gen, gen, palette_path=tmp_path / "palette.json")
    # the module's entry point as `python -m` runs it: exit status 2, one line naming the missing weights
    argv = ["xdyna_jax.eval", "--generated", gen, "--target", gen, "--lpips-weights", "a.pth"]
    with (
        mock.patch.object(sys, "argv", argv),
        mock.patch.dict(sys.modules),
        pytest.raises(SystemExit) as exit_info,
    ):
        sys.modules.pop("xdyna_jax.eval.__main__")  # imported above as a module; run it afresh as a script
        runpy.run_module("xdyna_jax.eval", run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a.pth: no such LPIPS backbone weights file" in err
