"""Tiny fake DynamiCtrl / CogVideoX1.5-I2V release folders, written the way the real ones are.

Each part comes from the real PyTorch class (diffusers `CogVideoXTransformer3DModel`, `AutoencoderKLCogVideoX`,
transformers `T5EncoderModel`) with random, perturbed weights, cast to bf16 (the release's dtype) and written
with `save_pretrained(max_shard_size=...)`, so the folders carry the release's file names, shard names and
index.json files. The DynamiCtrl transformer is diffusers' class with one Pose-adaptive LayerNorm
(`control_norm1.linear`, `control_norm1.norm`) added per block, saved under the release's class name. The
tokenizer is a sentencepiece model trained here on a few sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from oracle import perturb_
from oracle_cogvideox import TINY_COGVIDEOX_15

TINY_COGVIDEOX_VAE = dict(
    block_out_channels=(8, 8, 16),  # two down blocks with downsamplers: temporal x4 as the real VAE
    down_block_types=("CogVideoXDownBlock3D",) * 3,
    up_block_types=("CogVideoXUpBlock3D",) * 3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=4,
    temporal_compression_ratio=4,
    sample_height=16,
    sample_width=16,
    scaling_factor=0.7,
    invert_scale_latents=True,
)
TINY_T5 = dict(
    d_model=TINY_COGVIDEOX_15["text_embed_dim"],
    d_kv=4,
    d_ff=24,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    use_cache=False,
)
SPM_VOCAB = 48
# The release's sampler config (CogVideoX-5B family): v-prediction, zero-SNR, trailing spacing.
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    snr_shift_scale=1.0,
    steps_offset=0,
    timestep_spacing="trailing",
    clip_sample=False,
)
# Small enough that the transformer and the text encoder come out in several shards.
SHARD_SIZE = "24KB"
T5_SHARD_SIZE = "6KB"

_CORPUS = [
    "a woman in a red dress dances in front of a white wall",
    "a man with short black hair walks along a beach at sunset",
    "the person wears a blue shirt and dark trousers",
    "a dancer raises both arms in a bright studio",
    "the background is a green park with tall trees",
    "a girl in a yellow jacket turns around slowly",
]


def pose_adaptive_layernorm_class():
    """The release's PoseAdaptiveLN parameters (a Linear temb -> 3*dim and an affine LayerNorm)."""
    import torch

    class PoseAdaptiveLN(torch.nn.Module):
        def __init__(self, time_dim: int, dim: int, eps: float = 1e-5):
            super().__init__()
            self.silu = torch.nn.SiLU()
            self.linear = torch.nn.Linear(time_dim, 3 * dim)
            self.norm = torch.nn.LayerNorm(dim, eps=eps, elementwise_affine=True)

    return PoseAdaptiveLN


def make_transformer(config: dict, *, control: bool, seed: int = 0):
    """diffusers' CogVideoXTransformer3DModel (with `control_norm1` per block when control=True), bf16."""
    import torch
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**config)
    if control:
        pada = pose_adaptive_layernorm_class()
        dim = config["num_attention_heads"] * config["attention_head_dim"]
        for block in model.transformer_blocks:
            block.control_norm1 = pada(config["time_embed_dim"], dim)
        # save_pretrained writes `_class_name` from the class: the release's transformer config names this one
        model.__class__ = type("DynamiCtrlTransformerModel", (CogVideoXTransformer3DModel,), {})
    perturb_(model, seed=seed + 1, scale=0.1)
    return model.to(torch.bfloat16).eval()


def make_vae(seed: int = 2):
    import torch
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    model = AutoencoderKLCogVideoX(**TINY_COGVIDEOX_VAE)
    perturb_(model, seed=seed + 1, scale=0.1)
    return model.to(torch.bfloat16).eval()


def make_t5(vocab_size: int = SPM_VOCAB, seed: int = 4):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=vocab_size, **TINY_T5))
    perturb_(model, seed=seed + 1, scale=0.1)
    return model.to(torch.bfloat16).eval()


def exact_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy with its dtype kept (bf16 as ml_dtypes.bfloat16), bit for bit."""
    import torch

    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def saved_state(model) -> dict[str, np.ndarray]:
    """What save_pretrained writes for `model`: its state dict less the tied copies transformers drops."""
    state = {k: exact_numpy(v) for k, v in model.state_dict().items()}
    for key in getattr(model, "_tied_weights_keys", None) or ():
        state.pop(key, None)
    return state


def train_spiece(folder: Path, vocab_size: int = SPM_VOCAB) -> Path:
    """A T5-style sentencepiece model (pad 0, eos 1, unk 2, no bos) at folder/spiece.model."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder / "spiece.model"


def write_tokenizer(folder: Path, vocab_size: int = SPM_VOCAB) -> Path:
    """The CogVideoX tokenizer/ folder: spiece.model, tokenizer_config.json, special_tokens_map.json."""
    train_spiece(folder, vocab_size)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "T5Tokenizer",
                "model_max_length": 226,
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "extra_ids": 0,
                "additional_special_tokens": [],
            },
            indent=2,
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2)
    )
    return folder


def write_release(
    folder: Path, *, control: bool = True, transformer: dict | None = None, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """A whole pipeline folder (DynamiCtrl's when control=True, else stock CogVideoX1.5-I2V).

    Returns the state dict each part's files hold ({"transformer": ..., "vae": ..., "text_encoder": ...}).
    """
    from diffusers import CogVideoXDDIMScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_COGVIDEOX_15, **(transformer or {}))
    states = {}
    model = make_transformer(config, control=control, seed=seed)
    model.save_pretrained(folder / "transformer", max_shard_size=SHARD_SIZE)
    states["transformer"] = saved_state(model)
    vae = make_vae(seed + 2)
    vae.save_pretrained(folder / "vae")
    states["vae"] = saved_state(vae)
    t5 = make_t5(seed=seed + 4)
    t5.save_pretrained(folder / "text_encoder", max_shard_size=T5_SHARD_SIZE)
    states["text_encoder"] = saved_state(t5)
    write_tokenizer(folder / "tokenizer")
    CogVideoXDDIMScheduler(**SCHEDULER).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "CogVideoXImageToVideoPipeline",
        "_diffusers_version": "0.32.0",
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return states


def write_mask_variant(folder: Path, seed: int = 10) -> dict[str, np.ndarray]:
    """A Dynamictrl-Mask_* repo: only a transformer (config.json + shards at the folder's root)."""
    model = make_transformer(TINY_COGVIDEOX_15, control=True, seed=seed)
    model.save_pretrained(folder, max_shard_size=SHARD_SIZE)
    return saved_state(model)
