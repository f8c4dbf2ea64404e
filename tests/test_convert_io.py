"""convert.io: reading checkpoints as numpy, atomic writes, weight-file lookup, and the errors users see."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file as save_torch

from convert.io import (
    ConversionError,
    atomic_output_dir,
    find_weights_file,
    read_json,
    read_state_dict,
    write_json,
    write_safetensors,
)


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "text_model.embeddings.position_ids": torch.arange(7).unsqueeze(0),  # int64 buffer
    }


def _assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        v = v.numpy() if isinstance(v, torch.Tensor) else v
        assert got[k].dtype == (np.float32 if np.issubdtype(v.dtype, np.floating) else v.dtype), k
        np.testing.assert_array_equal(got[k], v.astype(got[k].dtype), err_msg=k)


def _normal_mode(kind: int) -> int:
    """What open() / mkdir() give a new file (0o666) or folder (0o777) under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return kind & ~umask


class _NotATensor:
    """A pickled class: weights_only=True must refuse it."""


# ------------------------------------------------------------------------------------------ round trips


def test_safetensors_round_trip(tmp_path):
    want = {k: v.numpy() for k, v in _tensors().items()}
    path = tmp_path / "w.safetensors"
    write_safetensors(want, path, metadata={"format": "pt"})
    _assert_same(read_state_dict(path), want)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind
    assert path.stat().st_mode & 0o777 == _normal_mode(0o666)  # not mkstemp's private 0o600


def test_safetensors_fp16_and_bf16_upcast(tmp_path):
    src = {"h": torch.randn(3, 5).half(), "b": torch.randn(2, 3).bfloat16(), "i": torch.arange(3)}
    path = tmp_path / "half.safetensors"
    save_torch(src, str(path))
    got = read_state_dict(path)
    assert got["h"].dtype == np.float32 and got["b"].dtype == np.float32 and got["i"].dtype == np.int64
    np.testing.assert_array_equal(got["h"], src["h"].float().numpy())
    np.testing.assert_array_equal(got["b"], src["b"].float().numpy())


def test_ckpt_state_dict_wrapper_and_module_prefix(tmp_path):
    want = _tensors()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in want.items()}, "global_step": 3, "epoch": "5"}
    path = tmp_path / "unet.pt"
    torch.save(wrapped, path)
    _assert_same(read_state_dict(path), want)


def test_nested_state_dict_wrappers_and_flattening(tmp_path):
    # {"state_dict": {"state_dict": ...}} unwraps repeatedly; IP-Adapter-style groups flatten with ".".
    inner = {
        "image_proj": {"latents": torch.ones(1, 2)},
        "ip_adapter": {"1.to_k_ip.weight": torch.ones(2, 2)},
    }
    path = tmp_path / "ip.ckpt"
    torch.save({"state_dict": {"state_dict": inner, "note": "x"}}, path)
    assert sorted(read_state_dict(path)) == ["image_proj.latents", "ip_adapter.1.to_k_ip.weight"]


def test_top_level_tensors_are_not_unwrapped(tmp_path):
    # A real state dict that happens to hold a "model" entry is not a wrapper.
    sd = {"model": torch.ones(2), "other.weight": torch.zeros(3), "step": 7}
    path = tmp_path / "flat.pth"
    torch.save(sd, path)
    assert sorted(read_state_dict(path)) == ["model", "other.weight"]


def test_bin_fp16_and_legacy_pickle_format(tmp_path):
    want = _tensors()
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in want.items()}
    path = tmp_path / "pytorch_model.bin"
    torch.save(half, path, _use_new_zipfile_serialization=False)  # pre-1.6 format: cannot be mmap'ed
    got = read_state_dict(path)
    _assert_same(got, {k: v.float() if v.is_floating_point() else v for k, v in half.items()})


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_index(tmp_path, fmt):
    want = _tensors()
    shards = {
        "model-00001-of-00002": ["conv.weight"],
        "model-00002-of-00002": ["conv.bias", "text_model.embeddings.position_ids"],
    }
    weight_map = {}
    for shard, names in shards.items():
        part = {n: want[n] for n in names}
        name = f"{shard}.{fmt}"
        if fmt == "safetensors":
            save_torch(part, str(tmp_path / name))
        else:
            torch.save(part, tmp_path / name)
        weight_map.update({n: name for n in names})
    index = tmp_path / f"model.{fmt}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    _assert_same(read_state_dict(index), want)

    weight_map["extra.weight"] = next(iter(weight_map.values()))
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConversionError, match="extra.weight"):
        read_state_dict(index)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.ckpt"
    with pytest.raises(ConversionError, match="no such file: .*nope.ckpt"):
        read_state_dict(path)


@pytest.mark.parametrize("name", ["cut.safetensors", "cut.ckpt"])
def test_truncated_file(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_np({k: v.numpy() for k, v in _tensors().items()}, str(path))
    else:
        torch.save(_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=rf"{name}: it is truncated or not a"):
        read_state_dict(path)


def test_text_file_named_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are not weights\n" * 10)
    with pytest.raises(ConversionError, match="notes.safetensors.*truncated or not a safetensors"):
        read_state_dict(path)


def test_pickle_with_arbitrary_object_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": _NotATensor()}, path)
    with pytest.raises(ConversionError) as e:
        read_state_dict(path)
    msg = str(e.value)
    assert "evil.ckpt" in msg and "not a plain tensor state dict" in msg and "weights_only=True" in msg
    assert "_NotATensor" in msg  # says which global was refused


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 5")
def test_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=5))
    with pytest.raises(ConversionError, match="plain.pt.*weights_only"):
        read_state_dict(path)


def test_not_a_mapping_and_no_tensors(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(ConversionError, match="list.pt.*not a mapping"):
        read_state_dict(path)
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "name": "x"}, path)
    with pytest.raises(ConversionError, match="meta.pt contains no tensors"):
        read_state_dict(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(b"x")
    with pytest.raises(ConversionError, match="w.npz"):
        read_state_dict(path)


# ------------------------------------------------------------------------------------------------ write


def test_write_safetensors_makes_arrays_contiguous_and_replaces(tmp_path):
    path = tmp_path / "sub" / "w.safetensors"
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors({"t": a.T}, path)  # non-contiguous view
    np.testing.assert_array_equal(read_state_dict(path)["t"], a.T)
    write_safetensors({"u": a}, path)  # replaces in place
    assert sorted(read_state_dict(path)) == ["u"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.safetensors"]


def test_write_safetensors_failure_leaves_old_file(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors({"a": np.ones(2, np.float32)}, path)
    with pytest.raises(ConversionError, match="cannot write .*w.safetensors.*object"):
        write_safetensors({"a": np.array([object()])}, path)  # object arrays cannot be saved
    assert sorted(read_state_dict(path)) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# ------------------------------------------------------------------------------------ atomic_output_dir


def test_atomic_output_dir_success(tmp_path):
    out = tmp_path / "bundle"
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out and not out.exists()
        (tmp / "a.txt").write_text("new")
        write_json(tmp / "manifest.json", {"path": tmp_path})  # non-JSON values are written as str
    assert (out / "a.txt").read_text() == "new"
    assert read_json(out / "manifest.json", "manifest") == {"path": str(tmp_path)}
    assert (out / "manifest.json").read_text().endswith("}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert out.stat().st_mode & 0o777 == _normal_mode(0o777)  # not mkdtemp's private 0o700
    assert (out / "manifest.json").stat().st_mode & 0o777 == _normal_mode(0o666)
    (out / "list.json").write_text("[1]")
    with pytest.raises(ConversionError, match="config file .*list.json holds a JSON list, not an object"):
        read_json(out / "list.json", "config")


def test_atomic_output_dir_cleans_up_on_error(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_existing_output(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ConversionError, match="bundle already exists"):
        with atomic_output_dir(out):
            raise AssertionError("body must not run")
    assert (out / "old.txt").read_text() == "old"

    with pytest.raises(RuntimeError):  # a failed overwrite keeps the old output
        with atomic_output_dir(out, overwrite=True) as tmp:
            raise RuntimeError("boom")
    assert (out / "old.txt").read_text() == "old"

    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


# ------------------------------------------------------------------------------------ find_weights_file


def test_find_weights_file_preference(tmp_path):
    stem = "diffusion_pytorch_model"
    order = [
        f"{stem}.safetensors",
        f"{stem}.safetensors.index.json",
        f"{stem}.bin",
        f"{stem}.bin.index.json",
        f"{stem}.fp16.safetensors",
        f"{stem}.fp16.bin",
    ]
    for name in order:
        (tmp_path / name).write_bytes(b"")
    for name in order:  # remove the preferred file each round: the next one is chosen
        assert find_weights_file(tmp_path, stem).name == name
        (tmp_path / name).unlink()


def test_find_weights_file_transformers_stems(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert find_weights_file(tmp_path, ("model", "pytorch_model")).name == "pytorch_model.bin"
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert find_weights_file(tmp_path, ("model", "pytorch_model")).name == "model.safetensors"


def test_find_weights_file_errors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConversionError) as e:
        find_weights_file(tmp_path, "diffusion_pytorch_model")
    msg = str(e.value)
    assert str(tmp_path) in msg and "diffusion_pytorch_model.safetensors" in msg and "config.json" in msg
    with pytest.raises(ConversionError, match="no such folder"):
        find_weights_file(tmp_path / "missing", "model")
