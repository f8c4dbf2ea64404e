"""`convert xdyna` on a tiny fake release (the release's file names, wrappers and key layouts, made here):
the bundle loads and runs one denoising call with both ControlNets and the IP-Adapter tokens."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from oracle import random_torch_state
from test_convert_sd15 import TINY_UNET, TINY_VAE, make_models, write_diffusers_folder
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from convert.__main__ import main as cli
from convert.io import ConversionError
from convert.ip_adapter import ip_adapter_attn2_names
from convert.video_unet import with_pe_buffers
from xdyna_jax.models.controlnet import ControlNetConfig, ControlNetModel
from xdyna_jax.models.resampler import Resampler, ResamplerConfig
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.models.xdyna import load_xdyna
from xdyna_jax.nn.shape_only import shape_only_model

CROSS = 32
XDYNA = UNetConfig(
    block_out_channels=(32, 64, 128, 128),
    cross_attention_dim=CROSS,
    dynamics_adapter=True,
    ip_adapter_tokens=16,
    motion_modules=True,
    motion_max_len=24,
    groupnorm_over_frames=True,
    skip_reference_frame=True,
)


def save_ckpt(state, path):
    """The release's pickles: a `state_dict` wrapper around DDP `module.`-prefixed keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"module." + k: torch.from_numpy(v) for k, v in state.items()}}, path)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    unet = shape_only_model(UNet, XDYNA)
    unet_state = with_pe_buffers(unet, random_torch_state(UNet, XDYNA, 0))
    save_ckpt(unet_state, root / "X-Dyna" / "unet-checkpoint-epoch-5.ckpt")
    for name, channels, seed in (
        ("controlnet-checkpoint-epoch-5.ckpt", 3, 1),
        ("controlnet-face-checkpoint-epoch-2.ckpt", 6, 2),
    ):
        cfg = ControlNetConfig(
            block_out_channels=(32, 64, 128, 128), cross_attention_dim=CROSS, conditioning_channels=channels
        )
        state = random_torch_state(ControlNetModel, cfg, seed)
        save_ckpt(state, root / "X-Dyna" / "pretrained_weights" / name)

    sd15 = write_diffusers_folder(
        root / "sd15",
        make_models(
            TINY_UNET,
            TINY_VAE,
            dict(
                hidden_size=CROSS,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=1000,
                max_position_embeddings=77,
            ),
        ),
    )

    models = root / "IP-Adapter" / "models"
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
            projection_dim=16,
            hidden_act="gelu",
        )
    ).save_pretrained(models / "image_encoder")
    rcfg = ResamplerConfig(
        dim=64, depth=1, dim_head=64, heads=1, num_queries=16, embedding_dim=32, output_dim=CROSS
    )
    image_proj = random_torch_state(Resampler, rcfg, 3)
    ip = {}
    for k, name in enumerate(ip_adapter_attn2_names(XDYNA)):
        for w in ("to_k_ip", "to_v_ip"):
            ip[f"{2 * k + 1}.{w}.weight"] = torch.from_numpy(unet_state[f"{name}.{w}.weight"])
    torch.save(
        {"image_proj": {k: torch.from_numpy(v) for k, v in image_proj.items()}, "ip_adapter": ip},
        models / "ip-adapter-plus_sd15.bin",
    )
    out = root / "bundle"
    assert (
        cli(
            [
                "xdyna",
                "--release",
                str(root / "X-Dyna"),
                "--sd15",
                str(sd15),
                "--ip-adapter",
                str(root / "IP-Adapter"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    return root, out, unet_state


def test_bundle_loads_and_denoises(fake):
    _, out, unet_state = fake
    xd = load_xdyna(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["parts"]) >= {
        "unet",
        "controlnet_pose",
        "controlnet_face",
        "vae",
        "text_encoder",
        "resampler",
        "image_encoder",
        "tokenizer",
    }
    np.testing.assert_array_equal(
        xd.denoiser.unet.conv_in.kernel[...], unet_state["conv_in.weight"].transpose(2, 3, 1, 0)
    )
    assert xd.scheduler.beta_schedule == "linear" and xd.scheduler.steps_offset == 1

    rng = np.random.default_rng(0)
    text = xd.text_encoder(jnp.asarray(xd.tokenizer([""])))
    tokens = xd.image_tokens(jnp.asarray(rng.standard_normal((1, 32, 32, 3)), jnp.float32))
    context = jnp.concatenate([text, tokens], axis=1)
    assert context.shape == (1, 77 + 16, CROSS)
    latents = jnp.asarray(rng.standard_normal((1, 3, 8, 8, 4)), jnp.float32)
    pose = jnp.asarray(rng.uniform(size=(1, 2, 64, 64, 3)), jnp.float32)
    face = jnp.asarray(rng.uniform(size=(1, 2, 64, 64, 6)), jnp.float32)

    graph, state = nnx.split(xd.denoiser)
    step = jax.jit(lambda s, p, f: nnx.merge(graph, s)(latents, jnp.array([961]), context, p, f))
    both, pose_only = step(state, pose, face), step(state, pose, None)
    assert both.shape == latents.shape and bool(jnp.isfinite(both).all())
    assert float(jnp.abs(both - pose_only).max()) > 1e-4  # the face ControlNet's residuals arrive


def test_missing_release_file(fake, tmp_path):
    root, _, _ = fake
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="unet-checkpoint-epoch-5.ckpt"):
        from convert.xdyna import convert_xdyna

        convert_xdyna(tmp_path / "empty", root / "sd15", root / "IP-Adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
