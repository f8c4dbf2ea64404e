"""bench/dynamictrl_memory.py's sampling-step figure, on a small DynamiCtrl whose activations outweigh its
weights (width 32, 1024 video tokens, 6 blocks, "chunked" attention in blocks of 64 queries).

At inference a block's activations die when the next block starts, so the step's temporaries must not
grow with the depth: at full size every block's worth of activations held at once is 42 x 0.47 GiB. The
compile of one small step shows both what the bench relies on (the latents and the previous x0 written
in place) and that bound, in units of one (CFG batch x tokens x width) float32 activation."""

import jax.numpy as jnp
import pytest

from bench import dynamictrl_memory as bench

# one full compile of a 6-block step (6-11 s here): with the slow checks (make test-slow)
pytestmark = pytest.mark.slow

SIZE = bench.Size(frames=5, height=512, width=512, text=8)  # latent 2 x 64 x 64: 1024 video + 8 text tokens
LAYERS, CHUNK = 6, 64
# One float32 activation of the CFG batch: 2 x (1024 + 8) tokens x 32 channels.
ACTIVATION = bench.CFG_BATCH * (1024 + SIZE.text) * 32 * 4
# Independent of depth the step holds ~8 activations (2 and 12 blocks alike: the feed-forward's 4x-wide
# hidden layer in bf16 and XLA:CPU's float32 copy of it, the streams, a norm); a program that keeps one
# block's control tokens or attention output per block reaches ~13 at 6 blocks, ~19 at 12.
MAX_ACTIVATIONS = 11


@pytest.fixture(scope="module")
def memory():
    cfg = bench._transformer_config(True, CHUNK, layers=LAYERS)
    step, args = bench.sampling_step(cfg, SIZE)
    latent_bytes = args[1].size * args[1].dtype.itemsize + args[8].size * args[8].dtype.itemsize
    assert args[1].dtype == jnp.bfloat16 and args[8].dtype == jnp.float32
    return bench.memory_of(
        step, args, donate=(1, 8), options=bench._options(args[0], True, None)
    ), latent_bytes


def test_latents_and_previous_x0_are_updated_in_place(memory):
    mem, latent_bytes = memory
    assert mem["alias_bytes"] == latent_bytes
    # nothing else is written: the outputs beyond the donated buffers are the result tuple's pointers only
    assert mem["output_bytes"] - mem["alias_bytes"] <= 64


def test_step_temporaries_do_not_grow_with_depth(memory):
    mem, _ = memory
    assert mem["temp_bytes"] / ACTIVATION < MAX_ACTIVATIONS, mem["temp_bytes"] / ACTIVATION
