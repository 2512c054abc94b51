"""A registered version, the family's champion by default, opened for serving (the Gradio demo) with what a person
wants to see beside its images.

Sampling goes through ONNX Runtime when `python -m pipelines.export` wrote that very version's files to
<serving.onnx_dir>/<family>/ (onnx.json names the model and version, and every file still has the sha256 it
recorded), else through torch. Either way the weights come from safetensors and JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from gen_core.config import RunConfig
from gen_core.io import sha256_file
from pipelines.common import StageError
from pipelines.registry import champion_uri, load_registered_generator, registered_version
from pipelines.tracking import connect, server_calls, tracking_uri

METRIC_TAGS = ("fid", "floor_fid", "recall", "floor_recall", "precision", "class_accuracy", "floor_class_accuracy")


@dataclass
class ServedModel:
    family: str
    model_uri: str  # as asked for (models:/genforge-gan@champion)
    name: str
    version: int
    aliases: list[str]
    generator: object  # gen_core.generators interface: num_classes, sample(labels, seeds, device, **sampler options)
    meta: dict  # the version's generator.json
    backend: str  # "onnxruntime" or "torch"
    backend_note: str  # why this backend
    tags: dict = field(default_factory=dict)  # the version's tags (metrics, protocol, gate)
    run_id: str | None = None
    run_url: str | None = None  # the training run in the MLflow UI, when the store is a server

    @property
    def class_names(self) -> list[str]:
        names = self.meta.get("class_names") or []
        return [names[i] if i < len(names) else str(i) for i in range(self.generator.num_classes)]

    @property
    def metrics(self) -> dict[str, float]:
        return {k: float(self.tags[k]) for k in METRIC_TAGS if k in self.tags}

    def summary(self) -> str:
        """One paragraph of Markdown: version and aliases, gated metrics with their floors and protocol, backend, run."""
        m = self.metrics
        aliases = " ".join(f"@{a}" for a in self.aliases)
        parts = [f"**{self.name} v{self.version}** {aliases} ({self.family}, step {self.meta.get('step', '?')})"]
        for key, label, fmt in (("fid", "FID", ".2f"), ("recall", "recall", ".3f"), ("class_accuracy", "class accuracy", ".3f")):
            if key in m:
                floor = f" [floor {m['floor_' + key]:{fmt}}]" if f"floor_{key}" in m else ""
                parts.append(f"{label} {m[key]:{fmt}}{floor}")
        if "protocol_id" in self.tags:
            parts.append(f"protocol `{self.tags['protocol_id']}`")
        parts.append(f"gate: {self.tags.get('gate', 'untagged')}")
        parts.append(f"served by {self.backend} ({self.backend_note})")
        run = f"[{self.run_id}]({self.run_url})" if self.run_url else f"`{self.run_id}`"
        parts.append(f"training run {run}")
        return " · ".join(parts)


def open_registered(cfg: RunConfig, family: str | None, model_uri: str | None = None, option: str = "--model-uri") -> ServedModel:
    """The registered version at `model_uri` (default: the family's champion), ready to sample; family None:
    whichever the version holds. One-line StageError when there is no such version or it holds the other family."""
    model_uri = model_uri or champion_uri(cfg, family)
    mlflow = connect(cfg)
    with server_calls(tracking_uri(cfg), f"opening {model_uri}"):
        client = mlflow.MlflowClient()
        version = registered_version(client, model_uri, option)
        number = int(version.version)
        generator, meta = load_registered_generator(f"models:/{version.name}/{number}")
        if family is not None and meta.get("family", "gan") != family:
            raise StageError(f"{option} {model_uri}: a {meta.get('family', 'gan')} model, not {family}")
        family = meta.get("family", "gan")
        aliases = sorted(a for a, v in client.get_registered_model(version.name).aliases.items() if int(v) == number)
        run_url = _run_url(cfg, client, version.run_id)
    onnx, note = open_onnx_export(Path(cfg.serving.onnx_dir) / family, version.name, number, generator.num_classes)
    return ServedModel(
        family=family, model_uri=model_uri, name=version.name, version=number, aliases=aliases, generator=onnx or generator, meta=meta,
        backend="onnxruntime" if onnx else "torch", backend_note=note, tags=dict(version.tags), run_id=version.run_id, run_url=run_url,
    )  # fmt: skip


def open_onnx_export(directory: Path, name: str, version: int, num_classes: int):
    """(ONNX Runtime generator, why) when `directory` holds `python -m pipelines.export`'s files for this very
    version, unchanged since (sha256 per file); else (None, why not)."""
    from gen_core.onnx_diffusion import OnnxDiffusionGenerator
    from gen_core.onnx_gan import OnnxGanGenerator

    try:
        record = json.loads((directory / "onnx.json").read_text())
    except FileNotFoundError:
        return None, f"no ONNX export in {directory}"
    except (OSError, ValueError) as err:
        return None, f"{directory}/onnx.json unreadable ({type(err).__name__})"
    if (record.get("model_name"), record.get("version")) != (name, version):
        return None, f"{directory} holds {record.get('model_name')} v{record.get('version')}, not v{version}"
    changed = [f for f, digest in record.get("files", {}).items() if not (directory / f).is_file() or sha256_file(directory / f) != digest]
    if changed or not record.get("files"):
        return None, f"{directory}/{(changed or ['onnx.json'])[0]} does not match its recorded sha256"
    if record["family"] == "gan":
        generator = OnnxGanGenerator(directory / "generator.onnx", record["inputs"]["z"][1], num_classes)
    else:
        generator = OnnxDiffusionGenerator(directory, **record["sampling"])
    return generator, f"{directory}, sha256-checked"


def _run_url(cfg: RunConfig, client, run_id: str | None) -> str | None:
    """The run's page in the MLflow UI (the address without its credentials); None for a file or sqlite store."""
    uri = tracking_uri(cfg)
    if not run_id or not uri.startswith(("http://", "https://")):
        return None
    parts = urllib.parse.urlsplit(uri)
    address = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], query="", fragment=""))
    return f"{address.rstrip('/')}/#/experiments/{client.get_run(run_id).info.experiment_id}/runs/{run_id}"
