import numpy as np
import pytest
import torch
from PIL import Image

from gen_core.config import InceptionConfig
from gen_core.metrics import (
    INCEPTION_SHA256, FeatureNetError, FeatureStats, clean_resize, fid_from_stats, inception_features, inception_path, kid,
    load_inception, precision_recall,
)  # fmt: skip


def test_streaming_stats_match_numpy():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(500, 6))
    stats = FeatureStats(6)
    for chunk in np.array_split(feats, 7):
        stats.update(chunk)
    assert np.allclose(stats.mu, feats.mean(0))
    assert np.allclose(stats.sigma, np.cov(feats, rowvar=False))


@pytest.mark.parametrize("samples", [1000, 100], ids=["full_rank", "fewer_samples_than_dims"])
def test_frechet_distance_equals_clean_fids_formula(samples):
    """Our eigendecomposition form against clean-fid's sqrtm form on correlated, shifted features."""
    from cleanfid.fid import frechet_distance

    rng = np.random.default_rng(samples)
    dim = 256
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a = rng.normal(size=(samples, dim)) @ mixing
    b = (rng.normal(size=(samples, dim)) * 1.5 + 0.2) @ mixing
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    ours = fid_from_stats(*stats[0], *stats[1])
    assert ours == pytest.approx(float(frechet_distance(*stats[0], *stats[1])), rel=1e-6)
    assert ours > 1.0 and fid_from_stats(*stats[0], *stats[0]) == pytest.approx(0.0, abs=1e-6 * ours)


def test_fid_kid_pr_behave():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    far = rng.normal(loc=3.0, size=(400, 8))
    stats = {name: FeatureStats(8) for name in "abf"}
    for name, feats in zip("abf", (a, b, far)):
        stats[name].update(feats)
    same = fid_from_stats(stats["a"].mu, stats["a"].sigma, stats["b"].mu, stats["b"].sigma)
    diff = fid_from_stats(stats["a"].mu, stats["a"].sigma, stats["f"].mu, stats["f"].sigma)
    assert same < 1.0 < 60 < diff  # |mean shift|^2 = 8 * 9 = 72
    assert abs(kid(a, b, 10, 100)) < 0.05 < kid(a, far, 10, 100)
    precision, recall = precision_recall(a, b, k=3)
    assert precision > 0.8 and recall > 0.8
    precision, recall = precision_recall(a, far, k=3)
    assert precision < 0.2 and recall < 0.2


def test_inception_weights_are_checksummed():
    path, digest = inception_path(InceptionConfig())
    assert digest == INCEPTION_SHA256
    with pytest.raises(FeatureNetError, match="sha256: required"):
        inception_path(InceptionConfig(source="url", url="https://example.invalid/x.pt"))


@pytest.fixture(scope="module")
def inception():
    torch.set_num_threads(2)
    return load_inception(InceptionConfig())


def test_fid_agrees_with_clean_fid(tmp_path, inception, real_digits):
    """Same weights, same images: our streaming path and cleanfid.compute_fid must agree."""
    from cleanfid import fid as cleanfid

    images, labels = real_digits
    first, second = images[labels == 3][:24], images[labels == 8][:24]
    for name, batch in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(batch):
            Image.fromarray(image).save(tmp_path / name / f"{i:03d}.png")
    reference = cleanfid.compute_fid(
        str(tmp_path / "a"), str(tmp_path / "b"), mode="clean", custom_feat_extractor=inception,
        device=torch.device("cpu"), num_workers=0, batch_size=24, verbose=False, use_dataparallel=False,
    )  # fmt: skip
    ours = []
    for batch in (first, second):
        stats = FeatureStats(2048)
        stats.update(inception_features(inception, torch.from_numpy(batch)[:, None]))
        ours.append(stats)
    value = fid_from_stats(ours[0].mu, ours[0].sigma, ours[1].mu, ours[1].sigma)
    assert value == pytest.approx(reference, rel=1e-3)
    assert value > 10  # two different digits are far apart: the check is not vacuous


def test_clean_resize_matches_clean_fid_resizer():
    from cleanfid.resize import build_resizer

    image = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    ours = clean_resize(torch.from_numpy(image)[None, None])[0].numpy().transpose(1, 2, 0)
    theirs = build_resizer("clean")(np.repeat(image[..., None], 3, axis=2))
    assert ours.shape == (299, 299, 3) and np.array_equal(ours, theirs)


def test_reference_stats_from_another_inception_network_are_refused_in_one_line(tmp_path):
    from gen_core.metrics import FeatureNetError, load_inception_reference, save_ref_stats

    stats = FeatureStats(4)
    stats.update(np.random.default_rng(0).normal(size=(10, 4)))
    (tmp_path / "inception.npz").write_bytes(save_ref_stats(stats, np.zeros((10, 4), np.float32), "inception-2015-12-05", "0" * 64))
    with pytest.raises(FeatureNetError, match=r"inception.npz: made with a different Inception network; rerun ref_stats$"):
        load_inception_reference(tmp_path, InceptionConfig())
