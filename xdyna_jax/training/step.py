"""The train state and the compiled train step.

The denoiser is split by its trainable set into a graph definition (static), the trainable parameters
(float32 master weights, the only ones the optimizer sees) and the frozen rest (float32 or bfloat16, never
updated). Activations run in the model's compute dtype (`Compute.dtype`, e.g. bfloat16), so a bf16 run reads
fp32 master weights cast at each layer and accumulates gradients into fp32.

Gradient accumulation is a `lax.scan` over micro-batches inside the one compiled step, not
`optax.MultiSteps`: one optimizer update and one host dispatch per global batch, no accumulator in the
optimizer state (checkpoints stay the size of the weights and moments), and step, lr and warmup count
optimizer updates. A global batch of B examples with k micro-batches runs B/k examples at a time; row
i*k + j of the batch is example i of micro-batch j, so each device's rows split into its share of every
micro-batch without moving data across the mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from xdyna_jax.sharding import Rules, activate, along, make_mesh, replicated
from xdyna_jax.training.objective import ObjectiveConfig, batch_size, check_batch, training_loss
from xdyna_jax.training.optimizer import OptimizerConfig, ema_update, learning_rate, make_optimizer
from xdyna_jax.training.remat import apply_remat, check_remat
from xdyna_jax.training.trainable import check_trainable_set, trainable_filter

log = logging.getLogger(__name__)

_FROZEN_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@struct.dataclass
class TrainState:
    """Everything a run needs to continue, as one pytree of arrays (what a checkpoint saves).

    rng is the run's base key (raw key data, so any checkpointer can store it); step k draws from
    `step_key(state)` = fold_in(rng, k), so a resumed run draws exactly what an uninterrupted one does.
    """

    step: jax.Array  # int32 scalar: optimizer updates done
    trainable: nnx.State  # float32 master weights of the trainable set
    frozen: nnx.State  # every other parameter (float32 or bfloat16)
    opt_state: Any
    ema: nnx.State | None  # float32 EMA of `trainable`, or None
    rng: jax.Array  # uint32 key data
    null_image_tokens: jax.Array  # (T, D) IP tokens of the all-zero image: the CFG-dropout target


@jax.jit
def step_key(state: TrainState) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    trainable: str = "stage1"
    grad_accum_steps: int = 1
    frozen_dtype: str = "float32"  # bfloat16 halves the frozen weights' memory; trainables stay float32
    remat: Mapping[str, str] = dataclasses.field(default_factory=dict)  # block -> none | dots | full

    def __post_init__(self):
        check_trainable_set(self.trainable)
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        check_remat(self.remat)
        if self.frozen_dtype not in _FROZEN_DTYPES:
            raise ValueError(f"frozen_dtype {self.frozen_dtype!r} not in {sorted(_FROZEN_DTYPES)}")


def _cast_floats(tree, dtype):
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


class Trainer:
    """The static half of training: graph definition, optimizer, objective; `train_step` is pure."""

    def __init__(
        self,
        denoiser: nnx.Module,
        step: StepConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        objective: ObjectiveConfig | None = None,
    ):
        step, optimizer = step or StepConfig(), optimizer or OptimizerConfig()
        objective = objective or ObjectiveConfig()
        self.config, self.optimizer_config, self.objective = step, optimizer, objective
        apply_remat(denoiser, step.remat)
        self.filter = trainable_filter(step.trainable, denoiser)
        self.graphdef = nnx.graphdef(denoiser)
        self.tx = make_optimizer(optimizer)
        self.schedule = learning_rate(optimizer)
        self.alphas_cumprod = objective.alphas_cumprod()

    def split(self, denoiser: nnx.Module) -> tuple[nnx.State, nnx.State]:
        """(trainable, frozen) parameter states of a denoiser of this trainer's structure."""
        _, trainable, frozen = nnx.split(denoiser, self.filter, ...)
        return trainable, frozen

    def init_state(
        self, trainable: nnx.State, frozen: nnx.State, null_image_tokens: jax.Array, key: jax.Array
    ) -> TrainState:
        """A fresh state at step 0 (pure: jit it with out_shardings to build it sharded). The state may share
        buffers with the module the states were split from; the step donates them, so train on the state
        and get the module back with `model(state)`."""
        trainable = _cast_floats(trainable, jnp.float32)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            trainable=trainable,
            frozen=_cast_floats(frozen, _FROZEN_DTYPES[self.config.frozen_dtype]),
            opt_state=self.tx.init(trainable),
            # a copy: the state is donated to the step, and one buffer cannot be donated twice
            ema=jax.tree_util.tree_map(jnp.copy, trainable) if self.optimizer_config.ema_decay > 0 else None,
            rng=jax.random.key_data(key),
            null_image_tokens=jnp.asarray(null_image_tokens, jnp.float32),
        )

    def model(self, state: TrainState) -> nnx.Module:
        """The denoiser with the state's current weights (for validation or export)."""
        return nnx.merge(self.graphdef, state.trainable, state.frozen)

    def loss(self, state: TrainState, batch: dict, key: jax.Array) -> jax.Array:
        """The objective of `batch` at the state's weights, without an update (validation, FLOP counts)."""
        return self._loss(state.trainable, state.frozen, state.null_image_tokens, batch, key)

    def _loss(self, trainable, frozen, null_tokens, batch, key):
        model = nnx.merge(self.graphdef, trainable, frozen)  # a denoiser, or a VAE (the vae set)
        return training_loss(model, batch, null_tokens, key, self.objective, self.alphas_cumprod)

    def _loss_and_grads(self, state: TrainState, batch: dict, key: jax.Array):
        grad_fn = jax.value_and_grad(self._loss)
        k = self.config.grad_accum_steps
        if k == 1:
            return grad_fn(state.trainable, state.frozen, state.null_image_tokens, batch, key)
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch
        )

        def body(carry, xs):
            loss_sum, grad_sum = carry
            mb, mkey = xs
            loss, grads = grad_fn(state.trainable, state.frozen, state.null_image_tokens, mb, mkey)
            return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
        (loss, grads), _ = jax.lax.scan(
            body, (jnp.zeros((), jnp.float32), zeros), (micro, jax.random.split(key, k))
        )
        return loss / k, jax.tree_util.tree_map(lambda g: g / k, grads)

    def train_step(self, state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, dict]:
        """One optimizer update on `batch` (see objective.diffusion_loss) with randomness from `key`."""
        loss, grads = self._loss_and_grads(state, batch, key)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ema = state.ema
        if ema is not None:
            ema = ema_update(ema, trainable, self.optimizer_config.ema_decay)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": jnp.asarray(self.schedule(state.step), jnp.float32),
        }
        new = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema)
        return new, metrics

    # ------------------------------------------------------------------------------ sharding, compiling

    def state_shardings(self, state: TrainState, mesh: Mesh, param_shardings: Callable | None = None):
        """A TrainState of shardings: params (trainable, frozen, EMA and the optimizer's moments alike) by
        `param_shardings(params_state) -> shardings`, default replicated; everything else replicated."""
        rep = replicated(mesh)
        if param_shardings is None:
            param_shardings = lambda tree: jax.tree_util.tree_map(lambda _: rep, tree)  # noqa: E731
        trainable = param_shardings(state.trainable)
        opt_state = optax.tree_map_params(
            self.tx,
            lambda _, sharding: sharding,
            state.opt_state,
            trainable,
            transform_non_params=lambda _: rep,
        )
        return TrainState(
            step=rep,
            trainable=trainable,
            frozen=param_shardings(state.frozen),
            opt_state=opt_state,
            ema=None if state.ema is None else trainable,
            rng=rep,
            null_image_tokens=rep,
        )

    def compile(
        self,
        state: TrainState,
        batch: dict,
        mesh: Mesh | None = None,
        *,
        param_shardings: Callable | None = None,
        batch_sharding: Callable | None = None,
        rules: Rules | None = None,
        compiler_options: dict | None = None,
    ) -> CompiledStep:
        """`train_step` compiled ahead for these shapes (arrays or ShapeDtypeStructs) on `mesh`.

        Default mesh: every device on `data`; params replicated; each batch array split along its first
        (example) axis over `data` (`batch_sharding(mesh) -> Sharding` overrides). The state is donated.
        rules: the logical axis rules the step is traced under (`sharding.activate`), so the models'
        activation constraints apply and the chunked attention runs per device; without them XLA places
        activations by propagation alone. compiler_options go to XLA (tests lower the optimisation level:
        same numbers, half the compile time).
        """
        check_batch(batch)
        b, k = batch_size(batch), self.config.grad_accum_steps
        if b % k:
            raise ValueError(f"batch of {b} examples does not split into grad_accum_steps={k} micro-batches")
        mesh = make_mesh() if mesh is None else mesh
        state_sh = self.state_shardings(state, mesh, param_shardings)
        data = (batch_sharding or along)(mesh)
        batch_sh = jax.tree_util.tree_map(lambda _: data, batch)
        rep = replicated(mesh)
        metrics_sh = {"loss": rep, "grad_norm": rep, "lr": rep}
        jitted = jax.jit(
            self.train_step,
            in_shardings=(state_sh, batch_sh, rep),
            out_shardings=(state_sh, metrics_sh),
            donate_argnums=0,
        )
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
        with activate(mesh, rules) if rules is not None else contextlib.nullcontext():
            lowered = jitted.lower(state, batch, key)
        compiled = lowered.compile(compiler_options)
        memory = memory_stats(compiled)
        log.info("train step compiled for %d devices: %s", mesh.size, _format_memory(memory))
        return CompiledStep(compiled, state_sh, batch_sh, memory)


def memory_stats(compiled) -> dict[str, int]:
    """Per-device bytes of the compiled step (arguments, outputs, aliased (donated), temporaries)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    out = {f.removesuffix("_size_in_bytes"): int(getattr(m, f, 0)) for f in fields}
    # donated arguments are reused for the outputs: the live peak is arguments + temporaries + the outputs
    # that do not alias an argument
    out["peak"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
    return out


def _format_memory(memory: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in memory.items()) or "no memory analysis"


@dataclasses.dataclass
class CompiledStep:
    """The ahead-compiled step: `state, metrics = step(state, batch, key)` (state donated)."""

    compiled: Any
    state_shardings: TrainState
    batch_shardings: dict
    memory: dict[str, int]

    def place_state(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self.state_shardings)

    def __call__(self, state: TrainState, batch: dict, key: jax.Array):
        return self.compiled(state, jax.device_put(batch, self.batch_shardings), key)
