"""CogVideoXTransformer3DModel parity against diffusers (tiny 1.0 / 1.5 configs, perturbed weights, fp32), the
3-D RoPE and sinusoidal tables against diffusers' functions, config import and input errors (bf16 and the full-size parameter count: test_dynamictrl)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXTransformer3DModel as TorchCogVideoX
from diffusers.models.embeddings import get_3d_rotary_pos_embed, get_3d_sincos_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from oracle import rel_err
from oracle_cogvideox import (
    TINY_COGVIDEOX_10_I2V,
    TINY_COGVIDEOX_15,
    TINY_CONFIGS,
    TINY_LATENT_SIZES,
    diffusers_transformer,
    jax_transformer,
    jit_call,
    run_diffusers,
    tiny_inputs,
    torch_rope,
)

from xdyna_jax.models.cogvideox import (
    CogVideoXConfig,
    CogVideoXTransformer3DModel,
    rotary_tables,
    sincos_positions_3d,
)
from xdyna_jax.nn.rope import apply_rotary, resize_crop_region, rope_3d
from xdyna_jax.nn.shape_only import shape_only_model


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_transformer_matches_diffusers(name):
    kwargs, size = TINY_CONFIGS[name], TINY_LATENT_SIZES[name]
    ref = diffusers_transformer(kwargs, seed=3)
    model = jax_transformer(ref)
    inputs = tiny_inputs(kwargs, size, seed=4)
    expected = run_diffusers(ref, kwargs, inputs, size)
    run = jit_call(model)
    got = run(inputs["hidden"], inputs["text"], inputs["timestep"], ofs=inputs["ofs"])
    assert got.shape == expected.shape == (2, *size, kwargs["out_channels"])
    assert rel_err(got, expected) < 1e-5
    if name == "1.5":
        # the pipeline's own tables passed in give the same result as the ones the model computes
        tables = tuple(t.numpy() for t in torch_rope(kwargs, size))
        passed = run(
            inputs["hidden"], inputs["text"], inputs["timestep"], ofs=inputs["ofs"], image_rotary_emb=tables
        )
        assert rel_err(passed, expected) < 1e-5


def _assert_tables_match(ours, theirs):
    """Up to a float32 ulp of a frequency times the position (diffusers' float32 pow is not always correctly
    rounded; ours is): < 1e-5 absolute for positions up to 150."""
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == jnp.float32 and a.shape == tuple(b.shape)
        np.testing.assert_allclose(np.asarray(a), b.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "head_dim, grid, frames, max_size",
    [(16, (4, 4), 1, (4, 4)), (64, (85, 48), 5, (150, 150)), (32, (3, 7), 4, (8, 9))],
)
def test_rope_slice_matches_diffusers(head_dim, grid, frames, max_size):
    theirs = get_3d_rotary_pos_embed(head_dim, None, grid, frames, grid_type="slice", max_size=max_size)
    _assert_tables_match(rope_3d(head_dim, grid, frames, grid_type="slice", max_size=max_size), theirs)


@pytest.mark.parametrize(
    "head_dim, grid, frames, base_wh",
    # the 1.0 sample grid itself, then crops off either side (fractional linspace positions)
    [
        (64, (30, 45), 13, (45, 30)),
        (16, (7, 5), 3, (9, 6)),
        (64, (34, 60), 13, (45, 30)),
        (32, (4, 6), 1, (4, 4)),
    ],
)
def test_rope_linspace_matches_diffusers(head_dim, grid, frames, base_wh):
    crop = get_resize_crop_region_for_grid(grid, *base_wh)
    assert resize_crop_region(grid, *base_wh) == crop
    theirs = get_3d_rotary_pos_embed(head_dim, crop, grid, frames)
    _assert_tables_match(rope_3d(head_dim, grid, frames, grid_type="linspace", crops_coords=crop), theirs)


@pytest.mark.parametrize("name, size", [("1.5", (4, 8, 6)), ("1.0-i2v", (3, 8, 12)), ("1.0-i2v", (2, 12, 6))])
def test_rotary_tables_are_the_pipelines(name, size):
    kwargs = TINY_CONFIGS[name]
    cfg = CogVideoXConfig.from_diffusers(kwargs)
    _assert_tables_match(rotary_tables(cfg, *size), torch_rope(kwargs, size))


def test_apply_rotary_matches_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 3, 16)).astype(np.float32)  # (B, L, H, D)
    cos, sin = rope_3d(16, (2, 3), 2, grid_type="slice", max_size=(4, 4))
    theirs = apply_rotary_emb(
        torch.from_numpy(x).transpose(1, 2),
        (torch.from_numpy(np.array(cos)), torch.from_numpy(np.array(sin))),
    )
    assert rel_err(apply_rotary(jnp.asarray(x), cos, sin), theirs.transpose(1, 2).numpy()) < 1e-6
    assert apply_rotary(jnp.asarray(x, jnp.bfloat16), cos, sin).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="needs \\(L, D\\) tables"):
        apply_rotary(jnp.asarray(x[:, :5]), cos, sin)


@pytest.mark.parametrize("grid, frames, scale", [((4, 6), 3, 1.875), ((30, 45), 13, 1.875), ((5, 5), 2, 1.0)])
def test_sincos_table_matches_diffusers(grid, frames, scale):
    h, w = grid
    theirs = get_3d_sincos_pos_embed(64, (w, h), frames, scale, 1.0).flatten(0, 1).numpy()
    ours = sincos_positions_3d(64, frames, h, w, scale, 1.0)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=3e-6)


def test_rope_errors():
    with pytest.raises(ValueError, match="divisible by 16"):
        rope_3d(24, (2, 2), 1, grid_type="slice", max_size=(4, 4))
    with pytest.raises(ValueError, match="exceeds max_size"):
        rope_3d(16, (5, 2), 1, grid_type="slice", max_size=(4, 4))
    with pytest.raises(ValueError, match="needs crops_coords"):
        rope_3d(16, (2, 2), 1, grid_type="linspace")
    with pytest.raises(ValueError, match="grid_type"):
        rope_3d(16, (2, 2), 1, grid_type="ring", max_size=(4, 4))


def test_config_import_export():
    # a file that predates patch_size_t / ofs_embed_dim / patch_bias reads with diffusers' defaults for them
    old = {
        k: v
        for k, v in TINY_COGVIDEOX_10_I2V.items()
        if k not in ("patch_size_t", "ofs_embed_dim", "patch_bias")
    }
    cfg = CogVideoXConfig.from_diffusers(
        {**old, "_class_name": "CogVideoXTransformer3DModel", "dropout": 0.0}
    )
    assert (cfg.patch_size_t, cfg.ofs_embed_dim, cfg.patch_bias) == (None, None, True)
    default = CogVideoXConfig()  # CogVideoX1.5-5B-I2V, the transformer config.json DynamiCtrl ships
    release = dict(
        _class_name="DynamiCtrlTransformerModel",
        _diffusers_version="0.32.0",
        num_attention_heads=48,
        attention_head_dim=64,
        num_layers=42,
        in_channels=32,
        out_channels=16,
        time_embed_dim=512,
        ofs_embed_dim=512,
        text_embed_dim=4096,
        max_text_seq_length=226,
        patch_size=2,
        patch_size_t=2,
        patch_bias=False,
        sample_height=300,
        sample_width=300,
        sample_frames=81,
        temporal_compression_ratio=4,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False,
        activation_fn="gelu-approximate",
        norm_eps=1e-5,
        norm_elementwise_affine=True,
        attention_bias=True,
        flip_sin_to_cos=True,
        freq_shift=0,
        spatial_interpolation_scale=1.875,
        temporal_interpolation_scale=1.0,
        dropout=0.0,
        timestep_activation_fn="silu",
    )
    assert CogVideoXConfig.from_diffusers(release) == default
    assert (default.num_layers, default.inner_dim, default.in_channels, default.patch_size_t) == (
        42,
        3072,
        32,
        2,
    )
    for kwargs in (TINY_COGVIDEOX_15, TINY_COGVIDEOX_10_I2V):
        cfg = CogVideoXConfig.from_diffusers(kwargs)
        exported = cfg.to_diffusers()
        rebuilt = TorchCogVideoX.from_config(exported).config
        assert all(rebuilt[k] == v for k, v in exported.items() if not k.startswith("_")), exported
        assert CogVideoXConfig.from_diffusers(exported) == cfg
        assert CogVideoXConfig.from_dict(cfg.to_dict()) == cfg
    refused = [
        ({"activation_fn": "gelu"}, "activation_fn"),
        ({"timestep_activation_fn": "relu"}, "timestep_activation_fn"),
        ({"dropout": 0.1}, "dropout"),
        ({"norm_elementwise_affine": False}, "norm_elementwise_affine"),
        ({"ofs_embed_dim": 32}, "ofs_embed_dim"),
        ({"attention_head_dim": 24}, "divisible by 16"),
        ({"use_rotary_positional_embeddings": False, "use_learned_positional_embeddings": True}, "learned"),
        ({"use_rotary_positional_embeddings": False}, "patch_size_t"),
    ]
    for change, message in refused:
        with pytest.raises(ValueError, match=message):
            CogVideoXConfig.from_diffusers({**TINY_COGVIDEOX_15, **change})


def test_bad_inputs_are_refused_before_any_compute():
    model = shape_only_model(CogVideoXTransformer3DModel, CogVideoXConfig.from_diffusers(TINY_COGVIDEOX_15))
    inputs = tiny_inputs(TINY_COGVIDEOX_15, (2, 8, 8))
    h, e, t, ofs = inputs["hidden"], inputs["text"], inputs["timestep"], inputs["ofs"]
    cases = [
        ((h[..., :4], e, t), dict(ofs=ofs), "hidden_states must be"),
        ((h[:, :1], e, t), dict(ofs=ofs), "not divisible by the patch size"),
        ((h[:, :, :7], e, t), dict(ofs=ofs), "not divisible by the patch size"),
        ((h, e[..., :16], t), dict(ofs=ofs), "encoder_hidden_states must be"),
        ((h, e, t), {}, "pass ofs"),
        ((h, e, t[:1].repeat(3)), dict(ofs=ofs), "timestep must be"),
        ((h, e, t), dict(ofs=np.ones(3, np.float32)), "ofs must be"),
        ((h, e, t), dict(ofs=ofs, image_rotary_emb=(np.ones((15, 16)),) * 2), "image_rotary_emb must be"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args, **kwargs)
    learned = shape_only_model(
        CogVideoXTransformer3DModel, CogVideoXConfig.from_diffusers(TINY_COGVIDEOX_10_I2V)
    )
    with pytest.raises(ValueError, match="learned positional embeddings exist only"):
        learned(h[:, :1, :, :4], e, t)
    with pytest.raises(ValueError, match="spans 8 text tokens"):
        learned(np.zeros((2, 3, 8, 8, 8), np.float32), e[:, :5], t)
