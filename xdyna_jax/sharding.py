"""Device meshes and parameter / activation placement by logical axis names.

Axes: `data` (independent examples or sampling windows), `fsdp` (parameters sharded, gathered per layer),
`tensor` (heads / channels split inside a layer). A size of -1 takes every device the other axes leave.

Every parameter names its dimensions where it is made (`xdyna_jax.nn.layers`: "embed", "heads", "mlp",
"conv_in", "conv_out", "norm", "vocab", or None); one rules table maps each logical name to a mesh axis,
a tuple of mesh axes, or None (replicated), e.g. `{"embed": "fsdp", "heads": "tensor", "norm": None}`.
A mesh axis (or the product of a tuple of them) that does not divide a dimension is dropped for that
dimension, last axis first, so an odd-sized parameter is replicated instead of failing to shard.

    mesh = mesh_from_config(cfg.sharding.mesh)
    rules = rules_from_config(cfg.sharding.rules)
    model = init_sharded(lambda: UNet(config, rngs=nnx.Rngs(0)), mesh, rules)   # born sharded
    unet = xdyna_jax.load("out/unet", sharding=LogicalSharding(mesh, rules))   # restored sharded
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
# Logical axis name -> mesh axes, in priority order (Flax's LogicalRules).
Rules = tuple[tuple[str, MeshAxes], ...]


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); at most one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = _resolve_sizes([data, fsdp, tensor], len(devices), "mesh")
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def along(mesh: Mesh, axis: str = "data") -> NamedSharding:
    """Leading dimension split over `axis`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(axis))


def _resolve_sizes(sizes: list[int], total: int, what: str, unit: str = "devices") -> list[int]:
    """`sizes` with its one -1 replaced by what `total` leaves; a clear error when they cannot fit."""
    named = dict(zip(AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"{what} sizes must be positive, with at most one -1; got "
            + " ".join(f"{k}={v}" for k, v in named.items())
        )
    sizes = list(sizes)
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if total % known:
            raise ValueError(f"{total} {unit} do not split into {what} axes of sizes {named}")
        sizes[sizes.index(-1)] = total // known
    if math.prod(sizes) != total:
        raise ValueError(
            f"{what} {dict(zip(AXES, sizes, strict=True))} needs {math.prod(sizes)} {unit}, have {total}"
        )
    return sizes


def _granule_key(devices: Sequence[Any]) -> str:
    # TPU slices say which slice a chip is on; GPU hosts have no slices, so each process is one granule.
    return "slice_index" if hasattr(devices[0], "slice_index") else "process_index"


def device_grid(section: Mapping[str, int], devices: Sequence[Any] | None = None) -> np.ndarray:
    """The (data, fsdp, tensor) array of devices a mesh config section asks for.

    `data`, `fsdp`, `tensor`: sizes within one slice (ICI); `dcn_data`, `dcn_fsdp`, `dcn_tensor` (default 1):
    sizes across slices (TPU multi-slice) or hosts (GPU clusters). Each axis spans its ICI size times its
    DCN size. With more than one DCN granule in use the array comes from `create_hybrid_device_mesh`, so
    only the DCN axes cross the slow network; otherwise from `create_device_mesh`.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(section) - {*AXES, *(f"dcn_{a}" for a in AXES)}
    if unknown:
        raise ValueError(f"mesh config: unknown keys {sorted(unknown)} (known: {AXES} and dcn_<axis>)")
    key = _granule_key(devices)
    granules = len({getattr(d, key) for d in devices})
    unit = "slices" if key == "slice_index" else "processes"
    dcn = _resolve_sizes([int(section.get(f"dcn_{a}", 1)) for a in AXES], granules, "mesh DCN", unit)
    if math.prod(dcn) == 1:
        ici = _resolve_sizes([int(section.get(a, 1)) for a in AXES], len(devices), "mesh")
        return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    if len(devices) % granules:
        raise ValueError(f"{len(devices)} devices do not split evenly over {granules} {key} granules")
    ici = _resolve_sizes([int(section.get(a, 1)) for a in AXES], len(devices) // granules, "mesh ICI")
    return mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=key == "process_index", allow_split_physical_axes=True
    )


def mesh_from_config(section: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh from a config section (see `device_grid`)."""
    return Mesh(device_grid(section, devices), AXES)


def rules_from_config(rules: Mapping[str, MeshAxes] | Sequence[tuple[str, MeshAxes]]) -> Rules:
    """A rules table as Flax's LogicalRules: `{logical: mesh axes}` (a ConfigDict too) or (logical, axes) pairs.

    Lists (what a config or JSON holds) become tuples; the order is the priority order.
    """
    items = rules.items() if hasattr(rules, "items") else rules
    out = []
    for item in items:
        if len(item) != 2:
            raise ValueError(f"sharding rule {item!r} is not a (logical name, mesh axes) pair")
        name, axes = item
        if isinstance(axes, list | tuple):
            axes = tuple(axes)
        elif axes is not None and not isinstance(axes, str):
            raise ValueError(
                f"sharding rule {name!r}: mesh axes {axes!r} are not a name, a tuple of names or None"
            )
        out.append((str(name), axes))
    return tuple(out)


def check_rules(rules: Rules, mesh: Mesh) -> Rules:
    """`rules` as given, after checking that every mesh axis they name exists in `mesh`."""
    for name, axes in rules:
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            if axis not in mesh.axis_names:
                raise ValueError(
                    f"sharding rule {name!r} -> {axes!r}: mesh axis {axis!r} is not one of the mesh's "
                    f"axes {tuple(mesh.axis_names)}"
                )
    return rules


def _fitting(axes: MeshAxes, dim: int, axis_sizes: Mapping[str, int]) -> MeshAxes:
    """The longest leading part of `axes` whose total size divides `dim` (None when nothing does)."""
    group = (axes,) if isinstance(axes, str) else tuple(axes or ())
    while group and dim % math.prod(axis_sizes[a] for a in group):
        group = group[:-1]
    if not group:
        return None
    return group[0] if len(group) == 1 else group


def logical_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh | Any, rules: Rules, *, what: str = "array"
) -> PartitionSpec:
    """The PartitionSpec `rules` give an array of `shape` whose dimensions are called `names`.

    Flax's `logical_to_mesh_axes` assigns the mesh axes (priority order, each mesh axis used once); then
    every mesh axis that does not divide its dimension is dropped. A logical name the rules do not mention
    is an error (a typo would otherwise replicate silently); map it to None to replicate on purpose.
    """
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} axis names {names} for shape {tuple(shape)}")
    known = {name for name, _ in rules}
    missing = [n for n in names if n is not None and n not in known]
    if missing:
        raise ValueError(
            f"{what}: the sharding rules name no mesh axes for logical axis {missing[0]!r} "
            f"(axes {names}); add a rule for it (None to replicate)"
        )
    assigned = nn.logical_to_mesh_axes(names, rules)
    sizes = dict(mesh.shape)
    return PartitionSpec(*(_fitting(a, d, sizes) for a, d in zip(assigned, shape, strict=True)))


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_shardings(tree: nnx.Module | nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """A NamedSharding for every variable of `tree` (a module or its state; abstract shapes are enough).

    The result has `nnx.state(tree)`'s structure, so it serves as `out_shardings` of a jitted init or as the
    shardings of a restore. Params are placed by their logical axis names through `rules`; other
    variables (RNG keys and counts) are replicated. A Param without names is an error.
    """
    check_rules(rules, mesh)
    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree

    def place(path, var):
        value = var.get_value()
        names = var.get_metadata().get("out_sharding")
        if names is None:
            if isinstance(var, nnx.Param):
                raise ValueError(f"param {_path_name(path)} {tuple(value.shape)} has no logical axis names")
            return var.replace(replicated(mesh))
        spec = logical_spec(names, value.shape, mesh, rules, what=f"param {_path_name(path)}")
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


class LogicalSharding(NamedTuple):
    """Params placed on `mesh` by their logical axis names through `rules` (what `xdyna_jax.load` accepts)."""

    mesh: Mesh
    rules: Rules

    def shardings(self, tree: nnx.Module | nnx.State) -> nnx.State:
        return param_shardings(tree, self.mesh, self.rules)


# XLA:CPU spends most of an init's compile optimising the unrolled threefry of every parameter's random
# bits (tiny UNet: 31 s at the default level, 8 s at level 0). The program runs once, so level 0 is the
# better trade there; its values differ from an eager init by at most 1 ulp (the bits are the same, the
# float transforms round differently), while the default level reproduces eager init bit for bit.
_CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_sharded(
    model_factory: Callable[[], nnx.Module],
    mesh: Mesh,
    rules: Rules,
    *,
    abstract: nnx.Module | None = None,
    compiler_options: Mapping[str, Any] | None = None,
) -> nnx.Module:
    """`model_factory()` with every variable created directly on its shards (see `param_shardings`).

    The shardings are planned from the model's shapes (`abstract`, or `nnx.eval_shape(model_factory)`;
    `shape_only_model` makes large models' shapes faster), then the factory runs under
    `jax.jit(..., out_shardings=...)`, so each device computes only its own shards and no host ever holds
    the full parameters. `compiler_options` default to XLA's own, except on CPU (see above): pass {}
    there for values bit-identical to calling `model_factory()` eagerly.
    """
    abstract = nnx.eval_shape(model_factory) if abstract is None else abstract
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh, rules)
    init = jax.jit(lambda: nnx.split(model_factory())[1], out_shardings=shardings)
    if compiler_options is None and jax.default_backend() == "cpu":
        compiler_options = _CPU_INIT_COMPILER_OPTIONS
    state = init.lower().compile(dict(compiler_options or {}))()
    return nnx.merge(graphdef, state)


def active_spec(names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
    """The PartitionSpec logical axis `names` give an array of `shape` under the active mesh and rules, or
    None when no mesh is set (`jax.set_mesh`) or no rules are active (`nnx.logical_axis_rules`)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None
    return logical_spec(names, shape, mesh, rules, what=f"activation {tuple(shape)}")


def per_device(
    fn: Callable[..., jax.Array],
    batched: Sequence[jax.Array],
    shared: Any = (),
    *,
    names: Sequence[str | None] | None = None,
) -> jax.Array:
    """`fn(*batched, shared)` run by each device on its own shard of the `batched` arrays when a mesh and
    rules are active (else on the whole arrays): `shard_map` with `batched` split as the rules place axes
    `names` (default: the leading axis is "batch", the rest whole) and `shared` (a pytree, e.g. weights)
    whole on every device; the output is split like the first batched array.

    For loops inside layers (`lax.map` over blocks of queries or tokens): XLA cannot split a loop over an
    axis that is sharded, and would otherwise run every device's iterations on every device.
    """
    x = batched[0]
    names = ("batch",) + (None,) * (x.ndim - 1) if names is None else tuple(names)
    specs = [active_spec(names, a.shape) for a in batched]
    if specs[0] is None or all(axis is None for spec in specs for axis in spec):
        return fn(*batched, shared)
    # check_vma off: custom VJPs inside (nn/recompute.py) return the shared weights' cotangents as
    # per-device values, which the transpose of this map sums over the devices.
    return jax.shard_map(fn, in_specs=(*specs, PartitionSpec()), out_specs=specs[0], check_vma=False)(
        *batched, shared
    )


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`x` constrained to the placement its logical axis `names` get under the active mesh and rules.

    A no-op unless a mesh is set (`jax.set_mesh`) and rules are active (`nnx.logical_axis_rules`, or both
    through `activate`), so models call it unconditionally and single-device code is unchanged.
    """
    spec = active_spec(names, x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def constrain_batch(x: jax.Array) -> jax.Array:
    """`constrain` for an activation whose leading axis is the batch (images, or frames folded into it)."""
    return constrain(x, ("batch",) + (None,) * (x.ndim - 1))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Set `mesh` and `rules` for the code inside (tracing included): `constrain` then takes effect."""
    check_rules(rules, mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield
