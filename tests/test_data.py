import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_core.config import DataConfig, RunConfig
from gen_core.data import (
    DataError, RawDataset, RawSplit, dataset_hash, fit_image, load_split, read_idx, read_source, settings_that_do_not_fit,
    reference_split, split_train_eval, write_prepared,
)  # fmt: skip

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="Debian dataset-fashion-mnist not installed")


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    blob = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(blob) if gz else blob)


def mixed(images: np.ndarray, labels: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """A class-interleaved subset (the mnist5k file is sorted by label)."""
    order = np.stack([np.flatnonzero(labels == c)[:per_class] for c in range(10)], axis=1).ravel()
    return images[order], labels[order]


def make_idx_dir(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    half = len(images) // 2
    write_idx(root / "train-images-idx3-ubyte.gz", images[:half])
    write_idx(root / "train-labels-idx1-ubyte.gz", labels[:half].astype(np.uint8))
    write_idx(root / "t10k-images-idx3-ubyte.gz", images[half:])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels[half:].astype(np.uint8))
    return root


def make_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, per_class: int = 6) -> Path:
    for label in range(3):
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images[labels == label][:per_class]):
            fmt = "PNG" if i % 2 else "JPEG"
            Image.fromarray(image).save(root / f"class_{label}" / f"{i}.{fmt.lower().replace('jpeg', 'jpg')}", format=fmt)
    return root


@needs_fashion
def test_real_fashion_mnist_idx():
    images = read_idx(str(FASHION / "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(str(FASHION / "t10k-labels-idx1-ubyte.gz"))
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10


def test_idx_source_pads_and_splits(tmp_path, real_digits):
    images, labels = mixed(*real_digits, per_class=40)
    root = make_idx_dir(tmp_path / "idx", images, labels)
    cfg = DataConfig(source="mnist", source_uri=str(root), eval_images=50)
    raw = read_source(cfg)
    assert raw.train.images.shape == (200, 32, 32, 1)
    # padding keeps pixels exact: the 28x28 digit sits at offset 2
    assert np.array_equal(raw.train.images[0, 2:30, 2:30, 0], images[0])
    train, evals = split_train_eval(raw, cfg)
    assert len(evals.labels) == 50 and len(train.labels) == 200


@pytest.mark.parametrize("damage", ["truncate", "bad_magic", "label_count"])
def test_corrupt_idx_names_the_file(tmp_path, real_digits, damage):
    images, labels = mixed(*real_digits, per_class=10)
    root = make_idx_dir(tmp_path / "idx", images, labels)
    if damage == "truncate":
        target = root / "train-images-idx3-ubyte.gz"
        blob = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(blob[:-100]))
    elif damage == "bad_magic":
        target = root / "train-labels-idx1-ubyte.gz"
        target.write_bytes(gzip.compress(b"\x12\x34" + gzip.decompress(target.read_bytes())[2:]))
    else:
        target = root / "train-labels-idx1-ubyte.gz"
        write_idx(target, labels[:10].astype(np.uint8))
    with pytest.raises(DataError) as err:
        read_source(DataConfig(source="mnist", source_uri=str(root)))
    assert str(target) in str(err.value) and "\n" not in str(err.value)


def test_missing_source_is_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/nope: source directory not found"):
        read_source(DataConfig(source="fashion_mnist", source_uri=str(tmp_path / "nope")))


def test_mnist5k_and_digits_sources():
    raw = read_source(DataConfig(source="mnist5k"))
    assert raw.train.images.shape == (5000, 32, 32, 1) and np.bincount(raw.train.labels).tolist() == [500] * 10
    digits = read_source(DataConfig(source="digits", resolution=8, resize="pad"))
    assert digits.train.images.shape == (1797, 8, 8, 1) and digits.train.images.max() == 255


def test_image_folder_png_jpeg_rgb(tmp_path, real_digits):
    images, labels = real_digits
    root = make_image_folder(tmp_path / "folder", images, labels)
    raw = read_source(DataConfig(source="image_folder", source_uri=str(root), channels=3, resolution=32))
    assert raw.class_names == ["class_0", "class_1", "class_2"]
    assert raw.train.images.shape == (18, 32, 32, 3)


def test_image_folder_corrupt_file_error_and_skip(tmp_path, real_digits):
    images, labels = real_digits
    root = make_image_folder(tmp_path / "folder", images, labels)
    bad = root / "class_1" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    with pytest.raises(DataError, match=r"class_1/1\.png: corrupt or unreadable image"):
        read_source(DataConfig(source="image_folder", source_uri=str(root)))
    cfg = DataConfig(source="image_folder", source_uri=str(root), on_bad_image="skip", eval_images=10)
    raw = read_source(cfg)
    assert [s["file"] for s in raw.skipped] == [f"{root}/class_1/1.png"]
    train, evals = split_train_eval(raw, cfg)
    manifest = write_prepared(tmp_path / "out", train, evals, raw, cfg)
    assert manifest["skipped"][0]["file"].endswith("class_1/1.png")


def test_image_folder_wrong_dimensions_and_empty_class(tmp_path, real_digits):
    images, labels = real_digits
    root = make_image_folder(tmp_path / "folder", images, labels)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "class_0" / "big.png")
    with pytest.raises(DataError, match=r"class_0/big\.png: wrong dimensions 64x64"):
        read_source(DataConfig(source="image_folder", source_uri=str(root), resize="pad"))
    (root / "class_0" / "big.png").unlink()
    for file in (root / "class_2").iterdir():
        file.unlink()
    with pytest.raises(DataError, match=r"class_2: empty class"):
        read_source(DataConfig(source="image_folder", source_uri=str(root)))


def test_fit_image_resize_mode():
    out = fit_image(np.full((50, 40, 1), 200, np.uint8), "x", 16, 1, "resize")
    assert out.shape == (16, 16, 1) and abs(int(out.mean()) - 200) <= 1


def test_shards_roundtrip_hash_and_corruption(tmp_path):
    cfg = DataConfig(source="mnist5k", eval_images=100, shard_images=1000, max_train_images=2500)
    raw = read_source(cfg)
    train, evals = split_train_eval(raw, cfg)
    out = tmp_path / "prepared"
    manifest = write_prepared(out, train, evals, raw, cfg)
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [1000, 1000, 500]
    split = load_split(str(out), "train")
    assert split.images.shape == (2500, 1, 32, 32) and split.images.dtype == np.uint8
    assert np.array_equal(split.images[:, 0], train.images[..., 0])
    assert sum(manifest["splits"]["eval"]["per_class"].values()) == 100
    digest = dataset_hash(str(out))
    shard = out / "train-00001.npz"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-00001.npz: sha256 does not match manifest"):
        load_split(str(out), "train")
    assert dataset_hash(str(out)) == digest  # hash is of the manifest's record, stable across copies


def test_failed_write_leaves_previous_output_intact(tmp_path, monkeypatch):
    cfg = DataConfig(source="digits", resolution=8, eval_images=100)
    raw = read_source(cfg)
    train, evals = split_train_eval(raw, cfg)
    out = tmp_path / "prepared"
    write_prepared(out, train, evals, raw, cfg)
    before = (out / "manifest.json").read_text()

    import gen_core.data as data_module

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(data_module, "_shard_bytes", boom)  # a fault we cannot cause for real
    with pytest.raises(OSError):
        write_prepared(out, train, evals, raw, cfg)
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # no temp dirs left behind


def test_a_small_dataset_gets_every_setting_that_does_not_fit_at_once_and_the_suggestions_fit():
    """80 images in 4 classes under params.yaml's defaults (1,000 eval images, 1,000 samples, KID subsets of 100, k=3):
    every data-size setting is listed with a value that fits, and with those values nothing is left to change."""
    from gen_core.config import load_config

    repo = Path(__file__).resolve().parent.parent
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 20)
    raw = RawDataset(RawSplit(rng.integers(0, 255, (80, 32, 32, 3), dtype=np.uint8), labels), None, ["a", "b", "c", "d"])
    source = ["data.source=image_folder", "data.source_uri=/nowhere", "data.channels=3"]
    fixes = settings_that_do_not_fit(load_config(repo / "params.yaml", source), raw)
    assert list(fixes) == ["data.eval_images", "evaluate.protocols.quick.num_samples", "evaluate.kid_subset_size", "evaluate.pr_neighbors"]
    assert fixes["data.eval_images"][:2] == (1000, 16)
    assert fixes["evaluate.protocols.quick.num_samples"][0] == 1000 and fixes["evaluate.protocols.quick.num_samples"][1] <= 64
    fitted = load_config(repo / "params.yaml", [*source, *(f"{key}={fits}" for key, (_, fits, _) in fixes.items())])
    assert settings_that_do_not_fit(fitted, raw) == {}
    train, evals = split_train_eval(raw, fitted.data)
    assert len(evals.labels) == 16 and len(train.labels) == 64


def test_atomic_outputs_get_the_modes_of_ordinary_files(tmp_path):
    """The atomic writers start from mkstemp/mkdtemp (0600/0700); what they publish must be readable as any file the
    process writes (a model on a team's shared filesystem), i.e. 0666/0777 less the umask."""
    import os
    import stat

    from gen_core.io import atomic_directory, atomic_write_bytes

    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "metrics.json", b"{}")
        with atomic_directory(tmp_path / "model") as directory:
            atomic_write_bytes(directory / "weights.bin", b"0")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "model" / "weights.bin").stat().st_mode) == 0o640


def _garment_folder(root: Path, images: np.ndarray, labels: np.ndarray, per_class: int = 8) -> list[tuple[str, np.ndarray]]:
    """PNG class folders of real images -> [("<class>/<file>", the 28x28 image)] in the reader's order."""
    written = []
    for label in range(3):
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images[labels == label][:per_class]):
            Image.fromarray(image).save(root / f"class_{label}" / f"{i}.png")
            written.append((f"class_{label}/{i}.png", image))
    return written


def test_a_caption_sidecar_gives_each_image_its_caption_through_the_split_and_the_shards(tmp_path, real_digits):
    """metadata.jsonl (Hugging Face image-folder convention) beside the class folders: every prepared image, in either
    split, carries the caption written for that very image; a caption for a skipped image is fine, a kept image without
    one, two sidecars, or a line that is not JSON are one-line errors naming the file, the sidecar's before any image's."""
    import json

    images, labels = real_digits
    root = tmp_path / "folder"
    written = _garment_folder(root, images, labels)
    captions = {name: f"image {k} of {name.split('/')[0]}" for k, (name, _) in enumerate(written)}
    sidecar = root / "metadata.jsonl"
    sidecar.write_text("".join(json.dumps({"file_name": name, "text": text}) + "\n" for name, text in reversed(captions.items())))
    cfg = DataConfig(source="image_folder", source_uri=str(root), eval_images=10, shard_images=100)
    raw = read_source(cfg)
    train, evals = split_train_eval(raw, cfg)
    manifest = write_prepared(tmp_path / "out", train, evals, raw, cfg)
    assert manifest["captions"] is True and manifest["pairs"] == "none"
    by_pixels = {np.pad(image, 2).tobytes(): captions[name] for name, image in written}
    for split_name, count in (("train", 14), ("eval", 10)):
        split = load_split(str(tmp_path / "out"), split_name)
        assert len(split.captions) == count and split.inputs is None
        assert [by_pixels[image[0].tobytes()] for image in split.images] == split.captions

    bad = root / "class_1" / "0.png"
    bad.write_bytes(bad.read_bytes()[:60])  # skipped: its caption is still an image of the folder's
    assert len(read_source(cfg.model_copy(update={"on_bad_image": "skip"})).train.captions) == 23
    sidecar.write_text("".join(json.dumps({"file_name": name, "text": text}) + "\n" for name, text in captions.items() if name != "class_2/3.png"))
    with pytest.raises(DataError, match=r"metadata\.jsonl: no caption for 1 image\(s\), first class_2/3\.png$"):
        read_source(cfg.model_copy(update={"on_bad_image": "skip"}))
    (root / "captions.jsonl").write_text("{}\n")
    skip = cfg.model_copy(update={"on_bad_image": "skip"})
    with pytest.raises(DataError, match=r"folder: both captions\.jsonl and metadata\.jsonl: keep one caption file$"):
        read_source(skip)
    sidecar.unlink()
    with pytest.raises(DataError, match=r'captions\.jsonl:1: not a JSON object with "file_name" and "text"$'):
        read_source(skip)
    # read before any image is decoded: its error comes first, not after minutes of decoding (or the corrupt image's)
    with pytest.raises(DataError, match=r'captions\.jsonl:1: not a JSON object'):
        read_source(cfg)


def test_user_pairs_from_a_and_b_folders_or_side_by_side_keep_each_input_with_its_target(tmp_path, real_digits):
    """data.pairs: A/<class>/<file> -> B/<class>/<file>, or one image A|B: every prepared target B has its own input A
    (here A = 255 - B) through the split and the shards; an unmatched or malformed pair is a one-line error naming it,
    or with on_bad_image skip left out and listed."""
    images, labels = real_digits
    pairs = tmp_path / "pairs"
    written = _garment_folder(pairs / "B", images, labels)
    for name, image in written:
        (pairs / "A" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - image).save(pairs / "A" / name)
    side = tmp_path / "side"
    for name, image in written:
        (side / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([255 - image, image], axis=1)).save(side / name)
    for root, kind in ((pairs, "folders"), (side, "side_by_side")):
        cfg = DataConfig(source="image_folder", source_uri=str(root), pairs=kind, eval_images=10, shard_images=100)
        raw = read_source(cfg)
        assert raw.class_names == ["class_0", "class_1", "class_2"]
        train, evals = split_train_eval(raw, cfg)
        assert write_prepared(tmp_path / kind, train, evals, raw, cfg)["pairs"] == kind
        for split_name in ("train", "eval"):
            split = load_split(str(tmp_path / kind), split_name)
            inner = (slice(None), slice(None), slice(2, 30), slice(2, 30))  # pad puts both on black: compare the 28x28 inside
            assert split.inputs.shape == split.images.shape and (split.inputs[inner] == 255 - split.images[inner]).all()

    (pairs / "A" / "class_1" / "2.png").unlink()
    (pairs / "A" / "class_2" / "extra.png").write_bytes((pairs / "A" / "class_2" / "1.png").read_bytes())
    cfg = DataConfig(source="image_folder", source_uri=str(pairs), pairs="folders", eval_images=10)
    with pytest.raises(DataError, match=rf"^{pairs}/A/class_2/extra\.png: unmatched \(no B/class_2/extra\.png\); 2 unmatched in all$"):
        read_source(cfg)
    raw = read_source(cfg.model_copy(update={"on_bad_image": "skip"}))
    assert len(raw.train.labels) == 23 and sorted(s["file"] for s in raw.skipped) == [f"{pairs}/A/class_2/extra.png", f"{pairs}/B/class_1/2.png"]
    Image.fromarray(images[0]).save(side / "class_0" / "square.png")
    with pytest.raises(DataError, match=r"class_0/square\.png: a side-by-side pair must be twice as wide as high \(got 28x28\)$"):
        read_source(DataConfig(source="image_folder", source_uri=str(side), pairs="side_by_side"))
    with pytest.raises(DataError, match=r"needs A/ and B/ sub-folders"):
        read_source(DataConfig(source="image_folder", source_uri=str(side), pairs="folders"))
    with pytest.raises(ValueError, match=r"pairs folders: user pairs come from an image_folder source \(got mnist5k"):
        DataConfig(source="mnist5k", pairs="folders")


def test_the_reference_split_is_the_protocols_head_and_refuses_a_short_split(tmp_path):
    cfg = DataConfig(source="mnist5k", eval_images=100, shard_images=1000, max_train_images=500)
    raw = read_source(cfg)
    train, evals = split_train_eval(raw, cfg)
    write_prepared(tmp_path / "prepared", train, evals, raw, cfg)
    run = RunConfig.model_validate({"data": {"source": "mnist5k", "out_dir": str(tmp_path / "prepared")},
                                    "evaluate": {"kid_subset_size": 30, "protocols": {"quick": {"num_samples": 60, "reference": "eval", "reference_images": 60}}}})  # fmt: skip
    reference = reference_split(run)
    assert reference.images.shape[0] == 60 and np.array_equal(reference.labels, evals.labels[:60])
    short = run.model_copy(update={"evaluate": run.evaluate.model_copy(update={"protocols": {"quick": run.evaluate.active.model_copy(update={"reference_images": 150})}})})
    with pytest.raises(DataError, match=r"evaluate.protocols.quick: needs 150 reference images, the eval split of .* has 100$"):
        reference_split(short)
