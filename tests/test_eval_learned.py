"""LPIPS and FVD from local weights: LPIPS against the lpips package's own forward, the Fréchet distance
against closed forms, the FVD plumbing with a tiny TorchScript detector, and the CLI. Every weights file is
written here (random weights); nothing downloads."""

import json
import sys
import types
import warnings
from unittest import mock

import numpy as np
import pytest
import torch

from xdyna_jax.eval import (
    EvalInputError,
    LearnedMetricError,
    evaluate,
    feature_statistics,
    frechet_distance,
    fvd_from_features,
    load_lpips,
    lpips_distances,
    read_frames,
    video_set,
)
from xdyna_jax.eval.__main__ import main
from xdyna_jax.eval.learned_metrics import import_lpips
from xdyna_jax.io.video import write_frames, write_video

# import_lpips also makes torchvision importable beside a torch it was not built for (a CUDA torchvision
# wheel beside a CPU torch); torchvision is imported after it, inside the tests. The LPIPS tests need the
# eval extra (lpips, torchvision), which the dev extra leaves out (pyproject.toml says why).
try:
    lpips = import_lpips()
except LearnedMetricError:
    lpips = None
needs_lpips = pytest.mark.skipif(lpips is None, reason="LPIPS needs the eval extra: pip install '.[eval]'")

TORCHVISION_NAMES = {"alex": "alexnet", "vgg": "vgg16"}


def _features(net):
    """A randomly initialised torchvision `features` stack of the backbone (no classifier: cheaper)."""
    import torchvision

    torch.manual_seed(0)
    if net == "alex":
        return torchvision.models.alexnet(weights=None).features.eval()
    return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"]).eval()


@pytest.fixture(scope="module", params=["alex", "vgg"])
def backbone(request, tmp_path_factory):
    """(net, a torchvision-layout weights file, the features module it holds)."""
    net = request.param
    features = _features(net)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)  # full torchvision files carry a classifier LPIPS ignores
    path = tmp_path_factory.mktemp(net) / f"{net}.pth"
    torch.save(state, path)
    return net, path, features


@pytest.fixture(scope="module")
def alex_file(tmp_path_factory):
    state = {f"features.{k}": v for k, v in _features("alex").state_dict().items()}
    path = tmp_path_factory.mktemp("alex_only") / "alexnet.pth"
    torch.save(state, path)
    return path


def _frames(seed, count=2, size=64):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@needs_lpips
def test_lpips_matches_the_lpips_package(backbone):
    import torchvision

    net, path, features = backbone
    generated, target = _frames(0), _frames(1)
    model = load_lpips(path, net)
    ours = lpips_distances(model, generated, target)
    # the oracle: lpips slices its backbone itself, from a torchvision model holding the file's weights
    fake_model = lambda **kwargs: types.SimpleNamespace(features=features)
    with mock.patch.object(torchvision.models, TORCHVISION_NAMES[net], fake_model):
        oracle = lpips.LPIPS(net=net, pretrained=True, pnet_rand=False, verbose=False).eval()
    unit = lambda frames: torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        expected = oracle(unit(generated), unit(target), normalize=True).reshape(-1).double().numpy()
    assert ours.shape == (2,) and np.all(ours > 0)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    np.testing.assert_array_equal(lpips_distances(model, generated, generated), 0.0)


@needs_lpips
def test_lpips_weights_errors(tmp_path, alex_file):
    state = torch.load(alex_file, weights_only=True)

    def refused(state_or_text, match, net="alex"):
        path = tmp_path / f"bad{len(list(tmp_path.iterdir()))}.pth"
        if isinstance(state_or_text, str):
            path.write_text(state_or_text)
        else:
            torch.save(state_or_text, path)
        with pytest.raises(LearnedMetricError, match=match) as info:
            load_lpips(path, net)
        assert str(path) in str(info.value) and "\n" not in str(info.value)

    renamed = {("features.0.w" if k == "features.0.weight" else k): v for k, v in state.items()}
    refused(renamed, "unexpected key 'features.0.w'; expected a torchvision AlexNet state dict")
    refused({k: v for k, v in state.items() if k != "features.10.bias"}, "missing key 'features.10.bias'")
    refused({**state, "features.3.weight": torch.zeros(3, 3)}, r"'features.3.weight' has shape \(3, 3\)")
    refused(state, r"'features.0.weight' has shape \(64, 3, 11, 11\), VGG16 needs", net="vgg")  # AlexNet's
    refused("not a checkpoint\n", "not a PyTorch state dict")
    refused([1, 2], "holds a list, not a state dict")
    with pytest.raises(LearnedMetricError, match="no such LPIPS backbone weights file"):
        load_lpips(tmp_path / "absent.pth")
    with mock.patch.dict(sys.modules, {"torch": None}), pytest.raises(LearnedMetricError) as info:
        load_lpips(alex_file)  # as without the eval extra
    assert "pip install 'xdyna-jax[eval]'" in str(info.value)


def test_frechet_distance_closed_forms():
    # N(0, 1) vs N(3, 4): 3^2 + 1 + 4 - 2 sqrt(4)
    assert frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0, rel=1e-12)
    mu1, var1 = np.array([0.5, -1.0, 2.0, 0.0]), np.array([1.0, 4.0, 0.25, 2.0])
    mu2, var2 = np.array([0.0, 1.0, 2.0, -3.0]), np.array([9.0, 1.0, 1.0, 2.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-12)
    # one full covariance on both sides: the trace term vanishes, the means' distance is left
    a = np.random.default_rng(0).normal(size=(4, 4))
    sigma = a @ a.T + np.eye(4)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)
    features = np.random.default_rng(1).normal(size=(50, 6))
    assert abs(fvd_from_features(features, features)) < 1e-9
    mu, cov = feature_statistics(features)
    np.testing.assert_allclose(mu, features.mean(0))
    np.testing.assert_allclose(cov, np.cov(features.T))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(features[:1])


class Detector(torch.nn.Module):
    """The I3D TorchScript call signature; refuses any other layout, range or flags, and returns a few
    pixels (channel, frame, row, column picked apart) so the test can recompute them from the frames."""

    def forward(
        self, videos: torch.Tensor, rescale: bool = True, resize: bool = False, return_features: bool = False
    ) -> torch.Tensor:
        if rescale or not resize or not return_features:
            raise RuntimeError("wrong flags")
        if videos.dim() != 5 or videos.size(1) != 3 or videos.dtype != torch.float32:
            raise RuntimeError("expected float32 (N, 3, T, H, W)")
        if float(videos.min()) < -1.0 or float(videos.max()) > 1.0:
            raise RuntimeError("values outside [-1, 1]")
        picks = [videos[:, 0, 3, 1, 2], videos[:, 1, 7, 2, 1], videos[:, 2, 9, 0, 3]]
        return torch.stack(picks + [videos[:, :, 5].mean((1, 2, 3))], dim=1)


def _expected_features(frames):
    """The Detector's features computed from uint8 (T, H, W, 3) frames, without torch."""
    x = frames.astype(np.float64) / 127.5 - 1.0
    return np.array([x[3, 1, 2, 0], x[7, 2, 1, 1], x[9, 0, 3, 2], x[5].mean()])


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript, but the community's I3D detector is a TorchScript file
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Detector()).save(str(path))
    return path


def _video_folder(folder, seeds, frames=10, brightness=0):
    for seed in seeds:
        video = np.random.default_rng(seed).integers(0, 200, (frames, 16, 16, 3)) + brightness
        write_video(folder / f"clip{seed}.mp4", video.astype(np.uint8), fps=8)
    return folder


def test_fvd_with_a_torchscript_detector(tmp_path, detector_file, capsys):
    generated = _video_folder(tmp_path / "generated", [0, 1, 2], brightness=40)
    target = _video_folder(tmp_path / "target", [3, 4, 5, 6])
    out = tmp_path / "fvd.json"
    args = ["--generated", str(generated), "--target", str(target), "--fvd-weights", str(detector_file)]
    assert main([*args, "--json", str(out)]) == 0
    assert "FVD (I3D features, lower is better)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    features = {
        side: np.stack([_expected_features(read_frames(p)) for p in video_set(folder)])
        for side, folder in (("generated", generated), ("target", target))
    }
    stats = [feature_statistics(features[side]) for side in ("generated", "target")]
    assert report["fvd"] == pytest.approx(frechet_distance(*stats[0], *stats[1]), rel=1e-5)
    assert report["fvd"] > 1.0 and report["fvd_features"] == 4 and report["frames"] == 10
    assert report["videos"]["generated"] == ["clip0.mp4", "clip1.mp4", "clip2.mp4"]


def test_fvd_input_errors(tmp_path, detector_file, capsys):
    sets = _video_folder(tmp_path / "a", [0, 1])
    single = tmp_path / "a" / "clip0.mp4"
    detector = ["--fvd-weights", str(detector_file)]
    assert main(["--generated", str(single), "--target", str(single), *detector]) == 2
    err = capsys.readouterr().err
    assert "at least 2 videos per side" in err and str(single) in err and err.count("\n") == 1
    _video_folder(tmp_path / "short", [0, 1], frames=6)
    assert main(["--generated", str(sets), "--target", str(tmp_path / "short"), *detector]) == 2
    assert "has 6 frames; FVD needs at least 10" in capsys.readouterr().err
    both = ["--lpips-weights", "alex.pth", *detector]
    assert main(["--generated", str(single), "--target", str(single), *both]) == 2
    assert "at least 2 videos per side" in capsys.readouterr().err
    assert main(["--generated", str(sets), "--target", str(sets), *both]) == 2
    assert "--lpips-weights score one video against its target" in capsys.readouterr().err
    assert main(["--generated", str(sets), "--target", str(sets)]) == 2
    assert "scored by FVD only: pass --fvd-weights" in capsys.readouterr().err
    (tmp_path / "notscript.pt").write_text("no")
    assert main(["--generated", str(sets), "--target", str(sets), "--fvd-weights", "notscript.pt"]) == 2
    assert "no such I3D detector file" in capsys.readouterr().err
    args = ["--generated", str(sets), "--target", str(sets), "--fvd-weights", str(tmp_path / "notscript.pt")]
    assert main(args) == 2
    assert "not a TorchScript file" in capsys.readouterr().err
    # sub-folders of PNG frames count as videos; a folder of PNG frames is one video
    write_frames(tmp_path / "frames" / "b", _frames(0, count=3, size=8))
    write_frames(tmp_path / "frames" / "a", _frames(1, count=3, size=8))
    assert [p.name for p in video_set(tmp_path / "frames")] == ["a", "b"]
    assert video_set(tmp_path / "frames" / "a") is None and video_set(single) is None


@needs_lpips
def test_cli_lpips_row_and_missing_weights(tmp_path, alex_file, capsys):
    write_frames(tmp_path / "gen", _frames(2))
    write_frames(tmp_path / "tgt", _frames(3))
    out = tmp_path / "eval.json"
    args = ["--generated", str(tmp_path / "gen"), "--target", str(tmp_path / "tgt")]
    assert main([*args, "--lpips-weights", str(alex_file), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LPIPS (AlexNet, lower is better)" in printed and "fvd skipped: FVD compares two sets" in printed
    assert "LPIPS and FVD skipped" not in printed
    report = json.loads(out.read_text())
    expected = lpips_distances(load_lpips(alex_file), _frames(2), _frames(3))
    np.testing.assert_allclose(report["image"]["lpips_per_frame"], expected, rtol=1e-6)
    assert report["image"]["lpips"] == pytest.approx(expected.mean(), rel=1e-6)
    assert report["inputs"]["lpips_net"] == "alex" and report["inputs"]["lpips_weights"] == str(alex_file)

    assert main([*args, "--lpips-weights", str(tmp_path / "absent.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "absent.pth: no such LPIPS backbone weights file" in err
    write_frames(tmp_path / "tiny", _frames(2, size=16))
    with pytest.raises(EvalInputError, match="needs frames of at least 31 x 31"):
        evaluate(tmp_path / "tiny", tmp_path / "tiny", lpips_weights=alex_file)
    # with no weights the report keeps its learned-metrics note and no LPIPS numbers
    report = evaluate(tmp_path / "gen", tmp_path / "tgt")
    assert report["image"]["lpips"] is None and "lpips_fvd" in report["skipped"]
