"""The X-Dyna structure at test size: runs a denoising call on a CPU in seconds."""

import ml_collections

from configs.models import compute_section
from configs.sharding import sharding_section


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.compute = compute_section()
    cfg.sharding = sharding_section()
    small = dict(
        block_out_channels=(32, 64),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,
        layers_per_block=1,
    )
    cfg.model = ml_collections.ConfigDict()
    cfg.model.unet = dict(
        small,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
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
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    cn = dict(
        small,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        conditioning_embedding_out_channels=(8, 16),
    )
    cfg.model.controlnet_pose = dict(cn, conditioning_channels=3)
    cfg.model.controlnet_face = dict(cn, conditioning_channels=6)
    cfg.frames = 4
    cfg.height, cfg.width = 32, 32
    return cfg
