"""train.py end to end on a one-block X-Dyna saved to disk: a run killed with SIGKILL and resumed ends
bit-identical to an uninterrupted one, SIGTERM saves before exiting, a NaN loss stops the run with the last
good checkpoint intact, the bundles load straight onto their shards, a checkpoint restores onto other meshes,
and the exported bundle samples through sample.py."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracle import FAST_COMPILE_SETS as FAST_COMPILE
from oracle import assert_placed_by_rules, one_block_xdyna, save_xdyna_folder, tensorboard_images

import sample
import train
import xdyna_jax
from configs.sharding import sharding_section
from xdyna_jax.io.video import write_video
from xdyna_jax.nn.compute import Compute
from xdyna_jax.sharding import LogicalSharding, make_mesh, param_shardings, rules_from_config
from xdyna_jax.training import export
from xdyna_jax.training.checkpoint import Checkpoints, abstract_state
from xdyna_jax.training.optimizer import OptimizerConfig
from xdyna_jax.training.remat import LAYERS
from xdyna_jax.training.sources import write_npz_example
from xdyna_jax.training.start import build_models, parse_init
from xdyna_jax.training.step import StepConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
H = W = 8  # frames; the one-block VAE keeps the resolution (latents 8 x 8)
NO_LAYER_REMAT = [f"step.remat.{layer}=none" for layer in LAYERS]  # tiny model: no recomputation
OVERRIDES = [
    f"height={H}", f"width={W}", "frames=2", "batch_size=2", "compute.dtype=float32",
    "step.frozen_dtype=float32", "step.remat.down_blocks=none", "step.remat.mid_block=none",
    "step.remat.up_blocks=none", *NO_LAYER_REMAT, "optimizer.learning_rate=1e-3", "optimizer.warmup_steps=0",
    "optimizer.ema_decay=0.5", "train.log_every=2", "train.save_every=2", "train.mfu=False", "train.export=False", *FAST_COMPILE,
]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_xdyna_folder(one_block_xdyna(root), root / "xdyna", face=False)
    rng = np.random.default_rng(0)
    for name, count in (("data", 6), ("val", 2)):
        (root / name).mkdir()
        for i in range(count):
            example = dict(
                frames=rng.integers(0, 256, (3, H, W, 3), dtype=np.uint8),
                pose=rng.integers(0, 256, (2, H, W, 3), dtype=np.uint8),
                face=rng.integers(0, 256, (2, H, W, 6), dtype=np.uint8),
            )
            write_npz_example(root / name / f"clip{i}.npz", example)
    return root


def argv(files, output, *extra, steps=6):
    sets = [a for s in OVERRIDES for a in ("--set", s)]
    return ["--config", "stage1", "--init", f"xdyna={files / 'xdyna'}", "--data", str(files / "data"),
            "--output", str(output), "--steps", str(steps), "--devices", "1", *sets, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for this module's runs (the subprocesses and this process compile
    the same programs); this process's settings are restored afterwards."""
    folder = tmp_path_factory.mktemp("jax_cache")
    keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
            "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")  # fmt: skip
    old = {k: getattr(jax.config, k) for k in keys}
    sample.configure_compile_cache(folder)
    yield folder
    for k, v in old.items():
        jax.config.update(k, v)


def _params(state_tree) -> dict:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state_tree)}


def _steps(folder: Path) -> list[int]:
    ckpt = folder / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def _start(files, output, cache, *extra):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")  # fmt: skip
    cmd = [sys.executable, str(ROOT / "train.py"), *argv(files, output, *extra, steps=1000)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for_checkpoint(proc, output, after: int, timeout=120):
    t0 = time.time()
    while not any(s > after for s in _steps(output)):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < timeout, "no checkpoint written"
        time.sleep(0.05)


def _restore(output, step=None):
    ckpts = Checkpoints(output / "checkpoints", asynchronous=False)
    state = ckpts.manager.restore(step or ckpts.latest_step())
    ckpts.close()
    return state


# ~2 min of subprocess runs: CI measured 19 m 57 s with it (the limit is 20), so it runs with make test-slow
@pytest.mark.slow
def test_killed_and_resumed_run_ends_bit_identical_and_sigterm_saves_first(files, tmp_path, compile_cache):
    run = tmp_path / "interrupted"
    proc = _start(files, run, compile_cache)  # 1000 steps: it is stopped long before
    _wait_for_checkpoint(proc, run, after=0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_steps(run))
    proc = _start(files, run, compile_cache, "--resume", "--set", "train.save_every=1000")
    out = ""
    t0 = time.time()
    while "step " not in out:  # a step logged after resuming: then SIGTERM
        assert proc.poll() is None and time.time() - t0 < 120
        line = proc.stdout.readline()
        out += line if line.startswith("step ") else ""
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, rest
    stopped_at = max(_steps(run))
    assert stopped_at > killed_at and stopped_at % 1000  # saved on SIGTERM, off the save interval
    assert f"SIGTERM: saved step {stopped_at}" in rest
    total = stopped_at + 2
    assert train.main([*argv(files, run, steps=total), "--resume"]) == 0
    preview = ["--set", f"train.sample_every={total}", "--set", "train.sample_steps=2"]  # at the last step
    assert train.main(argv(files, tmp_path / "straight", *preview, steps=total)) == 0
    a, b = _restore(run), _restore(tmp_path / "straight")
    assert int(a["state"]["step"]) == int(b["state"]["step"]) == total
    for item in ("trainable", "opt_state", "ema"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, a["state"][item], b["state"][item])
    assert a["data"] == b["data"]  # the sample preview of the straight run changed nothing
    [(at, grid)] = tensorboard_images(tmp_path / "straight" / "tensorboard")["sample/frames"]
    assert at == total and grid.shape == (H, 2 * W, 3) and grid.std() > 0  # its 2 frames side by side
    # the uninterrupted run's checkpoint -> a bundle that sample.py animates with
    bundle = tmp_path / "bundle"
    assert export.main([str(tmp_path / "straight"), "--output", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["weights"] == "ema" and manifest["step"] == total
    unet = _params(nnx.state(xdyna_jax.load(bundle / "unet"), nnx.Param))
    unet = {".".join(map(str, k)): v for k, v in unet.items()}
    ema = jax.tree_util.tree_flatten_with_path(b["state"]["ema"])[0]
    for path, value in ema:  # the exported UNet holds the EMA of the trained set
        keys = [str(getattr(k, "key", k)) for k in path]
        keys = keys[:-1] if keys[-1] == "value" else keys  # the restored dict keeps the Variable level
        if keys[0] == "unet":
            np.testing.assert_array_equal(unet[".".join(keys[1:])], value)
    write_video(tmp_path / "pose.mp4", np.zeros((2, 24, 16, 3), np.uint8) + 128, fps=10)
    import imageio.v2 as imageio

    imageio.imwrite(tmp_path / "ref.png", np.full((24, 16, 3), 90, np.uint8))
    sample_args = ["--model", str(bundle), "--reference", str(tmp_path / "ref.png"), "--pose",
                   str(tmp_path / "pose.mp4"), "--out", str(tmp_path / "out.mp4"), "--height", "24", "--width",
                   "16", "--steps", "1", "--devices", "1", "--no-compile-cache"]  # fmt: skip
    assert sample.main(sample_args) == 0 and (tmp_path / "out.mp4").is_file()
    assert unet


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(files, tmp_path, compile_cache, capsys):
    run = tmp_path / "nan"
    assert train.main(argv(files, run, "--set", "debug.nan_at_step=3", steps=6)) == 3
    err = capsys.readouterr().err
    assert "error: loss is nan at step 3 (steps 3..4 checked here)" in err
    assert "last good checkpoint: step 2" in err
    assert _steps(run) == [2]
    state = _restore(run)["state"]
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["trainable"]))


def _random_state(shapes, seed: int = 3):
    """Host values of a TrainState's shapes: every float leaf its own noise (a fresh state's Adam moments are
    all zero: comparing zeros proves nothing), integer leaves counting up. Drawn on the host: a jitted
    draw of every leaf compiles for minutes on CPU."""
    rng = np.random.default_rng(seed)

    def value(x):
        if jnp.issubdtype(x.dtype, jnp.floating):
            return rng.standard_normal(x.shape).astype(x.dtype)
        return np.arange(math.prod(x.shape), dtype=x.dtype).reshape(x.shape)

    return jax.tree_util.tree_map(value, shapes)


def test_bundles_load_onto_their_shards_and_a_checkpoint_restores_onto_other_meshes(files, tmp_path):
    """The run's models loaded from the X-Dyna bundle straight onto an 8-device mesh (every param placed as
    the config's rules say, values as loaded on one device); a TrainState saved on data 2 x fsdp 4 restores
    onto data 1 x fsdp 8 and onto one device bit for bit, each array on the sharding asked for."""
    rules = rules_from_config(sharding_section().rules)
    init = parse_init({"xdyna": str(files / "xdyna")})
    single = build_models(init, "stage1", Compute(), 0)
    mesh = make_mesh(data=2, fsdp=4)
    built = build_models(init, "stage1", Compute(), 0, LogicalSharding(mesh, rules))

    def parts(run):
        m = run.models
        return dict(denoiser=m.denoiser, image_encoder=m.image_encoder, resampler=m.resampler, vae=run.vae,
                    text_encoder=run.text_encoder)  # fmt: skip

    split = 0
    for ours, ref in zip(parts(built).values(), parts(single).values(), strict=True):
        split += assert_placed_by_rules(ours, ref, mesh, rules)
    assert split, "no parameter is split over fsdp"

    trainer = Trainer(built.models.denoiser, StepConfig(), OptimizerConfig(ema_decay=0.5))
    trainable, frozen = trainer.split(built.models.denoiser)
    null_tokens, key = jnp.zeros((2, 8), jnp.float32), jax.random.key(0)
    shapes = jax.eval_shape(trainer.init_state, trainable, frozen, null_tokens, key)

    def shardings(mesh):
        return trainer.state_shardings(shapes, mesh, lambda tree: param_shardings(tree, mesh, rules))

    saved = _random_state(shapes).replace(step=np.int32(7))
    ckpts = Checkpoints(tmp_path / "checkpoints", asynchronous=False)
    ckpts.save(7, jax.device_put(saved, shardings(mesh)), data_state={"position": 3}, config={"run": "a"})
    for other in (make_mesh(data=1, fsdp=8), make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])):
        target = shardings(other)
        restored, position, config = ckpts.restore(abstract_state(shapes, target))
        assert position == {"position": 3} and config == {"run": "a"} and int(restored.step) == 7
        got, want = jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(target)
        assert len(got) == len(want) == len(jax.tree_util.tree_leaves(saved))
        for leaf, sharding in zip(got, want, strict=True):
            assert leaf.sharding == sharding, (leaf.sharding, sharding)
        jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(restored), saved)
    ckpts.close()
