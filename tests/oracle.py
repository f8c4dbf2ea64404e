"""Helpers shared by the parity tests: error metric, weight perturbation, torch <-> numpy."""

from __future__ import annotations

import numpy as np

from xdyna_jax.nn.shape_only import shape_only_model


def rel_err(actual, expected) -> float:
    """max |a - b| / max |b| (the metric of DESIGN.md section 6)."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def perturb_(torch_module, seed: int = 0, scale: float = 0.05) -> None:
    """Add noise to every parameter so no zero-initialised or unit-initialised path hides a bug."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in torch_module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def torch_state(torch_module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in torch_module.state_dict().items()}


def nchw(x_nhwc: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
    return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


def jitted(model):
    """model's __call__ under jax.jit (tiny models run op by op are slower than one compile)."""
    import jax
    from flax import nnx

    graph, state = nnx.split(model)
    fn = jax.jit(lambda s, *a, **k: nnx.merge(graph, s)(*a, **k), static_argnames=("ip_scale",))
    return lambda *a, **k: fn(state, *a, **k)


def random_torch_state(model_cls, config, seed: int = 0) -> dict[str, np.ndarray]:
    """A random PyTorch-named state dict for `model_cls(config)` without building the model eagerly
    (eager NNX init compiles one XLA kernel per parameter shape: slow for SD-structured models)."""
    from flax import nnx

    from convert.state import to_torch_layout, torch_key

    abstract = shape_only_model(model_cls, config)
    rng = np.random.default_rng(seed)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape = to_torch_layout(path[-1], np.empty(var.shape, np.bool_)).shape
        base = 1.0 if path[-1] == "scale" else 0.0
        out[torch_key(path)] = (base + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    return out


# The small two-block UNet most tests use (diffusers' own unit-test shape, cross-attention width 16).
TINY_UNET = dict(
    block_out_channels=(32, 64),
    norm_num_groups=8,
    cross_attention_dim=16,
    attention_head_dim=2,
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
