"""bench/sample_cpu.py times our window step against diffusers (UNetMotionModel with its IP-Adapter processors +
two ControlNetModels, the weights converted through convert/); its ratio means something only if both sides
compute the same function. Checked here on a one-block cut of the tiny size (one block keeps the compile
short): the pipeline's compiled window step (ControlNets once for both CFG halves, zero residual on the
reference frame, IP tokens in the conditional half) equals the diffusers composition."""

import dataclasses

from bench.sample_cpu import TINY, like_for_like_check

ONE_BLOCK = dataclasses.replace(
    TINY,
    unet=dict(
        TINY.unet,
        block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
    ),
    cond_embedding=(8,),  # condition at the latent's size
    latent=(8, 8),
    frames=4,
)


def test_like_for_like_window_step_matches_diffusers():
    assert like_for_like_check(ONE_BLOCK) < 1e-4
