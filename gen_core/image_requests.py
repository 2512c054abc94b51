"""A request for generated images, as the registered model's `predict` (and so `mlflow models serve`) takes it:
rows of `label` (a class id or a class name) and `seed`, plus settings; checked as a whole before any sampling,
every problem a one-line RequestError; and the answer, as uint8 arrays or as PNG files in base64. A text-to-image
model (t2i) takes rows of `prompt` and `seed` with the same settings.

An image-to-image model (pix2pix) takes rows of `image` instead: a base64 PNG (or an (H, W) / (C, H, W) uint8 array)
at the model's resolution, with the setting `input`: `condition` (the image is the model's input itself, e.g. an edge
map) or `image` (an image like the training targets, turned into the input the way the training pairs were made)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np
import torch

from gen_core.config import SamplerConfig
from gen_core.sampling import png_bytes

FORMATS = ("array", "png")
SAMPLERS = SamplerConfig.model_fields["name"].annotation.__args__  # ddpm, ddim, dpmsolver++, heun
# The request's settings and their "not given" values (MLflow's params schema needs a default of each type):
# an empty sampler, 0 steps or a negative guidance scale mean the model's own.
DEFAULTS = {"format": "array", "sampler": "", "num_steps": 0, "guidance_scale": -1.0}
MAX_IMAGES = 256  # per request, unless the server sets another cap (GENFORGE_MAX_IMAGES)
MAX_PROMPT_CHARS = 1000  # the encoder reads 64 tokens of it at most


class RequestError(ValueError):
    """A request the model cannot answer, in one line."""


TRANSLATION_DEFAULTS = {"format": "array", "input": "condition"}
TRANSLATION_INPUTS = ("condition", "image")


@dataclass
class ImageRequest:
    labels: torch.Tensor  # (N,) class ids
    seeds: list[int]
    options: dict  # sampler options for a diffusion model (only those given)
    format: str


def parse_request(labels: list, seeds: list, params: dict | None, class_names: list[str], num_classes: int, family: str,
                  max_images: int = MAX_IMAGES) -> ImageRequest:  # fmt: skip
    """Class ids or names and seeds (one per image) and settings -> an ImageRequest, or a one-line RequestError."""
    params = _settings(params)
    _rows(labels, seeds, max_images, "`label` (class id or name)")
    ids = [class_id(label, class_names, num_classes) for label in labels]
    return ImageRequest(torch.tensor(ids, dtype=torch.long), _seeds(seeds), _sampler_options(params, family), params["format"])


def parse_prompt_request(prompts: list, seeds: list, params: dict | None, max_images: int = MAX_IMAGES) -> PromptRequest:
    """Prompts and seeds (one per image) and settings -> a PromptRequest for a text-to-image model, or a one-line RequestError.
    An empty prompt is the unconditional model."""
    params = _settings(params)
    _rows(prompts, seeds, max_images, "`prompt`")
    bad = next((i for i, prompt in enumerate(prompts) if not isinstance(prompt, str)), None)
    if bad is not None:
        raise RequestError(f"prompt row {bad}: {prompts[bad]!r} is not text")
    long = next((i for i, prompt in enumerate(prompts) if len(prompt) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise RequestError(f"prompt row {long}: {len(prompts[long])} characters, at most {MAX_PROMPT_CHARS}")
    return PromptRequest(list(prompts), _seeds(seeds), _sampler_options(params, "t2i"), params["format"])


def _settings(params: dict | None) -> dict:
    params = {**DEFAULTS, **(params or {})}
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise RequestError(f"unknown setting {unknown[0]!r} (settings: {', '.join(DEFAULTS)})")
    if params["format"] not in FORMATS:
        raise RequestError(f"format {params['format']!r}: one of {', '.join(FORMATS)}")
    return params


def _rows(conditions: list, seeds: list, max_images: int, what: str) -> None:
    if not conditions:
        raise RequestError(f"no rows: give one {what} and one `seed` per image")
    if len(conditions) > max_images:
        raise RequestError(f"{len(conditions)} images: at most {max_images} a request")
    if len(seeds) != len(conditions):
        raise RequestError(f"{len(conditions)} {what.split()[0].strip('`')}s but {len(seeds)} seeds: one seed per image")


def _seeds(seeds: list) -> list[int]:
    try:
        seeds = [int(seed) for seed in seeds]
    except (TypeError, ValueError):
        raise RequestError(f"seed {next(s for s in seeds if not _is_int(s))!r}: an integer") from None
    if any(seed < 0 or seed >= 2**63 for seed in seeds):
        raise RequestError(f"seed {next(s for s in seeds if s < 0 or s >= 2**63)}: between 0 and 2**63 - 1")
    return seeds


def _sampler_options(params: dict, family: str) -> dict:
    options = {}
    if params["sampler"]:
        if params["sampler"] not in SAMPLERS:
            raise RequestError(f"sampler {params['sampler']!r}: one of {', '.join(SAMPLERS)}")
        options["sampler"] = params["sampler"]
    if int(params["num_steps"]) > 0:
        options["num_steps"] = int(params["num_steps"])
    if float(params["guidance_scale"]) >= 0:
        options["guidance_scale"] = float(params["guidance_scale"])
    if options and family not in ("ldm", "t2i"):
        raise RequestError(f"{', '.join(options)}: settings of a diffusion model; this is a {family}")
    return options


def class_id(label, class_names: list[str], num_classes: int, what: str | None = None) -> int:
    """A class id (int, or a string of digits) or a class name (any case) -> the id; else a one-line RequestError
    that names it as `what` (default: label 'the label')."""
    if isinstance(label, str) and not label.strip().isdigit():
        lowered = {name.lower(): i for i, name in enumerate(class_names)}
        if label.strip().lower() in lowered:
            return lowered[label.strip().lower()]
    elif _is_int(label) and 0 <= int(label) < num_classes:
        return int(label)
    known = ", ".join(f"{i} {n}" for i, n in enumerate(class_names)) if class_names else f"ids 0..{num_classes - 1}"
    raise RequestError(f"{what or f'label {label!r}'}: not a class of this model ({known})")


def _is_int(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    if isinstance(value, (float, np.floating)):
        return float(value).is_integer()
    return isinstance(value, str) and value.strip().isdigit()


def answer(images_uint8: np.ndarray, request: ImageRequest, class_names: list[str]):
    """(N, C, H, W) uint8 -> the array itself, or for format png one record per image: label, class_name, seed, and the
    image as a base64 PNG file."""
    if request.format == "array":
        return images_uint8
    import pandas as pd

    return pd.DataFrame({
        "label": request.labels.tolist(),
        "class_name": [class_names[i] if i < len(class_names) else str(i) for i in request.labels.tolist()],
        "seed": request.seeds,
        "png": [base64.b64encode(png_bytes(image.transpose(1, 2, 0))).decode("ascii") for image in images_uint8],
    })  # fmt: skip


@dataclass
class PromptRequest:
    prompts: list[str]
    seeds: list[int]
    options: dict
    format: str


@dataclass
class TranslationRequest:
    images: np.ndarray  # (N, C, R, R) uint8: the inputs, or (input "image") the images to make them from
    input: str  # condition | image
    format: str


def parse_translation_request(images: list, params: dict | None, resolution: int, max_images: int = MAX_IMAGES) -> TranslationRequest:
    """Rows of `image` (base64 PNG, or a uint8 array) and settings -> a TranslationRequest, or a one-line RequestError
    naming the row. Grey and RGB are accepted alike (Translator.inputs fits them to the model's input channels)."""
    params = {**TRANSLATION_DEFAULTS, **(params or {})}
    unknown = sorted(set(params) - set(TRANSLATION_DEFAULTS))
    if unknown:
        raise RequestError(f"unknown setting {unknown[0]!r} (settings: {', '.join(TRANSLATION_DEFAULTS)})")
    if params["format"] not in FORMATS:
        raise RequestError(f"format {params['format']!r}: one of {', '.join(FORMATS)}")
    if params["input"] not in TRANSLATION_INPUTS:
        raise RequestError(f"input {params['input']!r}: one of {', '.join(TRANSLATION_INPUTS)}")
    if not images:
        raise RequestError("no rows: give one `image` (a base64 PNG) per translation")
    if len(images) > max_images:
        raise RequestError(f"{len(images)} images: at most {max_images} a request")
    decoded = [_decode_image(image, row, resolution) for row, image in enumerate(images)]
    channels = max(image.shape[0] for image in decoded)
    stacked = np.stack([np.repeat(image, channels // image.shape[0], axis=0) for image in decoded])
    return TranslationRequest(stacked, params["input"], params["format"])


def _decode_image(image, row: int, resolution: int) -> np.ndarray:
    """One row's image -> (C, R, R) uint8 with C 1 or 3."""
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(image, str):
        try:
            with Image.open(io.BytesIO(base64.b64decode(image, validate=True))) as opened:
                array = np.asarray(opened.convert("L" if opened.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"))
        except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
            raise RequestError(f"image row {row}: not a base64 PNG or JPEG") from None
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise RequestError(f"image row {row}: an array must be uint8 (got {array.dtype})")
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3) and array.shape[0] not in (1, 3):
        array = array.transpose(2, 0, 1)  # (H, W, C) as PIL gives it
    if array.ndim != 3 or array.shape[0] not in (1, 3) or array.shape[1:] != (resolution, resolution):
        raise RequestError(f"image row {row}: {'x'.join(map(str, array.shape))}; expected {resolution}x{resolution}, grey or RGB")
    return np.ascontiguousarray(array)


def translation_answer(images_uint8: np.ndarray, request: TranslationRequest):
    """(N, C, H, W) uint8 -> the array itself, or for format png one record per image: the row and a base64 PNG."""
    if request.format == "array":
        return images_uint8
    import pandas as pd

    return pd.DataFrame({
        "row": list(range(len(images_uint8))),
        "png": [base64.b64encode(png_bytes(image.transpose(1, 2, 0))).decode("ascii") for image in images_uint8],
    })  # fmt: skip


def prompt_answer(images_uint8: np.ndarray, request: PromptRequest):
    """(N, C, H, W) uint8 -> the array itself, or for format png one record per image: its prompt, seed and a base64 PNG."""
    if request.format == "array":
        return images_uint8
    import pandas as pd

    return pd.DataFrame({
        "prompt": request.prompts, "seed": request.seeds,
        "png": [base64.b64encode(png_bytes(image.transpose(1, 2, 0))).decode("ascii") for image in images_uint8],
    })  # fmt: skip
