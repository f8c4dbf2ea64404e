"""`python -m convert xdyna-unet`: the official X-Dyna UNet checkpoint -> a video UNet bundle.

The release's `unet-checkpoint-epoch-5.ckpt` is the full UNet3DConditionModel state dict (diffusers names +
`motion_modules` (original AnimateDiff v1 names, with `pos_encoder.pe` buffers) + Dynamics-Adapter
`attn1.to_q_ff` / `attn1.to_out_ff` + IP-Adapter `attn2.to_k_ip` / `attn2.to_v_ip`), possibly wrapped in
`state_dict` with DDP `module.` prefixes. As the release does, an `--init` file (animatediff_v15_v1_ipplus.pth)
is loaded first and the checkpoint overrides it; a missing `to_q_ff` is initialised from `to_q`.
Our module names are the release's, so every key lands on the parameter of the same name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from convert.export import bundle_torch_state, write_state_file
from convert.io import ConversionError, atomic_output_dir, read_state_dict, refuse_existing_output
from convert.sd_structure import sd1x_unet_fields
from convert.state import load_torch_state
from convert.video_unet import PE_IGNORE, motion_config, resolve_version, save_with_manifest
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.nn.shape_only import shape_only_model

IP_TOKENS = 16  # IP-Adapter-plus Resampler queries


def merge_init(ckpt: dict, init: dict | None) -> dict:
    """init weights overridden by the checkpoint; to_q_ff := to_q where the checkpoint has none."""
    sd = {**(init or {}), **ckpt}
    for key in [k for k in sd if k.endswith("attn1.to_q.weight")]:
        sd.setdefault(key.replace("attn1.to_q.", "attn1.to_q_ff."), sd[key])
    return sd


def xdyna_config(
    sd: dict, source: str, *, version: str | None, ip_tokens: int, base: UNetConfig | None
) -> UNetConfig:
    """SD 1.5's UNet with what the keys say is present: adapter, IP-Adapter, motion modules (v1 for the release)."""
    if base is None:
        base = UNetConfig(**sd1x_unet_fields(sd, source, hint="not an X-Dyna / SD 1.x UNet?"))
    has_ip = any(k.endswith("attn2.to_k_ip.weight") for k in sd)
    if ip_tokens and not has_ip:
        raise ConversionError(
            f"{source}: no IP-Adapter weights (attn2.to_k_ip / to_v_ip); pass --init with the ipplus file or "
            "--ip-tokens 0 for a UNet without IP-Adapter"
        )
    cfg = dataclasses.replace(
        base,
        dynamics_adapter=any(".to_out_ff." in k for k in sd),
        ip_adapter_tokens=ip_tokens if has_ip else 0,
        skip_reference_frame=True,
    )
    if any(".motion_modules." in k for k in sd):
        cfg = motion_config(cfg, resolve_version(sd, version, source))
    return cfg


def convert_xdyna_unet(
    input: str | Path,
    output: str | Path,
    *,
    init: str | Path | None = None,
    version: str | None = "v1",
    ip_tokens: int = IP_TOKENS,
    config: UNetConfig | None = None,
    overwrite: bool = False,
) -> Path:
    src, output = Path(input), Path(output)
    refuse_existing_output(output, overwrite)  # before reading GBs of weights
    sd = merge_init(read_state_dict(src), read_state_dict(init) if init else None)
    source = f"{src}" + (f" (+ init {init})" if init else "")
    cfg = xdyna_config(sd, source, version=version, ip_tokens=ip_tokens, base=config)
    ignored = sorted(k for k in sd if k.endswith("pos_encoder.pe"))
    # host=True: the params stay numpy views of the checkpoint's tensors and are written from there, so
    # the conversion holds one copy of the weights (the file's), not three (file, device, orbax's).
    model = load_torch_state(shape_only_model(UNet, cfg), sd, source=source, ignore=PE_IGNORE, host=True)
    del sd
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        save_with_manifest(
            model,
            tmp,
            {
                "converter": "xdyna-unet",
                "checkpoint": str(src.absolute()),
                "init": str(Path(init).absolute()) if init else None,
                "ignored_keys": ignored,
            },
        )
    return output


def export_xdyna_unet(bundle: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """The bundle as the release's flat state dict (a torch .ckpt pickle, or .safetensors), pe buffers included.

    The weights are read from the bundle as host arrays and rewritten one tensor at a time.
    """
    return write_state_file(bundle_torch_state(bundle, "video_unet"), Path(output), overwrite=overwrite)


def add_arguments(p) -> None:
    p.add_argument(
        "--input", required=True, help="unet-checkpoint-epoch-5.ckpt (or any X-Dyna UNet state dict)"
    )
    p.add_argument("--init", help="animatediff_v15_v1_ipplus.pth, loaded first (the checkpoint overrides it)")
    p.add_argument("--output", required=True, help="output folder (unet/ bundle + manifest.json)")
    p.add_argument(
        "--version", default="v1", choices=("v1", "v2", "v3"), help="motion-module version (release: v1)"
    )
    p.add_argument(
        "--ip-tokens", type=int, default=IP_TOKENS, help="IP-Adapter image tokens (0: no IP-Adapter)"
    )
    p.add_argument("--overwrite", action="store_true")


def run(args) -> Path:
    return convert_xdyna_unet(
        args.input,
        args.output,
        init=args.init,
        version=args.version,
        ip_tokens=args.ip_tokens,
        overwrite=args.overwrite,
    )
