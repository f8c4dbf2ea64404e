"""DynamiCtrl's pose video: the retarget maps checked against least squares worked out here in pixels (and
known similarity maps recovered), the MimicMotion drawing's colours and sizes at known pixels, frame 0 the
reference's own pose, and the photo crop the reference pose is found in."""

import colorsys

import cv2
import numpy as np
import pytest
from oracle import standing_pose

from xdyna_jax.conditioning.mimicmotion_pose import (
    RETARGET_JOINTS,
    canvas_size,
    draw_pose_mimicmotion,
    dynamictrl_pose_video,
    fit_retarget,
    pose_reference_image,
    reference_pose_to_canvas,
    retarget_poses,
)
from xdyna_jax.conditioning.pose import COLORS, PoseFrame

DRIVING_HW = (480, 640)  # a landscape driving video
H, W = 1360, 768  # the release's canvas


def person(image_hw, *, rng, wave=0.0, shift=(0.0, 0.0), scale=1.0) -> PoseFrame:
    """The standing person (pixels of image_hw) with hands and a face around the wrists and nose; `wave`
    moves the elbows and wrists only, shift/scale move everything."""
    f = standing_pose(image_hw)
    body = f.body.copy()
    body[[3, 4, 6, 7], 1] -= wave * image_hw[0]
    hands = body[[7, 4], None, :] + rng.uniform(-8, 8, (2, 21, 2))
    face = body[0] + rng.uniform(-6, 6, (68, 2))
    centre = np.array([image_hw[1], image_hw[0]]) / 2
    move = lambda p: (p - centre) * scale + centre + np.array(shift)
    return PoseFrame(
        move(body),
        np.full(18, 0.9),
        move(hands),
        np.full((2, 21), 0.8),
        face=move(face),
        face_scores=np.full(68, 0.7),
    )


def points(f: PoseFrame) -> np.ndarray:
    return np.concatenate([f.body, f.hands.reshape(-1, 2), f.face])


def test_a_similarity_of_the_fitted_joints_is_recovered_with_the_releases_coefficients():
    rng = np.random.default_rng(0)
    # the fitted joints stand still; elbows, wrists, hands and face move (they must not sway the fit)
    driving = [person(DRIVING_HW, rng=rng, wave=0.05 * t) for t in range(5)]
    s, t = 1.7, np.array([-160.0, 210.0])  # pixels of the driving frame -> canvas pixels
    reference = driving[2].map_points(lambda p: s * p + t)
    fit = fit_retarget(driving, reference, height=H, width=W, driving_size=DRIVING_HW)
    fh, fw = DRIVING_HW
    # the release's coefficients act on fractions: y/H = ay * y/fh + by, x/W = ax * x/fw + bx
    np.testing.assert_allclose([fit.ay, fit.ax], [s * fh / H, s * fw / W], rtol=1e-12)
    np.testing.assert_allclose([fit.bx, fit.by], [t[0] / W, t[1] / H], rtol=1e-10, atol=1e-12)
    out = retarget_poses(driving, reference, height=H, width=W, driving_size=DRIVING_HW)
    for got, f in zip(out, driving, strict=True):
        assert not got.normalized
        np.testing.assert_allclose(points(got), s * points(f) + t, rtol=1e-10, atol=1e-8)
        np.testing.assert_array_equal(got.body_scores, f.body_scores)
        np.testing.assert_array_equal(got.hand_scores, f.hand_scores)
    # fractions of the driving frame give the same result as its pixels
    fractions = [f.to_normalized(*DRIVING_HW) for f in driving]
    again = retarget_poses(fractions, reference, height=H, width=W, driving_size=DRIVING_HW)
    np.testing.assert_allclose(points(again[3]), points(out[3]), rtol=1e-12, atol=1e-8)


def test_a_moving_person_follows_least_squares_in_pixels_anchored_on_the_first_nose():
    rng = np.random.default_rng(1)
    driving = [
        person(DRIVING_HW, rng=rng, wave=0.04 * t, shift=(9.0 * t, -4.0 * t), scale=1 + 0.03 * t)
        for t in range(6)
    ]
    driving[3].body[9] = np.nan  # a knee with no position: left out of the fit
    driving[4].body_scores[12] = 0.0  # OpenPose's (0, 0, 0) for a missing point
    driving[4].body[12] = 0.0
    reference = person((H, W), rng=rng, shift=(30.0, 55.0), scale=1.3)
    reference.body_scores[[10, 16]] = 0.25  # hidden in the reference: not fitted, whatever they hold
    reference.body[[10, 16]] = [5000.0, -5000.0]
    out = retarget_poses(driving, reference, height=H, width=W, driving_size=DRIVING_HW)

    # the same map worked out in pixels: one scale from least squares over y, the nose of frame 0 on the
    # reference's nose height, x matched on average
    joints = [j for j in RETARGET_JOINTS if j not in (10, 16)]
    pairs = [
        (f.body[j], reference.body[j])
        for f in driving
        for j in joints
        if np.isfinite(f.body[j]).all() and f.body_scores[j] > 0
    ]
    drv, ref = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    assert len(drv) == 6 * len(joints) - 2
    dy, ry = drv[:, 1] - drv[:, 1].mean(), ref[:, 1] - ref[:, 1].mean()
    s = (dy * ry).sum() / (dy * dy).sum()
    t = np.array([(ref[:, 0] - s * drv[:, 0]).mean(), reference.body[0, 1] - s * driving[0].body[0, 1]])
    for got, f in zip(out, driving, strict=True):
        np.testing.assert_allclose(points(got), s * points(f) + t, rtol=1e-9, atol=1e-7)
    assert out[0].body[0, 1] == pytest.approx(reference.body[0, 1], abs=1e-9)
    fit = fit_retarget(driving, reference, height=H, width=W, driving_size=DRIVING_HW)
    assert fit.ax == pytest.approx(fit.ay / ((DRIVING_HW[0] / DRIVING_HW[1]) / H * W), rel=1e-12)


def test_retargeting_refuses_what_it_cannot_fit():
    rng = np.random.default_rng(2)
    driving = [person(DRIVING_HW, rng=rng)]
    hidden = person((H, W), rng=rng)
    hidden.body_scores[list(RETARGET_JOINTS)] = 0.1
    with pytest.raises(ValueError, match="none of the reference's nose"):
        fit_retarget(driving, hidden, height=H, width=W)
    with pytest.raises(ValueError, match="empty driving sequence"):
        fit_retarget([], person((H, W), rng=rng), height=H, width=W)
    nobody = [PoseFrame.empty(), *driving]
    with pytest.raises(ValueError, match="driving frame 0 shows none"):
        fit_retarget(nobody, person((H, W), rng=rng), height=H, width=W)


# ------------------------------------------------------------------------------------------------------
# Drawing (at a size whose shorter side is 2160: the canvas is the image, pixels are exact)
# ------------------------------------------------------------------------------------------------------

DH, DW = 2400, 2160


def reversed_rgb(color) -> np.ndarray:
    """What a colour tuple of the release's drawing becomes in its RGB output (channels reversed)."""
    return np.array(color[::-1], np.uint8)


def drawing_frame() -> PoseFrame:
    body, scores = np.full((18, 2), np.nan), np.zeros(18)
    body[[1, 2]] = [(1000, 800), (1200, 800)]  # limb 0, horizontal
    scores[[1, 2]] = 1.0
    body[[9, 10]] = [(600, 1500), (600, 1700)]  # limb 8, vertical, dimmed by its scores
    scores[[9, 10]] = 0.5, 0.8
    body[[11, 12]] = [(1500, 1500), (1500, 1700)]  # limb 10: one end below 0.3
    scores[[11, 12]] = 0.29, 0.9
    hands, hand_scores = np.full((2, 21, 2), np.nan), np.zeros((2, 21))
    hands[0, [0, 1]] = [(300, 300), (400, 300)]  # edge 0 of the left hand
    hand_scores[0, [0, 1]] = 1.0
    hands[1, 0] = (0.5, 300)  # truncates to x = 0: never drawn
    hand_scores[1, 0] = 1.0
    face, face_scores = np.full((68, 2), np.nan), np.zeros(68)
    face[0], face_scores[0] = (1800, 300), 1.0
    return PoseFrame(body, scores, hands, hand_scores, face=face, face_scores=face_scores)


def test_drawing_colours_and_sizes_at_known_pixels():
    image = draw_pose_mimicmotion(drawing_frame(), DH, DW)
    assert image.shape == (DH, DW, 3) and image.dtype == np.uint8 and canvas_size(DH, DW) == (DH, DW)
    dim = lambda color, conf: reversed_rgb([int(int(c * conf) * 0.6) for c in color])
    # limb 0 at its midpoint, 2 x 4 + 1 pixels across
    np.testing.assert_array_equal(image[800, 1100], dim(COLORS[0], 1.0))
    assert (image[:, 1100] == dim(COLORS[0], 1.0)).all(-1).sum() == 9
    # limb 8: colour times both scores, then dimmed
    np.testing.assert_array_equal(image[1600, 600], dim(COLORS[8], 0.5 * 0.8))
    assert (image[1600] == dim(COLORS[8], 0.4)).all(-1).sum() == 9
    # joints on top in full colour times their score, radius 4
    np.testing.assert_array_equal(image[800, 1000], reversed_rgb(COLORS[1]))
    np.testing.assert_array_equal(image[1500, 600], reversed_rgb([int(c * 0.5) for c in COLORS[9]]))
    assert (image[800, 990:1010] == reversed_rgb(COLORS[1])).all(-1).sum() == 9
    # limb 10 has an end under 0.3 (that joint is not drawn, nor limb 9 to the neck); its other joint is
    assert not image[1600, 1500].any() and not image[1500, 1500].any()
    np.testing.assert_array_equal(image[1700, 1500], reversed_rgb([int(c * 0.9) for c in COLORS[12]]))
    # the hand: edge 0 in its hue (red, as a tuple), the points (0, 0, 255) as a tuple: reversed
    hue = [255 * c for c in colorsys.hsv_to_rgb(0.0, 1.0, 1.0)]
    np.testing.assert_array_equal(image[300, 350], reversed_rgb([round(c) for c in hue]))
    assert 2 <= (image[280:320, 350] == reversed_rgb((255, 0, 0))).all(-1).sum() <= 3
    np.testing.assert_array_equal(image[300, 300], reversed_rgb((0, 0, 255)))
    assert (image[300, 290:310] == reversed_rgb((0, 0, 255))).all(-1).sum() == 9
    assert not image[290:310, :10].any()  # the point at x = 0.5
    # the face point: white, radius 3
    assert (image[300, 1790:1810] == 255).all(-1).sum() == 7
    # nothing else was drawn
    lit = image.any(-1)
    lit[780:821, 990:1211] = lit[1490:1711, 590:611] = lit[1690:1711, 1490:1511] = False
    lit[290:311, 290:411] = lit[290:311, 1790:1811] = False
    assert not lit.any()


def test_sizes_are_fixed_on_the_2160_canvas_and_the_canvas_is_resized():
    frame = drawing_frame().to_normalized(DH, DW)  # the same pose as fractions, drawn at half the size
    assert canvas_size(DH // 2, DW // 2) == (DH, DW) and canvas_size(1360, 768) == (3825, 2160)
    big = draw_pose_mimicmotion(frame, DH, DW)
    expected = cv2.resize(big, (DW // 2, DH // 2), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(draw_pose_mimicmotion(frame, DH // 2, DW // 2), expected)


def test_the_pose_video_starts_with_the_references_own_pose():
    rng = np.random.default_rng(3)
    h, w = 64, 40
    driving = [person(DRIVING_HW, rng=rng, wave=0.03 * t, shift=(3.0 * t, 0.0)) for t in range(6)]
    reference = person((h, w), rng=rng, scale=0.8)
    video = dynamictrl_pose_video(reference, driving, h, w, 4, driving_size=DRIVING_HW)
    assert video.shape == (4, h, w, 3) and video.dtype == np.uint8
    np.testing.assert_array_equal(video[0], draw_pose_mimicmotion(reference, h, w))
    # the map is fitted on the three driving frames used, not on the ones after them
    moved = retarget_poses(driving[:3], reference, height=h, width=w, driving_size=DRIVING_HW)
    for got, f in zip(video[1:], moved, strict=True):
        np.testing.assert_array_equal(got, draw_pose_mimicmotion(f, h, w))
    assert not np.array_equal(video[1], video[0])
    assert dynamictrl_pose_video(reference, [], h, w, 1).shape == (1, h, w, 3)
    with pytest.raises(ValueError, match="8 pose frames need 7 driving frames .* got 6"):
        dynamictrl_pose_video(reference, driving, h, w, 8)


def test_the_reference_pose_is_found_in_the_cropped_photo_and_mapped_there():
    photo = np.zeros((300, 120, 3), np.uint8)  # taller than 64:40, so rows are cut
    photo[190:200, 60:70] = 255
    image = pose_reference_image(photo, 64, 40)
    assert image.shape == (64, 40, 3)
    ys, xs = np.nonzero(image[..., 0] > 127)
    weights = image[ys, xs, 0].astype(float)
    centre = np.array([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()
    pose = PoseFrame(np.full((18, 2), (64.5, 194.5)), np.ones(18))
    mapped = reference_pose_to_canvas(pose, photo.shape[:2], 64, 40)
    np.testing.assert_allclose(mapped.body[0], centre, atol=0.3)
    fractions = pose.to_normalized(*photo.shape[:2])
    again = reference_pose_to_canvas(fractions, photo.shape[:2], 64, 40)
    np.testing.assert_allclose(again.body, mapped.body, rtol=1e-12)
