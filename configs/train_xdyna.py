"""X-Dyna training (paper 4.1): which weights train, the objective, the optimizer and the step.

`get_config("stage1")` / `get_config("stage2")`; the small X-Dyna of the synthetic world, trained from scratch
on a CPU (docs/synthetic.md): `get_config("synthetic_vae")` (its VAE), `get_config("synthetic")` (the
denoiser: every parameter) and `get_config("synthetic_stage2")` (the S-Face ControlNet). `training_configs(cfg)` (xdyna_jax/training/sections.py)
turns the sections into the training package's dataclasses (checking the trainable set's name first).
"""

import ml_collections

from configs.sharding import sharding_section
from xdyna_jax.training.sections import optimizer_config, training_configs

__all__ = ["get_config", "optimizer_config", "training_configs"]


# named synthetic-world configs -> (the trainable set they train, the configs/synthetic.py size)
SYNTHETIC_STAGES = {
    "synthetic_vae": ("vae", "demo"),
    "synthetic": ("all", "demo"),
    "synthetic_stage2": ("stage2", "demo"),
    # the ablation of docs/synthetic.md: the denoiser stage without the Dynamics-Adapter (no reference path)
    "synthetic_no_adapter": ("all", "demo"),
    # the test size (tests/test_synthetic_training.py)
    "synthetic_ci_vae": ("vae", "ci"),
    "synthetic_ci": ("all", "ci"),
    "synthetic_ci_stage2": ("stage2", "ci"),
}


def get_config(stage: str = "stage1") -> ml_collections.ConfigDict:
    if stage in SYNTHETIC_STAGES:
        return synthetic_config(stage)
    cfg = ml_collections.ConfigDict()
    cfg.step = ml_collections.ConfigDict()
    # stage1: Dynamics-Adapter to_q_ff/to_out_ff + pose ControlNet + motion modules; stage2: S-Face
    # ControlNet only; all: everything (a small model from scratch); vae: a VAE from scratch.
    cfg.step.trainable = stage
    cfg.step.grad_accum_steps = 1  # micro-batches per optimizer update (a scan inside one compiled step)
    cfg.step.frozen_dtype = "bfloat16"  # frozen SD / IP-Adapter weights: half the memory, never updated
    # none | dots | full per block kind and per layer kind inside the blocks, for the UNet and the ControlNets
    # alike (training/remat.py). Every level "full" is what fits the paper's step (1 + 16 frames at 896x512,
    # one example per device) in a 16 GiB TPU v5e over 8 devices (bench/train_memory.py); it recomputes the
    # forward pass twice more. Smaller steps can drop the block level first (none/full).
    cfg.step.remat = ml_collections.ConfigDict(
        dict(
            down_blocks="full",
            mid_block="full",
            up_blocks="full",
            resnets="full",
            attentions="full",
            motion_modules="full",
            controlnet_cond_embedding="full",
        )
    )

    cfg.optimizer = ml_collections.ConfigDict()
    cfg.optimizer.learning_rate = 1e-5  # the paper's AdamW rate for every module
    cfg.optimizer.warmup_steps = 500  # a short linear warmup keeps the first Adam steps small
    cfg.optimizer.weight_decay = 1e-2
    cfg.optimizer.clip_norm = 1.0
    cfg.optimizer.ema_decay = 0.0  # the paper reports no EMA; set e.g. 0.9999 to keep one
    # constant (the paper's) | cosine | linear: after the warmup, the rate falls to final_lr_fraction of itself
    # at step decay_steps (0: at the run's last step, train.steps)
    cfg.optimizer.decay = "constant"
    cfg.optimizer.decay_steps = 0
    cfg.optimizer.final_lr_fraction = 0.0

    cfg.objective = ml_collections.ConfigDict()
    cfg.objective.num_train_timesteps = 1000  # the release's schedule: linear betas 0.00085 .. 0.012
    cfg.objective.beta_start = 0.00085
    cfg.objective.beta_end = 0.012
    cfg.objective.beta_schedule = "linear"
    cfg.objective.image_dropout = 0.05  # IP tokens -> zero-image tokens, for CFG on the image prompt
    # loss weighting clip(SNR, snr_floor, snr_gamma) / SNR (training/objective.py); 0 and 0: the plain mean
    cfg.objective.snr_gamma = 0.0
    cfg.objective.snr_floor = 0.0

    cfg.frames = 16  # driven frames per training window (+ the reference): the paper's 16
    # clips of a prepared dataset (python -m xdyna_jax.data.prepare; see xdyna_jax.data.DataConfig)
    cfg.data = ml_collections.ConfigDict(dict(stride=1, flip_prob=0.5, max_scale=1.0, face="auto"))
    cfg.data.scene_ratio = 0.1  # share of scene clips when --scene-data is given (harmonic data fusion)
    cfg.height, cfg.width = 896, 512

    # the run (train.py): global batch, models' compute, mesh, schedule of logs / checkpoints / validation
    cfg.batch_size = 8  # examples per optimizer step over all devices
    cfg.seed = 0  # the TrainState's base key, data order, fresh ControlNet parts
    cfg.compute = ml_collections.ConfigDict(dict(dtype="bfloat16", precision="default", attention="chunked"))
    cfg.sharding = sharding_section()
    cfg.train = ml_collections.ConfigDict()
    cfg.train.steps = 100_000
    cfg.train.log_every = 50  # also the NaN/Inf check: the only host syncs between saves
    cfg.train.save_every = 1000
    cfg.train.keep = 3  # checkpoints kept
    cfg.train.val_every = 1000  # validation loss on --val-data (0: never)
    cfg.train.val_batches = 4
    # every sample_every steps (0: never) the first --val-data clip (else training clip) is sampled from the
    # current weights in sample_steps DDIM steps, between steps (training/preview.py); its frames go to
    # TensorBoard side by side as the image sample/frames (tensorboardX's add_video would need moviepy)
    cfg.train.sample_every = 1000
    cfg.train.sample_steps = 10
    cfg.train.mfu = True  # count the step's FLOPs once (a trace of the step) to log the FLOP utilisation
    cfg.train.export = True  # write OUTPUT/bundle at the end
    cfg.train.export_ema = True  # the exported bundle holds the EMA weights when an EMA is kept
    cfg.compiler_options = ml_collections.ConfigDict()  # free-form XLA options of the train step
    cfg.debug = ml_collections.ConfigDict()
    cfg.debug.nan_at_step = 0  # > 0: that step's batch is poisoned with NaN (to test the NaN stop)
    return cfg


def synthetic_config(stage: str = "synthetic") -> ml_collections.ConfigDict:
    """A stage of training configs/synthetic.py's X-Dyna from scratch on a CPU: fp32, no recomputation (the
    step is small), rates for a fresh model, no flips (the eval reads each limb's palette colour on its
    own side). The model and tokenizer sections are the variant's, so `python -m
    xdyna_jax.training.scratch --config configs/train_xdyna.py:synthetic` builds the same model."""
    from configs import synthetic

    trainable, size = SYNTHETIC_STAGES[stage]
    cfg = get_config(trainable)
    model = synthetic.get_config(size)
    cfg.model = model.model
    if stage == "synthetic_no_adapter":
        cfg.model.unet.dynamics_adapter = False
    cfg.tokenizer = model.tokenizer
    cfg.frames, cfg.height, cfg.width = model.frames, model.height, model.width
    cfg.step.frozen_dtype = "float32"
    for block in cfg.step.remat:
        cfg.step.remat[block] = "none"
    cfg.compute = ml_collections.ConfigDict(dict(dtype="float32", precision="default", attention="xla"))
    cfg.batch_size = 4
    cfg.optimizer.learning_rate = 1e-3
    cfg.optimizer.warmup_steps = 50
    cfg.optimizer.weight_decay = 0.0
    cfg.optimizer.decay = "cosine"
    cfg.optimizer.final_lr_fraction = 0.1
    cfg.data.flip_prob = 0.0
    cfg.data.scene_ratio = 0.1
    cfg.train.steps = 3000  # the denoiser stage (the VAE and stage 2 set their own below)
    cfg.train.log_every = 25
    cfg.train.save_every = 250
    cfg.train.val_every = 250
    cfg.train.val_batches = 2
    cfg.train.sample_every = 0
    cfg.train.mfu = False
    if trainable == "vae":
        # single frames: a window of 1 + 1 frames gives each example two images
        cfg.frames = 1
        cfg.batch_size = 4 if size == "demo" else 2
        cfg.optimizer.learning_rate = 2e-3
        # squared error: under L1 (sign-only gradients) such a small VAE learns brightness, then the blue-yellow
        # axis, and after 1,000 steps still has no red-green axis (every palette colour wrong; docs/synthetic.md)
        cfg.objective.vae_reconstruction = "mse"
        cfg.train.steps = 600
    if size == "ci":
        cfg.batch_size = 2
    if trainable == "stage2":
        cfg.optimizer.learning_rate = 5e-4
        cfg.train.steps = 200
    return cfg
