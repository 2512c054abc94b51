"""Stage `export`: a registered version in ONNX, for ONNX Runtime.

    python -m pipelines.export --family gan|ldm [--model models:/genforge-gan@champion | models:/genforge-gan/3]

--model defaults to the family's champion (registry.<family>.model_name @ registry.alias). The version's weights
are read from the registry as safetensors + JSON (nothing unpickled) and written to <serving.onnx_dir>/<family>/:
the GAN as generator.onnx `(z, labels) -> images`; the LDM as denoiser.onnx `(sample, timestep, class_labels) ->
prediction` and decoder.onnx `latents -> images`; onnx.json beside them (each file's sha256, the version, what
sampling needs). The files are also logged to the version's run (onnx/v<version>/) and the version is tagged
`onnx_sha256` (over the files) and `onnx_artifact`, so a served file can be checked against the registry. Rerunning
is safe: an export the version already carries is not logged again.

Sampling through them: gen_core.onnx_gan.OnnxGanGenerator, gen_core.onnx_diffusion.OnnxDiffusionGenerator (the same
seeded latents, schedule, samplers and guidance as the torch path).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gen_core.config import RunConfig
from gen_core.io import atomic_directory, atomic_write_json
from gen_core.onnx_diffusion import export_diffusion_onnx, sampling_record
from gen_core.onnx_gan import OPSET, export_gan_onnx
from pipelines.common import StageError, family_parser, log, run_stage
from pipelines.registry import champion_uri, load_registered_generator, registered_version
from pipelines.tracking import connect, server_calls, tracking_uri

def export(cfg: RunConfig, family: str, model_uri: str | None = None) -> dict:
    """The version's generator -> <serving.onnx_dir>/<family>/ + its MLflow record -> the onnx.json record."""
    model_uri = model_uri or champion_uri(cfg, family)
    mlflow = connect(cfg)
    with server_calls(tracking_uri(cfg), f"exporting {model_uri}"):
        client = mlflow.MlflowClient()
        version = registered_version(client, model_uri)
        generator, meta = load_registered_generator(f"models:/{version.name}/{version.version}")
        if meta.get("family", "gan") != family:
            raise StageError(f"--model {model_uri}: a {meta.get('family')} model, not {family} (set --family)")
        out = Path(cfg.serving.onnx_dir) / family
        with atomic_directory(out) as staging:
            record = {"family": family, "model_uri": model_uri, "model_name": version.name, "version": int(version.version),
                      "run_id": version.run_id, "step": meta.get("step"), "class_names": meta.get("class_names"), "opset": OPSET,
                      **_write_onnx(generator, family, staging)}  # fmt: skip
            atomic_write_json(staging / "onnx.json", record)
        _log_to_version(client, version, out, record)
    return record


def _write_onnx(generator, family: str, directory: Path) -> dict:
    """The family's ONNX files in `directory` -> their part of onnx.json (files with sha256, what sampling needs)."""
    if family == "gan":
        spec = generator.generator.spec
        files = {"generator.onnx": export_gan_onnx(generator.generator, directory / "generator.onnx")}
        return {"files": files, "inputs": {"z": ["n", spec.z_dim], "labels": ["n"]},
                "outputs": {"images": ["n", spec.channels, spec.resolution, spec.resolution]}}  # fmt: skip
    files = export_diffusion_onnx(generator, directory)
    return {"files": files, "sampling": sampling_record(generator), "image_shape": list(generator.image_shape)}


def _log_to_version(client, version, out: Path, record: dict) -> None:
    """The files to the version's run under onnx/v<version>/, and tags onnx_sha256 (over every file) and onnx_artifact;
    an export the version already carries is not logged again."""
    digest = hashlib.sha256(json.dumps(record["files"], sort_keys=True).encode()).hexdigest()
    artifact, logged = f"onnx/v{version.version}", version.tags.get("onnx_sha256") == digest
    if not logged:
        for name in record["files"]:
            client.log_artifact(version.run_id, str(out / name), artifact)
        client.set_model_version_tag(version.name, version.version, "onnx_artifact", f"runs:/{version.run_id}/{artifact}")
        client.set_model_version_tag(version.name, version.version, "onnx_sha256", digest)
    log("export").info("%s (v%s, step %s) -> %s/ (%s), onnx_sha256 %s..., %s run %s as %s/", record["model_uri"], version.version,
                       record["step"], out, ", ".join(record["files"]), digest[:12], "already logged to" if logged else "logged to",
                       version.run_id, artifact)  # fmt: skip


def main() -> None:
    parser = family_parser("genforge export stage: a registered version in ONNX for ONNX Runtime", "export")
    parser.add_argument("--model", help="the registered version (default: the family's champion), e.g. models:/genforge-gan/3")
    run_stage("export", lambda cfg, args: export(cfg, args.family, args.model) and 0, parser)


if __name__ == "__main__":
    main()
