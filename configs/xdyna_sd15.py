"""The paper's model: SD 1.5 + Dynamics-Adapter + IP-Adapter-plus (16 tokens) + AnimateDiff v1 motion modules
(PE 24, GroupNorm over frames, reference frame skipped) + pose (3-ch) and S-Face (6-ch) ControlNets."""

import ml_collections

from configs.models import compute_section
from configs.sharding import sharding_section


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.compute = compute_section()
    cfg.sharding = sharding_section()
    cfg.model = ml_collections.ConfigDict()
    cfg.model.unet = dict(
        dynamics_adapter=True,
        ip_adapter_tokens=16,
        motion_modules=True,
        motion_max_len=24,
        groupnorm_over_frames=True,
        skip_reference_frame=True,
    )
    cfg.model.vae = {}
    cfg.model.controlnet_pose = dict(conditioning_channels=3)
    cfg.model.controlnet_face = dict(conditioning_channels=6)
    cfg.frames = 16  # driven frames per window (+ 1 reference)
    cfg.height, cfg.width = 896, 512
    return cfg
