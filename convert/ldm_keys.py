"""Key names: original single-file LDM (CompVis) layout <-> diffusers / transformers names, for SD 1.x.

Pure renames (plus the VAE attention 1x1-conv <-> linear reshape), both directions: each component is a
table of rows (convert.key_tables) built from the model config or read off the key names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from convert.io import ConversionError, key_list
from convert.key_tables import PARAM, PASS, KeyTable, Rest, Row

__all__ = [
    "CLIP_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "diffusers_clip_to_ldm",
    "diffusers_unet_to_ldm",
    "diffusers_vae_to_ldm",
    "ldm_clip_to_diffusers",
    "ldm_unet_to_diffusers",
    "ldm_vae_to_diffusers",
    "normalize_legacy_vae_keys",
    "split_single_file",
    "unet_encoder_rows",
    "unet_structure",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# Buffers of LDM's DDPM wrapper: the noise schedule, recomputed by our schedulers, never weights.
_SCHEDULE_BUFFERS = frozenset(
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance "
    "posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 lvlb_weights logvar".split()
)

# ------------------------------------------------------------------------------------------- row kinds


def _vae_attention_reshape(value: Any, original_rest: str, to_diffusers: bool) -> Any:
    """VAE mid attention q/k/v/proj_out weights: LDM [C,C,1,1] conv <-> diffusers [C,C] linear."""
    if original_rest not in ("q.weight", "k.weight", "v.weight", "proj_out.weight"):
        return value
    if not to_diffusers:
        return value[:, :, None, None] if value.ndim == 2 else value
    if value.ndim == 4:
        return value[:, :, 0, 0]
    if value.ndim == 3:  # very old checkpoints stored proj_out as Conv1d
        return value[:, :, 0]
    return value


# LDM sub-module name -> diffusers name, inside one residual / attention block.
_UNET_RESNET = Rest(
    {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    }
)
_VAE_RESNET = Rest(
    {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
)
_VAE_ATTN = Rest(
    {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
    reshape=_vae_attention_reshape,
)
_SINGLE_FILE_HINT = "keys still carry the single-file prefix: run split_single_file first"


def _apply(sd: Mapping[str, Any], rows: Sequence[Row], to_diffusers: bool, what: str) -> dict[str, Any]:
    prefixed = any(k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)) for k in sd)
    table = KeyTable(rows)
    apply = table.to_diffusers if to_diffusers else table.to_original
    return apply(sd, what, hint=_SINGLE_FILE_HINT if prefixed else "")


# ------------------------------------------------------------------------------------------------- UNet


def unet_structure(config: Any) -> dict:
    """The keyword arguments of the UNet key maps for a UNetConfig / ControlNetConfig."""
    attention = tuple(t.startswith("CrossAttn") for t in config.down_block_types)
    return dict(layers_per_block=config.layers_per_block, n_blocks=len(attention), attention_blocks=attention)


def unet_encoder_rows(layers_per_block: int, n_blocks: int, attention_blocks: Sequence[bool]) -> list[Row]:
    """Time embedding, conv_in, down blocks and mid block of an SD1.x-style UNet (also a ControlNet's)."""
    if len(attention_blocks) != n_blocks:
        raise ConversionError(
            f"attention_blocks has {len(attention_blocks)} entries but n_blocks is {n_blocks}"
        )
    lpb = layers_per_block
    rows: list[Row] = [
        ("time_embed.0.", "time_embedding.linear_1.", PARAM),
        ("time_embed.2.", "time_embedding.linear_2.", PARAM),
        ("input_blocks.0.0.", "conv_in.", PARAM),
        ("middle_block.0.", "mid_block.resnets.0.", _UNET_RESNET),
        ("middle_block.1.", "mid_block.attentions.0.", PASS),
        ("middle_block.2.", "mid_block.resnets.1.", _UNET_RESNET),
    ]
    # LDM numbers input_blocks consecutively: per down block, `lpb` (resnet, attention) slots then one
    # slot holding only the downsampler (absent after the last block); input_blocks.0 is conv_in.
    for b in range(n_blocks):
        for j in range(lpb):
            i = 1 + b * (lpb + 1) + j
            rows.append((f"input_blocks.{i}.0.", f"down_blocks.{b}.resnets.{j}.", _UNET_RESNET))
            if attention_blocks[b]:
                rows.append((f"input_blocks.{i}.1.", f"down_blocks.{b}.attentions.{j}.", PASS))
        if b < n_blocks - 1:
            i = 1 + b * (lpb + 1) + lpb
            rows.append((f"input_blocks.{i}.0.op.", f"down_blocks.{b}.downsamplers.0.conv.", PARAM))
    return rows


def _unet_rows(layers_per_block: int, n_blocks: int, attention_blocks: Sequence[bool]) -> list[Row]:
    """All prefixes of an SD1.x-style UNet. Up blocks mirror the down blocks and get one extra resnet."""
    lpb = layers_per_block
    rows = unet_encoder_rows(lpb, n_blocks, attention_blocks)
    rows += [("out.0.", "conv_norm_out.", PARAM), ("out.2.", "conv_out.", PARAM)]
    # output_blocks: lpb + 1 slots per up block; the upsampler sits in the block's last slot, after the
    # resnet (.1) or after resnet + attention (.2).
    up_attention = list(reversed(attention_blocks))
    for b in range(n_blocks):
        for j in range(lpb + 1):
            i = b * (lpb + 1) + j
            rows.append((f"output_blocks.{i}.0.", f"up_blocks.{b}.resnets.{j}.", _UNET_RESNET))
            if up_attention[b]:
                rows.append((f"output_blocks.{i}.1.", f"up_blocks.{b}.attentions.{j}.", PASS))
        if b < n_blocks - 1:
            i = b * (lpb + 1) + lpb
            slot = 2 if up_attention[b] else 1
            rows.append((f"output_blocks.{i}.{slot}.conv.", f"up_blocks.{b}.upsamplers.0.conv.", PARAM))
    return rows


def ldm_unet_to_diffusers(
    sd: Mapping[str, Any],
    layers_per_block: int = 2,
    n_blocks: int = 4,
    attention_blocks: Sequence[bool] = (True, True, True, False),
) -> dict[str, Any]:
    """LDM UNet keys (without `model.diffusion_model.`) -> diffusers UNet2DConditionModel keys.

    `attention_blocks[b]` says whether down block b has cross-attention (SD1.x: all but the last); the up
    blocks use the reversed pattern. Defaults are SD1.5.
    """
    rows = _unet_rows(layers_per_block, n_blocks, attention_blocks)
    return _apply(sd, rows, to_diffusers=True, what="LDM UNet -> diffusers")


def diffusers_unet_to_ldm(
    sd: Mapping[str, Any],
    layers_per_block: int = 2,
    n_blocks: int = 4,
    attention_blocks: Sequence[bool] = (True, True, True, False),
) -> dict[str, Any]:
    """Exact inverse of `ldm_unet_to_diffusers` (returns keys without `model.diffusion_model.`)."""
    rows = _unet_rows(layers_per_block, n_blocks, attention_blocks)
    return _apply(sd, rows, to_diffusers=False, what="diffusers UNet -> LDM")


# -------------------------------------------------------------------------------------------------- VAE


def _vae_rows(n_blocks: int, enc_resnets: int, dec_resnets: int) -> list[Row]:
    rows: list[Row] = [
        ("quant_conv.", "quant_conv.", PARAM),
        ("post_quant_conv.", "post_quant_conv.", PARAM),
    ]
    for part in ("encoder", "decoder"):
        rows += [
            (f"{part}.conv_in.", f"{part}.conv_in.", PARAM),
            (f"{part}.conv_out.", f"{part}.conv_out.", PARAM),
            (f"{part}.norm_out.", f"{part}.conv_norm_out.", PARAM),
            (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", _VAE_RESNET),
            (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", _VAE_RESNET),
            (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", _VAE_ATTN),
        ]
    for i in range(n_blocks):
        down = f"encoder.down_blocks.{i}."
        rows += [
            (f"encoder.down.{i}.block.{j}.", f"{down}resnets.{j}.", _VAE_RESNET) for j in range(enc_resnets)
        ]
        if i < n_blocks - 1:
            rows.append((f"encoder.down.{i}.downsample.conv.", f"{down}downsamplers.0.conv.", PARAM))
    # The LDM decoder numbers its up blocks from the lowest resolution's *last* position: up.{n-1} runs
    # first. diffusers numbers them in execution order, hence the reversal.
    for k in range(n_blocks):
        up = f"decoder.up_blocks.{n_blocks - 1 - k}."
        rows += [(f"decoder.up.{k}.block.{j}.", f"{up}resnets.{j}.", _VAE_RESNET) for j in range(dec_resnets)]
        if k > 0:
            rows.append((f"decoder.up.{k}.upsample.conv.", f"{up}upsamplers.0.conv.", PARAM))
    return rows


def _max_index(keys: Sequence[str], pattern: str) -> int:
    """1 + the largest integer captured by `pattern` in `keys` (0 if none match)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _vae_shape(keys: Sequence[str], ldm: bool, n_blocks: int | None) -> tuple[int, int, int]:
    """(blocks, encoder resnets per block, decoder resnets per block), read off the key names."""
    if ldm:
        down, up, enc_res, dec_res = (
            r"encoder\.down\.(\d+)\.",
            r"decoder\.up\.(\d+)\.",
            r"encoder\.down\.\d+\.block\.(\d+)\.",
            r"decoder\.up\.\d+\.block\.(\d+)\.",
        )
    else:
        down, up, enc_res, dec_res = (
            r"encoder\.down_blocks\.(\d+)\.",
            r"decoder\.up_blocks\.(\d+)\.",
            r"encoder\.down_blocks\.\d+\.resnets\.(\d+)\.",
            r"decoder\.up_blocks\.\d+\.resnets\.(\d+)\.",
        )
    if n_blocks is None:
        n_blocks = max(_max_index(keys, down), _max_index(keys, up))
    return n_blocks, _max_index(keys, enc_res), _max_index(keys, dec_res)


def ldm_vae_to_diffusers(sd: Mapping[str, Any], n_blocks: int | None = None) -> dict[str, Any]:
    """LDM VAE keys (without `first_stage_model.`) -> diffusers AutoencoderKL keys.

    `n_blocks` (4 for SD) is read off the keys when not given; it matters because the decoder's up
    blocks are numbered in reverse. Mid-attention 1x1-conv weights [C,C,1,1] become [C,C].
    """
    rows = _vae_rows(*_vae_shape(list(sd), ldm=True, n_blocks=n_blocks))
    return _apply(sd, rows, to_diffusers=True, what="LDM VAE -> diffusers")


def diffusers_vae_to_ldm(sd: Mapping[str, Any], n_blocks: int | None = None) -> dict[str, Any]:
    """Inverse of `ldm_vae_to_diffusers`; also accepts legacy diffusers attention names (query/key/...)."""
    sd = normalize_legacy_vae_keys(sd)
    rows = _vae_rows(*_vae_shape(list(sd), ldm=False, n_blocks=n_blocks))
    return _apply(sd, rows, to_diffusers=False, what="diffusers VAE -> LDM")


_LEGACY_VAE_ATTN = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_VAE_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def normalize_legacy_vae_keys(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Old diffusers (< 0.14, e.g. X-Dyna's pinned 0.11) VAE attention names -> current ones.

    `attentions.N.{query,key,value,proj_attn}` become `to_q/to_k/to_v/to_out.0` (as diffusers'
    `_fix_state_dict_keys_on_load` does); `attentions.N.group_norm` is the same in both. Weights that are
    still 1x1 convs are squeezed to linear. Other keys pass through unchanged.
    """
    out: dict[str, Any] = {}
    for key, value in sd.items():
        m = _LEGACY_VAE_ATTN.match(key)
        if m:
            prefix, name, leaf = m.groups()
            key = f"{prefix}{_LEGACY_VAE_NAMES[name]}.{leaf}"
            if leaf == "weight" and value.ndim > 2:
                value = value.reshape(value.shape[0], value.shape[1])
        if key in out:
            raise ConversionError(f"VAE state dict has both legacy and current names for {key!r}")
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------- CLIP

# Roots of transformers' CLIPTextTransformer. Files written by transformers 4.x (the SD1.5 hub files) and SD
# single files nest them under `text_model.`; transformers >= 5 saves CLIPTextModel without that level (and
# accepts both on load). We accept both and always emit the `text_model.` form.
_CLIP_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")


_CLIP_TABLE = KeyTable([(CLIP_PREFIX + "text_model.", "text_model.", PASS)])


def _with_text_model(sd: Mapping[str, Any], prefix: str, what: str) -> dict[str, Any]:
    """CLIP keys as `prefix` + `text_model.*`: adds whichever of the two a key lacks.

    Keys that are not CLIPTextTransformer names are left as they are, for the table to refuse.
    """
    out: dict[str, Any] = {}
    for key, value in sd.items():
        name = key.removeprefix(prefix)
        name = "text_model." + name if name.startswith(_CLIP_ROOTS) else name
        new = prefix + name if name.startswith("text_model.") else key
        if new in out:
            raise ConversionError(f"{what}: two keys map to {new!r} (one of them is {key!r})")
        out[new] = value
    return out


def ldm_clip_to_diffusers(sd: Mapping[str, Any]) -> dict[str, Any]:
    """`cond_stage_model.transformer.text_model.*` -> transformers CLIPTextModel file names `text_model.*`.

    Keys may come with the single-file prefix or without it (as `split_single_file` returns them).
    """
    what = "LDM CLIP -> transformers"
    return _CLIP_TABLE.to_diffusers(_with_text_model(sd, CLIP_PREFIX, what), what)


def diffusers_clip_to_ldm(sd: Mapping[str, Any]) -> dict[str, Any]:
    """transformers CLIPTextModel names (with or without `text_model.`) -> `cond_stage_model.transformer.text_model.*`."""
    what = "transformers CLIP -> LDM"
    return _CLIP_TABLE.to_original(_with_text_model(sd, "", what), what)


# ------------------------------------------------------------------------------------ single-file split


def split_single_file(
    sd: Mapping[str, Any], use_ema: bool = False
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[str]]:
    """Split an SD 1.x single-file checkpoint into (unet, vae, clip, ignored_keys).

    The three dicts have their single-file prefixes removed: the UNet/VAE keys are ready for
    `ldm_unet_to_diffusers` / `ldm_vae_to_diffusers`; the CLIP keys are transformers names already
    (`ldm_clip_to_diffusers` validates them and adds `text_model.` where an old file lacks it).
    `ignored_keys` are the original names of what is deliberately left out: schedule buffers, `model_ema.*`,
    CLIP `position_ids`, VAE training losses. With `use_ema=True` the UNet is taken from the `model_ema.*`
    copy (v1-5-pruned.ckpt carries both) and the non-EMA UNet keys are ignored instead.
    Raises ConversionError for SD 2.x / SDXL / ControlNet / diffusers-format files and for any other key.
    """
    _reject_other_formats(sd)
    unet: dict[str, Any] = {}
    vae: dict[str, Any] = {}
    clip: dict[str, Any] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key, value in sd.items():
        if key.startswith(UNET_PREFIX):
            unet[key.removeprefix(UNET_PREFIX)] = value
        elif key.startswith(VAE_PREFIX + "loss."):
            ignored.append(key)  # LPIPS / discriminator of VAE training
        elif key.startswith(VAE_PREFIX):
            vae[key.removeprefix(VAE_PREFIX)] = value
        elif key.startswith(CLIP_PREFIX):
            name = key.removeprefix(CLIP_PREFIX)
            if name.endswith("embeddings.position_ids"):
                ignored.append(key)  # an arange buffer, not a weight
            else:
                clip[name] = value
        elif key in _SCHEDULE_BUFFERS or key.startswith("model_ema."):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"SD single-file checkpoint: no mapping for {key_list(unknown)}")
    if use_ema:
        unet, ignored = _take_ema_unet(sd, unet, ignored)
    return unet, vae, clip, sorted(ignored)


def _take_ema_unet(
    sd: Mapping[str, Any], unet: dict[str, Any], ignored: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """LDM's LitEma stores `model.diffusion_model.a.b.0.weight` as `model_ema.diffusion_modelab0weight`."""
    ema: dict[str, Any] = {}
    missing: list[str] = []
    for name in unet:
        ema_key = _ema_key(name)
        if ema_key in sd:
            ema[name] = sd[ema_key]
        else:
            missing.append(ema_key)
    if missing:
        raise ConversionError(
            f"use_ema=True but these UNet tensors have no model_ema copy: {key_list(missing)}"
        )
    used = {_ema_key(name) for name in unet}
    ignored = [k for k in ignored if k not in used] + [UNET_PREFIX + name for name in unet]
    return ema, ignored


def _ema_key(name: str) -> str:
    return "model_ema." + "".join(f"diffusion_model.{name}".split("."))


def _reject_other_formats(sd: Mapping[str, Any]) -> None:
    """Say what the file looks like when it is not an SD 1.x single file, instead of a wall of keys."""
    keys = list(sd)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("cond_stage_model.model."):
        raise ConversionError(
            "looks like an SD 2.x checkpoint (OpenCLIP text encoder keys cond_stage_model.model.*); "
            "only SD 1.x is supported"
        )
    if has("conditioner.embedders."):
        raise ConversionError(
            "looks like an SDXL checkpoint (conditioner.embedders.*); only SD 1.x is supported"
        )
    for key in keys:
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight") and sd[key].shape[-1] == 1024:
            raise ConversionError(
                f"looks like an SD 2.x checkpoint ({key} has context dim 1024, SD 1.x has 768); "
                "only SD 1.x is supported"
            )
    if has("control_model."):
        raise ConversionError(
            "looks like an original ControlNet checkpoint (control_model.*); use the ControlNet converter"
        )
    if not has(UNET_PREFIX):
        raise ConversionError(
            "no model.diffusion_model.* keys: not a Stable Diffusion single-file checkpoint"
            + _guess_kind(keys)
        )


def _guess_kind(keys: Sequence[str]) -> str:
    if any("motion_modules." in k for k in keys):
        return " (looks like an AnimateDiff motion module)"
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        return " (looks like a diffusers ControlNet state dict)"
    if any(k.startswith(("down_blocks.", "mid_block.")) for k in keys) and "conv_in.weight" in keys:
        return " (looks like a diffusers UNet state dict)"
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.")) for k in keys):
        return " (looks like a standalone VAE state dict)"
    if any(k.startswith("text_model.") for k in keys):
        return " (looks like a CLIP text encoder state dict)"
    return ""
