"""bench/reference_use.py: the x0 errors with the own and another clip's reference, on stand-in denoisers whose
answers are known (one that copies its reference, one that never reads it), and the CLI on a tiny bundle
and a latent dataset that prepare writes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracle import one_block_xdyna, save_xdyna_folder, write_training_inputs

from bench import reference_use
from xdyna_jax.data import prepare
from xdyna_jax.training.objective import ObjectiveConfig

ALPHAS = ObjectiveConfig().alphas_cumprod()
TIMESTEPS = (50, 500, 950)


def _clips(n_clips=3, windows=2, frames=3, seed=0):
    """Clips whose frames are their own scene plus a little motion, as a video's are."""
    rng = np.random.default_rng(seed)
    scenes = rng.standard_normal((n_clips, 1, 1, 4, 4, 4))
    return [
        [
            {
                "latents": jnp.asarray(
                    scenes[c] + 0.3 * rng.standard_normal((1, 1 + frames, 4, 4, 4)), jnp.float32
                ),
                "text": jnp.asarray(rng.standard_normal((1, 3, 8)), jnp.float32),
                "image_tokens": jnp.asarray(rng.standard_normal((1, 2, 8)), jnp.float32),
            }
            for _ in range(windows)
        ]
        for c in range(n_clips)
    ]


def _copier(window, t, context, pose, face):
    """The epsilon under which x0_hat is the reference latent exactly."""
    ab = ALPHAS[t][:, None, None, None, None]
    return (window - jnp.sqrt(ab) * window[:, :1]) / jnp.sqrt(1.0 - ab)


def _blind(window, t, context, pose, face):
    """Reads the noisy frames and the text, never the reference or the image tokens."""
    return 0.7 * window + jnp.tanh(window[:, 1:2])


def test_a_model_that_copies_its_reference_scores_the_copy_baseline_and_a_blind_one_ratio_1():
    clips = _clips()
    copy, zero = reference_use.baselines(clips)
    copied = reference_use.x0_errors(_copier, clips, TIMESTEPS, ALPHAS, jax.random.key(0))
    for t, (own, other) in copied.items():
        assert own == pytest.approx(copy, rel=1e-4), t  # x0_hat = own reference, at every timestep
        # another clip's reference is another scene: far from these frames
        assert other > 1.5 * own, (t, own, other)
    # the own reference's error by hand: driven latents against frame 0 of their window
    by_hand = np.mean(
        [
            np.mean((np.asarray(w["latents"])[:, 1:] - np.asarray(w["latents"])[:, :1]) ** 2)
            for c in clips
            for w in c
        ]
    )
    assert copy == pytest.approx(by_hand, rel=1e-6)
    assert zero == pytest.approx(
        np.mean([np.mean(np.asarray(w["latents"])[:, 1:] ** 2) for c in clips for w in c])
    )

    blind = reference_use.x0_errors(_blind, clips, TIMESTEPS, ALPHAS, jax.random.key(0))
    for t, (own, other) in blind.items():
        assert own == other, t
    with pytest.raises(ValueError, match="at least 2 clips"):
        reference_use.x0_errors(_blind, clips[:1], TIMESTEPS, ALPHAS, jax.random.key(0))


def test_cli_on_a_tiny_bundle_and_a_latent_dataset(tmp_path, capsys):
    save_xdyna_folder(one_block_xdyna(tmp_path, vae_scaling_factor=20.0), tmp_path / "xdyna", face=False)
    inputs = write_training_inputs(tmp_path / "in", names=("a", "b"), num_frames=6, size=(32, 32))
    data = tmp_path / "data"
    assert prepare.main([
        "--videos", str(inputs["videos"]), "--poses", str(inputs["poses"]), "--latents", str(tmp_path / "xdyna"),
        "--height", "8", "--width", "8", "--output", str(data),
    ]) == 0  # fmt: skip
    capsys.readouterr()
    argv = ["--model", str(tmp_path / "xdyna"), "--data", str(data), "--frames", "2", "--windows", "2",
            "--timesteps", "100,900"]  # fmt: skip
    assert reference_use.main(argv) == 0
    lines = [
        line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("task=reference_use")
    ]
    assert [fields[1] for fields in lines[:2]] == ["t=100", "t=900"]
    values = {k: float(v) for fields in lines for k, v in (f.split("=") for f in fields[2:])}
    assert all(np.isfinite(v) and v > 0 for v in values.values()), values
    with pytest.raises(SystemExit, match="--timesteps must lie in 0..999"):
        reference_use.main([*argv[:-1], "1000"])
