"""Bundles: save/load round trip, stored param dtype and casting on load, atomic writes, clear errors,
restore onto 8 simulated devices."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from oracle import TINY_UNET

import xdyna_jax
from xdyna_jax.models.unet import UNet, UNetConfig

TINY = UNetConfig(**TINY_UNET)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = UNet(TINY, rngs=nnx.Rngs(7))
    path = xdyna_jax.save(model, tmp_path_factory.mktemp("b") / "unet")
    return model, path


def params(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_round_trip_is_exact(saved):
    model, path = saved
    loaded = xdyna_jax.load(path)
    assert loaded.config == model.config
    a, b = params(model), params(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert json.loads((path / "model.json").read_text())["kind"] == "unet"


def test_param_dtype_is_stored_and_cast_on_load(saved, tmp_path):
    model, path = saved
    meta = json.loads((path / "model.json").read_text())
    assert meta["param_dtype"] == "float32"
    as_bf16 = xdyna_jax.load(path, param_dtype="bfloat16")  # cast while restoring
    want = {k: v.astype(jnp.bfloat16) for k, v in params(model).items()}
    got = params(as_bf16)
    assert {v.dtype for v in got.values()} == {np.dtype(jnp.bfloat16)}
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    bf16 = xdyna_jax.save(as_bf16, tmp_path / "bf16")  # stored as held
    assert json.loads((bf16 / "model.json").read_text())["param_dtype"] == "bfloat16"
    again = params(xdyna_jax.load(bf16))
    for k in want:
        assert again[k].dtype == want[k].dtype
        np.testing.assert_array_equal(again[k], want[k])
    # a bundle written before param_dtype was recorded is float32
    old = tmp_path / "old"
    shutil.copytree(path, old)
    (old / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "param_dtype"}))
    assert {v.dtype for v in params(xdyna_jax.load(old)).values()} == {np.dtype(np.float32)}
    with pytest.raises(xdyna_jax.BundleError, match="param_dtype 'int8'"):
        xdyna_jax.load(path, param_dtype="int8")


def test_compute_override_at_load(saved):
    _, path = saved
    loaded = xdyna_jax.load(path, compute=xdyna_jax.Compute(dtype="bfloat16", attention="xla"))
    assert loaded.config.compute.dtype == "bfloat16"
    out = loaded(jnp.ones((1, 8, 8, 4)), jnp.array([3]), jnp.ones((1, 3, 16)))
    assert out.shape == (1, 8, 8, 4) and bool(jnp.isfinite(out).all())


def test_restore_onto_eight_devices(saved):
    assert jax.device_count() == 8, "tests run with 8 simulated CPU devices (tests/conftest.py)"
    model, path = saved
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))

    def fsdp_last_axis(path_, shape):  # shard the output-channel axis of every kernel over fsdp
        spec = [None] * len(shape)
        if path_[-1] == "kernel" and shape[-1] % 4 == 0:
            spec[-1] = "fsdp"
        return NamedSharding(mesh, P(*spec))

    loaded = xdyna_jax.load(path, sharding=fsdp_last_axis)
    kernel = loaded.conv_in.kernel.get_value()
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
    assert len({s.device for s in kernel.addressable_shards}) == 8
    assert {s.data.shape[-1] for s in kernel.addressable_shards} == {32 // 4}
    x, t, ctx = jnp.ones((2, 8, 8, 4)), jnp.array([3, 500]), jnp.ones((2, 3, 16))
    graph, state = nnx.split(loaded)
    sharded = jax.jit(lambda s, x, c: nnx.merge(graph, s)(x, t, c))(state, x, ctx)
    np.testing.assert_allclose(sharded, model(x, t, ctx), rtol=1e-5, atol=1e-5)
    replicated = xdyna_jax.load(path, sharding=NamedSharding(mesh, P()))
    assert replicated.conv_in.kernel.get_value().sharding.is_fully_replicated


def test_save_refuses_existing_and_leaves_no_partial(saved, tmp_path, monkeypatch):
    model, path = saved
    with pytest.raises(FileExistsError):
        xdyna_jax.save(model, path)

    class DiskFull(OSError):
        pass

    class HalfWritingCheckpointer:  # writes part of the weights, then fails like a full disk would
        def save(self, where, args):
            where.mkdir()
            (where / "partial").write_bytes(b"x")
            raise DiskFull("no space left")

    monkeypatch.setattr(xdyna_jax.bundle, "_checkpointer", HalfWritingCheckpointer)
    with pytest.raises(DiskFull):
        xdyna_jax.save(model, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_load_errors_name_the_problem(saved, tmp_path):
    _, path = saved
    with pytest.raises(xdyna_jax.BundleError, match="model.json is missing"):
        xdyna_jax.load(tmp_path)
    with pytest.raises(xdyna_jax.BundleError, match="expected 'vae'"):
        xdyna_jax.load(path, expected_kind="vae")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps({"format_version": 1, "kind": "toaster", "config": {}}))
    with pytest.raises(xdyna_jax.BundleError, match="unknown bundle kind 'toaster'"):
        xdyna_jax.load(bad)
    (bad / "model.json").write_text(
        json.dumps({"format_version": 1, "kind": "unet", "config": TINY.to_dict()})
    )
    with pytest.raises(xdyna_jax.BundleError, match="cannot restore weights"):
        xdyna_jax.load(bad)
