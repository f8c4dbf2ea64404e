"""DynamiCtrl fine-tuning end to end: a tiny fake release (PyTorch classes, random weights) converted with
`convert dynamictrl`, videos + pose videos + a captions file prepared with `python -m xdyna_jax.data.prepare
--model dynamictrl`, then `train.py --config dynamictrl_tiny` on that dataset. The dataset holds what the
frozen VAE and T5 give for each clip (the same on a rerun with the seed), the run's exported bundle loads as
a DynamiCtrl pipeline with only its transformer changed, and the fine-tuned transformer fits the prepared
clips: its loss on them, under fixed draws, is a fraction of the initial one. Bad inputs stop with one
`error:` line and nothing written."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracle import FAST_COMPILE_SETS as FAST_COMPILE
from oracle import standing_pose
from oracle_dynamictrl_release import write_release

import train
import xdyna_jax
from convert.__main__ import main as convert_main
from xdyna_jax.data import prepare
from xdyna_jax.io.video import write_video
from xdyna_jax.nn.compute import Compute
from xdyna_jax.sampling.bundles import load_dynamictrl
from xdyna_jax.training import export
from xdyna_jax.training.dynamictrl_objective import (
    DynamiCtrlObjectiveConfig,
    draw_dynamictrl,
    dynamictrl_loss,
)

pytestmark = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")
H = W = 32  # the tiny VAE's 4x: latents 8 x 8, i.e. 4 x 4 video tokens per latent frame pair
FRAMES, VIDEO_FRAMES = 5, 8  # clips of 5 frames (2 latent frames) from 8-frame videos
CAPTIONS = {"alice": "a woman in a red dress dances", "bob": "a man waves on a beach"}


def smooth_video(n, h, w, seed):
    """Frames of drifting colour gradients (something a VAE encodes to varied latents)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 6, 3)
    frames = [np.stack([np.sin(6 * x + 3 * y + phase[c] + 0.4 * t) for c in range(3)], -1) for t in range(n)]
    return ((np.stack(frames) + 1) * 127.5).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamictrl_train")
    write_release(root / "release", control=True)
    assert (
        convert_main(["dynamictrl", "--input", str(root / "release"), "--output", str(root / "bundle")]) == 0
    )
    for d in ("videos", "poses"):
        (root / d).mkdir()
    for i, name in enumerate(CAPTIONS):
        write_video(root / "videos" / f"{name}.mp4", smooth_video(VIDEO_FRAMES, 40, 48, seed=i), fps=8)
        write_video(root / "poses" / f"{name}.mp4", smooth_video(VIDEO_FRAMES, 40, 48, seed=10 + i), fps=8)
    lines = [f"{name}.mp4#####{caption}" for name, caption in CAPTIONS.items()]
    (root / "prompts.txt").write_text("\n".join(lines) + "\n")
    return root


def prepare_argv(root, output, *extra, captions="prompts.txt"):
    return [
        "--model", "dynamictrl", "--bundle", str(root / "bundle"), "--videos", str(root / "videos"),
        "--pose-videos", str(root / "poses"), "--captions", str(root / captions), "--id-token", "BW_STYLE ",
        "--frames", str(FRAMES), "--height", str(H), "--width", str(W), "--clips-per-video", "2",
        "--dtype", "float32", "--no-tiling", "--output", str(output), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(files):
    assert prepare.main(prepare_argv(files, files / "data")) == 0
    return files / "data"


def examples(folder):
    return {p.name: dict(np.load(p)) for p in sorted(folder.glob("*.npz"))}


@pytest.mark.slow  # preparing the dataset compiles the VAE and T5 (~15 s): make test-slow
def test_prepared_clips_hold_the_frozen_encoders_outputs(files, dataset):
    info = json.loads((dataset / "dataset.json").read_text())
    assert info["shapes"] == {
        "latents": [2, 8, 8, 4], "image_latents": [1, 8, 8, 4], "pose_latents": [2, 8, 8, 4], "text": [8, 32],
    }  # fmt: skip
    data = examples(dataset)
    assert sorted(data) == ["alice.0.npz", "alice.1.npz", "bob.0.npz", "bob.1.npz"]
    assert all(1 <= c["start"] <= VIDEO_FRAMES - FRAMES for c in info["clips"])
    parts = load_dynamictrl(files / "bundle", compute=Compute(precision="highest"), param_dtype="float32")
    for name, caption in CAPTIONS.items():  # T5 of id token + caption, no mask, padded to the text length
        ids, _ = parts.tokenizer(["BW_STYLE " + caption], max_length=8)
        text = np.asarray(parts.text_encoder(jnp.asarray(ids)))[0]
        np.testing.assert_allclose(data[f"{name}.0.npz"]["text"], text, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(data[f"{name}.0.npz"]["text"], data[f"{name}.1.npz"]["text"])
    # latents are posterior samples x 0.7 of the clip: near the scaled posterior mean, not equal to it
    clip = data["alice.0.npz"]
    from xdyna_jax.io.video import read_video

    frames, _ = read_video(files / "videos" / "alice.mp4")
    start = int(clip["start"])
    pixels = jnp.asarray(prepare_frames(frames[start : start + FRAMES]))[None]
    mean, logvar = parts.vae.encode(pixels)
    z = (clip["latents"] / 0.7 - np.asarray(mean[0])) / np.exp(0.5 * np.asarray(logvar[0]))
    assert 0.5 < z.std() < 1.5 and abs(z.mean()) < 0.3  # the sample's noise is a standard normal draw
    assert not np.allclose(clip["pose_latents"], clip["latents"])
    assert 0 < clip["reference_sigma"] < 1


def prepare_frames(frames):
    from xdyna_jax.io.driving import resize_frames

    return resize_frames(np.ascontiguousarray(frames), H, W).astype(np.float32) / 127.5 - 1.0


@pytest.mark.slow
def test_the_seed_fixes_the_dataset(files, dataset, tmp_path):
    assert prepare.main(prepare_argv(files, tmp_path / "again")) == 0
    first, again = examples(dataset), examples(tmp_path / "again")
    for name in first:
        for key in ("latents", "image_latents", "pose_latents", "text"):
            np.testing.assert_array_equal(first[name][key], again[name][key])
    assert prepare.main(prepare_argv(files, tmp_path / "other", "--seed", "1")) == 0
    other = examples(tmp_path / "other")
    assert not np.array_equal(first["alice.0.npz"]["latents"], other["alice.0.npz"]["latents"])


@pytest.mark.slow
def test_keypoints_are_drawn_into_the_pose_latents(files, dataset, tmp_path):
    """--poses keypoints (the video's pixels) drawn MimicMotion-style instead of rendered pose videos."""
    (files / "keypoints").mkdir(exist_ok=True)
    for name in CAPTIONS:
        frames = [standing_pose((40, 48), raise_right_wrist=0.03 * t) for t in range(VIDEO_FRAMES)]
        points = np.stack([np.concatenate([f.body, f.body_scores[:, None]], 1) for f in frames])
        np.save(files / "keypoints" / f"{name}.npy", points.astype(np.float32))
    argv = prepare_argv(files, tmp_path / "kp")
    i = argv.index("--pose-videos")
    argv[i : i + 2] = ["--poses", str(files / "keypoints")]
    assert prepare.main(argv) == 0
    drawn, rendered = examples(tmp_path / "kp"), examples(dataset)
    for name in drawn:  # same clips (the seed), other pose latents; the video latents unchanged
        np.testing.assert_array_equal(drawn[name]["latents"], rendered[name]["latents"])
        assert not np.allclose(drawn[name]["pose_latents"], rendered[name]["pose_latents"])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(captions="few.txt"), "no caption for 1 video"),
        (dict(extra=("--frames", "9")), "3 latent frames"),
        (dict(extra=("--height", "36")), "--height must be a positive multiple of 8"),
        (dict(extra=("--frames", "13")), "fewer than a clip's --frames 13"),
        (dict(extra=("--tiling",)), "the VAE's tiles do not fit 32x32 frames"),
    ],
)
def test_bad_inputs_stop_before_anything_is_written(files, tmp_path, capsys, change, message):
    (files / "few.txt").write_text("alice#####a woman\n")
    argv = prepare_argv(
        files, tmp_path / "out", *change.get("extra", ()), captions=change.get("captions", "prompts.txt")
    )
    assert prepare.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def train_argv(files, data, output, steps, *sets):
    overrides = [f"height={H}", f"width={W}", "train.mfu=False", *FAST_COMPILE, *sets]
    return [
        "--config", "dynamictrl_tiny", "--init", f"dynamictrl={files / 'bundle'}", "--data", str(data),
        "--output", str(output), "--steps", str(steps), "--devices", "1",
        *[a for s in overrides for a in ("--set", s)],
    ]  # fmt: skip


def fixed_draw_loss(transformer, data, cfg, draws=8):
    """Mean SFT loss over the prepared clips under `draws` fixed draws each (the same for every model)."""
    total = []
    for i, ex in enumerate(data.values()):
        batch = {k: jnp.asarray(ex[k])[None] for k in ("latents", "image_latents", "pose_latents", "text")}
        for j in range(draws):
            d = draw_dynamictrl(jax.random.key(1000 * i + j), batch["latents"].shape, cfg)
            total.append(float(dynamictrl_loss(transformer, batch, d, cfg)))
    return float(np.mean(total))


@pytest.mark.slow
def test_train_run_mismatched_dataset_is_refused_before_compiling(files, dataset, tmp_path, capsys):
    assert train.main(train_argv(files, dataset, tmp_path / "run", 2, "height=64", "width=64")) == 2
    err = capsys.readouterr().err
    assert "was prepared at 5 frames 32x32" in err and "latents (2, 8, 8, 4) vs (2, 16, 16, 4)" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# Measured: 3.41x after 150 steps, 4.77x after 300 (the tiny config's constant lr 2e-2, batch 2 of the 4 clips);
# a step that does not learn stays near 1x.
@pytest.mark.slow  # 300 steps, ~35 s (make test-slow)
def test_fine_tuning_through_train_py_fits_the_prepared_clips(files, dataset, tmp_path):
    assert train.main(train_argv(files, dataset, tmp_path / "run", 300)) == 0
    bundle = tmp_path / "run" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (
        manifest["kind"] == "dynamictrl"
        and manifest["step"] == 300
        and manifest["trainable"] == "transformer"
    )
    compute = Compute(precision="highest", attention="xla")
    before = xdyna_jax.load(files / "bundle" / "transformer", compute=compute, param_dtype="float32")
    after = load_dynamictrl(bundle, compute=compute, param_dtype="float32")
    for name in ("vae", "text_encoder"):  # the frozen parts are the init bundle's
        a = nnx.to_flat_state(nnx.state(getattr(after, name), nnx.Param))
        b = xdyna_jax.load(files / "bundle" / name, param_dtype="float32")
        for (pa, va), (_, vb) in zip(a, nnx.to_flat_state(nnx.state(b, nnx.Param)), strict=True):
            np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()), str(pa))
    # the export CLI rebuilds the same bundle from the last checkpoint
    assert export.main([str(tmp_path / "run"), "--output", str(tmp_path / "exported")]) == 0
    exported = xdyna_jax.load(tmp_path / "exported" / "transformer", param_dtype="float32")
    pairs = zip(
        nnx.to_flat_state(nnx.state(exported, nnx.Param)),
        nnx.to_flat_state(nnx.state(after.transformer, nnx.Param)),
        strict=True,
    )
    for (path, a), (_, b) in pairs:
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), str(path))
    cfg = DynamiCtrlObjectiveConfig()
    data = examples(dataset)
    ratio = fixed_draw_loss(before, data, cfg) / fixed_draw_loss(after.transformer, data, cfg)
    assert ratio > 3.0, ratio
