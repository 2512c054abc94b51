"""Captions for labelled images that come without any: the class name, worded by one of a few templates, with the
attributes that can be measured on the image itself.

Fashion-MNIST has no captions, and most of what a caption would say (sleeve length, pattern, material) cannot be
computed from 28x28 grey pixels. Two things can, on the garment's own pixels (the mask of pixels above
`OBJECT_THRESHOLD` of full scale; the background is black):
- **brightness**: the mean intensity over the mask -> "dark" / (nothing) / "light";
- **size in the frame**: the mask's share of the image -> "small in the frame" / (nothing) / "filling the frame".
The cut points are the dataset's own tertiles (`AttributeScale.fit` on the train split), so "dark" means the darkest
third of this dataset's garments; the middle third gets no word. The same scale measures generated images, which is how
text alignment is judged without CLIP: does the image show the class and the attributes its prompt asked for.

Deterministic: image i's caption depends only on its pixels, its label, the scale and i (the template is i mod the
number of templates). Users with their own captions bring them as a sidecar file instead (`read_caption_sidecar`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

OBJECT_THRESHOLD = 0.1  # a pixel above 10% of full scale belongs to the garment
BRIGHTNESS_WORDS = ("dark", None, "light")
SIZE_WORDS = ("small in the frame", None, "filling the frame")
TEMPLATES = (
    "a {brightness} {name}, {size}",
    "a photo of a {brightness} {name}, {size}",
    "{brightness} {name}, {size}",
    "a picture of a {brightness} {name}, {size}",
)


class CaptionError(ValueError):
    """A caption file that cannot be used; the message names the file and line."""


def measure(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, H, W) images in [0, 1] (uint8: / 255) -> (brightness (N,), coverage (N,)): the mean intensity of the
    garment's pixels (0 for an empty image) and their share of the frame."""
    x = images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)
    grey = x.mean(axis=1).reshape(len(x), -1)  # (N, H * W)
    mask = grey > OBJECT_THRESHOLD
    coverage = mask.mean(axis=1)
    brightness = np.where(mask.any(axis=1), (grey * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1), 0.0)
    return brightness, coverage


@dataclass(frozen=True)
class AttributeScale:
    """The tertile cut points of brightness and coverage on a reference set (the train split)."""

    brightness: tuple[float, float]
    coverage: tuple[float, float]

    @classmethod
    def fit(cls, images: np.ndarray) -> "AttributeScale":
        brightness, coverage = measure(images)
        cut = lambda values: tuple(float(q) for q in np.quantile(values, [1 / 3, 2 / 3]))  # noqa: E731
        return cls(cut(brightness), cut(coverage))

    def levels(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(brightness level (N,), size level (N,)), each 0 (low third), 1 (middle) or 2 (high third)."""
        brightness, coverage = measure(images)
        return np.digitize(brightness, self.brightness), np.digitize(coverage, self.coverage)

    def to_json(self) -> dict:
        return {"brightness": list(self.brightness), "coverage": list(self.coverage)}

    @classmethod
    def from_json(cls, record: dict) -> "AttributeScale":
        return cls(tuple(record["brightness"]), tuple(record["coverage"]))


def caption(name: str, brightness_level: int, size_level: int, template: int = 0) -> str:
    """One caption: TEMPLATES[template] with the words of the two levels; a middle level's word is left out."""
    brightness, size = BRIGHTNESS_WORDS[brightness_level], SIZE_WORDS[size_level]
    text = TEMPLATES[template % len(TEMPLATES)].format(brightness=brightness or "", name=name.lower(), size=size or "")
    words = " ".join(text.split()).replace(" ,", ",").rstrip(", ").split(" ")
    return " ".join("an" if word == "a" and after[:1] in "aeiou" and after else word for word, after in zip(words, words[1:] + [""]))


def captions_for(images: np.ndarray, labels: np.ndarray, class_names: list[str], scale: AttributeScale) -> list[str]:
    """Caption i of (N, C, H, W) images with (N,) labels: class name, measured attributes, template i mod 4."""
    brightness, size = scale.levels(images)
    return [caption(class_names[int(label)], int(b), int(s), i) for i, (label, b, s) in enumerate(zip(labels, brightness, size))]


def read_caption_sidecar(text: str, source: str, names: list[str], required: list[str] | None = None) -> dict[str, str]:
    """A caption file beside an image folder, in the convention of Hugging Face `datasets` image folders: JSON lines
    of {"file_name": <path relative to the folder>, "text": <caption>} (`captions.jsonl` or `metadata.jsonl`).
    -> {file name: caption} for `names`; CaptionError naming `source` and the line for a malformed line, a duplicate,
    a file that is not among `names`, or an image of `required` (default: all `names`) without a caption."""
    known, captions = set(names), {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            file_name, caption_text = record["file_name"], record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CaptionError(f'{source}:{number}: not a JSON object with "file_name" and "text"') from None
        if not isinstance(caption_text, str) or not caption_text.strip():
            raise CaptionError(f"{source}:{number}: empty caption for {file_name}")
        if file_name not in known:
            raise CaptionError(f"{source}:{number}: {file_name} is not an image of the folder")
        if file_name in captions:
            raise CaptionError(f"{source}:{number}: a second caption for {file_name}")
        captions[file_name] = caption_text.strip()
    sidecar_captions(captions, names if required is None else required, source)
    return captions


def sidecar_captions(captions: dict[str, str], names: list[str], source: str) -> list[str]:
    """The captions of `names` from a read sidecar (`read_caption_sidecar`), in their order; CaptionError naming
    `source` and the first image without one."""
    missing = [name for name in names if name not in captions]
    if missing:
        raise CaptionError(f"{source}: no caption for {len(missing)} image(s), first {missing[0]}")
    return [captions[name] for name in names]
