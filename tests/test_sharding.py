"""Meshes, logical axis names on every parameter, placement by the rules table, sharded init and restore.

On the 8 simulated CPU devices of conftest.py, with a (data=2, fsdp=4) mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from oracle import TINY_CLIP, TINY_VAE, random_torch_state, rel_err

import xdyna_jax
from configs import tiny
from configs.models import model_configs
from configs.sharding import RULES, sharding_section
from convert.state import load_torch_state
from xdyna_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from xdyna_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from xdyna_jax.models.controlnet import ControlNetModel
from xdyna_jax.models.resampler import Resampler, ResamplerConfig
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.models.vae import AutoencoderKL, VAEConfig
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.layers import linear
from xdyna_jax.nn.shape_only import shape_only_model
from xdyna_jax.sharding import (
    LogicalSharding,
    activate,
    device_grid,
    init_sharded,
    logical_spec,
    make_mesh,
    mesh_from_config,
    param_shardings,
    rules_from_config,
)

RULES_TABLE = rules_from_config(RULES)
# One down and one up block with cross-attention: every kind of layer the UNet has, as few as possible
# (a sharded init compiles a random initialiser per parameter).
SMALL_UNET = UNetConfig(
    block_out_channels=(32,),
    norm_num_groups=8,
    cross_attention_dim=16,
    attention_head_dim=2,
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
)


def test_mesh_sizes():
    assert make_mesh(data=-1, tensor=2).shape == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh(data=3, tensor=2)
    with pytest.raises(ValueError, match="at most one -1"):
        make_mesh(data=-1, fsdp=-1)


def test_mesh_from_config():
    assert mesh_from_config(sharding_section().mesh).shape == {"data": 1, "fsdp": 8, "tensor": 1}
    mesh = mesh_from_config(sharding_section(data=2, fsdp=-1).mesh)
    assert mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="DCN"):  # one host: no second slice to put data on
        mesh_from_config(sharding_section(dcn_data=2).mesh)
    with pytest.raises(ValueError, match="unknown keys"):
        mesh_from_config({"data": 2, "pipeline": 4})


@dataclasses.dataclass(frozen=True)
class _SliceDevice:
    """What create_hybrid_device_mesh reads of a multi-slice TPU device."""

    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_multi_slice_grid_keeps_dcn_axes_across_slices():
    devices = [_SliceDevice(i, i // 4) for i in range(8)]  # 2 slices of 4 chips
    grid = device_grid({"data": 1, "fsdp": -1, "dcn_data": -1}, devices)
    assert grid.shape == (2, 4, 1)
    # data (the DCN axis) changes slice, fsdp stays within one
    assert [[d.slice_index for d in row] for row in grid[:, :, 0]] == [[0] * 4, [1] * 4]


def _models():
    m = model_configs(tiny.get_config())
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=16
    )
    resampler = ResamplerConfig(
        dim=16, depth=1, dim_head=8, heads=2, num_queries=4, embedding_dim=32, output_dim=16
    )
    return {
        "video_unet": (UNet, m["unet"]),  # adapter, IP tokens, motion modules
        "controlnet": (ControlNetModel, m["controlnet_pose"]),
        "vae": (AutoencoderKL, VAEConfig(**TINY_VAE)),
        "clip_text": (CLIPTextModel, CLIPTextConfig(**TINY_CLIP)),
        "clip_vision": (CLIPVisionModelWithProjection, vision),
        "resampler": (Resampler, resampler),
    }


def test_every_param_has_logical_axis_names():
    known = {name for name, _ in RULES_TABLE}
    for kind, (cls, cfg) in _models().items():
        for path, var in nnx.to_flat_state(nnx.state(shape_only_model(cls, cfg), nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            where = f"{kind} {'.'.join(map(str, path))} {var.shape}"
            assert isinstance(names, tuple) and len(names) == len(var.shape), f"{where}: {names}"
            assert {n for n in names if n is not None} <= known, f"{where}: {names}"


def _expected_spec(names, shape, mesh) -> PartitionSpec:
    """The rules table read by hand: each name's mesh axes, dropped where they do not divide the dimension."""
    rules = dict(RULES)
    out = []
    for name, dim in zip(names, shape, strict=True):
        axes = rules[name] if name is not None else None
        group = (axes,) if isinstance(axes, str) else tuple(axes or ())
        while group and dim % int(np.prod([mesh.shape[a] for a in group])):
            group = group[:-1]
        out.append(None if not group else group[0] if len(group) == 1 else group)
    return PartitionSpec(*out)


def _assert_placed_by_rules(model, mesh):
    sharded = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        expected = _expected_spec(var.get_metadata()["out_sharding"], value.shape, mesh)
        assert isinstance(value.sharding, NamedSharding) and value.sharding.mesh == mesh, path
        assert value.sharding.spec == expected, f"{path}: {value.sharding.spec} != {expected}"
        sharded += any(a is not None for a in expected)
    assert sharded > 50  # most weights are really split, not replicated


def test_placement_follows_the_rules_and_falls_back_to_replication():
    mesh = make_mesh(data=2, fsdp=4)
    # the layouts maxdiffusion's tests pin for SD: conv kernels on their output channels, q/k/v and out
    spec = lambda names, shape: logical_spec(names, shape, mesh, RULES_TABLE)  # noqa: E731
    assert spec((None, None, "conv_in", "conv_out"), (3, 3, 32, 64)) == PartitionSpec(
        None, None, None, "fsdp"
    )
    assert spec(("embed", "heads"), (32, 64)) == PartitionSpec("fsdp", "tensor")
    assert spec(("heads", "embed"), (64, 32)) == PartitionSpec("tensor", "fsdp")
    assert spec(("norm",), (32,)) == PartitionSpec(None)
    assert spec(("embed", "mlp"), (6, 37)) == PartitionSpec(None, "tensor")  # 4 does not divide 6
    # a tuple of mesh axes keeps its leading part that divides: 2 of 6 frames' batch, none of 3
    assert spec(("batch", None), (6, 5)) == PartitionSpec("data", None)
    assert spec(("batch", None), (8, 5)) == PartitionSpec(("data", "fsdp"), None)
    assert spec(("batch", None), (3, 5)) == PartitionSpec(None, None)
    with pytest.raises(ValueError, match="no mesh axes for logical axis 'embd'"):
        spec(("embd", "mlp"), (32, 64))


def test_bad_rules_are_one_clear_error():
    mesh = make_mesh(data=2, fsdp=4)
    abstract = shape_only_model(Resampler, _models()["resampler"][1])
    bad = rules_from_config({**RULES, "embed": ("fsdp", "model")})
    with pytest.raises(ValueError, match=r"rule 'embed' -> \('fsdp', 'model'\): mesh axis 'model' is not"):
        param_shardings(abstract, mesh, bad)
    with pytest.raises(ValueError, match="rule 'embed' .* mesh axis 'model'"), activate(mesh, bad):
        pass
    with pytest.raises(ValueError, match="not a name, a tuple of names or None"):
        rules_from_config({"embed": 4})


def _values(model) -> dict:
    return {
        p: np.asarray(jax.device_get(v.get_value()))
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def test_sharded_init_is_placed_by_the_rules_and_equals_eager_init():
    mesh = make_mesh(data=2, fsdp=4)
    model = init_sharded(lambda: UNet(SMALL_UNET, rngs=nnx.Rngs(0)), mesh, RULES_TABLE)
    _assert_placed_by_rules(model, mesh)
    eager = _values(UNet(SMALL_UNET, rngs=nnx.Rngs(0)))
    got = _values(model)
    assert got.keys() == eager.keys()
    for path, value in eager.items():
        # level-0 CPU compile (init_sharded's default there): same bits, floats within an ulp
        np.testing.assert_allclose(got[path], value, rtol=0, atol=4 * np.finfo(np.float32).eps, err_msg=path)


def test_sharded_init_at_default_compile_level_is_bit_identical():
    mesh = make_mesh(data=2, fsdp=4)
    make = lambda: linear(32, 64, Compute(), nnx.Rngs(1), names=("embed", "heads"))  # noqa: E731
    model = init_sharded(make, mesh, RULES_TABLE, compiler_options={})
    assert model.kernel.get_value().sharding.spec == PartitionSpec("fsdp", "tensor")
    eager = _values(make())
    got = _values(model)
    for path, value in eager.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))


@pytest.fixture(scope="module")
def unet_bundle(tmp_path_factory):
    """SMALL_UNET with random host (numpy) weights saved as a bundle, and those weights."""
    model = load_torch_state(
        shape_only_model(UNet, SMALL_UNET), random_torch_state(UNet, SMALL_UNET), source="test"
    )
    return xdyna_jax.save(model, tmp_path_factory.mktemp("sharding") / "unet"), _values(model)


def test_bundle_loads_onto_the_shardings(unet_bundle):
    mesh = make_mesh(data=2, fsdp=4)
    path, want = unet_bundle
    by_rules = xdyna_jax.load(path, sharding=LogicalSharding(mesh, RULES_TABLE))
    _assert_placed_by_rules(by_rules, mesh)
    # the same placement given as a tree of shardings (what a training state restore would pass)
    tree = param_shardings(nnx.state(xdyna_jax.bundle.build_abstract(path), nnx.Param), mesh, RULES_TABLE)
    by_tree = xdyna_jax.load(path, sharding=tree)
    _assert_placed_by_rules(by_tree, mesh)
    for loaded in (by_rules, by_tree):
        got = _values(loaded)
        for p, v in want.items():
            np.testing.assert_array_equal(got[p], v, err_msg=str(p))
    partial = nnx.to_pure_dict(tree)
    del partial["conv_out"]
    with pytest.raises(xdyna_jax.bundle.BundleError, match=r"missing \['conv_out.bias'"):
        xdyna_jax.load(path, sharding=partial)


def test_sharded_forward_equals_single_device(unet_bundle):
    mesh = make_mesh(data=2, fsdp=4)
    model = xdyna_jax.load(unet_bundle[0], sharding=LogicalSharding(mesh, RULES_TABLE))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([1, 10, 100, 200, 300, 400, 500, 999])
    ctx = jnp.asarray(rng.standard_normal((8, 5, 16)), jnp.float32)

    def forward(s, x, t, ctx):
        return nnx.merge(graphdef, s)(x, t, ctx)

    single = jax.devices()[0]
    expected = jax.jit(forward)(jax.device_put(jax.device_get(state), single), x, t, ctx)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with activate(mesh, RULES_TABLE):  # batch constraints inside the UNet take effect
        out = jax.jit(forward)(state, *(jax.device_put(a, batch) for a in (x, t, ctx)))
    assert out.sharding.spec[0] == ("data", "fsdp")
    assert rel_err(out, expected) < 1e-5
