"""The synthetic-world X-Dyna: every part of the paper's model at a size a 2-core CPU trains from scratch in
half an hour (python -m xdyna_jax.training.scratch builds it; docs/synthetic.md trains it).

Frames of 96 x 64 pixels (portrait, the world's aspect) give 24 x 16 latents through a VAE that downscales 4x
(three encoder blocks; SD's 8x leaves a limb of these frames, 4 pixels wide, under one latent pixel, and a
VAE of this size trained for minutes then loses the palette colours); the UNet halves them twice
(24 x 16 -> 12 x 8 -> 6 x 4). Every part is
present: the video UNet with the Dynamics-Adapter, IP-Adapter tokens and motion modules (positional
encoding 24, GroupNorm over frames, the reference frame skipped: the paper's settings), pose (3-channel)
and S-Face (6-channel) ControlNets on the UNet's encoder, a CLIP-style image encoder with a Resampler for
the IP tokens, and a CLIP text encoder whose tokenizer we train ourselves (xdyna_jax/training/vocab.py).
`python -m xdyna_jax.training.scratch` prints how many numbers that is (4,892,979: 18.7 MiB in fp32).

`get_config("ci")` is the same structure at test size (32 x 32 frames, a VAE that downscales 2x, one UNet
block with attention in the mid block only, no S-Face ControlNet: a stage-2 run adds one):
tests/test_synthetic_training.py trains it through train.py.
"""

import ml_collections

from configs.models import compute_section
from configs.sharding import sharding_section

CROSS = 32  # the UNet's cross-attention width: the text encoder's hidden size and the Resampler's output
TEXT_LENGTH = 8  # the tokenizer's model_max_length = the text encoder's positions (only "" is ever encoded)
VOCAB_SIZE = 768  # the text encoder's rows: the trained tokenizer's vocabulary must fit (checked when built)


SIZES = ("demo", "ci")


def get_config(size: str = "demo") -> ml_collections.ConfigDict:
    if size not in SIZES:
        raise ValueError(f"configs/synthetic.py: unknown size {size!r} (sizes: {SIZES})")
    if size == "ci":
        return _ci_config()
    cfg = ml_collections.ConfigDict()
    cfg.compute = compute_section()
    cfg.sharding = sharding_section()
    encoder = dict(
        block_out_channels=(32, 64, 64),
        # attention at 12 x 8 and 6 x 4 only: at 24 x 16 (384 tokens, 768 keys with the reference's) it was
        # 60 % of the training step; the convolutions at 24 x 16 place what the attention below fetched
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=CROSS,
        attention_head_dim=4,  # heads per attention layer (diffusers' SD naming)
    )
    cfg.model = ml_collections.ConfigDict()
    cfg.model.unet = dict(
        encoder,
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        sample_size=24,
        dynamics_adapter=True,
        ip_adapter_tokens=4,
        motion_modules=True,
        motion_max_len=24,
        motion_heads=4,
        motion_norm_groups=8,
        groupnorm_over_frames=True,
        skip_reference_frame=True,
    )
    cfg.model.vae = dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=96,
        # SD's value until the VAE stage measures its own (xdyna_jax/training/vae_stage.py)
        scaling_factor=0.18215,
    )
    controlnet = dict(encoder, conditioning_embedding_out_channels=(8, 16, 32))  # 4x, as the VAE
    cfg.model.controlnet_pose = dict(controlnet, conditioning_channels=3)
    cfg.model.controlnet_face = dict(controlnet, conditioning_channels=6)
    cfg.model.image_encoder = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=32,  # 224 / 32 = 7 x 7 patches
        projection_dim=32,
    )
    cfg.model.resampler = dict(
        dim=32, depth=1, dim_head=8, heads=4, num_queries=4, embedding_dim=32, output_dim=CROSS
    )
    cfg.model.text_encoder = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=CROSS,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        projection_dim=CROSS,
    )
    cfg.tokenizer = dict(model_max_length=TEXT_LENGTH, vocab_size=VOCAB_SIZE)
    cfg.frames = 4  # driven frames per training window (+ 1 reference); sampling windows may be longer
    cfg.height, cfg.width = 96, 64
    return cfg


def _ci_config() -> ml_collections.ConfigDict:
    """Every part, as small as it runs: 32 x 32 frames -> 16 x 16 latents, one UNet block of width 16."""
    cfg = get_config("demo")
    encoder = dict(  # attention only in the mid block: one place for the adapter and the IP tokens
        block_out_channels=(16,),
        down_block_types=("DownBlock2D",),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
    )
    cfg.model.unet = dict(
        cfg.model.unet, **encoder, up_block_types=("UpBlock2D",), sample_size=16, ip_adapter_tokens=2,
        motion_heads=2, motion_norm_groups=4,
    )  # fmt: skip
    cfg.model.vae = dict(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=32,
    )
    controlnet = dict(encoder, conditioning_embedding_out_channels=(4, 4))  # 2x, as the VAE
    cfg.model.controlnet_pose = dict(controlnet, conditioning_channels=3)
    del cfg.model.controlnet_face  # stage 2 makes it from the UNet (training/init.py); half the compile time
    cfg.model.image_encoder = dict(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, patch_size=56,
        projection_dim=8,
    )  # fmt: skip
    cfg.model.resampler = dict(
        dim=8, depth=1, dim_head=4, heads=2, num_queries=2, embedding_dim=16, output_dim=8
    )
    cfg.model.text_encoder = dict(
        cfg.model.text_encoder, hidden_size=8, intermediate_size=16, num_attention_heads=2, projection_dim=8
    )
    cfg.frames = 2
    cfg.height, cfg.width = 32, 32
    return cfg
