"""bench/dynamictrl_memory.py's figures, on a small DynamiCtrl whose activations outweigh its weights
(width 32, 1024 video tokens, "chunked" attention).

Sampling (6 blocks, query blocks of 64): at inference a block's activations die when the next block starts,
so the step's temporaries must not grow with the depth: at full size every block's worth of activations
held at once is 42 x 0.47 GiB. The compile of one small step shows both what the bench relies on (the
latents and the previous x0 written in place) and that bound, in units of one (CFG batch x tokens x width)
float32 activation.

SFT (task train): the step's setup at full size is checked from shapes (fast); with full remat per block
the backward pass keeps, per block, the video+text stream and a sixth of the control stream, so the
temporaries grow by about one bf16 stream a block (plus the block's gradients), not by the four a
program that keeps every control stream and allocates every attention's key / value gradient up front
grows by (slow: two compiles)."""

import jax
import jax.numpy as jnp
import pytest

from bench import dynamictrl_memory as bench
from xdyna_jax.training.dynamictrl_objective import DYNAMICTRL_BATCH_KEYS
from xdyna_jax.training.objective import check_batch

SIZE = bench.Size(frames=5, height=512, width=512, text=8)  # latent 2 x 64 x 64: 1024 video + 8 text tokens
LAYERS, CHUNK = 6, 64
# One float32 activation of the CFG batch: 2 x (1024 + 8) tokens x 32 channels.
ACTIVATION = bench.CFG_BATCH * (1024 + SIZE.text) * 32 * 4
# Independent of depth the step holds ~8 activations (2 and 12 blocks alike: the feed-forward's 4x-wide
# hidden layer in bf16 and XLA:CPU's float32 copy of it, the streams, a norm); a program that keeps one
# block's control tokens or attention output per block reaches ~13 at 6 blocks, ~19 at 12.
MAX_ACTIVATIONS = 11


@pytest.fixture(scope="module")
def memory():  # one full compile of a 6-block step (6-11 s here): only the slow tests use it
    cfg = bench._transformer_config(True, CHUNK, layers=LAYERS)
    step, args = bench.sampling_step(cfg, SIZE)
    latent_bytes = args[1].size * args[1].dtype.itemsize + args[8].size * args[8].dtype.itemsize
    assert args[1].dtype == jnp.bfloat16 and args[8].dtype == jnp.float32
    return bench.memory_of(
        step, args, donate=(1, 8), options=bench._options(args[0], True, None)
    ), latent_bytes


@pytest.mark.slow
def test_latents_and_previous_x0_are_updated_in_place(memory):
    mem, latent_bytes = memory
    assert mem["alias_bytes"] == latent_bytes
    # nothing else is written: the outputs beyond the donated buffers are the result tuple's pointers only
    assert mem["output_bytes"] - mem["alias_bytes"] <= 64


@pytest.mark.slow
def test_step_temporaries_do_not_grow_with_depth(memory):
    mem, _ = memory
    assert mem["temp_bytes"] / ACTIVATION < MAX_ACTIVATIONS, mem["temp_bytes"] / ACTIVATION


def test_train_setup_is_the_release_step_at_full_size():
    """Shapes only (2 of the 42 blocks): the release recipe's step on the README clip, one micro-batch."""
    trainer, state, batch, info = bench.train_setup(tiny=False, batch=2, layers=2)
    assert tuple(batch) == DYNAMICTRL_BATCH_KEYS
    check_batch(batch)
    assert batch["latents"].shape == (2, 10, 170, 96, 16) == batch["pose_latents"].shape
    assert batch["image_latents"].shape == (2, 1, 170, 96, 16)
    assert batch["text"].shape == (2, 226, 4096)
    assert (info["video_tokens"], info["text_tokens"]) == (20_400, 226)
    step = trainer.config
    assert (step.trainable, step.grad_accum_steps, dict(step.remat)) == (
        "transformer",
        1,
        {"transformer_blocks": "full"},
    )
    assert not jax.tree_util.tree_leaves(state.frozen)  # the whole DiT trains
    assert {x.dtype for x in jax.tree_util.tree_leaves(state.trainable)} == {jnp.dtype(jnp.float32)}
    # AdamW's two moments: twice the master weights' bytes in the state besides them
    moments = bench._param_bytes(state.opt_state)
    assert 2 <= moments / bench._param_bytes(state.trainable) < 2.01


TRAIN_SIZE = bench.Size(frames=5, height=512, width=512, text=8)  # latents 2 x 64 x 64: 1024 video tokens


def _train_memory(layers: int) -> dict:
    from xdyna_jax.sharding import make_mesh

    trainer, state, batch, _ = bench.train_setup(tiny=True, batch=2, layers=layers, size=TRAIN_SIZE)
    options = {**bench.FAST_COMPILE, **bench.NO_YNN_FUSIONS}
    return trainer.compile(
        state, batch, make_mesh(devices=jax.devices()[:1]), compiler_options=options
    ).memory


@pytest.mark.slow  # two compiles of a 6- and a 12-block SFT step (~25 s here)
def test_sft_step_keeps_about_one_stream_per_block():
    stream = 2 * (1024 + TRAIN_SIZE.text) * 32 * 2  # one bf16 (batch x tokens x width) stream
    small, large = _train_memory(6), _train_memory(12)
    per_block = (large["temp"] - small["temp"]) / 6 / stream
    # measured 1.76: the video+text stream, 1/6 of a control stream, the block's float32 gradients (0.64);
    # keeping every control stream and up-front key / value gradient zeros would make it ~4.6
    assert per_block < 2.5, per_block
