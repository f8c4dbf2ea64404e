"""AutoencoderKLCogVideoX parity against diffusers: frame-chunked and tiled encode / decode (tiny config of
diffusers' own tests, random perturbed weights, fp32), frame counts, bf16, shape-only use; the release's
full-size decode (shapes and one chunk's compiled memory) in a slow test.

Compiles dominate the time here, so the inputs are chosen to share chunk shapes: the first frame chunk of
the chunked encode (decode) is also the first tile of the tiled one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX as TorchVAE
from flax import nnx
from oracle import perturb_, rel_err, torch_state

from convert.io import ConversionError
from convert.state import export_torch_state, load_torch_state
from xdyna_jax.models.vae_cogvideox import (
    AutoencoderKLCogVideoX,
    CogVideoXTiling,
    CogVideoXVAEConfig,
    frame_chunks,
)
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model

# diffusers' test config for this class; "quant" adds the optional 1x1x1 convs and a width change (so the
# resnets' conv_shortcut exists; the quant convs need out_channels == latent_channels) in two blocks (one
# temporal halving): only run in bf16, where compiling a four-block model would cost twice as much.
CONFIGS = {
    "tiny": dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2),
    "quant": dict(
        block_out_channels=(8, 16),
        down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2,
        temporal_compression_ratio=2,
        latent_channels=4,
        out_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        use_quant_conv=True,
        use_post_quant_conv=True,
    ),
}
HIGHEST = Compute(precision="highest")
# 48 x 40 pixel tiles = 6 x 5 latent ones; strides 40 / 32 pixels and 5 / 4 latent pixels
TILES = dict(tile_sample_min_height=48, tile_sample_min_width=40)


@functools.cache
def torch_vae(name):
    torch.manual_seed(0)
    ref = TorchVAE(**CONFIGS[name]).eval()
    perturb_(ref, 1)
    return ref


def jax_vae(name, compute=HIGHEST):
    ref = torch_vae(name)
    cfg = CogVideoXVAEConfig.from_diffusers(dict(ref.config), compute=compute)
    return load_torch_state(shape_only_model(AutoencoderKLCogVideoX, cfg), torch_state(ref), source=name)


def to_torch(x: np.ndarray):
    """(B, F, H, W, C) -> torch (B, C, F, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def from_torch(t) -> np.ndarray:
    return t.detach().cpu().numpy().transpose(0, 2, 3, 4, 1)


def video(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def latents(shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def torch_encode(x, *, tiling=False):
    ref = torch_vae("tiny")
    if tiling:
        ref.enable_tiling(**TILES)
    try:
        with torch.no_grad():
            dist = ref.encode(to_torch(x)).latent_dist
        return from_torch(dist.mean), from_torch(dist.logvar)
    finally:
        ref.disable_tiling()


def torch_decode(z, *, tiling=False, name="tiny"):
    ref = torch_vae(name)
    if tiling:
        ref.enable_tiling(**TILES)
    try:
        with torch.no_grad():
            return from_torch(ref.decode(to_torch(z)).sample)
    finally:
        ref.disable_tiling()


def test_frame_chunks_are_diffusers():
    assert frame_chunks(17, 8) == [(0, 9), (9, 17)]
    assert frame_chunks(37, 8) == [(0, 13), (13, 21), (21, 29), (29, 37)]
    assert frame_chunks(5, 8) == [(0, 5)]
    assert frame_chunks(10, 2) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert frame_chunks(5, 2) == [(0, 3), (3, 5)]


def test_chunked_encode_matches_diffusers():
    """17 frames: diffusers encodes chunks of 9 and 8 frames with the causal cache carried over."""
    x = video((2, 17, 40, 40, 3))
    mean, logvar = jax_vae("tiny").encode(jnp.asarray(x))
    want_mean, want_logvar = torch_encode(x)
    assert mean.shape == want_mean.shape == (2, 5, 5, 5, 4)
    assert mean.dtype == logvar.dtype == jnp.float32
    assert rel_err(mean, want_mean) < 1e-4
    assert rel_err(logvar, want_logvar) < 1e-4


def test_tiled_encode_matches_diffusers():
    """56 pixels wide with 40-wide tiles: two tiles blended over the columns (40 rows: one tile row). The
    2-D grid and its blending order: test_tile_grid_blends_as_diffusers."""
    model = jax_vae("tiny")
    tiling = CogVideoXTiling(**TILES)
    x = video((2, 9, 40, 56, 3), seed=2)
    mean, logvar = model.encode(jnp.asarray(x), use_tiling=True, tiling=tiling)
    want_mean, want_logvar = torch_encode(x, tiling=True)
    assert mean.shape == want_mean.shape == (2, 3, 5, 7, 4)
    assert rel_err(mean, want_mean) < 1e-4
    assert rel_err(logvar, want_logvar) < 1e-4
    # tiling starts above the tile size: a frame no larger than a tile is encoded whole
    small = jnp.asarray(x[:, :, :, :40])
    np.testing.assert_array_equal(
        model.encode(small, use_tiling=True, tiling=tiling)[0], model.encode(small)[0]
    )


def test_chunked_decode_matches_diffusers():
    """5 latent frames: diffusers decodes chunks of 3 and 2 latent frames (9 + 8 = 17 frames)."""
    z = latents((2, 5, 6, 4, 4))
    got = jax_vae("tiny").decode(jnp.asarray(z))
    want = torch_decode(z)
    assert got.shape == want.shape == (2, 17, 48, 32, 3)
    assert got.dtype == jnp.float32
    assert rel_err(got, want) < 1e-4


def test_tiled_decode_matches_diffusers():
    """8 latent rows with 6-row tiles: two tiles blended over the rows (4 latent columns: one tile column)."""
    z = latents((2, 3, 8, 4, 4), seed=3)
    got = jax_vae("tiny").decode(jnp.asarray(z), use_tiling=True, tiling=CogVideoXTiling(**TILES))
    want = torch_decode(z, tiling=True)
    assert got.shape == want.shape == (2, 9, 64, 32, 3)
    assert rel_err(got, want) < 1e-4


class _StubCoder(torch.nn.Module):
    """Stands in for diffusers' encoder / decoder inside its own tiling loops: nearest resampling by `factor`
    plus the chunk's mean, so overlapping tiles differ and every blend weight shows in the result."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x, conv_cache=None):
        return _stub_chunk(x, self.factor, torch), None


def _stub_chunk(x, factor, xp):
    """(B, C, T, H, W) torch or (B, T, H, W, C) jax: resampled over H and W, plus the chunk mean."""
    h_axis, w_axis = (3, 4) if xp is torch else (2, 3)
    if factor >= 1:
        y = xp.repeat_interleave(x, int(factor), h_axis) if xp is torch else xp.repeat(x, int(factor), h_axis)
        y = xp.repeat_interleave(y, int(factor), w_axis) if xp is torch else xp.repeat(y, int(factor), w_axis)
    else:
        step = int(1 / factor)
        y = x[:, :, :, ::step, ::step] if xp is torch else x[:, :, ::step, ::step]
    return y + x.mean()


@pytest.mark.parametrize("decode", [False, True])
def test_tile_grid_blends_as_diffusers(decode):
    """A 3 x 3 grid of tiles with edge remainders through diffusers' tiled_encode / tiled_decode (the
    coder stubbed, so nothing compiles): the same tile starts, blends (each tile blended into neighbours
    that were blended themselves), crops and frame chunks as ours."""
    from xdyna_jax.models.vae_cogvideox import _over_frame_chunks, _over_tiles

    ref = TorchVAE(**CONFIGS["tiny"])
    ref.enable_tiling(**TILES)
    factor = 8 if decode else 1 / 8
    if decode:
        ref.decoder = _StubCoder(factor)
        x = latents((1, 5, 13, 11, 4), seed=7)  # 3 x 3 tiles of 6 x 5, the last ones 3 x 3
        with torch.no_grad():
            want = from_torch(ref.tiled_decode(to_torch(x)).sample)
    else:
        ref.encoder = _StubCoder(factor)
        x = video((1, 17, 104, 88, 3), seed=7)  # 3 x 3 tiles of 48 x 40, the last ones 24 x 24
        with torch.no_grad():
            want = from_torch(ref.tiled_encode(to_torch(x)))
    plan = CogVideoXTiling(**TILES).plan(8, decode=decode)
    per_chunk = 2 if decode else 8

    def run_tile(tile):
        return _over_frame_chunks(lambda t, cache: (_stub_chunk(t, factor, jnp), None), tile, per_chunk)

    # one program for the whole grid: eagerly every tile's stub ops would compile on their own
    got = jax.jit(lambda x: _over_tiles(run_tile, x, plan))(jnp.asarray(x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # CI time (the suite is near 20 min): make test-slow
def test_frame_counts_match_diffusers():
    """Decoded frame counts (4 per latent frame; 4 F' - 3 for an odd F') and encoded ones, as diffusers gives
    them; ours from shapes only for one latent frame (the parity tests decode 5 and 3, chunks of 2 and 3)."""
    model = jax_vae("tiny")
    cfg = model.config
    for n in range(1, 6):
        want = torch_decode(latents((1, n, 1, 1, 4))).shape[1]
        assert cfg.decoded_num_frames(n) == want == (4 * n if n % 2 == 0 else 4 * n - 3), n
    one = nnx.eval_shape(lambda m, z: m.decode(z), model, jax.ShapeDtypeStruct((1, 1, 1, 1, 4), jnp.float32))
    assert one.shape[1] == cfg.decoded_num_frames(1) == 1
    for f in (1, 5, 10, 17):
        with torch.no_grad():
            want = torch_vae("tiny").encode(to_torch(video((1, f, 8, 8, 3)))).latent_dist.mean.shape[2]
        assert cfg.encoded_num_frames(f) == want, f
    release = CogVideoXVAEConfig()
    assert release.encoded_num_frames(37) == 10 and release.decoded_num_frames(10) == 40


@pytest.mark.slow  # compiles the VAE twice more; bf16 runs are covered by the DiT and T5 tests
def test_bf16_compute_and_weights():
    """bf16 activations and bf16 parameter arrays (the "quant" config: quant convs and conv_shortcuts too),
    one frame chunk each way, near diffusers' fp32 results."""
    model = jax_vae("quant", Compute(dtype="bfloat16"))
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
    assert {a.dtype for a in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    x, z = video((1, 5, 16, 16, 3), seed=4), latents((1, 2, 8, 8, 4), seed=5)
    mean, logvar = model.encode(jnp.asarray(x))
    decoded = model.decode(jnp.asarray(z))
    assert mean.dtype == logvar.dtype == decoded.dtype == jnp.float32
    with torch.no_grad():
        want = torch_vae("quant").encode(to_torch(x)).latent_dist
    assert rel_err(mean, from_torch(want.mean)) < 3e-2
    assert rel_err(logvar, from_torch(want.logvar)) < 3e-2
    assert rel_err(decoded, torch_decode(z, name="quant")) < 3e-2


def test_posterior_sampling_and_scaling():
    model = jax_vae("tiny")
    scaling = model.config.scaling_factor  # diffusers' default 1.15258426 (CogVideoX's own VAEs: 0.7)
    x = jnp.asarray(video((2, 9, 40, 40, 3)))  # chunk shapes compiled by the parity tests above
    mean, logvar = model.encode(x)
    key = jax.random.key(0, impl="rbg")  # compiles in a fraction of threefry's time on CPU
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    sampled = model.latents_from_video(x, key)
    np.testing.assert_allclose(
        sampled, (mean + jnp.exp(0.5 * logvar) * noise) * scaling, rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(model.latents_from_video(x), mean * scaling, rtol=1e-6)
    z = jnp.asarray(latents((2, 3, 6, 4, 4)))
    np.testing.assert_allclose(model.video_from_latents(z * scaling), model.decode(z), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="key"):
        model(x, sample_posterior=True)


@pytest.mark.parametrize("name", ["tiny", "quant"])
def test_export_round_trip_is_exact(name):
    """3-D kernels [O, I, kt, kh, kw] go through convert/state.py's layouts and back bit for bit."""
    original = torch_state(torch_vae(name))
    exported = export_torch_state(jax_vae(name))
    assert sorted(exported) == sorted(original)
    for k, v in original.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    model = jax_vae(name)
    assert model.encoder.conv_in.conv.kernel.shape == (3, 3, 3, 3, 8)
    with pytest.raises(ConversionError, match="encoder.conv_in.conv.weight"):
        state = dict(original)
        state["encoder.conv_in.conv.weight"] = state["encoder.conv_in.conv.weight"][:, :, :1]
        load_torch_state(shape_only_model(AutoencoderKLCogVideoX, model.config), state, source=name)


def test_wrong_inputs_are_refused():
    model = shape_only_model(AutoencoderKLCogVideoX, CogVideoXVAEConfig(**CONFIGS["tiny"]))
    with pytest.raises(ValueError, match=r"\(1, 3, 5, 16, 16\)"):
        model.encode(jnp.zeros((1, 3, 5, 16, 16)))  # torch layout
    with pytest.raises(ValueError, match=r"\(1, 16, 16, 3\)"):
        model.encode(jnp.zeros((1, 16, 16, 3)))  # an image, no frame axis
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 2, 3\)"):
        model.decode(jnp.zeros((1, 2, 2, 2, 3)))  # a video, not a latent
    with pytest.raises(TypeError, match="CogVideoXTiling"):
        model.decode(jnp.zeros((1, 2, 2, 2, 4)), use_tiling=True, tiling=(48, 40))
    with pytest.raises(ValueError, match="strides"):
        model.decode(jnp.zeros((1, 2, 2, 2, 4)), use_tiling=True, tiling=CogVideoXTiling(8, 8))
    with pytest.raises(ValueError, match="tile_overlap_factor_width"):
        CogVideoXTiling(48, 40, tile_overlap_factor_width=1.0)


def test_config_round_trips_and_refuses_unsupported():
    cfg = CogVideoXVAEConfig.from_diffusers(dict(torch_vae("tiny").config))
    assert CogVideoXVAEConfig.from_dict(cfg.to_dict()) == cfg
    assert CogVideoXVAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    release = CogVideoXVAEConfig()
    assert (release.block_out_channels, release.latent_channels, release.layers_per_block) == (
        (128, 256, 256, 512),
        16,
        3,
    )
    assert (release.scaling_factor, release.invert_scale_latents, release.spatial_scale) == (0.7, True, 8)
    assert CogVideoXTiling.for_config(release) == CogVideoXTiling(240, 360)
    assert CogVideoXTiling(240, 360).plan(8, decode=True).keep == (200, 288)
    base = cfg.to_diffusers()
    refused = {
        "_class_name": "AutoencoderKL",
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["CogVideoXUpBlock3D"] * 3,
        "act_fn": "gelu",
        "latents_mean": [0.0] * 4,
        "shift_factor": 0.1,
        "temporal_compression_ratio": 3,
        "use_quant_conv": True,  # out_channels 3 != latent_channels 4: diffusers' quant_conv cannot run
    }
    for key, value in refused.items():
        with pytest.raises(ValueError, match=key if key != "use_quant_conv" else "out_channels"):
            CogVideoXVAEConfig.from_diffusers({**base, key: value})
    with pytest.raises(ValueError, match="norm_num_groups"):
        CogVideoXVAEConfig.from_diffusers({**base, "norm_num_groups": 3})


@pytest.mark.slow
def test_full_size_decode_fits():
    """The release's 1360 x 768 x 37 frames: latents (10, 170, 96) decode, from shapes only, to 40 frames in
    240 x 360 tiles of 5 chunks each, run one after the other. One such chunk (2 latent frames of a 30 x 45
    tile, 8 frames of 240 x 360 out, with the previous chunk's cache), compiled, is the decode's working set."""
    from xdyna_jax.models.vae_cogvideox import _chunk_program

    model = shape_only_model(AutoencoderKLCogVideoX, CogVideoXVAEConfig())
    z = jax.ShapeDtypeStruct((1, 10, 170, 96, 16), jnp.bfloat16)
    out = nnx.eval_shape(lambda m, z: m.video_from_latents(z, use_tiling=True), model, z)
    assert out.shape == (1, 40, 1360, 768, 3) and out.dtype == jnp.float32

    graph, state = nnx.split(model)
    chunk = jax.ShapeDtypeStruct((1, 2, 30, 45, 16), jnp.float32)
    _, cache = _chunk_program.eval_shape(graph, "decode_chunk", state, chunk, None)
    mem = _chunk_program.lower(graph, "decode_chunk", state, chunk, cache).compile().memory_analysis()
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    print(f"decode chunk: temp {mem.temp_size_in_bytes / 2**30:.2f} GiB, total {total / 2**30:.2f} GiB")
    assert total < 8 * 2**30
