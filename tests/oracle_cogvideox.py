"""Tiny CogVideoX / DynamiCtrl transformer configs and the helpers that build a diffusers model with random
perturbed weights, copy them into ours, and run both on the same inputs (test_cogvideox, test_dynamictrl and
the converter tests use them; keep the configs stable)."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx
from oracle import perturb_, torch_state

from configs.train_dynamictrl import TINY_TRANSFORMER
from convert.state import load_torch_state
from xdyna_jax.models.cogvideox import CogVideoXConfig, CogVideoXTransformer3DModel
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model

# diffusers kwargs. 1.5 style (CogVideoX1.5-5B-I2V / DynamiCtrl): 3-D patches, "slice" RoPE, ofs embedding.
# Head width 16 splits the RoPE channels 4 / 6 / 6; inputs (B, 2, 8, 8, 8) make 1 x 4 x 4 video tokens.
TINY_COGVIDEOX_15 = dict(TINY_TRANSFORMER)  # the tiny DynamiCtrl config of configs/train_dynamictrl.py
# 1.0 I2V style (CogVideoX-5b-I2V): 2-D conv patches, "linspace" RoPE, a learned [text ; video] position
# table, no ofs. Learned positions need the sample size: latents (B, 3, 8, 8, 8) (9 frames -> 3 latent).
TINY_COGVIDEOX_10_I2V = dict(
    TINY_COGVIDEOX_15,
    patch_size_t=None,
    ofs_embed_dim=None,
    patch_bias=True,
    use_learned_positional_embeddings=True,
)
# 1.0 T2V-2B style: no RoPE, the fixed 3-D sinusoidal table (recomputed for a size other than the sample's).
TINY_COGVIDEOX_10_SINCOS = dict(
    TINY_COGVIDEOX_10_I2V,
    use_rotary_positional_embeddings=False,
    use_learned_positional_embeddings=False,
)
# (frames, height, width) of the latents each config is tested at
TINY_LATENT_SIZES = {
    "1.5": (2, 8, 8),
    "1.0-i2v": (3, 8, 8),
    "1.0-sincos": (2, 8, 12),
}
TINY_CONFIGS = {
    "1.5": TINY_COGVIDEOX_15,
    "1.0-i2v": TINY_COGVIDEOX_10_I2V,
    "1.0-sincos": TINY_COGVIDEOX_10_SINCOS,
}
HIGHEST = Compute(precision="highest")


def diffusers_transformer(kwargs: dict, seed: int = 0):
    """diffusers' CogVideoXTransformer3DModel(**kwargs) in eval mode with every parameter and stored buffer
    (the learned position table) perturbed, so no zero bias or unit norm weight hides a bug."""
    import torch
    from diffusers import CogVideoXTransformer3DModel as TorchCogVideoX

    torch.manual_seed(seed)
    model = TorchCogVideoX(**kwargs).eval()
    perturb_(model, seed)
    stored = set(model.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in stored and buf.is_floating_point():
                buf.add_(torch.randn(buf.shape, generator=g, dtype=buf.dtype) * 0.05)
    return model


def jax_config(torch_model, compute: Compute = HIGHEST) -> CogVideoXConfig:
    return CogVideoXConfig.from_diffusers(dict(torch_model.config), compute)


def jax_transformer(torch_model, *, cls=CogVideoXTransformer3DModel, compute=HIGHEST, extra_state=None):
    """Our `cls` with the torch model's weights (plus `extra_state`, e.g. control_norm1 keys)."""
    model = shape_only_model(cls, jax_config(torch_model, compute))
    state = {**torch_state(torch_model), **(extra_state or {})}
    return load_torch_state(model, state, source=f"tiny {type(torch_model).__name__}")


@functools.partial(jax.jit, static_argnums=0)
def _merged_call(graph, state, *args, **kwargs):
    return nnx.merge(graph, state)(*args, **kwargs)


def jit_call(model):
    """model.__call__ under jax.jit; models of one structure and config share the compiled program (the
    graph definition is the static key), so tests on fresh weights do not recompile."""
    graph, state = nnx.split(model)
    return lambda *a, **k: _merged_call(graph, state, *a, **k)


def tiny_inputs(kwargs: dict, size: tuple[int, int, int], *, batch: int = 2, seed: int = 0) -> dict:
    """Channels-last numpy inputs: hidden (B, F', h, w, C_in), text (B, L, text_dim), timestep int32 (B,),
    pose (B, F', h, w, C_out), ofs (1,) = 2.0 (as the pipelines) when the config has an ofs embedding."""
    rng = np.random.default_rng(seed)
    f, h, w = size
    out = dict(
        hidden=rng.standard_normal((batch, f, h, w, kwargs["in_channels"])).astype(np.float32),
        text=rng.standard_normal((batch, kwargs["max_text_seq_length"], kwargs["text_embed_dim"])).astype(
            np.float32
        ),
        timestep=rng.integers(0, 1000, (batch,)).astype(np.int32),
        pose=rng.standard_normal((batch, f, h, w, kwargs["out_channels"])).astype(np.float32),
        ofs=np.array([2.0], np.float32) if kwargs.get("ofs_embed_dim") else None,
    )
    return out


def to_torch_video(x: np.ndarray):
    """(B, F, H, W, C) numpy -> (B, F, C, H, W) torch, diffusers' transformer layout."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3)))


def from_torch_video(t) -> np.ndarray:
    return t.detach().cpu().numpy().transpose(0, 1, 3, 4, 2)


def torch_rope(kwargs: dict, size: tuple[int, int, int]):
    """The (cos, sin) tables diffusers' CogVideoX pipelines pass for latents of `size`, or None."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    if not kwargs["use_rotary_positional_embeddings"]:
        return None
    f, h, w = size
    p, pt = kwargs["patch_size"], kwargs.get("patch_size_t")
    grid = (h // p, w // p)
    base_h, base_w = kwargs["sample_height"] // p, kwargs["sample_width"] // p
    dim = kwargs["attention_head_dim"]
    if pt is None:
        crop = get_resize_crop_region_for_grid(grid, base_w, base_h)
        return get_3d_rotary_pos_embed(dim, crop, grid, f)
    return get_3d_rotary_pos_embed(
        dim, None, grid, (f + pt - 1) // pt, grid_type="slice", max_size=(base_h, base_w)
    )


def torch_inputs(inputs: dict) -> dict:
    import torch

    return dict(
        hidden_states=to_torch_video(inputs["hidden"]),
        encoder_hidden_states=torch.from_numpy(inputs["text"]),
        timestep=torch.from_numpy(inputs["timestep"]).long(),
        ofs=None if inputs["ofs"] is None else torch.from_numpy(inputs["ofs"]),
    )


def run_diffusers(torch_model, kwargs: dict, inputs: dict, size) -> np.ndarray:
    """diffusers' forward on `inputs`, returned channels-last."""
    import torch

    with torch.no_grad():
        out = torch_model(
            **torch_inputs(inputs), image_rotary_emb=torch_rope(kwargs, size), return_dict=False
        )[0]
    return from_torch_video(out)
