"""IP-Adapter-plus Resampler parity against diffusers' IPAdapterPlusImageProjection (tiny, perturbed, fp32).

The two hold the same weights under different names. `to_original` maps diffusers' names to IP-Adapter's, and
is itself checked against diffusers' own loader (`_convert_ip_adapter_image_proj_to_diffusers`).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders.unet import UNet2DConditionLoadersMixin
from oracle import diffusers_resampler, rel_err, to_original, torch_state

from convert.state import export_torch_state, load_torch_state
from xdyna_jax.models.resampler import Resampler, ResamplerConfig
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model

# diffusers' loader infers only the widths: it assumes dim_head 64, depth 4 and ff_mult 4.
TINY = ResamplerConfig(
    dim=32, depth=4, dim_head=64, heads=2, num_queries=5, embedding_dim=24, output_dim=20, ff_mult=4
)


def build_pair(cfg=TINY, seed=0):
    ref = diffusers_resampler(cfg, seed)
    original = to_original(torch_state(ref))
    ours = ResamplerConfig.from_dict({**cfg.to_dict(), "compute": Compute(precision="highest")})
    model = shape_only_model(Resampler, ours)
    load_torch_state(model, original, source="tiny resampler")
    return ref, model, original


def test_name_mapping_agrees_with_diffusers_loader():
    ref, _, original = build_pair(seed=1)
    loaded = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, {k: torch.from_numpy(v) for k, v in original.items()}, low_cpu_mem_usage=False
    )
    expected = torch_state(ref)
    got = torch_state(loaded)
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


# a second shape: other head width, depth and feed-forward ratio
OTHER = ResamplerConfig(
    dim=24, depth=2, dim_head=16, heads=3, num_queries=4, embedding_dim=24, output_dim=20, ff_mult=2
)


@pytest.mark.parametrize("cfg", [TINY, OTHER], ids=["tiny", "other"])
def test_resampler_matches_diffusers(cfg):
    ref, model, original = build_pair(cfg)
    x = np.random.default_rng(2).standard_normal((2, 9, cfg.embedding_dim)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    got = model(jnp.asarray(x))
    assert got.shape == (2, cfg.num_queries, cfg.output_dim)
    assert rel_err(got, expected) < 1e-5
    # the original IP-Adapter key set, unchanged by a round trip
    exported = export_torch_state(model)
    assert sorted(exported) == sorted(original) and "layers.1.1.3.weight" in exported
    for k, v in original.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_config_and_bad_inputs():
    assert ResamplerConfig.from_dict(ResamplerConfig().to_dict()) == ResamplerConfig()
    _, model, _ = build_pair()
    with pytest.raises(ValueError, match=r"\(B, N, 24\)"):
        model(jnp.zeros((2, 9, 23)))
