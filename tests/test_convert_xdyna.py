"""`convert xdyna` on a tiny fake release (the release's file names, wrappers and key layouts, made here):
the bundle loads (through its manifest's kind) and runs one denoising call with both ControlNets and the
IP-Adapter tokens; a ControlNet that does not fit the UNet is refused; `export --layout release` gives the
release's files back."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from oracle import TINY_CLIP, TINY_SD_UNET, TINY_VAE, make_models, random_torch_state, write_diffusers_folder
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import xdyna_jax
from convert.__main__ import main as cli
from convert.controlnet import convert_controlnet
from convert.export import export
from convert.io import ConversionError
from convert.ip_adapter import ip_adapter_attn2_names
from convert.video_unet import with_pe_buffers
from convert.xdyna import convert_xdyna
from xdyna_jax.bundle import read_params
from xdyna_jax.models.controlnet import ControlNetConfig, ControlNetModel
from xdyna_jax.models.resampler import Resampler, ResamplerConfig
from xdyna_jax.models.unet import UNet, UNetConfig
from xdyna_jax.nn.shape_only import shape_only_model
from xdyna_jax.sampling.bundles import XDyna, load_pipeline, load_xdyna

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
    controlnets = {}
    for name, channels, seed in (
        ("controlnet-checkpoint-epoch-5.ckpt", 3, 1),
        ("controlnet-face-checkpoint-epoch-2.ckpt", 6, 2),
    ):
        cfg = ControlNetConfig(
            block_out_channels=(32, 64, 128, 128), cross_attention_dim=CROSS, conditioning_channels=channels
        )
        controlnets[name] = state = random_torch_state(ControlNetModel, cfg, seed)
        save_ckpt(state, root / "X-Dyna" / "pretrained_weights" / name)

    sd15 = write_diffusers_folder(
        root / "sd15",
        make_models(TINY_SD_UNET, TINY_VAE, dict(TINY_CLIP, hidden_size=CROSS)),
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
    return root, out, unet_state, controlnets


def sd15_args(root):
    return root / "sd15", root / "IP-Adapter"


def test_bundle_loads_and_denoises(fake):
    _, out, unet_state, _ = fake
    xd = load_pipeline(out)  # dispatches on the manifest's kind
    assert isinstance(xd, XDyna)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "xdyna"
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
    step = jax.jit(
        lambda s, scale: nnx.merge(graph, s)(latents, jnp.array([961]), context, pose, face, face_scale=scale)
    )
    both, pose_only = step(state, 1.0), step(state, 0.0)  # one compile: face_scale 0 silences the face net
    assert both.shape == latents.shape and bool(jnp.isfinite(both).all())
    assert float(jnp.abs(both - pose_only).max()) > 1e-4  # the face ControlNet's residuals arrive


def test_missing_release_file(fake, tmp_path):
    root = fake[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="unet-checkpoint-epoch-5.ckpt"):
        convert_xdyna(tmp_path / "empty", *sd15_args(root), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pipeline_manifest_kind_is_required(fake, tmp_path):
    out = fake[1]
    manifest = json.loads((out / "manifest.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for kind, message in ((None, "names no pipeline kind"), ("toaster", "unknown pipeline kind 'toaster'")):
        (bad / "manifest.json").write_text(json.dumps({**manifest, "kind": kind} if kind else {}))
        with pytest.raises(xdyna_jax.BundleError, match=message) as e:
            load_pipeline(bad)
        assert str(bad / "manifest.json") in str(e.value)
    with pytest.raises(xdyna_jax.BundleError, match="manifest.json is missing"):
        load_xdyna(tmp_path)


def test_controlnet_that_does_not_fit_the_unet_is_refused(fake, tmp_path):
    root = fake[0]
    release = tmp_path / "X-Dyna"
    release.mkdir()
    (release / "unet-checkpoint-epoch-5.ckpt").symlink_to(root / "X-Dyna" / "unet-checkpoint-epoch-5.ckpt")
    narrow = ControlNetConfig(block_out_channels=(32, 64, 128, 128), cross_attention_dim=16)
    save_ckpt(random_torch_state(ControlNetModel, narrow, 4), release / "controlnet-checkpoint-epoch-5.ckpt")
    with pytest.raises(ConversionError) as e:
        convert_xdyna(release, *sd15_args(root), tmp_path / "out", progress=False)
    message = str(e.value)
    assert "controlnet-checkpoint-epoch-5.ckpt" in message and "unet-checkpoint-epoch-5.ckpt" in message
    assert "cross_attention_dim: ControlNet 16 vs UNet 32" in message and "block_out_channels" not in message
    assert not (tmp_path / "out").exists()


def test_release_layout_export_gives_the_release_files_back(fake, tmp_path):
    _, out, unet_state, controlnets = fake
    export(out, tmp_path / "release", "release")
    files = sorted(p.name for p in (tmp_path / "release").iterdir())
    assert files == sorted(["unet-checkpoint-epoch-5.ckpt", *controlnets])
    unet = torch.load(tmp_path / "release" / "unet-checkpoint-epoch-5.ckpt", weights_only=True)
    assert sorted(unet) == sorted(unet_state)  # the release's key set, pe buffers included
    for name, state in controlnets.items():
        back = torch.load(tmp_path / "release" / name, weights_only=True)
        assert sorted(back) == sorted(state)
        for k, v in state.items():
            np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)
    # release file -> bundle again: the same params
    convert_controlnet(tmp_path / "release" / "controlnet-checkpoint-epoch-5.ckpt", tmp_path / "pose")
    a, b = read_params(out / "controlnet_pose"), read_params(tmp_path / "pose")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_video_unet_is_not_exported_as_a_2d_diffusers_unet(fake, tmp_path):
    out = fake[1]
    with pytest.raises(ConversionError, match="video UNet bundle.*Dynamics-Adapter.*--layout release"):
        export(out / "unet", tmp_path / "diffusers", "diffusers")
    assert not (tmp_path / "diffusers").exists()
