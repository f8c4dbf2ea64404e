"""convert.ldm_keys against diffusers' own single-file converters (the oracle), on tiny random models.

Direction checked against the oracle: our diffusers -> LDM, then diffusers' LDM -> diffusers must give back the
original state dict exactly. Our own LDM -> diffusers must invert ours exactly as well.
"""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel

from convert.io import ConversionError
from convert.key_tables import PARAM, PASS, KeyTable, Rest
from convert.ldm_keys import (
    CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    diffusers_clip_to_ldm,
    diffusers_unet_to_ldm,
    diffusers_vae_to_ldm,
    ldm_clip_to_diffusers,
    ldm_unet_to_diffusers,
    ldm_vae_to_diffusers,
    normalize_legacy_vae_keys,
    split_single_file,
)

UNET_CONFIGS = {
    "2blocks": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # SD1.5's block pattern (3 cross-attn down blocks + 1 plain), small channels: real SD1.5 indices.
    "sd15": dict(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
}


def _unet(name):
    torch.manual_seed(0)
    cfg = UNET_CONFIGS[name]
    model = UNet2DConditionModel(
        **cfg,
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        sample_size=8,
    )
    attention = tuple(t.startswith("CrossAttn") for t in cfg["down_block_types"])
    kwargs = dict(layers_per_block=2, n_blocks=len(attention), attention_blocks=attention)
    return model, kwargs


def _assert_same_state(got, want):
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        assert torch.equal(torch.as_tensor(got[k]), v), k


@pytest.fixture(scope="module", params=sorted(UNET_CONFIGS))
def unet(request):
    return _unet(request.param)


def test_unet_matches_diffusers_oracle(unet):
    model, kwargs = unet
    sd = model.state_dict()
    ldm = diffusers_unet_to_ldm(sd, **kwargs)
    assert len(ldm) == len(sd)
    oracle = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in ldm.items()}, dict(model.config))
    _assert_same_state(oracle, sd)
    _assert_same_state(ldm_unet_to_diffusers(ldm, **kwargs), sd)


def test_unet_sd15_index_facts():
    model, kwargs = _unet("sd15")
    ldm = diffusers_unet_to_ldm(model.state_dict(), **kwargs)
    facts = {
        "input_blocks.0.0.weight": "conv_in.weight",
        "time_embed.0.weight": "time_embedding.linear_1.weight",
        "time_embed.2.bias": "time_embedding.linear_2.bias",
        "input_blocks.1.0.in_layers.0.weight": "down_blocks.0.resnets.0.norm1.weight",
        "input_blocks.2.1.proj_in.weight": "down_blocks.0.attentions.1.proj_in.weight",
        "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "input_blocks.7.0.skip_connection.weight": "down_blocks.2.resnets.0.conv_shortcut.weight",
        "input_blocks.6.0.op.bias": "down_blocks.1.downsamplers.0.conv.bias",
        "input_blocks.9.0.op.weight": "down_blocks.2.downsamplers.0.conv.weight",
        "input_blocks.11.0.out_layers.3.weight": "down_blocks.3.resnets.1.conv2.weight",
        "middle_block.0.emb_layers.1.weight": "mid_block.resnets.0.time_emb_proj.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        ),
        "middle_block.2.out_layers.0.bias": "mid_block.resnets.1.norm2.bias",
        "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
        "output_blocks.3.1.norm.weight": "up_blocks.1.attentions.0.norm.weight",
        "output_blocks.5.2.conv.weight": "up_blocks.1.upsamplers.0.conv.weight",
        "output_blocks.8.2.conv.bias": "up_blocks.2.upsamplers.0.conv.bias",
        "output_blocks.11.0.skip_connection.weight": "up_blocks.3.resnets.2.conv_shortcut.weight",
        "output_blocks.11.1.proj_out.weight": "up_blocks.3.attentions.2.proj_out.weight",
        "out.0.weight": "conv_norm_out.weight",
        "out.2.bias": "conv_out.bias",
    }
    for ldm_key, diffusers_key in facts.items():
        assert ldm_key in ldm, ldm_key
        assert ldm_unet_to_diffusers({ldm_key: ldm[ldm_key]}, **kwargs) == {diffusers_key: ldm[ldm_key]}
    # No up-block-3 upsampler, no down-block-3 downsampler, no attention in the plain blocks.
    assert not any(
        k.startswith(("input_blocks.12.", "output_blocks.11.2.", "output_blocks.0.1.")) for k in ldm
    )
    assert "input_blocks.10.1.norm.weight" not in ldm


def test_full_size_sd15_names_on_meta_device():
    """Real SD1.5 shapes without allocating weights: key counts and the oracle's key set/shapes."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # class defaults = SD1.5
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
        )
    for model, to_ldm, convert, prefix, count in [
        (unet, diffusers_unet_to_ldm, convert_ldm_unet_checkpoint, UNET_PREFIX, 686),
        (vae, diffusers_vae_to_ldm, convert_ldm_vae_checkpoint, VAE_PREFIX, 248),
    ]:
        sd = model.state_dict()
        ldm = to_ldm(sd)
        assert len(sd) == len(ldm) == count
        back = convert({prefix + k: v for k, v in ldm.items()}, dict(model.config))
        assert sorted(back) == sorted(sd) and all(back[k].shape == sd[k].shape for k in sd)


def test_unet_unmapped_keys_raise():
    model, kwargs = _unet("sd15")
    ldm = diffusers_unet_to_ldm(model.state_dict(), **kwargs)
    bad = dict(ldm)
    bad["input_blocks.1.0.in_layers.1.weight"] = torch.zeros(1)  # index 1 of in_layers is SiLU: no params
    bad["input_blocks.12.0.in_layers.0.weight"] = torch.zeros(1)  # beyond 4 blocks x 2 layers
    bad["output_blocks.11.2.conv.weight"] = torch.zeros(1)  # last up block has no upsampler
    bad["label_emb.0.0.weight"] = torch.zeros(1)  # SDXL / class-conditional only
    with pytest.raises(ConversionError) as e:
        ldm_unet_to_diffusers(bad, **kwargs)
    for key in ("in_layers.1.weight", "input_blocks.12.0", "output_blocks.11.2.conv", "label_emb.0.0"):
        assert key in str(e.value)
    assert "4 key(s)" in str(e.value)
    with pytest.raises(ConversionError, match="split_single_file"):
        ldm_unet_to_diffusers({UNET_PREFIX + "out.0.weight": torch.zeros(1)}, **kwargs)
    with pytest.raises(ConversionError, match="down_blocks.0.resnets.0.foo.weight"):
        diffusers_unet_to_ldm({"down_blocks.0.resnets.0.foo.weight": torch.zeros(1)}, **kwargs)
    with pytest.raises(ConversionError, match="attention_blocks"):
        ldm_unet_to_diffusers({}, n_blocks=4, attention_blocks=(True, False))


def test_unet_unmapped_list_is_capped():
    keys = {f"nonsense.{i}.weight": torch.zeros(1) for i in range(30)}
    with pytest.raises(ConversionError) as e:
        ldm_unet_to_diffusers(keys)
    msg = str(e.value)
    assert "30 key(s)" in msg and "nonsense.19.weight" in msg and "nonsense.20.weight" not in msg
    assert "and 10 more" in msg


# -------------------------------------------------------------------------------------------------- VAE


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=4,
    )


def test_vae_matches_diffusers_oracle(vae):
    sd = vae.state_dict()
    ldm = diffusers_vae_to_ldm(sd, n_blocks=4)
    assert len(ldm) == len(sd)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)  # LDM stores 1x1 convs
    oracle = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in ldm.items()}, dict(vae.config))
    _assert_same_state(oracle, sd)
    _assert_same_state(ldm_vae_to_diffusers(ldm), sd)  # block count inferred from the keys
    _assert_same_state(ldm_vae_to_diffusers(ldm, n_blocks=4), sd)


def test_vae_index_facts(vae):
    ldm = diffusers_vae_to_ldm(vae.state_dict())
    facts = {
        "decoder.up.3.block.0.norm1.weight": "decoder.up_blocks.0.resnets.0.norm1.weight",
        "decoder.up.3.upsample.conv.weight": "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up.1.upsample.conv.bias": "decoder.up_blocks.2.upsamplers.0.conv.bias",
        "decoder.up.0.block.2.conv2.weight": "decoder.up_blocks.3.resnets.2.conv2.weight",
        "decoder.up.0.block.0.nin_shortcut.weight": "decoder.up_blocks.3.resnets.0.conv_shortcut.weight",
        "encoder.down.1.block.0.nin_shortcut.weight": "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.down.2.downsample.conv.weight": "encoder.down_blocks.2.downsamplers.0.conv.weight",
        "encoder.norm_out.bias": "encoder.conv_norm_out.bias",
        "decoder.mid.attn_1.norm.weight": "decoder.mid_block.attentions.0.group_norm.weight",
        "decoder.mid.attn_1.proj_out.bias": "decoder.mid_block.attentions.0.to_out.0.bias",
        "encoder.mid.block_2.conv1.weight": "encoder.mid_block.resnets.1.conv1.weight",
    }
    assert all(ldm_key in ldm for ldm_key in facts)
    assert (
        "decoder.up.0.upsample.conv.weight" not in ldm and "encoder.down.3.downsample.conv.weight" not in ldm
    )
    back = ldm_vae_to_diffusers(ldm)
    for ldm_key, diffusers_key in facts.items():
        assert torch.equal(back[diffusers_key], ldm[ldm_key]), ldm_key


def test_vae_legacy_names(vae):
    sd = vae.state_dict()
    legacy = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k, v in sd.items():
        for new, old in renames.items():
            if f"attentions.0.{new}." in k:
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    _assert_same_state(normalize_legacy_vae_keys(legacy), sd)
    _assert_same_state(
        {k: torch.as_tensor(v) for k, v in diffusers_vae_to_ldm(legacy).items()}, diffusers_vae_to_ldm(sd)
    )
    both = dict(sd, **{"encoder.mid_block.attentions.0.query.weight": torch.zeros(16, 16)})
    with pytest.raises(ConversionError, match="legacy and current"):
        normalize_legacy_vae_keys(both)


def test_vae_unmapped_keys_raise(vae):
    ldm = diffusers_vae_to_ldm(vae.state_dict())
    bad = dict(ldm, **{"encoder.mid.attn_1.qkv.weight": torch.zeros(1), "loss.logvar": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"2 key\(s\).*encoder.mid.attn_1.qkv.weight.*loss.logvar"):
        ldm_vae_to_diffusers(bad)


def test_vae_works_with_numpy_values(vae):
    sd = {k: v.numpy() for k, v in vae.state_dict().items()}
    ldm = diffusers_vae_to_ldm(sd)
    assert isinstance(ldm["decoder.mid.attn_1.k.weight"], np.ndarray)
    back = ldm_vae_to_diffusers(ldm)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)


# ------------------------------------------------------------------------------------------------- CLIP


def _clip_state(file_names=True):
    """Tiny CLIPTextModel weights. transformers >= 5 drops the `text_model.` level from state_dict() (and
    save_pretrained); the SD1.5 hub files and single files have it: `file_names=True` gives that form."""
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        hidden_size=16,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=100,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    sd = CLIPTextModel(cfg).state_dict()
    if file_names and not any(k.startswith("text_model.") for k in sd):
        sd = {"text_model." + k: v for k, v in sd.items()}
    return sd


def test_clip_matches_diffusers_oracle():
    sd = _clip_state()
    ldm = diffusers_clip_to_ldm(sd)
    assert diffusers_clip_to_ldm(_clip_state(file_names=False)).keys() == ldm.keys()
    assert all(k.startswith(CLIP_PREFIX + "text_model.") for k in ldm)
    _assert_same_state(convert_ldm_clip_checkpoint(ldm), sd)
    _assert_same_state(ldm_clip_to_diffusers(ldm), sd)
    # split_single_file hands the CLIP part over without the prefix; that is accepted too.
    _assert_same_state(ldm_clip_to_diffusers({k.removeprefix(CLIP_PREFIX): v for k, v in ldm.items()}), sd)


def test_clip_old_layout_and_errors():
    w = torch.zeros(2)
    assert list(ldm_clip_to_diffusers({CLIP_PREFIX + "embeddings.token_embedding.weight": w})) == [
        "text_model.embeddings.token_embedding.weight"
    ]
    with pytest.raises(ConversionError, match="cond_stage_model.model.token_embedding.weight"):
        ldm_clip_to_diffusers({"cond_stage_model.model.token_embedding.weight": w})
    with pytest.raises(ConversionError, match="vision_model.post_layernorm.weight"):
        diffusers_clip_to_ldm({"vision_model.post_layernorm.weight": w})
    with pytest.raises(ConversionError, match="two keys map to"):
        ldm_clip_to_diffusers(
            {"embeddings.token_embedding.weight": w, "text_model.embeddings.token_embedding.weight": w}
        )


# ------------------------------------------------------------------------------------------ single file


def _single_file(unet_model, unet_kwargs, vae_model):
    sd = {
        UNET_PREFIX + k: v for k, v in diffusers_unet_to_ldm(unet_model.state_dict(), **unet_kwargs).items()
    }
    sd.update({VAE_PREFIX + k: v for k, v in diffusers_vae_to_ldm(vae_model.state_dict()).items()})
    sd.update(diffusers_clip_to_ldm(_clip_state()))
    sd[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd.update(
        {"betas": torch.zeros(10), "alphas_cumprod": torch.zeros(10), "model_ema.decay": torch.tensor(0.9)}
    )
    return sd


def test_split_single_file(vae):
    model, kwargs = _unet("sd15")
    sd = _single_file(model, kwargs, vae)
    unet, vae_sd, clip, ignored = split_single_file(sd)
    assert ignored == sorted(
        ["alphas_cumprod", "betas", "model_ema.decay", CLIP_PREFIX + "text_model.embeddings.position_ids"]
    )
    _assert_same_state(ldm_unet_to_diffusers(unet, **kwargs), model.state_dict())
    _assert_same_state(ldm_vae_to_diffusers(vae_sd), vae.state_dict())
    _assert_same_state(ldm_clip_to_diffusers(clip), _clip_state())

    with pytest.raises(ConversionError, match="embedding_manager.embedder.weight"):
        split_single_file(dict(sd, **{"embedding_manager.embedder.weight": torch.zeros(1)}))


def test_split_single_file_ema(vae):
    model, kwargs = _unet("2blocks")
    sd = _single_file(model, kwargs, vae)
    ema = {
        "model_ema." + "".join(k.split(".")[1:]): v + 1 for k, v in sd.items() if k.startswith(UNET_PREFIX)
    }
    assert "model_ema.diffusion_modelinput_blocks00weight" in ema
    sd.update(ema)
    unet, _, _, ignored = split_single_file(sd, use_ema=True)
    assert torch.equal(unet["input_blocks.0.0.weight"], sd[UNET_PREFIX + "input_blocks.0.0.weight"] + 1)
    assert UNET_PREFIX + "input_blocks.0.0.weight" in ignored and "model_ema.decay" in ignored
    assert not any(k in ignored for k in ema)
    unet, _, _, ignored = split_single_file(sd)  # default: the non-EMA weights
    assert torch.equal(unet["input_blocks.0.0.weight"], sd[UNET_PREFIX + "input_blocks.0.0.weight"])
    del sd["model_ema.diffusion_modelout2bias"]
    with pytest.raises(ConversionError, match="model_ema.diffusion_modelout2bias"):
        split_single_file(sd, use_ema=True)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"cond_stage_model.model.token_embedding.weight": torch.zeros(1)},
            "looks like an SD 2.x checkpoint",
        ),
        (
            {UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)},
            "looks like an SD 2.x checkpoint",
        ),
        ({"conditioner.embedders.0.transformer.x": torch.zeros(1)}, "SDXL"),
        ({"control_model.time_embed.0.weight": torch.zeros(1)}, "ControlNet"),
    ],
)
def test_split_rejects_other_models(extra, message):
    sd = {UNET_PREFIX + "out.0.weight": torch.zeros(1), **extra}
    with pytest.raises(ConversionError, match=message):
        split_single_file(sd)


@pytest.mark.parametrize(
    "keys, guess",
    [
        (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "diffusers UNet"),
        (["down_blocks.0.motion_modules.0.temporal_transformer.norm.weight"], "AnimateDiff"),
        (["controlnet_cond_embedding.conv_in.weight"], "ControlNet"),
        (["encoder.down.0.block.0.conv1.weight"], "VAE"),
        (["some.weight"], ""),
    ],
)
def test_split_says_what_a_foreign_file_looks_like(keys, guess):
    with pytest.raises(ConversionError, match="no model.diffusion_model.* keys: not a Stable Diffusion") as e:
        split_single_file(dict.fromkeys(keys, torch.zeros(1)))
    assert guess in str(e.value)


# ------------------------------------------------------------------------------------------ table engine


def test_key_table_refuses_names_the_other_direction_would_read_differently():
    table = KeyTable([("block.", "blk.", PASS), ("block.norms.0.", "blk.norm1.", PARAM)])
    assert table.to_diffusers({"block.norms.0.weight": 1, "block.ff.bias": 2}, "t") == {
        "blk.norm1.weight": 1,
        "blk.ff.bias": 2,
    }
    # `blk.norm1.x` would come back through the norms row as `block.norms.0.x`: refused, not renamed lossily
    with pytest.raises(ConversionError, match=r"t: no mapping for 2 key\(s\): block.norm1.weight, blk.x"):
        table.to_diffusers({"block.norm1.weight": 1, "blk.x": 2}, "t")
    with pytest.raises(ValueError, match="one-to-one"):
        Rest({"a": "x", "b": "x"})
    with pytest.raises(ValueError, match="share the prefix"):
        KeyTable([("a.", "x.", PASS), ("b.", "x.", PASS)])
