import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from gen_core.config import InceptionConfig
from gen_core.metrics import (
    INCEPTION_SHA256, FeatureNetError, FeatureStats, clean_resize, fid_from_features, fid_from_stats, inception_features, inception_path, kid,
    classifier_score, load_inception, per_class_metrics, precision_recall, sample_metrics,
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


@pytest.mark.parametrize("samples", [40, 255, 256, 600], ids=["few", "rank_n_minus_1", "n_equals_dim", "more_than_dim"])
def test_fid_from_features_is_the_frechet_distance_of_their_mean_and_covariance(samples):
    """The n x n form (n <= d: a singular covariance) against an independent route, tr((S1 S2)^1/2) as the
    singular values of A S2^1/2 (no squaring), and against fid_from_stats, which loses a few 1e-8 there:
    the square roots of its d x d matrix's rounding-error eigenvalues add up."""
    rng = np.random.default_rng(samples)
    dim = 256
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    reference = (rng.normal(size=(900, dim)) * 1.5 + 0.2) @ mixing
    mu, sigma = reference.mean(0), np.cov(reference, rowvar=False)
    features = rng.normal(size=(samples, dim)) @ mixing
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)
    centred = (features - features.mean(0)) / np.sqrt(samples - 1)
    trace_sqrt = np.linalg.svd(centred @ (eigenvectors * np.sqrt(eigenvalues)) @ eigenvectors.T, compute_uv=False).sum()
    exact = ((features.mean(0) - mu) ** 2).sum() + (centred**2).sum() + np.trace(sigma) - 2 * trace_sqrt
    assert fid_from_features(features, mu, sigma) == pytest.approx(exact, rel=1e-9) and exact > 1.0
    assert fid_from_stats(features.mean(0), np.cov(features, rowvar=False), mu, sigma) == pytest.approx(exact, rel=1e-7)
    assert fid_from_features(reference, mu, sigma) == pytest.approx(0.0, abs=1e-9 * exact)


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


@pytest.mark.parametrize("shape", [(20, 1, 28, 28), (20, 3, 32, 32), (4, 3, 64, 48), (3, 1, 320, 320)], ids=str)
def test_clean_resize_matches_clean_fid_resizer(shape):
    """The batched two-pass resize against clean-fid's per-image PIL one, upscaling and downscaling: equal
    but for float64 summation order, which may move a value by one float32 ulp (<= 2**-15 at 255)."""
    from cleanfid.resize import build_resizer

    images = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    resize = build_resizer("clean")
    theirs = np.stack([resize(np.repeat(im, 3, 0).transpose(1, 2, 0) if im.shape[0] == 1 else im.transpose(1, 2, 0))
                       for im in images]).transpose(0, 3, 1, 2)  # fmt: skip
    ours = clean_resize(torch.from_numpy(images)).numpy()
    assert ours.shape == (shape[0], 3, 299, 299) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= 2**-15
    assert (ours != theirs).mean() < 1e-5


def test_torch_backend_is_the_plain_graph_in_another_layout():
    """Frozen, channels_last, without the graph's 46 contiguous() calls: the plain TorchScript graph's features."""
    torch.set_num_threads(2)
    net = load_inception(InceptionConfig(backend="torch"), precision="fp32")
    plain = torch.jit.load(str(inception_path(InceptionConfig())[0])).eval()
    images = clean_resize(torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 1, 32, 32), dtype=np.uint8)))
    with torch.no_grad():
        expected = plain(images / 128.0 - 1.0).numpy()
    graph = net.net.graph  # one inlined graph: its 94 convolutions, and none of the calls
    assert len(graph.findAllNodes("aten::conv2d")) == 94 and graph.findAllNodes("aten::contiguous") == []
    assert np.abs(net(images).numpy() - expected).max() / np.abs(expected).max() < 1e-5


def test_onnxruntime_backend_gives_the_torch_features():
    """The same checksummed graph on both backends: a pure re-execution, equal to float32 rounding."""
    torch.set_num_threads(2)
    cfg = InceptionConfig()
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 1, 32, 32), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quietly: torch's TorchScript deprecation notice was printed by every evaluate
        torch_net = load_inception(cfg.model_copy(update={"backend": "torch"}))
        onnx_net = load_inception(cfg.model_copy(update={"backend": "onnxruntime"}))
    assert (torch_net.backend, onnx_net.backend, onnx_net.precision) == ("torch", "onnxruntime", "fp32")
    a, b = inception_features(torch_net, images), inception_features(onnx_net, images)
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-5 and np.abs(a).max() > 0.1


def test_reference_stats_from_another_inception_network_are_refused_in_one_line(tmp_path):
    from gen_core.metrics import FeatureNetError, load_inception_reference, save_ref_stats

    stats = FeatureStats(4)
    stats.update(np.random.default_rng(0).normal(size=(10, 4)))
    (tmp_path / "inception.npz").write_bytes(save_ref_stats(stats, np.zeros((10, 4), np.float32), "inception-2015-12-05", "0" * 64))
    with pytest.raises(FeatureNetError, match=r"inception.npz: made with a different Inception network; rerun ref_stats$"):
        load_inception_reference(tmp_path, InceptionConfig())


def test_classifier_score_spans_one_to_the_class_count():
    confident = np.eye(10)[np.arange(1000) % 10]  # every class, each sample certain of its own
    assert classifier_score(confident, 10) == pytest.approx(10.0, rel=1e-6)
    one_class = np.eye(10)[np.zeros(1000, int)]  # collapsed onto one class
    assert classifier_score(one_class, 10) == pytest.approx(1.0, rel=1e-6)
    unsure = np.full((1000, 10), 0.1)
    assert classifier_score(unsure, 10) == pytest.approx(1.0, rel=1e-6)


def _settings(**kw):
    from gen_core.config import EvaluateConfig

    return EvaluateConfig(**{"kid_subset_size": 50, "kid_subsets": 5, **kw})


def _blobs(rng, per_class: int, classes: int = 4, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    centres = np.arange(classes)[:, None] * 4.0 * np.ones(dim)
    labels = np.arange(per_class * classes) % classes
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def test_per_class_metrics_see_a_collapsed_class_that_overall_metrics_hide():
    """Class 2's samples are one point: overall precision stays high, but class 2's recall and diversity
    drop to ~0 and its FID stands out."""
    rng = np.random.default_rng(0)
    real, real_labels = _blobs(rng, 50)
    fake, fake_labels = _blobs(rng, 50)
    fake[fake_labels == 2] = fake[fake_labels == 2][0] + 1e-3 * rng.normal(size=fake[fake_labels == 2].shape)
    out = per_class_metrics(real, real_labels, fake, fake_labels, 4, k=3)
    assert out["recall"][2] < 0.1 < 0.5 < min(out["recall"][i] for i in (0, 1, 3))
    assert out["diversity"][2] < 0.01 and all(0.8 < out["diversity"][i] < 1.25 for i in (0, 1, 3))
    assert out["fid"][2] > 5 * max(out["fid"][i] for i in (0, 1, 3))


def test_sample_metrics_of_real_data_against_itself_is_a_floor_and_of_collapse_is_not():
    rng = np.random.default_rng(1)
    ref_feats, ref_labels = _blobs(rng, 60)
    stats = {"mu": ref_feats.mean(0), "sigma": np.cov(ref_feats, rowvar=False), "features": ref_feats, "labels": ref_labels}
    reference = {"inception": stats, "classifier": stats}
    real, labels = _blobs(rng, 60)
    probabilities = np.eye(4)[labels] * 0.9 + 0.025
    floor = sample_metrics(reference, {"inception": real, "classifier": real, "probabilities": probabilities, "labels": labels}, _settings())
    collapsed = real.copy()
    for c in range(4):  # every class collapsed to one sample: the per-class mode collapse of the default run's GANs
        collapsed[labels == c] = real[labels == c][0]
    bad = sample_metrics(reference, {"inception": collapsed, "classifier": collapsed, "probabilities": probabilities, "labels": labels}, _settings())
    assert floor["recall"] > 0.7 and floor["classes_covered"] == 4 and floor["class_accuracy"] == 1.0
    assert bad["recall"] < 0.05 and bad["classes_covered"] == 0 and bad["diversity"] < 0.01 and bad["fid"] > floor["fid"]
    assert floor["classifier_score"] == bad["classifier_score"]  # the classifier score alone cannot see collapse
    assert floor["num_samples"] == 240 and floor["per_class_features"] == "inception"


def test_fid_extrapolation_recovers_the_fid_of_infinitely_many_samples():
    """Samples of N(delta, I) against the exact reference N(0, I) (no sampling on its side): FID with N samples is the
    true distance ||delta||^2 plus a bias that falls as 1/N (Chong & Forsyth 2020). The fit over subsets of 5,000
    samples recovers the true distance where the raw FID at 5,000 is far above it, and predicts the mean FID
    measured at 20,000 fresh samples; too few samples for the fit are refused in one line, by the protocol too."""
    from gen_core.config import ProtocolConfig
    from gen_core.metrics import fid_curve, fid_extrapolated, fit_fid_curve

    rng = np.random.default_rng(0)
    dim = 64
    delta = np.zeros(dim)
    delta[:2] = 0.5  # true FID 0.5
    mu, sigma = np.zeros(dim), np.eye(dim)
    features = rng.normal(size=(5000, dim)) + delta
    raw = fid_from_features(features, mu, sigma)
    result = fid_extrapolated(features, mu, sigma, target=20000)
    assert raw - 0.5 > 0.15  # the bias at 5,000 samples: ~dim / N + dim^2 / (4 N)
    assert abs(result["fid_infinity"] - 0.5) < 0.05 and result["fid_extrapolation_slope"] > 0
    measured = np.mean([fid_from_features(rng.normal(size=(20000, dim)) + delta, mu, sigma) for _ in range(3)])
    assert abs(result["fid_extrapolated"] - measured) < 0.05 and result["fid_extrapolated_to"] == 20000
    assert fit_fid_curve([(1000, 3.0), (2000, 2.0)]) == pytest.approx((1.0, 2000.0))
    assert [n for n, _ in fid_curve(features, mu, sigma, [1000, 5000], draws=2)] == [1000, 5000]
    with pytest.raises(ValueError, match="needs 4 x 64 = 256 samples of 64-d features at least, got 255"):
        fid_extrapolated(features[:255], mu, sigma, target=50000)
    with pytest.raises(ValueError, match="fid_extrapolate_to: 50000 needs num_samples >= 8192"):
        ProtocolConfig(num_samples=5000, fid_extrapolate_to=50000)


def test_the_standard_protocol_reports_fid_extrapolated_beside_fid_and_the_report_shows_both():
    """sample_metrics adds the extrapolation's keys under a protocol with fid_extrapolate_to (standard: 50,000) and
    enough samples, and leaves FID itself as measured; quick has none. The report line shows it with its floor."""
    from pipelines.evaluation import report_line

    rng = np.random.default_rng(2)
    ref_feats, ref_labels = _blobs(rng, 1250)
    stats = {"mu": ref_feats.mean(0), "sigma": np.cov(ref_feats, rowvar=False), "features": ref_feats, "labels": ref_labels}
    reference = {"inception": stats, "classifier": stats}
    real, labels = _blobs(rng, 1250)
    generated = {"inception": real, "classifier": real, "probabilities": np.eye(4)[labels] * 0.9 + 0.025, "labels": labels}
    standard = sample_metrics(reference, generated, _settings(protocol="standard"))
    quick = sample_metrics(reference, generated, _settings(protocol="quick"))
    assert standard["fid"] == quick["fid"] and "fid_extrapolated" not in quick
    assert standard["fid_extrapolated_to"] == 50000 and standard["fid_infinity"] < standard["fid_extrapolated"] < standard["fid"]
    line = report_line({**standard, "floor": {"fid": 0.5, "fid_extrapolated": 0.1}})
    assert line.endswith(f"(5000 samples); fid at 50000 samples (extrapolated) {standard['fid_extrapolated']:.2f} [floor 0.10]"), line
