"""DynamiCtrl fine-tuning: the release's full-transformer SFT recipe, and a `tiny` variant for CPU tests.

`get_config()` (or `get_config("release")`) is the release's recipe: the whole 5.8 B transformer trains
(trainable set `transformer`), VAE and T5 stay frozen outside the step (their latents and text embeddings
are precomputed), AdamW beta (0.9, 0.95), weight decay 1e-3, eps 1e-8, lr 5e-6 with 1000 warmup steps and a
cosine to 0 at 50k steps, global-norm clip 1.0, bf16 compute on fp32 master weights, every DiT block
recomputed in the backward pass. Clips of 37 frames at 1360 x 768 (H x W; 10 x 170 x 96 latents).
`get_config("tiny")`: the tiny 1.5-style DynamiCtrl of the tests, fp32, no recomputation.
`training_configs(cfg)` turns the sections into (StepConfig, OptimizerConfig, DynamiCtrlObjectiveConfig).
"""

from __future__ import annotations

import ml_collections

from configs.sharding import sharding_section
from xdyna_jax.training import sections
from xdyna_jax.training.dynamictrl_objective import DynamiCtrlObjectiveConfig
from xdyna_jax.training.step import StepConfig

__all__ = ["get_config", "training_configs"]

VARIANTS = ("release", "tiny")

# diffusers kwargs of the tiny transformer (the tests' TINY_COGVIDEOX_15 too): latents of
# (F', h, w) = (2, 8, 8) make 1 x 4 x 4 video tokens
TINY_TRANSFORMER = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=8,
    out_channels=4,
    time_embed_dim=16,
    ofs_embed_dim=16,
    text_embed_dim=32,
    num_layers=2,
    sample_height=8,
    sample_width=8,
    sample_frames=9,
    patch_size=2,
    patch_size_t=2,
    patch_bias=False,
    temporal_compression_ratio=4,
    max_text_seq_length=8,
    use_rotary_positional_embeddings=True,
    use_learned_positional_embeddings=False,
)


def get_config(variant: str = "release") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"configs/train_dynamictrl.py: unknown variant {variant!r}; known: {VARIANTS}")
    cfg = ml_collections.ConfigDict()
    cfg.kind = "dynamictrl"
    cfg.step = ml_collections.ConfigDict()
    cfg.step.trainable = "transformer"  # the whole DiT (its learned 1.0 position table aside)
    # the release: 8 GPUs x grad-accum 4; here 1 clip per device per micro-batch on 8 devices (batch_size 32)
    cfg.step.grad_accum_steps = 4
    cfg.step.frozen_dtype = (
        "bfloat16"  # nothing of the transformer is frozen; VAE and T5 sit outside the step
    )
    cfg.step.remat = ml_collections.ConfigDict(dict(transformer_blocks="full"))  # gradient checkpointing

    cfg.optimizer = ml_collections.ConfigDict()
    cfg.optimizer.learning_rate = 5e-6
    cfg.optimizer.warmup_steps = 1000
    cfg.optimizer.b1 = 0.9
    cfg.optimizer.b2 = 0.95
    cfg.optimizer.eps = 1e-8
    cfg.optimizer.weight_decay = 1e-3
    cfg.optimizer.clip_norm = 1.0
    cfg.optimizer.ema_decay = 0.0  # the release keeps no EMA
    # the release's cosine_with_restarts with one cycle: a half cosine to 0 at the last step (decay_steps 0:
    # train.steps)
    cfg.optimizer.decay = "cosine"
    cfg.optimizer.decay_steps = 0
    cfg.optimizer.final_lr_fraction = 0.0

    defaults = DynamiCtrlObjectiveConfig()
    cfg.objective = ml_collections.ConfigDict()
    # CogVideoX1.5's training schedule: scaled-linear betas, zero terminal SNR, no SNR shift, v-prediction
    cfg.objective.num_train_timesteps = defaults.num_train_timesteps
    cfg.objective.beta_start = defaults.beta_start
    cfg.objective.beta_end = defaults.beta_end
    cfg.objective.beta_schedule = defaults.beta_schedule
    cfg.objective.rescale_betas_zero_snr = defaults.rescale_betas_zero_snr
    cfg.objective.snr_shift_scale = defaults.snr_shift_scale
    cfg.objective.image_dropout = defaults.image_dropout  # image latent -> zeros
    cfg.objective.ofs = defaults.ofs
    # the reference frame's pixel noise, applied when its latent is prepared (before the VAE)
    cfg.objective.reference_noise_log_mean = defaults.reference_noise_log_mean
    cfg.objective.reference_noise_log_std = defaults.reference_noise_log_std

    # clips of `frames` frames at height x width; the examples are cut, encoded and captioned ahead by
    # `python -m xdyna_jax.data.prepare --model dynamictrl` (its --max-start-frame, --id-token, --captions),
    # which must have used these sizes (checked against its dataset.json before compiling)
    cfg.frames, cfg.height, cfg.width = 37, 1360, 768
    cfg.vae_scaling_factor = 0.7  # video, reference and pose latents alike

    cfg.batch_size = 32  # clips per optimizer step over all devices (grad_accum_steps micro-batches)
    cfg.seed = 0
    cfg.compute = ml_collections.ConfigDict(dict(dtype="bfloat16", precision="default", attention="chunked"))
    cfg.sharding = sharding_section()
    cfg.train = ml_collections.ConfigDict()
    cfg.train.steps = 50_000
    cfg.train.log_every = 50
    cfg.train.save_every = 1000
    cfg.train.keep = 3
    cfg.train.val_every = 1000
    cfg.train.val_batches = 4
    cfg.train.mfu = True
    cfg.train.sample_every = 0  # no sample previews: sampling needs T5 and the VAE, which stay outside
    cfg.train.export = True  # write OUTPUT/bundle at the end (the init bundle with the trained transformer)
    cfg.train.export_ema = True  # the EMA weights, when optimizer.ema_decay > 0 keeps one
    cfg.debug = ml_collections.ConfigDict()
    cfg.debug.nan_at_step = 0  # > 0: that step's batch is poisoned with NaN (to test the NaN stop)
    cfg.compiler_options = ml_collections.ConfigDict()
    if variant == "tiny":
        _tiny(cfg)
    return cfg


def _tiny(cfg: ml_collections.ConfigDict) -> None:
    """The tests' tiny DynamiCtrl from scratch on a CPU: fp32, no recomputation, a rate that overfits two
    clips in 150 steps (tests/test_dynamictrl_training.py)."""
    cfg.model = ml_collections.ConfigDict(dict(transformer=TINY_TRANSFORMER))
    cfg.step.grad_accum_steps = 1
    cfg.step.frozen_dtype = "float32"
    cfg.step.remat.transformer_blocks = "none"
    cfg.optimizer.learning_rate = 2e-2
    cfg.optimizer.warmup_steps = 10
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.decay = "constant"
    cfg.frames, cfg.height, cfg.width = 5, 64, 64  # latents (2, 8, 8)
    cfg.batch_size = 2
    cfg.compute = ml_collections.ConfigDict(dict(dtype="float32", precision="default", attention="xla"))
    cfg.train.steps = 150
    cfg.train.log_every = 10
    cfg.train.save_every = 150
    cfg.train.val_every = 150
    cfg.train.val_batches = 2
    cfg.train.mfu = False


def training_configs(cfg) -> tuple[StepConfig, object, DynamiCtrlObjectiveConfig]:
    """(step, optimizer, objective) configs of a DynamiCtrl run config, checked before anything is built."""
    return sections.training_configs(cfg)
