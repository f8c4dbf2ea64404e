"""Does a trained X-Dyna read its reference? Its one-step clean-frame prediction with the clip's own
reference against the same prediction with another clip's.

    python -m bench.reference_use --model BUNDLE --data DATASET [--frames 4] [--windows 3] \
        [--timesteps 100,300,500,700,900] [--seed 0]

DATASET is a prepared dataset with stored latents (`python -m xdyna_jax.data.prepare --latents BUNDLE`; the
synthetic recipe's `latents/heldout`) of at least two clips. From each clip, --windows training windows (the
reference and --frames consecutive driven frames, drawn as training draws them, without augmentation) are
noised at each timestep with fixed noise, and the denoiser's epsilon gives the clean-frame estimate
x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t). Printed per timestep, as the mean squared error of
x0_hat against the clean driven latents:

    task=reference_use t=<t> x0_mse_own=<float> x0_mse_other=<float> other_over_own=<float>

`own`: the window's own reference (its latent and its IP-Adapter tokens); `other`: the reference of the next
clip's window of the same index. At the noisy timesteps the driven frames themselves hold almost nothing, so
a model that reads its reference has other_over_own well above 1 there. The last line is the error of
copying the reference, x0_hat = the reference latent (`task=reference_use copy_reference_mse=<float>`), what
a model that knew nothing but the reference could reach, against `zero_mse` (x0_hat = 0).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TIMESTEPS = (100, 300, 500, 700, 900)


def x0_errors(
    denoise: Callable,
    clips: Sequence[Sequence[dict]],
    timesteps: Sequence[int],
    alphas_cumprod: jax.Array,
    key: jax.Array,
) -> dict[int, tuple[float, float]]:
    """{t: (own, other)} mean squared x0 errors (the module docstring) of `denoise(window, t, context, pose,
    face) -> eps` (B, 1 + N, h, w, C) over `clips`: per clip its windows, each a training batch of one example
    (latents, text, image_tokens, pose, face). Window i of clip c takes the reference of window i of clip
    c + 1 (cyclically) as its other reference; the noise is drawn once per window from `key`."""
    if len(clips) < 2:
        raise ValueError(f"reference_use needs windows of at least 2 clips, got {len(clips)}")
    count = min(len(c) for c in clips)
    out = {}
    for t in timesteps:
        ab = alphas_cumprod[t]
        tt = jnp.full((1,), t, jnp.int32)
        own_err, other_err = [], []
        for c, windows in enumerate(clips):
            for i in range(count):
                w, other = windows[i], clips[(c + 1) % len(clips)][i]
                driven = w["latents"][:, 1:]
                noise = jax.random.normal(jax.random.fold_in(key, c * count + i), driven.shape, jnp.float32)
                noisy = jnp.sqrt(ab) * driven + jnp.sqrt(1.0 - ab) * noise
                for source, errors in ((w, own_err), (other, other_err)):
                    window = jnp.concatenate([source["latents"][:, :1], noisy], axis=1)
                    context = jnp.concatenate([w["text"], source["image_tokens"]], axis=1)
                    eps = denoise(window, tt, context, w.get("pose"), w.get("face"))[:, 1:]
                    x0 = (noisy - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)
                    errors.append(float(jnp.mean(jnp.square(x0 - driven))))
        out[int(t)] = (float(np.mean(own_err)), float(np.mean(other_err)))
    return out


def baselines(clips: Sequence[Sequence[dict]]) -> tuple[float, float]:
    """(copy-the-reference MSE, zero MSE) of the windows' driven latents."""
    copy, zero = [], []
    for windows in clips:
        for w in windows:
            lat = np.asarray(w["latents"], np.float64)
            copy.append(np.mean((lat[:, 1:] - lat[:, :1]) ** 2))
            zero.append(np.mean(lat[:, 1:] ** 2))
    return float(np.mean(copy)), float(np.mean(zero))


def dataset_windows(parts, data: str, frames: int, windows: int, seed: int) -> list[list[dict]]:
    """Per clip of the latent dataset `data`, `windows` training batches of one example each."""
    import grain

    from xdyna_jax.data import read_info
    from xdyna_jax.data.pipeline import ClipSampler, resolve_face
    from xdyna_jax.sharding import make_mesh
    from xdyna_jax.training.batch import BatchBuilder, Layout, empty_prompt_embedding

    info = read_info(data)
    if info.latent_shape is None:
        raise SystemExit(f"error: {data} stores no latents (prepare it with --latents BUNDLE)")
    if info.scene:
        raise SystemExit(f"error: {data} is a scene dataset: it has no reference to swap")
    face = resolve_face("auto", info) if parts.denoiser.face_controlnet is not None else "none"
    sampler = ClipSampler(info, num_frames=frames, stride=1, flip_prob=0.0, max_scale=1.0, face=face)
    source = grain.sources.ArrayRecordDataSource(info.shard_paths())
    builder = BatchBuilder(
        Layout(
            1, frames, info.height, info.width, parts.denoiser.pose_controlnet is not None, face != "none"
        ),
        vae=None,
        image_encoder=parts.image_encoder,
        resampler=parts.resampler,
        text_embedding=empty_prompt_embedding(parts.text_encoder, parts.tokenizer),
        mesh=make_mesh(devices=jax.devices()[:1]),
    )
    key = jax.random.key(seed)
    return [
        [builder([sampler((i, source[i]), np.random.default_rng([seed, i, k]))], key) for k in range(windows)]
        for i in range(len(source))
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reference_use", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="an X-Dyna bundle")
    p.add_argument("--data", required=True, help="a prepared dataset with stored latents, >= 2 clips")
    p.add_argument("--frames", type=int, default=4, help="driven frames per window (the model's training N)")
    p.add_argument("--windows", type=int, default=3, help="windows per clip")
    p.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    timesteps = [int(t) for t in args.timesteps.split(",")]

    from xdyna_jax.sampling.bundles import load_xdyna
    from xdyna_jax.training.objective import ObjectiveConfig

    parts = load_xdyna(args.model)
    alphas = ObjectiveConfig().alphas_cumprod()
    if not all(0 <= t < len(alphas) for t in timesteps):
        raise SystemExit(f"error: --timesteps must lie in 0..{len(alphas) - 1}, got {args.timesteps}")
    clips = dataset_windows(parts, args.data, args.frames, args.windows, args.seed)
    if len(clips) < 2:
        raise SystemExit(f"error: {args.data} has {len(clips)} clip; swapping references needs 2 or more")
    denoiser = parts.denoiser
    denoise = jax.jit(lambda w, t, c, pose, face: denoiser(w, t, c, pose, face))
    errors = x0_errors(denoise, clips, timesteps, alphas, jax.random.key(args.seed))
    for t, (own, other) in errors.items():
        print(
            f"task=reference_use t={t} x0_mse_own={own:.4f} x0_mse_other={other:.4f} "
            f"other_over_own={other / own:.3f}"
        )
    copy, zero = baselines(clips)
    print(f"task=reference_use copy_reference_mse={copy:.4f} zero_mse={zero:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
