"""One typed, validated config for a genforge run.

`params.yaml` is parsed once into `RunConfig`. Every section is a frozen pydantic
model that rejects unknown keys, so a typo or an out-of-range value fails before
any work starts, with one line that names the key:

    params.yaml: train.lr_g: Input should be greater than 0 (got -0.1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A params file that cannot be turned into a RunConfig. The message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------
# Sections, one per DVC stage
# ---------------------------------------------------------------------------


class DataConfig(_Section):
    """`prepare`: source -> validated uint8 shards + manifest."""

    source: Literal["fashion_mnist", "mnist", "mnist5k", "digits", "image_folder"] = "fashion_mnist"
    # Directory of idx files (fashion_mnist, mnist) or of class sub-folders (image_folder).
    # Local path or s3:// URL. None means the offline default for the source.
    source_uri: str | None = None
    resolution: int = Field(32, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    resize: Literal["pad", "resize"] = "pad"  # pad keeps pixels exact; resize is bicubic
    max_train_images: int | None = Field(None, ge=1)  # None: all
    eval_images: int = Field(1000, ge=10)
    shard_images: int = Field(10_000, ge=100)
    on_bad_image: Literal["error", "skip"] = "error"
    split_seed: int = 0
    out_dir: str = "data/prepared"

    @model_validator(mode="after")
    def _power_of_two(self) -> "DataConfig":
        if self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two (got {self.resolution})")
        return self


class ClassifierConfig(_Section):
    """`classifier`: small CNN used for conditional accuracy and domain-feature FID."""

    width: int = Field(32, ge=4)
    feature_dim: int = Field(128, ge=8)
    steps: int = Field(600, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0
    out_dir: str = "models/classifier"
    metrics_file: str = "metrics/classifier.json"


class InceptionConfig(_Section):
    """Where the FID Inception network comes from. `package` works offline."""

    source: Literal["package", "url"] = "package"
    url: str = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
    sha256: str | None = None  # required for source=url; downloads are never trusted unverified
    batch_size: int = Field(50, ge=1)
    # bf16 autocast moves features ~1.7% (STACK.md); off by default so numbers match clean-fid.
    bf16: bool = False


class RefStatsConfig(_Section):
    """`ref_stats`: FID reference statistics of the eval split."""

    inception: InceptionConfig = InceptionConfig()
    out_dir: str = "data/ref_stats"


class GanModelConfig(_Section):
    """Class-conditional DCGAN sizes. Resolution and channels come from `data`."""

    z_dim: int = Field(64, ge=1)
    g_width: int = Field(32, ge=8)  # channels at the highest resolution, doubled per downsample
    d_width: int = Field(32, ge=8)
    spectral_norm: bool = True


class TrainConfig(_Section):
    """`train_gan`: Ray Train run of the conditional GAN."""

    model: GanModelConfig = GanModelConfig()
    loss: Literal["nonsaturating", "hinge"] = "hinge"
    total_steps: int = Field(2000, ge=1)
    global_batch_size: int = Field(64, ge=1)
    lr_g: float = Field(2e-4, gt=0, le=1)
    lr_d: float = Field(2e-4, gt=0, le=1)
    adam_beta1: float = Field(0.0, ge=0, lt=1)
    adam_beta2: float = Field(0.99, ge=0, lt=1)
    d_steps_per_g_step: int = Field(1, ge=1)
    ema_halflife_kimg: float = Field(10.0, gt=0)  # EMA of G: half-life in thousands of images
    ema_rampup_ratio: float | None = Field(0.05, gt=0)  # half-life <= this x images seen; null: off
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    checkpoint_every_steps: int = Field(250, ge=1)
    checkpoints_to_keep: int = Field(2, ge=1)
    log_every_steps: int = Field(50, ge=1)
    sample_grid_seed: int = 1234
    out_dir: str = "models/gan"
    losses_file: str = "metrics/train_losses.csv"  # DVC plots

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        if self.checkpoint_every_steps > self.total_steps:
            raise ValueError(
                f"checkpoint_every_steps ({self.checkpoint_every_steps}) exceeds total_steps ({self.total_steps})"
            )
        return self


class RayConfig(_Section):
    """How training/eval use Ray. `address: null` starts a local Ray, unless RAY_ADDRESS is set."""

    address: str | None = None
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    strategy: Literal["ddp"] = "ddp"
    storage_path: str = "runs/ray"  # local path or s3:// URL; checkpoints live here
    run_name: str = "gan"
    max_failures: int = Field(0, ge=-1)


class EvaluateConfig(_Section):
    """`evaluate`: metrics of generated samples against the eval split."""

    num_samples: int = Field(1000, ge=10)
    batch_size: int = Field(50, ge=1)
    seed: int = 2024  # sample i uses generator seeded seed + i: independent of world size
    kid_subset_size: int = Field(100, ge=2)
    kid_subsets: int = Field(50, ge=1)
    pr_neighbors: int = Field(3, ge=1)
    out_file: str = "metrics/metrics.json"


class RegistryConfig(_Section):
    """`register`: MLflow model version + FID gate for the `champion` alias."""

    model_name: str = "genforge-gan"
    fid_threshold: float = Field(150.0, gt=0)
    alias: str = "champion"
    out_file: str = "metrics/register.json"


class TrackingConfig(_Section):
    """MLflow. `tracking_uri: null` uses MLFLOW_TRACKING_URI, else sqlite in the repo."""

    tracking_uri: str | None = None
    experiment: str = "genforge"


class RunConfig(_Section):
    data: DataConfig = DataConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    ref_stats: RefStatsConfig = RefStatsConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        if self.train.global_batch_size % self.ray.num_workers:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be divisible by "
                f"ray.num_workers ({self.ray.num_workers})"
            )
        if self.evaluate.kid_subset_size > min(self.evaluate.num_samples, self.data.eval_images):
            raise ValueError(
                f"evaluate.kid_subset_size ({self.evaluate.kid_subset_size}) exceeds "
                "evaluate.num_samples or data.eval_images"
            )
        return self


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    where = f"{source}: {loc}" if loc else source
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {msg}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.total_steps=10' -> (['train', 'total_steps'], 10). Values are YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict, source: str = "params") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_config(path: str | Path = "params.yaml", overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return config_from_dict(apply_overrides(raw, list(overrides)), str(path))
