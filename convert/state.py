"""PyTorch state dict <-> NNX module parameters, by name.

Our modules carry PyTorch's attribute names, so the mapping is mechanical:
  torch key  `down_blocks.0.resnets.1.conv1.weight`  <->  NNX path ('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')
Leaves: `weight` -> `kernel` (Linear / Conv), `scale` (norms) or `embedding` (Embed), decided by what the
target module holds. Layouts: Conv2d [O,I,kh,kw] <-> kernel [kh,kw,I,O]; Conv3d [O,I,kt,kh,kw] <->
kernel [kt,kh,kw,I,O]; Linear [O,I] <-> kernel [I,O];
norm and embedding tables unchanged. The same rules run backwards for export, so a round trip is exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert.io import ConversionError, key_list

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def _flat_params(module: nnx.Module) -> dict[tuple, nnx.Variable]:
    return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def torch_key(path: tuple) -> str:
    """NNX param path -> PyTorch state-dict key."""
    *head, leaf = path
    leaf = "weight" if leaf in _WEIGHT_LEAVES else leaf
    return ".".join(str(p) for p in (*head, leaf))


def to_flax_layout(leaf: str, value: np.ndarray, target_ndim: int) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 5:  # Conv3d
        return value.transpose(2, 3, 4, 1, 0)
    if leaf == "kernel" and value.ndim == 4:  # Conv2d
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2 and target_ndim == 2:  # Linear
        return value.T
    if leaf == "kernel" and value.ndim == 3:  # Conv1d
        return value.transpose(2, 1, 0)
    return value


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 5:
        return value.transpose(4, 3, 0, 1, 2)
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 3:
        return value.transpose(2, 1, 0)
    return value


def tensor_shape(state: Mapping, key: str, source: str, hint: str = "") -> tuple[int, ...]:
    """The shape of `state[key]`; a missing key is one ConversionError naming `source`, the key and `hint`."""
    if key not in state:
        raise ConversionError(f"{source}: expected key {key!r} is missing" + (f"; {hint}" if hint else ""))
    return tuple(state[key].shape)


def _summarise(title: str, items: list[str]) -> str:
    return f"\n  {title}: {key_list(items)}" if items else ""


def load_torch_state(
    module: nnx.Module,
    state_dict: dict[str, np.ndarray],
    *,
    source: str,
    ignore: Iterable[str] = (),
    host: bool = False,
) -> nnx.Module:
    """Fill every parameter of `module` (concrete or from nnx.eval_shape) from a PyTorch-named state dict.

    host=True keeps the values as float32 numpy arrays (views of the source tensors where no cast is needed)
    instead of device arrays, so a converter can save a multi-GB model without a second copy of it.

    `ignore` are regexes of source keys that are known not to be parameters (buffers, EMA copies...).
    Every other source key must land on a parameter and every parameter must be filled with a tensor of
    the right shape; otherwise one ConversionError lists the missing, unexpected and mis-shaped keys.
    """
    ignore_res = [re.compile(p) for p in ignore]
    params = _flat_params(module)
    by_key = {torch_key(p): p for p in params}
    missing, mis_shaped, new_values = [], [], {}
    for key, path in by_key.items():
        if key not in state_dict:
            missing.append(key)
            continue
        target = params[path]
        value = to_flax_layout(path[-1], np.asarray(state_dict[key]), len(target.shape))
        if tuple(value.shape) != tuple(target.shape):
            model_shape = to_torch_layout(path[-1], np.empty(target.shape, np.bool_)).shape
            mis_shaped.append(f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(model_shape)}")
            continue
        new_values[path] = value
    unexpected = [k for k in state_dict if k not in by_key and not any(r.search(k) for r in ignore_res)]
    if missing or unexpected or mis_shaped:
        raise ConversionError(
            f"{source}: the weights do not match the model"
            + _summarise("missing keys", sorted(missing))
            + _summarise("unexpected keys", sorted(unexpected))
            + _summarise("mis-shaped keys", mis_shaped)
        )
    for path, var in params.items():
        value = new_values.pop(path)
        var.set_value(np.asarray(value, np.float32) if host else jnp.asarray(value, dtype=jnp.float32))
    return module


def export_torch_state(module: nnx.Module) -> dict[str, np.ndarray]:
    """All parameters of `module` as a PyTorch-named, PyTorch-laid-out float32 state dict."""
    out = {}
    for path, var in _flat_params(module).items():
        out[torch_key(path)] = np.ascontiguousarray(to_torch_layout(path[-1], np.asarray(var.get_value())))
    return out
