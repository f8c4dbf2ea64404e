"""The shipped demo (assets/demo, what `make demo` samples): every file there, consistent with the others and
with the model (CI); and, as a slow check, `make demo` itself, scored by `python -m xdyna_jax.eval` against
the held-out dance it follows, beating random weights sampled by the same command.

The demo's reference photo is the identity's own portrait, on another background than the dance's clip, so
the PSNR against that clip is low for any model that keeps the reference's scene (as X-Dyna should). Measured
(this machine, seed 0): PSNR 11.12 dB vs 9.18 dB for random weights, limb identity error 74.2 vs 86.3 ΔE76;
the capped pose error is 11.43 vs 11.51 px (cap 11.5): the demo model does not yet place the limbs, so no
margin is asserted on it (docs/synthetic.md)."""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from xdyna_jax.eval.evaluate import evaluate
from xdyna_jax.eval.palette import read_palette
from xdyna_jax.io.video import read_image, read_video
from xdyna_jax.sampling.bundles import read_manifest
from xdyna_jax.training.demo_recipe import MAX_BUNDLE_BYTES, folder_bytes

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
PARTS = ("unet", "controlnet_pose", "controlnet_face", "vae", "text_encoder", "image_encoder", "resampler",
         "tokenizer", "scheduler")  # fmt: skip
# what `make demo` asks for (the Makefile's settings)
HEIGHT, WIDTH = 96, 64
PSNR_MARGIN_DB = 1.5  # measured 1.94 dB
IDENTITY_MARGIN = 8.0  # ΔE76 of the limbs; measured 12.2


def test_the_demo_assets_are_complete_and_agree_with_each_other():
    model = DEMO / "model"
    manifest = read_manifest(model)
    assert all((model / part).is_dir() for part in PARTS), sorted(p.name for p in model.iterdir())
    assert folder_bytes(model) <= MAX_BUNDLE_BYTES
    # no path of the machine that trained it: the bundle is read from wherever the clone is
    assert not any(Path(str(path)).is_absolute() for path in manifest.get("init", {}).values()), manifest
    reference = read_image(DEMO / "reference.png")
    assert reference.shape == (HEIGHT, WIDTH, 3)
    video, fps = read_video(DEMO / "driving.mp4")
    poses, landmarks = np.load(DEMO / "driving_pose.npy"), np.load(DEMO / "driving_landmarks.npy")
    assert video.shape[1:] == (HEIGHT, WIDTH, 3) and fps
    assert len(poses) == len(landmarks) == len(video) > 1
    assert poses.shape[-1] == 3 and landmarks.shape[1:] == (68, 2)  # (x, y, score) keypoints; 68 landmarks
    assert len(read_palette(DEMO / "palette.json").limbs) > 0


@pytest.mark.slow
def test_make_demo_animates_the_heldout_identity_far_better_than_random_weights(tmp_path):
    from xdyna_jax.training import scratch

    assert scratch.main(["--config", f"{ROOT / 'configs' / 'train_xdyna.py'}:synthetic", "--out",
                         str(tmp_path / "random"), "--seed", "0"]) == 0  # fmt: skip
    scores = {}
    for name, model in (("demo", DEMO / "model"), ("random", tmp_path / "random")):
        out = tmp_path / name
        subprocess.run(["make", "demo", f"DEMO_MODEL={model}", f"DEMO_OUT={out}"], cwd=ROOT, check=True)
        result, _ = read_video(out / "demo.mp4")
        assert result.shape == read_video(DEMO / "driving.mp4")[0].shape
        assert (out / "demo_grid.mp4").is_file()
        report = evaluate(out / "demo.mp4", DEMO / "driving.mp4", keypoints_path=DEMO / "driving_pose.npy",
                          palette_path=DEMO / "palette.json")  # fmt: skip
        scores[name] = (report["image"]["psnr_db"], report["identity"]["generated"]["limbs"])
    (demo_psnr, demo_identity), (random_psnr, random_identity) = scores["demo"], scores["random"]
    assert demo_psnr > random_psnr + PSNR_MARGIN_DB, scores
    assert demo_identity < random_identity - IDENTITY_MARGIN, scores
