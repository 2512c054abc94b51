"""A request for generated images, as the registered model's `predict` (and so `mlflow models serve`) takes it:
rows of `label` (a class id or a class name) and `seed`, plus settings; checked as a whole before any sampling,
every problem a one-line RequestError; and the answer, as uint8 arrays or as PNG files in base64."""

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


class RequestError(ValueError):
    """A request the model cannot answer, in one line."""


@dataclass
class ImageRequest:
    labels: torch.Tensor  # (N,) class ids
    seeds: list[int]
    options: dict  # sampler options for a diffusion model (only those given)
    format: str


def parse_request(labels: list, seeds: list, params: dict | None, class_names: list[str], num_classes: int, family: str,
                  max_images: int = MAX_IMAGES) -> ImageRequest:  # fmt: skip
    """Class ids or names and seeds (one per image) and settings -> an ImageRequest, or a one-line RequestError."""
    params = {**DEFAULTS, **(params or {})}
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise RequestError(f"unknown setting {unknown[0]!r} (settings: {', '.join(DEFAULTS)})")
    if params["format"] not in FORMATS:
        raise RequestError(f"format {params['format']!r}: one of {', '.join(FORMATS)}")
    if not labels:
        raise RequestError("no rows: give one `label` (class id or name) and one `seed` per image")
    if len(labels) > max_images:
        raise RequestError(f"{len(labels)} images: at most {max_images} a request")
    if len(seeds) != len(labels):
        raise RequestError(f"{len(labels)} labels but {len(seeds)} seeds: one seed per image")
    ids = [class_id(label, class_names, num_classes) for label in labels]
    try:
        seeds = [int(seed) for seed in seeds]
    except (TypeError, ValueError):
        raise RequestError(f"seed {next(s for s in seeds if not _is_int(s))!r}: an integer") from None
    if any(seed < 0 or seed >= 2**63 for seed in seeds):
        raise RequestError(f"seed {next(s for s in seeds if s < 0 or s >= 2**63)}: between 0 and 2**63 - 1")
    options = {}
    if params["sampler"]:
        if params["sampler"] not in SAMPLERS:
            raise RequestError(f"sampler {params['sampler']!r}: one of {', '.join(SAMPLERS)}")
        options["sampler"] = params["sampler"]
    if int(params["num_steps"]) > 0:
        options["num_steps"] = int(params["num_steps"])
    if float(params["guidance_scale"]) >= 0:
        options["guidance_scale"] = float(params["guidance_scale"])
    if options and family != "ldm":
        raise RequestError(f"{', '.join(options)}: settings of a diffusion model; this is a {family}")
    return ImageRequest(torch.tensor(ids, dtype=torch.long), seeds, options, params["format"])


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
