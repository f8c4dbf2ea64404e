"""Training logs: a progress bar and log lines on the console, scalars (and the sample previews' frames)
in TensorBoard event files.

Logged every `log_every` steps: loss and grad norm (means over the steps since the last log), lr, steps/s,
frames/s (driven frames trained on per second) and the model FLOP utilisation: FLOPs per step over the time
per step and the devices' peak. FLOPs per step are counted once, by XLA's cost analysis of the step
lowered for the whole (unpartitioned) batch; a scan of gradient accumulation is counted as one micro-batch
times the number of micro-batches, since the analysis counts a loop body once. Pallas kernels (the splash
attention backend) count as zero, so MFU reads low with them. The peaks are the devices' dense bf16 matmul
rates; an unknown device kind gets no MFU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

log = logging.getLogger("train")

# device_kind substring -> dense bf16 peak FLOP/s per device (vendor figures); first match wins
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
)


def peak_flops(device: jax.Device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((peak for name, peak in PEAK_FLOPS if name in kind), None)


def step_flops(trainer, state, batch, key) -> float | None:
    """FLOPs of one optimizer step on the global batch (shapes suffice), from XLA's cost analysis."""
    k = trainer.config.grad_accum_steps
    micro = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] // k, *x.shape[1:]), x.dtype), batch
    )
    strip = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
    grad = jax.jit(jax.grad(lambda tr, s, b, kk: trainer.loss(s.replace(trainable=tr), b, kk)))
    try:
        cost = grad.lower(strip(state.trainable), strip(state), micro, key).cost_analysis()
    except Exception as e:  # some backends cannot analyse unpartitioned programs: no MFU then
        log.warning("no FLOP count for the step (%s): MFU not logged", e)
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = (cost or {}).get("flops")
    return None if flops is None or flops <= 0 else float(flops) * k


class MetricsLog:
    """Console (tqdm bar + a line per log) and TensorBoard (process 0 only) for one run."""

    def __init__(
        self,
        directory: str | Path | None,
        *,
        start: int,
        total: int,
        frames_per_step: int,
        flops_per_step: float | None,
        devices: list,
    ):
        self.primary = jax.process_index() == 0
        self.frames_per_step, self.flops = frames_per_step, flops_per_step
        peaks = [peak_flops(d) for d in devices]
        self.peak = None if None in peaks or not peaks else float(sum(peaks))
        self.bar = tqdm(
            initial=start, total=total, desc="train", disable=not self.primary, dynamic_ncols=True
        )
        self.writer = None
        if self.primary and directory is not None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(directory))
        self._last = (start, time.perf_counter())

    def advance(self) -> None:
        self.bar.update(1)

    def restart_clock(self, step: int) -> None:
        """Exclude what is not training (compiles, validation, saves) from the next rate."""
        self._last = (step, time.perf_counter())

    def train(self, step: int, metrics: list[dict]) -> dict:
        """Log the host copies of the metrics of the steps since the last log, ending at `step`."""
        start, t0 = self._last
        now = time.perf_counter()
        n = max(step - start, 1)
        per_step = (now - t0) / n
        out = {
            "train/loss": float(np.mean([m["loss"] for m in metrics])),
            "train/grad_norm": float(np.mean([m["grad_norm"] for m in metrics])),
            "train/lr": float(metrics[-1]["lr"]),
            "perf/steps_per_s": 1.0 / per_step,
            "perf/frames_per_s": self.frames_per_step / per_step,
        }
        if self.flops is not None and self.peak is not None:
            out["perf/mfu"] = self.flops / per_step / self.peak
        self._last = (step, now)
        self.bar.set_postfix(loss=f"{out['train/loss']:.4g}")
        self._write(step, out)
        return out

    def scalars(self, step: int, values: dict) -> None:
        self._write(step, values)

    def frames(self, step: int, tag: str, frames: np.ndarray) -> None:
        """A short video, uint8 (T, H, W, 3), as one image of its frames side by side (up to 8 a row).
        An image rather than `add_video`: tensorboardX encodes videos with moviepy, which the project does
        not install."""
        if not self.primary:
            return
        self.bar.write(f"step {step}: {tag} ({len(frames)} frames)")
        if self.writer is not None:
            self.writer.add_images(tag, np.asarray(frames, np.uint8), step, dataformats="NHWC")
            self.writer.flush()

    def _write(self, step: int, values: dict) -> None:
        if not self.primary:
            return
        text = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in values.items())
        self.bar.write(f"step {step}: {text}")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
