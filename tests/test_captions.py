"""gen_core.captions: attributes measured on real Fashion-MNIST, captions worded from them, and the sidecar caption
file of an image folder with its one-line refusals."""

import json

import numpy as np
import pytest

from gen_core.captions import AttributeScale, CaptionError, caption, captions_for, measure, read_caption_sidecar
from gen_core.data import DEFAULT_SOURCE_URIS, FASHION_MNIST_CLASSES, read_idx_dataset


@pytest.fixture(scope="module")
def fashion():
    raw = read_idx_dataset(DEFAULT_SOURCE_URIS["fashion_mnist"], FASHION_MNIST_CLASSES)
    nchw = lambda split: split.images.transpose(0, 3, 1, 2)  # noqa: E731  RawSplit is (N, H, W, C) uint8
    return nchw(raw.train), raw.train.labels, nchw(raw.eval), raw.eval.labels


def test_measure_reads_the_garments_pixels_only():
    images = np.zeros((2, 1, 28, 28))
    images[1, 0, 4:14, 4:14] = 0.5
    brightness, coverage = measure(images)
    assert brightness.tolist() == [0.0, 0.5] and coverage.tolist() == [0.0, 100 / 784]
    assert measure((images * 255).astype(np.uint8))[1].tolist() == coverage.tolist()  # uint8 is read as / 255


def test_the_scale_splits_real_garments_into_thirds_and_tells_classes_apart(fashion):
    train, train_labels, evals, eval_labels = fashion
    scale = AttributeScale.fit(train)
    assert AttributeScale.from_json(json.loads(json.dumps(scale.to_json()))) == scale
    brightness, size = scale.levels(evals)
    for levels in (brightness, size):  # tertiles of the train split: about a third of the eval split each
        assert np.abs(np.bincount(levels, minlength=3) / len(levels) - 1 / 3).max() < 0.05
    coverage = measure(evals)[1]
    trouser, pullover = FASHION_MNIST_CLASSES.index("trouser"), FASHION_MNIST_CLASSES.index("pullover")
    assert coverage[eval_labels == trouser].mean() < 0.6 * coverage[eval_labels == pullover].mean()  # what "size" sees
    assert (size[eval_labels == trouser] == 0).mean() > 0.8  # trousers: small in the frame


def test_captions_are_deterministic_and_say_what_was_measured(fashion):
    _, _, evals, labels = fashion
    scale = AttributeScale.fit(evals)
    texts = captions_for(evals[:8], labels[:8], FASHION_MNIST_CLASSES, scale)
    assert texts == captions_for(evals[:8], labels[:8], FASHION_MNIST_CLASSES, scale)
    brightness, size = scale.levels(evals[:8])
    for text, label, b, s in zip(texts, labels[:8], brightness, size):
        assert FASHION_MNIST_CLASSES[label] in text
        assert ("dark" in text) == (b == 0) and ("light" in text) == (b == 2)
        assert ("small in the frame" in text) == (s == 0) and ("filling the frame" in text) == (s == 2)


def test_caption_wording():
    assert caption("Ankle-boot", 1, 1) == "an ankle-boot"
    assert caption("ankle-boot", 0, 0) == "a dark ankle-boot, small in the frame"
    assert caption("bag", 2, 2, template=1) == "a photo of a light bag, filling the frame"
    assert caption("bag", 1, 0, template=2) == "bag, small in the frame"
    assert caption("bag", 1, 1, template=5) == "a photo of a bag"  # templates cycle


def test_a_sidecar_file_gives_each_image_its_caption_and_bad_files_are_one_line():
    names = ["cat/1.png", "dog/2.png"]
    good = '{"file_name": "cat/1.png", "text": "a cat"}\n\n{"file_name": "dog/2.png", "text": " a dog "}\n'
    assert read_caption_sidecar(good, "captions.jsonl", names) == {"cat/1.png": "a cat", "dog/2.png": "a dog"}
    bad = {
        '{"file_name": "cat/1.png"}': 'captions.jsonl:1: not a JSON object with "file_name" and "text"',
        "not json": 'captions.jsonl:1: not a JSON object with "file_name" and "text"',
        '{"file_name": "cat/1.png", "text": ""}': "captions.jsonl:1: empty caption for cat/1.png",
        '{"file_name": "cow/3.png", "text": "a cow"}': "captions.jsonl:1: cow/3.png is not an image of the folder",
        '{"file_name": "cat/1.png", "text": "a"}\n{"file_name": "cat/1.png", "text": "b"}': "captions.jsonl:2: a second caption for cat/1.png",
        '{"file_name": "cat/1.png", "text": "a cat"}': r"captions.jsonl: no caption for 1 image\(s\), first dog/2.png",
    }
    for text, message in bad.items():
        with pytest.raises(CaptionError, match=message) as err:
            read_caption_sidecar(text, "captions.jsonl", names)
        assert "\n" not in str(err.value)
