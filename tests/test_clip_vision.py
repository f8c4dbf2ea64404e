"""CLIPVisionModelWithProjection parity vs transformers (tiny, perturbed, fp32) and CLIP preprocessing."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from oracle import perturb_, rel_err, torch_state
from PIL import Image

from convert.io import ConversionError
from convert.state import export_torch_state, load_torch_state
from xdyna_jax.conditioning.clip_image import preprocess_clip_image, uncond_pixel_values
from xdyna_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from xdyna_jax.nn.compute import Compute
from xdyna_jax.nn.shape_only import shape_only_model

TINY = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)


def build_pair(act="gelu", seed=0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(**TINY, hidden_act=act)
    ref = transformers.CLIPVisionModelWithProjection(cfg).eval()
    perturb_(ref, seed)
    ours = CLIPVisionConfig.from_transformers(ref.config.to_dict(), compute=Compute(precision="highest"))
    model = shape_only_model(CLIPVisionModelWithProjection, ours)
    load_torch_state(model, torch_state(ref), source=f"tiny-{act}")
    return ref, model


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_vision_matches_transformers(act):
    ref, model = build_pair(act)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), output_hidden_states=True)
    got = model(jnp.asarray(x))
    errs = [rel_err(got.image_embeds, out.image_embeds.numpy())]
    errs.append(rel_err(got.last_hidden_state, out.last_hidden_state.numpy()))
    assert len(got.hidden_states) == len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    errs += [rel_err(g, e.numpy()) for g, e in zip(got.hidden_states, out.hidden_states, strict=True)]
    assert max(errs) < 1e-5, errs
    assert got.hidden_states[-2].shape == (2, 17, 32)  # what IP-Adapter-plus feeds its Resampler


def test_state_round_trip_is_exact():
    ref, model = build_pair(seed=2)
    original = torch_state(ref)
    exported = export_torch_state(model)
    assert sorted(exported) == sorted(original)  # the transformers key names, `vision_model.` included
    for k, v in original.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    missing = {k: v for k, v in original.items() if k != "visual_projection.weight"}
    with pytest.raises(ConversionError, match="missing keys.*visual_projection"):
        load_torch_state(model, missing, source="x")


def test_config_round_trips_and_bad_inputs():
    vit_h = CLIPVisionConfig()
    assert CLIPVisionConfig.from_dict(vit_h.to_dict()) == vit_h
    assert vit_h.num_positions == 257
    tcfg = transformers.CLIPVisionConfig(**vit_h.to_transformers())
    assert CLIPVisionConfig.from_transformers(tcfg.to_dict()) == vit_h
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVisionConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="patch_size"):
        CLIPVisionConfig(image_size=30, patch_size=8)
    _, model = build_pair()
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
        model(jnp.zeros((1, 3, 32, 32)))


def random_images(seed=0):
    rng = np.random.default_rng(seed)
    # odd sizes, portrait / landscape / square / smaller than 224 (upscaled) / extreme aspect
    sizes = [(301, 227), (225, 403), (97, 131), (224, 224), (513, 230)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_preprocessing_matches_clip_image_processor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = transformers.CLIPImageProcessor()
    images = random_images()
    expected = processor(images=images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    got = preprocess_clip_image(images)
    assert got.shape == (5, 224, 224, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)  # same PIL calls: bit-exact
    # PIL input (with alpha, dropped by the RGB conversion) and a single image
    rgba = Image.fromarray(np.dstack([images[0], np.full(images[0].shape[:2], 7, np.uint8)]))
    np.testing.assert_array_equal(preprocess_clip_image(rgba), got[:1])
    np.testing.assert_array_equal(preprocess_clip_image(images[1]), got[1:2])
    assert not uncond_pixel_values(2).any() and uncond_pixel_values(2).shape == (2, 224, 224, 3)


def test_preprocessing_refuses_bad_images():
    with pytest.raises(ValueError, match="uint8"):
        preprocess_clip_image(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        preprocess_clip_image([np.zeros((32, 32), np.uint8)])
    with pytest.raises(ValueError, match="no images"):
        preprocess_clip_image([])
